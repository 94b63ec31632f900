"""The graph of a multi-adapter ``.pt2`` (``fxa.export(am, path, mixed_batch=True)``): the unmerged graph serving
every adapter, selected per sample by an ``adapter_ids`` input.

From the module's graph (a copy; the module is untouched):

- the ``road_index`` input becomes ``adapter_ids``, a ``(batch,)`` integer tensor: 0 = ``__base__``, then the
  adapters in ``am.adapters`` order (the module's own ids, which reuse deleted adapters' ids, are renumbered);
- a bounds check in the graph: an id outside ``[0, len(mapping))`` raises
  ``RuntimeError: adapter_ids out of range …`` instead of reading another row;
- each layer's tables ``road_adapters.<layer>.table_g<g>`` and slot maps ``road_adapters.<layer>.slots_g<g>``
  (``adapter_ids`` -> row) become persistent buffers of the program; ``attention_mask`` becomes optional (all ones,
  as in the model: ``export`` leaves it out of the program when examples leave it out) and the output becomes plain
  containers (``{"logits": ...}``).

Overwriting one adapter's rows in a loaded program (new columns ``(2, out)``, e.g. from ``am.folds(name)``)::

    row = int(m.get_buffer(f"road_adapters.{layer}.slots_g{g}")[adapter_id])
    m.get_buffer(f"road_adapters.{layer}.table_g{g}")[row] = cols
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..graph.graph_module import copy_graph_module
from ..graph.passes import DefaultAttentionMask, PlainOutput, RebuildOutput, run_passes
from .config import BASE
from .rewrite import ADAPTERS_ATTR, INDEX_INPUT, road_layers

ADAPTER_IDS = "adapter_ids"  # the multi-adapter program's input: one id per sample
MAPPING_FILE = "adapters.json"  # the extra file of the .pt2 holding {"__base__": 0, name: id, ...}


def mixed_batch_graph(gm: torch.fx.GraphModule, out_spec, adapters: Sequence[str], ids: Mapping[str, int],
                      merged: Sequence[str], saved: Mapping[str, Sequence[str]]
                      ) -> tuple[torch.fx.GraphModule, dict[str, int]]:
    """A copy of ``gm`` serving ``adapters`` by ``adapter_ids`` (see the module docstring), and its id mapping.

    ``ids``: adapter -> the module's own id; ``merged``: the merged adapters (refused); ``saved``: adapter -> the
    layers it keeps a ``modules_to_save`` copy of (refused: their per-sample selection loops in Python).
    """
    if not adapters:
        raise ValueError("export(mixed_batch=True): the module has no adapter; add_adapter or load_adapter first "
                         "(a model without adapters is exported with fxa.export(am.fold(), path))")
    if merged:
        raise ValueError(f"export(mixed_batch=True): adapters {list(merged)} are merged into the weights; call "
                         "am.unmerge() first (the multi-adapter program applies every adapter to the base weights)")
    savers = [name for name in adapters if saved.get(name)]
    if savers:
        raise ValueError(f"export(mixed_batch=True): adapters {savers} have modules_to_save, which a multi-adapter "
                         "program cannot select per sample; export each of them folded: fxa.export(am.fold(name), "
                         "path)")
    mapping = {BASE: 0, **{name: i for i, name in enumerate(adapters, start=1)}}
    order = torch.tensor([0, *(ids[name] for name in adapters)])
    mixed = copy_graph_module(gm)
    tables = nn.ModuleDict()
    for key, layer in road_layers(gm).items():
        holder = tables[key] = nn.Module()
        for group_size in layer.group_sizes():
            table, slot_map = layer.table(group_size).detach(), layer.slot_map(group_size)
            holder.register_buffer(f"table_g{group_size}", table.clone())
            holder.register_buffer(f"slots_g{group_size}", slot_map.index_select(0, order.to(slot_map.device)))
    setattr(mixed, ADAPTERS_ATTR, tables)
    graph = mixed.graph
    (index,) = [n for n in graph.nodes if n.op == "placeholder" and n.target == INDEX_INPUT]
    with graph.inserting_after(index):
        adapter_ids = graph.placeholder(ADAPTER_IDS)
    index.replace_all_uses_with(adapter_ids)
    graph.erase_node(index)
    with graph.inserting_before(adapter_ids.next):  # nodes inserted before one anchor keep their order
        low = graph.call_function(torch.ge, (adapter_ids, 0))
        high = graph.call_function(torch.lt, (adapter_ids, len(mapping)))
        inside = graph.call_function(torch.all, (graph.call_function(torch.logical_and, (low, high)),))
        graph.call_function(torch._assert_async, (inside, f"adapter_ids out of range: every id must be in [0, "
                                                          f"{len(mapping)}) (0 = {BASE}, then the adapters of "
                                                          f"{MAPPING_FILE})"))
    run_passes(mixed, [DefaultAttentionMask(), RebuildOutput(out_spec), PlainOutput()])
    return mixed, mapping
