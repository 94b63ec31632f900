"""bitsandbytes 8-bit / 4-bit base models: capture, RoAd vs PEFT, mixed batches, merge / fold into quantized weights."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from conftest import assert_close_relative, build_hf, peft_road, token_batch
from peft import get_peft_model_state_dict
from peft.tuners.road.layer import _apply_road, _get_delta_weight
from torch import nn

import fx_adapters as fxa

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

pytestmark = [
    pytest.mark.filterwarnings("ignore:requantizing .* bitsandbytes layer:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*may get different generations due to rounding errors:UserWarning"),
]

QUANTIZATION = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-nested": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                       bnb_4bit_use_double_quant=True),  # absmax quantized too: a nested quant state
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
}
KINDS = [kind for kind in QUANTIZATION if kind != "nf4-bf16"]  # bf16 compute: one test of its own
VARIANT = {"int8": "road_1", "nf4": "road_2", "fp4": "road_4", "nf4-nested": "road_1", "nf4-bf16": "road_2"}
QUANTIZED_LAYERS = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """``load(kind)``: a tiny random Llama saved once, loaded quantized."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    checkpoint = tmp_path_factory.mktemp("tiny_llama")
    build_hf("llama").save_pretrained(checkpoint)
    return lambda kind: AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=BitsAndBytesConfig(**QUANTIZATION[kind]), device_map="cpu")


@pytest.fixture(scope="module")
def quantized(load):
    """``quantized(kind) -> (model, am)``: the quantized model loaded and captured once per kind.

    The model never runs: a 4-bit layer's first eval forward repacks it for the CPU kernel, and
    ``state_dict()`` of a repacked layer (``get_peft_model_state_dict`` of a copy) corrupts it (bitsandbytes
    0.50 restores its absmax transposed when ``in_features > blocksize``).
    """
    cache = {}

    def get(kind):
        if kind not in cache:
            model = load(kind)
            init = fxa.RoadConfig(group_size=8, target_modules=["q_proj"])
            cache[kind] = model, fxa.compile_with_road(model, init, adapter_name="init").eval()
        return cache[kind]

    return get


def logits(module, adapter_names=None, rows=slice(None)) -> torch.Tensor:
    ids, mask = token_batch(3, 7, left_pad=2)
    kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
    with torch.no_grad():
        return module(input_ids=ids[rows], attention_mask=mask[rows], **kwargs)["logits"]


@contextlib.contextmanager
def from_peft(quantized, kind, seed=0):
    """PEFT's RoAd (random) on a copy of the quantized model, and the same adapter in ours as active ``"peft"``.

    On exit ours is unmerged and the adapter deleted.
    """
    model, am = quantized(kind)
    torch.manual_seed(seed)
    options = dict(variant=VARIANT[kind], group_size=8, target_modules="all-linear")
    peft_model = peft_road(model, init_weights=False, **options)
    am.load_adapter(get_peft_model_state_dict(peft_model), adapter_name="peft", config=fxa.RoadConfig(**options))
    am.set_adapter("peft")
    try:
        yield peft_model, am
    finally:
        if am.merged:
            am.unmerge()
        am.delete_adapter("peft")
        am.set_adapter("init")


def quantized_layers(gm: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, QUANTIZED_LAYERS)}


@contextlib.contextmanager
def original_layers(am):
    """Put the quantized layer objects back on exit (after an inverse-based unmerge, for the tests that follow)."""
    layers = quantized_layers(am.graph_module)
    try:
        yield layers
    finally:
        for name, layer in layers.items():
            am.graph_module.set_submodule(name, layer)


def storage(layer: nn.Module) -> dict[str, torch.Tensor | None]:
    """Clones of every tensor a quantized layer computes with: packed weight, int8 statistics, quant state, bias."""
    tensors = {"weight": layer.weight.data, "bias": layer.bias}
    if isinstance(layer, bnb.nn.Linear8bitLt):
        tensors |= {"weight.SCB": layer.weight.SCB, "state.CB": layer.state.CB, "state.SCB": layer.state.SCB}
    else:
        states = {"quant_state": layer.weight.quant_state}
        states["quant_state.state2"] = getattr(states["quant_state"], "state2", None)  # when nested
        for prefix, state in states.items():
            tensors |= {f"{prefix}.{k}": v for k, v in (vars(state) if state else {}).items()
                        if isinstance(v, torch.Tensor)}
    return {k: None if v is None else v.detach().clone() for k, v in tensors.items()}


def assert_same_storage(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for layer, tensors in before.items():
        assert tensors.keys() == after[layer].keys(), layer
        for key, value in tensors.items():
            other = after[layer][key]
            same = value is other is None or (value is not None and other is not None and value.dtype == other.dtype
                                              and torch.equal(value, other))
            assert same, f"{layer}.{key} changed"


# ---------------------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("kind", KINDS)
def test_capture_keeps_every_quantized_layer_as_a_call_module(quantized, kind):
    model, am = quantized(kind)
    calls = {n.target: am.graph_module.get_submodule(n.target) for n in am.graph_module.graph.find_nodes(
        op="call_module")}
    expected = quantized_layers(model)
    assert {name: type(m) for name, m in calls.items()} == {name: type(m) for name, m in expected.items()}
    assert all(calls[name] is not layer for name, layer in expected.items())  # the capture's own copies
    assert {t.kind for t in am.linear_layers if t.name in expected} == {"bnb8" if kind == "int8" else "bnb4"}
    with am.disable_adapters():
        assert torch.equal(logits(am), logits(copy.deepcopy(model)))  # see `quantized`: the model itself never runs


# ------------------------------------------------------------------------------------------------- RoAd


@pytest.mark.parametrize("kind", KINDS)
def test_unmerged_logits_equal_peft(quantized, kind):
    with from_peft(quantized, kind) as (peft_model, am):
        torch.testing.assert_close(logits(am), logits(peft_model), atol=1e-4, rtol=0)


def test_unmerged_logits_equal_peft_with_bf16_compute(quantized):
    """Both run the same bitsandbytes layers (bf16 matmuls) and RoAd in fp32: they differ only by fp32 rounding
    (1.8e-7 measured, logits ~0.7, adapter effect ~0.5), unless it flips a bf16 rounding of a next layer's input
    (one bf16 ulp, ~4e-3 relative: a looser bound would hide wrong math). So the fp32 bar, 1e-4."""
    with from_peft(quantized, "nf4-bf16") as (peft_model, am):
        assert {m.compute_dtype for m in quantized_layers(am.graph_module).values()} == {torch.bfloat16}
        torch.testing.assert_close(logits(am), logits(peft_model), atol=1e-4, rtol=0)


def test_rotation_computes_in_fp32_and_returns_the_layer_output_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4")).to("cpu")
    config = fxa.RoadConfig(variant="road_2", group_size=8, target_modules=["0"], init_weights=False)
    am = fxa.compile_with_road(model.eval(), config).eval()
    params = am.adapter_parameters("default")
    theta, alpha = params["0", "road_theta"], params["0", "road_alpha"]
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = am(x)
        expected = _apply_road("road_2", 8, theta, alpha, model(x).float()).to(torch.bfloat16)
    assert theta.dtype == alpha.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0, rtol=2**-8)  # one bf16 rounding


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_equals_each_sample_alone(quantized, kind):
    names = ["peft", "__base__", "other"]
    with from_peft(quantized, kind) as (_, am):
        torch.manual_seed(1)
        other = fxa.RoadConfig(group_size=4, target_modules=["v_proj", "down_proj"], init_weights=False)
        am.add_adapter("other", other)
        try:
            alone = torch.cat([logits(am, [name], rows=slice(i, i + 1)) for i, name in enumerate(names)])
            torch.testing.assert_close(logits(am, names), alone, atol=1e-5, rtol=0)
        finally:
            am.delete_adapter("other")


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_training_gradients_equal_peft(load, kind):
    """On fresh models: once a 4-bit layer ran in eval it uses a CPU kernel that bitsandbytes cannot backprop."""
    model, options = load(kind), dict(variant="road_1", group_size=8, target_modules="all-linear")
    torch.manual_seed(0)
    peft_model = peft_road(model, init_weights=False, **options).train()
    am = fxa.compile_with_road(model, fxa.RoadConfig(**options)).train()
    am.load_adapter(get_peft_model_state_dict(peft_model))
    ids, mask = token_batch(3, 7, left_pad=2)
    for module in (am, peft_model):
        module(input_ids=ids, attention_mask=mask)["logits"].square().mean().backward()
    for target in am.targets:
        for param in ("road_theta", "road_alpha"):
            ours = am.adapter_parameters("default")[target.name, param].grad
            theirs = getattr(peft_model.base_model.model.get_submodule(target.name), param)["default"].grad
            assert_close_relative(ours, theirs)


# ------------------------------------------------------------------------------------------------ merge


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The weight a quantized layer computes with; valid only before the layer first runs (a 4-bit layer may be
    repacked for the CPU kernel then, see ``quantized``)."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()


@pytest.mark.parametrize("kind", KINDS)
def test_merge_error_is_within_peft_merge_error(quantized, kind):
    with from_peft(quantized, kind) as (peft_model, am):
        ours, theirs = logits(am), logits(peft_model)
        am.merge()
        peft_model.merge_adapter()
        ours_error, peft_error = (logits(am) - ours).abs().max(), (logits(peft_model) - theirs).abs().max()
    assert ours_error <= peft_error * 1.01 + 1e-6, f"merge error: ours {ours_error:.3g}, PEFT {peft_error:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_merge_moves_the_quantized_weights_as_peft_merge(load, kind):
    """The bound above also holds for a merge that does nothing: the weights must move as PEFT's do. On a fresh
    model that never runs, so every quantized weight can be read back."""
    model, options = load(kind), dict(variant=VARIANT[kind], group_size=8, target_modules="all-linear")
    torch.manual_seed(0)
    peft_model = peft_road(model, init_weights=False, **options)
    am = fxa.compile_with_road(model, fxa.RoadConfig(**options))
    am.load_adapter(get_peft_model_state_dict(peft_model))
    peft_layers = {t.name: peft_model.base_model.model.get_submodule(t.name).base_layer for t in am.targets}
    before = {name: dequantized(layer) for name, layer in peft_layers.items()}
    am.merge()
    peft_model.merge_adapter()
    for name, layer in peft_layers.items():
        theirs_moved = dequantized(layer) - before[name]
        ours_moved = dequantized(am.graph_module.get_submodule(name)) - before[name]
        assert theirs_moved.norm() > 0.1 * before[name].norm(), name  # the random adapter moves every weight
        assert (ours_moved - theirs_moved).norm() <= 0.05 * theirs_moved.norm(), name  # up to requantization


@pytest.mark.parametrize("kind", KINDS)
def test_merged_layers_are_requantized_with_their_own_settings(quantized, kind):
    with from_peft(quantized, kind) as (_, am):
        before = quantized_layers(am.graph_module)
        am.merge()
        for name, layer in quantized_layers(am.graph_module).items():
            old = before[name]
            assert layer is not old and type(layer.weight) is type(old.weight), name
            if kind == "int8":
                assert layer.weight.dtype == torch.int8 and layer.state.threshold == old.state.threshold == 6.0
                assert layer.state.has_fp16_weights is old.state.has_fp16_weights is False
            else:
                settings = ("quant_type", "blocksize", "compress_statistics", "quant_storage")
                assert [getattr(layer.weight, s) for s in settings] == [getattr(old.weight, s) for s in settings]
                assert layer.compute_dtype == old.compute_dtype == torch.float32
                assert old.weight.compress_statistics is (kind == "nf4-nested")
                assert layer.weight.quant_state.nested is old.weight.compress_statistics  # absmax quantized again


@pytest.mark.parametrize("has_fp16_weights", [False, True])
def test_merge_rotates_the_bias_of_quantized_layers(has_fp16_weights):
    torch.manual_seed(0)
    model = nn.Sequential(bnb.nn.Linear8bitLt(16, 64, has_fp16_weights=has_fp16_weights), nn.ReLU(),
                          bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="fp4")).to("cpu").eval()
    config = fxa.RoadConfig(variant="road_4", group_size=8, target_modules=["0", "2"], init_weights=False)
    am = fxa.compile_with_road(model, config)
    am.merge()
    for name in ("0", "2"):
        params = am.adapter_parameters("default")
        rotation = _get_delta_weight("road_4", 8, params[name, "road_theta"].detach(),
                                     params[name, "road_alpha"].detach())
        torch.testing.assert_close(am.graph_module.get_submodule(name).bias, rotation @ model.get_submodule(name).bias,
                                   atol=1e-6, rtol=0)


def two_quantized_layers():
    """A new module (so it never warned) of an 8-bit and a 4-bit layer, both with a random RoAd adapter."""
    torch.manual_seed(0)
    model = nn.Sequential(bnb.nn.Linear8bitLt(16, 64, has_fp16_weights=False), nn.ReLU(),
                          bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")).to("cpu").eval()
    config = fxa.RoadConfig(variant="road_1", group_size=8, target_modules=["0", "2"], init_weights=False)
    return fxa.compile_with_road(model, config)


@contextlib.contextmanager
def requantization_warnings():
    """The messages of the requantization warnings raised inside, whatever the warning filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages = []
        yield messages
    messages += [str(w.message) for w in caught if "requantizing" in str(w.message)]


def test_first_merge_warns_that_requantization_rounds():
    am = two_quantized_layers()
    with requantization_warnings() as messages:
        am.merge()
        am.unmerge()  # exact: nothing is requantized
    assert len(messages) == 1 and "requantizing 2 bitsandbytes layer(s) (0, 2)" in messages[0]
    assert "rounds the rotated weights" in messages[0]


def test_second_merge_does_not_warn_again():
    am = two_quantized_layers()
    am.merge()
    am.unmerge()
    with requantization_warnings() as messages:
        am.merge()
        am.unmerge(exact=False)  # requantizes again
        fxa.unfold(am.fold(), am, exact=False)
    assert messages == []


def test_each_adapted_module_warns_once():
    first, second = two_quantized_layers(), two_quantized_layers()
    with requantization_warnings() as messages:
        first.fold()
        first.merge()
        second.merge()
    assert len(messages) == 2


def test_safe_merge_of_a_nan_adapter_raises_naming_the_layer_and_keeps_every_layer(quantized):
    with from_peft(quantized, "nf4") as (_, am):
        with torch.no_grad():
            am.adapter_parameters("peft")["model.layers.1.mlp.up_proj", "road_theta"][3] = float("nan")
        before = quantized_layers(am.graph_module)
        with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj'.*nothing was merged"):
            am.merge(safe_merge=True)
        assert quantized_layers(am.graph_module) == before and not am.merged


# ---------------------------------------------------------------------------------------------- unmerge


@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_restores_every_quantized_byte(quantized, kind):
    with from_peft(quantized, kind) as (_, am):
        logits(am)  # a first forward (4-bit layers repack their weights for the CPU kernel)
        before = {name: storage(layer) for name, layer in quantized_layers(am.graph_module).items()}
        am.merge()
        logits(am)
        am.unmerge()
        assert_same_storage(before, {name: storage(m) for name, m in quantized_layers(am.graph_module).items()})


def test_unmerge_restores_the_nested_quant_state(load):
    """On a model that never ran: a first eval forward on a CPU with AVX512-BF16 repacks 4-bit layers, which
    un-nests their quant state (bitsandbytes 0.50), so the test above may snapshot it un-nested."""
    config = fxa.RoadConfig(variant="road_2", group_size=8, target_modules="all-linear", init_weights=False)
    torch.manual_seed(0)
    am = fxa.compile_with_road(load("nf4-nested"), config).eval()
    before = {name: storage(layer) for name, layer in quantized_layers(am.graph_module).items()}
    assert before and all({"quant_state.offset", "quant_state.state2.absmax", "quant_state.state2.code"} <= set(t)
                          for t in before.values())
    am.merge()
    logits(am)
    am.unmerge()
    assert_same_storage(before, {name: storage(m) for name, m in quantized_layers(am.graph_module).items()})


def test_nf4_merge_then_unmerge_does_not_drift(quantized):
    with from_peft(quantized, "nf4") as (_, am):
        expected = logits(am)
        am.merge()
        am.unmerge()
        assert torch.equal(logits(am), expected)


def test_unmerge_after_two_merges_restores_the_original_layers(quantized):
    with from_peft(quantized, "int8") as (_, am):
        before = quantized_layers(am.graph_module)
        am.merge(["peft"])
        with pytest.warns(UserWarning, match="Already merged"):
            am.merge(["init"])
        am.unmerge()
        assert quantized_layers(am.graph_module) == before


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_unmerge_drifts_no_more_than_peft(quantized, kind):
    with from_peft(quantized, kind) as (peft_model, am), original_layers(am) as before:
        with am.disable_adapters():
            ours = logits(am)
        with peft_model.disable_adapter():
            theirs = logits(peft_model)
        am.merge()
        am.unmerge(exact=False)
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
        assert all(layer is not before[name] for name, layer in quantized_layers(am.graph_module).items())
        with am.disable_adapters():
            ours_drift = (logits(am) - ours).abs().max()
        with peft_model.disable_adapter():
            peft_drift = (logits(peft_model) - theirs).abs().max()
    assert ours_drift <= peft_drift * 1.01 + 1e-6, f"unmerge drift: ours {ours_drift:.3g}, PEFT {peft_drift:.3g}"


# ---------------------------------------------------------------------------------------- fold / unfold


@pytest.mark.parametrize("kind", ["int8", "fp4", "nf4-nested"])
def test_folded_module_computes_the_merged_model(quantized, kind):
    with from_peft(quantized, kind) as (_, am):
        folded = am.fold()
        am.merge()
        assert torch.equal(logits(folded), logits(am))


def test_folded_layers_keep_double_quantization(quantized):
    with from_peft(quantized, "nf4-nested") as (_, am):
        layers = quantized_layers(am.fold())
    assert layers and all(m.weight.compress_statistics and m.weight.quant_state.nested for m in layers.values())


def test_unfold_gives_back_the_quantized_weights_of_the_adapted_module(quantized):
    with from_peft(quantized, "fp4") as (_, am):
        base = fxa.unfold(am.fold(), am)
        ours = quantized_layers(am.graph_module)
        assert all(layer.weight is ours[name].weight for name, layer in quantized_layers(base).items())
        with am.disable_adapters():
            assert torch.equal(logits(base), logits(am))


def test_inverse_unfold_equals_inverse_unmerge(quantized):
    with from_peft(quantized, "nf4") as (_, am), original_layers(am) as originals:
        base = fxa.unfold(am.fold(), am, exact=False)
        assert not set(quantized_layers(base).values()) & set(originals.values())
        am.merge()
        am.unmerge(exact=False)
        with am.disable_adapters():
            expected = logits(am)
    assert torch.equal(logits(base), expected)


@pytest.mark.parametrize("how", ["module", "folded", "mixed_batch"])
def test_export_of_a_quantized_model_raises_what_to_do_instead(quantized, how, tmp_path):
    _, am = quantized("nf4")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is a bitsandbytes Linear4bit.*"
                                         r"load the model without quantization_config"):
        fxa.export(am.fold() if how == "folded" else am, tmp_path / "model.pt2", mixed_batch=how == "mixed_batch")
