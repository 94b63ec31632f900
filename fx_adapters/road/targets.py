"""Which layers a new RoAd adapter rotates and which it saves (``modules_to_save``), checked against the model and
the adapters already there. Pure functions: nothing changes when they raise.

>>> from fx_adapters.graph.match import Target
>>> from fx_adapters.road.config import RoadConfig
>>> layers = [Target("q", "linear", 8, 8, False, ("q",)), Target("head", "linear", 8, 6, False, ("head",))]
>>> rotated, saved = select_layers("a", RoadConfig(group_size=4, target_modules=["q"], modules_to_save=["head"]),
...                                layers, rotated_by={}, saved_by={})
>>> [t.name for t in rotated], [t.name for t in saved]
(['q'], ['head'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..graph.match import Target, select_targets
from .config import RoadConfig


def saved_layers(adapter_name: str, modules_to_save: Sequence[str], layers: Sequence[Target]) -> list[Target]:
    """The linear layers ``modules_to_save`` names (exact or suffix of the path)."""
    saved = []
    for wanted in modules_to_save:
        found = [t for t in layers if t.name == wanted or t.name.endswith("." + wanted)]
        if not found:
            raise ValueError(f"adapter {adapter_name!r}: modules_to_save entry {wanted!r} matches no linear layer "
                             "of the model (only linear layers, e.g. classification heads, can be saved)")
        unsupported = [t for t in found if t.kind != "linear"]
        if unsupported:
            raise NotImplementedError(f"adapter {adapter_name!r}: modules_to_save of {unsupported[0].kind} layer "
                                      f"{unsupported[0].name!r} is not supported; only nn.Linear layers")
        saved += [t for t in found if t not in saved]
    return saved


def select_layers(adapter_name: str, config: RoadConfig, layers: Sequence[Target], *,
                  rotated_by: Mapping[str, Sequence[str]], saved_by: Mapping[str, Sequence[str]],
                  model_type: str | None = None, output_head: str | None = None) -> tuple[list[Target], list[Target]]:
    """(layers to rotate, linear layers to save a copy of) for a new adapter; raises on bad input.

    ``rotated_by`` / ``saved_by``: the adapters already there -> the layers they rotate / save (a layer cannot be
    both rotated by one adapter and saved by another).
    """
    if not isinstance(config, RoadConfig):
        raise TypeError(f"adapter {adapter_name!r}: expected a fx_adapters.RoadConfig, got {type(config).__name__}")
    saved = saved_layers(adapter_name, config.modules_to_save or [], layers)
    targets = [t for t in select_targets(list(layers), config.target_modules, config.exclude_modules,
                                         model_type=model_type, output_head=output_head).targets if t not in saved]
    bad = [t for t in targets if t.out_features % config.group_size]
    if bad:
        listed = ", ".join(f"{t.name!r} (out_features={t.out_features})" for t in bad[:3])
        raise ValueError(
            f"adapter {adapter_name!r}: group_size={config.group_size} does not divide the out_features of "
            f"{listed}{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}; choose a group_size that divides "
            "them or exclude those layers"
        )
    saved_elsewhere = {name for names in saved_by.values() for name in names}
    clash = [t.name for t in targets if t.name in saved_elsewhere]
    clash += [t.name for t in saved if any(t.name in names for names in rotated_by.values())]
    if clash:
        raise ValueError(f"adapter {adapter_name!r}: layer {clash[0]!r} cannot be both rotated by one adapter and "
                         "saved (modules_to_save) by another; exclude it from one of them")
    return targets, saved
