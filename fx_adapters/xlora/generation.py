"""X-LoRA's cached graphs for ``XLoraModule.generate``: the prefill and decode graphs of the model, rewritten by
``passes.xlora_passes`` with a KV cache for each pass (``ScalingPassCache``), so every step runs the scaling pass,
the classifier and the real pass on the new token only, where PEFT re-runs both passes on the whole sequence.
``xlora_step`` is the step transformers' ``generate`` runs through ``graph.generation``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..graph import generation
from ..graph.graph_module import copy_graph_module, read_from
from ..graph.match import find_embedding_layers, find_linear_layers, layer_key, output_head
from ..graph.passes import run_passes
from .passes import EXPERTS_ATTR, xlora_passes


def _xlora_graphs(xm) -> Callable[[generation.GenerationSource], tuple]:
    def build(source: generation.GenerationSource) -> tuple:
        captured, types = source.captured, generation.module_types(source.model)
        experts = getattr(xm.graph_module, EXPERTS_ATTR)
        built = []
        for graph_module, cache_names in ((captured.prefill, ()), (captured.decode, captured.cache_names)):
            gm = copy_graph_module(graph_module)
            layers = {t.name: t for t in (*find_linear_layers(gm, types), *find_embedding_layers(gm, types))}
            stacked = {layers[t.name]: (i, experts[layer_key(t.name)]) for i, t in enumerate(xm.targets)}
            run_passes(gm, xlora_passes(layers[output_head(source.model)].nodes[0], xm.classifier, stacked,
                                        cache=(cache_names, len(captured.cache_names))))
            built.append(read_from(gm, xm.graph_module))
        return tuple(built)
    return build


def xlora_step(xm, source: generation.GenerationSource) -> generation.Step:
    """The step ``generate`` runs: both passes on the new tokens with their caches. Its flat cache is the scaling
    pass's, then the real pass's, then the scalings of every position so far twice (a ``DynamicCache`` layer of
    its own, so beam search reorders them with the caches); each step records them as the latest scalings."""
    prefill, decode = source.graphs("xlora", _xlora_graphs(xm))
    n = len(source.captured.cache_names)
    extra = xm.graph_inputs()

    def step(inputs: tuple, cache: tuple) -> tuple[torch.Tensor, tuple]:
        logits, *out = (decode if cache else prefill)(*inputs, *cache[:2 * n], *extra)
        scalings = torch.cat([cache[2 * n], out[n]], dim=1) if cache else out[n]
        xm.record_scalings(scalings)
        return logits, (*out[:n], *out[n + 1:], scalings, scalings)
    return step


def generate_xlora(xm, *args, **kwargs):
    """``XLoraModule.generate``: transformers' ``generate(*args, **kwargs)`` with both passes cached; afterwards
    ``get_latest_scalings()`` holds the scalings of every position the last step saw, ``(batch, prompt + new - 1,
    n_layers, n_experts)`` as PEFT's, and each step is logged while logging is on. With adapters disabled it
    generates with the base model."""
    source = generation.source_of(xm)
    generation.check_arguments(source, kwargs)
    generation.batch_size(args, kwargs)
    step = generation.base_step(xm, source) if xm.adapters_disabled else xlora_step(xm, source)
    return generation.generate(step, source, xm, *args, **kwargs)
