"""One capture serves a causal LM's forward and its generation (``capture_model``).

``generate`` runs the step graph of ``capture_with_cache``, which takes the past keys and values as inputs. With an
empty past that graph *is* the model's forward: so rather than exporting the model twice (its forward at compile, its
step graph at the first ``generate``: the export is most of the cold start), a causal LM compiled without example
inputs is exported once, as its step graph, and its forward is derived from it by ``ForwardFromStep``.

The model's own default ``position_ids`` (the step graph takes them; the forward makes them) is not read from its
code: each rule of ``POSITION_DEFAULTS`` is tried in turn on a padded example with a hole in its mask, and the derived
forward is kept only if its logits equal the eager model's bit for bit. Otherwise (no rule fits, the graph uses its
past in another way, or the step graph cannot be captured) the forward is captured on its own, as before, and so is
every model that is not a transformers causal LM, is compiled with example inputs, or holds bitsandbytes layers
(deriving runs the model eagerly, and a 4-bit layer that ran in eval on the CPU repacks its weights for a kernel
bitsandbytes cannot backpropagate through: it would not train).

>>> import torch, transformers
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                                num_attention_heads=2, num_key_value_heads=1)
>>> model = transformers.LlamaForCausalLM(cfg).eval()
>>> captured, graphs = capture_model(model)
>>> captured.input_names, graphs.cache_names
(('input_ids', 'attention_mask'), ('key_0', 'value_0'))
>>> ids = torch.randint(0, 64, (2, 6))
>>> mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
>>> torch.equal(captured.call(captured.graph_module, ids, mask).logits, model(ids, attention_mask=mask).logits)
True
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from . import bnb
from .capture import CapturedModel, CaptureError, capture
from .capture_cache import CacheGraphs, capture_with_cache, is_causal_lm
from .graph_module import owned_copy
from .passes import ATTENTION_MASK, INPUT_IDS, run_passes

__all__ = ["POSITION_DEFAULTS", "ForwardFromStep", "capture_model", "forward_from_step"]

logger = logging.getLogger("fx_adapters")
aten = torch.ops.aten
POSITIONS = "position_ids"
Positions = Callable[[torch.fx.Graph, torch.fx.Node, torch.fx.Node], torch.fx.Node]  # (graph, ids, mask) -> positions


def _arange(graph: torch.fx.Graph, ids: torch.fx.Node, mask: torch.fx.Node) -> torch.fx.Node:
    """``arange(sequence)`` for every row (Llama, Qwen2, GPT-2: ``cache_position.unsqueeze(0)``)."""
    batch = graph.call_function(aten.sym_size.int, (ids, 0))
    length = graph.call_function(aten.sym_size.int, (ids, 1))
    positions = graph.call_function(aten.arange.default, (length,), {"dtype": torch.long, "device": _device(ids)})
    return graph.call_function(aten.expand.default, (graph.call_function(aten.unsqueeze.default, (positions, 0)),
                                                     [batch, length]))


def _mask_cumsum(graph: torch.fx.Graph, ids: torch.fx.Node, mask: torch.fx.Node) -> torch.fx.Node:
    """``cumsum(mask) * mask - 1``: the attended tokens counted, padding at -1 (OPT)."""
    counted = graph.call_function(aten.cumsum.default, (mask, 1))
    shifted = graph.call_function(aten.sub.Tensor, (graph.call_function(aten.mul.Tensor, (counted, mask)), 1))
    return graph.call_function(aten._to_copy.default, (shifted,), {"dtype": torch.long})


POSITION_DEFAULTS: dict[str, Positions] = {"arange": _arange, "mask cumsum": _mask_cumsum}
"""How models make ``position_ids`` when none are given, tried in this order."""


def _device(node: torch.fx.Node) -> torch.device:
    value = node.meta.get("val")
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


class ForwardFromStep(PassBase):
    """Turn a step graph (``capture_with_cache``) into the model's forward with ``use_cache=False``: the past is
    empty, ``position_ids`` are made by ``positions`` (a rule of ``POSITION_DEFAULTS``), and only the logits are
    returned. With one layer::

        step(input_ids, attention_mask, position_ids, key_0, value_0):
            batch = sym_size(key_0, 0); past = sym_size(value_0, 2)
            keys = cat([key_0, k], -2); values = cat([value_0, v], -2)
            …
            return (logits, keys, values)

    becomes::

        forward(input_ids, attention_mask):
            position_ids = positions(input_ids, attention_mask)
            batch = sym_size(input_ids, 0); past = 0
            keys = k; values = v
            …
            return (logits,)

    ``requires`` refuses a graph that uses its past in any other way (``CaptureError``, graph untouched).
    """

    def __init__(self, cache_names: tuple[str, ...], positions: Positions):
        super().__init__()
        self.cache_names, self.positions = cache_names, positions

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        inputs = {n.target: n for n in graph_module.graph.find_nodes(op="placeholder")}
        missing = [n for n in (INPUT_IDS, ATTENTION_MASK, *self.cache_names) if n not in inputs]
        if missing:
            raise CaptureError(f"ForwardFromStep: the step graph has no input(s) {missing}")
        for name in self.cache_names:
            other = [user.format_node() for user in inputs[name].users if _past_use(user, inputs[name]) is None]
            if other:
                raise CaptureError(f"ForwardFromStep: the step graph uses its past {name!r} in {other[0]}")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        inputs = {n.target: n for n in graph.find_nodes(op="placeholder")}
        ids, mask = inputs[INPUT_IDS], inputs[ATTENTION_MASK]
        with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
            batch = graph.call_function(aten.sym_size.int, (ids, 0))
            if POSITIONS in inputs:
                inputs[POSITIONS].replace_all_uses_with(self.positions(graph, ids, mask))
                graph.erase_node(inputs[POSITIONS])
        for name in self.cache_names:
            past = inputs[name]
            for user in list(past.users):
                use = _past_use(user, past)
                user.replace_all_uses_with(batch if use == "batch" else 0 if use == "length" else user.args[0][1])
                graph.erase_node(user)
        output = graph.output_node()
        output.args = ((output.args[0][0],),)
        graph.eliminate_dead_code()
        for name in self.cache_names:
            graph.erase_node(inputs[name])
        mask.meta["val"] = ids.meta.get("val")  # the mask now covers the new positions only, as input_ids
        return PassResult(graph_module, True)


def _past_use(user: torch.fx.Node, past: torch.fx.Node) -> str | None:
    """What ``user`` reads of a past tensor: its ``batch`` size, its ``length``, or the past ``extended`` by new
    positions (``cat([past, new], -2)``); None for any other use."""
    if user.target is aten.sym_size.int:
        return {0: "batch", 2: "length"}.get(user.args[1])
    if user.target is aten.cat.default and len(user.args[0]) == 2 and user.args[0][0] is past \
            and user.args[0][1] is not past and user.args[1:] in ((-2,), (2,)):
        return "extended"
    return None


def forward_from_step(graphs: CacheGraphs, model: nn.Module) -> CapturedModel | None:
    """The forward of ``model`` (``input_ids``, ``attention_mask``; the model's own output type) derived from its step
    graph ``graphs``, with its own parameters sharing storage; None when no rule of ``POSITION_DEFAULTS`` gives the
    eager model's logits bit for bit on a padded example with a hole (module docstring)."""
    owned = owned_copy(model).eval()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0)).to(model.device)
    mask = torch.ones_like(ids)
    mask[0, :2] = mask[1, 3:5] = 0  # left padding, and a hole: the rules give different positions
    with torch.no_grad():
        expected = owned(input_ids=ids, attention_mask=mask, use_cache=False)
    leaves, out_spec = pytree.tree_flatten(expected)
    if len(leaves) != 1 or not isinstance(leaves[0], torch.Tensor):
        return None
    for name, positions in POSITION_DEFAULTS.items():
        gm = owned_copy(graphs.step)
        try:
            run_passes(gm, [ForwardFromStep(graphs.cache_names, positions)])
            with torch.no_grad():
                logits, = gm(ids, mask)
        except Exception as e:  # a wrong rule may index out of range (GPT-2's positions at -1)
            logger.debug("fx_adapters: position rule %r does not fit %s: %s", name, type(model).__name__, e)
            continue
        if torch.equal(logits, leaves[0]):
            return CapturedModel(gm, (INPUT_IDS, ATTENTION_MASK), out_spec, "export", inspect.signature(model.forward))
    return None


def capture_model(model: nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None
                  ) -> tuple[CapturedModel, CacheGraphs | None]:
    """What every compile captures of ``model``: its forward (``capture``'s ``CapturedModel``) and, for a transformers
    causal LM compiled without example inputs, the step graph ``generate`` runs, from which the forward is derived
    (one ``torch.export`` for both; module docstring). The step graph is None when it is not captured here."""
    quantized = any(isinstance(m, bnb.linear_types()) for m in model.modules())
    if example_inputs is not None or example_kwargs is not None or not is_causal_lm(model) or quantized:
        return capture(model, example_inputs=example_inputs, example_kwargs=example_kwargs), None
    try:
        graphs = capture_with_cache(model)
    except CaptureError as e:  # generate will say why; the forward may still be captured
        logger.debug("fx_adapters: no step graph for %s (%s); capturing its forward alone", type(model).__name__, e)
        return capture(model), None
    forward = forward_from_step(graphs, model)
    if forward is None:
        logger.debug("fx_adapters: the forward of %s is not its step graph's; capturing it too", type(model).__name__)
        forward = capture(model)
    return forward, graphs
