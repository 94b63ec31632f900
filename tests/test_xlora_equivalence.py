"""X-LoRA computes what PEFT's XLoraModel computes: logits (max abs diff ≤ 1e-5, fp32) and get_latest_scalings().

PEFT's experts are keyed "0", "1", … (other names fail there); ours carry other names. The classifier weights are
copied from PEFT's model into ours.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, build_hf, examples, token_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import Oracle
from peft import get_peft_model_state_dict
from xlora_helpers import (
    eager_xlora,
    logits,
    lora_expert,
    peft_classifier_state,
    peft_xlora,
    random_classifier_state,
    save_experts,
)

import fx_adapters as fxa
from fx_adapters.graph.capture import capture
from fx_adapters.testing import assert_equivalent
from fx_adapters.testing.strategies import token_batches

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning",
                                        "ignore:fan_in_fan_out is set:UserWarning")
MODULES = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS = {
    "defaults": dict(),
    "depth3-layerwise-softmax-temperature": dict(xlora_depth=3, xlora_size=32, layerwise_scalings=True,
                                                 softmax_temperature=0.5),
    "no-softmax-layerwise": dict(enable_softmax=False, layerwise_scalings=True, softmax_temperature=2.0),
    "topk-scaling-pass-value-global-weight": dict(top_k_lora=2, scaling_pass_value=0.3, global_scaling_weight=0.7),
    "softmax-topk-without-softmax": dict(top_k_lora=1, enable_softmax_topk=True, enable_softmax=False,
                                         scaling_pass_value=0.5),
    "softmax-topk-depth2-layerwise": dict(top_k_lora=2, enable_softmax_topk=True, scaling_pass_value=-0.4,
                                          xlora_depth=2, xlora_size=16, layerwise_scalings=True,
                                          global_scaling_weight=1.5),
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    """One model per architecture, captured once, with three PEFT LoRA experts on disk."""
    model = build_hf(request.param)
    dirs = save_experts(model, tmp_path_factory.mktemp(request.param))
    return model, capture(model), dirs


def build_both(setup, names=("e0", "e1", "e2"), **config):
    model, captured, dirs = setup
    peft_model = peft_xlora(model, dirs, **config)
    ours = fxa.XLoraModule.from_captured(model, captured, fxa.XLoraConfig(adapters=dict(zip(names, dirs)), **config))
    ours.classifier.load_state_dict(peft_classifier_state(peft_model))
    return peft_model, ours


def batch(*args, **kwargs) -> dict[str, torch.Tensor]:
    """``conftest.token_batch`` as the keyword inputs ``assert_equivalent`` gives both sides."""
    return dict(zip(("input_ids", "attention_mask"), token_batch(*args, **kwargs)))


def assert_same(peft_model, ours, inputs):
    assert_equivalent(ours, peft_model, inputs, atol=ATOL, rtol=0)  # each side's latest scalings are of `inputs`
    torch.testing.assert_close(ours.get_latest_scalings(), peft_model.get_latest_scalings(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_and_scalings_match_peft(setup, config):
    peft_model, ours = build_both(setup, **config)
    assert_same(peft_model, ours, batch(3, 7, left_pad=2))


def test_runtime_setters_match_peft(setup):
    peft_model, ours = build_both(setup)
    for module in (peft_model.base_model, ours):
        module.set_topk_lora(2)
        module.set_global_scaling_weight(1.7)
        module.set_scaling_pass_value(None)  # 1 / number of experts
    assert ours.get_global_scaling_weight() == peft_model.get_global_scaling_weight() == 1.7
    assert_same(peft_model, ours, batch(2, 9, seed=1))


def test_any_expert_names_work(setup):
    peft_model, ours = build_both(setup, names=("math", "code", "chat"), top_k_lora=2)
    assert ours.experts == ("math", "code", "chat")
    assert_same(peft_model, ours, batch(2, 5, seed=2))


def test_disabled_adapters_compute_the_base_model(setup):
    model, _, _ = setup
    peft_model, ours = build_both(setup, scaling_pass_value=0.2)
    inputs = batch(2, 6, seed=3)
    ours.disable_adapter_layers()
    peft_model.base_model.disable_adapter_layers()
    assert_equivalent(ours, model, inputs, atol=ATOL, rtol=0)
    assert_equivalent(peft_model, model, inputs, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def llama():
    model = build_hf("llama")
    return model, capture(model)


@settings(max_examples=examples(8))  # each example saves up to 4 PEFT experts and builds two X-LoRA models: ~0.5 s
@given(experts=st.lists(st.tuples(st.integers(1, 8), st.sets(st.sampled_from(MODULES), min_size=1),
                                  st.booleans(), st.integers(1, 16)), min_size=1, max_size=4),
       layerwise=st.booleans(), top_k=st.integers(0, 4), scaling_pass_value=st.sampled_from([0.0, 0.25]),
       inputs=token_batches(VOCAB))
def test_random_experts_match_peft_and_disable_to_the_base_model(llama, experts, layerwise, top_k,
                                                                  scaling_pass_value, inputs):
    model, captured = llama
    config = dict(layerwise_scalings=layerwise, top_k_lora=min(top_k, len(experts)) or None,
                  scaling_pass_value=scaling_pass_value)
    with tempfile.TemporaryDirectory() as tmp:
        dirs, in_memory = [], {}
        for i, (rank, targets, rslora, alpha) in enumerate(experts):
            lora = lora_expert(model, seed=i, r=rank, lora_alpha=alpha, use_rslora=rslora,
                               target_modules=sorted(targets))
            dirs.append(Path(tmp) / str(i))
            lora.save_pretrained(dirs[-1])
            in_memory[f"x{i}"] = (lora.peft_config["default"], get_peft_model_state_dict(lora))
        peft_model = peft_xlora(model, dirs, **config)
    ours = fxa.XLoraModule.from_captured(model, captured, fxa.XLoraConfig(adapters=in_memory, **config))
    ours.classifier.load_state_dict(peft_classifier_state(peft_model))
    assert_same(peft_model, ours, inputs)
    ours.disable_adapter_layers()
    assert_equivalent(ours, model, inputs, atol=ATOL, rtol=0)


def assert_eager_oracle_matches(model, xm, dirs, ids):
    """``xm``, given a random classifier, computes ``eager_xlora``'s logits and scalings, which are not the base
    model's."""
    state = random_classifier_state(model.config.get_text_config().hidden_size, len(dirs))
    xm.classifier.load_state_dict(state)
    runs = []  # the oracle's (logits, scalings): run once, as it is slow on a quantized model

    def eager(input_ids):
        runs.append(eager_xlora(model, state, dirs, input_ids))
        return runs[-1][0]

    assert_equivalent(xm, Oracle(eager), {"input_ids": ids}, atol=ATOL, rtol=0)
    expected, scalings = runs[-1]
    assert not torch.allclose(expected, logits(model, ids), atol=1e-3)
    assert not torch.allclose(scalings, torch.full_like(scalings, 1 / len(dirs)), atol=0.05)  # the classifier routes
    torch.testing.assert_close(xm.get_latest_scalings(), scalings, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch, specs", [
    ("gpt2", [dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
              dict(r=2, target_modules=["c_attn", "c_fc", "c_proj"])]),
    ("opt", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"]), dict(r=2, target_modules=["v_proj", "fc2"])]),
], ids=["gpt2-conv1d", "opt-fc-layers-fold-the-batch"])
def test_layers_peft_xlora_cannot_run_match_an_eager_oracle(arch, specs, tmp_path):
    model = build_hf(arch)  # PEFT's X-LoRA: "unexpected keys" loading GPT-2 experts; shape error on OPT's fc1/fc2
    dirs = save_experts(model, tmp_path, specs=specs)
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={"a": dirs[0], "b": dirs[1]}))
    ids, _ = token_batch(2, 6, seed=4)
    assert_eager_oracle_matches(model, xm, dirs, ids)


@pytest.mark.parametrize("quantization", [dict(load_in_8bit=True),
                                          dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32)], ids=["int8", "nf4"])
def test_quantized_base_models_match_an_eager_oracle(quantization, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    build_hf("llama").save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(**quantization))
    # PEFT's X-LoRA raises TypeError (bitsandbytes layers get a `scalings` keyword they do not take)
    dirs = save_experts(build_hf("llama"), tmp_path, specs=[dict(r=4, target_modules=["q_proj", "v_proj"]),
                                                           dict(r=2, target_modules=["v_proj", "down_proj"])])
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={"a": dirs[0], "b": dirs[1]}))
    ids, _ = token_batch(2, 6, seed=4)
    assert_eager_oracle_matches(model, xm, dirs, ids)
