"""RoAd on every capture of a model: the rotations and saved layers an ``AdaptedModule``'s own graph applies
(``road_sites``), applied to another capture of the same model by ``pipeline.apply_road`` (``road_rewrite``), sharing
the module's ``road_adapters`` tables and ``modules_to_save`` copies. ``forward`` uses it for each new call signature
(``graph.captures``), ``generate`` for the prefill and decode graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..graph.graph_module import copy_graph_module
from ..graph.match import find_linear_layers
from ..graph.tags import tagged
from .modules_to_save import SAVED_ATTR, SavedTag
from .pipeline import apply_road
from .rewrite import ADAPTERS_ATTR, rotations

Sites = tuple[tuple[tuple[str, int], ...], tuple[str, ...]]


def road_sites(gm: torch.fx.GraphModule) -> Sites:
    """What a RoAd graph applies: ((layer, group size) rotations, in graph order per layer; saved layers)."""
    rotated, saved = [], []
    for _, tag in rotations(gm.graph):
        if (tag.layer, tag.group_size) not in rotated:
            rotated.append((tag.layer, tag.group_size))
    for _, tag in tagged(gm.graph, SavedTag):
        if tag.layer not in saved:
            saved.append(tag.layer)
    return tuple(rotated), tuple(saved)


def road_rewrite(main: torch.fx.GraphModule) -> tuple[Sites, Callable[[torch.fx.GraphModule, nn.Module],
                                                                       torch.fx.GraphModule]]:
    """``(key, build)`` for ``graph.captures``: ``build(captured, model)`` is a copy of another capture of ``model``
    rewritten as ``main`` is, holding ``main``'s RoAd layers and saved copies; ``key`` changes with that rewrite."""
    sites = road_sites(main)

    def build(captured: torch.fx.GraphModule, model: nn.Module) -> torch.fx.GraphModule:
        gm = copy_graph_module(captured)
        for attr in (ADAPTERS_ATTR, SAVED_ATTR):  # the module's own layers: their tables and copies exist
            if hasattr(main, attr):
                gm.add_module(attr, getattr(main, attr))
        layers = {t.name: t for t in find_linear_layers(gm, {name: type(m) for name, m in model.named_modules()})}
        rotated, saved = sites
        apply_road(gm, [(layers[name], group_size) for name, group_size in rotated], [layers[n] for n in saved])
        return gm
    return sites, build
