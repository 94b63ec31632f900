"""PEFT adapter directories on disk: ``adapter_config.json`` + ``adapter_model.safetensors``. Nothing is unpickled.

Every method reads and writes PEFT's layout through these functions; the names and key prefixes are defined here
once. PEFT stores an adapter's tensors under ``base_model.model.<module path>.<parameter>``.

>>> split_peft_key("base_model.model.model.layers.0.q_proj.road_theta")
('model.layers.0.q_proj', 'road_theta')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CONFIG_NAME", "PEFT_PREFIX", "PICKLED_WEIGHTS_NAME", "WEIGHTS_NAME", "read_adapter_config",
           "read_adapter_weights", "split_peft_key", "write_adapter_dir"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's save_pretrained(safe_serialization=False): never loaded
PEFT_PREFIX = "base_model.model."  # PeftModel's path to the model it wraps, in saved keys


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The JSON of a PEFT adapter directory's ``adapter_config.json``."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config here; expected a PEFT adapter directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def read_adapter_weights(adapter_dir: str | Path, source: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter directory's ``adapter_model.safetensors`` (a pickle is never loaded)."""
    weights = Path(adapter_dir) / WEIGHTS_NAME
    prefix = f"{source}: " if source else ""
    if not weights.is_file():
        if (Path(adapter_dir) / PICKLED_WEIGHTS_NAME).exists():
            hint = f" (only {PICKLED_WEIGHTS_NAME} is there: it is a pickle, which fx_adapters never loads; re-save " \
                   "it with safe_serialization=True)"
        else:
            hint = f"; {adapter_dir} has no adapter weights file: PEFT's save_pretrained writes {WEIGHTS_NAME} next " \
                   f"to {CONFIG_NAME}, so re-save the adapter there or copy its {WEIGHTS_NAME} in"
        raise FileNotFoundError(f"{prefix}{weights}: missing{hint}")
    try:
        return load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{prefix}{weights}: not a readable safetensors file ({exc})") from None


def split_peft_key(key: str) -> tuple[str, str]:
    """``base_model.model.a.b.road_theta`` → (``a.b``, ``road_theta``); also accepts keys without the prefix."""
    path, _, param = key.removeprefix(PEFT_PREFIX).rpartition(".")
    return path, param


def write_adapter_dir(directory: str | Path, config: Mapping, tensors: Mapping[tuple[str, str], torch.Tensor]) -> Path:
    """Write ``{(path, param): tensor}`` and ``config`` (the ``adapter_config.json`` content) in PEFT's layout;
    returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"{PEFT_PREFIX}{path}.{param}": t.detach().to("cpu").contiguous() for (path, param), t in tensors.items()}
    save_file(state, directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2))
    return directory
