"""Which row of the layers' tables a call reads: the ``road_index`` graph input, and keeping the tables current.

Every adapter has a slot (1, 2, … in the order adapters were added; 0 is ``__base__``, the identity); several
active adapters composed read the slot after the last. ``road_index`` is a 0-dim slot for the whole batch, a
``(batch,)`` tensor of slots for a mixed batch, or None when no adapter applies.

>>> road_index({"a": 1, "b": 2}, ["a"], ["b", "__base__"], batch_size=2, training=False).tolist()
[2, 0]
>>> int(road_index({"a": 1, "b": 2}, ["a", "b"], None, batch_size=2, training=False))  # composed: the next slot
3
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .config import BASE


def slots_of(adapters: Iterable[str]) -> dict[str, int]:
    """Adapter name -> its slot."""
    return {name: i + 1 for i, name in enumerate(adapters)}


def road_index(slots: Mapping[str, int], active: Sequence[str], adapter_names, batch_size: int | None,
               training: bool) -> torch.Tensor | None:
    """The ``road_index`` of a call with ``adapter_names`` (None: the ``active`` adapters); raises on bad names."""
    if adapter_names is None:
        if not active:
            return None
        return torch.tensor(slots[active[0]] if len(active) == 1 else len(slots) + 1)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names must be a list with one adapter name per sample, got {adapter_names!r}")
    if training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call .eval() first")
    if batch_size is not None and len(adapter_names) != batch_size:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} samples")
    unknown = sorted({n for n in adapter_names if n != BASE and n not in slots})
    if unknown:
        raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; known: {list(slots)} and {BASE!r}")
    return torch.tensor([0 if n == BASE else slots[n] for n in adapter_names])


class TableCache:
    """Rebuilds the layers' tables when the adapter parameters or the adapters changed since the last call, and on
    every call while adapter parameters train (their graph must reach the parameters)."""

    def __init__(self):
        self.generation = 0  # bumped whenever adapters, slots or the active adapters change
        self._key = None

    def changed(self) -> None:
        self.generation += 1

    def refresh(self, layers: Sequence[nn.Module], saved: Sequence[nn.Module], slots: Mapping[str, int],
                active: Sequence[str]) -> None:
        params = [p for layer in layers for p in layer.parameters()]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            key = None
        else:
            key = (self.generation, tuple((p._version, p.data_ptr()) for p in params))
            if key == self._key:
                return
        composed = active if len(active) > 1 else ()
        with contextlib.ExitStack() as stack:
            if key is not None:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.no_grad())
            for layer in layers:
                layer.rebuild_tables(slots, composed)
        for module in saved:
            module.set_slots(slots, composed)
        self._key = key
