"""LoRA experts for X-LoRA: read PEFT LoRA adapters (JSON + safetensors, nothing unpickled), check them against the
captured model's layers, and stack them per layer for ``XLoraExperts``.

>>> import torch
>>> from fx_adapters.graph.match import Target
>>> state = {"base_model.model.fc.lora_A.weight": torch.ones(2, 4),
...          "base_model.model.fc.lora_B.weight": torch.ones(3, 2)}
>>> expert = read_lora_expert("math", ({"peft_type": "LORA", "r": 2, "lora_alpha": 4}, state))
>>> {path: (a.shape, b.shape) for path, (a, b) in expert.weights.items()}
{'fc': (torch.Size([2, 4]), torch.Size([3, 2]))}
>>> fc = Target("fc", "linear", 4, 3, True, ("linear",))
>>> stacked = stack_experts([expert, expert], [fc], torch.float32)[fc]
>>> stacked.lora_A.shape, stacked.lora_B.shape, stacked.scale.tolist()
(torch.Size([2, 2, 4]), torch.Size([3, 2, 2]), [2.0, 2.0])
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..graph.match import Target
from ..graph.peft_files import PEFT_PREFIX, read_adapter_weights
from .config import LoraExpertConfig, read_expert_config
from .modules import XLoraExperts

_LORA_KEY = re.compile(r"(?P<path>.+)\.(?:lora_(?P<which>[AB])\.weight|lora_embedding_(?P<embedding>[AB]))")
_BASE_KEY = ".base_layer.weight"  # PEFT saves a targeted embedding's base weights with the adapter
_REFUSED_KEYS = {
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector), which X-LoRA does not support",
    ".lora_A.bias": "lora_bias, which X-LoRA does not support",
    ".lora_B.bias": "lora_bias, which X-LoRA does not support",
}


@dataclass(frozen=True)
class LoraExpert:
    """One expert: its name, where it came from (for messages), config, ``{module path: (A (r, in), B (out, r))}``,
    the paths whose weights are embedding LoRA (``in`` = vocabulary) and base weights saved with it."""

    name: str
    source: str
    config: LoraExpertConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    embeddings: frozenset[str] = frozenset()
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def read_lora_expert(name: str, value) -> LoraExpert:
    """Read expert ``name``: a PEFT LoRA adapter directory or a ``(config dict, state dict)`` pair."""
    config = read_expert_config(name, value)
    if isinstance(value, (str, os.PathLike)):
        source = f"X-LoRA expert {name!r} ({value})"
        state = read_adapter_weights(value, source)
    else:
        source, state = f"X-LoRA expert {name!r}", value[1]
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    embeddings, base_weights = set(), {}
    for key, tensor in state.items():
        refused = next((why for marker, why in _REFUSED_KEYS.items() if marker in key), None)
        if refused:
            raise ValueError(f"{source}: {key} means {refused}")
        if key.endswith(_BASE_KEY):
            base_weights[key.removeprefix(PEFT_PREFIX).removesuffix(_BASE_KEY)] = tensor
            continue
        match = _LORA_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise ValueError(f"{source}: unexpected key {key!r}; expected PEFT's saved LoRA keys, e.g. "
                             f"'{PEFT_PREFIX}<module path>.lora_A.weight'")
        if match["embedding"]:
            embeddings.add(match["path"])
        pairs.setdefault(match["path"], {})[match["which"] or match["embedding"]] = tensor
    if not pairs:
        raise ValueError(f"{source}: no LoRA weights (lora_A / lora_B) found")
    weights = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["A"].shape[0] != ab["B"].shape[1]:
            shapes = {f"lora_{k}": tuple(v.shape) for k, v in ab.items()}
            raise ValueError(f"{source}: module {path!r} needs a lora_A (r, in) and a lora_B (out, r) of the same "
                             f"rank, got {shapes}")
        weights[path] = (ab["A"], ab["B"])
    return LoraExpert(name, source, config, weights, frozenset(embeddings), base_weights)


def check_experts(experts: Sequence[LoraExpert], layers: Mapping[str, Target], modules: Mapping[str, nn.Module]
                  ) -> None:
    """Every module an expert adapts must be a linear-like or embedding layer of the graph with the expert's in/out
    features; base weights saved with an expert must be the model's.

    ``layers``: the graph's linear-like and embedding layers by path; ``modules``: the model's ``named_modules()``.
    """
    for expert in experts:
        for path, weight in expert.base_weights.items():
            base = getattr(modules.get(path), "weight", None)
            if base is None or base.shape != weight.shape or not torch.equal(weight.to(base.dtype), base):
                raise ValueError(f"{expert.source}: it carries base weights for {path!r} ({path}{_BASE_KEY}) that are "
                                 "not the model's (a resized or trained layer?); X-LoRA experts share the base model: "
                                 "use the model the expert was trained on")
        for path, (a, b) in expert.weights.items():
            if path not in modules:
                raise ValueError(f"{expert.source}: module {path!r} is not in the model; was the expert trained on "
                                 "another base model?")
            kind = "embedding" if path in expert.embeddings else "linear"
            if path not in layers or (layers[path].kind == "embedding") != (kind == "embedding"):
                raise ValueError(f"{expert.source}: it has {kind} LoRA weights for {path!r}, a "
                                 f"{type(modules[path]).__name__} the graph does not call as a {kind} layer; X-LoRA "
                                 "experts adapt linear and embedding layers")
            layer = layers[path]
            if (a.shape[1], b.shape[0]) != (layer.in_features, layer.out_features):
                raise ValueError(
                    f"{expert.source}: layer {path!r} is {layer.in_features}→{layer.out_features} in the model but "
                    f"the expert's LoRA weights are {a.shape[1]}→{b.shape[0]} (lora_A {tuple(a.shape)}, lora_B "
                    f"{tuple(b.shape)}); was it trained on another base model?")


def stack_experts(experts: Sequence[LoraExpert], targets: Sequence[Target], dtype: torch.dtype, device=None,
                  trainable: bool = False) -> dict[Target, XLoraExperts]:
    """One ``XLoraExperts`` per target: the experts' A and B zero-padded to the largest rank and stacked in order."""
    stacked = {}
    for target in targets:
        ranks = [e.weights[target.name][0].shape[0] if target.name in e.weights else 0 for e in experts]
        a = torch.zeros(len(experts), max(ranks), target.in_features, dtype=dtype, device=device)
        b = torch.zeros(target.out_features, len(experts), max(ranks), dtype=dtype, device=device)
        scale = torch.zeros(len(experts), dtype=dtype, device=device)
        for i, (expert, rank) in enumerate(zip(experts, ranks)):
            if rank:
                lora_a, lora_b = expert.weights[target.name]
                a[i, :rank] = lora_a
                b[:, i, :rank] = lora_b
                scale[i] = expert.config.scaling(target.name, rank)
        embedding = target.kind == "embedding"  # PEFT applies no dropout to embedding LoRA
        # nor draws a mask for an expert that does not adapt the layer
        dropout = [e.config.lora_dropout if rank and not embedding else 0.0 for e, rank in zip(experts, ranks)]
        stacked[target] = XLoraExperts(a, b, scale, dropout, trainable, embedding)
    return stacked
