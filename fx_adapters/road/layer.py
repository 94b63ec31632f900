"""RoadLayer: one adapted layer's RoAd parameters and the slot tables its graph nodes read.

Parameters are kept per adapter, named as in PEFT (``road_theta[adapter]``, ``road_alpha[adapter]``). The
graph never reads them directly: it reads ``table_g{group_size}``, a ``(slots, 2, out)`` stack of columns
(slot 0 the identity), rebuilt only when the parameters change (or on every forward while training).

>>> from fx_adapters.road.config import RoadConfig
>>> layer = RoadLayer(out_features=8)
>>> layer.add_adapter("a", RoadConfig(group_size=4, init_weights=False), torch.float32)
>>> layer.rebuild_tables({"a": 1})
>>> layer.table_g4.shape
torch.Size([2, 2, 8])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .rotation import compose, identity_columns, param_size, road_columns

TABLE_PREFIX = "table_g"  # a layer's table for group size g is its buffer ``table_g<g>``


def table_name(group_size: int) -> str:
    return f"{TABLE_PREFIX}{group_size}"


class RoadLayer(nn.Module):
    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.road_theta = nn.ParameterDict()
        self.road_alpha = nn.ParameterDict()
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}

    def ensure_table(self, group_size: int, device=None) -> str:
        """Create an identity table for ``group_size`` if missing; return its attribute name."""
        name = table_name(group_size)
        if not hasattr(self, name):
            self.register_buffer(name, identity_columns(self.out_features, device=device)[None], persistent=False)
        return name

    def group_sizes(self) -> list[int]:
        """The group sizes this layer has a table for."""
        return [int(k[len(TABLE_PREFIX):]) for k in self._buffers if k.startswith(TABLE_PREFIX)]

    def drop_table(self, group_size: int) -> None:
        delattr(self, table_name(group_size))

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
        del self.road_theta[adapter], self.road_alpha[adapter]
        del self.variant[adapter], self.group_size[adapter]

    def columns(self, adapter: str) -> torch.Tensor:
        """``(2, out)`` columns of ``adapter`` on this layer (differentiable in its parameters)."""
        return road_columns(self.variant[adapter], self.group_size[adapter],
                            self.road_theta[adapter], self.road_alpha[adapter])

    def rebuild_tables(self, slots: Mapping[str, int], composed: Sequence[str] = ()) -> None:
        """Refill every table: row ``slots[a]`` holds adapter ``a``'s columns, other rows the identity.

        With ``composed`` (several active adapters) one more row holds their product, applied in order, of
        those on this layer with the table's group size.
        """
        n_slots = max(slots.values(), default=0) + 1
        for group_size in self.group_sizes():
            name = table_name(group_size)
            old = getattr(self, name)
            identity = identity_columns(self.out_features, old.dtype, old.device)
            rows = [identity] * n_slots
            for adapter, slot in slots.items():
                if self.group_size.get(adapter) == group_size:
                    rows[slot] = self.columns(adapter).to(old.dtype)
            if composed:
                product = identity
                for adapter in composed:
                    if self.group_size.get(adapter) == group_size:
                        product = compose(rows[slots[adapter]], product, group_size)
                rows.append(product)
            self._buffers[name] = torch.stack(rows)
