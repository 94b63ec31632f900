"""Running passes, and the method-agnostic ones.

Each pass takes a ``torch.fx.GraphModule`` and returns ``PassResult(graph_module, modified)``;
``run_passes`` runs them with ``torch.fx``'s PassManager, which recompiles after each pass, lints the graph
and names the pass that failed. ``RebuildOutput`` makes a graph that returns flat leaves return the model's own
output (for ``fold``), ``PlainOutput`` turns that into built-in containers (for ``.pt2`` files), and
``DefaultAttentionMask`` makes ``attention_mask`` optional, as transformers models have it,
``LastPositionLogits`` makes a step graph's output head read the last position only and ``UnmaskedAttention`` its
attention read no mask (both for ``generate``).

>>> import torch
>>> from torch import nn
>>> from fx_adapters.graph.capture import capture
>>> captured = capture(nn.Sequential(nn.Linear(4, 2)))
>>> _ = run_passes(captured.graph_module, [RebuildOutput(captured.out_spec)])
>>> type(captured.graph_module(torch.randn(1, 4))).__name__
'Tensor'
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from .capture import Constant
from .match import find_linear_layers

INPUT_IDS, ATTENTION_MASK = "input_ids", "attention_mask"


def _lint(graph_module: torch.nn.Module) -> None:
    graph_module.graph.lint()


def run_passes(graph_module: torch.fx.GraphModule, passes: Sequence) -> PassResult:
    """Run ``passes`` in order on ``graph_module`` (in place), linting before and after each."""
    manager = PassManager(list(passes), run_checks_after_each_pass=True)
    manager.add_checks(_lint)
    return manager(graph_module)


def _keys(spec: pytree.TreeSpec, children: Sequence) -> list[str] | None:
    """The string keys of a mapping-like container's spec (a dict, a ``ModelOutput``), else None."""
    keys = spec.context
    if isinstance(keys, Sequence) and len(keys) == len(children) and all(isinstance(k, str) for k in keys):
        return list(keys)
    return None


def _dict_node(graph: torch.fx.Graph, items) -> torch.fx.Node:
    """A node building a real ``dict`` (a literal dict in the output node comes back from ``torch.export`` as
    torch.fx's ``immutable_dict``)."""
    return graph.call_function(dict, (tuple(items),))


class RebuildOutput(PassBase):
    """Make a graph that returns the flat leaves of ``out_spec`` return what the model returns, built by graph nodes:
    a transformers ``ModelOutput`` (a dataclass, e.g. ``CausalLMOutputWithPast``: ``.logits``, ``out["logits"]``,
    ``out[0]``) by calling its class with the fields as keywords, dicts, lists, tuples and namedtuples as such;
    constants baked into the spec (e.g. None) are returned as they are.

    Nodes, not a ``pytree.tree_unflatten`` in the code: the module needs no ``out_spec`` of its own and
    ``torch.export`` of it sees the model's containers. (Pickling a GraphModule re-traces its code, and torch.fx turns
    a ``ModelOutput`` it meets into a plain ``dict`` of the same tensors.)
    """

    def __init__(self, out_spec: pytree.TreeSpec):
        super().__init__()
        self.out_spec = out_spec

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        output = graph.output_node()
        leaves = iter(output.args[0])

        def build(spec: pytree.TreeSpec):
            if spec.is_leaf():
                return next(leaves)
            if spec.type is Constant:
                return spec.context
            if spec.type is type(None):
                return None
            children = tuple(build(child) for child in spec.children())
            keys = _keys(spec, children)
            if keys is not None and dataclasses.is_dataclass(spec.type):
                return graph.call_function(spec.type, (), dict(zip(keys, children)))
            if keys is not None:
                return _dict_node(graph, zip(keys, children))
            if spec.type is list:
                return graph.call_function(list, (children,))
            if hasattr(spec.type, "_fields"):  # a namedtuple
                return graph.call_function(spec.type, children)
            return children

        with graph.inserting_before(output):
            output.args = (build(self.out_spec),)
        return PassResult(graph_module, True)


class PlainOutput(PassBase):
    """Make a graph return built-in containers: each container class its output calls (as ``RebuildOutput`` builds
    them) becomes a ``dict`` of the same fields (a ``ModelOutput``) or a tuple (a namedtuple).

    ``torch.export.load`` rebuilds a ``ModelOutput`` only in a process that imported transformers (its pytree type is
    registered there); a dict, e.g. ``{"logits": ...}``, loads with torch alone.
    """

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        output = graph.output_node()
        replaced = []

        def plain(value):
            if isinstance(value, (tuple, list)):
                return type(value)(plain(v) for v in value)
            if not (isinstance(value, torch.fx.Node) and value.op == "call_function"
                    and isinstance(value.target, type) and value.target not in (dict, list)):
                return value
            replaced.append(value)
            if dataclasses.is_dataclass(value.target) or issubclass(value.target, Mapping):
                return _dict_node(graph, ((k, plain(v)) for k, v in value.kwargs.items()))
            return tuple(plain(v) for v in value.args)

        with graph.inserting_before(output):
            output.args = (plain(output.args[0]),)
        for node in replaced:  # outer containers first: they use the inner ones
            graph.erase_node(node)
        return PassResult(graph_module, bool(replaced))


class DefaultAttentionMask(PassBase):
    """Make a graph's ``attention_mask`` input optional as in transformers models: ``None`` (its default) means every
    token attends, i.e. ``torch.ones_like(input_ids)``. Graphs without both inputs are left as they are.

    The default is one torch op, not Python control flow, so it survives what re-traces the code (pickling) and
    ``torch.export``: the mask the graph reads is ``clamp(ones_like(input_ids), min=zeros, max=attention_mask)``,
    which is ``attention_mask`` itself for a 0/1 mask (any 0/1 dtype, what tokenizers return) and all ones when it is
    None (``clamp`` takes an optional ``max``). The input moves after every input without a default (Python's rule).
    """

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        inputs = {node.target: node for node in graph.find_nodes(op="placeholder")}
        ids, mask = inputs.get(INPUT_IDS), inputs.get(ATTENTION_MASK)
        if ids is None or mask is None or mask.args:
            return PassResult(graph_module, False)
        mask.args = (None,)
        order = list(inputs.values())
        later = order[order.index(mask) + 1:]
        if any(not node.args for node in later):
            later[-1].append(mask)
        first_op = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first_op):
            ones = graph.call_function(torch.ones_like, (ids,))
            zeros = graph.call_function(torch.zeros_like, (ids,))
            filled = graph.call_function(torch.clamp, (ones,), {"min": zeros, "max": mask})
        mask.replace_all_uses_with(filled, delete_user_cb=lambda user: user is not filled)
        return PassResult(graph_module, True)


class LastPositionLogits(PassBase):
    """Make the output head (``head``, a linear layer of ``module_types``) read the last position of its input only,
    in a graph whose logits only ``generate`` reads (transformers' ``generate`` passes ``logits_to_keep=1`` to a
    model for the same reason): the other positions of a prompt cost the head's whole matmul (vocabulary × hidden
    each) and their logits' memory for nothing::

        logits = call_function[aten.linear](hidden, lm_head_weight)

    becomes::

        last = call_function[aten.slice.Tensor](hidden, 1, -1, sys.maxsize)
        logits = call_function[aten.linear](last, lm_head_weight)

    Other readers of ``hidden`` keep every position. A head that is not an ``aten.linear`` call (a quantized or
    Conv1D head) is left alone: its logits stay whole (``modified`` is False).
    """

    def __init__(self, head: str | None, module_types: Mapping[str, type]):
        super().__init__()
        self.head, self.module_types = head, module_types

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        layers = {t.name: t for t in find_linear_layers(graph_module, self.module_types)}
        nodes = {n.name: n for n in graph.nodes}
        heads = [nodes[name] for name in (layers[self.head].nodes if self.head in layers else ())]
        if not heads or any(node.target != torch.ops.aten.linear.default for node in heads):
            return PassResult(graph_module, False)
        for node in heads:
            hidden = node.args[0]
            with graph.inserting_before(node):
                last = graph.call_function(torch.ops.aten.slice.Tensor, (hidden, 1, -1, sys.maxsize))
            node.replace_input_with(hidden, last)
        return PassResult(graph_module, True)


SDPA = torch.ops.aten.scaled_dot_product_attention.default


class UnmaskedAttention(PassBase):
    """Make every attention (``aten.scaled_dot_product_attention``) of a step graph read no mask, for the decode steps
    in which the mask it builds is all True: one new token per row, at the last position, with an all-ones
    ``attention_mask``, in a model whose layers all attend to the whole past (no sliding window or chunks, which the
    caller checks). transformers has SDPA skip the mask in that case too; the ops building it are gone::

        mask = … ops on attention_mask …
        out = call_function[aten.scaled_dot_product_attention](q, k, v, mask, scale=s)

    becomes::

        out = call_function[aten.scaled_dot_product_attention](q, k, v, None, scale=s)

    A graph with no attention, or one whose mask is not boolean (a float mask may carry a position bias) or that is
    causal by flag, is left alone (``modified`` is False).
    """

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        attentions = list(graph.find_nodes(op="call_function", target=SDPA))
        masks = [node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask") for node in attentions]
        boolean = all(isinstance(mask, torch.fx.Node) and getattr(mask.meta.get("val"), "dtype", None) == torch.bool
                      for mask in masks)
        causal = any(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False) for node in attentions)
        if not attentions or not boolean or causal:
            return PassResult(graph_module, False)
        for node in attentions:
            if len(node.args) > 3:
                node.args = (*node.args[:3], None, *node.args[4:])
            else:
                node.kwargs = {**node.kwargs, "attn_mask": None}
        graph.eliminate_dead_code()
        return PassResult(graph_module, True)
