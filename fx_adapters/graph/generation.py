"""Token generation with KV caches for compiled modules, method-agnostic: transformers' own ``generate`` over the
captured cached graphs.

The model a module was compiled from is captured with its KV cache as graph inputs and outputs (``capture_cache.py``):
one step graph, run on the prompt with an empty past and on each new token. Compiling a causal LM captures it (the
forward is derived from it: ``forward_from_step.py``); otherwise the first ``generate`` does. Each method
rewrites it like the module's own graph (``road/generation.py``, ``xlora/generation.py``), reading the module's
tensors, so it follows ``.to()``, ``load_state_dict``, merges and new adapters, and provides a *step* function over
it: ``step(inputs, cache) -> (logits, cache)`` over flat tensors. The step graphs are ``boxed``: they take one list
of inputs and empty it, and ``cache`` is a list the step empties (``[]`` for the prompt), so each past tensor is
freed once the graph has extended it, as the model frees its own (``call_boxed``). ``generate``'s step graphs run
the output head on the last position only (``last_logits_step``), as transformers has the model do, and a decode step
of unpadded rows runs a twin whose attention reads no mask (``StepGraphs``), as transformers skips the mask then.

``generate`` runs transformers' ``GenerationMixin.generate`` on ``StepLM``, a thin model whose ``forward`` calls the
step and keeps the flat cache in a ``DynamicCache`` (two tensors per layer; a method may keep more, e.g. X-LoRA's two
passes and its scalings): beam search reorders every tensor of it, so every transformers generation argument works
as on the model — ``num_beams``, sampling, ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``,
``logits_processor``, ``stopping_criteria``, ``generation_config``, ``streamer``, ``return_dict_in_generate`` — with
the model's ``generation_config`` as defaults. Arguments the cached graphs cannot serve (``REFUSED``) raise
``ValueError`` naming them before any token is produced.

``forward_with_cache`` serves a module's ``forward(..., use_cache=True)`` with the same step: it returns the model's
output with a ``DynamicCache`` that the next call takes back (``cache=`` / ``past_key_values=``), as does a cache the
model made itself.

>>> import torch, transformers, fx_adapters as fxa
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                                num_attention_heads=2, num_key_value_heads=1)
>>> model = transformers.LlamaForCausalLM(cfg).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules="all-linear", init_weights=False))
>>> ids = torch.randint(3, 64, (2, 5))
>>> out = am.generate(ids, max_new_tokens=6, num_beams=2)
>>> out.shape
torch.Size([2, 11])
>>> with am.disable_adapters():
...     torch.equal(am.generate(ids, max_new_tokens=6, num_beams=2), model.generate(ids, max_new_tokens=6, num_beams=2))
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .capture import CaptureError
from .capture_cache import CacheGraphs, cache_argument, capture_with_cache, is_causal_lm
from .graph_module import (
    boxed,
    copy_graph_module,
    outside_inference_mode,
    owned_copy,
    parameters_of,
    read_from,
)
from .match import output_head
from .passes import LastPositionLogits, UnmaskedAttention, run_passes
from .signature import bind_call

__all__ = ["REFUSED", "GenerationSource", "Step", "StepGraphs", "StepLM", "attach", "attends_to_whole_past",
           "base_step", "batch_size", "cache_tensors", "cached_call_arguments", "call_boxed", "forward_with_cache",
           "generate", "graph_step", "module_types", "needs_no_mask", "past_or_empty", "source_of", "store_cache",
           "unmasked_twin"]


Step = Callable[[tuple, list], tuple[torch.Tensor, tuple]]
"""(model inputs, cache: a list, empty for a prompt, that the step empties) -> (logits, new cache)."""


class GenerationSource:
    """What generation keeps of the model a module was compiled from: a structural copy (its parameters share the
    model's storage; later changes to the model's modules do not reach it), the step graph captured from it, and the
    latest graphs each method rewrote from it for the module (by name: built on first use, rebuilt when the key
    changes). ``problem`` says why there is no model. Deep copies share the model;
    pickles drop it (transformers models may hold unpicklable hooks)."""

    def __init__(self, model: nn.Module | None, problem: str | None = None, captured: CacheGraphs | None = None):
        self.model, self.problem = model, problem
        self.captured = captured  # None until captured (at compile, or at the first generate)
        self.last_logits: torch.fx.GraphModule | None = None
        self.built: dict[str, tuple] = {}  # name -> (key, what build returned)
        self.moved: dict[tuple[torch.dtype, torch.device], GenerationSource] = {}

    def for_parameters(self, dtype: torch.dtype, device: torch.device) -> GenerationSource:
        """The source for a module whose parameters are now of ``dtype`` on ``device`` (after ``.to()``): this one,
        or one holding a copy of the model moved there, with its own captures (a graph bakes in its dtype and
        device)."""
        if (dtype, torch.device(device)) == parameters_of(self.model):
            return self
        if (dtype, device) not in self.moved:
            self.moved[dtype, device] = GenerationSource(owned_copy(self.model).to(device=device, dtype=dtype))
        return self.moved[dtype, device]

    def __reduce__(self):
        return GenerationSource, (None, f"it was unpickled, which drops the model it was compiled from; {_ATTACH}")

    def __deepcopy__(self, memo):
        new = GenerationSource(self.model, self.problem, self.captured)
        new.last_logits = self.last_logits  # read-only templates (built graphs would read the original module)
        return new

    def last_logits_step(self) -> torch.fx.GraphModule:
        """A copy of the captured step graph whose output head reads the last position only
        (``passes.LastPositionLogits``): the logits ``generate`` reads. Built on first use."""
        if self.last_logits is None:
            step = copy_graph_module(self.captured.step)
            run_passes(step, [LastPositionLogits(output_head(self.model), module_types(self.model))])
            self.last_logits = step
        return self.last_logits

    @outside_inference_mode
    def graphs(self, name: str, key, build: Callable[[GenerationSource], object]):
        """What ``build(self)`` returns (graphs rewritten from ``self.captured``), cached under ``name`` while ``key``
        holds; the step graph is captured on first use unless compile captured it."""
        if self.captured is None:
            self.captured = capture_with_cache(self.model)
        built_key, built = self.built.get(name, (None, None))
        if built is None or built_key != key:
            built = build(self)
            self.built[name] = (key, built)
        return built


_ATTACH = "call fx_adapters.graph.generation.attach(module, model) with that model"


def attach(module: nn.Module, model: nn.Module, captured: CacheGraphs | None = None) -> None:
    """Remember ``model`` (structurally copied) as the model ``module`` was compiled from, for ``generate``, and
    ``captured``, its step graph if compiling captured it (``forward_from_step.capture_model``)."""
    if is_causal_lm(model):
        module._fxa_generation = GenerationSource(owned_copy(model).eval(), captured=captured)
    else:
        module._fxa_generation = GenerationSource(None, f"it was compiled from a {type(model).__name__}, not a "
                                                        "transformers "
                                               "causal LM (a PreTrainedModel with an output head)")


def source_of(module: nn.Module) -> GenerationSource:
    source = module.__dict__.get("_fxa_generation") or GenerationSource(
        None, f"it was not built by compile_with_xlora / XLoraModule.from_captured / compile_with_road; {_ATTACH}")
    if source.problem:
        raise TypeError(f"{type(module).__name__}.generate: {source.problem}")
    return source.for_parameters(*parameters_of(module))


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def base_step(module: nn.Module, source: GenerationSource) -> Step:
    """Steps of the model alone for ``generate`` (the last position's logits), reading ``module``'s tensors."""
    graphs = source.graphs("base", None, lambda s: StepGraphs.of(read_from(s.last_logits_step(), module.graph_module),
                                                                  module.graph_module, s.model))
    return graph_step(graphs, source.captured, ())


@dataclass(frozen=True)
class StepGraphs:
    """A boxed step graph, and its boxed ``unmasked_twin`` (None where there is none), which runs the steps that
    ``needs_no_mask``."""

    graph: torch.fx.GraphModule
    unmasked: torch.fx.GraphModule | None = None

    @classmethod
    def of(cls, graph: torch.fx.GraphModule, source: nn.Module, model: nn.Module | None) -> StepGraphs:
        """``graph`` (reading ``source``'s tensors, ``read_from``) and, given the ``model``, its unmasked twin."""
        twin = None if model is None else unmasked_twin(graph, source, model)
        return cls(boxed(graph), None if twin is None else boxed(twin))

    def for_inputs(self, inputs: tuple) -> torch.fx.GraphModule:
        """The graph that runs a step with ``inputs`` (``input_ids``, ``attention_mask``, …)."""
        return self.unmasked if self.unmasked is not None and needs_no_mask(inputs) else self.graph


def attends_to_whole_past(model: nn.Module) -> bool:
    """Whether every layer of ``model`` attends to every earlier position (its config names no sliding window, and
    ``layer_types``, where given, are all full attention)."""
    config = model.config.get_text_config()
    types = getattr(config, "layer_types", None)
    if types is not None:
        return all(kind == "full_attention" for kind in types)
    return getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None) is None


def unmasked_twin(graph: torch.fx.GraphModule, source: nn.Module, model: nn.Module) -> torch.fx.GraphModule | None:
    """A copy of ``graph`` (a step graph reading ``source``'s tensors, ``read_from``; before ``boxed``) whose
    attention reads no mask (``passes.UnmaskedAttention``), for the decode steps ``needs_no_mask`` picks, as
    transformers skips the mask in them; None when ``model`` has layers that do not attend to the whole past or the
    pass does not apply."""
    if not attends_to_whole_past(model):
        return None
    twin = read_from(graph, source)  # a copy, still reading source's tensors
    return twin if run_passes(twin, [UnmaskedAttention()]).modified else None


def needs_no_mask(inputs: tuple) -> bool:
    """Whether a step's inputs (``input_ids``, ``attention_mask``, …) are one new token per row with an all-ones
    ``attention_mask``: then every position attends to the whole past, and no mask is needed."""
    return inputs[0].shape[1] == 1 and bool(inputs[1].all())


def past_or_empty(cache: list, captured: CacheGraphs, inputs: tuple, caches: int = 1) -> list:
    """``cache``, or for a prompt (empty) ``caches`` empty caches of the batch of ``inputs``."""
    return cache or list(captured.empty_cache(inputs[0].shape[0], inputs[0].device) * caches)


def call_boxed(graph: torch.fx.GraphModule, cache: list, *inputs) -> tuple:
    """``graph`` (``graph_module.boxed``) on ``inputs`` (flattened: tensors, and tuples or lists of them), emptying
    ``cache`` and every list among ``inputs`` first: with no other reference, the graph frees each past tensor after
    its last use, as the model frees its cache layer by layer, instead of the whole past living until the step returns
    (memory, and fresh pages for the next cache)."""
    args = [value for part in inputs for value in (part if isinstance(part, (list, tuple)) else (part,))]
    cache.clear()
    for part in inputs:
        if isinstance(part, list):
            part.clear()
    return graph(args)


def graph_step(graphs: StepGraphs, captured: CacheGraphs, extra: tuple) -> Step:
    """The step of ``graphs`` with ``captured``'s inputs and outputs, then ``extra`` inputs."""
    def step(inputs: tuple, cache: list) -> tuple[torch.Tensor, tuple]:
        graph = graphs.for_inputs(inputs)
        logits, *cache = call_boxed(graph, cache, inputs, past_or_empty(cache, captured, inputs), extra)
        return logits, tuple(cache)
    return step


# -------------------------------------------------------------------------------------------------- generate

REFUSED = {
    "assistant_model": "assisted decoding feeds several tokens to a decode step and crops the cache",
    "prompt_lookup_num_tokens": "prompt-lookup decoding feeds several tokens to a decode step and crops the cache",
    "assistant_early_exit": "assisted decoding feeds several tokens to a decode step and crops the cache",
    "custom_generate": "a custom generation loop may call the model in ways the cached graphs do not take",
    "cache_implementation": "the cached graphs keep a dynamic cache (DynamicCache) only",
    "cache": "the cached graphs start from an empty cache; pass the whole prompt instead",
    "past_key_values": "the cached graphs start from an empty cache; pass the whole prompt instead",
    "inputs_embeds": "the cached graphs take token ids; pass input_ids",
    "output_attentions": "the cached graphs return logits and the cache only",
    "output_hidden_states": "the cached graphs return logits and the cache only",
    "dola_layers": "DoLa decoding needs the hidden states of every layer",
}
"""Generation arguments the cached graphs cannot serve, and why."""


class StepLM(nn.Module):
    """The model ``generate`` sees: ``forward`` runs ``step`` on the inputs transformers prepares and returns the
    logits with the cache, a ``DynamicCache`` holding the step's flat cache two tensors per layer (rebound, not
    copied). Built per call (``generate``), with the model's ``config`` and ``generation_config``."""

    main_input_name = "input_ids"
    _is_stateful = False

    def __init__(self, step: Step, source: GenerationSource, input_names: tuple[str, ...], device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        self.step, self.input_names = step, input_names
        self.config = source.model.config
        self.generation_config = copy.deepcopy(source.model.generation_config)
        self.device, self.dtype = device, dtype

    def can_generate(self) -> bool:
        return True

    def is_remote_code(self) -> bool:  # read by transformers' generate, as on a PreTrainedModel
        return False

    def get_experts_implementation(self) -> dict:
        return {}

    def set_experts_implementation(self, *_) -> None:
        pass

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **_):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        past = 0 if cache is None else cache.get_seq_length()
        if attention_mask is None:  # generate drops an all-ones mask
            attention_mask = input_ids.new_ones(input_ids.shape[0], past + input_ids.shape[1])
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            position_ids = position_ids[:, -input_ids.shape[1]:]
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        logits, flat = self.step(tuple(given[n] for n in self.input_names), cache_tensors(cache, take=True))
        return CausalLMOutputWithPast(logits=logits, cache=store_cache(flat, cache))


def cache_tensors(cache, take: bool = False) -> list[torch.Tensor]:
    """The keys and values of a ``DynamicCache`` (or None), flat: ``[]`` when it holds no positions. ``take``: the
    cache lets go of them (its layers are emptied until ``store_cache``), so that a step can free them early."""
    if cache is None or cache.get_seq_length() == 0:
        return []
    flat = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if take:
        for layer in cache.layers:
            layer.keys = layer.values = None
    return flat


def store_cache(flat: tuple, cache=None):
    """``cache`` (a ``DynamicCache``, or a new one when None) holding the flat keys and values two tensors per layer
    (rebound, not copied)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache() if cache is None else cache
    if len(cache.layers) != len(flat) // 2 or any(type(layer) is not DynamicLayer for layer in cache.layers):
        cache.layers[:] = [DynamicLayer() for _ in range(len(flat) // 2)]  # generate's empty cache may hold others
    for layer, keys, values in zip(cache.layers, flat[::2], flat[1::2]):
        layer.keys, layer.values, layer.is_initialized = keys, values, True
        layer.device, layer.dtype = keys.device, keys.dtype
    return cache


def _generate_class() -> type:
    from transformers import GenerationMixin

    return type("StepLM", (StepLM, GenerationMixin), {})


def generate(step: Step, source: GenerationSource, module: nn.Module, *args, **kwargs):
    """transformers' ``generate(*args, **kwargs)`` over ``step`` (module docstring); ``module`` gives the device and
    dtype. Returns what transformers' ``generate`` returns."""
    check_arguments(source, kwargs)
    dtype, device = parameters_of(module)
    lm = _generate_class()(step, source, source.captured.input_names, device, dtype)
    with torch.no_grad():
        return lm.generate(*args, **kwargs)


def check_arguments(source: GenerationSource, kwargs: dict) -> None:
    """Raise ``ValueError`` naming a generation argument (or ``generation_config`` field) the cached graphs cannot
    serve."""
    config = kwargs.get("generation_config")
    for name, why in REFUSED.items():
        value = kwargs.get(name, getattr(config, name, None))
        if value is not None and value is not False and not (name == "cache_implementation" and value == "dynamic"):
            raise ValueError(f"generate: {name}={value!r} is not supported by the compiled module's cached graphs "
                             f"({why}); leave it out")


def batch_size(args: tuple, kwargs: dict) -> int:
    """The batch size of a ``generate`` call's ``input_ids`` (positional or keyword)."""
    input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"generate: input_ids must be a (batch, sequence) tensor of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    return input_ids.shape[0]


# -------------------------------------------------------------------------------------------------- forward(use_cache)

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""The names of a model's KV-cache argument (``cache`` from transformers 5.24, ``past_key_values`` before)."""
SERVED = {"input_ids", "attention_mask", "position_ids", "use_cache", "return_dict", *CACHE_ARGUMENTS}
"""What ``forward_with_cache`` takes; anything else given with ``use_cache=True`` raises ``CaptureError``."""


def cached_call_arguments(source: GenerationSource, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """A ``use_cache=True`` call bound to the model's ``forward``: (tensors, other arguments) by name, the cache under
    the model's name for it (``past_key_values``, which transformers 5.24 still takes, becomes ``cache``)."""
    name = cache_argument(source.model)
    other = next(n for n in CACHE_ARGUMENTS if n != name)
    if other in kwargs and name not in kwargs:
        kwargs = {**{k: v for k, v in kwargs.items() if k != other}, name: kwargs[other]}
    return bind_call(source.model, args, kwargs)


def forward_with_cache(step: Step, source: GenerationSource, values: dict, flags: dict, training: bool):
    """A module's ``forward(**values, **flags)`` with ``use_cache=True``, over ``step``: the model's output type with
    the logits and a ``DynamicCache`` (the one given, extended in place, as the model does). ``values`` are the call's
    tensors, ``flags`` its other arguments, by name. Raises ``CaptureError`` naming an argument it cannot serve."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    past = _check_cached_call(source, values, flags, training)
    ids = values["input_ids"]
    known = past.get_seq_length() if past is not None else 0
    mask = values.get("attention_mask")
    mask = ids.new_ones(ids.shape[0], known + ids.shape[1]) if mask is None else mask
    positions = values.get("position_ids")
    if positions is None:
        if not bool(mask.all()):
            raise CaptureError("forward with use_cache=True and a padded attention_mask needs position_ids: models "
                               "count positions differently around padding; pass position_ids (e.g. "
                               "attention_mask.cumsum(-1) - 1 for the new tokens, as generate does)")
        positions = torch.arange(known, known + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    given = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    logits, flat = step(tuple(given[n] for n in source.captured.input_names), cache_tensors(past))
    output = CausalLMOutputWithPast(logits=logits, cache=store_cache(flat, past))
    return output if flags.get("return_dict", True) else output.to_tuple()


def _check_cached_call(source: GenerationSource, values: dict, flags: dict, training: bool):
    """The cache given to a ``use_cache=True`` call (or None), after checking that the step graph can serve it."""
    from transformers.cache_utils import DynamicLayer

    where = f"{type(source.model).__name__} forward with use_cache=True"
    other = [n for n in (*values, *flags) if n not in SERVED]
    if other:
        raise CaptureError(f"{where} cannot take {other[0]!r}: the cached step graph takes input_ids, "
                           "attention_mask, position_ids and a cache only; call without use_cache=True to use it")
    if training:
        raise CaptureError(f"{where} runs in eval mode only (the cached step graph is captured in eval mode); call "
                           "eval() first, or leave use_cache out in training")
    if "input_ids" not in values:
        raise CaptureError(f"{where} needs input_ids (the cached step graph takes token ids)")
    name = next((n for n in CACHE_ARGUMENTS if flags.get(n) is not None), None)
    past = flags.get(name) if name else None
    layers = getattr(past, "layers", None)
    if past is not None and (layers is None or any(type(layer) is not DynamicLayer for layer in layers)):
        kinds = sorted({type(layer).__name__ for layer in layers or ()}) or [type(past).__name__]
        raise CaptureError(f"{where}: {name}= holds {', '.join(kinds)}; the cached step graph takes a DynamicCache "
                           "of full-attention layers (DynamicLayer), such as a previous call's output cache")
    expected = len(source.captured.cache_names) // 2
    if cache_tensors(past) and len(layers) != expected:
        raise CaptureError(f"{where}: {name}= has {len(layers)} layers, the model {expected}; pass a cache this model "
                           "made (or None to start one)")
    return past
