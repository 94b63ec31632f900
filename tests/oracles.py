"""Oracles written as functions, made modules so ``fx_adapters.testing.assert_equivalent`` takes them as reference."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class Oracle(nn.Module):
    """``fn(*args, **kwargs)`` called like a model.

    It has no submodules, so ``assert_equivalent`` compares only its final outputs and names no layer on a
    mismatch. Deliberately: the layers ``fn`` runs are hooked by the oracles (RoAd, X-LoRA deltas) after
    ``assert_equivalent``'s recording hooks, which would record them before the oracle's change and so name
    the first adapted layer whatever diverges; and a per-sample oracle's layer outputs are not the batch's.
    """

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)
