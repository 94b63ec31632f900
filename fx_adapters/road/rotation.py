"""RoAd's rotation math, defined once and used by the rewritten graphs, merge and fold.

A RoAd adapter on a layer with ``out`` outputs splits them into groups of ``group_size`` and pairs element
``i`` of each group with element ``i + group_size/2``. Every pair is transformed by its own 2×2 block, so the
whole transform ``R`` is block-diagonal and is stored as two *columns* of length ``out``::

    cols[0] = d   (diagonal):      y'[i] = d[i] * y[i] + f[i] * y[partner(i)]
    cols[1] = f   (off-diagonal, sign folded in)

PEFT writes the same thing as ``y * first + rotate_half(y) * second`` with ``rotate_half = [-y2, y1]``;
here the minus sign of ``rotate_half`` lives in ``f`` so that a product or an inverse of such blocks is again
in this form (``compose`` and ``invert``), which is what fold and unfold need.

>>> import torch
>>> theta, alpha = torch.full((2,), 0.5), torch.ones(2)
>>> cols = road_columns("road_1", 4, theta, alpha)
>>> y = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
>>> back = rotate(rotate(y, cols, 4), invert(cols, 4), 4)
>>> torch.allclose(back, y, atol=1e-6)
True
"""

from __future__ import annotations

import torch

VARIANTS = ("road_1", "road_2", "road_4")


def param_size(variant: str, out_features: int) -> int:
    """Length of ``road_theta`` / ``road_alpha`` for a layer (PEFT's layout)."""
    return {"road_1": out_features // 2, "road_2": out_features, "road_4": 2 * out_features}[variant]


def _pairs(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """View the last dim as (groups, 2, group_size/2): index 0 of dim -2 is a pair's first element."""
    return t.unflatten(-1, (-1, 2, group_size // 2))


def swap(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each element's partner along the last dim (a copy)."""
    return _pairs(t, group_size).flip(-2).flatten(-3)


def road_columns(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Columns ``(2, out)`` of PEFT's RoAd transform for one adapter on one layer (differentiable)."""
    if variant == "road_1":
        theta = theta.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        first, second = alpha * theta.cos(), alpha * theta.sin()
    elif variant == "road_2":
        first, second = alpha * theta.cos(), alpha * theta.sin()
    elif variant == "road_4":
        theta = theta.reshape(-1, 2, group_size)
        alpha = alpha.reshape(-1, 2, group_size)
        first = (alpha[:, 0] * theta[:, 0].cos()).flatten()
        second = (alpha[:, 1] * theta[:, 1].sin()).flatten()
    else:
        raise ValueError(f"unknown RoAd variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    sign = torch.tensor([-1.0, 1.0], dtype=second.dtype, device=second.device)
    off = (_pairs(second, group_size) * sign[:, None]).flatten(-3)
    return torch.stack((first, off))


def identity_columns(out_features: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Columns of the identity transform (the ``__base__`` row of every table)."""
    cols = torch.zeros(2, out_features, dtype=dtype, device=device)
    cols[0] = 1.0
    return cols


def compose(outer: torch.Tensor, inner: torch.Tensor, group_size: int) -> torch.Tensor:
    """Columns of ``R_outer @ R_inner`` (apply ``inner`` first)."""
    d_o, f_o = outer
    d_i, f_i = inner
    return torch.stack((d_o * d_i + f_o * swap(f_i, group_size), d_o * f_i + f_o * swap(d_i, group_size)))


def determinants(cols: torch.Tensor, group_size: int) -> torch.Tensor:
    """Determinant of each element's 2×2 block (equal for both elements of a pair)."""
    d, f = cols
    return d * swap(d, group_size) - f * swap(f, group_size)


def invert(cols: torch.Tensor, group_size: int) -> torch.Tensor:
    """Columns of ``R⁻¹`` by the closed-form 2×2 inverse. Singular blocks give inf/nan: check ``determinants``."""
    d, f = cols
    det = determinants(cols, group_size)
    return torch.stack((swap(d, group_size) / det, -f / det))


def rotate(y: torch.Tensor, cols: torch.Tensor, group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the transform to the last dim of ``y``; ``cols`` is ``(..., 2, out)`` and broadcasts against ``y``.

    Without autograd the result is written into ``out`` (``y`` itself for an in-place rotation; a fresh tensor
    otherwise) and returned, half by half with one half-size temporary (what fold needs for a layer's weight; PEFT's
    rounding, as ``_rotate_pairs``). With autograd a differentiable expression is used and ``out`` is ignored.
    """
    d, f = _pair_columns(cols, group_size)
    pairs = _pairs(y, group_size)
    if _differentiable(pairs, d, f):
        return _rotate_pairs(pairs, d, f, None).flatten(-3)
    if out is None:
        out = torch.empty(torch.broadcast_shapes(y.shape, cols.shape[:-2] + cols.shape[-1:]), dtype=y.dtype,
                          device=y.device)
    (y0, y1), (o0, o1) = pairs.unbind(-2), _pairs(out, group_size).unbind(-2)
    (d0, d1), (f0, f1) = d.unbind(-2), f.unbind(-2)
    first = y0.clone() if out.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() else y0  # o0 may be y0
    scratch = torch.mul(y1, f0)  # one half-size temporary: a weight's full-size ones cost fresh pages per fold
    torch.mul(y0, d0, out=o0).add_(scratch)
    torch.mul(first, f1, out=scratch)
    torch.mul(y1, d1, out=o1).add_(scratch)
    return out


def _differentiable(*tensors: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _rotate_pairs(pairs: torch.Tensor, d: torch.Tensor, f: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``pairs * d + flip(pairs) * f`` over ``(..., groups, 2, half)`` views: PEFT's ``y * first + rotate_half(y) *
    second``, rounding as it does (no fused multiply-add: bit-equal in half precision too). Written into ``out``
    (which may be ``pairs``: the partners are copied first) in four elementwise ops, for calls without autograd (a
    decode step's tiny tensors make each op's dispatch cost count); with ``out`` None, a differentiable expression."""
    if out is None:
        return pairs * d + pairs.flip(-2) * f
    partners = pairs.flip(-2).mul_(f)  # the flip is a copy
    return torch.mul(pairs, d, out=out).add_(partners)


PairColumns = tuple[torch.Tensor, torch.Tensor]
"""A rotation's columns ``d`` and ``f`` as ``(groups, 2, half)`` views (one adapter for the batch) or
``(batch, 1, groups, 2, half)`` (one adapter per sample): what ``select_columns`` returns and ``rotate_selected``
applies."""


def road_rotate(y: torch.Tensor, table: torch.Tensor, slot_map: torch.Tensor, index: torch.Tensor | None,
                group_size: int) -> torch.Tensor:
    """The graph op inserted after each adapted layer: ``rotate_selected(y, select_columns(...))``.

    ``table`` is ``(rows, 2, out)``: one row of columns per adapter of this layer, row 0 the identity;
    ``slot_map`` maps an adapter id to its row (0 for adapters that do not adapt this layer).
    ``index`` is a 0-dim adapter id (one adapter for the whole batch), a ``(batch,)`` tensor of ids (one adapter
    per sample: a single gather, no loop over adapters; dim 0 of ``y`` is batch-major) or ``None`` (adapters
    disabled). ``y`` is the layer's fresh output; it is rotated in place when autograd does not need it.
    """
    return rotate_selected(y, select_columns(table, slot_map, index, group_size))


def select_columns(table: torch.Tensor, slot_map: torch.Tensor, index: torch.Tensor | None,
                   group_size: int) -> PairColumns | None:
    """The columns ``road_rotate`` applies for ``index`` (``None`` when adapters are disabled, or when one adapter for
    the batch does not adapt this layer: its row is 0, the identity): a decode loop selects them once per
    ``generate`` call (``rewrite.SelectColumnsAhead``)."""
    if index is None:
        return None
    if index.dim() == 0 and not torch.compiler.is_compiling():
        row = int(slot_map[int(index)])  # inductor cannot trace the .item() this needs
        if row == 0:
            return None
        cols = table[row]  # a view
    else:
        cols = table.index_select(0, slot_map.index_select(0, index.reshape(-1).to(slot_map.device)))
        cols = cols.squeeze(0) if index.dim() == 0 else cols.unsqueeze(1)
    return _pair_columns(cols, group_size)


def _pair_columns(cols: torch.Tensor, group_size: int) -> PairColumns:
    """``d`` and ``f`` of columns ``(..., 2, out)`` as ``(..., groups, 2, half)`` views."""
    return _pairs(cols.select(-2, 0), group_size), _pairs(cols.select(-2, 1), group_size)


def rotate_selected(y: torch.Tensor, columns: PairColumns | None) -> torch.Tensor:
    """``y`` (a layer's fresh output, rotated in place when autograd does not need it) rotated by ``columns``,
    computed in their dtype (fp32 adapters on a bf16 model, as PEFT does); ``y`` itself when ``columns`` is None.
    Layers that fold the batch into dim 0 (OPT's MLP) take per-sample columns too: dim 0 of ``y`` is batch-major."""
    if columns is None:
        return y
    d, f = columns
    x = (y if y.dtype == d.dtype else y.to(d.dtype)).contiguous()  # a decode step's no-op calls cost more than its math
    lead = (d.shape[0], -1) if d.dim() == 5 else x.shape[:-1]
    pairs = x.view(*lead, d.shape[-3], 2, d.shape[-1])
    if _differentiable(pairs, d, f):
        x = _rotate_pairs(pairs, d, f, None).view(y.shape)
    else:
        _rotate_pairs(pairs, d, f, pairs)  # into x
    return x if x.dtype == y.dtype else x.to(y.dtype)
