"""The rotation math against PEFT's own functions and dense linear algebra."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from peft.tuners.road.layer import _apply_road, _get_delta_weight

from fx_adapters.road.rotation import (
    compose,
    determinants,
    identity_columns,
    invert,
    param_size,
    road_columns,
    road_rotate,
    rotate,
)

layer_shapes = st.sampled_from([2, 4, 8, 16]).flatmap(
    lambda g: st.tuples(st.just(g), st.integers(1, 4).map(lambda k: g * k))
)
variants = st.sampled_from(["road_1", "road_2", "road_4"])


def random_params(variant, out, seed):
    g = torch.Generator().manual_seed(seed)
    size = param_size(variant, out)
    return torch.randn(size, generator=g) * 0.5, 1 + 0.5 * torch.randn(size, generator=g)


def dense(cols, group_size):
    """The out×out matrix of a set of columns, built entry by entry."""
    d, f = cols
    out = d.numel()
    h = group_size // 2
    m = torch.zeros(out, out, dtype=d.dtype)
    for i in range(out):
        partner = i + h if (i % group_size) < h else i - h
        m[i, i] = d[i]
        m[i, partner] = f[i]
    return m


@given(variants, layer_shapes, st.integers(0, 1000))
def test_rotate_equals_peft_apply_road(variant, shape, seed):
    group_size, out = shape
    theta, alpha = random_params(variant, out, seed)
    y = torch.randn(3, 5, out, generator=torch.Generator().manual_seed(seed))
    expected = _apply_road(variant, group_size, theta, alpha, y)
    got = rotate(y.clone(), road_columns(variant, group_size, theta, alpha), group_size)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@given(variants, layer_shapes, st.integers(0, 1000))
def test_columns_describe_peft_dense_matrix(variant, shape, seed):
    group_size, out = shape
    theta, alpha = random_params(variant, out, seed)
    expected = _get_delta_weight(variant, group_size, theta, alpha)
    torch.testing.assert_close(dense(road_columns(variant, group_size, theta, alpha), group_size), expected)


@given(variants, layer_shapes, st.integers(0, 1000))
def test_in_place_fresh_and_differentiable_paths_equal_peft_apply_road(variant, shape, seed):
    """``out=y`` (rotated in place, as the graph op does), ``out`` a fresh tensor, ``out=None`` and autograd."""
    group_size, out = shape
    theta, alpha = random_params(variant, out, seed)
    cols = road_columns(variant, group_size, theta, alpha)
    y = torch.randn(4, out, generator=torch.Generator().manual_seed(seed))
    expected = _apply_road(variant, group_size, theta, alpha, y)
    buffer = y.clone()
    assert rotate(buffer, cols, group_size, out=buffer) is buffer  # written into y itself
    fresh = torch.empty_like(y)
    assert rotate(y, cols, group_size, out=fresh) is fresh
    table, slot_map = torch.stack((identity_columns(out), cols)), torch.tensor([0, 1])
    layer_output = y.clone()
    with torch.no_grad():  # the graph op's path: the layer's fresh output rotated in place
        selected = road_rotate(layer_output, table, slot_map, torch.tensor(1), group_size)
    for got in (buffer, fresh, rotate(y, cols, group_size), rotate(y.clone().requires_grad_(), cols, group_size),
                selected):
        torch.testing.assert_close(got.detach(), expected, atol=1e-6, rtol=1e-6)


@given(variants, variants, layer_shapes, st.integers(0, 1000))
def test_compose_is_the_matrix_product(v1, v2, shape, seed):
    group_size, out = shape
    a = road_columns(v1, group_size, *random_params(v1, out, seed))
    b = road_columns(v2, group_size, *random_params(v2, out, seed + 1))
    expected = dense(b, group_size) @ dense(a, group_size)
    torch.testing.assert_close(dense(compose(b, a, group_size), group_size), expected, atol=1e-5, rtol=1e-5)


@given(variants, layer_shapes, st.integers(0, 1000))
def test_invert_is_the_matrix_inverse(variant, shape, seed):
    group_size, out = shape
    cols = road_columns(variant, group_size, *random_params(variant, out, seed)).double()
    if determinants(cols, group_size).abs().min() < 1e-3:
        return  # too close to singular for a meaningful dense comparison
    expected = torch.linalg.inv(dense(cols, group_size))
    torch.testing.assert_close(dense(invert(cols, group_size), group_size), expected, atol=1e-8, rtol=1e-6)


def test_identity_columns_leave_output_unchanged():
    y = torch.randn(2, 8)
    torch.testing.assert_close(rotate(y.clone(), identity_columns(8), 4), y, atol=0, rtol=0)


def test_road_rotate_gathers_one_row_per_sample_through_the_slot_map():
    table = torch.stack([identity_columns(4), road_columns("road_2", 4, torch.ones(4), torch.full((4,), 2.0))])
    slot_map = torch.tensor([0, 0, 1])  # adapter id 2 -> row 1; id 1 does not adapt this layer
    y = torch.randn(3, 2, 4)
    got = road_rotate(y.clone(), table, slot_map, torch.tensor([2, 1, 2]), 4)
    torch.testing.assert_close(got[1], y[1])
    torch.testing.assert_close(got[0], _apply_road("road_2", 4, torch.ones(4), torch.full((4,), 2.0), y[0]))


def test_road_rotate_without_index_is_the_identity():
    y = torch.randn(2, 4)
    assert road_rotate(y, torch.zeros(1, 2, 4), torch.zeros(1, dtype=torch.long), None, 4) is y


def test_road_rotate_computes_in_table_dtype_and_returns_layer_dtype():
    theta, alpha = torch.full((4,), 0.3), torch.full((4,), 1.1)
    table = torch.stack([identity_columns(8), road_columns("road_1", 4, theta, alpha)])
    y = torch.randn(2, 8).to(torch.bfloat16)
    got = road_rotate(y, table, torch.tensor([0, 1]), torch.tensor(1), 4)
    assert got.dtype == torch.bfloat16
    expected = _apply_road("road_1", 4, theta, alpha, y.float()).to(torch.bfloat16)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_an_adapter_that_does_not_adapt_the_layer_leaves_its_output_untouched():
    """Slot 0 (the identity row) is skipped, not multiplied: an inf in a partner stays an inf, where ``inf * 0`` would
    make its pair NaN. PEFT applies nothing to a layer the active adapter does not adapt."""
    table = torch.stack((identity_columns(4), road_columns("road_1", 4, torch.ones(2), torch.ones(2))))
    slot_map = torch.tensor([0, 1])  # adapter 0 does not adapt this layer, adapter 1 does
    y = torch.tensor([[1.0, float("inf"), 3.0, 4.0]])
    with torch.no_grad():
        assert torch.equal(road_rotate(y.clone(), table, slot_map, torch.tensor(0), 4), y)
