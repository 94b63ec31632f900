"""X-LoRA on any capture of a model: ``apply_xlora`` runs ``passes.xlora_passes`` on a captured graph with a module's
classifier and stacked experts. Every entry point goes through it: ``compile_with_xlora`` (the module's own graph),
each further call signature of ``forward`` (``graph.captures``: ``xlora_rewrite``) and ``generate``'s cached
graphs (``generation.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..graph.captures import Build
from ..graph.graph_module import copy_graph_module
from ..graph.match import Target, find_embedding_layers, find_linear_layers, layer_key, output_head
from ..graph.passes import run_passes
from .modules import XLoraExperts
from .passes import CLASSIFIER_ATTR, EXPERTS_ATTR, xlora_passes


def adaptable_layers(gm: torch.fx.GraphModule, model: nn.Module) -> tuple[dict[str, Target], dict[str, Target]]:
    """The linear-like layers and embeddings ``gm`` (a capture of ``model``) calls, by module path: (linear only, all
    of them)."""
    types = {name: type(m) for name, m in model.named_modules()}
    linear = {t.name: t for t in find_linear_layers(gm, types)}
    return linear, {**linear, **{t.name: t for t in find_embedding_layers(gm, types)}}


def classifier_head(model: nn.Module, linear: Mapping[str, Target]) -> Target:
    """The layer whose input the classifier reads: the output head (``get_output_embeddings()``), else the last
    linear-like layer the graph calls."""
    head = output_head(model) or next(reversed(linear), None)
    if head not in linear:
        raise ValueError(f"X-LoRA: cannot find the output head of {type(model).__name__} among its linear layers "
                         f"(got {head!r}); the classifier reads the head's input (the last hidden state)")
    return linear[head]


def apply_xlora(gm: torch.fx.GraphModule, model: nn.Module, classifier: nn.Module,
                experts: Mapping[str, XLoraExperts], targets: Sequence[str],
                cache: tuple[Sequence[str], int] | None = None, fixed_scalings: bool = False) -> torch.fx.GraphModule:
    """Rewrite ``gm`` (a capture of ``model``, changed in place and returned) by ``xlora_passes`` with ``classifier``
    and the stacked ``experts`` of each layer key (``layer_key``). ``targets``: the adapted layers' paths in the
    scalings' layer order; a target this capture never calls (the embedding, when ``inputs_embeds`` replaces
    ``input_ids``) is left out, the others keep their index. ``cache`` / ``fixed_scalings``: as ``xlora_passes``."""
    linear, layers = adaptable_layers(gm, model)
    stacked = {layers[name]: (i, experts[layer_key(name)]) for i, name in enumerate(targets) if name in layers}
    head = classifier_head(model, linear).nodes[0]
    run_passes(gm, xlora_passes(head, classifier, stacked, cache=cache, fixed_scalings=fixed_scalings))
    return gm


def xlora_rewrite(main: torch.fx.GraphModule, targets: Sequence[str]) -> tuple[None, Build]:
    """``(key, build)`` for ``graph.captures``: ``build(captured, model)`` is a copy of another capture of ``model``
    rewritten by ``apply_xlora`` with ``main``'s classifier and stacked experts. The rewrite never changes (the
    settings are graph inputs), so the key is None."""

    def build(captured: torch.fx.GraphModule, model: nn.Module) -> torch.fx.GraphModule:
        return apply_xlora(copy_graph_module(captured), model, getattr(main, CLASSIFIER_ATTR),
                           getattr(main, EXPERTS_ATTR), targets)
    return None, build


def base_rewrite() -> tuple[None, Build]:
    """``(key, build)`` for ``graph.captures``: the capture itself (disabled adapters compute the base model)."""
    return None, lambda captured, _model: copy_graph_module(captured)
