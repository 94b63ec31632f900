"""Serving code runs inside ``torch.inference_mode()``: compiling, adding / loading / deleting / merging adapters,
calls and ``generate`` work there and equal PEFT, and the same module trains afterwards with PEFT's gradients
(what it created inside the mode are normal tensors, not inference tensors)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_hf, peft_road, token_batch
from xlora_helpers import peft_classifier_state, peft_xlora, save_experts

import fx_adapters as fxa

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance(treespec, LeafSpec)`:FutureWarning")


def test_road_built_and_served_inside_inference_mode_equals_peft_and_trains_afterwards(tmp_path):
    model = build_hf("llama")
    torch.manual_seed(0)
    peft_model = peft_road(model, group_size=8, init_weights=False, target_modules=["q_proj", "v_proj"])
    peft_model.save_pretrained(tmp_path)
    ids, mask = token_batch(2, 6, left_pad=1)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        expected_tokens = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules=["q_proj"]), adapter_name="x")
        am.load_adapter(tmp_path, adapter_name="default")
        am.set_adapter("default")
        am.delete_adapter("x")
        torch.testing.assert_close(am(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
        mixed = am(input_ids=ids, attention_mask=mask, adapter_names=["default", "__base__"]).logits
        torch.testing.assert_close(mixed[0], expected[0], atol=1e-5, rtol=0)
        assert torch.equal(am.generate(ids, attention_mask=mask, max_new_tokens=4), expected_tokens)
        am.merge()
        torch.testing.assert_close(am(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=0)
        am.unmerge()

    am.train(), peft_model.train()
    am(input_ids=ids, labels=ids).loss.backward()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    ours = am.adapter_parameters("default")
    assert ours
    for (path, name), parameter in ours.items():
        theirs = getattr(peft_model.base_model.model.get_submodule(path), name)["default"].grad
        torch.testing.assert_close(parameter.grad, theirs, atol=1e-6, rtol=1e-4)


def test_xlora_built_and_served_inside_inference_mode_equals_peft_and_its_classifier_trains_afterwards(tmp_path):
    model = build_hf("llama")
    dirs = save_experts(model, tmp_path)
    peft_model = peft_xlora(model, dirs, xlora_depth=2, xlora_size=32)
    ids, mask = token_batch(2, 6, left_pad=1)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    with torch.inference_mode():
        xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={f"e{i}": d for i, d in enumerate(dirs)},
                                                           xlora_depth=2, xlora_size=32))
        xm.classifier.load_state_dict(peft_classifier_state(peft_model))
        torch.testing.assert_close(xm(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
        assert xm.generate(ids, attention_mask=mask, max_new_tokens=2).shape == (2, 8)

    xm.train()
    logits = xm(input_ids=ids, attention_mask=mask).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    grads = [p.grad for p in xm.classifier.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
