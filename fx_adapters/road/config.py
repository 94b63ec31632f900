"""RoAd's config: PEFT's ``RoadConfig`` fields, validated at construction, PEFT-compatible on disk.

>>> cfg = RoadConfig(variant="road_2", group_size=8, target_modules=["q_proj", "v_proj"])
>>> cfg.target_modules
['q_proj', 'v_proj']
>>> RoadConfig(group_size=7)
Traceback (most recent call last):
...
ValueError: RoadConfig: group_size must be a positive even integer, got 7
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..graph.peft_files import CONFIG_NAME, read_adapter_config
from .rotation import VARIANTS

BASE = "__base__"  # the adapter name of "no adapter" in a mixed batch's adapter_names, as PEFT


def _check_module_selector(field: str, value) -> list[str] | str | None:
    """PEFT's forms: None, a regex string (full match), or a list of names (exact or dotted suffix)."""
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"RoadConfig: {field}={value!r} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"RoadConfig: {field} must be None, a regex string or a list of module names, got {value!r}")


@dataclass
class RoadConfig:
    """A RoAd adapter (arXiv 2409.00119), with the fields and meaning of PEFT's ``RoadConfig``.

    variant: ``"road_1"`` (one angle/scale per pair), ``"road_2"`` (per element), ``"road_4"`` (two per element).
    group_size: outputs are rotated in groups; element i pairs with i + group_size/2. Must divide every
        target's out_features.
    init_weights: True starts at the identity; False draws θ ~ N(0, 0.5²), α ~ N(1, 0.5²) as PEFT does.
    target_modules: names (exact or suffix of the module path), a regex (full match), ``"all-linear"``, or
        None for PEFT's per-architecture defaults.
    exclude_modules: same forms; matches are never adapted.
    modules_to_save: linear layers (names, exact or suffix, e.g. a classification head) that get a trainable
        copy per adapter, saved with it; the copy replaces the layer for that adapter's samples.
    """

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"RoadConfig: unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 2:
            raise ValueError(f"RoadConfig: group_size must be a positive even integer, got {gs!r}")
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"RoadConfig: init_weights must be True or False, got {self.init_weights!r}")
        self.target_modules = _check_module_selector("target_modules", self.target_modules)
        self.exclude_modules = _check_module_selector("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"RoadConfig: modules_to_save must be a list of module names, got "
                                f"{self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)

    @classmethod
    def from_pretrained(cls, adapter_dir: str | Path) -> RoadConfig:
        """Read a PEFT RoAd adapter's ``adapter_config.json`` (JSON only)."""
        return cls.from_peft_dict(read_adapter_config(adapter_dir), source=Path(adapter_dir) / CONFIG_NAME)

    @classmethod
    def from_peft_dict(cls, data: dict, source: object = "config") -> RoadConfig:
        peft_type = str(data.get("peft_type", "ROAD")).upper()
        if peft_type != "ROAD":
            raise ValueError(f"{source}: peft_type is {data.get('peft_type')!r}, not a RoAd adapter (ROAD)")
        fields = {k: data[k] for k in ("variant", "group_size", "init_weights", "target_modules", "exclude_modules",
                                       "modules_to_save") if k in data}
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict:
        """The ``adapter_config.json`` content that PEFT's ``PeftConfig.from_pretrained`` reads."""
        fields = asdict(self)
        if fields["exclude_modules"] is None:
            del fields["exclude_modules"]  # PEFT's RoadConfig has no such field
        return {
            **fields,
            "peft_type": "ROAD",
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True,
            "revision": None,
        }
