"""RoAd's cached graphs for ``AdaptedModule.generate``: the prefill and decode graphs of the model, rewritten with
the rotations and saved layers the module's own graph applies (``pipeline.apply_road``), reading the module's
tables and copies. The loop itself is ``graph.generation``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..graph import generation
from ..graph.graph_module import copy_graph_module, read_from
from ..graph.match import find_linear_layers
from ..graph.tags import tagged
from .modules_to_save import SAVED_ATTR, SavedTag
from .pipeline import apply_road
from .rewrite import ADAPTERS_ATTR, rotations


def _road_sites(gm: torch.fx.GraphModule) -> tuple[tuple, tuple]:
    """What a RoAd graph applies: ((layer, group size) rotations, in graph order per layer; saved layers)."""
    rotated, saved = [], []
    for _, tag in rotations(gm.graph):
        if (tag.layer, tag.group_size) not in rotated:
            rotated.append((tag.layer, tag.group_size))
    for _, tag in tagged(gm.graph, SavedTag):
        if tag.layer not in saved:
            saved.append(tag.layer)
    return tuple(rotated), tuple(saved)


def _road_graphs(am, rotated: tuple, saved: tuple) -> Callable[[generation.GenerationSource], tuple]:
    def build(source: generation.GenerationSource) -> tuple:
        types, built = generation.module_types(source.model), []
        for graph_module in (source.captured.prefill, source.captured.decode):
            gm = copy_graph_module(graph_module)
            for attr in (ADAPTERS_ATTR, SAVED_ATTR):  # the module's own layers: their tables and copies exist
                if hasattr(am.graph_module, attr):
                    gm.add_module(attr, getattr(am.graph_module, attr))
            layers = {t.name: t for t in find_linear_layers(gm, types)}
            apply_road(gm, [(layers[name], group_size) for name, group_size in rotated], [layers[n] for n in saved])
            built.append(read_from(gm, am.graph_module))
        return tuple(built)
    return build


def generate_road(am, input_ids: torch.Tensor, adapter_names: Sequence[str] | None = None,
                  adapter_name: str | None = None, **options) -> torch.Tensor:
    """``AdaptedModule.generate``: the active adapter(s), or one adapter name (or ``"__base__"``) per row with
    ``adapter_names``, or one for every row with ``adapter_name``, as ``forward``."""
    source = generation.source_of(am)
    index = am.road_input(adapter_names, generation.batch_size(input_ids), adapter_name)
    sites = _road_sites(am.graph_module)
    prefill, decode = source.graphs(("road", sites), _road_graphs(am, *sites))
    return generation.generate(generation.graph_step(prefill, decode, (index,)), source, input_ids, **options)
