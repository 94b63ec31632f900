"""PEFT's RoAd scenarios (tests/test_custom_models.py) on our API, each compared with PEFT itself."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MLP, build_hf, mlp_input, token_batch
from peft import RoadConfig as PeftRoadConfig
from peft import get_peft_model

import fx_adapters as fxa
from fx_adapters.graph.tags import tag_of, tagged
from fx_adapters.road.modules_to_save import SavedTag

SINGLE_CONFIGS = [
    dict(target_modules=["lin0"], group_size=2),
    dict(target_modules=["lin0", "lin1"], group_size=2),
    dict(target_modules=["lin1"], group_size=2, variant="road_2"),
    dict(target_modules=["lin0"], group_size=4, variant="road_2"),
    dict(target_modules=["lin0"], group_size=2, variant="road_4"),
    dict(target_modules=["lin0", "lin1"], group_size=2, variant="road_4"),
]
SAME_TARGETS = (dict(target_modules=["lin0"], group_size=2), dict(target_modules=["lin0"], group_size=2,
                                                                  variant="road_4"))
DIFFERENT_TARGETS = (dict(target_modules=["lin0"], group_size=2), dict(target_modules=["lin1"], group_size=2,
                                                                       variant="road_4"))


def both(model, configs: dict[str, dict], tmp_path, example=None, before_save=None):
    """PEFT's model and ours with the same random adapters (PEFT initialises, ours loads its checkpoint);
    ``before_save(peft_model)`` may change PEFT's model before it is saved."""
    torch.manual_seed(0)
    peft_model = None
    for name, cfg in configs.items():
        peft_cfg = PeftRoadConfig(init_weights=False, **cfg)
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(model), peft_cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, peft_cfg)
    if before_save is not None:
        before_save(peft_model)
    peft_model.save_pretrained(tmp_path)
    am = None
    for name in configs:
        if am is None:
            am = fxa.compile_with_road(model, fxa.RoadConfig.from_pretrained(tmp_path / name), adapter_name=name,
                                       **(example or {}))
        am.load_adapter(tmp_path / name, adapter_name=name)
    return peft_model.eval(), am.eval()


def close(a, b, atol=1e-5):
    """≤ atol, or a few fp32 ulps of the MLP's large log-probabilities (its input is arange(90))."""
    torch.testing.assert_close(a, b, atol=atol, rtol=1.3e-6)


@pytest.fixture(params=[True, False], ids=["bias", "no_bias"])
def mlp(request):
    return MLP(bias=request.param).eval()


@pytest.mark.parametrize("config", SINGLE_CONFIGS, ids=[f"config{i}" for i in range(1, 7)])
def test_single_adapter_equals_peft(mlp, config, tmp_path):
    peft_model, am = both(mlp, {"p": config}, tmp_path)
    with torch.no_grad():
        close(am(mlp_input()), peft_model(mlp_input()))


@pytest.mark.parametrize("configs", [SAME_TARGETS, DIFFERENT_TARGETS], ids=["same_targets", "different_targets"])
def test_two_active_adapters_equal_peft(mlp, configs, tmp_path):
    peft_model, am = both(mlp, dict(zip("pq", configs)), tmp_path)
    peft_model.base_model.set_adapter(["p", "q"])
    am.set_adapter(["p", "q"])
    assert am.active_adapters == ["p", "q"]
    with torch.no_grad():
        close(am(mlp_input()), peft_model(mlp_input()))


@pytest.mark.parametrize("configs", [SAME_TARGETS, DIFFERENT_TARGETS], ids=["same_targets", "different_targets"])
def test_merging_both_equals_peft_merge(mlp, configs, tmp_path):
    peft_model, am = both(mlp, dict(zip("pq", configs)), tmp_path)
    peft_model.base_model.set_adapter(["p", "q"])
    am.set_adapter(["p", "q"])
    with torch.no_grad():
        unmerged = am(mlp_input())
        peft_model.merge_adapter(["p", "q"])
        am.merge(["p", "q"])
        close(am(mlp_input()), peft_model(mlp_input()), atol=1e-4)
        close(am(mlp_input()), unmerged, atol=1e-4)


def test_unmerge_then_disabled_is_the_base_model(mlp, tmp_path):
    _, am = both(mlp, dict(zip("pq", DIFFERENT_TARGETS)), tmp_path)
    am.merge(["p", "q"])
    am.unmerge()
    with torch.no_grad(), am.disable_adapters():
        close(am(mlp_input()), mlp(mlp_input()))


def layer_weights(module):
    """Weights and biases of the model's layers by their base names (PEFT's ``base_layer`` left out of them)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in module.named_parameters()
            if "road_" not in n and not n.startswith("saved_modules.")}


def test_sequential_merge_equals_batch_merge(mlp, tmp_path):
    peft_model, am = both(mlp, dict(zip("pq", SAME_TARGETS)), tmp_path)
    base = layer_weights(mlp)
    peft_model.merge_adapter(["p", "q"])
    expected = layer_weights(peft_model.base_model.model)
    am.merge(["p", "q"])
    batch = layer_weights(am.graph_module)
    assert batch.keys() == expected.keys() == base.keys()
    for name, value in batch.items():
        close(value, expected[name], atol=1e-4)
    am.unmerge()
    for name, value in layer_weights(am.graph_module).items():
        torch.testing.assert_close(value, base[name], atol=1e-6, rtol=0)
    am.merge(["p"])
    with pytest.warns(UserWarning, match=r"Already merged: \['p'\]. Now additionally merging \['q'\]"):
        am.merge(["q"])  # PEFT warns the same
    for name, value in layer_weights(am.graph_module).items():
        close(value, batch[name], atol=1e-6)
        close(value, expected[name], atol=1e-4)
    am.unmerge()
    for name, value in layer_weights(am.graph_module).items():
        torch.testing.assert_close(value, base[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("configs", [SAME_TARGETS, DIFFERENT_TARGETS], ids=["same_targets", "different_targets"])
def test_mixed_batches_equal_peft(mlp, configs, tmp_path):
    peft_model, am = both(mlp, dict(zip("pq", configs)), tmp_path)
    names = ["p", "q", "__base__", "q", "p", "p", "__base__", "q", "p"]
    with torch.no_grad():
        close(am(mlp_input(), adapter_names=names), peft_model(mlp_input(), adapter_names=names))


def test_fold_of_a_list_equals_those_adapters_active(mlp, tmp_path):
    _, am = both(mlp, dict(zip("pq", DIFFERENT_TARGETS)), tmp_path)
    am.set_adapter(["q", "p"])
    with torch.no_grad():
        close(am.fold(["q", "p"])(mlp_input()), am(mlp_input()))
        am.set_adapter("q")
        close(am.fold("q")(mlp_input()), am(mlp_input()))


def test_unfold_of_a_composed_fold_restores_the_base_weights(mlp, tmp_path):
    _, am = both(mlp, dict(zip("pq", SAME_TARGETS)), tmp_path)
    base = fxa.unfold(am.fold(["p", "q"]), am)
    for name, value in base.named_parameters():
        close(value, mlp.get_parameter(name), atol=1e-6)


GROUP_SIZES = {"g2": dict(target_modules=["lin0", "lin1"], group_size=2),  # loaded first: lin0's first rotation
               "g4": dict(target_modules=["lin0"], group_size=4, variant="road_2")}


@pytest.mark.parametrize("activations", [[["g2", "g4"]], [["g4", "g2"]], [["g4", "g2"], ["g2", "g4"]]],
                         ids=["graph_order", "reversed", "reversed_then_back"])
def test_active_adapters_of_different_group_sizes_equal_peft_in_any_order(mlp, activations, tmp_path):
    peft_model, am = both(mlp, GROUP_SIZES, tmp_path)
    for names in activations:
        am.set_adapter(names)
    peft_model.base_model.set_adapter(activations[-1])
    am.graph_module.graph.lint()
    with torch.no_grad():
        close(am(mlp_input()), peft_model(mlp_input()))


def test_mixed_batch_after_reordering_rotations_equals_peft(mlp, tmp_path):
    peft_model, am = both(mlp, GROUP_SIZES, tmp_path)
    am.set_adapter(["g4", "g2"])
    names = ["g4", "g2", "__base__", "g2", "g4", "g4", "__base__", "g2", "g4"]
    with torch.no_grad():
        close(am(mlp_input(), adapter_names=names), peft_model(mlp_input(), adapter_names=names))


def test_merging_reordered_adapters_of_different_group_sizes_equals_peft_merge(mlp, tmp_path):
    peft_model, am = both(mlp, GROUP_SIZES, tmp_path)
    peft_model.base_model.set_adapter(["g4", "g2"])
    am.set_adapter(["g4", "g2"])
    with torch.no_grad():
        peft_model.merge_adapter()
        am.merge()
        assert am.merged_adapters == ["g4", "g2"]
        close(am(mlp_input()), peft_model(mlp_input()), atol=1e-4)


def test_fold_of_reordered_adapters_of_different_group_sizes_equals_peft(mlp, tmp_path):
    peft_model, am = both(mlp, GROUP_SIZES, tmp_path)
    peft_model.base_model.set_adapter(["g4", "g2"])
    am.set_adapter(["g4", "g2"])
    with torch.no_grad():
        close(am.fold()(mlp_input()), peft_model(mlp_input()))


def test_deleting_an_adapter_after_reordering_rotations_equals_peft(mlp, tmp_path):
    peft_model, am = both(mlp, GROUP_SIZES, tmp_path)
    peft_model.base_model.set_adapter(["g4", "g2"])
    am.set_adapter(["g4", "g2"])
    peft_model.delete_adapter("g2")
    am.delete_adapter("g2")
    am.graph_module.graph.lint()
    assert am.active_adapters == peft_model.active_adapters == ["g4"]
    with torch.no_grad():
        close(am(mlp_input()), peft_model(mlp_input()))


def test_adapters_of_one_group_size_separated_by_another_are_refused(mlp, tmp_path):
    _, am = both(mlp, dict(GROUP_SIZES, other_g2=dict(target_modules=["lin0"], group_size=2, variant="road_4")),
                 tmp_path)
    am.set_adapter("g2")
    with pytest.raises(NotImplementedError, match="group sizes"):
        am.set_adapter(["g2", "g4", "other_g2"])
    assert am.active_adapters == ["g2"]


def test_deleting_an_active_adapter_keeps_the_others_active(mlp, tmp_path):
    _, am = both(mlp, dict(zip("pq", DIFFERENT_TARGETS)), tmp_path)
    am.set_adapter(["p", "q"])
    am.delete_adapter("p")
    assert am.active_adapters == ["q"] and am.active_adapter == "q"
    am.graph_module.graph.lint()
    assert not [n for n in am.graph_module.graph.nodes if getattr(tag_of(n), "layer", None) == "lin0"]


# ---------------------------------------------------------------- the same on a tiny Llama

@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    configs = {"p": dict(target_modules=["q_proj", "v_proj"], group_size=8),
               "q": dict(target_modules=["v_proj", "down_proj"], group_size=8, variant="road_2")}
    model = build_hf("llama")
    return (model, *both(model, configs, tmp_path_factory.mktemp("pair")))


def test_llama_composition_equals_peft(llama_pair):
    _, peft_model, am = llama_pair
    ids, mask = token_batch(2, 6, left_pad=2)
    peft_model.base_model.set_adapter(["q", "p"])
    am.set_adapter(["q", "p"])
    with torch.no_grad():
        close(am(input_ids=ids, attention_mask=mask).logits,
              peft_model(input_ids=ids, attention_mask=mask).logits)


def test_llama_mixed_batch_across_different_targets_equals_peft(llama_pair):
    _, peft_model, am = llama_pair
    ids, mask = token_batch(3, 6)
    names = ["q", "__base__", "p"]
    with torch.no_grad():
        close(am(input_ids=ids, attention_mask=mask, adapter_names=names).logits,
              peft_model(input_ids=ids, attention_mask=mask, adapter_names=names).logits)


@pytest.fixture(scope="module")
def llama_group_sizes(tmp_path_factory):
    configs = {"g8": dict(target_modules=["q_proj", "v_proj"], group_size=8),  # loaded first: v_proj's first rotation
               "g4": dict(target_modules=["v_proj", "o_proj"], group_size=4, variant="road_4")}
    return both(build_hf("llama"), configs, tmp_path_factory.mktemp("group_sizes"))


@pytest.mark.parametrize("names", [["g8", "g4"], ["g4", "g8"]], ids=["graph_order", "reversed"])
def test_llama_adapters_of_different_group_sizes_equal_peft_in_any_order(llama_group_sizes, names):
    peft_model, am = llama_group_sizes
    ids, mask = token_batch(2, 6, left_pad=2)
    peft_model.base_model.set_adapter(names)
    am.set_adapter(names)
    with torch.no_grad():
        close(am(input_ids=ids, attention_mask=mask).logits, peft_model(input_ids=ids, attention_mask=mask).logits)


def test_llama_generate_with_reordered_adapters_equals_peft(llama_group_sizes):
    peft_model, am = llama_group_sizes
    ids, mask = token_batch(2, 6, left_pad=2)
    peft_model.base_model.set_adapter(["g4", "g8"])
    am.set_adapter(["g4", "g8"])
    with torch.no_grad():
        expected = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(am.generate(ids, max_new_tokens=8, attention_mask=mask), expected)


# ---------------------------------------------------------------- modules_to_save

SAVING = dict(target_modules=["lin0"], modules_to_save=["lin1"], group_size=2)


def perturb_saved_copies(peft_model):
    """Train-like changes of the adapters' lin1 copies in PEFT's model (PEFT starts them as exact copies). Not a
    shift shared by both outputs: LogSoftmax would hide it."""
    with torch.no_grad():
        for peft_copy in peft_model.base_model.model.lin1.modules_to_save.values():
            peft_copy.weight.add_(0.3 * torch.randn_like(peft_copy.weight))
            if peft_copy.bias is not None:
                peft_copy.bias.add_(torch.tensor([-0.2, 0.4]))


def trained_copy(peft_model, am):
    """Make the adapters' lin1 copies differ from lin1 in both models."""
    perturb_saved_copies(peft_model)
    with torch.no_grad():
        for name, peft_copy in peft_model.base_model.model.lin1.modules_to_save.items():
            ours = am.adapter_parameters(name)
            ours["lin1", "weight"].copy_(peft_copy.weight)
            if peft_copy.bias is not None:
                ours["lin1", "bias"].copy_(peft_copy.bias)


def peft_mixed_batch(peft_model, x, names):
    """PEFT's output of each sample with its adapter active (``__base__``: disabled), as PEFT's own mixed-batch tests
    check. Not PEFT's ``adapter_names`` path: for RoAd, PEFT 0.21 hooks ``adapter_names`` into its RoAd layers only,
    so a ``modules_to_save`` layer gives every sample the active adapter's copy (its LoRA hooks both)."""
    active, outputs = peft_model.active_adapter, {}
    for name in set(names):
        if name == "__base__":
            with peft_model.disable_adapter():
                outputs[name] = peft_model(x)
        else:
            peft_model.set_adapter(name)
            outputs[name] = peft_model(x)
    peft_model.set_adapter(active)
    return torch.stack([outputs[name][i] for i, name in enumerate(names)])


def test_modules_to_save_equals_peft(mlp, tmp_path):
    peft_model, am = both(mlp, {"p": SAVING, "q": SAME_TARGETS[1]}, tmp_path)
    trained_copy(peft_model, am)
    with torch.no_grad():
        close(am(mlp_input()), peft_model(mlp_input()))


def test_modules_to_save_in_mixed_batches_equals_peft(mlp, tmp_path):
    peft_model, am = both(mlp, {"p": SAVING, "q": SAME_TARGETS[1]}, tmp_path)
    trained_copy(peft_model, am)
    names = ["p", "q", "__base__", "p", "q", "__base__", "p", "p", "q"]
    with torch.no_grad():
        close(am(mlp_input(), adapter_names=names), peft_mixed_batch(peft_model, mlp_input(), names))


@pytest.mark.parametrize("names", [None, ["p", "q", "__base__", "p", "q", "__base__", "p", "p", "q"]],
                         ids=["active", "mixed_batch"])
def test_modules_to_save_loaded_from_a_peft_checkpoint_equal_peft(mlp, names, tmp_path):
    peft_model, am = both(mlp, {"p": SAVING, "q": SAME_TARGETS[1]}, tmp_path, before_save=perturb_saved_copies)
    assert not torch.allclose(am.adapter_parameters("p")["lin1", "weight"], mlp.lin1.weight)  # the checkpoint's
    with torch.no_grad():
        expected = peft_model(mlp_input()) if names is None else peft_mixed_batch(peft_model, mlp_input(), names)
        close(am(mlp_input(), adapter_names=names), expected)


def test_modules_to_save_copies_are_trainable_for_the_active_adapter_only(mlp, tmp_path):
    _, am = both(mlp, {"p": SAVING, "q": dict(SAVING, variant="road_2")}, tmp_path)
    am.set_adapter("q")
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert {"graph_module.saved_modules.lin1.weight.q", "graph_module.saved_modules.lin1.weight.p"} & trainable == {
        "graph_module.saved_modules.lin1.weight.q"}


def test_modules_to_save_round_trip_through_peft(mlp, tmp_path):
    peft_model, am = both(mlp, {"p": SAVING}, tmp_path / "peft")
    trained_copy(peft_model, am)
    am.save_adapter(tmp_path / "ours", adapter_name="p")
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(copy.deepcopy(mlp), tmp_path / "ours").eval()
    with torch.no_grad():
        close(reloaded(mlp_input()), am(mlp_input()))


def test_fold_and_merge_use_the_modules_to_save_copy(mlp, tmp_path):
    peft_model, am = both(mlp, {"p": SAVING}, tmp_path)
    trained_copy(peft_model, am)
    with torch.no_grad():
        expected = am(mlp_input())
        close(am.fold("p")(mlp_input()), expected)
        am.merge()
        close(am(mlp_input()), expected)
        am.unmerge()
        close(am(mlp_input()), expected)
        with am.disable_adapters():
            close(am(mlp_input()), mlp(mlp_input()))


def test_two_active_adapters_with_modules_to_save_are_refused(mlp, tmp_path):
    _, am = both(mlp, {"p": SAVING, "q": dict(SAVING, variant="road_2")}, tmp_path)
    with pytest.raises(ValueError, match="at most one active adapter"):
        am.set_adapter(["p", "q"])


def test_deleting_the_last_adapter_saving_a_layer_removes_its_saved_module(mlp, tmp_path):
    _, am = both(mlp, {"p": SAVING, "q": SAME_TARGETS[1]}, tmp_path, before_save=perturb_saved_copies)
    am.delete_adapter("p")
    am.graph_module.graph.lint()
    assert not [n for n, _ in tagged(am.graph_module.graph, SavedTag)]
    assert "lin1" not in am.graph_module.saved_modules
    modules = [n.target for n in am.graph_module.graph.nodes if n.op == "call_module"]
    assert modules == ["lin0", "relu", "drop", "lin1", "sm"]  # lin1 is called as in the captured graph again
    with torch.no_grad():
        close(am(mlp_input(), adapter_names=["__base__"] * 9), mlp(mlp_input()))


def test_deleting_an_adapter_with_modules_to_save_keeps_the_others_equal_to_peft(mlp, tmp_path):
    peft_model, am = both(mlp, {"p": SAVING, "q": SAME_TARGETS[1]}, tmp_path, before_save=perturb_saved_copies)
    peft_model.delete_adapter("p")
    am.delete_adapter("p")
    assert am.active_adapters == ["q"] and peft_model.active_adapters == ["q"]
    with torch.no_grad():
        close(am(mlp_input()), peft_model(mlp_input()))


def test_an_adapter_with_modules_to_save_loaded_again_after_deleting_it_equals_peft(mlp, tmp_path):
    peft_model, am = both(mlp, {"p": SAVING, "q": SAME_TARGETS[1]}, tmp_path, before_save=perturb_saved_copies)
    am.delete_adapter("p")
    am.load_adapter(tmp_path / "p", adapter_name="p")
    names = ["p", "q", "__base__", "p", "q", "__base__", "p", "p", "q"]
    with torch.no_grad():
        close(am(mlp_input(), adapter_names=names), peft_mixed_batch(peft_model, mlp_input(), names))


def test_layer_rotated_by_one_adapter_cannot_be_saved_by_another(mlp):
    am = fxa.compile_with_road(mlp, fxa.RoadConfig(group_size=2, target_modules=["lin1"]))
    with pytest.raises(ValueError, match="cannot be both rotated"):
        am.add_adapter("saver", fxa.RoadConfig(group_size=2, target_modules=["lin0"], modules_to_save=["lin1"]))
    assert list(am.adapters) == ["default"]
