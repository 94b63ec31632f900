"""Rewrite passes: insert a RoAd rotation after every call site of the targeted layers, remove them, and order
the rotations of several composed adapters (``rotation_orders`` says which order the active adapters need).

For a target ``model.layers.0.self_attn.q_proj`` with group size 64 the graph gains::

    table = get_attr[road_adapters.model__layers__0__self_attn__q_proj.table_g64]
    slot_map = get_attr[road_adapters.model__layers__0__self_attn__q_proj.slots_g64]
    rotated = call_function[road_rotate](linear, table, slot_map, road_index, 64)

and every former user of ``linear`` reads ``rotated``. ``road_index`` is one extra graph input shared by all
rotations (an adapter id per sample, one id for the batch, or None when adapters are disabled); the tables and
slot maps are read as attributes of the graph module, so several graphs of one model share them. The pass is
idempotent: a (layer, group size) that already has its rotation is left alone.

>>> import torch
>>> from torch import nn
>>> from fx_adapters.graph.match import find_linear_layers
>>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8)))
>>> (target,) = find_linear_layers(gm, {"0": nn.Linear})
>>> result = InsertRoadRotations([(target, 4)])(gm)
>>> [n.name for n in result.graph_module.graph.nodes]
['input_1', 'road_index', '_0', 'road_adapters_0_table_g4', 'road_adapters_0_slots_g4', 'road_rotate', 'output']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph.match import Target, layer_key
from ..graph.tags import Tag, set_tag, tag_of, tagged
from .layer import RoadLayer, slots_name
from .rotation import road_rotate, rotate_selected

ADAPTERS_ATTR = "road_adapters"
INDEX_INPUT = "road_index"


@dataclass(frozen=True)
class RotationTag(Tag):
    """A rotation of ``layer``'s output by the adapters of group size ``group_size`` (and its table read)."""

    group_size: int


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


def rotations(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, RotationTag]]:
    """Every rotation node (not its table read) with its tag, in graph order."""
    return [(node, tag) for node, tag in tagged(graph, RotationTag) if node.op == "call_function"]


def _is_rotation_of(node: torch.fx.Node, target: str) -> bool:
    tag = tag_of(node)
    return node.op == "call_function" and isinstance(tag, RotationTag) and tag.layer == target


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
                    chain.append(tag_of(end).group_size)
                if group_size in chain:
                    continue
                with graph.inserting_after(end):
                    table = graph.get_attr(table_attr)
                with graph.inserting_after(table):
                    slot_map = graph.get_attr(f"{ADAPTERS_ATTR}.{key}.{slots_name(group_size)}")
                with graph.inserting_after(slot_map):
                    rotated = graph.call_function(road_rotate, (end, table, slot_map, index, group_size))
                end.replace_all_uses_with(rotated, delete_user_cb=lambda user, new=rotated: user is not new)
                for new in (table, slot_map, rotated):
                    set_tag(new, RotationTag(target.name, group_size))
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
        for node, tag in rotations(graph):
            if (tag.layer, tag.group_size) in self.keep:
                continue
            source, table, slot_map = node.args[:3]
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            graph.erase_node(table)
            graph.erase_node(slot_map)
            layer = layers[layer_key(tag.layer)]
            layer.drop_table(tag.group_size)
            if not layer.group_sizes():
                del layers[layer_key(tag.layer)]
            modified = True
        return PassResult(graph_module, modified)


class SelectColumnsAhead(PassBase):
    """Make every rotation read columns selected ahead (``rotation.select_columns``) from a new graph input, for a
    decode loop that keeps one choice of adapters for many steps (``generation.road_step``)::

        table = get_attr[road_adapters.model__layers__0__self_attn__q_proj.table_g64]
        slot_map = get_attr[road_adapters.model__layers__0__self_attn__q_proj.slots_g64]
        rotated = call_function[road_rotate](linear, table, slot_map, road_index, 64)

    becomes::

        rotated = call_function[rotate_selected](linear, road_columns_0)

    with one input ``road_columns_<i>`` per rotation, in graph order after the other inputs. ``reads`` lists, in that
    order, each rotation's table and slot-map attributes and group size: what to select the columns from per call
    (``select_columns(table, slot_map, road_index, group_size)``). ``road_index`` stays an input (saved layers read
    it).

    >>> from fx_adapters.graph.match import find_linear_layers
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8)))
    >>> (target,) = find_linear_layers(gm, {"0": nn.Linear})
    >>> gm = InsertRoadRotations([(target, 4)])(gm).graph_module
    >>> ahead = SelectColumnsAhead()
    >>> [n.name for n in ahead(gm).graph_module.graph.nodes]
    ['input_1', 'road_index', 'road_columns_0', '_0', 'road_rotate', 'output']
    >>> ahead.reads
    [('road_adapters.0.table_g4', 'road_adapters.0.slots_g4', 4)]
    """

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str, int]] = []

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        last = index_input(graph)
        for i, (node, _) in enumerate(rotations(graph)):
            y, table, slot_map, _, group_size = node.args
            with graph.inserting_after(last):
                last = graph.placeholder(f"road_columns_{i}", default_value=None)
            node.target, node.args = rotate_selected, (y, last)
            for read in (table, slot_map):
                if not read.users:
                    graph.erase_node(read)
            self.reads.append((table.target, slot_map.target, group_size))
        return PassResult(graph_module, bool(self.reads))


class OrderRoadRotations(PassBase):
    """Reorder the rotations after each call site of the layers in ``orders`` (layer -> all its group sizes,
    in the order they are to be applied). The chain's nodes stay where they are; each takes the table and
    group size of its new place, so every user of the chain still reads its last node."""

    def __init__(self, orders: Mapping[str, Sequence[int]]):
        super().__init__()
        self.orders = {layer: list(sizes) for layer, sizes in orders.items()}

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        modified = False
        for node, tag in rotations(graph_module.graph):
            if tag.layer not in self.orders or _is_rotation_of(node.args[0], tag.layer):
                continue  # not the first rotation of a chain to reorder
            layer, chain = tag.layer, [node]
            while len(chain[-1].users) == 1 and _is_rotation_of(next(iter(chain[-1].users)), layer):
                chain.append(next(iter(chain[-1].users)))
            tables = {rotation.args[4]: rotation.args[1:3] for rotation in chain}  # group size -> (table, slot map)
            wanted = self.orders[layer]
            if sorted(wanted) != sorted(tables):
                raise ValueError(f"layer {layer!r}: cannot order its rotations of group sizes {list(tables)} as "
                                 f"{wanted}")
            if wanted == list(tables):
                continue
            for table, slot_map in tables.values():  # read every table before the chain's first rotation
                node.prepend(table)
                node.prepend(slot_map)
            for rotation, group_size in zip(chain, wanted):
                rotation.args = (rotation.args[0], *tables[group_size], rotation.args[3], group_size)
                set_tag(rotation, RotationTag(layer, group_size))
            modified = True
        return PassResult(graph_module, modified)


def rotation_orders(graph: torch.fx.Graph, names: Sequence[str], group_size: Mapping[str, int],
                    targets: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """Layer -> its rotations' group sizes in the order the composed adapters ``names`` need, for the layers whose
    graph order differs (the graph holds one rotation per layer and group size, run in graph order): what
    ``OrderRoadRotations`` is given. ``group_size``: adapter -> its group size; ``targets``: adapter -> its layers.
    Raises ``NotImplementedError`` when adapters of one group size are separated by another's on a layer.
    """
    if len(names) < 2:
        return {}
    order: dict[str, list[int]] = {}  # layer -> group sizes in graph order
    for _, tag in rotations(graph):
        if tag.group_size not in order.setdefault(tag.layer, []):
            order[tag.layer].append(tag.group_size)
    orders = {}
    for layer, sizes in order.items():
        wanted = [group_size[n] for n in names if layer in targets[n]]
        blocks = [g for i, g in enumerate(wanted) if i == 0 or wanted[i - 1] != g]
        if len(blocks) != len(set(blocks)):
            raise NotImplementedError(
                f"set_adapter({list(names)}): on layer {layer!r} these adapters use group sizes {wanted}: "
                "adapters of one group size separated by another's are not supported (the graph applies all "
                "adapters of one group size on a layer together); activate them so that adapters of equal "
                "group size are adjacent"
            )
        if blocks != [g for g in sizes if g in blocks]:
            orders[layer] = blocks + [g for g in sizes if g not in blocks]
    return orders
