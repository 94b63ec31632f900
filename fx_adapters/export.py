"""Export a folded model as a ``.pt2`` file that loads and runs with torch alone.

>>> import os, tempfile, torch, fx_adapters as fxa
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8)).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules="all-linear", init_weights=False))
>>> x = torch.randn(3, 4)
>>> path = fxa.export(am, os.path.join(tempfile.mkdtemp(), "model.pt2"), example_inputs=(x,))
>>> loaded = torch.export.load(path).module()  # in any process: no fx_adapters import needed
>>> torch.equal(loaded(input=x), am.fold()(x))  # by keyword: 'input' is what torch.fx named nn.Sequential's input
True
"""

from __future__ import annotations

import inspect
import json
import os
import zipfile
from pathlib import Path

import torch
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import optimization_hint

from .graph import bnb
from .graph.graph_module import copy_graph_module
from .graph.match import layer_kind
from .graph.passes import PlainOutput, run_passes
from .graph.tags import is_tagged
from .road.serving_export import ADAPTER_IDS, MAPPING_FILE

__all__ = ["adapter_mapping", "export"]


def export(module: torch.nn.Module, path: str | os.PathLike, example_inputs: tuple | None = None,
           example_kwargs: dict | None = None, *, mixed_batch: bool = False, aot_inductor: bool = False) -> Path:
    """Write ``module`` with ``torch.export.save`` to ``path`` (returned as a ``Path``).

    ``module`` is a folded GraphModule (``am.fold()``, ``fxa.unfold(...)``) or an ``AdaptedModule``, whose
    active adapter is folded first (``am.fold()``; an AdaptedModule with merged adapters must be unmerged).

    The file loads with ``torch.export.load(path).module()`` without importing fx_adapters. Call the loaded
    module **by keyword** with the model's inputs, e.g. ``m(input_ids=ids, attention_mask=mask)``. It returns what
    the folded module returns, bit for bit, in built-in containers: a dict ``{"logits": tensor}`` for a transformers
    model (``torch.export.load`` cannot rebuild a transformers ``ModelOutput`` in a process that has not imported
    transformers: its pytree type is not registered there), a tensor for a module returning one.

    Which inputs: a ``torch.export`` program has a fixed set of inputs, none optional (its module checks the keywords
    it is given against them), so one file cannot take both ``m(input_ids=ids)`` and ``m(input_ids=ids,
    attention_mask=mask)``. Without examples the program takes every input of the folded module
    (``inspect.signature(folded.forward)``: ``input_ids`` and ``attention_mask`` for a transformers model, what a
    tokenizer returns, so padded batches work; pass ``attention_mask=torch.ones_like(ids)`` for none). With examples
    it takes the inputs they give: ``example_kwargs={"input_ids": ids}`` writes a program called as
    ``m(input_ids=ids)``, the folded module's default (an all-ones mask) built in. Examples, bound like the folded
    module's inputs, are optional for graphs captured by ``torch.export`` (every transformers model: ones of the
    captured example shapes are used); a module captured by symbolic tracing needs them, and every dim of its inputs
    is then exported as ``Dim.AUTO``. Dims that were dynamic at capture stay dynamic (batch and sequence for
    transformers models).

    ``mixed_batch=True`` (an ``AdaptedModule``): the unmerged graph with every adapter's tables, called by keyword
    with the model's inputs (chosen as above) and ``adapter_ids``, a ``(batch,)`` int64 tensor (0 = ``__base__``,
    then the adapters of ``am.adapters`` in order: the file's extra file ``adapters.json``, read with
    ``torch.export.load(path, extra_files={"adapters.json": ""})``); an id out of range raises. See
    ``fx_adapters/road/serving_export.py``.

    ``aot_inductor=True``: an AOTInductor package instead (``torch._inductor.aoti_compile_and_package``; takes
    a minute; CPU needs a C++ compiler), loaded with ``torch._inductor.aoti_load_package(path)`` and called by
    keyword with the same inputs. It does not check its inputs: pass contiguous tensors of the exported dtypes (int64
    ids). With ``mixed_batch=True`` it holds ``adapters.json`` too (``adapter_mapping(path)`` reads it).

    A model with bitsandbytes layers cannot be exported (``torch.export`` cannot trace them): ``ValueError``.
    """
    if mixed_batch:
        program, extra = _mixed_batch_program(module, example_inputs, example_kwargs)
    else:
        program, extra = _folded_program(module, example_inputs, example_kwargs), {}
    if aot_inductor:
        return _aot_inductor_package(program, path, extra)
    torch.export.save(program, path, extra_files=extra)
    return Path(path)


def _folded_program(module: torch.nn.Module, example_inputs: tuple | None, example_kwargs: dict | None
                    ) -> torch.export.ExportedProgram:
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
    args, dims = _examples(module, example_inputs, example_kwargs)
    plain = copy_graph_module(module)
    run_passes(plain, [PlainOutput()])
    with torch.no_grad():
        return torch.export.export(plain, (), args, dynamic_shapes=dims, strict=False)


def _examples(module: torch.fx.GraphModule, example_inputs: tuple | None, example_kwargs: dict | None,
              made: dict | None = None) -> tuple[dict, dict]:
    """Input name -> example and -> dynamic dims for each input of the program (``export``'s docstring): every
    placeholder of ``module`` without examples; with examples, those they give and those without a default
    (``made``: examples of inputs the caller makes, not counted as given)."""
    made = made or {}
    signature = inspect.signature(module.forward)
    signature = signature.replace(parameters=[p for p in signature.parameters.values() if p.name not in made])
    try:
        bound = signature.bind_partial(*(example_inputs or ()), **(example_kwargs or {}))
    except TypeError as e:
        raise TypeError(f"export: {e}; the module's inputs are {signature}") from None
    chosen = any(value is not None for value in bound.arguments.values())
    args, dims = {}, {}
    for node in module.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        example = bound.arguments.get(node.target)
        if made.get(node.target) is not None:
            example, val = made[node.target], None
            dims[node.target] = {0: Dim.DYNAMIC}
        elif example is None and chosen and node.args:
            continue  # optional and left out: the module's default is built into the program
        elif example is None and val is None:
            raise ValueError(f"export: no example for input {node.target!r} and no shape metadata to make one "
                             "(the model was captured by symbolic tracing); pass example_inputs or example_kwargs")
        if example is None:
            example = torch.ones([optimization_hint(s) for s in val.shape], dtype=val.dtype, device=val.device)
        args[node.target] = example
        if node.target not in dims:
            dims[node.target] = ({i: Dim.AUTO for i in range(example.dim())} if val is None else
                                 {i: Dim.DYNAMIC for i, size in enumerate(val.shape) if isinstance(size, torch.SymInt)})
    return args, dims


def _mixed_batch_program(module: torch.nn.Module, example_inputs: tuple | None, example_kwargs: dict | None
                         ) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """The multi-adapter program of an AdaptedModule and its ``adapters.json``."""
    if not callable(getattr(module, "mixed_batch_graph", None)):
        raise TypeError(f"export(mixed_batch=True): expected an AdaptedModule (compile_with_road), got "
                        f"{type(module).__name__}")
    _refuse_quantized(module.graph_module)
    graph_module, mapping = module.mixed_batch_graph()
    first, _ = _examples(graph_module, example_inputs, example_kwargs, {ADAPTER_IDS: torch.zeros(1)})
    batch = next(t.shape[0] for name, t in first.items() if name != ADAPTER_IDS)
    if batch < 2:
        raise ValueError(f"export(mixed_batch=True): the examples have a batch of {batch}; give at least 2 samples "
                         "so that the batch stays dynamic")
    ids = torch.arange(batch) % len(mapping)
    args, dims = _examples(graph_module, example_inputs, example_kwargs, {ADAPTER_IDS: ids})
    with torch.no_grad():
        program = torch.export.export(graph_module, (), args, dynamic_shapes=dims, strict=False)
    return program, {MAPPING_FILE: json.dumps(mapping)}


def _aot_inductor_package(program: torch.export.ExportedProgram, path: str | os.PathLike, extra: dict[str, str]
                          ) -> Path:
    """Compile ``program`` with AOTInductor into the package ``path``, adding the ``extra`` files to it."""
    if not os.fspath(path).endswith(".pt2"):
        raise ValueError(f"export(aot_inductor=True): the package path must end in .pt2, got {os.fspath(path)!r}")
    import torch._inductor  # noqa: F401  (imported on demand: it is slow to import)

    torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path))
    if extra:
        with zipfile.ZipFile(path, "a") as archive:
            root = archive.namelist()[0].split("/")[0]
            for name, text in extra.items():
                archive.writestr(f"{root}/extra/{name}", text)
    return Path(path)


def adapter_mapping(path: str | os.PathLike) -> dict[str, int]:
    """The ``adapters.json`` of a multi-adapter ``.pt2`` or AOTInductor package: ``{"__base__": 0, name: id}``."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"/extra/{MAPPING_FILE}")]
        if not names:
            raise ValueError(f"{os.fspath(path)}: no {MAPPING_FILE} in it; was it exported with mixed_batch=True?")
        return json.loads(archive.read(names[0]))


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
