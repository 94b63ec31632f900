"""X-LoRA's configs: ``XLoraConfig`` (PEFT's fields) and the part of each LoRA expert's config its math uses.

Constructing a config only checks values; nothing is read from disk here. The experts' directories are read,
and checked, when a model is compiled (``compile_with_xlora``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..graph.peft_files import read_adapter_config

# LoRA options that change what a layer computes beyond B(A(dropout(x))) · scaling: refused in X-LoRA experts.
_UNSUPPORTED_LORA = {
    "use_dora": "DoRA (PEFT's X-LoRA raises on it too)",
    "lora_bias": "lora_bias",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
}


@dataclass(frozen=True)
class LoraExpertConfig:
    """The fields of a PEFT LoRA ``adapter_config.json`` that an X-LoRA expert's math uses.

    >>> cfg = LoraExpertConfig.from_peft_dict({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
    ...                                        "alpha_pattern": {"down_proj": 4}})
    >>> cfg.scaling("model.layers.0.self_attn.q_proj", rank=8), cfg.scaling("model.layers.0.mlp.down_proj", rank=8)
    (2.0, 0.5)
    >>> LoraExpertConfig.from_peft_dict({"peft_type": "LORA", "use_dora": True}, source="dir/a")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: dir/a: the expert uses DoRA (PEFT's X-LoRA raises on it too), which X-LoRA does not support; ...
    """

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    lora_dropout: float = 0.0
    alpha_pattern: dict = field(default_factory=dict)

    @classmethod
    def from_peft_dict(cls, data: dict, source: object = "config") -> LoraExpertConfig:
        peft_type = str(getattr(data.get("peft_type"), "value", data.get("peft_type"))).upper()
        if peft_type != "LORA":
            raise ValueError(f"{source}: peft_type is {data.get('peft_type')!r}; an X-LoRA expert must be a LoRA "
                             "adapter (peft_type LORA)")
        for key, what in _UNSUPPORTED_LORA.items():
            if data.get(key):
                raise ValueError(f"{source}: the expert uses {what}, which X-LoRA does not support; "
                                 "use a plain LoRA adapter")
        if data.get("bias", "none") != "none":
            raise ValueError(f"{source}: bias={data['bias']!r} trains the base layers' biases, which X-LoRA experts "
                             "cannot carry; use bias='none'")
        dropout = data.get("lora_dropout", 0.0)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{source}: lora_dropout must be in [0, 1), got {dropout!r}")
        return cls(r=data.get("r", 8), lora_alpha=data.get("lora_alpha", 8), use_rslora=bool(data.get("use_rslora")),
                   lora_dropout=dropout, alpha_pattern=dict(data.get("alpha_pattern") or {}))

    def scaling(self, module_path: str, rank: int) -> float:
        """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), ``alpha_pattern`` matched as PEFT does."""
        key = next((k for k in self.alpha_pattern if re.match(rf"(.*\.)?({k})$", module_path)), None)
        alpha = self.alpha_pattern[key] if key is not None else self.lora_alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def check_expert_value(name: str, value) -> None:
    """An expert is a PEFT LoRA directory (a path) or a ``(config, state dict)`` pair; raises ``TypeError`` else."""
    if isinstance(value, (str, os.PathLike)):
        return
    if isinstance(value, tuple) and len(value) == 2:
        config = value[0].to_dict() if hasattr(value[0], "to_dict") else value[0]
        if isinstance(config, Mapping) and isinstance(value[1], Mapping):
            return
    raise TypeError(f"X-LoRA expert {name!r}: expected a PEFT LoRA adapter directory or a (adapter config dict, "
                    f"state dict) pair, got {type(value).__name__}")


def read_expert_config(name: str, value) -> LoraExpertConfig:
    """The ``LoraExpertConfig`` of X-LoRA expert ``name``: a PEFT LoRA directory or a ``(config, state_dict)`` pair."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_dir():
            raise FileNotFoundError(f"X-LoRA expert {name!r}: {path} is not a directory; expected a PEFT LoRA "
                                    "adapter directory (adapter_config.json + adapter_model.safetensors)")
        return LoraExpertConfig.from_peft_dict(read_adapter_config(path), source=f"X-LoRA expert {name!r} ({path})")
    check_expert_value(name, value)
    config = value[0].to_dict() if hasattr(value[0], "to_dict") else value[0]
    return LoraExpertConfig.from_peft_dict(dict(config), source=f"X-LoRA expert {name!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_top_k(top_k, n_experts: int, enable_softmax_topk: bool, where: str = "XLoraConfig") -> None:
    """``top_k_lora`` must be None or in [1, n_experts]; softmax over the top-k needs a top-k."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts):
        raise ValueError(f"{where}: top_k_lora must be None or an integer in [1, {n_experts}] "
                         f"(the number of experts), got {top_k!r}")
    if enable_softmax_topk and top_k is None:
        raise ValueError(f"{where}: enable_softmax_topk=True needs top_k_lora (the softmax runs over the top-k "
                         "experts); set top_k_lora or enable_softmax_topk=False")


def check_number(field_name: str, value, where: str = "XLoraConfig") -> None:
    if not _is_number(value):
        raise ValueError(f"{where}: {field_name} must be a finite number, got {value!r}")


@dataclass
class XLoraConfig:
    """X-LoRA (arXiv 2402.07148): a classifier mixes LoRA experts per token and layer; PEFT's ``XLoraConfig`` fields.

    adapters: expert name → a PEFT LoRA adapter directory, or a ``(adapter config dict, state dict)`` pair with
        PEFT's saved keys (``base_model.model.<module>.lora_A.weight``). Any names; experts may target different
        layers. Checked here: each is a path or such a pair; that the directories exist and hold plain LoRA
        adapters (no DoRA) is checked when the model is compiled, before it is captured.
    hidden_size: the classifier's input size; None reads it from the model.
    scaling_pass_value: the scalings every expert gets in the scaling pass; None means 1 / number of experts.
    The other fields mean what they mean in PEFT.

    >>> cfg = XLoraConfig(adapters={"a": ({"peft_type": "LORA"}, {}), "b": ({"peft_type": "LORA"}, {})}, top_k_lora=1)
    >>> XLoraConfig(adapters=cfg.adapters, top_k_lora=3)
    Traceback (most recent call last):
    ...
    ValueError: XLoraConfig: top_k_lora must be None or an integer in [1, 2] (the number of experts), got 3
    """

    adapters: Mapping = field(default_factory=dict)
    hidden_size: int | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    layerwise_scalings: bool = False
    top_k_lora: int | None = None
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    scaling_pass_value: float | None = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.adapters, Mapping) or not self.adapters:
            raise ValueError("XLoraConfig: no experts; pass adapters={name: PEFT LoRA adapter dir, ...}")
        bad_names = [n for n in self.adapters if not isinstance(n, str) or not n]
        if bad_names:
            raise ValueError(f"XLoraConfig: expert names must be non-empty strings, got {bad_names}")
        self.adapters = dict(self.adapters)
        for name, value in self.adapters.items():
            check_expert_value(name, value)
        for name in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"XLoraConfig: {name} must be True or False, got {getattr(self, name)!r}")
        for name in ("hidden_size", "xlora_depth", "xlora_size"):
            value = getattr(self, name)
            if not (value is None and name == "hidden_size") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"XLoraConfig: {name} must be a positive integer, got {value!r}")
        check_number("softmax_temperature", self.softmax_temperature)
        if self.softmax_temperature <= 0:
            raise ValueError(f"XLoraConfig: softmax_temperature must be > 0, got {self.softmax_temperature!r}")
        check_number("xlora_dropout_p", self.xlora_dropout_p)
        if not 0.0 <= self.xlora_dropout_p < 1.0:
            raise ValueError(f"XLoraConfig: xlora_dropout_p must be in [0, 1), got {self.xlora_dropout_p!r}")
        check_top_k(self.top_k_lora, len(self.adapters), self.enable_softmax_topk)
        if self.scaling_pass_value is None:
            self.scaling_pass_value = 1 / len(self.adapters)
        check_number("scaling_pass_value", self.scaling_pass_value)
        check_number("global_scaling_weight", self.global_scaling_weight)
