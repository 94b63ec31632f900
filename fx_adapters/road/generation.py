"""RoAd's cached graphs for ``AdaptedModule.generate``: the prefill and decode graphs of the model, rewritten with
the rotations and saved layers the module's own graph applies (``captures.road_rewrite``, i.e.
``pipeline.apply_road``), reading the module's tables and copies. The loop itself is ``graph.generation``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..graph import generation
from ..graph.graph_module import read_from
from .captures import road_rewrite


def generate_road(am, input_ids: torch.Tensor, adapter_names: Sequence[str] | None = None, **options) -> torch.Tensor:
    """``AdaptedModule.generate``: the active adapter(s), or one adapter name (or ``"__base__"``) per row with
    ``adapter_names``, as ``forward``."""
    source = generation.source_of(am)
    index = am.road_input(adapter_names, generation.batch_size(input_ids))
    sites, build = road_rewrite(am.graph_module)

    def graphs(source: generation.GenerationSource) -> tuple:
        return tuple(read_from(build(gm, source.model), am.graph_module)
                     for gm in (source.captured.prefill, source.captured.decode))
    prefill, decode = source.graphs(("road", sites), graphs)
    return generation.generate(generation.graph_step(prefill, decode, (index,)), source, input_ids, **options)
