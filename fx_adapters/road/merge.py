"""Merge adapters into an ``AdaptedModule``'s weights, fold one into a standalone GraphModule, and back.

``merge``/``unmerge`` work in place with PEFT's semantics; ``fold`` returns a new ``torch.fx.GraphModule``
with the base model's graph and folded weights, called like the model; ``unfold`` recovers the base weights from a
folded module. All of them rotate weight rows with the closed-form 2×2 blocks of ``fold.py``. ``MergeState`` holds
what a module has merged and does the work on the graph module and the ``Fold``s it is given.

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
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from ..graph.graph_module import assign_tensor, copy_graph_module, outside_inference_mode, tensor_at
from ..graph.passes import DefaultAttentionMask, RebuildOutput, run_passes
from .fold import WEIGHT_KINDS, Fold, RotateWeights, StripRoad, requantization_warning

FOLDED_ADAPTER = "folded_adapter"  # key of ``GraphModule.meta`` recording which adapter ``fold`` folded

Merge = tuple[str, tuple[Fold, ...]]  # an adapter and its rotations, one per layer


class MergeState:
    """The adapters merged into a graph module's weights, in merge order, the dense weights and biases from before
    the first merge (what an exact ``unmerge`` puts back; they are the captured tensors, which the model the module
    was compiled from holds anyway), and the layer tensors their ``modules_to_save`` copies replaced.

    Merging, folding or inverse-based undoing into bitsandbytes layers requantizes them, which rounds: a
    ``UserWarning`` says so the first time (``merge``, ``unmerge``, ``fold`` or ``unfold``), not again (exact undos
    restore the original layers and never warn).
    """

    def __init__(self):
        self.merges: tuple[Merge, ...] = ()
        self.unsaved: tuple[dict[str, torch.Tensor], ...] = ()  # per merge: the tensors the copies replaced
        self.unrotated: dict[str, torch.Tensor] = {}  # dense weight / bias name -> the tensor before the first merge
        self.warned_requantization = False

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.merges]

    def runs_merged(self, adapter_names, disabled: bool) -> bool:
        """Whether a call runs on merged weights (then without rotations); raises what PEFT raises for a call
        with ``adapter_names`` or disabled adapters while adapters are merged."""
        if not self.merges:
            return False
        if adapter_names is not None:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge()` "
                             "first.")
        if disabled:
            raise ValueError(f"disable_adapters(): adapters {self.names} are merged into the weights; call "
                             "unmerge() first")
        return True

    def rotate(self, gm: torch.fx.GraphModule, folds: Sequence[Fold], check_finite: bool = False) -> None:
        """``RotateWeights(folds)`` on ``gm``, warning if it requantized layers and this state never warned."""
        rotate = RotateWeights(folds, check_finite)
        rotate(gm)
        if rotate.requantized and not self.warned_requantization:
            self.warned_requantization = True
            warnings.warn(requantization_warning(rotate.requantized), UserWarning, stacklevel=4)

    @outside_inference_mode
    def merge(self, gm: torch.fx.GraphModule, names: Sequence[str], folds: Callable[[str], tuple[Fold, ...]],
              copies_of: Callable[[Sequence[str]], dict[str, torch.Tensor]], safe: bool) -> None:
        """Merge the adapters ``names`` not merged yet (a warning lists them, as PEFT's): rotate ``gm``'s weights by
        their ``folds(name)`` (checked finite when ``safe``: then nothing changes on an error) and put their
        ``modules_to_save`` copies (``copies_of(names)``: layer tensor name -> tensor) in place."""
        todo = [name for name in dict.fromkeys(names) if name not in self.names]
        if self.merges:
            warnings.warn(f"Already merged: {self.names}. "
                          + (f"Now additionally merging {todo}." if todo else "Nothing to do."), stacklevel=3)
        merges = [(name, folds(name)) for name in todo]
        copies = copies_of(todo)
        unrotated = {fqn: tensor_at(gm, fqn, f.target.name) for _, folds in merges for f in folds
                     if f.target.kind in WEIGHT_KINDS for fqn in f.tensor_names if fqn and fqn not in self.unrotated}
        self.rotate(gm, [f for _, folds in merges for f in folds], safe)
        originals = {fqn: gm.get_parameter(fqn) for fqn in copies}
        assign_all(gm, copies)
        self.merges += tuple(merges)
        self.unsaved += (originals,)
        self.unrotated.update(unrotated)

    @outside_inference_mode
    def unmerge(self, gm: torch.fx.GraphModule, exact: bool) -> None:
        """Undo every merge: ``exact``, put back the dense tensors from before the first merge (and undo
        bitsandbytes folds by ``Fold.inverse(exact=True)``); else, as PEFT, apply the inverse of the rotations
        merged (kept from merge time), last first."""
        inverse = [fold.inverse(exact) for _, folds in reversed(self.merges) for fold in reversed(folds)
                   if not (exact and fold.target.kind in WEIGHT_KINDS)]
        self.rotate(gm, inverse)
        if exact:
            assign_all(gm, self.unrotated)
        for originals in reversed(self.unsaved):
            assign_all(gm, originals)
        self.merges, self.unsaved, self.unrotated = (), (), {}

    def fold(self, gm: torch.fx.GraphModule, names: Sequence[str], folds: Sequence[Fold],
             copies: Mapping[str, torch.Tensor], out_spec) -> torch.fx.GraphModule:
        """A copy of ``gm`` with ``folds`` and ``copies`` in its weights and no adapter nodes, called like the model
        (``attention_mask`` optional) and returning its output type (``graph.passes.DefaultAttentionMask``,
        ``RebuildOutput``); records ``names`` in its ``meta``."""
        folded = copy_graph_module(gm)
        self.rotate(folded, folds)
        assign_all(folded, copies)
        run_passes(folded, [StripRoad(), DefaultAttentionMask(), RebuildOutput(out_spec)])
        folded.meta[FOLDED_ADAPTER] = list(names)
        return folded

    @outside_inference_mode
    def unfold(self, folded: torch.fx.GraphModule, names: Sequence[str], inverse: Sequence[Fold]
               ) -> torch.fx.GraphModule:
        """A copy of ``folded`` (left unchanged) with ``inverse`` rotations applied; refuses other ``names`` than
        those ``fold`` recorded."""
        recorded = folded.meta.get(FOLDED_ADAPTER)
        if recorded is not None and list(recorded) != list(names):
            raise ValueError(f"unfold: this module was folded with adapters {list(recorded)}, not {list(names)}; "
                             f"unfolding it with others would give wrong weights")
        base = copy_graph_module(folded)
        self.rotate(base, inverse)
        return base


def folded_adapters(folded: torch.fx.GraphModule) -> list[str] | None:
    """The adapters ``fold`` folded into ``folded`` (None for a module ``fold`` did not make)."""
    recorded = folded.meta.get(FOLDED_ADAPTER)
    return None if recorded is None else list(recorded)


def saved_copies(parameters: Iterable[Mapping[tuple[str, str], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Layer tensor name -> a detached copy of the ``modules_to_save`` weight or bias, from adapters' parameters
    (``AdaptedModule.adapter_parameters``) in order: the last adapter saving a layer wins."""
    return {f"{path}.{param}": tensor.detach().clone() for params in parameters
            for (path, param), tensor in params.items() if param in ("weight", "bias")}


def assign_all(gm: torch.fx.GraphModule, tensors: Mapping[str, torch.Tensor]) -> None:
    for fqn, tensor in tensors.items():
        assign_tensor(gm, fqn, tensor)


def unfold(folded: torch.fx.GraphModule, am, adapter_name: str | Sequence[str] | None = None,
           exact: bool = True) -> torch.fx.GraphModule:
    """The base model back from ``folded = am.fold(adapter_name)``: a copy whose folded weights are recovered
    with the inverse rotations of ``am``'s parameters for those adapters (last first); every other tensor is
    shared. Same as ``am.unfold(folded, adapter_name, exact)``.

    ``adapter_name`` (a name or a list) defaults to what ``fold`` recorded, else ``am``'s active adapters.
    bitsandbytes layers: ``exact=True`` gives back layers holding ``am``'s own quantized weights (shared, bit for
    bit), ``exact=False`` requantizes ``R⁻¹`` times the dequantized folded weights (rounds again).
    Raises ``NotInvertibleError`` naming the layer when a rotation is singular; ``folded`` is never modified.
    """
    return am.unfold(folded, adapter_name, exact)
