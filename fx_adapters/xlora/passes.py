"""X-LoRA rewrite passes: one graph holding the scaling pass, the classifier and the real pass.

``TwoPassGraph`` turns a captured graph into::

    scaling pass  (the nodes the classifier's input needs, renamed ``xlora_scaling_*``)
    scalings = xlora_classifier(detach(hidden))       # hidden: the scaling pass's last hidden state
    routed   = route_scalings(scalings, xlora_top_k, xlora_softmax_topk)
    real pass     (the whole captured graph, original node names)
    output   = (*the model's outputs, scalings)

and ``InsertXLoraExperts`` puts an ``xlora_experts.<layer>`` call after every call site of each adapted layer in
both passes: ``(y, x, xlora_pass_weights, xlora_global_weight)`` in the scaling pass, ``(y, x, routed[:, :, l],
xlora_global_weight)`` in the real pass (``l``: the layer's index in the scalings). The parameters are the
captured ones, shared by both passes; the new graph inputs follow the model's and have PEFT's defaults.

>>> import torch
>>> from torch import nn
>>> from fx_adapters.graph.passes import run_passes
>>> from fx_adapters.graph.capture import capture
>>> from fx_adapters.graph.match import find_linear_layers
>>> from fx_adapters.xlora.modules import XLoraClassifier, XLoraExperts
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> gm = capture(model).graph_module
>>> layer0, head = find_linear_layers(gm, {"0": nn.Linear, "2": nn.Linear})
>>> experts = XLoraExperts(torch.randn(2, 1, 4), torch.randn(8, 2, 1), torch.ones(2))
>>> _ = run_passes(gm, [TwoPassGraph(head.nodes[0], XLoraClassifier(8, n_experts=2, n_layers=1)),
...                     InsertXLoraExperts({layer0: (0, experts)})])
>>> [n.name for n in gm.graph.nodes if n.op == "call_module"]  # doctest: +NORMALIZE_WHITESPACE
['xlora_scaling__0', 'xlora_scaling_experts_0', 'xlora_scaling__1', 'xlora_classifier',
 '_0', 'xlora_real_experts_0', '_1', '_2']
>>> (logits, scalings) = gm(torch.randn(5, 4))
>>> logits.shape, scalings.shape
(torch.Size([5, 3]), torch.Size([5, 1, 2]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..graph.match import Target, layer_input, layer_key
from ..graph.tags import Tag, set_tag
from .modules import XLoraExperts, route_scalings

SCALING, REAL, ROUTED = "scaling", "real", "routed"
CLASSIFIER_ATTR = "xlora_classifier"
EXPERTS_ATTR = "xlora_experts"
# extra graph inputs, after the model's, with PEFT's defaults
INPUTS = {"xlora_pass_weights": None, "xlora_top_k": None, "xlora_softmax_topk": False, "xlora_global_weight": 1.0}
PASS_KEY = "xlora_pass"  # node.meta[PASS_KEY]: the node's PassCopy


@dataclass(frozen=True)
class PassCopy:
    """Which pass a node of the two-pass graph belongs to and the captured node it copies (``source``; None for
    the routed scalings, ``pass_name`` ``"routed"``)."""

    pass_name: str
    source: str | None


@dataclass(frozen=True)
class ExpertsTag(Tag):
    """The experts call of ``layer`` (and its scalings' select) in pass ``pass_name``."""

    pass_name: str


def two_pass_spec(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """The output spec of a ``TwoPassGraph`` rewrite of a graph whose output spec is ``spec``: ``(output,
    scalings)``."""
    return pytree.TreeSpec(tuple, None, [spec, pytree.treespec_leaf()])


def pass_of(node: torch.fx.Node) -> PassCopy | None:
    return node.meta.get(PASS_KEY)


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(current.all_input_nodes)
    return seen


class TwoPassGraph(PassBase):
    """Rebuild a captured graph (see ``capture``) as scaling pass → classifier → real pass (module docstring).

    ``head``: the name of the output head's node; the classifier reads the head's input (the last hidden state).
    """

    def __init__(self, head: str, classifier: nn.Module):
        super().__init__()
        self.head, self.classifier = head, classifier

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        old = graph_module.graph
        nodes = {n.name: n for n in old.nodes}
        if self.head not in nodes:
            raise RuntimeError(f"xlora: no node {self.head!r} (the output head) in the graph")
        last_hidden = layer_input(nodes[self.head])
        graph = torch.fx.Graph()
        placeholders = {}
        for node in old.find_nodes(op="placeholder"):
            placeholders[node] = graph.node_copy(node)
        extra = {name: graph.placeholder(name, default_value=default) for name, default in INPUTS.items()}

        needed = _ancestors(last_hidden)
        scaling_env = dict(placeholders)
        for node in old.nodes:
            if node in needed and node.op != "placeholder":
                copied = graph.create_node(node.op, node.target, torch.fx.map_arg(node.args, scaling_env.__getitem__),
                                           torch.fx.map_arg(node.kwargs, scaling_env.__getitem__),
                                           name=f"xlora_scaling_{node.name}", type_expr=node.type)
                copied.meta = dict(node.meta, **{PASS_KEY: PassCopy(SCALING, node.name)})
                if "nn_module_stack" in node.meta:  # a call site of its own for each module (see match.py)
                    copied.meta["nn_module_stack"] = {f"{key}@xlora_scaling": value
                                                      for key, value in node.meta["nn_module_stack"].items()}
                scaling_env[node] = copied

        graph_module.add_module(CLASSIFIER_ATTR, self.classifier)
        hidden = graph.call_method("detach", (scaling_env[last_hidden],))  # PEFT: scaling pass in no_grad
        scalings = graph.call_module(CLASSIFIER_ATTR, (hidden,))
        routed = graph.call_function(route_scalings, (scalings, extra["xlora_top_k"], extra["xlora_softmax_topk"]))
        # is_wrapped: a leaf when a pickled module is re-traced
        routed.meta.update({PASS_KEY: PassCopy(ROUTED, None), "is_wrapped": True})

        real_env = dict(placeholders)
        for node in old.nodes:
            if node.op == "output":
                outputs = torch.fx.map_arg(node.args[0], real_env.__getitem__)
                graph.output((*outputs, scalings))
            elif node.op != "placeholder":
                real_env[node] = graph.node_copy(node, real_env.__getitem__)
                real_env[node].meta[PASS_KEY] = PassCopy(REAL, node.name)
        graph_module.graph = graph
        return PassResult(graph_module, True)


class InsertXLoraExperts(PassBase):
    """Register ``experts`` under ``xlora_experts.<layer key>`` and call them after each call site, in both passes.

    ``experts`` maps each adapted ``Target`` to ``(index in the scalings' layer axis, XLoraExperts)``.
    """

    def __init__(self, experts: Mapping[Target, tuple[int, XLoraExperts]]):
        super().__init__()
        self.experts = experts

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        if not hasattr(graph_module, EXPERTS_ATTR):
            graph_module.add_module(EXPERTS_ATTR, nn.ModuleDict())
        modules = getattr(graph_module, EXPERTS_ATTR)
        inputs = {n.target: n for n in graph.find_nodes(op="placeholder") if n.target in INPUTS}
        routed = next((n for n in graph.nodes if pass_of(n) == PassCopy(ROUTED, None)), None)
        if routed is None:
            raise RuntimeError("xlora: no routed scalings in the graph; run TwoPassGraph before InsertXLoraExperts")
        sites = {}
        for target, (index, experts) in self.experts.items():
            modules[layer_key(target.name)] = experts
            sites.update({name: (target.name, index) for name in target.nodes})
        modified = False
        for node in list(graph.nodes):
            copy = pass_of(node)
            if copy is None or copy.pass_name not in (SCALING, REAL) or copy.source not in sites:
                continue
            kind, source = copy.pass_name, copy.source
            name, index = sites[source]
            x = layer_input(node)
            with graph.inserting_before(node.next):
                if kind == SCALING:
                    weights = inputs["xlora_pass_weights"]
                else:
                    weights = graph.call_function(torch.select, (routed, -2, index))
                out = graph.create_node("call_module", f"{EXPERTS_ATTR}.{layer_key(name)}",
                                        (node, x, weights, inputs["xlora_global_weight"]),
                                        name=f"xlora_{kind}_experts_{layer_key(name)}")
            node.replace_all_uses_with(out, delete_user_cb=lambda user, new=out: user is not new)
            for new in (weights, out):
                if new.op != "placeholder":  # the match pass skips tagged nodes
                    set_tag(new, ExpertsTag(name, kind))
            for key in ("nn_module_stack", "val"):
                if key in node.meta:
                    out.meta[key] = node.meta[key]
            modified = True
        return PassResult(graph_module, modified)


PREFIX = "xlora_scaling_"


def _in_pass(node: torch.fx.Node, pass_name: str) -> bool:
    copy = pass_of(node)
    return copy is not None and copy.pass_name == pass_name


class ScalingPassCache(PassBase):
    """X-LoRA on cached graphs: the scaling pass gets a KV cache of its own.

    ``TwoPassGraph`` on a graph of ``capture_with_cache`` copies the cache inputs' users into both passes, so both
    would read one past cache and only the real pass's new cache would be returned. This pass (run right after
    ``TwoPassGraph``, before ``InsertXLoraExperts``) gives the scaling pass its own past-cache placeholders
    ``xlora_scaling_<name>``, placed right after the model's cache inputs, and returns its new cache after the
    scalings::

        inputs:  (*model inputs, *cache, *xlora_scaling_cache, *X-LoRA inputs)
        outputs: (logits, *cache, scalings, *scaling cache)

    Both passes are causal and the classifier scores each position on its own, so the scaling pass's cache holds
    exactly what re-running the scaling pass on the whole sequence would compute for the past positions.

    ``cache_names``: the cache placeholders (none in a prefill graph); ``n_cache``: how many cache tensors follow
    the logits in the model's outputs.
    """

    def __init__(self, cache_names: Sequence[str], n_cache: int):
        super().__init__()
        self.cache_names, self.n_cache = tuple(cache_names), n_cache

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        output = graph.output_node()
        logits, *cache, scalings = output.args[0]
        if len(cache) != self.n_cache:
            raise RuntimeError(f"xlora cache: expected outputs (logits, {self.n_cache} cache tensors, scalings), got "
                               f"{len(cache) + 2}; run ScalingPassCache right after TwoPassGraph on a cached graph")
        scaling_nodes = {pass_of(n).source: n for n in graph.nodes if _in_pass(n, SCALING)}
        missing = [n.name for n in cache if pass_of(n) is None or pass_of(n).source not in scaling_nodes]
        if missing:
            raise RuntimeError(f"xlora cache: the scaling pass does not compute cache outputs {missing[:3]}; the "
                               "classifier's input must depend on every layer's keys and values")
        placeholders = {n.target: n for n in graph.find_nodes(op="placeholder")}
        last = placeholders[self.cache_names[-1]] if self.cache_names else None
        for name in self.cache_names:
            with graph.inserting_after(last):
                last = graph.placeholder(PREFIX + name)
            last.meta = dict(placeholders[name].meta)
            placeholders[name].replace_all_uses_with(last, delete_user_cb=lambda user: _in_pass(user, SCALING))
        output.args = ((logits, *cache, scalings, *(scaling_nodes[pass_of(n).source] for n in cache)),)
        return PassResult(graph_module, True)


class ReuseScalingPassNodes(PassBase):
    """Compute once what both passes compute alike: a real-pass node whose captured node, op and arguments are those
    of its scaling-pass copy (once the inputs it reads are themselves reused) is replaced by that copy. Everything
    before the first expert call is identical in both passes: the embedding, the rotary tables and the mask, the
    first layer's norm and its projections (an expert adds to a layer's output, after the layer)::

        before:  xlora_scaling_embedding = embedding(w, input_ids)      embedding = embedding(w, input_ids)
                 xlora_scaling_linear = linear(xlora_scaling_norm, wq)  linear = linear(norm, wq)
                 xlora_real_experts_q(linear, norm, ...)
        after:   xlora_scaling_embedding = embedding(w, input_ids)
                 xlora_scaling_linear = linear(xlora_scaling_norm, wq)
                 xlora_real_experts_q(xlora_scaling_linear, xlora_scaling_norm, ...)

    Run after ``InsertXLoraExperts`` (its expert calls are no copies, so whatever reads them stays in its pass) and
    ``ScalingPassCache`` (the passes' past caches are different inputs). Ops that mutate or draw random numbers are
    never reused. Gradients are unchanged: the classifier reads the scaling pass through a ``detach``.
    """

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        twins = {pass_of(n).source: n for n in graph.nodes if _in_pass(n, SCALING)}
        reused: dict[torch.fx.Node, torch.fx.Node] = {}

        def through(node: torch.fx.Node) -> torch.fx.Node:
            return reused.get(node, node)

        for node in graph.nodes:
            twin = twins.get(pass_of(node).source) if _in_pass(node, REAL) else None
            if (twin is not None and (node.op, node.target) == (twin.op, twin.target) and _pure(node)
                    and torch.fx.map_arg(node.args, through) == twin.args
                    and torch.fx.map_arg(node.kwargs, through) == twin.kwargs):
                reused[node] = twin
        for node, twin in reused.items():
            node.replace_all_uses_with(twin)
        for node in reversed(reused):
            graph.erase_node(node)
        return PassResult(graph_module, bool(reused))


_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _pure(node: torch.fx.Node) -> bool:
    """Whether two calls of ``node``'s op on the same arguments give the same value and change nothing: no mutating
    or random op (``Node.is_impure``), no in-place method, no module holding a dropout (plain modules keep theirs)."""
    if node.op == "call_method":
        return not node.target.endswith("_")
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return not any(isinstance(m, _RANDOM_MODULES) for m in module.modules())
    return not node.is_impure(impure_random=True)


FIXED_SCALINGS = "xlora_fixed_scalings"


class FixedScalingsGraph(PassBase):
    """The real pass alone, with the classifier's scalings as a graph input (``generate(decode_scalings="prompt")``
    reuses each sequence's last prompt-token scalings in its decode steps)::

        before:  (*model inputs, *cache) -> (logits, *cache)
        after:   (*model inputs, *cache, xlora_fixed_scalings, *X-LoRA inputs) -> (logits, *cache)
                 routed = route_scalings(xlora_fixed_scalings, xlora_top_k, xlora_softmax_topk)

    ``xlora_fixed_scalings`` is ``(batch, 1, n_layers, n_experts)``, the classifier's output before routing, so
    top-k and softmax-top-k apply as in the two-pass graph. No scaling pass and no classifier: ``InsertXLoraExperts``
    then adds the experts to the real pass only.
    """

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        placeholders = list(graph.find_nodes(op="placeholder"))
        with graph.inserting_after(placeholders[-1]):
            fixed = graph.placeholder(FIXED_SCALINGS)
        last = fixed
        extra = {}
        for name, default in INPUTS.items():
            with graph.inserting_after(last):
                last = extra[name] = graph.placeholder(name, default_value=default)
        for node in graph.nodes:
            if node.op not in ("placeholder", "output"):
                node.meta[PASS_KEY] = PassCopy(REAL, node.name)
        with graph.inserting_after(last):
            routed = graph.call_function(route_scalings, (fixed, extra["xlora_top_k"], extra["xlora_softmax_topk"]))
        routed.meta.update({PASS_KEY: PassCopy(ROUTED, None), "is_wrapped": True})
        return PassResult(graph_module, True)


def xlora_passes(head: str, classifier: nn.Module, experts: Mapping[Target, tuple[int, XLoraExperts]],
                 cache: tuple[Sequence[str], int] | None = None, fixed_scalings: bool = False) -> list[PassBase]:
    """The X-LoRA rewrite of a captured graph, built here only: ``compile_with_xlora`` runs it on the model's graph,
    ``generate`` on its prefill and decode graphs (``cache``: ``(cache placeholder names, number of cache
    outputs)``, for ``ScalingPassCache``). ``fixed_scalings``: the one-pass graph of ``FixedScalingsGraph`` instead
    (``head`` and ``classifier`` unused)."""
    if fixed_scalings:
        return [FixedScalingsGraph(), InsertXLoraExperts(experts)]
    scaling_cache = [] if cache is None else [ScalingPassCache(*cache)]
    return [TwoPassGraph(head, classifier), *scaling_cache, InsertXLoraExperts(experts), ReuseScalingPassNodes()]
