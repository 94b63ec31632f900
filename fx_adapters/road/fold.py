"""Fold pass: RoAd rotations folded into the weights of the layers they follow, and unfolded back.

``R·(W·x + b) = (R·W)·x + R·b``: a layer followed by its rotation equals the same layer with rotated weight
rows and bias. ``R`` is block-diagonal in 2×2 blocks (``rotation.py``), so folding applies ``rotate``
to the weight's output axis and unfolding applies the columns of ``invert``: closed-form 2×2 products and
inverses, no dense out×out matrix, no ``linalg.inv``, and no memory beyond the new weight except the
``(2, out)`` columns (fp16/bf16 weights are rotated in fp32 chunk by chunk and stored in their own dtype).

>>> import torch
>>> from fx_adapters.road.rotation import road_columns
>>> layer = torch.nn.Linear(4, 8)
>>> cols = road_columns("road_1", 4, torch.full((4,), 0.3), torch.full((4,), 1.2))
>>> weight, bias = fold_weight(layer.weight, layer.bias, cols, 4)
>>> x = torch.randn(2, 4)
>>> torch.allclose(torch.nn.functional.linear(x, weight, bias), rotate(layer(x), cols, 4), atol=1e-6)
True
>>> torch.allclose(unfold_weight(weight, bias, cols, 4)[0], layer.weight, atol=1e-6)
True

bitsandbytes 8-bit / 4-bit layers are folded as whole layers: dequantize → ``R·W`` (and ``R·b``) → a new
layer requantized with the old one's settings (``graph/bnb.py``). Undoing such folds puts the
original layer back bit for bit while it is kept (``Fold.inverse(exact=True)``, the default), else applies
``R⁻¹`` to the dequantized weight and requantizes.

Passes (each in place on the graph module it is given; see ``graph.graph_module.copy_graph_module`` for a copy
to run them on): ``StripRoad`` removes every RoAd node, ``RotateWeights`` replaces weights by rotated copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph import bnb
from ..graph.graph_module import assign_tensor, tensor_at
from ..graph.match import Target
from ..graph.tags import TAG_KEY, is_tagged, tag_of
from .modules_to_save import SavedTag
from .rewrite import ADAPTERS_ATTR, INDEX_INPUT, RotationTag
from .rotation import determinants, invert, rotate

WEIGHT_KINDS = ("linear", "conv1d")
QUANTIZED_KINDS = bnb.KINDS  # folded as whole layers by RotateWeights
_CHUNK_ELEMENTS = 1 << 22  # fp32 scratch per chunk when a fp16/bf16 weight is rotated in fp32


class NotInvertibleError(ValueError):
    """A rotation has a singular 2×2 block (e.g. α = 0): what it was folded into cannot be recovered."""


# ------------------------------------------------------------------------------------ weight level


def _output_axis_last(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A view of ``weight`` with the output axis last (a Linear's weight is [out, in], a Conv1D's [in, out])."""
    if kind == "linear":
        return weight.t()
    if kind == "conv1d":
        return weight
    if kind in QUANTIZED_KINDS:
        raise TypeError(f"{kind} weights are packed: pass fx_adapters.graph.bnb.dequantize(layer) with "
                        "kind='linear' (RotateWeights folds into bitsandbytes layers this way)")
    raise ValueError(f"unknown layer kind {kind!r}; expected one of {WEIGHT_KINDS}")


def _rotate_into(y: torch.Tensor, cols: torch.Tensor, group_size: int, out: torch.Tensor) -> None:
    """``out[...] = rotate(y)`` along the last dim, computed in ``cols``' dtype, stored in ``out``'s."""
    if y.dtype == cols.dtype:
        rotate(y, cols, group_size, out=out)
        return
    y, out = torch.atleast_2d(y), torch.atleast_2d(out)
    rows = max(1, _CHUNK_ELEMENTS // y.shape[-1])
    for start in range(0, y.shape[0], rows):
        out[start:start + rows] = rotate(y[start:start + rows].to(cols.dtype), cols, group_size)


def fold_weight(weight: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor, group_size: int,
                kind: str = "linear") -> tuple[torch.Tensor, torch.Tensor | None]:
    """New ``(R·W, R·b)`` for a layer's weight and bias (``bias`` may be None); the inputs are not modified.

    ``cols`` are the ``(2, out)`` columns of ``R`` (``road_columns``); ``kind`` is ``"linear"`` (weight
    [out, in]) or ``"conv1d"`` (transformers' Conv1D, weight [in, out]). Computes in fp32 (fp64 for fp64
    weights) and returns tensors of the weight's dtype, without autograd history.
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    cols = cols.detach().to(device=weight.device, dtype=compute)
    with torch.no_grad():
        new_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        _rotate_into(_output_axis_last(weight, kind), cols, group_size, _output_axis_last(new_weight, kind))
        new_bias = None
        if bias is not None:
            new_bias = torch.empty_like(bias, memory_format=torch.contiguous_format)
            _rotate_into(bias, cols, group_size, new_bias)
    return new_weight, new_bias


def inverse_columns(cols: torch.Tensor, group_size: int, where: str = "this layer") -> torch.Tensor:
    """Columns of ``R⁻¹``; raises ``NotInvertibleError`` naming ``where`` when a 2×2 block is singular."""
    cols = cols.detach()
    inverse = invert(cols, group_size)
    singular = (determinants(cols, group_size) == 0) | ~torch.isfinite(inverse).all(0)
    if singular.any():
        raise NotInvertibleError(
            f"{where}: the rotation is not invertible ({int(singular.sum()) // 2} of {cols.shape[-1] // 2} 2×2 "
            "blocks are singular, e.g. α = 0), so the weights it was folded into cannot be recovered"
        )
    return inverse


def unfold_weight(weight: torch.Tensor, bias: torch.Tensor | None, cols: torch.Tensor, group_size: int,
                  kind: str = "linear") -> tuple[torch.Tensor, torch.Tensor | None]:
    """New ``(R⁻¹·W, R⁻¹·b)``: undoes ``fold_weight`` with the same ``cols``; raises ``NotInvertibleError``."""
    return fold_weight(weight, bias, inverse_columns(cols, group_size), group_size, kind)


# ----------------------------------------------------------------------------------- graph modules


@dataclass(frozen=True)
class Fold:
    """One rotation to fold into ``target``'s weights; ``adapter`` names it in error messages."""

    target: Target
    cols: torch.Tensor
    group_size: int
    adapter: str
    undo: Literal["exact", "inverse"] | None = None
    """None for a fold. For one that undoes an earlier fold (``inverse()``): ``"exact"`` puts a bitsandbytes layer
    back as it was when all its folds are undone and the original is kept, else applies ``R⁻¹`` like ``"inverse"``
    (dense weights are always undone by ``R⁻¹``)."""

    @property
    def tensor_names(self) -> tuple[str, str | None]:
        """The names of the layer's weight and bias (None without a bias) in the graph module."""
        name = self.target.name
        return f"{name}.weight", f"{name}.bias" if self.target.has_bias else None

    def inverse(self, exact: bool = True) -> Fold:
        """The fold that undoes this one; raises ``NotInvertibleError`` naming the layer and adapter."""
        where = f"adapter {self.adapter!r} on layer {self.target.name!r}"
        return Fold(self.target, inverse_columns(self.cols, self.group_size, where), self.group_size, self.adapter,
                    "exact" if exact else "inverse")


class RotateWeights(PassBase):
    """Replace the weight and bias of each fold's layer by rotated copies, folds applied in order.

    The tensors in the graph module are never written (they may share storage with the caller's model).
    A bitsandbytes layer is replaced by a new layer: its folds are applied to its dequantized weight, which is
    requantized once (this rounds: ``requantized`` lists the layers, ``requantization_warning`` says it; the
    pass itself does not warn, ``road.merge.MergeState`` warns once per ``AdaptedModule``), or, for exact undos, the
    original
    layer is put back (see ``Fold.undo``). Everything is computed, and checked finite when ``check_finite``,
    before anything is assigned: on an error the graph module is unchanged. The graph itself is not changed:
    call it directly rather than through ``run_passes`` (whose PassManager re-raises every error as a bare
    ``Exception``).
    """

    def __init__(self, folds: Sequence[Fold], check_finite: bool = False):
        super().__init__()
        self.folds = list(folds)
        self.check_finite = check_finite
        self.requantized: list[str] = []  # the bitsandbytes layers the last call requantized (rounded), in order

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        for fold in self.folds:
            if fold.target.kind not in WEIGHT_KINDS + QUANTIZED_KINDS:
                raise NotImplementedError(
                    f"layer {fold.target.name!r} is a {fold.target.kind} layer: merging or folding adapter "
                    f"{fold.adapter!r} into its weights is not supported; use the adapter unmerged"
                )
        new: dict[str, torch.Tensor] = {}
        quantized_folds: dict[str, list[Fold]] = {}
        for fold in self.folds:
            name = fold.target.name
            if fold.target.kind in QUANTIZED_KINDS:
                quantized_folds.setdefault(name, []).append(fold)
                continue
            keys = fold.tensor_names
            weight, bias = (None if key is None else new.get(key, tensor_at(graph_module, key, name)) for key in keys)
            weight, bias = fold_weight(weight, bias, fold.cols, fold.group_size, fold.target.kind)
            self._check_finite(fold, weight, bias)
            new.update((key, t) for key, t in zip(keys, (weight, bias)) if key is not None)
        layers = {name: self._fold_layer(graph_module.get_submodule(name), folds)
                  for name, folds in quantized_folds.items()}
        for key, value in new.items():
            assign_tensor(graph_module, key, value)
        for name, (layer, _) in layers.items():
            graph_module.set_submodule(name, layer)
        self.requantized = [name for name, (_, rounded) in layers.items() if rounded]
        return PassResult(graph_module, bool(new or layers))

    def _fold_layer(self, layer: nn.Module, folds: Sequence[Fold]) -> tuple[nn.Module, bool]:
        """The layer replacing bitsandbytes ``layer`` after ``folds``, and whether it was requantized (else
        restored)."""
        net = sum(-1 if fold.undo else 1 for fold in folds)
        if all(fold.undo == "exact" for fold in folds):
            original = bnb.restorable(layer, undone=-net)
            if original is not None:
                return original, False
        try:
            weight, bias = bnb.dequantize(layer), layer.bias
        except TypeError as e:
            raise TypeError(f"layer {folds[0].target.name!r} is a {folds[0].target.kind} target: {e}") from None
        for fold in folds:
            weight, bias = fold_weight(weight, bias, fold.cols, fold.group_size)
            self._check_finite(fold, weight, bias)
        return bnb.requantize(layer, weight, bias, folds=net), True

    def _check_finite(self, fold: Fold, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if self.check_finite and not all(t is None or torch.isfinite(t).all() for t in (weight, bias)):
            raise ValueError(f"safe_merge: adapter {fold.adapter!r} gives non-finite (NaN/inf) weights on layer "
                             f"{fold.target.name!r}; nothing was merged. The adapter seems broken: check its "
                             "parameters")


def requantization_warning(requantized: Sequence[str]) -> str:
    """The warning that requantizing the bitsandbytes layers ``requantized`` (``RotateWeights.requantized``) rounds."""
    return (f"requantizing {len(requantized)} bitsandbytes layer(s) ({', '.join(requantized[:3])}"
            f"{', …' if len(requantized) > 3 else ''}) rounds the rotated weights to their quantization grid: "
            "outputs differ slightly from the unmerged adapter's (warned once per adapted module)")


class StripRoad(PassBase):
    """Remove every RoAd rotation, its table, the ``road_index`` input and the ``road_adapters`` submodule;
    ``modules_to_save`` nodes become plain linears of the layer's (folded) weights."""

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        for node in list(graph.nodes):
            tag = tag_of(node)
            if isinstance(tag, RotationTag) and node.op == "call_function":
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                modified = True
            elif isinstance(tag, SavedTag):
                with graph.inserting_before(node):
                    linear = graph.call_function(torch.ops.aten.linear.default, node.args[:3])
                linear.meta.update({k: v for k, v in node.meta.items() if k != TAG_KEY})
                node.replace_all_uses_with(linear)
                graph.erase_node(node)
                modified = True
        for node in list(graph.nodes):
            is_table = node.op == "get_attr" and node.target.startswith(ADAPTERS_ATTR + ".")
            if is_table or (node.op == "placeholder" and node.target == INDEX_INPUT):
                graph.erase_node(node)
                modified = True
        left = [n.name for n in graph.nodes if is_tagged(n)]
        if left:
            raise NotImplementedError(f"fold: the graph has adapter nodes that cannot be folded: {left[:5]}")
        graph_module.delete_all_unused_submodules()
        return PassResult(graph_module, modified)
