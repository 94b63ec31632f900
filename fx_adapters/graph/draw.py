"""Drawing parts of a graph: the neighbourhood of a layer's call sites as a small GraphModule of its own, and
several such GraphModules side by side in one picture (``torch.fx``'s ``FxGraphDrawer``; needs pydot, the ``graph``
extra, and for ``.svg`` / ``.png`` / ``.pdf`` graphviz's ``dot`` program; ``.dot`` needs no graphviz).

>>> import torch
>>> from torch import nn
>>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh()))
>>> nodes = {n.name: n for n in gm.graph.nodes}
>>> [n.name for n in neighbourhood(gm.graph, [nodes["_2"]])]
['_1', '_2', '_3']
>>> [(n.op, n.name) for n in extract(gm, neighbourhood(gm.graph, [nodes["_2"]])).graph.nodes]
[('placeholder', '_0'), ('call_module', '_1'), ('call_module', '_2'), ('call_module', '_3'), ('output', 'output')]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..figures import check_path, require_pydot
from .tags import is_tagged

DRAWING_SUFFIXES = (".svg", ".png", ".pdf", ".dot")
LEAVES = ("placeholder", "get_attr", "output")  # drawn when reached, never expanded


def neighbourhood(graph: torch.fx.Graph, centre: Iterable[torch.fx.Node], hops: int = 1) -> list[torch.fx.Node]:
    """The nodes within ``hops`` edges of ``centre`` (either direction), in graph order. Stepping onto a node a
    method inserted (a tagged node) is free, so an adapter's nodes come whole; inputs, attributes and the output
    are reached but not expanded (an input every adapted layer reads does not pull in the whole graph)."""
    distance = {node: 0 for node in centre}
    frontier = list(distance)
    while frontier:
        node = frontier.pop(0)
        if node.op in LEAVES and distance[node] > 0:
            continue
        for other in (*node.all_input_nodes, *node.users):
            d = distance[node] + (0 if is_tagged(other) else 1)
            if d <= hops and d < distance.get(other, hops + 1):
                distance[other] = d
                frontier.append(other)
    return [node for node in graph.nodes if node in distance]


def extract(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node]) -> torch.fx.GraphModule:
    """``nodes`` (of ``gm``'s graph, in graph order) as a GraphModule of their own: values they read from other nodes
    become inputs of that name, values other nodes read become its outputs. It reads ``gm``'s attributes (shared,
    not copied); for drawing, not for running."""
    graph = torch.fx.Graph()
    kept, env = set(nodes), {}

    def value(arg: torch.fx.Node) -> torch.fx.Node:
        if arg not in env and arg.op == "get_attr":  # an attribute stays one
            env[arg] = graph.node_copy(arg)
        elif arg not in env:  # any other value read from outside: an input named after the node it stands for
            env[arg] = graph.placeholder(arg.name)
            env[arg].meta = dict(arg.meta)
        return env[arg]

    outputs = []
    for node in nodes:
        if node.op == "output":
            outputs.extend(value(a) for a in node.all_input_nodes)
            continue
        if node.op == "placeholder":  # an input (without its default value, which drawing does not need)
            value(node)
            continue
        for arg in node.all_input_nodes:
            if arg not in kept:
                value(arg)
        env[node] = graph.node_copy(node, value)
        if any(user not in kept for user in node.users):
            outputs.append(env[node])
    graph.output(tuple(outputs))
    return torch.fx.GraphModule(gm, graph)


def drop_unused_inputs(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Erase the inputs nothing reads (after nodes were taken out of an ``extract``ed graph); returns ``gm``."""
    for node in [n for n in gm.graph.nodes if n.op == "placeholder" and not n.users]:
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def render(panels: Mapping[str, torch.fx.GraphModule], path: str | Path, title: str, where: str) -> Path:
    """Draw each GraphModule of ``panels`` (caption → module) as a box of its own, side by side, in one picture at
    ``path`` (format from the suffix: ``.svg``, ``.png``, ``.pdf``, or graphviz's source ``.dot``). ``where`` names
    the caller in errors (raised before anything is written)."""
    path = check_path(path, DRAWING_SUFFIXES, where)
    require_pydot(where, binary=path.suffix.lower() != ".dot")
    import pydot
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    picture = pydot.Dot("fx_adapters", graph_type="digraph", rankdir="TB", label=title, labelloc="t", fontsize="16")
    for i, (caption, gm) in enumerate(panels.items()):
        drawn = FxGraphDrawer(gm, f"panel{i}", skip_node_names_in_args=False).get_main_dot_graph()
        box = pydot.Cluster(f"panel{i}", label=caption, fontsize="14", style="rounded", color="gray50")
        prefix = f"p{i}_"
        for node in drawn.get_nodes():
            if node.get_name().strip('"') not in ("node", "edge", "graph"):
                box.add_node(pydot.Node(_named(prefix, node.get_name()), **node.get_attributes()))
        for edge in drawn.get_edges():
            box.add_edge(pydot.Edge(_named(prefix, edge.get_source()), _named(prefix, edge.get_destination())))
        picture.add_subgraph(box)
    if path.suffix.lower() == ".dot":
        path.write_text(picture.to_string())
    else:
        path.write_bytes(picture.create(format=path.suffix.lower()[1:]))
    return path


def _named(prefix: str, name: str) -> str:
    return f'"{prefix}{name.strip(chr(34))}"'
