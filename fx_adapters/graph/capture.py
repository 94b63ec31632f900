"""Capture a model as a plain, flat ``torch.fx.GraphModule``.

Hugging Face ``PreTrainedModel``s are captured with ``torch.export`` (non-strict, dynamic batch and
sequence dims, ``use_cache=False``); other modules with ``torch.fx`` symbolic tracing, falling back to
``torch.export`` when example inputs are given. Either way the result is a ``CapturedModel``:

* ``graph_module`` takes the inputs named by ``input_names`` as flat positional placeholders and returns
  the flat tuple of the output's pytree leaves; ``out_spec`` rebuilds the eager output type.
* Its parameters and buffers live at the same FQNs as in the model, are its own (frozen) ``nn.Parameter``
  objects sharing storage with the model, and ``node.meta["nn_module_stack"]`` paths are relative to the
  model. The caller's model is never modified.
* Exported graphs are traced under ``torch.no_grad()``, in eval mode unless ``training=True``: dropout is in the
  graph or gone for good, and ``.train()``/``.eval()`` only affect ``call_module`` nodes; autograd works as usual.
* bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` layers stay opaque: ``call_module`` nodes of the (copied)
  quantized layer in either graph. ``torch.export`` cannot trace them, so while it runs each one is replaced by
  a stand-in calling the custom op ``fx_adapters::bnb_linear`` (output shape from a fake implementation),
  and every call of that op becomes a ``call_module`` of the real layer afterwards.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from fx_adapters.graph.capture import capture
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> captured = capture(model)
    >>> captured.method, captured.input_names
    ('symbolic_trace', ('input',))
    >>> x = torch.randn(3, 4)
    >>> torch.equal(captured.call(captured.graph_module, x), model(x))
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim
from torch.fx.immutable_collections import immutable_dict, immutable_list

from . import bnb
from .graph_module import mark_non_persistent_buffers, outside_inference_mode, owned_copy

__all__ = ["CaptureError", "CapturedModel", "Constant", "WRAPPED", "bnb_stand_ins", "capture", "capture_error",
           "flat_graph_module", "interpreting_graphs"]

WRAPPED = "model"  # attribute under which `_Inputs` holds the model during export
# what `CapturedModel.call` runs in place of a graph module in this thread / task (see `interpreting_graphs`)
_GRAPH_WRAPPER: contextvars.ContextVar = contextvars.ContextVar("fx_adapters_graph_wrapper", default=None)


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


@dataclass
class CapturedModel:
    """A captured model: a flat graph module plus what it takes to call it like the model."""

    graph_module: torch.fx.GraphModule
    input_names: tuple[str, ...]
    out_spec: pytree.TreeSpec
    method: str
    signature: inspect.Signature | None = field(default=None, repr=False)
    """The model's ``forward`` signature, used to bind positional arguments (default: ``input_names``)."""

    def call(self, gm: torch.fx.GraphModule, *args, extra: tuple = (), **kwargs):
        """Run ``gm`` (this graph or a rewrite of it) with arguments bound like the model's ``forward``.

        ``attention_mask`` defaults to ``torch.ones_like(input_ids)``; ``extra`` values are passed after
        the model inputs (for placeholders appended by a rewrite). Returns the model's output type.
        """
        values = self.bind(args, kwargs)
        input_ids = values.get("input_ids")
        if "attention_mask" in self.input_names and values.get("attention_mask") is None and input_ids is not None:
            values["attention_mask"] = torch.ones_like(input_ids)
        missing = [name for name in self.input_names if values.get(name) is None]
        if missing:
            raise TypeError(f"missing input(s) {missing}; accepted inputs: {self._accepted()}")
        wrap = _GRAPH_WRAPPER.get()
        run = gm if wrap is None else wrap(getattr(gm, "_orig_mod", gm))  # a torch.compile'd graph: its own graph
        flat = run(*(values[name] for name in self.input_names), *extra)
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """Map ``args``/``kwargs`` to input names, with signature defaults; reject unknown inputs."""
        signature = self.signature or inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in self.input_names]
        )
        try:
            bound = signature.bind_partial(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{e}; accepted inputs: {self._accepted()}") from None
        values = {
            name: signature.parameters[name].default
            for name in self.input_names
            if name in signature.parameters and signature.parameters[name].default is not inspect.Parameter.empty
        }
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                values.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                raise TypeError(f"too many positional arguments; accepted inputs: {self._accepted()}")
            else:
                values[name] = value
        unknown = [n for n, v in values.items() if n not in self.input_names and v is not None]
        if unknown:
            raise TypeError(f"unexpected input(s) {unknown}; accepted inputs: {self._accepted()}")
        return values

    def _accepted(self) -> str:
        return ", ".join(self.input_names)


@contextlib.contextmanager
def interpreting_graphs(wrap) -> Iterator[None]:
    """Within the block, in this thread or task only, every ``CapturedModel.call`` runs ``wrap(graph_module)``
    (called like the graph module) instead of the graph module: how ``fx_adapters.testing`` records each
    module's output inside a compiled module without touching it."""
    token = _GRAPH_WRAPPER.set(wrap)
    try:
        yield
    finally:
        _GRAPH_WRAPPER.reset(token)


@outside_inference_mode
def capture(
    model: nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None, training: bool = False
) -> CapturedModel:
    """Capture ``model`` as a ``CapturedModel`` (see the module docstring).

    ``example_inputs``/``example_kwargs`` are bound to ``model.forward``'s signature; tensors become
    graph inputs, other values are baked into the graph. They are optional for Hugging Face models
    (``input_ids`` + ``attention_mask`` of shape (2, 8) are made from ``model.config``) and for
    modules that ``torch.fx`` can trace. ``training=True`` exports a Hugging Face model in train mode (its dropout
    is in the graph, with the model's probabilities). Raises ``CaptureError`` when no method works.
    """
    has_examples = example_inputs is not None or example_kwargs is not None
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        if not has_examples:
            ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, 8))
            example_kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return _export(model, example_inputs, example_kwargs, hf=True, training=training)
    try:
        return _symbolic_trace(model)
    except Exception as e:
        if not has_examples:
            raise capture_error(model, "torch.fx.symbolic_trace", e, "pass example_inputs to use torch.export") from e
    return _export(model, example_inputs, example_kwargs, hf=False)


# --------------------------------------------------------------------------------------- symbolic trace


class _Tracer(torch.fx.Tracer):
    """Default ``torch.fx`` tracer that also keeps bitsandbytes linear layers as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, bnb.linear_types()) or super().is_leaf_module(m, module_qualified_name)


@torch.library.custom_op("fx_adapters::bnb_linear", mutates_args=())
def _bnb_linear(x: torch.Tensor, path: str, out_features: int) -> torch.Tensor:
    """What ``torch.export`` records for a call of the bitsandbytes layer at ``path`` (never run)."""
    raise RuntimeError(f"fx_adapters::bnb_linear stands for layer {path!r} only while a model is captured; "
                       "run the captured graph module, which calls the layer itself")


@_bnb_linear.register_fake
def _(x: torch.Tensor, path: str, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))  # both layer types return the input's dtype


_bnb_linear_op = torch.ops.fx_adapters.bnb_linear.default


class _BnbStandIn(nn.Module):
    """Holds the place of a bitsandbytes layer during ``torch.export``: no parameters, one opaque op."""

    def __init__(self, path: str, out_features: int):
        super().__init__()
        self.path, self.out_features = path, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bnb_linear(x, self.path, self.out_features)


@contextlib.contextmanager
def bnb_stand_ins(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Within the block ``model``'s bitsandbytes layers are stand-ins; yields {path: real layer}."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, bnb.linear_types())}
    for path, layer in layers.items():
        model.set_submodule(path, _BnbStandIn(path, layer.out_features))
    try:
        yield layers
    finally:
        for path, layer in layers.items():
            model.set_submodule(path, layer)


def _symbolic_trace(model: nn.Module) -> CapturedModel:
    owned = owned_copy(model)
    graph = _Tracer().trace(owned)
    output = graph.output_node()
    leaves, out_spec = _bake_constants(*pytree.tree_flatten(_thaw(output.args[0])))
    output.args = (leaves,)
    for node in graph.nodes:
        if "nn_module_stack" in node.meta:
            node.meta["nn_module_stack"] = {
                key: (path, _class_name(cls)) for key, (path, cls) in node.meta["nn_module_stack"].items()
            }
    gm = torch.fx.GraphModule(owned, graph, type(model).__name__)
    mark_non_persistent_buffers(gm, owned)
    input_names = tuple(n.target for n in graph.find_nodes(op="placeholder"))
    return CapturedModel(gm, input_names, out_spec, "symbolic_trace", inspect.signature(model.forward))


def _thaw(value):
    """Turn ``torch.fx``'s immutable containers in an output back into ``list``/``dict``."""
    if isinstance(value, immutable_list):
        return [_thaw(v) for v in value]
    if isinstance(value, immutable_dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        items = [_thaw(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


# --------------------------------------------------------------------------------------------- export


class _Inputs(nn.Module):
    """Calls the model with flat positional tensors as named inputs, plus fixed non-tensor kwargs."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], fixed: dict):
        super().__init__()
        setattr(self, WRAPPED, model)
        self.names, self.fixed = names, fixed

    def forward(self, *inputs):
        return getattr(self, WRAPPED)(**dict(zip(self.names, inputs)), **self.fixed)


def _export(model: nn.Module, example_inputs, example_kwargs, hf: bool, training: bool = False) -> CapturedModel:
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*(example_inputs or ()), **(example_kwargs or {}))
        if any(signature.parameters[n].kind is inspect.Parameter.VAR_POSITIONAL for n in bound.arguments):
            raise TypeError("forward(*args) is not supported")
    except TypeError as e:
        raise capture_error(model, "binding the example inputs", e, "match model.forward's named parameters") from e
    arguments = {}
    for name, value in bound.arguments.items():
        is_var_kw = signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
        arguments.update(value if is_var_kw else {name: value})
    names = tuple(n for n, v in arguments.items() if isinstance(v, torch.Tensor))
    fixed = {n: v for n, v in arguments.items() if n not in names}
    if hf:
        if any(size < 2 for n in names for size in arguments[n].shape[:2]):
            shapes = {n: tuple(arguments[n].shape) for n in names}
            reason = f"batch and sequence sizes must be > 1 or export specializes them, got {shapes}"
            raise capture_error(model, "checking the example inputs", reason, "example inputs of shape (2, 8)")
        fixed.setdefault("use_cache", False)
        # batch and sequence dims; Dim.DYNAMIC makes export fail rather than specialize them
        dims = tuple({d: Dim.DYNAMIC for d in range(min(arguments[n].dim(), 2))} for n in names)
    else:
        dims = tuple({d: Dim.AUTO for d in range(arguments[n].dim())} for n in names)

    owned = owned_copy(model).train(training)
    try:
        with torch.no_grad(), bnb_stand_ins(owned) as bnb_layers:
            ep = torch.export.export(
                _Inputs(owned, names, fixed),
                tuple(arguments[n] for n in names),
                dynamic_shapes=(dims,),
                strict=False,
            )
    except Exception as e:
        hint = (
            "pass example_kwargs (e.g. only input_ids), or capture a plain nn.Module (e.g. one decoder layer)"
            if hf
            else "remove data-dependent control flow from forward, or capture a plain nn.Module torch.fx can trace"
        )
        raise capture_error(model, "torch.export.export", e, hint) from e

    exported = ep.module(check_guards=False)
    gm, out_spec = flat_graph_module(exported, names, ep.call_spec.out_spec, type(model).__name__, bnb_layers)
    mark_non_persistent_buffers(gm, owned)
    gm.train(training or model.training)
    return CapturedModel(gm, names, out_spec, "export", signature)


def flat_graph_module(
    exported: torch.fx.GraphModule, names: tuple[str, ...], out_spec: pytree.TreeSpec, class_name: str,
    bnb_layers: dict[str, nn.Module],
) -> tuple[torch.fx.GraphModule, pytree.TreeSpec]:
    """Copy ``ep.module()``'s graph into a plain GraphModule relative to the wrapped model.

    Placeholders are renamed after ``names``, the output returns the flat tensor leaves (no pytree
    codegen), the ``_Inputs`` wrapper is stripped from get_attr targets and ``nn_module_stack`` paths, and
    each ``fx_adapters::bnb_linear`` call becomes a ``call_module`` of its layer in ``bnb_layers``.
    """
    graph, env, attrs = torch.fx.Graph(), {}, {}
    for node, name in zip(exported.graph.find_nodes(op="placeholder"), names, strict=True):
        env[node] = graph.placeholder(name)
        env[node].meta = dict(node.meta)
    for node in exported.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            leaves, out_spec = _bake_constants(node.args[0], out_spec)
            graph.output(tuple(env[leaf] for leaf in leaves))
            continue
        if node.op == "get_attr":
            new = graph.get_attr(_unwrap(node.target))
            new.meta = dict(node.meta)
            attrs[new.target] = functools.reduce(getattr, node.target.split("."), exported)
        elif node.target is _bnb_linear_op:
            x, path, _ = node.args
            new = graph.call_module(path, (env[x],))
            new.meta = dict(node.meta)
            attrs[path] = bnb_layers[path]
        else:
            new = graph.node_copy(node, env.__getitem__)
        env[node] = new
        if "nn_module_stack" in node.meta:
            new.meta["nn_module_stack"] = {
                _unwrap_key(key): (_unwrap(path), cls)
                for key, (path, cls) in node.meta["nn_module_stack"].items()
                if path  # the `_Inputs` wrapper itself
            }
            if new.op == "call_module":  # name the real layer's class, not the stand-in's
                key, (path, _) = next(reversed(new.meta["nn_module_stack"].items()))
                new.meta["nn_module_stack"][key] = (path, _class_name(type(attrs[path])))
    return torch.fx.GraphModule(attrs, graph, class_name), out_spec


def _unwrap(path: str) -> str:
    """``"model.x.y"`` -> ``"x.y"`` and ``"model"`` -> ``""``: a path relative to the wrapped model."""
    return path.removeprefix(WRAPPED).removeprefix(".")


def _unwrap_key(key: str) -> str:
    """``nn_module_stack`` key ``"L__self__model.x"`` -> ``"L__self__x"``."""
    head, _, tail = key.partition(WRAPPED)
    return head + tail.removeprefix(".")


# ------------------------------------------------------------------------------------------- helpers


class Constant:
    """Pytree node type of a constant output leaf: no children, unflattens to the constant."""


pytree.register_pytree_node(Constant, lambda value: ([], value), lambda _, value: value)


def _bake_constants(leaves: list, spec: pytree.TreeSpec) -> tuple[tuple[torch.fx.Node, ...], pytree.TreeSpec]:
    """Split output leaves into graph nodes and a spec with every constant leaf (e.g. None) baked in."""
    remaining = iter(leaves)

    def bake(spec: pytree.TreeSpec) -> pytree.TreeSpec:
        if not spec.is_leaf():
            return pytree.TreeSpec(spec.type, spec.context, [bake(child) for child in spec.children()])
        leaf = next(remaining)
        return spec if isinstance(leaf, torch.fx.Node) else pytree.TreeSpec(Constant, leaf, [])

    spec = bake(spec)
    return tuple(leaf for leaf in leaves if isinstance(leaf, torch.fx.Node)), spec


def _class_name(cls) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def capture_error(model: nn.Module, what: str, error: Exception | str, hint: str) -> CaptureError:
    """``CaptureError`` naming the model class, the failed step, the error's first line and a hint."""
    first_line = next(iter(str(error).strip().splitlines()), type(error).__name__)
    return CaptureError(f"cannot capture {type(model).__name__}: {what} failed ({first_line}); try: {hint}")
