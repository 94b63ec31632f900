"""Export a folded model as a ``.pt2`` file that loads and runs with torch alone.

>>> import os, tempfile, torch, fx_adapters as fxa
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8)).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules="all-linear", init_weights=False))
>>> x = torch.randn(3, 4)
>>> path = fxa.export(am, os.path.join(tempfile.mkdtemp(), "model.pt2"), example_inputs=(x,))
>>> loaded = torch.export.load(path).module()  # in any process: no fx_adapters import needed
>>> torch.equal(loaded(x), am.fold()(x))
True
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import optimization_hint

from .graph import bnb
from .graph.match import layer_kind
from .graph.tags import is_tagged

__all__ = ["export"]


def export(module: torch.nn.Module, path: str | os.PathLike, example_inputs: tuple | None = None,
           example_kwargs: dict | None = None) -> Path:
    """Write ``module`` with ``torch.export.save`` to ``path`` (returned as a ``Path``).

    ``module`` is a folded GraphModule (``am.fold()``, ``fxa.unfold(...)``) or an ``AdaptedModule``, whose
    active adapter is folded first (``am.fold()``; an AdaptedModule with merged adapters must be unmerged).

    The file loads with ``torch.export.load(path).module()`` without importing fx_adapters. Call the loaded
    module with the model's tensor inputs **positionally**, in the folded module's order
    (``inspect.signature(folded.forward)``, e.g. ``(input_ids, attention_mask)``). It returns what the folded
    module returns, bit for bit: built-in containers, e.g. a dict ``{"logits": tensor}`` for a transformers
    model, or a tensor for a module returning one.

    Dims that were dynamic at capture stay dynamic (batch and sequence for transformers models). Examples,
    bound like the folded module's inputs, are optional for graphs captured by ``torch.export`` (every
    transformers model: ones of the captured example shapes are used); a module captured by symbolic
    tracing needs them, and every dim of its inputs is then exported as ``Dim.AUTO``.

    A model with bitsandbytes layers cannot be exported (``torch.export`` cannot trace them): ``ValueError``.
    """
    if not isinstance(module, torch.fx.GraphModule) and callable(getattr(module, "fold", None)):
        _refuse_quantized(module.graph_module)  # a compiled module: export what it folds to
        module = module.fold()
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(f"export: expected an AdaptedModule or the GraphModule of am.fold(), got "
                        f"{type(module).__name__}")
    _refuse_quantized(module)
    adapted = [n.name for n in module.graph.nodes if is_tagged(n)]
    if adapted:
        raise ValueError(f"export: this graph still applies adapters (nodes {adapted[:3]}); pass the AdaptedModule "
                         "or its am.fold()")
    try:
        bound = inspect.signature(module.forward).bind_partial(*(example_inputs or ()), **(example_kwargs or {}))
    except TypeError as e:
        raise TypeError(f"export: {e}; the module's inputs are {inspect.signature(module.forward)}") from None
    args, dims = [], []
    for node in module.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        example = bound.arguments.get(node.target)
        if example is None and val is None:
            raise ValueError(f"export: no example for input {node.target!r} and no shape metadata to make one "
                             "(the model was captured by symbolic tracing); pass example_inputs or example_kwargs")
        if example is None:
            example = torch.ones([optimization_hint(s) for s in val.shape], dtype=val.dtype, device=val.device)
        args.append(example)
        dims.append({i: Dim.AUTO for i in range(example.dim())} if val is None else
                    {i: Dim.DYNAMIC for i, size in enumerate(val.shape) if isinstance(size, torch.SymInt)})
    with torch.no_grad():
        program = torch.export.export(module, tuple(args), dynamic_shapes=tuple(dims), strict=False)
    torch.export.save(program, path)
    return Path(path)


def _refuse_quantized(gm: torch.fx.GraphModule) -> None:
    """Raise before ``torch.export`` fails deep inside bitsandbytes on a quantized layer."""
    for node in gm.graph.find_nodes(op="call_module"):
        layer = gm.get_submodule(node.target)
        if layer_kind(type(layer)) in bnb.KINDS:
            raise ValueError(
                f"export: layer {node.target!r} is a bitsandbytes {type(layer).__name__}, which torch.export cannot "
                "trace, so a quantized model cannot be written as a .pt2. Export it in floating point instead: load "
                "the model without quantization_config, compile_with_road it, load this adapter into it "
                "(am.save_adapter(dir), then load_adapter(dir)) and export that; or use am.fold() in Python"
            )
