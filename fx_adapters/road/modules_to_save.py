"""PEFT's ``modules_to_save`` for a linear layer, as one graph node: ``SavedLinear`` and the passes that route a
layer through it and back.

Each adapter that lists the layer in ``modules_to_save`` gets its own trainable copy of the weight and bias.
The layer's node (a ``call_module`` of an ``nn.Linear`` or an ``aten.linear``) becomes
``call_module[saved_modules.<key>](x, weight, bias, road_index)`` with the layer's own (frozen) weight and bias
as arguments, so the base layer stays where it was and fold can turn the node back into a plain linear. The
slot in ``road_index`` picks the copy (slot 0, ``__base__``, disabled adapters and adapters without a copy use
the layer itself). A mixed batch runs each copy present in the batch on its samples, as PEFT does.

>>> import torch
>>> from torch import nn
>>> from fx_adapters.graph.match import find_linear_layers
>>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2)))
>>> (target,) = find_linear_layers(gm, {"0": nn.Linear})
>>> _ = SaveLinearLayers([target])(gm)
>>> [n.op for n in gm.graph.nodes]
['placeholder', 'placeholder', 'get_attr', 'get_attr', 'call_module', 'output']
>>> layer = SavedLinear()
>>> w, b = torch.ones(2, 3), torch.zeros(2)
>>> layer.add_copy("a", w, b)
>>> layer.set_slot(1, "a")
>>> with torch.no_grad():
...     _ = layer.weight["a"].mul_(2)
>>> x = torch.ones(2, 3)
>>> layer(x, w, b, torch.tensor([1, 0])).tolist()
[[6.0, 6.0], [3.0, 3.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.nn import functional as F

from ..graph.match import Target, layer_key
from ..graph.tags import TAG_KEY, Tag, is_tagged, set_tag, tag_of
from .rewrite import index_input

SAVED_ATTR = "saved_modules"


@dataclass(frozen=True)
class SavedTag(Tag):
    """A ``SavedLinear`` node of ``layer``; ``replaced`` is ``(op, target, number of args)`` of the node it replaced."""

    replaced: tuple


class SavedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        self.by_slot: dict[int, str] = {}

    def add_copy(self, adapter: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """A trainable copy of the layer's weight (and bias) for ``adapter``."""
        self.weight[adapter] = nn.Parameter(weight.detach().clone())
        if bias is not None:
            self.bias[adapter] = nn.Parameter(bias.detach().clone())

    def remove_copy(self, adapter: str) -> None:
        del self.weight[adapter]
        if adapter in self.bias:
            del self.bias[adapter]

    def set_slot(self, adapter_id: int, adapter: str) -> None:
        """Adapter id ``adapter_id`` (``road_index``) selects ``adapter``'s copy (ids without one use the layer)."""
        self.by_slot[adapter_id] = adapter

    def clear_slot(self, adapter_id: int) -> None:
        self.by_slot.pop(adapter_id, None)

    def _params(self, name: str | None, weight, bias):
        if name is None:
            return weight, bias
        return self.weight[name], self.bias[name] if bias is not None else None

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                index: torch.Tensor | None) -> torch.Tensor:
        if index is None or index.dim() == 0:
            name = None if index is None else self.by_slot.get(int(index))
            return F.linear(x, *self._params(name, weight, bias))
        out = F.linear(x, weight, bias)
        rows_in = x.reshape(index.shape[0], -1, x.shape[-1])  # batch-major, like road_rotate
        rows_out = out.view(index.shape[0], -1, out.shape[-1])
        for slot in index.unique().tolist():  # the ids in the batch, not every adapter
            name = self.by_slot.get(slot)
            if name is not None:
                picked = index == slot
                rows_out[picked] = F.linear(rows_in[picked], *self._params(name, weight, bias))
        return out


def saved_modules(gm: torch.fx.GraphModule) -> nn.ModuleDict:
    """The ``saved_modules`` ModuleDict of a graph module (created empty if missing)."""
    if not hasattr(gm, SAVED_ATTR):
        gm.add_module(SAVED_ATTR, nn.ModuleDict())
    return getattr(gm, SAVED_ATTR)


def is_saved_call(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and is_tagged(node, SavedTag)


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
                kept = ("nn_module_stack", "val", "stack_trace")
                saved.meta.update({k: v for k, v in node.meta.items() if k in kept})
                set_tag(saved, SavedTag(target.name, (node.op, node.target, len(node.args))))
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
                op, layer, n_args = tag_of(node).replaced
                x, weight, bias = node.args[:3]
                with graph.inserting_before(node):
                    if op == "call_module":
                        restored = graph.call_module(layer, (x,))
                    else:
                        restored = graph.call_function(layer, (x, weight, bias)[:n_args])
                restored.meta.update({k: v for k, v in node.meta.items() if k != TAG_KEY})
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
