"""X-LoRA on cached graphs: the scaling pass gets a KV cache of its own.

``TwoPassGraph`` on a graph of ``capture_with_cache`` copies the cache inputs' users into both passes, so both would
read one past cache and only the real pass's new cache would be returned. ``ScalingPassCache`` (run right after
``TwoPassGraph``, before ``InsertXLoraExperts``) gives the scaling pass its own past-cache placeholders
``xlora_scaling_<name>``, placed right after the model's cache inputs, and returns its new cache after the scalings::

    inputs:  (*model inputs, *cache, *xlora_scaling_cache, *X-LoRA inputs)
    outputs: (logits, *cache, scalings, *scaling cache)

Both passes are causal and the classifier scores each position on its own, so the scaling pass's cache holds
exactly what re-running the scaling pass on the whole sequence would compute for the past positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .xlora import SCALING, TAG

PREFIX = "xlora_scaling_"


def _pass_of(node: torch.fx.Node) -> str | None:
    return node.meta.get(TAG, (None, None))[0]


class ScalingPassCache(PassBase):
    """See the module docstring. ``cache_names``: the cache placeholders (none in a prefill graph); ``n_cache``: how
    many cache tensors follow the logits in the model's outputs."""

    def __init__(self, cache_names: Sequence[str], n_cache: int):
        super().__init__()
        self.cache_names, self.n_cache = tuple(cache_names), n_cache

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        output = graph.output_node()
        logits, *cache, scalings = output.args[0]
        if len(cache) != self.n_cache:
            raise RuntimeError(f"xlora cache: expected outputs (logits, {self.n_cache} cache tensors, scalings), got "
                               f"{len(cache) + 2}; run ScalingPassCache right after TwoPassGraph on a cached graph")
        scaling_nodes = {n.meta[TAG][1]: n for n in graph.nodes if _pass_of(n) == SCALING}
        missing = [n.name for n in cache if n.meta.get(TAG, (None, None))[1] not in scaling_nodes]
        if missing:
            raise RuntimeError(f"xlora cache: the scaling pass does not compute cache outputs {missing[:3]}; the "
                               "classifier's input must depend on every layer's keys and values")
        placeholders = {n.target: n for n in graph.find_nodes(op="placeholder")}
        last = placeholders[self.cache_names[-1]] if self.cache_names else None
        for name in self.cache_names:
            with graph.inserting_after(last):
                last = graph.placeholder(PREFIX + name)
            last.meta = dict(placeholders[name].meta)
            placeholders[name].replace_all_uses_with(last, delete_user_cb=lambda user: _pass_of(user) == SCALING)
        output.args = ((logits, *cache, scalings, *(scaling_nodes[n.meta[TAG][1]] for n in cache)),)
        return PassResult(graph_module, True)
