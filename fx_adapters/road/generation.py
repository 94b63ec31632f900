"""RoAd's cached step graph for ``AdaptedModule.generate`` and ``forward(..., use_cache=True)``: the model's step graph
(``graph.capture_cache``), rewritten with the rotations and saved layers the module's own graph applies
(``captures.road_rewrite``, i.e. ``pipeline.apply_road``), reading the module's tables and copies. The loop itself is
``graph.generation``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import torch

from ..graph import generation
from ..graph.graph_module import read_from
from ..graph.passes import run_passes
from .captures import road_rewrite
from .rewrite import SelectColumnsAhead
from .rotation import select_columns


def road_step(am, source: generation.GenerationSource, index: torch.Tensor | None, last_logits: bool = False
              ) -> generation.Step:
    """The step of ``am``'s adapters, ``index`` its ``road_input`` (one adapter per prompt: repeated for beams and
    returned sequences), with the logits of the last position only if ``last_logits`` (for ``generate``, which also
    runs the decode steps of unpadded rows with no attention mask: ``generation.unmasked_twin``). Each rotation's
    columns are selected once per call and batch size (``rewrite.SelectColumnsAhead``), not at every step.
    """
    sites, build = road_rewrite(am.graph_module)

    def built(s: generation.GenerationSource):
        captured = s.last_logits_step() if last_logits else s.captured.step
        graph, reads = _columns_ahead(read_from(build(captured, s.model), am.graph_module))
        return generation.StepGraphs.of(graph, am.graph_module, s.model if last_logits else None), reads
    graphs, reads = source.graphs("road_generate" if last_logits else "road", sites, built)
    steps: dict[int, generation.Step] = {}  # batch size -> the graph's step with road_index and the columns

    def step(inputs: tuple, cache: list) -> tuple[torch.Tensor, tuple]:
        batch = inputs[0].shape[0]
        if batch not in steps:
            rows = index
            if index is not None and index.dim() == 1:
                rows = index.repeat_interleave(batch // index.shape[0])
            tables = graphs.graph  # the twin reads the same tables
            columns = (select_columns(attrgetter(table)(tables), attrgetter(slot_map)(tables), rows, group_size)
                       for table, slot_map, group_size in reads)
            steps[batch] = generation.graph_step(graphs, source.captured, (rows, *columns))
        return steps[batch](inputs, cache)
    return step


def _columns_ahead(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[tuple[str, str, int]]]:
    ahead = SelectColumnsAhead()
    return run_passes(gm, [ahead]).graph_module, ahead.reads


def generate_road(am, *args, adapter_names: Sequence[str] | None = None, adapter_name: str | None = None,
                  **kwargs):
    """transformers' ``generate(*args, **kwargs)`` with a KV cache, with the active adapter(s), or one adapter name
    (or ``"__base__"``) per prompt with ``adapter_names``, or one for every prompt with ``adapter_name``, as
    ``forward`` (each prompt's beams and returned sequences keep its adapter)."""
    source = generation.source_of(am)
    generation.check_arguments(source, kwargs)
    index = am.road_input(adapter_names, generation.batch_size(args, kwargs), adapter_name)
    return generation.generate(road_step(am, source, index, last_logits=True), source, am, *args, **kwargs)


def forward_road_with_cache(am, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None,
                            adapter_name: str | None):
    """``AdaptedModule.forward(*args, **kwargs)`` with ``use_cache=True``: the model's output with its KV cache, over
    the step graph ``generate`` uses (no capture of its own); ``generation.forward_with_cache``."""
    source = generation.source_of(am)
    values, flags = generation.cached_call_arguments(source, args, kwargs)
    ids = values.get("input_ids")
    index = am.road_input(adapter_names, None if ids is None else ids.shape[0], adapter_name)
    return generation.forward_with_cache(road_step(am, source, index), source, values, flags, am.training)
