"""X-LoRA's cached graphs for ``XLoraModule.generate``: the prefill and decode graphs of the model, rewritten by
``passes.xlora_passes`` with a KV cache for each pass (``ScalingPassCache``), so every step runs the scaling pass,
the classifier and the real pass on the new token only, where PEFT re-runs both passes on the whole sequence. The
loop itself is ``graph.generation``'s.

``decode_scalings`` chooses the scalings of the decode steps:

- ``"token"`` (default, PEFT's semantics): every new token gets the classifier's scalings of its own scaling pass;
  each step runs both passes.
- ``"prompt"``: the prefill runs both passes exactly; from then on each sequence reuses the scalings of its last
  prompt token (the last position: left padding keeps it a real token), so each decode step runs the real pass
  only, on a third graph (``passes.FixedScalingsGraph``) that reads those scalings as an input. mistral.rs calls
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
from ..graph.graph_module import copy_graph_module, read_from
from ..graph.match import find_embedding_layers, find_linear_layers, layer_key, output_head
from ..graph.passes import run_passes
from .passes import EXPERTS_ATTR, xlora_passes

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


def _xlora_graphs(xm) -> Callable[[generation.GenerationSource], tuple]:
    def build(source: generation.GenerationSource) -> tuple:
        captured, types = source.captured, generation.module_types(source.model)
        experts = getattr(xm.graph_module, EXPERTS_ATTR)
        built = []
        for graph_module, cache_names, fixed in ((captured.prefill, (), False),
                                                 (captured.decode, captured.cache_names, False),
                                                 (captured.decode, captured.cache_names, True)):
            gm = copy_graph_module(graph_module)
            layers = {t.name: t for t in (*find_linear_layers(gm, types), *find_embedding_layers(gm, types))}
            stacked = {layers[t.name]: (i, experts[layer_key(t.name)]) for i, t in enumerate(xm.targets)}
            run_passes(gm, xlora_passes(layers[output_head(source.model)].nodes[0], xm.classifier, stacked,
                                        cache=(cache_names, len(captured.cache_names)), fixed_scalings=fixed))
            built.append(read_from(gm, xm.graph_module))
        return tuple(built)
    return build


def generate_xlora(xm, input_ids: torch.Tensor, *, decode_scalings: str = "token", **options) -> torch.Tensor:
    """``XLoraModule.generate``: both passes cached; ``decode_scalings`` as in the module docstring. Afterwards
    ``get_latest_scalings()`` holds the scalings of every position the last step saw, ``(batch, prompt + new - 1,
    n_layers, n_experts)`` (PEFT's in ``"token"`` mode), and each step is logged while logging is on. With adapters
    disabled it generates with the base model."""
    check_decode_scalings(decode_scalings, f"{type(xm).__name__}.generate")
    source = generation.source_of(xm)
    if xm.adapters_disabled:
        return generation.generate(generation.base_step(xm, source), source, input_ids, **options)
    prefill, decode, one_pass = source.graphs("xlora", _xlora_graphs(xm))
    n, extra = len(source.captured.cache_names), xm.graph_inputs()
    if decode_scalings == "prompt":
        step = _prompt_step(xm, prefill, one_pass, n, extra)
    else:
        step = _token_step(xm, prefill, decode, n, extra)
    return generation.generate(step, source, input_ids, **options)


def _token_step(xm, prefill, decode, n: int, extra: tuple) -> generation.Step:
    """Both passes every step; cache = (real pass cache, scaling pass cache)."""
    scalings = []

    def step(inputs: tuple, cache: tuple) -> tuple[torch.Tensor, tuple]:
        logits, *out = (decode if cache else prefill)(*inputs, *cache, *extra)
        scalings.append(out[n])
        xm.record_scalings(torch.cat(scalings, dim=1))
        return logits, (*out[:n], *out[n + 1:])
    return step


def _prompt_step(xm, prefill, one_pass, n: int, extra: tuple) -> generation.Step:
    """Both passes on the prompt, then the real pass alone with each sequence's last prompt-token scalings; the
    cache after the prefill is the real pass's only (the scaling pass's is never read again)."""
    scalings = []

    def step(inputs: tuple, cache: tuple) -> tuple[torch.Tensor, tuple]:
        if cache:
            logits, *cache = one_pass(*inputs, *cache, scalings[-1], *extra)
            scalings.append(scalings[-1])
        else:
            logits, *out = prefill(*inputs, *extra)
            cache = out[:n]
            scalings.extend((out[n], out[n][:, -1:]))
        xm.record_scalings(torch.cat(scalings[:-1], dim=1))
        return logits, tuple(cache)
    return step
