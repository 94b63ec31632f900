"""X-LoRA takes every input the model takes: each call signature is captured on first use, rewritten by the same
pipeline, shares the classifier and experts, and equals PEFT's X-LoRA model (logits, loss, scalings), in train mode
too (the base model's dropout under one seed), after dtype moves and with adapters disabled."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import (
    DEVICE,
    assert_close_relative,
    assert_each_signature_is_captured_once_and_listed,
    build_hf,
    token_batch,
    trainer_losses,
)
from xlora_helpers import EXPERT_SPECS, eager_xlora, peft_classifier_state, peft_to, peft_xlora, save_experts

import fx_adapters as fxa

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning",
                                        "ignore:fan_in_fan_out is set:UserWarning")
CONFIG = dict(top_k_lora=2, scaling_pass_value=0.3, global_scaling_weight=0.8)


def compiled_and_peft(model, dirs, **config):
    """Our X-LoRA module and PEFT's on ``model`` with the experts in ``dirs`` and PEFT's classifier weights."""
    peft_model = peft_xlora(model, dirs, **config)
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={f"e{i}": d for i, d in enumerate(dirs)}, **config))
    xm.classifier.load_state_dict(peft_classifier_state(peft_model))
    return xm, peft_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):  # experts on the embedding too (EXPERT_SPECS); eager attention returns its weights
    model = build_hf("llama", attn_implementation="eager")
    return compiled_and_peft(model, save_experts(model, tmp_path_factory.mktemp("llama")), **CONFIG)


def assert_same(ours, theirs, xm, peft_model):
    """Equal logits (and loss when there is one) and equal latest scalings."""
    torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)
    if theirs.get("loss") is not None:
        torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(xm.get_latest_scalings(), peft_model.get_latest_scalings(), atol=ATOL, rtol=0)


def test_forward_shows_the_model_signature(llama):
    xm, _ = llama
    model_parameters = inspect.signature(type(xm.captures.model).forward).parameters
    assert list(inspect.signature(xm.forward).parameters) == [n for n in model_parameters if n != "self"]


def test_labels_give_the_loss_of_peft_xlora(llama):
    xm, peft_model = llama
    ids, mask = token_batch(3, 7, left_pad=2)
    ours = xm(input_ids=ids, attention_mask=mask, labels=ids)
    assert_same(ours, peft_model(input_ids=ids, attention_mask=mask, labels=ids), xm, peft_model)


@pytest.mark.parametrize("inputs", ["position_ids", "inputs_embeds"])
def test_optional_inputs_equal_peft_xlora(llama, inputs):
    """``inputs_embeds``: no embedding call in either pass, so the embedding expert does not apply (as in PEFT), and
    the other layers keep their place in the scalings."""
    xm, peft_model = llama
    ids, _ = token_batch(2, 6, seed=1)
    kwargs = {"input_ids": ids, "position_ids": torch.arange(3, 9, device=DEVICE).expand(2, 6)} \
        if inputs == "position_ids" else {"inputs_embeds": torch.randn(2, 6, 64, device=DEVICE)}
    assert_same(xm(**kwargs), peft_model(**kwargs), xm, peft_model)


def test_return_dict_false_hidden_states_and_attentions_give_the_model_tuple(llama):
    xm, peft_model = llama
    ids, mask = token_batch(2, 5, seed=2, left_pad=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, return_dict=False, output_hidden_states=True,
                  output_attentions=True)
    ours, theirs = xm(**kwargs), peft_model(**kwargs)
    assert isinstance(ours, tuple) and len(ours) == len(theirs) == 3
    for a, b in zip((ours[0], *ours[1], *ours[2]), (theirs[0], *theirs[1], *theirs[2]), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)  # logits, each hidden state, each attention map
    torch.testing.assert_close(xm.get_latest_scalings(), peft_model.get_latest_scalings(), atol=ATOL, rtol=0)


def test_token_type_ids_on_gpt2_equal_an_eager_oracle(tmp_path):
    """PEFT's X-LoRA cannot load GPT-2 experts (test_xlora_equivalence.py): the hooks oracle, given the same
    ``token_type_ids``, which change GPT-2's embeddings."""
    model = build_hf("gpt2")
    dirs = save_experts(model, tmp_path, specs=[dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
                                                dict(r=2, target_modules=["c_attn", "c_proj"])])
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={"a": dirs[0], "b": dirs[1]}))
    state = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(7)).to(v)
             for k, v in xm.classifier.state_dict().items()}
    xm.classifier.load_state_dict(state)
    ids, _ = token_batch(2, 6, seed=4)
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    expected, scalings = eager_xlora(model, state, dirs, ids, token_type_ids=types)
    torch.testing.assert_close(xm(input_ids=ids, token_type_ids=types).logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(xm.get_latest_scalings(), scalings, atol=ATOL, rtol=0)
    assert not torch.allclose(eager_xlora(model, state, dirs, ids)[0], expected, atol=1e-3)  # the types count


def test_disabled_adapters_compute_the_base_model_in_every_signature(llama):
    xm, peft_model = llama
    ids, _ = token_batch(2, 6, seed=3)
    latest = xm(input_ids=ids, labels=ids).loss, xm.get_latest_scalings()
    xm.disable_adapter_layers(), peft_model.base_model.disable_adapter_layers()
    try:
        for kwargs in ({"input_ids": ids, "labels": ids}, {"input_ids": ids, "return_dict": False}):
            ours, theirs = xm(**kwargs), peft_model(**kwargs)
            for a, b in zip(*(o if isinstance(o, tuple) else o.to_tuple() for o in (ours, theirs)), strict=True):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        assert not torch.allclose(xm(input_ids=ids, labels=ids).loss, latest[0])  # the experts did count
        assert xm.get_latest_scalings() is latest[1]  # not updated while disabled
    finally:
        xm.enable_adapter_layers(), peft_model.base_model.enable_adapter_layers()


def test_scalings_log_records_every_signature(llama):
    xm, peft_model = llama
    ids, _ = token_batch(2, 5, seed=6)
    xm.enable_scalings_logging()
    try:
        xm(input_ids=ids, labels=ids)
        xm(input_ids=ids[:, :3], return_dict=False)
        log = xm.get_scalings_log()
    finally:
        xm.disable_scalings_logging(), xm.clear_scalings_log()
    assert [s.shape[1] for s in log] == [5, 3]
    peft_model(input_ids=ids[:, :3], return_dict=False)
    torch.testing.assert_close(log[1], peft_model.get_latest_scalings(), atol=ATOL, rtol=0)


def test_each_signature_is_captured_once_and_listed(llama, caplog):
    assert_each_signature_is_captured_once_and_listed(llama[0], caplog)


def test_an_input_the_model_does_not_take_raises_its_type_error_and_captures_nothing(llama):
    xm, _ = llama
    before, latest = list(xm.captures.signatures), xm.get_latest_scalings()
    with pytest.raises(TypeError, match="LlamaForCausalLM.forward.. got an unexpected keyword argument 'token_types'"):
        xm(input_ids=token_batch(2, 5)[0], token_types=1)
    assert xm.captures.signatures == before and xm.get_latest_scalings() is latest


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """OPT (dropout 0.1, here attention dropout 0.1 too) with trainable experts and their own dropout, expert b on
    the second layer only (the first layer's draws come before any expert in both passes)."""
    model = build_hf("opt", attention_dropout=0.1)
    specs = [dict(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"]),
             dict(r=2, lora_dropout=0.1, target_modules=["model.decoder.layers.1.self_attn.k_proj"])]
    dirs = save_experts(model, tmp_path_factory.mktemp("opt"), specs=specs)
    return compiled_and_peft(model, dirs, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.2,
                             use_trainable_adapters=True, scaling_pass_value=0.3)


def test_training_runs_the_base_model_dropout_like_peft_xlora_and_eval_switches_back(opt):
    """One seed draws PEFT's masks in PEFT's order: the scaling pass's (base model and experts), the classifier's,
    then the real pass's. Outputs, loss and every gradient equal PEFT's."""
    xm, peft_model = opt
    ids, mask = token_batch(2, 6, left_pad=2)
    xm.train(), peft_model.train()
    try:
        outputs = []
        for module in (peft_model, xm):
            torch.manual_seed(7)
            outputs.append(module(input_ids=ids, attention_mask=mask, labels=ids))
            outputs[-1].loss.backward()
        assert_same(outputs[1], outputs[0], xm, peft_model)
        peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        classifier = {n.split("internal_xlora_classifier.")[1]: g for n, g in peft_grads.items()
                      if "internal_xlora_classifier." in n}
        for name, param in xm.classifier.named_parameters():
            assert_close_relative(param.grad, classifier[name])
        q_proj = xm.graph_module.xlora_experts["model__decoder__layers__0__self_attn__q_proj"]
        assert_close_relative(q_proj.lora_A.grad[0], peft_grads[
            "base_model.lora_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.0.weight"])
        torch.manual_seed(8)
        assert not torch.allclose(xm(input_ids=ids, attention_mask=mask).logits, outputs[1].logits)  # dropout runs
        with torch.no_grad():  # the base model's dropout: PEFT's with only X-LoRA's own dropout would differ
            xm.graph_module.xlora_classifier.eval()
            for module in xm.graph_module.xlora_experts.values():
                module.eval()
            torch.manual_seed(7)
            own_only = xm(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(own_only, peft_model.eval()(input_ids=ids, attention_mask=mask).logits, atol=1e-3)
    finally:
        xm.eval(), peft_model.eval()
        xm.zero_grad(set_to_none=True), peft_model.zero_grad(set_to_none=True)
    ours = xm(input_ids=ids, attention_mask=mask)
    assert_same(ours, peft_model(input_ids=ids, attention_mask=mask), xm, peft_model)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-6), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)],
                         ids=["float64", "float16", "bfloat16"])
def test_a_dtype_move_equals_peft_xlora_after_the_same_move(tmp_path, dtype, atol):
    """PEFT's X-LoRA cannot run an fp16 embedding expert (fp32 scalings reach it): experts on linear layers here."""
    model = build_hf("qwen2")
    xm, peft_model = compiled_and_peft(model, save_experts(model, tmp_path, specs=EXPERT_SPECS[:2]), **CONFIG)
    xm.to(dtype), peft_to(peft_model, dtype)
    ids, mask = token_batch(2, 6, left_pad=1)
    with torch.no_grad():
        ours, theirs = xm(input_ids=ids, attention_mask=mask), peft_model(input_ids=ids, attention_mask=mask)
        assert ours.logits.dtype == xm.get_latest_scalings().dtype == dtype
        torch.testing.assert_close(ours.logits, theirs.logits, atol=atol, rtol=0)
        torch.testing.assert_close(xm.get_latest_scalings(), peft_model.get_latest_scalings(), atol=atol, rtol=0)
        xm.disable_adapter_layers()
        base = xm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(base, model.to(dtype)(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    assert not torch.allclose(base, ours.logits, atol=10 * atol)  # the experts change more than the tolerance


def test_transformers_trainer_trains_an_xlora_module(llama, tmp_path):
    model = build_hf("llama")
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters=llama[0].config.adapters, xlora_depth=2,
                                                       xlora_size=32))
    losses = trainer_losses(xm, tmp_path / "run", learning_rate=0.05)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05
