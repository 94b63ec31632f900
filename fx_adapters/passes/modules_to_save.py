"""Modules-to-save pass: route a linear layer through a ``SavedLinear`` that picks each adapter's copy.

The layer's node (a ``call_module`` of an ``nn.Linear`` or an ``aten.linear``) becomes
``call_module[saved_modules.<key>](x, weight, bias, road_index)`` with the layer's own weight and bias as
arguments, so the base layer stays where it was and fold can turn the node back into a plain linear.

>>> import torch
>>> from torch import nn
>>> from fx_adapters.passes.match import find_linear_layers
>>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2)))
>>> (target,) = find_linear_layers(gm, {"0": nn.Linear})
>>> _ = SaveLinearLayers([target])(gm)
>>> [n.op for n in gm.graph.nodes]
['placeholder', 'placeholder', 'get_attr', 'get_attr', 'call_module', 'output']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.saved_module import SavedLinear
from .match import Target
from .rewrite import index_input, layer_key

SAVED_ATTR = "saved_modules"
REPLACED = "fx_adapters_replaced"  # SavedLinear node meta: (op, target, number of args) of the node it replaced


def saved_modules(gm: torch.fx.GraphModule) -> nn.ModuleDict:
    """The ``saved_modules`` ModuleDict of a graph module (created empty if missing)."""
    if not hasattr(gm, SAVED_ATTR):
        gm.add_module(SAVED_ATTR, nn.ModuleDict())
    return getattr(gm, SAVED_ATTR)


def is_saved_call(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and (node.meta.get("fx_adapters") or ("",))[0] == "saved"


class SaveLinearLayers(PassBase):
    """Put each target (a ``linear`` layer) behind a ``SavedLinear`` node, unless it already is."""

    def __init__(self, targets: Sequence[Target]):
        super().__init__()
        self.targets = list(targets)
        self.renamed: dict[str, str] = {}  # old layer node name -> its SavedLinear node's name

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modules = saved_modules(graph_module)
        index = index_input(graph)
        nodes = {n.name: n for n in graph.nodes}
        modified = False
        for target in self.targets:
            key = layer_key(target.name)
            if key not in modules:
                modules[key] = SavedLinear()
            for name in target.nodes:
                node = nodes[name]
                if is_saved_call(node):
                    continue
                with graph.inserting_before(node):
                    if node.op == "call_module":
                        x = node.args[0]
                        weight = graph.get_attr(f"{target.name}.weight")
                        bias = graph.get_attr(f"{target.name}.bias") if target.has_bias else None
                    else:  # aten.linear(x, weight, bias=None)
                        x, weight, bias = (*node.args, None)[:3]
                    saved = graph.call_module(f"{SAVED_ATTR}.{key}", (x, weight, bias, index))
                saved.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "stack_trace")})
                saved.meta["fx_adapters"] = ("saved", target.name)
                saved.meta[REPLACED] = (node.op, node.target, len(node.args))
                node.replace_all_uses_with(saved)
                graph.erase_node(node)
                self.renamed[name] = saved.name
                modified = True
        return PassResult(graph_module, modified)


class UnsaveLinearLayers(PassBase):
    """Undo ``SaveLinearLayers`` for each target: its ``SavedLinear`` nodes become the layer nodes they replaced
    (a ``call_module`` of the layer or the ``aten.linear``) and its ``saved_modules`` entry is deleted."""

    def __init__(self, targets: Sequence[Target]):
        super().__init__()
        self.targets = list(targets)
        self.renamed: dict[str, str] = {}  # SavedLinear node name -> the restored layer node's name

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        nodes = {n.name: n for n in graph.nodes}
        modified = False
        for target in self.targets:
            for name in target.nodes:
                node = nodes[name]
                if not is_saved_call(node):
                    continue
                op, layer, n_args = node.meta[REPLACED]
                x, weight, bias = node.args[:3]
                with graph.inserting_before(node):
                    if op == "call_module":
                        restored = graph.call_module(layer, (x,))
                    else:
                        restored = graph.call_function(layer, (x, weight, bias)[:n_args])
                restored.meta.update({k: v for k, v in node.meta.items() if k not in ("fx_adapters", REPLACED)})
                node.replace_all_uses_with(restored)
                graph.erase_node(node)
                if op == "call_module":  # the weight and bias reads SaveLinearLayers added for it
                    for attr in (weight, bias):
                        if isinstance(attr, torch.fx.Node) and not attr.users:
                            graph.erase_node(attr)
                self.renamed[name] = restored.name
                modified = True
            modules = saved_modules(graph_module)
            if layer_key(target.name) in modules:
                del modules[layer_key(target.name)]
                modified = True
        return PassResult(graph_module, modified)
