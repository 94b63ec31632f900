"""``am.compile()`` / ``xm.compile()``: the emitted graph through ``torch.compile`` (inductor, on CPU) still computes
what PEFT computes, follows adapter changes and graph rewrites, and trains with PEFT's gradients."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import MLP, build_hf, mlp_input, token_batch
from test_composition import both, close
from xlora_helpers import peft_classifier_state, peft_xlora, save_experts

import fx_adapters as fxa

ADAPTERS = {"a": dict(target_modules=["lin0"], group_size=2),
            "b": dict(target_modules=["lin0", "lin1"], group_size=2, variant="road_4")}


@pytest.fixture(scope="module")
def compiled_mlp(tmp_path_factory):
    """PEFT's MLP with adapters a and b, and ours loaded from PEFT's checkpoint, then ``compile()``d (inductor)."""
    peft_model, am = both(MLP(), ADAPTERS, tmp_path_factory.mktemp("road"))
    am.compile()
    return peft_model, am


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_compiled_adapter_equals_peft(compiled_mlp, adapter):
    peft_model, am = compiled_mlp
    peft_model.set_adapter(adapter)
    am.set_adapter(adapter)
    with torch.no_grad():
        close(am(mlp_input()), peft_model(mlp_input()))


def test_compiled_mixed_batch_equals_peft(compiled_mlp):
    peft_model, am = compiled_mlp
    names = ["a", "b", "__base__"] * 3
    with torch.no_grad():
        close(am(mlp_input(), adapter_names=names), peft_model(mlp_input(), adapter_names=names))


def test_compiled_graph_follows_a_rewrite_for_new_targets(tmp_path):
    peft_model, am = both(MLP(), {"a": ADAPTERS["a"], "b": ADAPTERS["b"]}, tmp_path)
    am.delete_adapter("b")  # lin1 leaves the graph
    am.compile()
    x = mlp_input()
    with torch.no_grad():
        am(x)  # compiled without lin1's rotation
        am.load_adapter(tmp_path / "b", adapter_name="b")  # rotates lin1 again: a new graph
        am.set_adapter("b")
        peft_model.set_adapter("b")
        close(am(x), peft_model(x))


def test_compiled_training_gradients_equal_peft(tmp_path):
    model = MLP()
    model.drop.p = 0.0  # dropout draws differ between the two sides
    peft_model, am = both(model, {"a": ADAPTERS["b"]}, tmp_path)
    am.compile()
    grads = []
    for module in (peft_model.train(), am.train()):
        module(mlp_input()).sum().backward()
        grads.append({re.search(r"(lin\d).*(road_theta|road_alpha)", n).groups(): p.grad
                      for n, p in module.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5)


def test_copies_keep_the_compile_options_not_the_compiled_code(compiled_mlp):
    _, am = compiled_mlp
    am.set_adapter("a")
    with torch.no_grad():
        expected = am(mlp_input())
        copied = copy.deepcopy(am)
        assert copied.compile_options == am.compile_options == {}
        close(copied(mlp_input()), expected)


def test_compiled_xlora_equals_peft(tmp_path):
    model = build_hf("llama")
    dirs = save_experts(model, tmp_path)
    peft_model = peft_xlora(model, dirs)
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={f"e{i}": d for i, d in enumerate(dirs)}))
    xm.classifier.load_state_dict(peft_classifier_state(peft_model))
    xm.eval().compile()
    ids, mask = token_batch(2, 6)
    with torch.no_grad():
        got = xm(input_ids=ids, attention_mask=mask).logits
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(xm.get_latest_scalings(), peft_model.get_latest_scalings(), atol=1e-5, rtol=0)
