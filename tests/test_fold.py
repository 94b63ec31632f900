"""merge / unmerge / fold / unfold: same outputs as the adapted model, PEFT's merged weights, exact undo."""

from __future__ import annotations

import contextlib
import copy
import inspect
import pickle

import pytest
import torch
from conftest import MLP, build_hf, mlp_input, peft_road, token_batch
from hypothesis import assume, given
from hypothesis import strategies as st
from peft import get_peft_model_state_dict
from peft.tuners.road.layer import _get_delta_weight
from torch import nn

import fx_adapters as fxa
from fx_adapters.graph.match import Target
from fx_adapters.road.fold import Fold, RotateWeights
from fx_adapters.road.rotation import param_size, road_columns

ATOL = 1e-5
ARCHS = ["mlp", "mlp_no_bias", "llama", "qwen2", "gpt2"]
# (variant, group_size, target_modules) per family: MLP's lin0 has 20 outputs and lin1 2
SETTINGS = {
    "mlp": [("road_1", 2, "all-linear"), ("road_2", 4, ["lin0"]), ("road_4", 10, ["lin0"])],
    "hf": [("road_1", 8, "all-linear"), ("road_2", 16, "all-linear"), ("road_4", 4, "all-linear")],
}


def family(arch: str) -> str:
    return "mlp" if arch.startswith("mlp") else "hf"


@pytest.fixture(scope="module")
def adapted():
    """``adapted(arch) -> (model, am)``, each captured once for the whole module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            model = MLP(bias=arch == "mlp").eval() if family(arch) == "mlp" else build_hf(arch)
            targets = ["lin0"] if family(arch) == "mlp" else ["q_proj", "c_attn"]
            init = fxa.RoadConfig(group_size=2, target_modules=targets)
            cache[arch] = model, fxa.compile_with_road(model, init, adapter_name="init").eval()
        return cache[arch]

    return get


def run(arch: str, module) -> torch.Tensor:
    """The model's main output for a fixed input; works for the model, an AdaptedModule and a folded module."""
    with torch.no_grad():
        if family(arch) == "mlp":
            return module(mlp_input())
        ids, mask = token_batch(2, 6, left_pad=2)
        out = module(input_ids=ids, attention_mask=mask)
        return out["logits"]


@contextlib.contextmanager
def restored_weights(am):
    """Unmerge on exit, then put the exact weight tensors back.

    Unmerging drifts the weights by a few ulps (times the blocks' condition numbers); restoring them keeps
    the tests that share a module independent.
    """
    saved = weights(am)
    try:
        yield
    finally:
        if am.merged:
            am.unmerge()
        for fqn, param in saved.items():
            path, _, leaf = fqn.rpartition(".")
            am.graph_module.get_submodule(path)._parameters[leaf] = param


@contextlib.contextmanager
def adapter(am, variant, group_size, targets, name="x", seed=0):
    """A random adapter, active within the block (see ``restored_weights``), deleted on exit."""
    torch.manual_seed(seed)
    am.add_adapter(name, fxa.RoadConfig(variant=variant, group_size=group_size, init_weights=False,
                                        target_modules=targets))
    am.set_adapter(name)
    try:
        with restored_weights(am):
            yield name
    finally:
        am.delete_adapter(name)


def weights(am) -> dict[str, torch.Tensor]:
    return {n: p for n, p in am.graph_module.named_parameters() if not n.startswith("road_adapters.")}


def params_of(am, name, target):
    params = am.adapter_parameters(name)
    return params[target, "road_theta"], params[target, "road_alpha"]


# ------------------------------------------------------------------------------------------------ merge


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("setting", range(3))
def test_merged_outputs_equal_unmerged_outputs(adapted, arch, setting):
    _, am = adapted(arch)
    with adapter(am, *SETTINGS[family(arch)][setting]):
        expected = run(arch, am)
        am.merge()
        # R·W rounds differently from W then R: the MLP's outputs reach ~60, where 1e-5 is ~1 ulp (flaky with rtol=0)
        torch.testing.assert_close(run(arch, am), expected, atol=ATOL, rtol=1e-6)


@pytest.mark.parametrize("arch, variant, group_size", [
    ("mlp", "road_2", 4), ("mlp_no_bias", "road_4", 10), ("llama", "road_1", 8), ("qwen2", "road_4", 16)])
def test_merged_weights_equal_peft_merged_weights(adapted, arch, variant, group_size):
    model, am = adapted(arch)
    targets = ["lin0"] if family(arch) == "mlp" else "all-linear"
    torch.manual_seed(3)
    peft_model = peft_road(model, variant=variant, group_size=group_size, init_weights=False, target_modules=targets)
    config = fxa.RoadConfig(variant=variant, group_size=group_size, target_modules=targets)
    am.load_adapter(get_peft_model_state_dict(peft_model), adapter_name="peft", config=config)
    try:
        with restored_weights(am):
            peft_model.merge_adapter()
            am.merge(["peft"])
            for target in am.adapter_targets("peft"):
                base = peft_model.base_model.model.get_submodule(target.name).base_layer
                ours = am.graph_module.get_submodule(target.name)
                torch.testing.assert_close(ours.weight, base.weight, atol=ATOL, rtol=0)
                if base.bias is not None:
                    torch.testing.assert_close(ours.bias, base.bias, atol=ATOL, rtol=0)
    finally:
        am.delete_adapter("peft")


def test_two_adapters_merge_in_order_as_peft(adapted):
    model, am = adapted("mlp")
    first = dict(variant="road_2", group_size=4, init_weights=False, target_modules=["lin0"])
    second = dict(variant="road_4", group_size=10, init_weights=False, target_modules=["lin0"])
    torch.manual_seed(4)
    peft_model = peft_road(model, **first)
    peft_model.add_adapter("second", type(peft_model.peft_config["default"])(**second))
    for name, cfg in (("default", first), ("second", second)):
        state = get_peft_model_state_dict(peft_model, adapter_name=name)
        am.load_adapter(state, adapter_name=name, config=fxa.RoadConfig(**cfg))
    try:
        with restored_weights(am):
            peft_model.base_model.merge_adapter(["default", "second"])
            am.merge(["default", "second"])
            assert am.merged_adapters == ["default", "second"]
            torch.testing.assert_close(am.graph_module.lin0.weight,
                                       peft_model.base_model.model.lin0.base_layer.weight, atol=ATOL, rtol=0)
    finally:
        am.delete_adapter("default")
        am.delete_adapter("second")


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_unmerge_restores_the_weights_of_every_architecture(adapted, arch, exact):
    """Exact: the tensors from before the merge, bit for bit; else R⁻¹·(R·W), as PEFT, within rounding."""
    _, am = adapted(arch)
    before = {n: p.detach().clone() for n, p in weights(am).items()}
    with adapter(am, "road_1", 2, "all-linear" if family(arch) == "mlp" else ["c_attn", "c_fc", "q_proj", "o_proj"]):
        am.merge()
        am.unmerge(exact=exact)
        for name, value in weights(am).items():
            torch.testing.assert_close(value, before[name], **(dict(atol=0, rtol=0) if exact else dict(atol=1e-6,
                                                                                                       rtol=0)))


def test_an_exact_unmerge_of_two_merges_gives_the_models_own_outputs_bit_for_bit(adapted):
    model, am = adapted("llama")
    with adapter(am, "road_2", 16, "all-linear"), adapter(am, "road_1", 8, ["q_proj", "v_proj"], name="y", seed=1):
        am.merge(["x"])
        am.merge(["y"])
        am.unmerge()
        with am.disable_adapters():
            assert torch.equal(run("llama", am), run("llama", model))


def condition_numbers(cols: torch.Tensor, group_size: int) -> torch.Tensor:
    """Condition number of each 2×2 block (test helper: dense blocks are fine at this size)."""
    d, f = (c.reshape(-1, 2, group_size // 2) for c in cols)
    blocks = torch.stack([torch.stack([d[:, 0], f[:, 0]], -1), torch.stack([f[:, 1], d[:, 1]], -1)], -2)
    s = torch.linalg.svdvals(blocks.double())
    return s[..., 0] / s[..., 1]


@pytest.fixture(scope="module")
def small():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8, bias=False)).eval()
    return fxa.compile_with_road(model, fxa.RoadConfig(group_size=2, target_modules=["0"]), adapter_name="init")


@given(variant=st.sampled_from(["road_1", "road_2", "road_4"]), group_size=st.sampled_from([2, 4, 8]), data=st.data())
def test_merge_then_unmerge_restores_weights(small, variant, group_size, data):
    """Any well-conditioned θ, α (a block with condition number κ loses ~κ ulps in the round trip)."""
    size = param_size(variant, 8)
    theta = data.draw(st.lists(st.floats(-10, 10), min_size=size, max_size=size))
    alpha = data.draw(st.lists(st.floats(0.25, 4) | st.floats(-4, -0.25), min_size=size, max_size=size))
    theta, alpha = torch.tensor(theta), torch.tensor(alpha)
    assume(condition_numbers(road_columns(variant, group_size, theta, alpha), group_size).max() < 8)
    before = {n: p.detach().clone() for n, p in weights(small).items()}
    with adapter(small, variant, group_size, ["0", "2"]):
        with torch.no_grad():
            for target in ("0", "2"):
                for param, value in zip(params_of(small, "x", target), (theta, alpha)):
                    param.copy_(value)
        small.merge()
        assert not torch.equal(small.graph_module.get_parameter("2.weight"), before["2.weight"])
        small.unmerge(exact=False)  # R⁻¹ (exact=True puts the old tensors back)
        for name, value in weights(small).items():
            torch.testing.assert_close(value, before[name], atol=1e-6, rtol=0)


def test_merge_never_writes_into_the_callers_weights(adapted):
    model, am = adapted("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with adapter(am, "road_2", 16, "all-linear"):
        am.merge()
        am.unmerge()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_already_merged_adapters_are_skipped_with_a_warning(adapted):
    _, am = adapted("mlp")
    with adapter(am, "road_1", 2, ["lin0"]):
        am.merge()
        merged = am.graph_module.lin0.weight
        with pytest.warns(UserWarning, match="Already merged"):
            am.merge(["x"])
        assert am.merged_adapters == ["x"] and am.graph_module.lin0.weight is merged


def test_adapter_names_while_merged_raises(adapted):
    _, am = adapted("mlp")
    with adapter(am, "road_1", 2, ["lin0"]):
        am.merge()
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
            am(mlp_input(), adapter_names=["x"] * 9)


def test_disable_adapters_while_merged_raises(adapted):
    _, am = adapted("mlp")
    with adapter(am, "road_1", 2, ["lin0"]):
        am.merge()
        with am.disable_adapters(), pytest.raises(ValueError, match="call unmerge"):
            am(mlp_input())


def test_safe_merge_with_a_nan_adapter_raises_and_leaves_every_weight_bit_identical(adapted):
    _, am = adapted("qwen2")
    with adapter(am, "road_2", 16, "all-linear"):
        with torch.no_grad():
            params_of(am, "x", "model.layers.1.mlp.up_proj")[0][3] = float("nan")
        before = {n: (p, p.detach().clone()) for n, p in weights(am).items()}
        with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj'.*nothing was merged"):
            am.merge(safe_merge=True)
        after = weights(am)
        assert after.keys() == before.keys() and not am.merged
        assert all(after[n] is p and torch.equal(p, value) for n, (p, value) in before.items())


def test_an_inverse_unmerge_of_a_non_invertible_rotation_raises_and_keeps_the_merged_weights():
    torch.manual_seed(0)
    am = fxa.compile_with_road(MLP(), fxa.RoadConfig(group_size=4, target_modules=["lin0"], init_weights=False))
    with torch.no_grad():
        params_of(am, "default", "lin0")[1][5] = 0.0
    before = {n: p.detach().clone() for n, p in weights(am).items()}
    am.merge()
    merged = weights(am)
    with pytest.raises(fxa.NotInvertibleError, match="'lin0'.*1 of 10 2×2 blocks are singular"):
        am.unmerge(exact=False)
    assert all(weights(am)[n] is p for n, p in merged.items()) and am.merged_adapters == ["default"]
    am.unmerge()  # exact: needs no inverse
    assert not am.merged and all(torch.equal(p, before[n]) for n, p in weights(am).items())


def test_a_quantized_target_that_is_not_a_quantized_layer_is_refused_naming_the_layer(adapted):
    _, am = adapted("mlp")
    fold = Fold(Target("lin0", "bnb4", 10, 20, True, ("lin0",)), road_columns("road_1", 2, torch.ones(10),
                                                                             torch.ones(10)), 2, "q")
    with pytest.raises(TypeError, match="'lin0' is a bnb4 target: expected a bitsandbytes .* got Linear"):
        RotateWeights([fold])(am.graph_module)


# ------------------------------------------------------------------------------------------------- fold


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_module_computes_the_adapted_model(adapted, arch):
    _, am = adapted(arch)
    with adapter(am, *SETTINGS[family(arch)][2]):
        torch.testing.assert_close(run(arch, am.fold()), run(arch, am), atol=ATOL, rtol=0)


def test_folded_module_is_standalone(adapted):
    _, am = adapted("llama")
    folded = am.fold("init")
    assert [n.target for n in folded.graph.find_nodes(op="placeholder")] == ["input_ids", "attention_mask"]
    assert not any(n.startswith("road_adapters") for n, _ in folded.named_modules())
    assert all(not type(m).__module__.startswith("fx_adapters") for m in folded.modules())
    targets = [n.target for n in folded.graph.nodes if n.op == "call_function"]
    assert all(not getattr(t, "__module__", "").startswith("fx_adapters") for t in targets)
    assert "road" not in folded.code and "fx_adapters" not in folded.code


@pytest.fixture(scope="module")
def folded_llama():
    """A random RoAd adapter as PEFT makes it, PEFT's merged model (the oracle) and our fold of the same adapter."""
    model = build_hf("llama")
    torch.manual_seed(5)
    peft_model = peft_road(model, variant="road_2", group_size=8, init_weights=False, target_modules="all-linear")
    am = fxa.compile_with_road(model, fxa.RoadConfig(variant="road_2", group_size=8, target_modules="all-linear"))
    am.load_adapter(get_peft_model_state_dict(peft_model), adapter_name="default")
    return model, peft_model.merge_and_unload(), am.fold()


def test_folded_module_is_called_like_the_model_and_equals_peft_merged(folded_llama):
    model, merged, folded = folded_llama
    ids, mask = token_batch(3, 7, left_pad=3)
    with torch.no_grad():
        without_mask, with_mask = merged(input_ids=ids).logits, merged(input_ids=ids, attention_mask=mask).logits
        for out in (folded(input_ids=ids), folded(ids), folded(ids, None),
                    folded(input_ids=ids, attention_mask=torch.ones_like(ids))):
            torch.testing.assert_close(out.logits, without_mask, atol=ATOL, rtol=0)
        for out in (folded(ids, mask), folded(attention_mask=mask, input_ids=ids), folded(ids, mask.bool())):
            torch.testing.assert_close(out.logits, with_mask, atol=ATOL, rtol=0)
        assert (without_mask - with_mask).abs().max() > 1e-3  # the padded mask matters: the check above is not vacuous


def test_folded_module_returns_the_models_output_class(folded_llama):
    model, _, folded = folded_llama
    ids, _ = token_batch(2, 5)
    with torch.no_grad():
        out, want = folded(input_ids=ids), model(input_ids=ids, use_cache=False)  # the fold's capture: no cache
    assert type(out) is type(want) and list(out.keys()) == list(want.keys()) == ["logits"]
    assert out.logits is out["logits"] is out[0] and out.to_tuple()[0] is out.logits


def test_folded_signature_lists_the_models_inputs_with_the_mask_optional(folded_llama):
    _, _, folded = folded_llama
    parameters = inspect.signature(folded.forward).parameters
    assert list(parameters) == ["input_ids", "attention_mask"]
    assert parameters["input_ids"].default is inspect.Parameter.empty and parameters["attention_mask"].default is None


@pytest.mark.parametrize("name", ["labels", "token_type_ids", "pixel_values"])
def test_an_input_the_folded_module_does_not_take_raises_a_type_error_naming_it(folded_llama, name):
    _, _, folded = folded_llama
    ids, _ = token_batch(2, 5)
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
        folded(input_ids=ids, **{name: ids})


def test_a_symbolically_traced_module_folds_to_its_own_signature_and_returns_a_tensor(adapted):
    _, am = adapted("mlp")
    folded = am.fold("init")
    assert list(inspect.signature(folded.forward).parameters) == ["X"]
    assert type(folded(X=mlp_input())) is torch.Tensor


def test_fold_leaves_the_model_and_the_adapted_module_untouched(adapted):
    model, am = adapted("gpt2")
    before = {n: (p, p.detach().clone()) for n, p in [*model.named_parameters(), *am.named_parameters()]}
    code = am.graph_module.code
    with adapter(am, "road_4", 4, ["c_fc"]):
        folded = am.fold()
        folded.train()
    now = dict([*model.named_parameters(), *am.named_parameters()])
    assert all(now[n] is p and torch.equal(p, value) for n, (p, value) in before.items())
    assert am.graph_module.code == code and not any(m.training for m in [*model.modules(), *am.modules()])


def test_fold_replaces_only_the_targeted_weights(adapted):
    _, am = adapted("gpt2")
    with adapter(am, "road_4", 4, ["c_fc"]):
        folded = am.fold()
    get = am.graph_module.get_parameter
    new = {n for n, p in folded.named_parameters() if p.data_ptr() != get(n).data_ptr()}
    assert new == {f"transformer.h.{i}.mlp.c_fc.{p}" for i in range(2) for p in ("weight", "bias")}


def test_a_deepcopy_keeps_the_output_class_and_a_pickle_returns_a_plain_dict_of_the_same_tensors(adapted):
    """Pickling a GraphModule re-traces its code, and torch.fx turns the ModelOutput into a dict (documented); the mask
    default survives both (it is a torch op, not Python control flow)."""
    model, am = adapted("qwen2")
    folded = am.fold("init")
    ids, mask = token_batch(2, 6, left_pad=2)
    with torch.no_grad():
        expected = {"mask": folded(ids, mask).logits, "none": folded(ids).logits}
        for clone, output_type in ((copy.deepcopy(folded), type(model(input_ids=ids))),
                                   (pickle.loads(pickle.dumps(folded)), dict)):
            outs = {"mask": clone(ids, mask), "none": clone(input_ids=ids)}
            for key, out in outs.items():
                assert type(out) is output_type and list(out) == ["logits"]
                assert torch.equal(out["logits"], expected[key])


def test_fold_of_a_merged_module_is_refused(adapted):
    _, am = adapted("mlp")
    with adapter(am, "road_1", 2, ["lin0"]):
        am.merge()
        with pytest.raises(ValueError, match="unmerge"):
            am.fold()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_folded_in_fp32_and_stored_in_their_dtype(dtype):
    model = MLP().to(dtype)
    torch.manual_seed(0)
    am = fxa.compile_with_road(model, fxa.RoadConfig(variant="road_2", group_size=4, target_modules=["lin0"],
                                                     init_weights=False))
    folded = am.fold()
    params = am.adapter_parameters("default")
    rotation = _get_delta_weight("road_2", 4, params["lin0", "road_theta"].detach(),  # PEFT's dense R, fp32
                                 params["lin0", "road_alpha"].detach())
    assert rotation.dtype == torch.float32
    expected_weight = rotation @ model.lin0.weight.float()
    expected_bias = rotation @ model.lin0.bias.float()
    assert folded.lin0.weight.dtype == folded.lin0.bias.dtype == dtype
    within_rounding = dict(rtol=torch.finfo(dtype).eps / 2 * 1.01, atol=0)  # one rounding to dtype, no more
    torch.testing.assert_close(folded.lin0.weight.float(), expected_weight, **within_rounding)
    torch.testing.assert_close(folded.lin0.bias.float(), expected_bias, **within_rounding)
    assert not torch.equal(folded.lin0.weight, model.lin0.weight)


# ----------------------------------------------------------------------------------------------- unfold


@pytest.mark.parametrize("arch", ["mlp", "gpt2"])
def test_unfold_recovers_the_base_model(adapted, arch):
    model, am = adapted(arch)
    with adapter(am, "road_1", 2, ["lin0"] if arch == "mlp" else ["c_attn", "c_proj"]):
        folded = am.fold()
        base = fxa.unfold(folded, am)
    for name, value in base.named_parameters():
        torch.testing.assert_close(value, model.get_parameter(name), atol=1e-6, rtol=0)
    torch.testing.assert_close(run(arch, base), run(arch, model), atol=ATOL, rtol=0)


def test_unfold_with_another_adapter_than_folded_is_refused(adapted):
    _, am = adapted("mlp")
    with adapter(am, "road_1", 2, ["lin0"]):
        folded = am.fold("x")
        with pytest.raises(ValueError, match=r"folded with adapters \['x'\], not \['init'\]"):
            fxa.unfold(folded, am, "init")


def test_unfold_of_a_non_invertible_rotation_raises_naming_the_layer(adapted):
    _, am = adapted("mlp")
    with adapter(am, "road_4", 10, ["lin0"]):
        with torch.no_grad():
            params_of(am, "x", "lin0")[1][:] = 0.0
        folded = am.fold()
        with pytest.raises(fxa.NotInvertibleError, match="adapter 'x' on layer 'lin0'"):
            fxa.unfold(folded, am)


@given(kind=st.sampled_from(["linear", "conv1d"]), bias=st.booleans(), seed=st.integers(0, 100))
def test_unfold_weight_inverts_fold_weight(kind, bias, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 24, generator=g) * 0.1  # 16 outputs: [out, in] for a Linear
    weight = weight if kind == "linear" else weight.t().contiguous()
    b = torch.randn(16, generator=g) if bias else None
    cols = road_columns("road_1", 8, torch.randn(8, generator=g), 1 + torch.rand(8, generator=g))
    new_weight, new_bias = fxa.unfold_weight(*fxa.fold_weight(weight, b, cols, 8, kind), cols, 8, kind)
    torch.testing.assert_close(new_weight, weight, atol=1e-6, rtol=0)
    if bias:
        torch.testing.assert_close(new_bias, b, atol=1e-6, rtol=0)
