"""X-LoRA's cached graphs for ``XLoraModule.generate``: the model's step graph (``graph.capture_cache``), rewritten by
``passes.xlora_passes`` with a KV cache for each pass (``ScalingPassCache``), so every step runs the scaling pass,
the classifier and the real pass on the new tokens only (the prompt: on an empty past), where PEFT re-runs both passes
on the whole sequence. ``xlora_step`` is the step transformers' ``generate`` runs through ``graph.generation``.

``decode_scalings`` chooses the scalings of the decode steps:

- ``"token"`` (default, PEFT's semantics): every new token gets the classifier's scalings of its own scaling pass;
  each step runs both passes.
- ``"prompt"``: the prefill runs both passes exactly; from then on each sequence reuses the scalings of its last
  prompt token (the last position: left padding keeps it a real token), so each decode step runs the real pass
  only, on a second graph (``passes.FixedScalingsGraph``, built at the first such call) that reads those scalings
  as an input. mistral.rs calls
  this "non-granular scalings". The first new token is the exact mode's; the later ones are the exact mode's only
  where the classifier's scalings do not depend on the token.

Either way ``get_latest_scalings()`` (and each logged step) holds the scalings each position was computed with,
``(batch, prompt + new - 1, n_layers, n_experts)``: in ``"prompt"`` mode the positions after the prompt repeat its
last token's scalings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..graph import generation
from ..graph.capture import CaptureError
from ..graph.graph_module import copy_graph_module, read_from
from ..graph.match import output_head
from ..graph.passes import LastPositionLogits, run_passes
from .passes import EXPERTS_ATTR
from .pipeline import apply_xlora

DECODE_SCALINGS = ("token", "prompt")


def check_decode_scalings(value, where: str, generating: bool = True) -> None:
    """``decode_scalings`` must be one of ``DECODE_SCALINGS``, and ``"prompt"`` only when generating."""
    if value not in DECODE_SCALINGS:
        raise ValueError(f"{where}: decode_scalings={value!r} is not one of the allowed values "
                         f"{', '.join(map(repr, DECODE_SCALINGS))} ('token': each new token's own scalings, PEFT's; "
                         "'prompt': the last prompt token's, one pass per decode step)")
    if value == "prompt" and not generating:
        raise ValueError(f"{where}: decode_scalings='prompt' applies to generate only (allowed values: "
                         f"{', '.join(map(repr, DECODE_SCALINGS))}); a forward call computes every token's scalings. "
                         "Call generate(..., decode_scalings='prompt') or drop the argument")


def check_forward_arguments(decode_scalings, kwargs: dict, where: str) -> None:
    """A forward call takes no ``decode_scalings="prompt"`` and no ``use_cache=True`` (the scaling pass needs a cache of
    its own, which a cache fed back as the model's cannot hold: ``generate`` keeps both)."""
    check_decode_scalings(decode_scalings, where, generating=False)
    if kwargs.get("use_cache"):
        raise CaptureError(f"{where}: use_cache=True is not served by X-LoRA modules: the scaling pass needs a KV "
                           "cache of its own, which the model's cache cannot carry; call generate() for cached "
                           "decoding (it keeps both passes' caches), or leave use_cache out")


def _xlora_graph(xm, fixed_scalings: bool) -> Callable[[generation.GenerationSource], generation.StepGraphs]:
    """Builds the step graph with both passes (or, ``fixed_scalings``, the real pass reading given scalings), the
    output head on the last position only (``passes.LastPositionLogits``) unless experts adapt it, and its twin for
    unpadded decode steps (``generation.unmasked_twin``)."""
    def build(source: generation.GenerationSource) -> generation.StepGraphs:
        captured = source.captured
        targets = [t.name for t in xm.targets]
        gm = apply_xlora(copy_graph_module(captured.step), source.model, xm.classifier,
                         getattr(xm.graph_module, EXPERTS_ATTR), targets,
                         cache=(captured.cache_names, len(captured.cache_names)), fixed_scalings=fixed_scalings)
        head = output_head(source.model)
        if head not in targets:  # the classifier reads the head's input whole; experts on the head would too
            run_passes(gm, [LastPositionLogits(head, generation.module_types(source.model))])
        return generation.StepGraphs.of(read_from(gm, xm.graph_module), xm.graph_module, source.model)
    return build


def xlora_step(xm, source: generation.GenerationSource, decode_scalings: str = "token") -> generation.Step:
    """The step ``generate`` runs for ``decode_scalings`` (module docstring). Its flat cache holds pairs of tensors
    (each a ``DynamicCache`` layer, so beam search reorders all of them): the caches, then the scalings every position
    so far was computed with, which each step records as the latest scalings."""
    both = source.graphs("xlora", None, _xlora_graph(xm, fixed_scalings=False))
    extra = xm.graph_inputs()
    if decode_scalings == "prompt":
        one_pass = source.graphs("xlora-fixed-scalings", None, _xlora_graph(xm, fixed_scalings=True))
        return _prompt_step(xm, both, one_pass, source.captured, extra)
    return _token_step(xm, both, source.captured, extra)


def _token_step(xm, both, captured, extra: tuple) -> generation.Step:
    """Both passes every step. Cache: the real pass's, the scaling pass's, the scalings so far (twice)."""
    n = len(captured.cache_names)

    def step(inputs: tuple, cache: list) -> tuple[torch.Tensor, tuple]:
        so_far = cache[2 * n] if cache else None
        past = generation.past_or_empty(cache[:2 * n], captured, inputs, caches=2)
        logits, *out = generation.call_boxed(both.for_inputs(inputs), cache, inputs, past, extra)
        scalings = out[n] if so_far is None else torch.cat([so_far, out[n]], dim=1)
        xm.record_scalings(scalings)
        return logits, (*out[:n], *out[n + 1:], scalings, scalings)
    return step


def _prompt_step(xm, both, one_pass, captured, extra: tuple) -> generation.Step:
    """Both passes on the prompt, then the real pass alone with each sequence's last prompt-token scalings. Cache:
    the real pass's (the scaling pass's is never read again), those fixed scalings (twice), the scalings so far
    (twice)."""
    n = len(captured.cache_names)

    def step(inputs: tuple, cache: list) -> tuple[torch.Tensor, tuple]:
        if cache:
            fixed, so_far = cache[n], cache[n + 2]
            logits, *real = generation.call_boxed(one_pass.for_inputs(inputs), cache, inputs, cache[:n], fixed, extra)
            scalings = torch.cat([so_far, fixed], dim=1)
        else:
            past = generation.past_or_empty([], captured, inputs, caches=2)
            logits, *out = generation.call_boxed(both.for_inputs(inputs), cache, inputs, past, extra)
            real, fixed, scalings = out[:n], out[n][:, -1:], out[n]
        xm.record_scalings(scalings)
        return logits, (*real, fixed, fixed, scalings, scalings)
    return step


def generate_xlora(xm, *args, decode_scalings: str = "token", **kwargs):
    """``XLoraModule.generate``: transformers' ``generate(*args, **kwargs)`` with both passes cached and
    ``decode_scalings`` as in the module docstring; afterwards ``get_latest_scalings()`` holds the scalings of every
    position the last step saw, ``(batch, prompt + new - 1, n_layers, n_experts)`` (PEFT's in ``"token"`` mode), and
    each step is logged while logging is on. With adapters disabled it generates with the base model."""
    check_decode_scalings(decode_scalings, f"{type(xm).__name__}.generate")
    source = generation.source_of(xm)
    generation.check_arguments(source, kwargs)
    generation.batch_size(args, kwargs)
    step = generation.base_step(xm, source) if xm.adapters_disabled else xlora_step(xm, source, decode_scalings)
    return generation.generate(step, source, xm, *args, **kwargs)
