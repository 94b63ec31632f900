"""RoAd adapters on disk in PEFT's layout, and checking a checkpoint against the layers it is loaded into.

PEFT stores a RoAd adapter's tensors under ``base_model.model.<module path>.road_theta`` / ``.road_alpha``, and a
``modules_to_save`` copy of a linear layer under ``….weight`` / ``….bias``. Nothing is unpickled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..graph.match import Target
from ..graph.peft_files import read_adapter_weights, split_peft_key, write_adapter_dir
from .config import RoadConfig
from .pipeline import ROAD_PARAMS
from .rotation import param_size


def read_adapter_dir(adapter_dir: str | Path) -> tuple[RoadConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a PEFT RoAd adapter directory."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: not a directory; expected a PEFT adapter directory")
    return RoadConfig.from_pretrained(adapter_dir), read_adapter_weights(adapter_dir)


def read_checkpoint(path_or_state_dict: str | Path | Mapping[str, torch.Tensor], config: RoadConfig | None
                    ) -> tuple[RoadConfig | None, dict[str, torch.Tensor], str]:
    """``(config, state dict, source for messages)`` of a PEFT RoAd directory or a state dict; ``config`` (if given)
    wins over the directory's own."""
    if isinstance(path_or_state_dict, Mapping):
        return config, dict(path_or_state_dict), "state dict"
    config_on_disk, state = read_adapter_dir(path_or_state_dict)
    return config or config_on_disk, state, str(path_or_state_dict)


def expected_shapes(config: RoadConfig, targets: Sequence[Target], saved: Sequence[Target]
                    ) -> dict[tuple[str, str], tuple[int, ...]]:
    """(module path, PEFT parameter name) -> shape, for everything an adapter with ``config`` on ``targets``
    (rotated) and ``saved`` (``modules_to_save``) layers saves."""
    expected = {(t.name, p): (param_size(config.variant, t.out_features),) for t in targets for p in ROAD_PARAMS}
    expected.update({(t.name, "weight"): (t.out_features, t.in_features) for t in saved})
    expected.update({(t.name, "bias"): (t.out_features,) for t in saved if t.has_bias})
    return expected


def check_checkpoint(state: Mapping[str, torch.Tensor], expected: Mapping[tuple[str, str], tuple[int, ...]],
                     config: RoadConfig, source: str) -> dict[tuple[str, str], torch.Tensor]:
    """The checkpoint's tensors by (module path, parameter) when they are exactly ``expected``; else raise."""
    values, unexpected = {}, []
    for key, tensor in state.items():
        site = split_peft_key(key)
        if site not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != expected[site]:
            raise ValueError(
                f"load_adapter({source}): {key} has shape {tuple(tensor.shape)}, but layer {site[0]!r} needs "
                f"{expected[site]} for variant={config.variant!r}; the checkpoint does not fit this model/config"
            )
        values[site] = tensor
    missing = [f"{path}.{param}" for path, param in expected if (path, param) not in values]
    if unexpected or missing:
        raise ValueError(
            f"load_adapter({source}): the checkpoint does not fit this model: "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}, {len(missing)} missing {missing[:3]}"
        )
    return values


def write_road_adapter(directory: str | Path, config: RoadConfig, targets: Sequence[str], saved: Sequence[str],
                       tensors: Mapping[tuple[str, str], torch.Tensor], base_model_name_or_path: str | None) -> Path:
    """Write an adapter as a PEFT directory. Its ``target_modules`` / ``modules_to_save`` list the exact module
    paths, so PEFT adapts exactly the same layers whatever rule selected them here."""
    exact = RoadConfig(variant=config.variant, group_size=config.group_size, init_weights=config.init_weights,
                       target_modules=sorted(targets), modules_to_save=sorted(saved) or None)
    return write_adapter_dir(directory, exact.to_peft_dict(base_model_name_or_path), tensors)
