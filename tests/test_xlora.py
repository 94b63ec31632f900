"""X-LoRA API: scalings log, classifier checkpoints, training, and bad input (clear error, nothing changed)."""

from __future__ import annotations

import copy
import json
import pickle
import re

import pytest
import torch
from conftest import assert_close_relative, build_hf, token_batch
from safetensors import safe_open
from safetensors.torch import save_file
from xlora_helpers import logits, peft_classifier_state, peft_xlora, save_experts

import fx_adapters as fxa
from fx_adapters.graph.capture import capture
from fx_adapters.graph.match import layer_key
from fx_adapters.xlora.passes import EXPERTS_ATTR

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning",
                                        "ignore:fan_in_fan_out is set:UserWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = build_hf("llama")
    dirs = save_experts(model, tmp_path_factory.mktemp("experts"))
    return model, capture(model), dirs


def build(setup, **config):
    model, captured, dirs = setup
    adapters = {f"e{i}": d for i, d in enumerate(dirs)}
    return fxa.XLoraModule.from_captured(model, captured, fxa.XLoraConfig(adapters=adapters, **config))


def snapshot(xm):
    return {k: v.clone() for k, v in xm.state_dict().items()}, json.dumps(vars(xm.config), default=str)


def assert_unchanged(xm, before):
    state, config = before
    now = xm.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert json.dumps(vars(xm.config), default=str) == config


# ------------------------------------------------------------------ structure


def test_layers_are_the_experts_union_in_module_order(setup):
    xm = build(setup)
    names = [t.name.removeprefix("model.layers.") for t in xm.targets]
    assert names == ["model.embed_tokens"] + [f"{i}.{m}" for i in (0, 1) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")]
    ids, _ = token_batch(2, 5)
    xm(input_ids=ids)
    assert xm.get_latest_scalings().shape == (2, 5, len(xm.targets), 3)


def test_one_graph_holds_both_passes_and_the_classifier(setup):
    xm = build(setup)
    calls = [n.target for n in xm.graph_module.graph.nodes if n.op == "call_module"]
    assert calls.count("xlora_classifier") == 1
    for target in xm.targets:  # every adapted layer: its experts in the scaling pass and in the real pass
        key = "xlora_experts." + target.name.replace(".", "__")
        assert calls.count(key) == 2


def test_expert_math_is_one_matmul_for_all_As_and_one_for_all_Bs(setup):
    xm = build(setup)
    target = xm.targets[1]  # model.layers.0.self_attn.q_proj
    experts = xm.graph_module.xlora_experts[target.name.replace(".", "__")]
    assert experts.lora_A.shape == (3, 8, target.in_features)  # zero-padded to the largest rank (8)
    assert experts.lora_B.shape == (target.out_features, 3, 8)
    x, y, w = torch.randn(2, 3, target.in_features), torch.randn(2, 3, target.out_features), torch.rand(2, 3, 3)
    with torch.profiler.profile() as prof:
        experts(y, x, w, 1.0)
    assert sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm", "aten::addmm")) == 2


def test_classifier_reads_the_last_hidden_state_of_the_scaling_pass(setup):
    model, _, _ = setup
    xm = build(setup)
    ids, _ = token_batch(2, 6)
    logits(xm, ids)
    with torch.no_grad():  # scaling_pass_value 0: the scaling pass computes the base model
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(xm.get_latest_scalings(), xm.classifier(hidden), atol=1e-6, rtol=0)
    xm.set_scaling_pass_value(0.5)
    logits(xm, ids)
    assert not torch.allclose(xm.get_latest_scalings(), xm.classifier(hidden), atol=1e-4)


def test_compile_with_xlora_leaves_the_model_unchanged(setup):
    model, _, dirs = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={"a": dirs[0], "b": dirs[1]}))
    ids, _ = token_batch(2, 4)
    assert type(xm(input_ids=ids)) is type(model(input_ids=ids))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("examples", ["example_kwargs", "example_inputs"])
def test_compile_with_xlora_accepts_example_inputs_and_kwargs_and_equals_peft(setup, examples):
    model, _, dirs = setup
    example_ids, example_mask = token_batch(2, 6)
    given = ({"example_kwargs": {"input_ids": example_ids}} if examples == "example_kwargs"
             else {"example_inputs": (example_ids, example_mask)})  # bound positionally: input_ids, attention_mask
    config = dict(top_k_lora=2, scaling_pass_value=0.3)
    peft_model = peft_xlora(model, dirs, **config)
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={f"e{i}": d for i, d in enumerate(dirs)}, **config),
                                **given)
    xm.classifier.load_state_dict(peft_classifier_state(peft_model))
    ids, mask = token_batch(3, 7, seed=4, left_pad=2)  # another batch and length than the examples
    mask = None if examples == "example_kwargs" else mask  # the graph takes the inputs its examples had
    torch.testing.assert_close(logits(xm, ids, mask), logits(peft_model, ids, mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(xm.get_latest_scalings(), peft_model.get_latest_scalings(), atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch's pytree, pickling any TreeSpec
def test_pickle_round_trip_keeps_outputs_and_settings(setup):
    xm = build(setup, top_k_lora=2, scaling_pass_value=0.3)
    ids, _ = token_batch(2, 5)
    expected = logits(xm, ids)
    restored = pickle.loads(pickle.dumps(xm))
    assert restored.config.top_k_lora == 2
    torch.testing.assert_close(logits(restored, ids), expected, atol=0, rtol=0)
    restored.disable_adapter_layers()
    torch.testing.assert_close(logits(restored, ids), logits(setup[0], ids), atol=ATOL, rtol=0)


# ------------------------------------------------------------------ scalings log


def test_latest_scalings_are_none_before_the_first_call(setup):
    assert build(setup).get_latest_scalings() is None


def test_scalings_log_buckets_by_sequence_length(setup):
    xm = build(setup)
    xm.enable_scalings_logging()
    for seq in (4, 6, 4):
        logits(xm, token_batch(2, seq)[0])
    log = xm.get_scalings_log()
    assert [s.shape[1] for s in log] == [4, 6, 4]
    buckets = xm.get_bucketed_scalings_log()
    assert sorted(buckets) == [4, 6] and buckets[4][0] == [0, 2] and buckets[6][0] == [1]
    assert buckets[4][1][1] is log[2]
    log.clear()  # a copy
    assert len(xm.get_scalings_log()) == 3


def test_disabling_logging_keeps_the_log_and_clear_empties_it(setup):
    xm = build(setup)
    xm.enable_scalings_logging()
    logits(xm, token_batch(1, 3)[0])
    xm.disable_scalings_logging()
    logits(xm, token_batch(1, 3)[0])
    assert len(xm.get_scalings_log()) == 1
    xm.clear_scalings_log()
    assert xm.get_scalings_log() == []


def test_disabled_calls_leave_the_latest_scalings_alone(setup):
    xm = build(setup)
    ids, _ = token_batch(2, 5)
    logits(xm, ids)
    latest = xm.get_latest_scalings()
    xm.disable_adapter_layers()
    logits(xm, token_batch(3, 8)[0])
    assert xm.get_latest_scalings() is latest
    xm.enable_adapter_layers()
    logits(xm, token_batch(3, 8)[0])
    assert xm.get_latest_scalings().shape[:2] == (3, 8)


# ------------------------------------------------------------------ classifier checkpoints


def test_saved_classifier_loads_into_a_fresh_module(setup, tmp_path):
    first, second = build(setup, xlora_depth=2, xlora_size=8), build(setup, xlora_depth=2, xlora_size=8)
    ids, _ = token_batch(2, 5)
    path = first.save_classifier(tmp_path / "classifier.safetensors")
    assert not torch.allclose(logits(first, ids), logits(second, ids))
    second.load_classifier(path)
    torch.testing.assert_close(logits(second, ids), logits(first, ids), atol=0, rtol=0)


def test_peft_xlora_checkpoint_loads(setup, tmp_path):
    model, _, dirs = setup
    peft_model = peft_xlora(model, dirs, layerwise_scalings=True)
    state = {k: v for k, v in peft_model.state_dict().items() if "internal_xlora_classifier" in k}
    save_file(state, tmp_path / "adapter_model.safetensors")  # every classifier key in one file
    xm = build(setup, layerwise_scalings=True)
    xm.load_classifier(tmp_path)
    ids, mask = token_batch(2, 6, left_pad=1)
    torch.testing.assert_close(logits(xm, ids, mask), logits(peft_model, ids, mask), atol=ATOL, rtol=0)


def perturbed_peft_xlora(setup, seed=0, **config):
    """PEFT's X-LoRA model whose classifier weights are randomly perturbed (so no fresh classifier matches them)."""
    model, _, dirs = setup
    peft_model = peft_xlora(model, dirs, **config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "internal_xlora_classifier" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return peft_model


@pytest.mark.parametrize("config", [dict(), dict(xlora_depth=3, xlora_size=16, layerwise_scalings=True)],
                         ids=["depth1", "depth3-layerwise"])
@pytest.mark.parametrize("given", ["directory", "file"])
def test_peft_save_pretrained_checkpoint_loads(setup, tmp_path, config, given):
    peft_model = perturbed_peft_xlora(setup, **config)
    peft_model.save_pretrained(tmp_path)  # classifier layer 0 goes to subfolder "0" (expert "0"'s name), see below
    xm = build(setup, **config)
    ids, mask = token_batch(2, 6, left_pad=1)
    expected = logits(peft_model, ids, mask)
    assert not torch.allclose(logits(xm, ids, mask), expected, atol=1e-3)
    xm.load_classifier(tmp_path if given == "directory" else tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(logits(xm, ids, mask), expected, atol=ATOL, rtol=0)


def test_peft_save_pretrained_moves_classifier_layer_0_into_the_folder_of_expert_0(setup, tmp_path):
    """What the test above relies on, as PEFT 0.21 writes it (its key filter by adapter name drops "….layers.0.…"
    from the X-LoRA adapter's file and its adapter-name removal turns it into "….layers.weight" in expert 0's)."""
    perturbed_peft_xlora(setup).save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        assert not [k for k in f.keys() if "internal_xlora_classifier" in k]
    with safe_open(tmp_path / "0" / "adapter_model.safetensors", framework="pt") as f:
        assert {k.split("internal_xlora_classifier.")[1] for k in f.keys() if "internal_xlora_classifier" in k} == {
            "layers.weight", "layers.bias"}


def test_peft_checkpoint_without_its_expert_folders_is_refused_with_a_hint(setup, tmp_path):
    perturbed_peft_xlora(setup).save_pretrained(tmp_path, selected_adapters=["default"])  # no folder "0"
    xm = build(setup)
    before = snapshot(xm)
    with pytest.raises(ValueError, match=r"missing \['layers.0.weight', 'layers.0.bias'\].*subfolder.*save_file"):
        xm.load_classifier(tmp_path)
    assert_unchanged(xm, before)


def test_pickled_peft_checkpoint_is_refused(setup, tmp_path):
    perturbed_peft_xlora(setup).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="adapter_model.bin is a pickle, never loaded"):
        build(setup).load_classifier(tmp_path)


def test_classifier_checkpoint_of_another_shape_is_refused(setup, tmp_path):
    path = build(setup, layerwise_scalings=True).save_classifier(tmp_path / "c.safetensors")
    xm = build(setup)
    before = snapshot(xm)
    with pytest.raises(ValueError, match="does not fit this classifier.*layers.0.weight"):
        xm.load_classifier(path)
    assert_unchanged(xm, before)


def test_missing_classifier_checkpoint_is_refused(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="save_classifier"):
        build(setup).load_classifier(tmp_path / "nothing.safetensors")


# ------------------------------------------------------------------ training


def test_only_the_classifier_is_trainable(setup):
    xm = build(setup, xlora_depth=2, xlora_size=8)
    xm.train()
    xm.enable_adapter_layers()
    xm.disable_adapter_layers()
    xm.enable_adapter_layers()
    trainable = [n for n, p in xm.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("graph_module.xlora_classifier.") for n in trainable)


def test_classifier_gradients_equal_peft(setup):
    model, _, dirs = setup
    peft_model = peft_xlora(model, dirs, top_k_lora=2, scaling_pass_value=0.3)
    xm = build(setup, top_k_lora=2, scaling_pass_value=0.3)
    xm.classifier.load_state_dict(peft_classifier_state(peft_model))
    ids, mask = token_batch(2, 6, left_pad=2)
    for module in (peft_model, xm):  # eval mode: no dropout, so both compute the same function
        module(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    peft_grads = {k.split("internal_xlora_classifier.")[1]: p.grad for k, p in peft_model.named_parameters()
                  if "internal_xlora_classifier." in k}
    for name, param in xm.classifier.named_parameters():
        torch.testing.assert_close(param.grad, peft_grads[name], atol=1e-6, rtol=1e-4)


def test_training_steps_lower_the_loss_and_keep_the_experts_bit_identical(setup):
    xm = build(setup, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.1)
    frozen = {k: v.clone() for k, v in xm.state_dict().items() if "xlora_classifier" not in k}
    ids, _ = token_batch(4, 8, seed=5)
    labels = torch.randint(0, 128, ids.shape, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam([p for p in xm.parameters() if p.requires_grad], lr=1e-2)
    xm.train()
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(xm(input_ids=ids).logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    now = xm.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())


PEFT_EXPERT_PARAM = re.compile(r"^base_model\.lora_model\.model\.(.+)\.lora_(?:embedding_)?([AB])\.(\d+)(?:\.weight)?$")


@pytest.mark.parametrize("scaling_pass_value", [0.0, 0.3], ids=["scaling-pass-without-experts", "scaling-pass-0.3"])
def test_training_outputs_and_every_gradient_equal_peft_under_one_seed(setup, scaling_pass_value):
    """Trainable experts, expert dropout (e1: 0.1) and classifier dropout 0.2 in training mode: one seed draws
    PEFT's masks (its scaling pass draws some too), and no gradient flows through the scaling pass."""
    model, _, dirs = setup
    config = dict(xlora_depth=2, xlora_size=16, xlora_dropout_p=0.2, use_trainable_adapters=True,
                  scaling_pass_value=scaling_pass_value)
    peft_model = peft_xlora(model, dirs, **config).train()
    xm = build(setup, **config).train()
    xm.classifier.load_state_dict(peft_classifier_state(peft_model))
    ids, mask = token_batch(2, 6, left_pad=2)
    outputs = []
    for module in (peft_model, xm):
        torch.manual_seed(3)
        outputs.append(module(input_ids=ids, attention_mask=mask).logits)
        outputs[-1].square().mean().backward()
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)
    with torch.no_grad():  # dropout is drawn: the same seed in eval mode gives another output
        assert not torch.allclose(xm.eval()(input_ids=ids, attention_mask=mask).logits, outputs[1], atol=1e-3)
    peft_classifier = {k.split("internal_xlora_classifier.")[1]: p.grad for k, p in peft_model.named_parameters()
                       if "internal_xlora_classifier." in k}
    for name, param in xm.classifier.named_parameters():
        assert_close_relative(param.grad, peft_classifier[name])
    stacked = getattr(xm.graph_module, EXPERTS_ATTR)
    compared = 0
    for name, param in peft_model.named_parameters():
        if (match := PEFT_EXPERT_PARAM.match(name)) is None:
            continue
        path, ab, index = match.group(1), match.group(2), int(match.group(3))
        experts = stacked[layer_key(path)]  # lora_A (E, r, in), lora_B (out, E, r): expert `index`, its rank
        if ab == "A":
            assert_close_relative(experts.lora_A.grad[index, :param.shape[0]], param.grad)
        else:
            assert_close_relative(experts.lora_B.grad[:, index, :param.shape[1]], param.grad)
        compared += 1
    assert compared == 2 * (4 + 6 + 7)  # A and B of every (expert, layer) pair of EXPERT_SPECS on two layers


def test_expert_dropout_applies_only_in_training(setup):
    xm = build(setup)  # expert e1 has lora_dropout=0.1
    ids, _ = token_batch(2, 6)
    with torch.no_grad():
        evaluated = xm(input_ids=ids).logits
        xm.train()
        trained = xm(input_ids=ids).logits
        xm.eval()
        torch.testing.assert_close(xm(input_ids=ids).logits, evaluated, atol=0, rtol=0)
    assert not torch.allclose(trained, evaluated, atol=1e-4)


# ------------------------------------------------------------------ bad input


def test_no_experts_is_refused():
    with pytest.raises(ValueError, match="no experts"):
        fxa.XLoraConfig(adapters={})


def test_an_xlora_config_reads_nothing_from_disk(tmp_path):
    config = fxa.XLoraConfig(adapters={"math": tmp_path / "missing"})  # checked when a model is compiled
    assert config.adapters == {"math": tmp_path / "missing"}


def test_an_expert_that_is_neither_a_path_nor_a_pair_is_refused_by_the_config():
    with pytest.raises(TypeError, match="'math'.*PEFT LoRA adapter directory or a .*pair, got int"):
        fxa.XLoraConfig(adapters={"math": 3})


def test_missing_expert_dir_is_refused_before_the_model_is_captured(tmp_path, monkeypatch):
    import fx_adapters.xlora.model as xlora_model

    def no_capture(*args, **kwargs):
        raise AssertionError("captured before the experts were checked")

    monkeypatch.setattr(xlora_model, "capture_model", no_capture)
    with pytest.raises(FileNotFoundError, match="'math'.*not a directory"):
        fxa.compile_with_xlora(build_hf("llama"), fxa.XLoraConfig(adapters={"math": tmp_path / "missing"}))


def test_dir_without_adapter_config_is_refused(setup, tmp_path):
    model, captured, _ = setup
    with pytest.raises(FileNotFoundError, match="no adapter config"):
        fxa.XLoraModule.from_captured(model, captured, fxa.XLoraConfig(adapters={"math": tmp_path}))


def test_non_lora_adapter_is_refused(setup, tmp_path):
    model, captured, _ = setup
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ROAD", "variant": "road_1"}))
    with pytest.raises(ValueError, match="'math'.*peft_type is 'ROAD'"):
        fxa.XLoraModule.from_captured(model, captured, fxa.XLoraConfig(adapters={"math": tmp_path}))


def test_dora_expert_is_refused(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, captured, dirs = setup
    dora = LoraConfig(r=2, use_dora=True, target_modules=["q_proj"])
    get_peft_model(build_hf("llama"), dora).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'dora'.*DoRA.*not support"):
        fxa.XLoraModule.from_captured(model, captured, fxa.XLoraConfig(adapters={"ok": dirs[0], "dora": tmp_path}))


@pytest.mark.parametrize("top_k", [0, 4, 1.5])
def test_top_k_out_of_range_is_refused(setup, top_k):
    _, _, dirs = setup
    with pytest.raises(ValueError, match=r"top_k_lora must be None or an integer in \[1, 3\]"):
        fxa.XLoraConfig(adapters={str(i): d for i, d in enumerate(dirs)}, top_k_lora=top_k)


def test_softmax_topk_without_top_k_is_refused(setup):
    with pytest.raises(ValueError, match="enable_softmax_topk=True needs top_k_lora"):
        fxa.XLoraConfig(adapters={"a": setup[2][0]}, enable_softmax_topk=True)


def test_bad_set_topk_lora_is_refused_and_changes_nothing(setup):
    xm = build(setup, top_k_lora=1, enable_softmax_topk=True)
    before = snapshot(xm)
    for value in (0, 4, None):
        with pytest.raises(ValueError, match="set_topk_lora"):
            xm.set_topk_lora(value)
    assert_unchanged(xm, before)


def test_expert_of_another_model_is_refused(setup, tmp_path):
    import transformers as tf

    model, captured, dirs = setup
    other = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    save_experts(other, tmp_path, specs=[dict(r=2, target_modules=["q_proj"])])
    config = fxa.XLoraConfig(adapters={"ok": dirs[0], "small": tmp_path / "expert0"})
    with pytest.raises(ValueError, match=r"'small'.*'model.layers.0.self_attn.q_proj' is 64→64 in the model but the "
                                         r"expert's LoRA weights are 32→32"):
        fxa.XLoraModule.from_captured(model, captured, config)


def test_expert_on_a_module_that_is_no_layer_is_refused(setup):
    model, captured, dirs = setup
    state = {"base_model.model.model.norm.lora_A.weight": torch.zeros(2, 64),
             "base_model.model.model.norm.lora_B.weight": torch.zeros(64, 2)}
    config = fxa.XLoraConfig(adapters={"ok": dirs[0], "norm": ({"peft_type": "LORA", "r": 2}, state)})
    with pytest.raises(ValueError, match="'norm'.*'model.norm', a LlamaRMSNorm the graph does not call as a linear"):
        fxa.XLoraModule.from_captured(model, captured, config)


def test_expert_with_other_base_embedding_weights_is_refused(setup):
    model, captured, dirs = setup
    state = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 128),
             "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(64, 2),
             "base_model.model.model.embed_tokens.base_layer.weight": torch.zeros(128, 64)}
    config = fxa.XLoraConfig(adapters={"ok": dirs[0], "emb": ({"peft_type": "LORA", "r": 2}, state)})
    with pytest.raises(ValueError, match="'emb'.*base weights for 'model.embed_tokens'.*not the model's"):
        fxa.XLoraModule.from_captured(model, captured, config)


def model_state(model):
    return {n: (t.detach().clone(), t.requires_grad) for n, t in model.state_dict(keep_vars=True).items()}


def model_hooks(model):
    """Every module's forward (pre-)hooks. Not assumed empty: transformers installs its own output-capturing hooks
    the first time a model is called with output_hidden_states=True, as a test above does."""
    return {n: (list(m._forward_hooks.values()), list(m._forward_pre_hooks.values())) for n, m in model.named_modules()}


def lora_config_with_road_weights(model, directory):
    """A directory whose adapter_config.json is a LoRA one but whose weights are a RoAd adapter's (no lora_A/B)."""
    from peft import LoraConfig, RoadConfig, get_peft_model

    get_peft_model(copy.deepcopy(model), RoadConfig(group_size=8, target_modules=["q_proj"])).save_pretrained(directory)
    (directory / "adapter_config.json").write_text(json.dumps(LoraConfig(r=2, target_modules=["q_proj"]).to_dict(),
                                                              default=str))
    return directory


def expert_of_a_smaller_model(_model, directory):
    import transformers as tf

    other = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    return save_experts(other, directory, specs=[dict(r=2, target_modules=["q_proj"])])[0]


@pytest.mark.parametrize("bad_expert,message", [
    (lora_config_with_road_weights, r"'bad'.*unexpected key .*road_.*expected PEFT's saved LoRA keys"),
    (expert_of_a_smaller_model, "64→64 in the model but the expert's LoRA weights are 32→32"),
], ids=["weights-not-lora", "other-in-out-features"])
def test_failed_compile_with_xlora_leaves_the_callers_model_untouched(setup, tmp_path, bad_expert, message):
    model, _, dirs = setup
    before, hooks, config = model_state(model), model_hooks(model), model.config.to_dict()
    xcfg = fxa.XLoraConfig(adapters={"ok": dirs[0], "bad": bad_expert(model, tmp_path)})  # the config alone passes
    with pytest.raises(ValueError, match=message):
        fxa.compile_with_xlora(model, xcfg)  # fails after capturing the model
    after = model_state(model)
    assert after.keys() == before.keys()
    for name, (tensor, requires_grad) in before.items():
        assert torch.equal(after[name][0], tensor) and after[name][1] == requires_grad, name
    assert model_hooks(model) == hooks
    assert model.config.to_dict() == config


def test_wrong_hidden_size_is_refused(setup):
    model, captured, dirs = setup
    with pytest.raises(ValueError, match="hidden_size=4096 but .*'lm_head', which has 64 features"):
        fxa.XLoraModule.from_captured(model, captured, fxa.XLoraConfig(adapters={"a": dirs[0]}, hidden_size=4096))


def test_expert_dir_without_a_weights_file_names_the_dir_and_the_file_to_add(setup, tmp_path):
    model, captured, dirs = setup
    (tmp_path / "adapter_config.json").write_text((dirs[0] / "adapter_config.json").read_text())
    config = fxa.XLoraConfig(adapters={"ok": dirs[0], "empty": tmp_path})  # the config alone passes
    with pytest.raises(FileNotFoundError) as raised:
        fxa.XLoraModule.from_captured(model, captured, config)
    message = str(raised.value)
    assert message.startswith(f"X-LoRA expert 'empty' ({tmp_path}): {tmp_path / 'adapter_model.safetensors'}: missing")
    assert f"{tmp_path} has no adapter weights file" in message and "save_pretrained" in message
    assert "pickle" not in message  # the .bin hint is for a directory that has adapter_model.bin


def test_pickled_expert_weights_are_refused(setup, tmp_path):
    _, _, dirs = setup
    (tmp_path / "adapter_config.json").write_text((dirs[0] / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    model, captured, _ = setup
    with pytest.raises(FileNotFoundError, match="pickle.*safe_serialization=True"):
        fxa.XLoraModule.from_captured(model, captured, fxa.XLoraConfig(adapters={"a": tmp_path}))
