"""RoadLayer: one adapted layer's RoAd parameters and the tables its graph nodes read.

Parameters are kept per adapter, named as in PEFT (``road_theta[adapter]``, ``road_alpha[adapter]``). The
graph never reads them directly: for each group size ``g`` it reads two buffers,

- ``table_g{g}``: a ``(rows, 2, out)`` stack of columns, row 0 the identity, one row per adapter of group
  size ``g`` that adapts *this* layer (plus one for a composition of active adapters), grown geometrically;
- ``slots_g{g}``: a ``(capacity,)`` int64 slot map, adapter id (``road_index``, the same for every layer) →
  its row in this table (0, the identity, for adapters that do not adapt this layer).

So memory is O(adapted (layer, adapter) pairs), and adding, refreshing or deleting an adapter writes only its
own rows (``write``, ``release``): the cost of a call or an add does not grow with the number of adapters.
Rows of deleted adapters are reused; the table shrinks when most of its rows are free.

>>> from fx_adapters.road.config import RoadConfig
>>> layer = RoadLayer(out_features=8)
>>> layer.add_adapter("a", RoadConfig(group_size=4, init_weights=False), torch.float32)
>>> layer.grow_ids(4)  # adapter ids 0..3
>>> layer.write("a", 3)
>>> layer.slots_g4.tolist(), layer.table_g4.shape[1:]
([0, 0, 0, 1], torch.Size([2, 8]))
>>> layer.release(3, 4)
>>> layer.slots_g4.tolist()
[0, 0, 0, 0]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from .rotation import compose, identity_columns, param_size, road_columns

TABLE_PREFIX = "table_g"  # a layer's table for group size g is its buffer ``table_g<g>``
SLOTS_PREFIX = "slots_g"  # and its slot map (adapter id -> row) ``slots_g<g>``
GROWTH = 1.5  # tables and slot maps grow by this factor (geometric: amortized O(1) rows written per add)
MIN_ROWS = 2


def table_name(group_size: int) -> str:
    return f"{TABLE_PREFIX}{group_size}"


def slots_name(group_size: int) -> str:
    return f"{SLOTS_PREFIX}{group_size}"


def grown(size: int, needed: int) -> int:
    """The size a table or slot map of ``size`` entries grows to so that it holds ``needed``."""
    while size < needed:
        size = max(int(size * GROWTH), size + MIN_ROWS)
    return size


def writable():
    """Table upkeep runs outside autograd and outside inference mode (so that a table made inside
    ``torch.inference_mode()`` can still be written in place after it)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


class RoadLayer(nn.Module):
    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.road_theta = nn.ParameterDict()
        self.road_alpha = nn.ParameterDict()
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}
        self.rows: dict[int, dict[int, int]] = {}  # group size -> adapter id -> row
        self.free: dict[int, list[int]] = {}  # group size -> free rows (reused first)
        self.ids: dict[str, int] = {}  # adapter -> its id, while it has a row

    # ------------------------------------------------------------------ tables
    def ensure_table(self, group_size: int, device=None, capacity: int = 1) -> str:
        """Create an identity table and an all-identity slot map for ``group_size`` if missing; return the
        table's attribute name."""
        name = table_name(group_size)
        if not hasattr(self, name):
            with writable():
                table = identity_columns(self.out_features, device=device)[None].repeat(MIN_ROWS, 1, 1)
                self.register_buffer(name, table, persistent=False)
                self.register_buffer(slots_name(group_size), torch.zeros(capacity, dtype=torch.long, device=device),
                                     persistent=False)
            self.rows[group_size], self.free[group_size] = {}, list(range(MIN_ROWS - 1, 0, -1))
        return name

    def group_sizes(self) -> list[int]:
        """The group sizes this layer has a table for."""
        return [int(k[len(TABLE_PREFIX):]) for k in self._buffers if k.startswith(TABLE_PREFIX)]

    def drop_table(self, group_size: int) -> None:
        delattr(self, table_name(group_size))
        delattr(self, slots_name(group_size))
        del self.rows[group_size], self.free[group_size]

    def table(self, group_size: int) -> torch.Tensor:
        return getattr(self, table_name(group_size))

    def slot_map(self, group_size: int) -> torch.Tensor:
        return getattr(self, slots_name(group_size))

    def grow_ids(self, capacity: int) -> None:
        """Make every slot map hold ``capacity`` adapter ids (new ids read the identity)."""
        for group_size in self.group_sizes():
            old = self.slot_map(group_size)
            if old.shape[0] < capacity:
                with writable():
                    new = torch.zeros(capacity, dtype=old.dtype, device=old.device)
                    new[:old.shape[0]] = old
                self._buffers[slots_name(group_size)] = new

    def _row_for(self, group_size: int, adapter_id: int) -> int:
        """The row of ``adapter_id`` in the table, assigned (a free row, or a grown table) if it has none."""
        rows = self.rows[group_size]
        if adapter_id in rows:
            return rows[adapter_id]
        free = self.free[group_size]
        if not free:
            old = self.table(group_size)
            size = grown(old.shape[0], old.shape[0] + 1)
            with writable():
                new = old.new_empty(size, *old.shape[1:])
                new[:old.shape[0]] = old
                new[old.shape[0]:] = identity_columns(self.out_features, old.dtype, old.device)
            self._buffers[table_name(group_size)] = new
            free.extend(range(size - 1, old.shape[0] - 1, -1))
        rows[adapter_id] = row = free.pop()
        return row

    def _put(self, group_size: int, adapter_id: int, cols: torch.Tensor) -> None:
        with writable():
            row = self._row_for(group_size, adapter_id)
            self.table(group_size)[row] = cols
            self.slot_map(group_size)[adapter_id] = row  # last: a reader of this id sees a complete row

    def write(self, adapter: str, adapter_id: int) -> None:
        """Write ``adapter``'s current columns into its row (assigned on the first write) under ``adapter_id``."""
        self.ids[adapter] = adapter_id
        with torch.no_grad():
            self._put(self.group_size[adapter], adapter_id, self.columns(adapter))

    def write_composed(self, adapter_id: int, names: Sequence[str]) -> None:
        """Write, for each table, the product of the columns of ``names`` (applied in order) of its group size on
        this layer under ``adapter_id`` (the identity where none of them is)."""
        for group_size in self.group_sizes():
            if not any(self.group_size.get(name) == group_size for name in names):
                continue
            with writable():
                product = identity_columns(self.out_features, self.table(group_size).dtype,
                                           self.table(group_size).device)
                for name in names:
                    if self.group_size.get(name) == group_size:
                        product = compose(self.columns(name).to(product.dtype), product, group_size)
            self._put(group_size, adapter_id, product)

    def release(self, adapter_id: int, group_size: int | None = None) -> None:
        """Free ``adapter_id``'s row in the tables (in one group size's table, or all): its id reads the identity
        again, the row is reused; a table mostly free shrinks."""
        for size in [group_size] if group_size is not None else self.group_sizes():
            row = self.rows.get(size, {}).pop(adapter_id, None)
            if row is None:
                continue
            with writable():
                self.slot_map(size)[adapter_id] = 0
            self.free[size].append(row)
            self._maybe_shrink(size)

    def _maybe_shrink(self, group_size: int) -> None:
        """Compact a table whose rows in use are under a quarter of its size (memory returns on delete)."""
        table, rows = self.table(group_size), self.rows[group_size]
        if table.shape[0] <= 2 * MIN_ROWS or 4 * (len(rows) + 1) > table.shape[0]:
            return
        size = grown(MIN_ROWS, 2 * (len(rows) + 1))
        with writable():
            new = identity_columns(self.out_features, table.dtype, table.device)[None].repeat(size, 1, 1)
            order = sorted(rows.items(), key=lambda item: item[1])
            slot_map = self.slot_map(group_size).clone()
            for row, (adapter_id, old_row) in enumerate(order, start=1):
                new[row] = table[old_row]
                slot_map[adapter_id] = row
            self._buffers[table_name(group_size)] = new
            self._buffers[slots_name(group_size)] = slot_map
        self.rows[group_size] = {adapter_id: row for row, (adapter_id, _) in enumerate(order, start=1)}
        self.free[group_size] = list(range(size - 1, len(order), -1))

    def differentiable(self, adapters: Sequence[str], composed: tuple[int, Sequence[str]] | None) -> None:
        """For a training step: each table that ``adapters`` (or the composition ``(id, names)``) have rows in
        becomes a copy whose rows are their columns as functions of their parameters (the other rows detached);
        ``detach`` makes them plain tables again."""
        for group_size in self.group_sizes():
            rows, cols = [], []
            for name in adapters:
                if self.group_size.get(name) == group_size and name in self.ids:
                    rows.append(self.rows[group_size][self.ids[name]])
                    cols.append(self.columns(name))
            if composed is not None and composed[0] in self.rows[group_size]:
                product = identity_columns(self.out_features, self.table(group_size).dtype,
                                           self.table(group_size).device)
                for name in composed[1]:
                    if self.group_size.get(name) == group_size:
                        product = compose(self.columns(name), product, group_size)
                rows.append(self.rows[group_size][composed[0]])
                cols.append(product)
            if rows:
                index = torch.tensor(rows, device=self.table(group_size).device)
                base = self.table(group_size).detach()
                self._buffers[table_name(group_size)] = base.index_copy(0, index, torch.stack(cols).to(base.dtype))

    def detach(self) -> None:
        """Drop the autograd history ``differentiable`` gave the tables (their values stay)."""
        for group_size in self.group_sizes():
            self._buffers[table_name(group_size)] = self.table(group_size).detach()

    # ------------------------------------------------------------------ parameters
    def add_adapter(self, adapter: str, config, dtype: torch.dtype, device=None) -> None:
        """Create PEFT-initialised parameters (identity when ``init_weights``, else θ~N(0,.5²), α~N(1,.5²))."""
        size = param_size(config.variant, self.out_features)
        theta = torch.zeros(size, dtype=dtype, device=device)
        alpha = torch.ones(size, dtype=dtype, device=device)
        if not config.init_weights:
            nn.init.normal_(theta, mean=0.0, std=0.5)
            nn.init.normal_(alpha, mean=1.0, std=0.5)
        self.road_theta[adapter] = nn.Parameter(theta)
        self.road_alpha[adapter] = nn.Parameter(alpha)
        self.variant[adapter] = config.variant
        self.group_size[adapter] = config.group_size
        self.ensure_table(config.group_size, device)

    def remove_adapter(self, adapter: str) -> None:
        if adapter in self.ids:
            self.release(self.ids.pop(adapter), self.group_size[adapter])
        del self.road_theta[adapter], self.road_alpha[adapter]
        del self.variant[adapter], self.group_size[adapter]

    def columns(self, adapter: str) -> torch.Tensor:
        """``(2, out)`` columns of ``adapter`` on this layer (differentiable in its parameters)."""
        return road_columns(self.variant[adapter], self.group_size[adapter],
                            self.road_theta[adapter], self.road_alpha[adapter])
