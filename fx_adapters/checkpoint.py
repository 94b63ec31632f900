"""PEFT adapter directories on disk: ``adapter_config.json`` + ``adapter_model.safetensors``. Nothing is unpickled.

PEFT stores a RoAd adapter's tensors under ``base_model.model.<module path>.road_theta`` / ``.road_alpha``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, PICKLED_WEIGHTS_NAME, WEIGHTS_NAME, RoadConfig

PEFT_PREFIX = "base_model.model."
ROAD_PARAMS = ("road_theta", "road_alpha")


def read_adapter_dir(adapter_dir: str | Path) -> tuple[RoadConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a PEFT RoAd adapter directory."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: not a directory; expected a PEFT adapter directory")
    return RoadConfig.from_pretrained(adapter_dir), read_adapter_weights(adapter_dir)


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


def write_adapter_dir(directory: str | Path, config: RoadConfig, tensors: Mapping[tuple[str, str], torch.Tensor],
                      base_model_name_or_path: str | None = None) -> Path:
    """Write ``{(path, param): tensor}`` and the config in PEFT's layout; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"{PEFT_PREFIX}{path}.{param}": t.detach().to("cpu").contiguous() for (path, param), t in tensors.items()}
    save_file(state, directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_peft_dict(base_model_name_or_path), indent=2))
    return directory
