"""Shared X-LoRA test helpers: LoRA experts saved with PEFT, PEFT's X-LoRA model (the oracle), classifier copying."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

# Three experts targeting different layers (one the embedding), with different ranks, rsLoRA, alpha_pattern, dropout.
EXPERT_SPECS = (
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "k_proj", "o_proj", "down_proj"],
         alpha_pattern={"down_proj": 3}),
)


def lora_expert(model, seed: int, **spec):
    """PEFT's LoRA model on a copy of ``model`` with random A and B (``init_lora_weights=False``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **spec))


def save_experts(model, directory: Path, specs=EXPERT_SPECS, seed: int = 10) -> list[Path]:
    """Save one PEFT LoRA adapter directory per spec under ``directory``."""
    dirs = []
    for i, spec in enumerate(specs):
        dirs.append(directory / f"expert{i}")
        lora_expert(model, seed + i, **spec).save_pretrained(dirs[-1])
    return dirs


def peft_xlora(model, dirs, **config):
    """PEFT's X-LoRA model on a copy of ``model``, experts keyed "0", "1", … as PEFT requires."""
    from peft import XLoraConfig, get_peft_model

    model = copy.deepcopy(model)
    model.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size,
                          adapters={str(i): str(d) for i, d in enumerate(dirs)}, **config)
        return get_peft_model(model, cfg).eval()


def peft_classifier_state(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's classifier weights, keys without the ``…internal_xlora_classifier.`` prefix."""
    marker = "internal_xlora_classifier."
    return {k.split(marker, 1)[1]: v for k, v in peft_model.state_dict().items() if marker in k}


def logits(module, ids, mask=None):
    with torch.no_grad():
        return module(input_ids=ids, attention_mask=mask).logits


def eager_xlora(model, xm, dirs, ids, scalings=None, **model_kwargs):
    """Oracle for layers PEFT's X-LoRA cannot run: the model with forward hooks adding, per expert, PEFT's
    B(A(x · s)) · scaling, with ``scalings`` (batch, seq, layers, experts) or else ``xm``'s classifier's
    (scaling_pass_value 0, so the scaling pass is the base model); ``model_kwargs`` go to every model call."""
    with torch.no_grad():
        if scalings is None:
            hidden = model(input_ids=ids, output_hidden_states=True, **model_kwargs).hidden_states[-1]
            scalings = xm.classifier(hidden)
        experts = []
        for d in dirs:
            alpha = json.loads((d / "adapter_config.json").read_text())["lora_alpha"]
            weights = load_file(d / "adapter_model.safetensors")
            experts.append({k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"):
                            (v, weights[k.replace("lora_A", "lora_B")], alpha / v.shape[0])
                            for k, v in weights.items() if k.endswith("lora_A.weight")})
        modules = dict(model.named_modules())
        handles = []
        for index, target in enumerate(xm.targets):
            def hook(_module, inputs, out, index=index, path=target.name):
                s = scalings[..., index, :]
                x = inputs[0].reshape(*s.shape[:-1], -1)
                delta = sum(((x * s[..., e, None]) @ a.T @ b.T) * scale
                            for e, expert in enumerate(experts) if path in expert for a, b, scale in [expert[path]])
                return out + delta.reshape(out.shape)
            handles.append(modules[target.name].register_forward_hook(hook))
        try:
            return model(input_ids=ids, **model_kwargs).logits, scalings
        finally:
            for handle in handles:
                handle.remove()

