"""The benchmark model and the two contenders built on it: PEFT's RoAd model and our AdaptedModule.

Both sides compute the same thing: PEFT's adapters (random, ``init_weights=False``) are saved with
``save_pretrained`` and loaded into ours with ``load_adapter``.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, vocab_size=1024)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROAD = dict(variant="road_1", group_size=64, init_weights=False, target_modules=PROJECTIONS)
BATCH, SEQ = 16, 64
ATOL = 1e-4  # both sides must agree to this before anything is timed


@functools.cache
def base_model() -> torch.nn.Module:
    """The plain eager transformers Llama (random, seeded, fp32, eval)."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**MODEL, pad_token_id=0)).eval()


@functools.cache
def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, MODEL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def eager(model: torch.nn.Module, **kwargs):
    """A call of an eager transformers model (base or PEFT) on the benchmark batch; returns logits."""
    return lambda: model(**inputs(), use_cache=False, **kwargs).logits


def ours(am, **kwargs):
    """A call of our AdaptedModule on the benchmark batch (its graph is captured with use_cache=False)."""
    return lambda: am(**inputs(), **kwargs).logits


def within(ctx_factory, fn):
    """``fn`` called inside a fresh ``ctx_factory()`` each time (e.g. adapters disabled)."""
    def call():
        with ctx_factory():
            return fn()
    return call


def check_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    with torch.inference_mode():
        diff = (got - expected).abs().max().item()
    if diff > ATOL:
        raise AssertionError(f"{what}: fx_adapters and PEFT differ by {diff:.2e} > {ATOL} (max abs); not timing it")


@dataclass
class Contenders:
    peft: torch.nn.Module  # PeftModel on a copy of the base model, adapter ``names[0]`` active
    ours: torch.nn.Module  # AdaptedModule on the base model, same adapters, ``names[0]`` active
    names: list[str]


@functools.cache
def contenders(n_adapters: int) -> Contenders:
    """PEFT and ours with ``n_adapters`` RoAd adapters ``a0, a1, ...`` (same parameters on both sides)."""
    from peft import RoadConfig as PeftRoadConfig
    from peft import get_peft_model

    import fx_adapters as fxa

    base = base_model()
    names = [f"a{i}" for i in range(n_adapters)]
    torch.manual_seed(1)
    peft = get_peft_model(copy.deepcopy(base), PeftRoadConfig(**ROAD), adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, PeftRoadConfig(**ROAD))
    peft.set_adapter(names[0])
    with tempfile.TemporaryDirectory() as tmp:
        peft.save_pretrained(tmp)  # adapters not named "default" go to <tmp>/<name>
        am = fxa.compile_with_road(base, fxa.RoadConfig.from_pretrained(Path(tmp, names[0])), adapter_name=names[0])
        for name in names:
            am.load_adapter(Path(tmp, name), adapter_name=name)
    am.set_adapter(names[0])
    return Contenders(peft.eval(), am.eval(), names)


XLORA_EXPERTS, XLORA_RANK, XLORA_BATCH = 8, 8, 8
XLORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def xlora_inputs() -> dict[str, torch.Tensor]:
    return {k: v[:XLORA_BATCH] for k, v in inputs().items()}


@functools.cache
def xlora_contenders():
    """PEFT's X-LoRA model and ours with the same 8 random LoRA experts (saved by PEFT) and classifier."""
    import warnings

    from peft import LoraConfig, XLoraConfig, get_peft_model

    import fx_adapters as fxa

    base = base_model()
    tmp = Path(tempfile.mkdtemp(prefix="fxa-bench-xlora-"))
    dirs = []
    for i in range(XLORA_EXPERTS):
        torch.manual_seed(10 + i)
        lora = LoraConfig(r=XLORA_RANK, lora_alpha=16, target_modules=XLORA_TARGETS, init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), lora).save_pretrained(tmp / f"e{i}")
        dirs.append(tmp / f"e{i}")
    model = copy.deepcopy(base)
    model.config.use_cache = False  # PEFT's X-LoRA requires it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(model, XLoraConfig(task_type="CAUSAL_LM", hidden_size=MODEL["hidden_size"],
                                                 adapters={str(i): str(d) for i, d in enumerate(dirs)})).eval()
    ours = fxa.compile_with_xlora(base, fxa.XLoraConfig(adapters={f"e{i}": str(d) for i, d in enumerate(dirs)}))
    marker = "internal_xlora_classifier."
    ours.classifier.load_state_dict({k.split(marker, 1)[1]: v for k, v in peft.state_dict().items() if marker in k})
    return peft, ours.eval()
