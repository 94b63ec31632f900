"""Every input the model takes: each call signature is captured on first use, shares the adapters, and equals PEFT."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
import transformers as tf
from conftest import (
    DEVICE,
    VOCAB,
    assert_each_signature_is_captured_once_and_listed,
    build_hf,
    peft_road,
    token_batch,
    trainer_losses,
)

import fx_adapters as fxa

CONFIG = dict(group_size=16, init_weights=False)


def _compiled_and_peft(model, targets):
    am = fxa.compile_with_road(model, fxa.RoadConfig(target_modules=targets, **CONFIG))
    peft_model = peft_road(model, target_modules=targets, **CONFIG)
    with torch.no_grad():
        for (path, name), p in am.adapter_parameters("default").items():
            getattr(peft_model.base_model.model.get_submodule(path), name)["default"].copy_(p)
    return am, peft_model


@pytest.fixture(scope="module")
def llama():
    return _compiled_and_peft(build_hf("llama"), ["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def opt():  # dropout 0.1 in its config
    return _compiled_and_peft(build_hf("opt"), ["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = tf.BertForMaskedLM(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=128, vocab_size=VOCAB)).to(DEVICE).eval()
    return _compiled_and_peft(model, ["query", "value"])


def test_forward_shows_the_model_signature_and_adapter_names(llama):
    parameters = inspect.signature(llama[0].forward).parameters
    assert {"input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels", "adapter_names"} <= {*parameters}


def test_labels_give_the_model_loss_equal_to_peft(llama):
    am, peft_model = llama
    ids, mask = token_batch(3, 7, left_pad=2)
    ours, theirs = am(input_ids=ids, attention_mask=mask, labels=ids), peft_model(input_ids=ids, attention_mask=mask,
                                                                                  labels=ids)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("inputs", ["position_ids", "inputs_embeds"])
def test_optional_inputs_equal_peft(llama, inputs):
    am, peft_model = llama
    ids, _ = token_batch(2, 6, seed=1)
    kwargs = {"input_ids": ids, "position_ids": torch.arange(3, 9, device=DEVICE).expand(2, 6)} \
        if inputs == "position_ids" else {"inputs_embeds": torch.randn(2, 6, 64, device=DEVICE)}
    torch.testing.assert_close(am(**kwargs).logits, peft_model(**kwargs).logits, atol=1e-5, rtol=0)


def test_return_dict_false_and_hidden_states_give_the_model_tuple(llama):
    am, peft_model = llama
    ids, _ = token_batch(2, 5, seed=2)
    ours = am(input_ids=ids, return_dict=False, output_hidden_states=True)
    theirs = peft_model(input_ids=ids, return_dict=False, output_hidden_states=True, use_cache=False)
    assert isinstance(ours, tuple) and len(ours) == len(theirs) == 2
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=0)
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_token_type_ids_on_an_encoder_equal_peft(bert):
    am, peft_model = bert
    ids, mask = token_batch(3, 7, left_pad=1)
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ours = am(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert type(ours) is tf.modeling_outputs.MaskedLMOutput
    torch.testing.assert_close(ours.logits, peft_model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits,
                               atol=1e-5, rtol=0)


def test_training_runs_the_model_dropout_like_peft_and_eval_switches_back(opt):
    am, peft_model = opt
    ids, _ = token_batch(2, 6, seed=3)
    am.train(), peft_model.train()
    try:
        torch.manual_seed(7)
        ours = am(input_ids=ids, labels=ids)
        ours.loss.backward()
        torch.manual_seed(7)
        theirs = peft_model(input_ids=ids, labels=ids, use_cache=False)
        theirs.loss.backward()
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
        for (path, name), p in am.adapter_parameters("default").items():
            their_grad = getattr(peft_model.base_model.model.get_submodule(path), name)["default"].grad
            torch.testing.assert_close(p.grad, their_grad, atol=1e-6, rtol=1e-4)
        torch.manual_seed(8)
        assert not torch.allclose(am(input_ids=ids, labels=ids).logits, ours.logits)  # dropout does run
    finally:
        am.eval(), peft_model.eval()
        am.zero_grad(set_to_none=True), peft_model.zero_grad(set_to_none=True)
    torch.testing.assert_close(am(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_new_adapters_reach_every_capture(llama, caplog):
    am, peft_model = llama
    ids, _ = token_batch(2, 6, seed=4)
    am(input_ids=ids, labels=ids)  # captured before the adapter exists
    targets = ["model.layers.1.self_attn.k_proj"]
    am.add_adapter("late", fxa.RoadConfig(target_modules=targets, **CONFIG))
    peft_model.add_adapter("late", __import__("peft").RoadConfig(target_modules=targets, **CONFIG))
    with torch.no_grad():
        for (path, name), p in am.adapter_parameters("late").items():
            getattr(peft_model.base_model.model.get_submodule(path), name)["late"].copy_(p)
    am.set_adapter("late"), peft_model.set_adapter("late")
    try:
        with caplog.at_level(logging.DEBUG, logger="fx_adapters"):
            ours = am(input_ids=ids, labels=ids)
        assert not caplog.records  # reused, rewritten again
        torch.testing.assert_close(ours.loss, peft_model(input_ids=ids, labels=ids).loss, atol=1e-5, rtol=0)
    finally:
        am.set_adapter("default"), peft_model.set_adapter("default")
        am.delete_adapter("late"), peft_model.delete_adapter("late")


def test_each_signature_is_captured_once_and_listed(llama, caplog):
    assert_each_signature_is_captured_once_and_listed(llama[0], caplog)


def test_an_input_the_model_does_not_take_raises_its_type_error_and_captures_nothing(llama):
    am, _ = llama
    before = list(am.captures.signatures)
    with pytest.raises(TypeError, match="LlamaForCausalLM.forward.. got an unexpected keyword argument 'token_types'"):
        am(input_ids=token_batch(2, 5)[0], token_types=1)
    assert am.captures.signatures == before


# the same operations as PEFT: bit-equal on the CPU; an accelerator may order half-precision sums differently
HALF = dict(atol=0, rtol=0) if DEVICE.type == "cpu" else {}
EXACT = {torch.float64: dict(atol=1e-10, rtol=0), torch.bfloat16: HALF, torch.float16: HALF}
MOVES = {"to(float64)": lambda m: m.to(torch.float64), "to(bfloat16)": lambda m: m.to(torch.bfloat16),
         "half()": lambda m: m.half()}


@pytest.mark.parametrize("move", MOVES)
def test_a_dtype_move_equals_peft_after_the_same_move(move):
    am, peft_model = _compiled_and_peft(build_hf("qwen2"), ["q_proj", "v_proj"])
    ids, mask = token_batch(2, 6, left_pad=1)
    MOVES[move](am), MOVES[move](peft_model)
    ours, theirs = am(input_ids=ids, attention_mask=mask).logits, peft_model(input_ids=ids, attention_mask=mask).logits
    assert ours.dtype == theirs.dtype != torch.float32
    assert {p.dtype for p in am.adapter_parameters("default").values()} == {theirs.dtype}  # as PEFT: cast too
    torch.testing.assert_close(ours, theirs, **EXACT[ours.dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_module_compiled_from_a_half_precision_model_keeps_float32_adapters_and_equals_peft(dtype):
    am, peft_model = _compiled_and_peft(build_hf("llama").to(dtype), ["q_proj", "v_proj"])
    assert {p.dtype for p in am.adapter_parameters("default").values()} == {torch.float32}  # PEFT's autocast
    ids, mask = token_batch(2, 6, left_pad=1)
    ours, theirs = am(input_ids=ids, attention_mask=mask).logits, peft_model(input_ids=ids, attention_mask=mask).logits
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, **EXACT[dtype])


@pytest.mark.cuda_only  # written as the dtype moves; not run here: no accelerator was lent
def test_a_device_move_after_compiling_on_the_cpu_equals_peft_after_the_same_move():
    am, peft_model = _compiled_and_peft(build_hf("llama").to("cpu"), ["q_proj", "v_proj"])
    am.to(DEVICE), peft_model.to(DEVICE)
    ids, mask = token_batch(2, 6, left_pad=1)
    torch.testing.assert_close(am(input_ids=ids, attention_mask=mask, labels=ids).loss,
                               peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss, atol=1e-5, rtol=0)
    assert torch.equal(am.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                       peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False))


def test_transformers_trainer_trains_the_module_and_peft_reproduces_its_adapter(tmp_path):
    from peft import PeftModel

    model = build_hf("llama")
    am = fxa.compile_with_road(model, fxa.RoadConfig(target_modules="all-linear", **CONFIG))
    losses = trainer_losses(am, tmp_path / "run")
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1
    am.eval()
    am.save_adapter(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    ids, mask = token_batch(2, 6, seed=6)
    torch.testing.assert_close(am(input_ids=ids, attention_mask=mask).logits,
                               peft_model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
