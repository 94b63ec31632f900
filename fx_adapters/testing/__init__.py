"""Proof that a compiled graph computes what its reference computes, and where it stops doing so.

``assert_equivalent(compiled, reference, inputs)`` runs both; when their outputs differ it records every
module's output on both sides (a ``torch.fx.Interpreter`` on the compiled graph, forward hooks on an eager
reference), aligns them by module path and names the first module, in execution order, whose output
differs.

>>> import torch, fx_adapters as fxa
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules=["0"]))
>>> assert_equivalent(am, model, (torch.randn(3, 4),))   # identity-initialised RoAd: the base model
>>> with torch.no_grad():
...     _ = am.graph_module.road_adapters["0"].road_alpha["default"].fill_(2.0)
>>> assert_equivalent(am, model, (torch.randn(3, 4),))
Traceback (most recent call last):
...
fx_adapters.testing.NotEquivalentError: first diverging module: '0' (nn.Linear) ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..graph.capture import interpreting_graphs
from ..graph.peft_files import PEFT_PREFIX

__all__ = ["NotEquivalentError", "assert_equivalent", "module_outputs"]

PEFT_PREFIXES = (PEFT_PREFIX, "base_model.lora_model.model.")  # PeftModel's wrappers: most methods, X-LoRA


class NotEquivalentError(AssertionError):
    """Outputs differ; the message names the first diverging module, its errors and the tolerance."""


@dataclass
class _Divergence:
    module: str
    kind: str
    max_abs: float
    max_rel: float


def _call(module: Callable, inputs, kwargs: Mapping | None):
    kwargs = dict(kwargs or {})
    if isinstance(inputs, Mapping):
        return module(**inputs, **kwargs)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return module(*inputs, **kwargs)


def _tensors(output) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output.to_tuple() if hasattr(output, "to_tuple") else output)
            if isinstance(leaf, torch.Tensor)]


class _Recorder(torch.fx.Interpreter):
    """Records each module's output: the last value computed inside it that is used outside it."""

    def __init__(self, gm: torch.fx.GraphModule, into: dict[str, tuple[str, torch.Tensor]]):
        super().__init__(gm)
        self.into = into

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        inside = _paths(n)
        if inside and isinstance(value, torch.Tensor):
            outputs_of = [(p, cls) for p, cls in inside.items() if any(p not in _paths(u) for u in n.users)]
            for path, cls in outputs_of:
                self.into.pop(path, None)  # keep completion order: a module ends with its last output
                self.into[path] = (cls, value.detach().clone())  # later nodes may rotate it in place
        return value


def _paths(node: torch.fx.Node) -> dict[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    return {path: str(cls).rpartition(".")[2] for path, cls in stack.values() if path}


def _recording(gm: torch.fx.GraphModule, record: dict) -> Callable:
    """A function called like ``gm`` that runs it with a ``_Recorder`` writing into ``record``."""
    signature = inspect.signature(gm.forward)

    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return _Recorder(gm, record).run(*bound.args)
    return run


def _is_compiled(module: nn.Module) -> bool:
    """A compiled module (AdaptedModule, XLoraModule, …): it runs its graphs through ``CapturedModel.call``."""
    return isinstance(getattr(module, "graph_module", None), torch.fx.GraphModule)


def module_outputs(module: nn.Module, inputs, kwargs: Mapping | None = None) -> tuple[object, dict]:
    """Run ``module``; return its output and ``{module path: (class name, output tensor)}`` in completion order.

    Compiled modules are run by a ``torch.fx.Interpreter`` (bit-identical to calling them); eager ones
    (including PEFT models, whose ``base_model.model.`` or, for X-LoRA, ``base_model.lora_model.model.`` prefix
    is dropped) with temporary forward hooks.
    """
    record: dict[str, tuple[str, torch.Tensor]] = {}
    with torch.no_grad():
        if isinstance(module, torch.fx.GraphModule):
            return _call(_recording(module, record), inputs, kwargs), record
        if _is_compiled(module):  # every graph it runs, interpreted by a _Recorder; its own logic unchanged
            with interpreting_graphs(lambda gm: _recording(gm, record)):
                return _call(module, inputs, kwargs), record
        handles = []
        for name, sub in module.named_modules():
            path = next((name.removeprefix(p) for p in PEFT_PREFIXES if name.startswith(p)), name)
            if not path or path.startswith("base_model") or path.endswith(".base_layer"):
                continue  # the root, PEFT's wrappers around the model, and the layer inside a PEFT layer

            def hook(m, _inputs, out, path=path):
                if isinstance(out, torch.Tensor):  # modules with several outputs are compared through their parts
                    record.pop(path, None)
                    record[path] = (type(m).__name__, out.detach().clone())

            handles.append(sub.register_forward_hook(hook))
        try:
            output = _call(module, inputs, kwargs)
        finally:
            for h in handles:
                h.remove()
    return output, record


def _compare(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float, float]:
    a, b = a.double(), b.double()
    diff = (a - b).abs()
    if not diff.numel():
        return True, 0.0, 0.0
    ok = bool((diff <= atol + rtol * b.abs()).all())
    return ok, diff.max().item(), (diff / b.abs().clamp_min(1e-12)).max().item()


def assert_equivalent(compiled: nn.Module, reference: nn.Module, inputs, *, atol: float = 1e-5, rtol: float = 0.0,
                      compiled_kwargs: Mapping | None = None, reference_kwargs: Mapping | None = None) -> None:
    """Raise ``NotEquivalentError`` naming the first diverging module when the outputs differ.

    ``inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs, given to both sides;
    ``compiled_kwargs`` / ``reference_kwargs`` add side-specific ones (e.g. ``adapter_names``).
    ``reference`` may be an eager model, a PEFT model or another compiled module.
    """
    with torch.no_grad():
        got = _tensors(_call(compiled, inputs, compiled_kwargs))
        want = _tensors(_call(reference, inputs, reference_kwargs))
    if len(got) != len(want):
        raise NotEquivalentError(f"outputs differ in structure: {len(got)} tensors vs {len(want)}")
    failures = [(i, *_compare(g, w, atol, rtol)[1:]) for i, (g, w) in enumerate(zip(got, want))
                if g.shape != w.shape or not _compare(g, w, atol, rtol)[0]]
    if not failures:
        return
    divergence = _first_divergence(compiled, reference, inputs, compiled_kwargs, reference_kwargs, atol, rtol)
    i, max_abs, max_rel = failures[0]
    if isinstance(divergence, _Divergence):
        where = (f"first diverging module: {divergence.module!r} (nn.{divergence.kind}) max abs err "
                 f"{divergence.max_abs:.3g}, max rel err {divergence.max_rel:.3g}")
    elif divergence:
        where = "no module output differs (only the final outputs do)"
    else:
        where = ("no module output to compare (no module of the reference matches one of the compiled's by path "
                 "and output shape)")
    raise NotEquivalentError(f"{where}; output {i}: max abs err {max_abs:.3g}, max rel err {max_rel:.3g}; "
                             f"tolerance atol={atol:g}, rtol={rtol:g}")


def _first_divergence(compiled, reference, inputs, compiled_kwargs, reference_kwargs, atol, rtol):
    """The first differing module's ``_Divergence``; else how many module outputs were compared."""
    _, ours = module_outputs(compiled, inputs, compiled_kwargs)
    _, theirs = module_outputs(reference, inputs, reference_kwargs)
    compared = 0
    for path, (kind, want) in theirs.items():
        if path not in ours or ours[path][1].shape != want.shape:
            continue
        compared += 1
        ok, max_abs, max_rel = _compare(ours[path][1], want, atol, rtol)
        if not ok:
            return _Divergence(path, kind, max_abs, max_rel)
    return compared
