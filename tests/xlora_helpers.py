"""Shared X-LoRA test helpers: LoRA experts saved with PEFT, PEFT's X-LoRA model (the oracle), classifier copying."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

# Three experts targeting different layers (one the embedding), with different ranks, rsLoRA, alpha_pattern, and
# dropouts that differ on every layer two experts share (a p given to the wrong expert changes the masks).
EXPERT_SPECS = (
    dict(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"]),
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


def random_classifier_state(hidden_size: int, n_experts: int, seed: int = 7) -> dict[str, torch.Tensor]:
    """A depth-1 classifier's weights (PEFT's keys without the prefix), large enough that the scalings vary."""
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.weight": torch.randn(n_experts, hidden_size, generator=g),
            "layers.0.bias": torch.randn(n_experts, generator=g)}


def eager_xlora(model, classifier_state, dirs, ids, scalings=None, **model_kwargs):
    """Oracle for layers PEFT's X-LoRA cannot run, from the experts' files and the classifier's weights only: the
    model with forward hooks adding, per expert, PEFT's B(A(x · s)) · scaling. The scalings are ``scalings``
    ``(batch, seq, adapted layers, experts)`` when given, else s = softmax(W h + b) of the base model's last hidden
    state h for every layer (a depth-1 classifier, scaling_pass_value 0: the scaling pass is the base model).
    ``model_kwargs`` go to every model call. Returns the logits and the scalings used."""
    with torch.no_grad():
        experts = []
        for d in dirs:
            alpha = json.loads((d / "adapter_config.json").read_text())["lora_alpha"]
            weights = load_file(d / "adapter_model.safetensors")
            experts.append({k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"):
                            (v, weights[k.replace("lora_A", "lora_B")], alpha / v.shape[0])
                            for k, v in weights.items() if k.endswith("lora_A.weight")})
        modules = dict(model.named_modules())
        adapted = [name for name in modules if any(name in expert for expert in experts)]  # in module order
        if scalings is None:
            weight, bias = classifier_state["layers.0.weight"], classifier_state["layers.0.bias"]
            hidden = model(input_ids=ids, output_hidden_states=True, **model_kwargs).hidden_states[-1]
            s = torch.softmax(hidden.float() @ weight.T + bias, dim=-1)
            scalings = s[..., None, :].expand(*s.shape[:-1], len(adapted), len(experts))
        handles = []
        for index, path in enumerate(adapted):
            def hook(_module, inputs, out, path=path, index=index):
                s = scalings[..., index, :]
                x = inputs[0].reshape(*s.shape[:-1], -1)
                delta = sum(((x * s[..., e, None]) @ a.T @ b.T) * scale
                            for e, expert in enumerate(experts) if path in expert for a, b, scale in [expert[path]])
                return out + delta.reshape(out.shape)
            handles.append(modules[path].register_forward_hook(hook))
        try:
            return model(input_ids=ids, **model_kwargs).logits, scalings
        finally:
            for handle in handles:
                handle.remove()


def peft_to(peft_model, dtype: torch.dtype):
    """``peft_model.to(dtype)``, PEFT's X-LoRA model made to run after it: its classifier keeps the dtype it was
    built with in a ``dtype`` attribute that ``.to()`` does not change, and makes its scaling-pass scalings in it
    (fp32 scalings times fp16 inputs reach the fp16 LoRA weights as fp32: a dtype error)."""
    peft_model.to(dtype)
    peft_model.base_model.internal_xlora_classifier.dtype = dtype
    return peft_model
