"""Capture a transformers causal LM with its KV cache as explicit graph inputs and outputs, for generation.

``capture_with_cache(model)`` exports ONE flat graph like ``capture``'s (parameters at the model's FQNs,
``nn_module_stack`` relative to the model, bitsandbytes layers opaque) that serves the prompt and every decode step::

    step(input_ids, attention_mask, position_ids, key_0, value_0, …) -> (logits, key_0, value_0, key_1, …)

``input_ids`` and ``position_ids`` are ``(batch, new)``, ``attention_mask`` covers the past and the new positions,
and each cache tensor is ``(batch, kv_heads, past, head_dim)``; the graph returns them ``new`` positions longer (the
model's ``DynamicCache``, concatenated inside the graph). Batch, ``new`` and ``past`` are dynamic: the prompt runs
with an empty past (``empty_cache``: ``past`` = 0) and a decode step with ``new`` = 1, both exactly as the model
(checked on Llama, Qwen2, GPT-2, OPT: the export is made at sizes ≥ 2 and bakes no branch on them).
``position_ids`` is an input only when the model's ``forward`` takes it (as in ``generate``).

>>> import torch, transformers
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                                num_attention_heads=2, num_key_value_heads=1)
>>> model = transformers.LlamaForCausalLM(cfg).eval()
>>> graphs = capture_with_cache(model)
>>> graphs.input_names, graphs.cache_names
(('input_ids', 'attention_mask', 'position_ids'), ('key_0', 'value_0'))
>>> ids = torch.randint(0, 64, (1, 5))
>>> logits, *cache = graphs.step(ids[:, :4], torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None],
...                              *graphs.empty_cache(1, ids.device))
>>> logits, *cache = graphs.step(ids[:, 4:], torch.ones(1, 5, dtype=torch.long), torch.tensor([[4]]), *cache)
>>> cache[0].shape
torch.Size([1, 1, 5, 8])
>>> torch.allclose(logits[:, -1], model(ids).logits[:, -1], atol=1e-5)
True
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from .capture import WRAPPED, CaptureError, bnb_stand_ins, capture_error, flat_graph_module
from .graph_module import mark_non_persistent_buffers, owned_copy

__all__ = ["CacheGraphs", "cache_argument", "capture_with_cache", "is_causal_lm"]


@dataclass
class CacheGraphs:
    """The cached step graph of a model (module docstring)."""

    step: torch.fx.GraphModule
    input_names: tuple[str, ...]
    """The model inputs the graph takes first: ``input_ids``, ``attention_mask`` and maybe ``position_ids``."""
    cache_names: tuple[str, ...]
    """The cache tensors, in the order the graph takes them after the model inputs and returns them."""
    cache_shapes: tuple[tuple[int, int], ...]
    """``(kv_heads, head_dim)`` of each cache tensor."""
    cache_dtype: torch.dtype

    def empty_cache(self, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The past of a prompt: every cache tensor with no positions."""
        return tuple(torch.empty(batch, heads, 0, dim, dtype=self.cache_dtype, device=device)
                     for heads, dim in self.cache_shapes)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model with an output head (what ``capture_with_cache`` captures)."""
    transformers = sys.modules.get("transformers")
    return (transformers is not None and isinstance(model, transformers.PreTrainedModel)
            and model.get_output_embeddings() is not None)


class _CacheInputs(nn.Module):
    """Calls the model on flat tensors — its inputs, then the past keys and values — with ``use_cache=True``; returns
    the logits and the new cache, flat."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        setattr(self, WRAPPED, model)
        self.names = names
        self.cache_arg = cache_argument(model)

    def forward(self, *inputs):
        from transformers import DynamicCache

        inputs, past = inputs[:len(self.names)], inputs[len(self.names):]
        cache = DynamicCache(list(zip(past[::2], past[1::2])))
        out = getattr(self, WRAPPED)(**dict(zip(self.names, inputs)), **{self.cache_arg: cache}, use_cache=True)
        return (out.logits, *_flat_cache(out))


def cache_argument(model: nn.Module) -> str:
    """The name of ``model.forward``'s KV-cache argument: ``cache`` from transformers 5.24, ``past_key_values``
    before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _flat_cache(output) -> list[torch.Tensor]:
    """The keys and values of a model output's KV cache (``output.cache`` or, before transformers 5.24,
    ``output.past_key_values``), flat: key_0, value_0, key_1, …"""
    cache = output.get("cache") if "cache" in output else output.get("past_key_values")  # no deprecation warning
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise CaptureError(f"the model returned a {type(cache).__name__} without per-layer keys and values; only "
                           "attention caches (DynamicCache) can be captured")
    return [t for layer in layers for t in (layer.keys, layer.values)]


def capture_with_cache(model: nn.Module) -> CacheGraphs:
    """Capture ``model`` (a transformers causal LM, not modified) as one step graph serving the prompt and the decode
    steps; raises ``CaptureError``."""
    if not is_causal_lm(model):
        raise CaptureError(f"cannot capture {type(model).__name__} with a KV cache: it is not a transformers model "
                           "with an output head (get_output_embeddings()); generation needs a causal LM")
    accepted = inspect.signature(model.forward).parameters
    names = ("input_ids", "attention_mask") + (("position_ids",) if "position_ids" in accepted else ())
    owned = owned_copy(model).eval()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 10), device=model.device)  # sizes > 1, or export specializes them
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(10, device=ids.device).expand(2, 10)}
    with torch.no_grad():  # the example past: the model's own cache of the first 8 positions, run eagerly
        cache = _flat_cache(owned(**{n: full[n][:, :8] for n in names}, use_cache=True))
    step = {"input_ids": ids[:, 8:], "attention_mask": full["attention_mask"],
            "position_ids": full["position_ids"][:, 8:]}
    batch, new, total, past = Dim.DYNAMIC, Dim.DYNAMIC, Dim.DYNAMIC, Dim.DYNAMIC
    step_dims = {"input_ids": {0: batch, 1: new}, "attention_mask": {0: batch, 1: total},
                 "position_ids": {0: batch, 1: new}}
    dims = tuple(step_dims[n] for n in names) + tuple({0: batch, 2: past} for _ in cache)
    cache_names = tuple(f"{kind}_{layer}" for layer in range(len(cache) // 2) for kind in ("key", "value"))
    try:
        with torch.no_grad(), bnb_stand_ins(owned) as bnb_layers:
            ep = torch.export.export(_CacheInputs(owned, names), (*(step[n] for n in names), *cache),
                                     dynamic_shapes=(dims,), strict=False)
    except Exception as e:
        raise capture_error(model, "torch.export.export of the step graph with a KV cache", e,
                            "generation supports decoder-only models with a DynamicCache (e.g. Llama, Qwen2)") from e
    gm, _ = flat_graph_module(ep.module(check_guards=False), names + cache_names, ep.call_spec.out_spec,
                              type(model).__name__, bnb_layers)
    _drop_empty_concatenations(gm)
    _drop_no_ops(gm)
    mark_non_persistent_buffers(gm, owned)
    return CacheGraphs(gm, names, cache_names, tuple((t.shape[1], t.shape[3]) for t in cache), cache[0].dtype)


def _drop_empty_concatenations(gm: torch.fx.GraphModule) -> None:
    """Drop the empty tensor a fresh ``DynamicLayer`` starts from (``cat([tensor([]), keys])`` is ``keys``), so the
    graph holds no tensor of its own (one that ``.to()`` on its source would not move)."""
    graph = gm.graph
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.cat.default)):
        tensors = node.args[0]
        kept = [t for t in tensors if not _is_empty(t)]
        if len(kept) == 1:
            node.replace_all_uses_with(kept[0])
            graph.erase_node(node)
        elif len(kept) < len(tensors):
            node.args = (kept, *node.args[1:])
        for dropped in set(tensors) - set(kept):
            _erase_unused(gm, dropped)
    graph.lint()
    gm.recompile()


def _drop_no_ops(gm: torch.fx.GraphModule) -> None:
    """Drop the dtype / device checks export records (``aten._assert_tensor_metadata``) and the casts to the dtype a
    tensor already has: each costs a dispatch per decode step, and a step graph is captured per parameter dtype and
    device (``generation.GenerationSource.for_parameters``), so they always hold."""
    graph = gm.graph
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten._assert_tensor_metadata.default)):
        if not node.users:
            graph.erase_node(node)
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten.to.dtype)):
        source, value = node.args[0], node.meta.get("val")
        before = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        copies = node.args[3] if len(node.args) > 3 else node.kwargs.get("copy", False)
        if isinstance(before, torch.Tensor) and isinstance(value, torch.Tensor) and not copies \
                and before.dtype == value.dtype and len(node.args) <= 4 and "memory_format" not in node.kwargs:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _is_empty(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == 0


def _erase_unused(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Erase ``node`` if nothing uses it, then its inputs likewise (and the attributes of erased ``get_attr`` nodes)."""
    if node.users or node.op == "placeholder":
        return
    inputs = node.all_input_nodes
    gm.graph.erase_node(node)
    if node.op == "get_attr":
        owner, _, name = node.target.rpartition(".")
        delattr(gm.get_submodule(owner), name)
    for source in inputs:
        _erase_unused(gm, source)
