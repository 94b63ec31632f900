"""SavedLinear: PEFT's ``modules_to_save`` for a linear layer, as one graph node.

Each adapter that lists the layer in ``modules_to_save`` gets its own trainable copy of the weight and bias.
The graph calls ``SavedLinear(x, weight, bias, road_index)`` in place of the layer, with the layer's own
(frozen) weight and bias as arguments: the slot in ``road_index`` picks the copy (slot 0, ``__base__``,
disabled adapters and adapters without a copy use the layer itself). A mixed batch runs each copy present
in the batch on its samples, as PEFT does.

>>> import torch
>>> layer = SavedLinear()
>>> w, b = torch.ones(2, 3), torch.zeros(2)
>>> layer.add_copy("a", w, b)
>>> layer.set_slots({"a": 1})
>>> with torch.no_grad():
...     _ = layer.weight["a"].mul_(2)
>>> x = torch.ones(2, 3)
>>> layer(x, w, b, torch.tensor([1, 0])).tolist()
[[6.0, 6.0], [3.0, 3.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F


class SavedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        self.by_slot: dict[int, str] = {}

    def add_copy(self, adapter: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """A trainable copy of the layer's weight (and bias) for ``adapter``."""
        self.weight[adapter] = nn.Parameter(weight.detach().clone())
        if bias is not None:
            self.bias[adapter] = nn.Parameter(bias.detach().clone())

    def remove_copy(self, adapter: str) -> None:
        del self.weight[adapter]
        if adapter in self.bias:
            del self.bias[adapter]

    def set_slots(self, slots: Mapping[str, int], composed: Sequence[str] = ()) -> None:
        """Which slot of ``road_index`` selects which adapter's copy (slots without a copy use the layer).

        With ``composed`` (several active adapters) the slot after the last one is theirs: the copy of the
        one among them that has a copy.
        """
        self.by_slot = {slot: name for name, slot in slots.items() if name in self.weight}
        owner = next((name for name in composed if name in self.weight), None)
        if owner is not None:
            self.by_slot[max(slots.values()) + 1] = owner

    def _params(self, name: str | None, weight, bias):
        if name is None:
            return weight, bias
        return self.weight[name], self.bias[name] if bias is not None else None

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                index: torch.Tensor | None) -> torch.Tensor:
        if index is None or index.dim() == 0:
            name = None if index is None else self.by_slot.get(int(index))
            return F.linear(x, *self._params(name, weight, bias))
        out = F.linear(x, weight, bias)
        rows_in = x.reshape(index.shape[0], -1, x.shape[-1])  # batch-major, like road_rotate
        rows_out = out.view(index.shape[0], -1, out.shape[-1])
        for slot, name in self.by_slot.items():
            picked = index == slot
            if picked.any():
                rows_out[picked] = F.linear(rows_in[picked], *self._params(name, weight, bias))
        return out
