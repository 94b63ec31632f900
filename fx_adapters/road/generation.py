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


def generate_road(am, *args, adapter_names: Sequence[str] | None = None, adapter_name: str | None = None,
                 **kwargs):
    """``AdaptedModule.generate``: transformers' ``generate(*args, **kwargs)`` with the active adapter(s), or one
    adapter name (or ``"__base__"``) per prompt with ``adapter_names``, or one for every prompt with ``adapter_name``,
    as ``forward`` (each prompt's beams and returned sequences keep its adapter)."""
    source = generation.source_of(am)
    generation.check_arguments(source, kwargs)
    index = am.road_input(adapter_names, generation.batch_size(args, kwargs), adapter_name)
    sites, build = road_rewrite(am.graph_module)

    def graphs(source: generation.GenerationSource) -> tuple:
        return tuple(read_from(build(gm, source.model), am.graph_module)
                     for gm in (source.captured.prefill, source.captured.decode))
    prefill, decode = source.graphs(("road", sites), graphs)

    def step(inputs: tuple, cache: tuple) -> tuple[torch.Tensor, tuple]:  # beams and sequences repeat each row
        rows = index
        if index is not None and index.dim() == 1:
            rows = index.repeat_interleave(inputs[0].shape[0] // index.shape[0])
        return generation.graph_step(prefill, decode, (rows,))(inputs, cache)
    return generation.generate(step, source, am, *args, **kwargs)
