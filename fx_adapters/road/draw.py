"""``AdaptedModule.draw``: one adapted layer's neighbourhood in the graph, before and after the RoAd rewrite, side by
side in one picture (``fx_adapters.graph.draw``; needs pydot, and graphviz's ``dot`` for ``.svg`` / ``.png``).

After: the layer (its ``linear``), the ``road_rotate`` node after it, the ``table_g*`` and slot-map attributes it
reads and the ``road_index`` input, with the nodes one step around them. Before: the same nodes with the rotations
taken out, i.e. the captured model's graph there (the rewrite works in place, so "before" is rebuilt from "after").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..graph.draw import drop_unused_inputs, extract, neighbourhood, render
from ..graph.match import Target
from .rewrite import rotations

BEFORE, AFTER = "before the rewrite (the captured model)", "after the rewrite (RoAd)"


def layer_views(graph_module: torch.fx.GraphModule, targets: Sequence[Target], layer: str | None = None, *,
                hops: int = 1, where: str = "draw") -> dict[str, torch.fx.GraphModule]:
    """``{BEFORE: ..., AFTER: ...}``: the neighbourhood of ``layer``'s call sites (default: the first adapted layer)
    as two small GraphModules (for drawing; they read ``graph_module``'s tensors)."""
    target = _target(targets, layer, where)
    nodes = {n.name: n for n in graph_module.graph.nodes}
    after = extract(graph_module, neighbourhood(graph_module.graph, [nodes[n] for n in target.nodes], hops))
    before = extract(after, list(after.graph.nodes)[:-1])  # a second copy of the same nodes
    for node, _ in reversed(rotations(before.graph)):  # road_rotate(y, table, slot map, road_index, g) -> y
        attributes = [n for n in node.all_input_nodes if n.op == "get_attr"]  # the table and the slot map
        node.replace_all_uses_with(node.args[0])
        before.graph.erase_node(node)
        for attribute in attributes:
            if not attribute.users:
                before.graph.erase_node(attribute)
    return {BEFORE: drop_unused_inputs(before), AFTER: after}


def draw_layer(graph_module: torch.fx.GraphModule, targets: Sequence[Target], path: str | Path,
               layer: str | None = None, title: str | None = None) -> Path:
    """Draw ``layer_views`` side by side at ``path`` (``.svg``, ``.png``, ``.pdf`` or ``.dot``); returns the path."""
    views = layer_views(graph_module, targets, layer)
    name = _target(targets, layer, "draw").name
    return render(views, path, title or f"RoAd on {name}: before and after the rewrite", "draw")


def draw_adapted(am, path: str | Path, layer: str | None = None) -> Path:
    """Draw ``layer`` (a module path of ``am.targets``; default: the first) before and after the rewrite, side by
    side, at ``path``: ``.svg``, ``.png`` or ``.pdf`` (graphviz's ``dot`` program needed) or ``.dot``; returns the
    path. Needs pydot (``pip install "fx-adapters[graph]"``); changes nothing in ``am``."""
    return draw_layer(am.graph_module, am.targets, path, layer)


def _target(targets: Sequence[Target], layer: str | None, where: str) -> Target:
    if not targets:
        raise ValueError(f"{where}: no layer carries an adapter; add one first")
    if layer is None:
        return targets[0]
    found = [t for t in targets if t.name == layer]
    if not found:
        names = [t.name for t in targets]
        raise ValueError(f"{where}: layer {layer!r} carries no adapter; pass one of the adapted layers, e.g. "
                         f"{', '.join(map(repr, names[:3]))}{' …' if len(names) > 3 else ''} (am.targets)")
    return found[0]
