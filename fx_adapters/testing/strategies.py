"""Hypothesis strategies for property-based tests of compiled adapters (needs ``pip install hypothesis``).

Every strategy draws only valid values for the model it is given, and shrinks toward small cases: fewer
targets, the smallest group size, short batches, no padding.

>>> from hypothesis import find
>>> from fx_adapters.graph.match import Target
>>> layers = [Target("q", "linear", 8, 8, False, ("q",)), Target("k", "linear", 8, 4, False, ("k",))]
>>> cfg = find(road_configs(layers), lambda c: len(c.target_modules) == 2 and c.group_size > 2)
>>> cfg.group_size, sorted(cfg.target_modules)
(4, ['k', 'q'])
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd, pi

import torch
from hypothesis import strategies as st

from ..graph.match import Target
from ..graph.peft_files import PEFT_PREFIX
from ..road.config import BASE, RoadConfig
from ..road.rotation import VARIANTS, param_size


def _layers(layers_or_module) -> list[Target]:
    layers = getattr(layers_or_module, "linear_layers", layers_or_module)
    return list(layers)


def _even_divisors(n: int) -> list[int]:
    return [g for g in range(2, n + 1, 2) if n % g == 0]


@st.composite
def road_configs(draw, layers, *, variants: Sequence[str] = VARIANTS, max_targets: int = 4,
                 init_weights: bool = False) -> RoadConfig:
    """RoadConfigs that compile on a model: ``layers`` is ``am.linear_layers`` or a list of ``Target``."""
    candidates = [t for t in _layers(layers) if t.out_features % 2 == 0]
    chosen = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=max_targets, unique_by=lambda t: t.name))
    common = 0
    for t in chosen:
        common = gcd(common, t.out_features)
    return RoadConfig(
        variant=draw(st.sampled_from(list(variants))),
        group_size=draw(st.sampled_from(_even_divisors(common))),
        init_weights=init_weights,
        target_modules=[t.name for t in chosen],
    )


def adapter_assignments(names: Sequence[str], batch_size: int, *, base: bool = True) -> st.SearchStrategy[list]:
    """One adapter name per sample for a mixed batch (``"__base__"`` included unless ``base=False``)."""
    pool = list(names) + ([BASE] if base else [])
    return st.lists(st.sampled_from(pool), min_size=batch_size, max_size=batch_size)


@st.composite
def token_batches(draw, vocab_size: int, *, max_batch: int = 4, min_seq: int = 1, max_seq: int = 16,
                  padding: Sequence[str] = ("none", "left", "right"), min_attended: int = 1) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` with random tokens and optional left or right padding; every row keeps
    at least ``min_attended`` unpadded tokens (2 or more where one token would hide an adapter: attention over a
    single token ignores its query)."""
    if not 1 <= min_attended <= min_seq:
        raise ValueError(f"token_batches: min_attended must be in [1, min_seq={min_seq}], got {min_attended}")
    batch = draw(st.integers(1, max_batch))
    seq = draw(st.integers(min_seq, max_seq))
    seed = draw(st.integers(0, 2**16))
    ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    side = draw(st.sampled_from(list(padding)))
    if side != "none" and seq > min_attended:
        for row in range(batch):
            pad = draw(st.integers(0, seq - min_attended))
            if side == "left":
                mask[row, :pad] = 0
            else:
                mask[row, seq - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@st.composite
def road_state_dicts(draw, targets: Sequence[Target], variant: str, *, min_abs_alpha: float = 0.1
                     ) -> dict[str, torch.Tensor]:
    """Random RoAd parameters in PEFT's checkpoint layout, for ``am.load_adapter(state, name)``.

    θ is spread over (-π, π) at a drawn scale; every α has magnitude ≥ ``min_abs_alpha`` (so the rotation
    stays invertible) and a random sign.
    """
    seed = draw(st.integers(0, 2**16))
    theta_scale = draw(st.floats(0.0, pi))
    alpha_spread = draw(st.floats(0.0, 2.0))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for t in targets:
        size = param_size(variant, t.out_features)
        theta = (torch.rand(size, generator=g) * 2 - 1) * theta_scale
        magnitude = min_abs_alpha + alpha_spread * torch.rand(size, generator=g)
        sign = torch.where(torch.rand(size, generator=g) < 0.5, -1.0, 1.0)
        state[f"{PEFT_PREFIX}{t.name}.road_theta"] = theta
        state[f"{PEFT_PREFIX}{t.name}.road_alpha"] = magnitude * sign
    return state
