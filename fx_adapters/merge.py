"""Merge adapters into an ``AdaptedModule``'s weights, fold one into a standalone GraphModule, and back.

``merge``/``unmerge`` work in place with PEFT's semantics; ``fold`` returns a new ``torch.fx.GraphModule``
with the base model's graph and folded weights; ``unfold`` recovers the base weights from a folded module.
All of them rotate weight rows with the closed-form 2×2 blocks of ``passes/fold.py``.

>>> import torch, fx_adapters as fxa
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules=["0"], init_weights=False))
>>> x = torch.randn(3, 4)
>>> expected = am(x)
>>> am.merge()
>>> torch.allclose(am(x), expected, atol=1e-6)
True
>>> am.unmerge()
>>> folded = am.fold()
>>> torch.allclose(folded(x), expected, atol=1e-6)
True
>>> torch.allclose(fxa.unfold(folded, am)(x), model(x), atol=1e-6)
True
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .passes import run_passes
from .passes.fold import (
    Fold, PlainOutput, RotateWeights, StripRoad, assign_tensor, copy_graph_module, requantization_warning,
)
from .passes.rewrite import layer_key

FOLDED_ADAPTER = "folded_adapter"  # key of ``GraphModule.meta`` recording which adapter ``fold`` folded


class MergeMixin:
    """``merge``, ``unmerge`` and ``fold`` of ``AdaptedModule``.

    While adapters are merged, forward computes with the merged weights and no rotation (whatever adapter is
    active); passing ``adapter_names`` or running under ``disable_adapters()`` raises until ``unmerge()``.

    Merging, folding or inverse-based undoing into bitsandbytes layers requantizes them, which rounds: a
    ``UserWarning`` says so the first time this module does it (``merge``, ``unmerge``, ``fold`` or ``unfold``),
    not again (exact undos restore the original layers and never warn).
    """

    _merged: tuple[tuple[str, tuple[Fold, ...]], ...] = ()  # (adapter, the rotations merged), in merge order
    _unsaved: tuple[dict[str, torch.Tensor], ...] = ()  # per merge: layer tensors replaced by modules_to_save copies
    _warned_requantization: bool = False  # whether this module warned that requantizing rounds

    def _rotate_weights(self, gm: torch.fx.GraphModule, folds: Sequence[Fold], check_finite: bool = False) -> None:
        """``RotateWeights(folds)`` on ``gm``, warning if it requantized layers and this module never warned."""
        rotate = RotateWeights(folds, check_finite)
        rotate(gm)
        if rotate.requantized and not self._warned_requantization:
            self._warned_requantization = True
            warnings.warn(requantization_warning(rotate.requantized), UserWarning, stacklevel=3)

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the weights, in merge order."""
        return [name for name, _ in self._merged]

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the weights."""
        return bool(self._merged)

    def _folds(self, adapter_name: str) -> tuple[Fold, ...]:
        """The rotation of ``adapter_name`` on each of its layers (current parameters, no autograd)."""
        group_size = self.peft_config[adapter_name].group_size
        layers = self._road_layers()
        with torch.no_grad():
            return tuple(Fold(t, layers[layer_key(t.name)].columns(adapter_name), group_size, adapter_name)
                         for t in self.adapter_targets(adapter_name))

    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: the active one) into the weights, in the given order.

        Adapters already merged are skipped with a warning, as in PEFT. The merged weights are new tensors
        (the captured ones share storage with the caller's model and are never written). With
        ``safe_merge=True`` a non-finite result raises ``ValueError`` and nothing changes.
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"merge: adapter_names should be a list of strings, got {adapter_names!r}")
        if adapter_names is None:
            adapter_names = list(self._active)
        for name in adapter_names:
            self._check_known(name, "merge")
        todo = [name for name in dict.fromkeys(adapter_names) if name not in self.merged_adapters]
        if self.merged:
            warnings.warn(f"Already merged: {self.merged_adapters}. "
                          + (f"Now additionally merging {todo}." if todo else "Nothing to do."), stacklevel=2)
        merges = tuple((name, self._folds(name)) for name in todo)
        self._rotate_weights(self.graph_module, [f for _, folds in merges for f in folds], safe_merge)
        originals = {fqn: self.graph_module.get_parameter(fqn) for fqn in self._saved_copies(todo)}
        _assign_all(self.graph_module, self._saved_copies(todo))
        self._merged += merges
        self._unsaved += (originals,)

    def unmerge(self, exact: bool = True) -> None:
        """Undo every merge, last first, by the inverse of the rotations merged (their ``(2, out)`` columns are
        kept from merge time: later changes to the adapter parameters do not matter).

        bitsandbytes layers: ``exact=True`` puts back the quantized layers from before the merge, bit for bit;
        ``exact=False`` requantizes ``R⁻¹`` times their dequantized merged weights, as PEFT (rounds again).
        Raises ``NotInvertibleError`` naming the layer (weights unchanged) when a merged rotation is singular.
        """
        if not self._merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        inverse = [fold.inverse(exact) for _, folds in reversed(self._merged) for fold in reversed(folds)]
        self._rotate_weights(self.graph_module, inverse)
        for originals in reversed(self._unsaved):
            _assign_all(self.graph_module, originals)
        self._merged, self._unsaved = (), ()

    def fold(self, adapter_name: str | Sequence[str] | None = None) -> torch.fx.GraphModule:
        """A standalone ``torch.fx.GraphModule`` computing the model with adapters folded in.

        ``adapter_name`` is a name or a list composed in order (default: the active adapters). The module
        holds the base graph (no RoAd nodes, no fx_adapters code), new tensors for the folded weights and
        biases, and shares every other tensor with this module. Call it with the model's tensor inputs, all
        of them (no defaults), positionally (``inspect.signature(folded.forward)``) or by name, e.g.
        ``folded(input_ids=ids, attention_mask=mask)``. It returns the model's output in built-in containers:
        ``{"logits": ...}`` for a transformers ``ModelOutput``, a tensor for a module returning one (see
        ``passes.fold.PlainOutput``).
        """
        names = self._adapter_list(adapter_name, "fold")
        if self._merged:
            raise ValueError(f"fold: adapters {self.merged_adapters} are merged into this module's weights; call "
                             "unmerge() first (fold starts from the base weights)")
        folded = copy_graph_module(self.graph_module)
        self._rotate_weights(folded, [f for name in names for f in self._folds(name)])
        _assign_all(folded, self._saved_copies(names))
        run_passes(folded, [StripRoad(), PlainOutput(self._captured.out_spec)])
        folded.meta[FOLDED_ADAPTER] = names
        return folded

    def _saved_copies(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Layer tensor name -> a detached copy of the ``modules_to_save`` copy of the last of ``names`` saving it."""
        copies = {}
        for name in names:
            for (path, param), tensor in self._adapter_tensors(name).items():
                if param in ("weight", "bias"):
                    copies[f"{path}.{param}"] = tensor.detach().clone()
        return copies

    def _adapter_list(self, adapter_name: str | Sequence[str] | None, where: str) -> list[str]:
        names = list(self._active) if adapter_name is None else (
            [adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        if not names:
            raise ValueError(f"{where}: no adapter is active; name one")
        for name in names:
            self._check_known(name, where)
        return names

    def _merged_forward(self, adapter_names) -> bool:
        """Whether forward runs on merged weights (then without rotations); raises what PEFT raises."""
        if not self._merged:
            return False
        if adapter_names is not None:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge()` "
                             "first.")
        if self._disabled:
            raise ValueError(f"disable_adapters(): adapters {self.merged_adapters} are merged into the weights; call "
                             "unmerge() first")
        return True


def _assign_all(gm: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    for fqn, tensor in tensors.items():
        assign_tensor(gm, fqn, tensor)


def unfold(folded: torch.fx.GraphModule, am: MergeMixin, adapter_name: str | Sequence[str] | None = None,
           exact: bool = True) -> torch.fx.GraphModule:
    """The base model back from ``folded = am.fold(adapter_name)``: a copy whose folded weights are recovered
    with the inverse rotations of ``am``'s parameters for those adapters (last first); every other tensor is
    shared.

    ``adapter_name`` (a name or a list) defaults to what ``fold`` recorded, else ``am``'s active adapters.
    bitsandbytes layers: ``exact=True`` gives back layers holding ``am``'s own quantized weights (shared, bit for
    bit), ``exact=False`` requantizes ``R⁻¹`` times the dequantized folded weights (rounds again).
    Raises ``NotInvertibleError`` naming the layer when a rotation is singular; ``folded`` is never modified.
    """
    recorded = folded.meta.get(FOLDED_ADAPTER)
    names = am._adapter_list(adapter_name if adapter_name is not None else recorded, "unfold")
    if recorded is not None and list(recorded) != names:
        raise ValueError(f"unfold: this module was folded with adapters {list(recorded)}, not {names}; "
                         f"unfolding it with others would give wrong weights")
    base = copy_graph_module(folded)
    am._rotate_weights(base, [fold.inverse(exact) for name in reversed(names) for fold in reversed(am._folds(name))])
    return base
