"""Which row of the layers' tables a call reads (the ``road_index`` graph input), and keeping the tables current
without work that grows with the number of adapters.

Every adapter has an *id* (1, 2, …; ids of deleted adapters are reused; 0 is ``__base__``, the identity), the same
on every layer; each layer maps ids to rows of its own tables (``RoadLayer``), so an adapter has rows only where
it adapts. Several active adapters composed get one more id, whose rows hold their product. ``road_index`` is a
0-dim id for the whole batch, a ``(batch,)`` tensor of ids for a mixed batch, or None when no adapter applies.

Rows are written when an adapter is added or loaded and when its parameters change: the parameters of
*watched* adapters (the active ones, which train, and those whose tensors ``adapter_parameters`` handed out) are
compared with their version counters at each call; a training step makes only the active adapters' rows
differentiable. A call costs O(batch + watched adapters' layers), an add or a delete O(its layers).

>>> slots = AdapterSlots()
>>> slots.ids.update({"a": 1, "b": 2})
>>> slots.index(["a"], ["b", "__base__"], None, batch_size=2, training=False).tolist()
[2, 0]
>>> int(slots.index(["a"], None, "b", batch_size=2, training=False))
2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..graph.match import layer_key
from .config import BASE
from .layer import RoadLayer, grown
from .modules_to_save import saved_modules
from .rewrite import road_layers


class AdapterSlots:
    """Adapter ids and the bookkeeping that keeps every layer's rows current (see the module docstring)."""

    def __init__(self):
        self.ids: dict[str, int] = {}  # adapter -> id
        self.free: list[int] = []  # ids of deleted adapters, reused first
        self.capacity = 1  # ids the slot maps hold (id 0 included)
        self.layers: dict[str, tuple[str, ...]] = {}  # adapter -> the layers it rotates (module paths)
        self.saved: dict[str, tuple[str, ...]] = {}  # adapter -> the layers it keeps a copy of
        self.composed: tuple[int, tuple[str, ...]] | None = None  # (id, adapters) of the active composition
        self.composed_layers: tuple[str, ...] = ()  # the layers it has rows on
        self.watched: dict[str, tuple[int, ...]] = {}  # adapter -> its parameters' versions at the last write
        self.graded: list[RoadLayer] = []  # layers whose tables a training step made differentiable
        self.params: dict[str, list[nn.Parameter]] = {}  # adapter -> its road parameters (cache)

    # ------------------------------------------------------------------ ids
    def _new_id(self, gm: torch.fx.GraphModule) -> int:
        used = len(self.ids) + (self.composed is not None)
        new = self.free.pop() if self.free else used + 1
        if new >= self.capacity:
            self.capacity = grown(self.capacity, new + 1)
            for layer in road_layers(gm).values():
                layer.grow_ids(self.capacity)
        return new

    def _layer(self, gm: torch.fx.GraphModule, name: str) -> RoadLayer:
        layer = road_layers(gm)[layer_key(name)]
        layer.grow_ids(self.capacity)  # a layer created after the slot maps last grew
        return layer

    def assign(self, gm: torch.fx.GraphModule, adapter: str, layers: Sequence[str], saved: Sequence[str]) -> None:
        """Give a new adapter an id and write its rows on its ``layers`` (and its copies' id on ``saved``)."""
        adapter_id = self._new_id(gm)
        self.ids[adapter] = adapter_id
        self.layers[adapter], self.saved[adapter] = tuple(layers), tuple(saved)
        self.write(gm, adapter)
        for name in saved:
            saved_modules(gm)[layer_key(name)].set_slot(adapter_id, adapter)

    def write(self, gm: torch.fx.GraphModule, adapter: str) -> None:
        """Write ``adapter``'s rows from its current parameters (and the composition's, if it is part of it)."""
        for name in self.layers[adapter]:
            self._layer(gm, name).write(adapter, self.ids[adapter])
        if adapter in self.watched:
            self.watched[adapter] = self._versions(gm, adapter)
        if self.composed is not None and adapter in self.composed[1]:
            self._write_composed(gm)

    def release(self, gm: torch.fx.GraphModule, adapter: str) -> None:
        """Forget a deleted adapter: its rows are freed by its layers, its id is reused."""
        adapter_id = self.ids.pop(adapter)
        for name in self.saved.pop(adapter):
            saved_modules(gm)[layer_key(name)].clear_slot(adapter_id)
        del self.layers[adapter]
        self.watched.pop(adapter, None)
        self.params.pop(adapter, None)
        self.free.append(adapter_id)

    def compose(self, gm: torch.fx.GraphModule, active: Sequence[str]) -> None:
        """The composition of the ``active`` adapters (when there are several) gets an id and its rows; a
        previous composition's are freed. The active adapters are watched."""
        if self.composed is not None:
            old_id = self.composed[0]
            layers = road_layers(gm)
            for name in self.composed_layers:
                if layer_key(name) in layers:
                    layers[layer_key(name)].release(old_id)
            for module in saved_modules(gm).values():
                module.clear_slot(old_id)
            self.composed, self.composed_layers = None, ()
            self.free.append(old_id)
        for name in active:
            self.watch(gm, name)
        if len(active) < 2:
            return
        self.composed = (self._new_id(gm), tuple(active))
        self.composed_layers = tuple(dict.fromkeys(n for a in active for n in self.layers[a]))
        self._write_composed(gm)
        owner = next((a for a in active if self.saved[a]), None)
        for name in self.saved.get(owner, ()):
            saved_modules(gm)[layer_key(name)].set_slot(self.composed[0], owner)

    def _write_composed(self, gm: torch.fx.GraphModule) -> None:
        adapter_id, active = self.composed
        for name in self.composed_layers:
            self._layer(gm, name).write_composed(adapter_id, active)

    def loaded(self, module: nn.Module, _keys) -> None:
        """After ``module.load_state_dict`` (a hook): every adapter's rows from its parameters as loaded."""
        for adapter in self.ids:
            self.write(module.graph_module, adapter)

    # ------------------------------------------------------------------ per call
    def watch(self, gm: torch.fx.GraphModule, adapter: str) -> None:
        """Compare ``adapter``'s parameters with their versions at each call from now on."""
        if adapter not in self.watched:
            self.watched[adapter] = self._versions(gm, adapter)

    def _params(self, gm: torch.fx.GraphModule, adapter: str) -> list[nn.Parameter]:
        if adapter not in self.params:  # cached: a call reads them for the watched adapters
            layers = [road_layers(gm)[layer_key(name)] for name in self.layers[adapter]]
            self.params[adapter] = [p for layer in layers
                                    for p in (layer.road_theta[adapter], layer.road_alpha[adapter])]
        return self.params[adapter]

    def _versions(self, gm: torch.fx.GraphModule, adapter: str) -> tuple[int, ...]:
        return tuple(p._version if not p.is_inference() else -1 for p in self._params(gm, adapter))

    def sync(self, gm: torch.fx.GraphModule, active: Sequence[str]) -> None:
        """Bring the tables up to date before a call: rewrite the rows of watched adapters whose parameters
        changed; when autograd is on and the active adapters' parameters require grad (training), make their rows
        differentiable."""
        for layer in self.graded:
            layer.detach()
        self.graded = []
        for adapter, versions in self.watched.items():
            if self._versions(gm, adapter) != versions:
                self.write(gm, adapter)
        if torch.is_grad_enabled() and any(p.requires_grad for a in active for p in self._params(gm, a)):
            names = dict.fromkeys(n for a in active for n in self.layers[a])
            self.graded = [road_layers(gm)[layer_key(name)] for name in names]
            for layer in self.graded:
                layer.differentiable(active, self.composed)

    def road_input(self, gm: torch.fx.GraphModule, active: Sequence[str], adapter_names, adapter_name: str | None,
                   batch_size: int | None, training: bool, disabled: bool, merge_state) -> torch.Tensor | None:
        """``AdaptedModule.road_input``: the ``road_index`` of a call (None: no rotation), its rows up to date."""
        per_call = adapter_names if adapter_name is None else [adapter_name]
        if merge_state.runs_merged(per_call, disabled):
            return None  # the merged weights, no rotation
        index = self.index(active, adapter_names, adapter_name, batch_size, training)
        if index is None or disabled:
            return None
        self.sync(gm, active)
        return index

    def index(self, active: Sequence[str], adapter_names, adapter_name: str | None, batch_size: int | None,
              training: bool) -> torch.Tensor | None:
        """The ``road_index`` of a call: ``adapter_name`` (one adapter or ``"__base__"`` for the whole batch),
        ``adapter_names`` (one per sample), else the ``active`` adapters; raises on bad names."""
        if adapter_name is not None:
            if adapter_names is not None:
                raise ValueError("pass either adapter_name (one for the whole batch) or adapter_names (one per "
                                 "sample), not both")
            if adapter_name != BASE and adapter_name not in self.ids:
                raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; known: {list(self.ids)} and "
                                 f"{BASE!r}")
            return torch.tensor(0 if adapter_name == BASE else self.ids[adapter_name])
        if adapter_names is None:
            if not active:
                return None
            return torch.tensor(self.ids[active[0]] if len(active) == 1 else self.composed[0])
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list with one adapter name per sample, got {adapter_names!r} "
                            "(adapter_name= takes one name for the whole batch)")
        if training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call .eval() first")
        if batch_size is not None and len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} samples")
        try:
            return torch.tensor([0 if n == BASE else self.ids[n] for n in adapter_names])
        except KeyError:
            unknown = sorted({n for n in adapter_names if n != BASE and n not in self.ids})
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; known: {list(self.ids)} and "
                             f"{BASE!r}") from None
