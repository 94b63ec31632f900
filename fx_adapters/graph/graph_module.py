"""GraphModule helpers every method shares: owned copies of a model, copies of a graph module that share its
tensors, reading and assigning tensors by name, graphs that read their tensors from another module, and graphs called
with one list of inputs that they empty (``boxed``).

>>> import torch
>>> from torch import nn
>>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2)))
>>> copied = copy_graph_module(gm)
>>> assign_tensor(copied, "0.weight", torch.zeros(2, 4))
>>> bool(gm.get_parameter("0.weight").abs().sum() > 0), bool(copied.get_parameter("0.weight").abs().sum() == 0)
(True, True)
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

__all__ = ["SOURCE_ATTR", "BoxedCodeGen", "assign_tensor", "attr_tensor", "boxed", "copy_graph_module",
           "mark_non_persistent_buffers", "outside_inference_mode", "owned_copy", "read_from", "tensor_at"]

SOURCE_ATTR = "fxa_source"  # submodule name under which `read_from` graphs reach their source module


def outside_inference_mode(function):
    """``function`` run with ``torch.inference_mode(False)``: what it creates (parameters, tables, merged weights,
    captured graphs) are normal tensors even when the caller is inside ``torch.inference_mode()``, so the module
    still trains, and updates them in place, afterwards (inference tensors have no version counter and cannot be
    saved for backward)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with torch.inference_mode(False):
            return function(*args, **kwargs)
    return run


def owned_copy(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` whose parameters are new frozen ``nn.Parameter``s sharing storage.

    Buffers (which a graph may update in place, e.g. BatchNorm statistics) and parameter subclasses
    (e.g. bitsandbytes) are copied. Tied parameters stay tied.
    """
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters() if type(p) is nn.Parameter}
    owned = copy.deepcopy(model, memo)
    owned.requires_grad_(False)
    return owned


def parameters_of(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of ``module``'s first floating-point parameter (fp32 on the CPU when it has none): what
    a capture of it bakes in."""
    first = next((p for p in module.parameters() if p.is_floating_point()), None)
    return (torch.float32, torch.device("cpu")) if first is None else (first.dtype, first.device)


def mark_non_persistent_buffers(gm: nn.Module, model: nn.Module) -> None:
    """Keep ``model``'s non-persistent buffers out of ``gm.state_dict()`` too."""
    buffers = dict(gm.named_buffers())
    for path, module in model.named_modules():
        for leaf in module._non_persistent_buffers_set:
            if f"{path}.{leaf}".removeprefix(".") in buffers:
                gm.get_submodule(path)._non_persistent_buffers_set.add(leaf)


def _own_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` and of its submodules: same tensors, own containers (params, hooks, …)."""
    clone = type(module).__new__(type(module))
    clone.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v
                           for k, v in module.__dict__.items()})
    for name, child in clone._modules.items():
        if child is not None:
            clone._modules[name] = _own_copy(child)
    return clone


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph and its own modules, sharing every tensor with ``gm``.

    Passes can then change the copy's graph and assign its attributes without touching ``gm``.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    new = torch.fx.GraphModule(gm, graph, type(gm).__name__)
    for name, child in new._modules.items():
        new._modules[name] = _own_copy(child)
    mark_non_persistent_buffers(new, gm)
    return new.train(gm.training)


def tensor_at(gm: nn.Module, fqn: str, layer: str) -> torch.Tensor:
    """The parameter or buffer at ``fqn``; raises ``AttributeError`` naming ``layer`` when there is none."""
    prefix, _, leaf = fqn.rpartition(".")
    try:
        value = getattr(gm.get_submodule(prefix), leaf)
    except AttributeError:
        value = None
    if not isinstance(value, torch.Tensor):
        raise AttributeError(f"layer {layer!r}: the graph module has no tensor {fqn!r}; was it captured from "
                             "the same model as the adapter?")
    return value


def assign_tensor(gm: nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer at ``fqn`` by ``value`` (a parameter stays a parameter)."""
    prefix, _, leaf = fqn.rpartition(".")
    module = gm.get_submodule(prefix)
    old = getattr(module, leaf)
    if isinstance(old, nn.Parameter):
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def attr_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """The tensor a ``get_attr`` node reads."""
    if node.op != "get_attr":
        raise RuntimeError(f"match: expected a weight attribute, got node {node.name!r} ({node.op})")
    prefix, _, name = node.target.rpartition(".")
    return getattr(gm.get_submodule(prefix), name)


def _attr(module: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), module)


def _resolves(module: nn.Module, target: str) -> bool:
    try:
        _attr(module, target)
    except AttributeError:
        return False
    return True


def read_from(gm: torch.fx.GraphModule, source: nn.Module) -> torch.fx.GraphModule:
    """A GraphModule running ``gm``'s graph whose attributes that ``source`` also has are read from ``source`` at
    call time.

    Such nodes target ``fxa_source.<path>``, where ``fxa_source`` is ``source`` itself (so ``.to()``,
    ``load_state_dict`` or merged weights in ``source`` take effect at once); other attributes stay ``gm``'s.
    ``gm`` is left unchanged.
    """
    graph = copy.deepcopy(gm.graph)
    attrs = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            value = _attr(gm, node.target)
            if _resolves(source, node.target):
                node.target = f"{SOURCE_ATTR}.{node.target}"
            attrs[node.target] = value
    module = torch.fx.GraphModule(attrs, graph, type(gm).__name__)
    module.add_module(SOURCE_ATTR, source)  # replaces the containers made for `fxa_source.…` targets
    return module


class BoxedCodeGen(torch.fx.CodeGen):
    """A graph's ``forward`` taking one list of its inputs, which it empties (torch's "boxed" calling convention, as
    AOTAutograd's graphs): as the caller keeps no reference either, each input is freed after its last use in the
    graph instead of after the call."""

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, **_) -> str:
        names = [v.split(":")[0].split("=")[0].strip() for v in free_vars if v != "self"]
        body = f"\n    {', '.join(names)}, = inputs\n    inputs.clear()" if names else ""
        return f"def {self._func_name}(self, inputs){maybe_return_annotation}:{body}"


def boxed(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm``, now called as ``gm([input, ...])`` with a list it empties (``BoxedCodeGen``).

    >>> gm = boxed(torch.fx.symbolic_trace(lambda x, y: x + y))
    >>> inputs = [torch.ones(2), torch.ones(2)]
    >>> gm(inputs), inputs
    (tensor([2., 2.]), [])
    """
    gm.graph.set_codegen(BoxedCodeGen())
    gm.recompile()
    return gm
