"""bitsandbytes 8-bit / 4-bit linear layers as weights: dequantize, requantize, and keep the original.

Folding a rotation into a quantized layer (``road/fold.py``) dequantizes its weight to fp32, rotates it, and
builds a *new* layer holding ``R·W`` quantized with the old layer's own settings: 8-bit ``Int8Params`` with
its ``has_fp16_weights`` and the layer's ``threshold``; 4-bit ``Params4bit`` with its ``quant_type``,
``blocksize``, ``compress_statistics``, ``quant_storage`` and quant-state dtype, the layer's
``compute_dtype``. Requantizing rounds ``R·W`` to the quantization grid. The old layer is never written.

The new layer remembers the layer the folds started from (``Original``), so folds can be undone two ways:

* exact: put the original layer back (``restorable``): the same tensors, so every packed byte and quant-state
  tensor is bit for bit what it was, even for grids where requantizing is lossy (fp4);
* inverse-based, as PEFT: apply ``R⁻¹`` to the dequantized weight and requantize, which rounds again.

bitsandbytes is never imported here: a bitsandbytes layer means it is loaded already.

>>> import pytest, torch
>>> bnb = pytest.importorskip("bitsandbytes")
>>> layer = bnb.nn.Linear8bitLt(8, 4, has_fp16_weights=False).to("cpu")  # .to() quantizes
>>> weight = dequantize(layer)
>>> weight.dtype, weight.shape
(torch.float32, torch.Size([4, 8]))
>>> new = requantize(layer, 2 * weight, layer.bias, folds=1)
>>> torch.equal(dequantize(new), dequantize(requantize(layer, 2 * weight, layer.bias)))
True
>>> restorable(new, undone=1) is layer
True
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch
from torch import nn

_ORIGINAL = "_fx_adapters_original"
KINDS = ("bnb8", "bnb4")  # the ``Target.kind`` of bitsandbytes 8-bit / 4-bit layers (``match.layer_kind``)


def linear_types() -> tuple[type, ...]:
    """``(Linear8bitLt, Linear4bit)`` if bitsandbytes is loaded, else ``()``.

    A model holding bitsandbytes layers has imported it already, so this never imports it (which costs
    seconds and logs a notice about the optional ``kernels`` package).
    """
    bnb = sys.modules.get("bitsandbytes")
    return (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit) if bnb is not None else ()


@dataclass(frozen=True)
class Original:
    """The quantized layer a chain of folds started from, and how many folds (net of undone ones) away it is.

    Held as a plain attribute of the requantized layer: ``.to()``, ``state_dict()`` and ``named_modules()``
    do not see it. It shares every tensor with the layer it was when folded (no copy).
    """

    layer: nn.Module
    folds: int


def _is_8bit(layer: nn.Module) -> bool:
    types = linear_types()  # loaded if `layer` is a bitsandbytes layer: never imported here
    if not types or not isinstance(layer, types):
        raise TypeError(f"expected a bitsandbytes Linear8bitLt or Linear4bit layer, got {type(layer).__name__}")
    return isinstance(layer, types[0])


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The weight ``[out, in]`` that ``layer`` computes with, as a new fp32 tensor.

    8-bit: ``CB · SCB / 127`` (or the fp16 weight when ``has_fp16_weights``). 4-bit: the blockwise dequantization
    of the packed weight, also after bitsandbytes repacked it for its CPU kernel (the first eval forward on a
    CPU with AVX512-BF16 does, in place; absmax is then rounded to bf16, which the layer computes with).
    """
    is_8bit = _is_8bit(layer)
    F = sys.modules["bitsandbytes"].functional
    weight = layer.weight
    if is_8bit:
        if layer.state.has_fp16_weights:
            return weight.detach().float().clone()
        scb = weight.SCB if weight.SCB is not None else layer.state.SCB  # moved to state by the first forward
        return F.int8_vectorwise_dequant(weight.data, scb).float()
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # Repacked for the CPU kernel: absmax is bf16 in (in / blocksize, out) layout. bitsandbytes' own inverse
        # (0.50) leaves it in that layout unless nested, and requantizes it if nested: unpack only the bytes.
        state = copy.deepcopy(state)  # the inverse rewrites the state it is given
        absmax = state.absmax.T.reshape(-1).float()
        state.original_nested = False
        data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
        state.absmax = absmax
    return F.dequantize_4bit(data, state).float()


def requantize(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, folds: int = 0) -> nn.Module:
    """A new layer like ``layer`` holding ``weight`` (``[out, in]``) quantized with ``layer``'s settings, and ``bias``.

    ``layer`` is not modified and the new layer shares no weight with it (``bias`` is used as given). ``folds``
    is how many folds ``weight`` applies to ``layer``'s weight (negative for undone ones): the new layer
    remembers the original of the chain while it is a positive number of folds away (see ``restorable``).
    """
    is_8bit, bnb = _is_8bit(layer), sys.modules["bitsandbytes"]
    new = copy.copy(layer)
    new._parameters = dict(layer._parameters)  # own containers: assigning below leaves `layer` alone
    new.__dict__.pop(_ORIGINAL, None)
    old = layer.weight
    device = old.device
    if is_8bit:
        fp16_weights = layer.state.has_fp16_weights
        data = weight.to(old.dtype) if fp16_weights else weight  # Int8Params quantizes fp weights on .to(device)
        new.weight = bnb.nn.Int8Params(data.cpu(), requires_grad=old.requires_grad,
                                       has_fp16_weights=fp16_weights).to(device)
        new.state = bnb.MatmulLtState()  # as Linear8bitLt.__init__ makes it; the first forward fills it
        new.state.threshold, new.state.has_fp16_weights = layer.state.threshold, fp16_weights
        new.state.use_pool = layer.state.use_pool
    else:
        dtype = getattr(old.quant_state, "original_dtype", old.quant_state.dtype)  # before any CPU repacking
        new.weight = bnb.nn.Params4bit(weight.to(dtype).cpu(), requires_grad=False, blocksize=old.blocksize,
                                       compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                       quant_storage=old.quant_storage, module=new).to(device)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
    kept = original(layer)
    count = (kept.folds if kept else 0) + folds
    if count > 0:
        setattr(new, _ORIGINAL, Original(kept.layer if kept else layer, count))
    return new


def original(layer: nn.Module) -> Original | None:
    """What ``layer`` remembers of the layer its folds started from (None for a layer that was not folded)."""
    return layer.__dict__.get(_ORIGINAL)


def restorable(layer: nn.Module, undone: int) -> nn.Module | None:
    """The original layer if undoing ``undone`` folds of ``layer`` undoes all of them, else None."""
    kept = original(layer)
    return kept.layer if kept is not None and kept.folds == undone else None
