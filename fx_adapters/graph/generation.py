"""Token generation with KV caches for compiled modules, method-agnostic: the decode loop and the sampler.

The model a module was compiled from is captured once more, with its KV cache as graph inputs and outputs
(``capture_cache.py``): a prefill graph for the prompt and a decode-step graph for one new token. Each method
rewrites both like the module's own graph (``road/generation.py``, ``xlora/generation.py``), reading the module's
tensors, so they follow ``.to()``, ``load_state_dict``, merges and new adapters; this module runs the loop over
whatever step function the method builds from them.

The loop follows transformers' ``generate``: ``position_ids`` from the attention mask (left padding works), greedy
``argmax`` or sampling (temperature, top-k, top-p, ``torch.multinomial``), finished rows padded with
``pad_token_id`` after ``eos_token_id``, output = prompt + new tokens. Only ``eos_token_id`` / ``pad_token_id``
defaults come from the model's ``generation_config``; ``attention_mask=None`` counts every token (transformers would
infer a mask from pad tokens in the prompt).

Arguments of ``generate`` (after ``input_ids``, all keyword): ``max_new_tokens`` (required), ``attention_mask``,
``do_sample=False``, ``temperature=1.0``, ``top_k=50``, ``top_p=1.0``, ``eos_token_id``, ``pad_token_id``, and for
RoAd ``adapter_names``. Prompt + new tokens must fit the model's ``max_position_embeddings``.

>>> import torch, transformers, fx_adapters as fxa
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                                num_attention_heads=2, num_key_value_heads=1)
>>> model = transformers.LlamaForCausalLM(cfg).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules="all-linear", init_weights=False))
>>> ids = torch.randint(3, 64, (2, 5))
>>> out = am.generate(ids, max_new_tokens=6)
>>> out.shape
torch.Size([2, 11])
>>> with am.disable_adapters():
...     torch.equal(am.generate(ids, max_new_tokens=6), model.generate(ids, max_new_tokens=6, do_sample=False))
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .capture_cache import CacheGraphs, capture_with_cache, is_causal_lm
from .graph_module import owned_copy, read_from

__all__ = ["GenerationSource", "Step", "attach", "base_step", "batch_size", "generate", "graph_step", "module_types",
           "source_of"]

Step = Callable[[tuple, tuple], tuple[torch.Tensor, tuple]]  # (model inputs, cache or ()) -> (logits, new cache)


class GenerationSource:
    """What generation keeps of the model a module was compiled from: a structural copy (its parameters share the
    model's storage; later changes to the model's modules do not reach it), the graphs captured from it, and the
    latest graphs rewritten for the module. ``problem`` says why there is no model. Deep copies share the model;
    pickles drop it (transformers models may hold unpicklable hooks)."""

    def __init__(self, model: nn.Module | None, problem: str | None = None):
        self.model, self.problem = model, problem
        self.captured: CacheGraphs | None = None
        self.built: tuple = (None, None)  # (key, (prefill, decode))

    def __reduce__(self):
        return GenerationSource, (None, f"it was unpickled, which drops the model it was compiled from; {_ATTACH}")

    def __deepcopy__(self, memo):
        new = GenerationSource(self.model, self.problem)
        new.captured = self.captured  # read-only templates; built graphs would read the original module
        return new

    def graphs(self, key, build: Callable[[GenerationSource], tuple]
               ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        if self.captured is None:
            self.captured = capture_with_cache(self.model)
        if self.built[0] != key:
            self.built = (key, build(self))
        return self.built[1]


_ATTACH = "call fx_adapters.graph.generation.attach(module, model) with that model"


def attach(module: nn.Module, model: nn.Module) -> None:
    """Remember ``model`` (structurally copied) as the model ``module`` was compiled from, for ``generate``."""
    if is_causal_lm(model):
        module._fxa_generation = GenerationSource(owned_copy(model).eval())
    else:
        module._fxa_generation = GenerationSource(None, f"it was compiled from a {type(model).__name__}, not a "
                                                        "transformers "
                                               "causal LM (a PreTrainedModel with an output head)")


def source_of(module: nn.Module) -> GenerationSource:
    source = module.__dict__.get("_fxa_generation") or GenerationSource(
        None, f"it was not built by compile_with_xlora / XLoraModule.from_captured / compile_with_road; {_ATTACH}")
    if source.problem:
        raise TypeError(f"{type(module).__name__}.generate: {source.problem}")
    return source


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def base_step(module: nn.Module, source: GenerationSource) -> Step:
    """Steps of the model alone, reading ``module``'s tensors."""
    prefill, decode = source.graphs("base", lambda s: (read_from(s.captured.prefill, module.graph_module),
                                                       read_from(s.captured.decode, module.graph_module)))
    return graph_step(prefill, decode, ())


def graph_step(prefill: torch.fx.GraphModule, decode: torch.fx.GraphModule, extra: tuple) -> Step:
    def step(inputs: tuple, cache: tuple) -> tuple[torch.Tensor, tuple]:
        logits, *cache = (decode if cache else prefill)(*inputs, *cache, *extra)
        return logits, tuple(cache)
    return step


# -------------------------------------------------------------------------------------------------- loop


def generate(step: Step, source: GenerationSource, input_ids: torch.Tensor, *, max_new_tokens: int,
              attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
              top_k: int | None = 50, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
              pad_token_id: int | None = None) -> torch.Tensor:
    """Prompt + up to ``max_new_tokens`` tokens per row, ``(batch, prompt + new)``; see the module docstring."""
    _check_inputs(source, input_ids, attention_mask, max_new_tokens)
    config = source.model.generation_config
    eos = eos_token_id if eos_token_id is not None else config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or ()), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    pad = pad if pad is not None else (int(eos[0]) if len(eos) else None)
    choose = _sampler(temperature, top_k, top_p) if do_sample else None
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as transformers' generate
    with_positions = "position_ids" in source.captured.input_names
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens, new, cache = input_ids, input_ids, ()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, cache = step((new, mask, positions) if with_positions else (new, mask), cache)
            scores = logits[:, -1].float()
            new = torch.argmax(scores, dim=-1) if choose is None else choose(tokens, scores)
            if len(eos):
                new = torch.where(unfinished, new, pad)
                unfinished &= ~torch.isin(new, eos)
            new = new[:, None]
            tokens = torch.cat([tokens, new], dim=-1)
            if not unfinished.any():
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            positions = positions[:, -1:] + 1
    return tokens


def batch_size(input_ids) -> int:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"generate: input_ids must be a (batch, sequence) tensor of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    return input_ids.shape[0]


def _check_inputs(source: GenerationSource, input_ids, attention_mask, max_new_tokens) -> None:
    batch_size(input_ids)
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}; pass one mask entry per token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    limit = getattr(source.model.config.get_text_config(), "max_position_embeddings", None)
    length = input_ids.shape[1] + max_new_tokens
    if limit is not None and length > limit:
        raise ValueError(f"generate: prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {length} "
                         f"positions, but the cache holds at most max_position_embeddings={limit} of this "
                         f"{type(source.model).__name__}; pass max_new_tokens <= "
                         f"{max(limit - input_ids.shape[1], 0)} or a shorter "
                         "prompt")


def _sampler(temperature: float, top_k: int | None, top_p: float) -> Callable:
    """transformers' sampling: its warpers in its order, then ``multinomial`` on the softmax."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    def choose(tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(warpers(tokens, scores), dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    return choose
