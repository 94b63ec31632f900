"""Rewrite pass: insert a RoAd rotation after every call site of the targeted layers.

For a target ``model.layers.0.self_attn.q_proj`` with group size 64 the graph gains::

    table = get_attr[road_adapters.model__layers__0__self_attn__q_proj.table_g64]
    rotated = call_function[road_rotate](linear, table, road_index, 64)

and every former user of ``linear`` reads ``rotated``. ``road_index`` is one extra graph input shared by all
rotations (a slot per sample, one slot for the batch, or None when adapters are disabled). The pass is
idempotent: a (layer, group size) that already has its rotation is left alone.

>>> import torch
>>> from torch import nn
>>> from fx_adapters.passes.match import find_linear_layers
>>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8)))
>>> (target,) = find_linear_layers(gm, {"0": nn.Linear})
>>> result = InsertRoadRotations([(target, 4)])(gm)
>>> [n.name for n in result.graph_module.graph.nodes]
['input_1', 'road_index', '_0', 'road_adapters_0_table_g4', 'road_rotate', 'output']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.road_layer import RoadLayer
from ..runtime.rotation import road_rotate
from .match import Target

ADAPTERS_ATTR = "road_adapters"
INDEX_INPUT = "road_index"


def layer_key(path: str) -> str:
    """Attribute-safe key of a module path inside ``road_adapters``."""
    return path.replace(".", "__")


def road_layers(gm: torch.fx.GraphModule) -> nn.ModuleDict:
    """The ``road_adapters`` ModuleDict of a rewritten graph module (created empty if missing)."""
    if not hasattr(gm, ADAPTERS_ATTR):
        gm.add_module(ADAPTERS_ATTR, nn.ModuleDict())
    return getattr(gm, ADAPTERS_ATTR)


def index_input(graph: torch.fx.Graph) -> torch.fx.Node:
    """The ``road_index`` placeholder, appended after the model's inputs (default None) if missing."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        if node.target == INDEX_INPUT:
            return node
    with graph.inserting_after(placeholders[-1]):
        return graph.placeholder(INDEX_INPUT, default_value=None)


def _is_rotation_of(node: torch.fx.Node, target: str) -> bool:
    return node.op == "call_function" and node.meta.get("fx_adapters", (None, None))[:2] == ("road", target)


class InsertRoadRotations(PassBase):
    """Ensure each ``(target, group_size)`` in ``sites`` has its rotation after every call site."""

    def __init__(self, sites: Sequence[tuple[Target, int]]):
        super().__init__()
        self.sites = list(sites)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        layers = road_layers(graph_module)
        index = index_input(graph)
        nodes = {n.name: n for n in graph.nodes}
        modified = False
        for target, group_size in self.sites:
            key = layer_key(target.name)
            if key not in layers:
                layers[key] = RoadLayer(target.out_features)
            table_attr = f"{ADAPTERS_ATTR}.{key}.{layers[key].ensure_table(group_size)}"
            for name in target.nodes:
                end = nodes[name]
                chain = []
                while len(end.users) == 1 and _is_rotation_of(next(iter(end.users)), target.name):
                    end = next(iter(end.users))
                    chain.append(end.meta["fx_adapters"][2])
                if group_size in chain:
                    continue
                with graph.inserting_after(end):
                    table = graph.get_attr(table_attr)
                with graph.inserting_after(table):
                    rotated = graph.call_function(road_rotate, (end, table, index, group_size))
                end.replace_all_uses_with(rotated, delete_user_cb=lambda user: user is not rotated)
                for new in (table, rotated):
                    new.meta["fx_adapters"] = ("road", target.name, group_size)
                    if "nn_module_stack" in end.meta:
                        new.meta["nn_module_stack"] = end.meta["nn_module_stack"]
                    if "val" in end.meta and new is rotated:
                        new.meta["val"] = end.meta["val"]
                modified = True
        return PassResult(graph_module, modified)


class RemoveRoadRotations(PassBase):
    """Remove the rotations (and their tables) of every (layer, group size) not in ``keep``."""

    def __init__(self, keep: set[tuple[str, int]]):
        super().__init__()
        self.keep = keep

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        layers = road_layers(graph_module)
        modified = False
        for node in list(graph.nodes):
            tag = node.meta.get("fx_adapters")
            if node.op != "call_function" or not tag or tag[0] != "road" or tag[1:] in self.keep:
                continue
            source, table = node.args[0], node.args[1]
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            graph.erase_node(table)
            layer = layers[layer_key(tag[1])]
            delattr(layer, table.target.rpartition(".")[2])
            if not any(k.startswith("table_g") for k in layer._buffers):
                del layers[layer_key(tag[1])]
            modified = True
        return PassResult(graph_module, modified)


class OrderRoadRotations(PassBase):
    """Reorder the rotations after each call site of the layers in ``orders`` (layer -> all its group sizes,
    in the order they are to be applied). The chain's nodes stay where they are; each takes the table and
    group size of its new place, so every user of the chain still reads its last node."""

    def __init__(self, orders: Mapping[str, Sequence[int]]):
        super().__init__()
        self.orders = {layer: list(sizes) for layer, sizes in orders.items()}

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        modified = False
        for node in list(graph_module.graph.nodes):
            tag = node.meta.get("fx_adapters")
            if (node.op != "call_function" or not tag or tag[0] != "road" or tag[1] not in self.orders
                    or _is_rotation_of(node.args[0], tag[1])):
                continue  # not the first rotation of a chain to reorder
            layer, chain = tag[1], [node]
            while len(chain[-1].users) == 1 and _is_rotation_of(next(iter(chain[-1].users)), layer):
                chain.append(next(iter(chain[-1].users)))
            tables = {rotation.args[3]: rotation.args[1] for rotation in chain}
            wanted = self.orders[layer]
            if sorted(wanted) != sorted(tables):
                raise ValueError(f"layer {layer!r}: cannot order its rotations of group sizes {list(tables)} as "
                                 f"{wanted}")
            if wanted == list(tables):
                continue
            for table in tables.values():  # read every table before the chain's first rotation
                node.prepend(table)
            for rotation, group_size in zip(chain, wanted):
                rotation.args = (rotation.args[0], tables[group_size], rotation.args[2], group_size)
                rotation.meta["fx_adapters"] = ("road", layer, group_size)
            modified = True
        return PassResult(graph_module, modified)
