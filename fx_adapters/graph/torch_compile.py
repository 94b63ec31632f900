"""Opt-in ``torch.compile`` of a compiled module's rewritten graph: ``am.compile()`` / ``xm.compile()``.

Only the emitted GraphModule is handed to ``torch.compile``; the adapter bookkeeping around it (which slot each
sample reads, refreshing the column tables, X-LoRA's settings) stays in Python, so ``set_adapter``, mixed batches,
loads and merges behave as without it. The graph is compiled at the first call after ``compile()`` and again
after a rewrite changed it (an adapter on new layers, ``delete_adapter``, a new composition order). Copies and
pickles keep the options, not the compiled code.

>>> import torch, fx_adapters as fxa
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules=["0"], init_weights=False))
>>> x = torch.randn(3, 4)
>>> eager = am(x)
>>> am.compile(backend="aot_eager")       # any torch.compile options; the default (inductor) works on CPU
>>> torch.allclose(am(x), eager, atol=1e-6)
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["CompileMixin", "CompiledGraph"]


class CompiledGraph:
    """``torch.compile(gm, **options)``, compiled again whenever ``gm``'s generated code changed."""

    def __init__(self, options: dict):
        self.options = dict(options)
        self._code: str | None = None
        self._compiled: Callable | None = None

    def __call__(self, gm: torch.fx.GraphModule) -> Callable:
        if self._code != gm.code:
            self._code, self._compiled = gm.code, torch.compile(gm, **self.options)
        return self._compiled

    def __reduce__(self):
        return CompiledGraph, (self.options,)


class CompileMixin:
    """``compile(**options)`` for modules that call a rewritten ``graph_module`` (module docstring)."""

    _compiled_graph: CompiledGraph | None = None

    def compile(self, **options) -> None:
        """Run the emitted graph through ``torch.compile(graph_module, **options)`` from the next call on; the
        Python around it stays eager (unlike ``nn.Module.compile``, which this replaces)."""
        self._compiled_graph = CompiledGraph(options)

    @property
    def compile_options(self) -> dict | None:
        """The options of the last ``compile()`` (a copy), None when the graph runs eagerly."""
        return None if self._compiled_graph is None else dict(self._compiled_graph.options)

    def _graph_to_call(self) -> Callable:
        """What ``forward`` calls: ``graph_module``, or its compiled form after ``compile()``."""
        return self.graph_module if self._compiled_graph is None else self._compiled_graph(self.graph_module)
