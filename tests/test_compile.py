"""compile_with_road's contract: the caller's model is untouched, PEFT's MLP matches, bad input is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import MLP, build_hf, mlp_input, peft_road, token_batch
from hypothesis import given
from hypothesis import strategies as st

import fx_adapters as fxa


def state_of(model):
    return {n: (t.detach().clone(), t.requires_grad) for n, t in model.state_dict(keep_vars=True).items()}


@pytest.fixture(scope="module")
def llama():
    model = build_hf("llama")
    before = state_of(model)
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules="all-linear", init_weights=False))
    return model, before, am.eval()


def test_compile_leaves_the_callers_model_untouched(llama):
    model, before, am = llama
    with torch.no_grad():
        am(input_ids=token_batch(2, 4)[0])
    after = state_of(model)
    assert after.keys() == before.keys()
    for name, (tensor, requires_grad) in before.items():
        assert torch.equal(after[name][0], tensor) and after[name][1] == requires_grad, name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not set(map(id, model.parameters())) & set(map(id, am.parameters()))


def test_base_weights_are_frozen_in_the_compiled_module(llama):
    _, _, am = llama
    frozen = [n for n, p in am.named_parameters() if ".road_" not in n]
    assert frozen and not any(dict(am.named_parameters())[n].requires_grad for n in frozen)


@given(st.integers(1, 5), st.integers(1, 12))
def test_one_compile_serves_any_batch_and_sequence_length(llama, batch, seq):
    model, _, am = llama
    ids, _ = token_batch(batch, seq, seed=batch * 13 + seq)
    with torch.no_grad(), am.disable_adapters():
        torch.testing.assert_close(am(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant,group_size", [("road_1", 2), ("road_2", 4), ("road_4", 2)])
def test_peft_test_mlp_matches_peft(bias, variant, group_size, tmp_path):
    model = MLP(bias=bias).eval()
    torch.manual_seed(7)
    peft_model = peft_road(model, variant=variant, group_size=group_size, init_weights=False,
                           target_modules=["lin0"])
    peft_model.save_pretrained(tmp_path)
    am = fxa.compile_with_road(model, fxa.RoadConfig.from_pretrained(tmp_path)).eval()
    am.load_adapter(tmp_path)
    x = mlp_input()
    with torch.no_grad():
        torch.testing.assert_close(am(x), peft_model(x), atol=1e-5, rtol=0)
        names = ["default", "__base__"] * 4 + ["default"]
        torch.testing.assert_close(am(x, adapter_names=names), peft_model(x, adapter_names=names), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_keeps_fp32_adapters_and_half_outputs_equal_to_peft(tmp_path, dtype):
    model = build_hf("llama", dtype=dtype)
    torch.manual_seed(2)
    peft_model = peft_road(model, group_size=8, init_weights=False, target_modules=["q_proj", "o_proj"])
    peft_model.save_pretrained(tmp_path)
    am = fxa.compile_with_road(model, fxa.RoadConfig.from_pretrained(tmp_path)).eval()
    am.load_adapter(tmp_path)
    assert {p.dtype for n, p in am.named_parameters() if ".road_" in n} == {torch.float32}
    ids, _ = token_batch(2, 5)
    with torch.no_grad():
        ours, theirs = am(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert ours.dtype == dtype
    assert {p.dtype for n, p in peft_model.named_parameters() if "road_" in n} == {torch.float32}
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


# ---------------------------------------------------------------- bad input: clear errors, nothing changed

@pytest.fixture()
def mlp_am():
    return fxa.compile_with_road(MLP().eval(), fxa.RoadConfig(group_size=2, target_modules=["lin0", "lin1"]))


def test_group_size_not_dividing_a_layer_names_it_and_adds_nothing(mlp_am):
    code = mlp_am.graph_module.code
    with pytest.raises(ValueError, match=r"group_size=4 does not divide.*'lin1' \(out_features=2\)"):
        mlp_am.add_adapter("g4", fxa.RoadConfig(group_size=4, target_modules=["lin0", "lin1"]))
    assert list(mlp_am.adapters) == ["default"] and mlp_am.graph_module.code == code


@pytest.mark.parametrize("kwargs,message", [
    (dict(group_size=3), "group_size must be a positive even integer"),
    (dict(group_size=0), "group_size must be a positive even integer"),
    (dict(variant="road_3"), "unknown variant 'road_3'"),
    (dict(target_modules="(unclosed"), "not a valid regular expression"),
    (dict(target_modules=[1, 2]), "target_modules must be"),
])
def test_invalid_config_is_refused_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fxa.RoadConfig(**kwargs)


def test_unknown_adapter_in_set_adapter_lists_known_ones(mlp_am):
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'; known adapters: \['default'\]"):
        mlp_am.set_adapter("nope")
    assert mlp_am.active_adapter == "default"


def test_unknown_adapter_in_adapter_names_is_refused(mlp_am):
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        mlp_am(mlp_input()[:2], adapter_names=["default", "nope"])


def test_adapter_names_length_must_equal_batch(mlp_am):
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 9 samples"):
        mlp_am(mlp_input(), adapter_names=["default"] * 3)


def test_duplicate_adapter_name_is_refused(mlp_am):
    with pytest.raises(ValueError, match="already exists"):
        mlp_am.add_adapter("default", fxa.RoadConfig(group_size=2, target_modules=["lin0"]))


def test_uncapturable_model_says_why_and_what_to_try():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # Python control flow on values: neither traceable nor exportable
                return self.lin(x)
            return x

    with pytest.raises(fxa.CaptureError, match="DataDependent"):
        fxa.compile_with_road(DataDependent(), fxa.RoadConfig(group_size=2, target_modules=["lin"]))


def test_non_config_is_refused():
    with pytest.raises(TypeError, match="RoadConfig"):
        fxa.compile_with_road(MLP(), {"group_size": 2})
