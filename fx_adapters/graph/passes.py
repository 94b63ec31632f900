"""Running passes, and the method-agnostic ones.

Each pass takes a ``torch.fx.GraphModule`` and returns ``PassResult(graph_module, modified)``;
``run_passes`` runs them with ``torch.fx``'s PassManager, which recompiles after each pass, lints the graph
and names the pass that failed. ``PlainOutput`` makes a graph return built-in containers (for ``fold`` and
``.pt2`` files).

>>> import torch
>>> from torch import nn
>>> from fx_adapters.graph.capture import capture
>>> captured = capture(nn.Sequential(nn.Linear(4, 2)))
>>> _ = run_passes(captured.graph_module, [PlainOutput(captured.out_spec)])
>>> type(captured.graph_module(torch.randn(1, 4))).__name__
'Tensor'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils._pytree as pytree
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from .capture import Constant


def _lint(graph_module: torch.nn.Module) -> None:
    graph_module.graph.lint()


def run_passes(graph_module: torch.fx.GraphModule, passes: Sequence) -> PassResult:
    """Run ``passes`` in order on ``graph_module`` (in place), linting before and after each."""
    manager = PassManager(list(passes), run_checks_after_each_pass=True)
    manager.add_checks(_lint)
    return manager(graph_module)


class PlainOutput(PassBase):
    """Make a graph that returns the flat leaves of ``out_spec`` return them in built-in containers.

    ``torch.export.load`` cannot rebuild a transformers ``ModelOutput``, so: mappings (a ``ModelOutput``, a
    dict: any container whose pytree context is its keys) become dicts, e.g. ``{"logits": ...}``; lists stay
    lists; other containers (tuples, namedtuples, …) become tuples; constants baked into the spec (e.g. None)
    are returned as they are. Dicts and lists are built by graph nodes so that the module, its pickle and
    its ``torch.export`` all return a real ``dict``/``list`` (a literal dict in the output node comes back
    from ``torch.export`` as torch.fx's ``immutable_dict``).
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
            keys = spec.context
            if isinstance(keys, Sequence) and len(keys) == len(children) and all(isinstance(k, str) for k in keys):
                return graph.call_function(dict, (tuple(zip(keys, children)),))
            return graph.call_function(list, (children,)) if spec.type is list else children

        with graph.inserting_before(output):
            output.args = (build(self.out_spec),)
        return PassResult(graph_module, True)
