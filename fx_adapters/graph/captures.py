"""One compiled module, many captures: a graph per call signature, like ``torch.compile``'s guards.

A compiled module holds one rewritten graph (its ``graph_module``, the *primary* capture: the inputs it was compiled
with, eval mode) and the adapter state. A call with another ``CallSignature`` (other inputs such as ``labels`` or
``token_type_ids``, flags such as ``return_dict=False``, train mode, another dtype or device) captures the model
again for that signature on first use, gives that graph the method's rewrite (``build``: RoAd's ``apply_road``,
X-LoRA's ``xlora_passes``) and reuses it. Built graphs read every tensor they share with the primary graph module
from it at call time (``graph_module.read_from``), so adapter parameters, tables, merges and ``.to()`` apply to all
captures; a build is redone when the method's ``key`` (what the rewrite depends on, e.g. which layers carry which
adapters) changed. Each new capture is logged at debug level on the ``fx_adapters`` logger.

>>> import torch, transformers, fx_adapters as fxa
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                                num_attention_heads=2, num_key_value_heads=1)
>>> model = transformers.LlamaForCausalLM(cfg).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules="all-linear", init_weights=False))
>>> ids = torch.randint(0, 64, (2, 5))
>>> loss = am(input_ids=ids, labels=ids).loss           # a second capture, with labels
>>> [str(s) for s in am.captures.signatures]   # doctest: +NORMALIZE_WHITESPACE
['(input_ids, attention_mask) eval float32 cpu', '(input_ids, attention_mask, labels) eval float32 cpu']
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from .capture import CapturedModel, CaptureError, capture
from .graph_module import outside_inference_mode, owned_copy, parameters_of, read_from
from .signature import CallSignature, bind_call

__all__ = ["Captures", "example_inputs"]

logger = logging.getLogger("fx_adapters")

EXAMPLE_SIZES = (2, 8)  # batch and sequence of the example inputs: sizes > 1, or export specializes them
Build = Callable[[torch.fx.GraphModule, nn.Module], torch.fx.GraphModule]  # (fresh capture, source model) -> rewrite
OutSpec = Callable[[pytree.TreeSpec], pytree.TreeSpec]  # the model's output spec -> a rewritten graph's


def example_inputs(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Example inputs of shape (2, 8, …) built from a call's own tensors (rows and positions repeated or cut, so
    token ids and labels stay valid); ``attention_mask`` all ones."""
    examples = {}
    for name, value in values.items():
        example = value
        for dim, size in enumerate(EXAMPLE_SIZES[:value.dim()]):
            example = example.index_select(dim, torch.arange(size, device=value.device) % value.shape[dim])
        examples[name] = torch.ones_like(example) if name == "attention_mask" else example
    return examples


class Captures:
    """The captures of one compiled module (module docstring). ``model`` is the model it was compiled from (kept as a
    structural copy sharing its parameters; None: only the primary signature can be served)."""

    def __init__(self, primary: CapturedModel, model: nn.Module | None, dtype: torch.dtype, device: torch.device):
        self.primary_captured = primary
        self.model = None if model is None else owned_copy(model).eval()
        self.primary = CallSignature(tuple((n, 2, False) for n in primary.input_names), (), False,
                                     str(dtype).removeprefix("torch."), str(torch.device(device)))
        self._raw: dict[CallSignature, CapturedModel] = {}
        self._built: dict[tuple[CallSignature, str], tuple[object, torch.fx.GraphModule]] = {}

    @classmethod
    def of(cls, primary: CapturedModel, model: nn.Module) -> Captures:
        """The captures of a module compiled from ``model``: new signatures only for ``torch.export`` captures of
        transformers models (``capture``'s own method for them)."""
        exported = primary.method == "export" and hasattr(model, "config")
        return cls(primary, model if exported else None, *parameters_of(model))

    @property
    def signatures(self) -> list[CallSignature]:
        """Every signature this module has a graph for, the primary first, then in capture order."""
        return [self.primary, *self._raw]

    def signature(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[CallSignature, dict]:
        """The signature of a call of ``module`` (its parameters' dtype and device, its mode) and the call's tensor
        inputs by name. Raises the model's ``TypeError`` for an input it does not take (nothing is captured)."""
        if self.model is None:
            return self.primary, self.primary_captured.bind(args, kwargs)
        values, flags = bind_call(self.model, args, kwargs)
        order = list(self.primary_captured.signature.parameters)
        if "input_ids" in values and "attention_mask" not in values and "attention_mask" in order:
            values["attention_mask"] = torch.ones_like(values["input_ids"])  # the model's default: every token counts
        values = dict(sorted(values.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
        dtype, device = parameters_of(module)
        return CallSignature.of(values, flags, training=module.training, dtype=dtype, device=device), values

    @outside_inference_mode
    def graph(self, signature: CallSignature, values: dict, key, build: Build, source: nn.Module,
              variant: str = "") -> torch.fx.GraphModule:
        """The graph for ``signature`` rewritten by ``build`` for the current ``key``, reading ``source``'s tensors;
        captured on first use (raises ``CaptureError`` naming the input or flag). A method with several rewrites of
        one capture (X-LoRA's, and the base model while adapters are disabled) names each one's ``variant``."""
        if signature not in self._raw:
            self._raw[signature] = self._capture(signature, values)
            logger.debug("fx_adapters: captured %s for call signature %s", type(self.model).__name__, signature)
        built_key, built = self._built.get((signature, variant), (None, None))
        if built is None or built_key != key:
            built = read_from(build(self._raw[signature].graph_module, self.model), source)
            self._built[signature, variant] = (key, built)
        return built

    def _capture(self, signature: CallSignature, values: dict) -> CapturedModel:
        flags = dict(signature.flags)
        if flags.get("use_cache"):
            raise CaptureError(f"cannot capture {type(self.model).__name__} with use_cache=True in forward: the "
                               "captured graph returns no cache; call with use_cache=False, or use generate(), "
                               "which keeps the model's KV cache")
        bad = [n for n, v in flags.items() if not isinstance(v, (bool, int, float, str))]
        if bad:
            raise CaptureError(f"cannot capture {type(self.model).__name__} for argument {bad[0]!r} "
                               f"({type(flags[bad[0]]).__name__}): only tensors and bool / int / float / str flags "
                               "can be captured; leave it out")
        dtype = getattr(torch, signature.dtype)
        model = self.model
        if (signature.dtype, signature.device) != (self.primary.dtype, self.primary.device):
            model = owned_copy(model).to(device=signature.device, dtype=dtype)
        return capture(model, example_kwargs={**example_inputs(values), **flags}, training=signature.training)

    def call(self, signature: CallSignature, graph: torch.fx.GraphModule, values: dict, extra: tuple = (),
             out_spec: OutSpec | None = None):
        """Run ``graph`` (the graph of ``signature``) on a call's inputs; returns the model's output type, or what
        ``out_spec`` makes of the model's output spec when the rewrite returns more (X-LoRA: ``(output,
        scalings)``)."""
        captured = self.primary_captured if signature == self.primary else self._raw[signature]
        if out_spec is not None:
            captured = dataclasses.replace(captured, out_spec=out_spec(captured.out_spec))
        if signature == self.primary:
            return captured.call(graph, **values, extra=extra)
        flat = graph(*(values[n] for n in captured.input_names), *extra)
        return pytree.tree_unflatten(list(flat), captured.out_spec)

    def __getstate__(self):  # pickles keep the primary graph only (the model may hold unpicklable hooks)
        return {**self.__dict__, "model": None, "_raw": {}, "_built": {}}
