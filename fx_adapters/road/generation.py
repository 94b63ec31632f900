"""RoAd's cached step graph for ``AdaptedModule.generate`` and ``forward(..., use_cache=True)``: the model's step graph
(``graph.capture_cache``), rewritten with the rotations and saved layers the module's own graph applies
(``captures.road_rewrite``, i.e. ``pipeline.apply_road``), reading the module's tables and copies. The loop itself is
``graph.generation``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..graph import generation
from ..graph.graph_module import read_from
from .captures import road_rewrite


def road_step(am, source: generation.GenerationSource, index: torch.Tensor | None) -> generation.Step:
    """The step of ``am``'s adapters, ``index`` its ``road_input`` (one adapter per prompt: repeated for beams and
    returned sequences)."""
    sites, build = road_rewrite(am.graph_module)
    graph = source.graphs("road", sites, lambda s: read_from(build(s.captured.step, s.model), am.graph_module))

    def step(inputs: tuple, cache: tuple) -> tuple[torch.Tensor, tuple]:
        rows = index
        if index is not None and index.dim() == 1:
            rows = index.repeat_interleave(inputs[0].shape[0] // index.shape[0])
        return generation.graph_step(graph, source.captured, (rows,))(inputs, cache)
    return step


def generate_road(am, *args, adapter_names: Sequence[str] | None = None, adapter_name: str | None = None,
                  **kwargs):
    """transformers' ``generate(*args, **kwargs)`` with a KV cache, with the active adapter(s), or one adapter name
    (or ``"__base__"``) per prompt with ``adapter_names``, or one for every prompt with ``adapter_name``, as
    ``forward`` (each prompt's beams and returned sequences keep its adapter)."""
    source = generation.source_of(am)
    generation.check_arguments(source, kwargs)
    index = am.road_input(adapter_names, generation.batch_size(args, kwargs), adapter_name)
    return generation.generate(road_step(am, source, index), source, am, *args, **kwargs)


def forward_road_with_cache(am, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None,
                            adapter_name: str | None):
    """``AdaptedModule.forward(*args, **kwargs)`` with ``use_cache=True``: the model's output with its KV cache, over
    the step graph ``generate`` uses (no capture of its own); ``generation.forward_with_cache``."""
    source = generation.source_of(am)
    values, flags = generation.cached_call_arguments(source, args, kwargs)
    ids = values.get("input_ids")
    index = am.road_input(adapter_names, None if ids is None else ids.shape[0], adapter_name)
    return generation.forward_with_cache(road_step(am, source, index), source, values, flags, am.training)
