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

    Without autograd the result is written into ``out`` (``y`` itself for an in-place rotation, which keeps
    a copy of ``y``'s partners; a fresh tensor otherwise) in four elementwise ops over ``(groups, 2, half)``
    views (a decode step's tiny tensors make each op's dispatch cost count), rounding as PEFT's ``y * first +
    rotate_half(y) * second`` does (no fused multiply-add: bit-equal in half precision too). With autograd a
    differentiable expression is used and ``out`` is ignored.
    """
    d, f = cols.select(-2, 0), cols.select(-2, 1)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (y.requires_grad or cols.requires_grad)):
        return y * d + swap(y, group_size) * f
    if out is None:
        out = torch.empty(torch.broadcast_shapes(y.shape, d.shape), dtype=y.dtype, device=y.device)
    pairs = _pairs(y, group_size)
    partners = pairs.flip(-2) * _pairs(f, group_size)  # before out is written: y may be out
    torch.mul(pairs, _pairs(d, group_size), out=_pairs(out, group_size)).add_(partners)  # PEFT's roundings (no fma)
    return out


def road_rotate(y: torch.Tensor, table: torch.Tensor, slot_map: torch.Tensor, index: torch.Tensor | None,
                group_size: int) -> torch.Tensor:
    """The graph op inserted after each adapted layer.

    ``table`` is ``(rows, 2, out)``: one row of columns per adapter of this layer, row 0 the identity;
    ``slot_map`` maps an adapter id to its row (0 for adapters that do not adapt this layer).
    ``index`` is a 0-dim adapter id (one adapter for the whole batch), a ``(batch,)`` tensor of ids (one adapter
    per sample: a single gather, no loop over adapters; dim 0 of ``y`` is batch-major) or ``None`` (adapters
    disabled). ``y`` is the layer's fresh output; it is rotated in place when autograd does not need it.
    """
    if index is None:
        return y
    if index.dim() == 0 and not torch.compiler.is_compiling():
        cols = table[int(slot_map[int(index)])]  # a view; inductor cannot trace the .item() this needs
    else:
        rows = slot_map.index_select(0, index.reshape(-1).to(slot_map.device))
        cols = table.index_select(0, rows)
        cols = cols.squeeze(0) if index.dim() == 0 else cols
    x = y.to(table.dtype)  # adapters compute in their own dtype (fp32 on a bf16 model), as PEFT does
    if index.dim() == 1:  # one row per sample; layers that fold the batch into dim 0 (OPT's MLP) work too
        x = x.reshape(index.shape[0], -1, x.shape[-1])
        cols = cols.unsqueeze(1)
    return rotate(x, cols, group_size, out=x).reshape(y.shape).to(y.dtype)
