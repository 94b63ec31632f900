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
>>> from fx_adapters.passes import run_passes
>>> from fx_adapters.passes.capture import capture
>>> from fx_adapters.passes.match import find_linear_layers
>>> from fx_adapters.runtime.xlora import XLoraClassifier, XLoraExperts
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

from collections.abc import Mapping

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.xlora import XLoraExperts, route_scalings
from .match import Target, attr_tensor
from .rewrite import layer_key

SCALING, REAL = "scaling", "real"
CLASSIFIER_ATTR = "xlora_classifier"
EXPERTS_ATTR = "xlora_experts"
# extra graph inputs, after the model's, with PEFT's defaults
INPUTS = {"xlora_pass_weights": None, "xlora_top_k": None, "xlora_softmax_topk": False, "xlora_global_weight": 1.0}
TAG = "xlora"  # node.meta[TAG] = (pass, name of the captured node it copies) / ("routed", None)


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
                copied.meta = dict(node.meta, **{TAG: (SCALING, node.name)})
                if "nn_module_stack" in node.meta:  # a call site of its own for each module (see match.py)
                    copied.meta["nn_module_stack"] = {f"{key}@xlora_scaling": value
                                                      for key, value in node.meta["nn_module_stack"].items()}
                scaling_env[node] = copied

        graph_module.add_module(CLASSIFIER_ATTR, self.classifier)
        hidden = graph.call_method("detach", (scaling_env[last_hidden],))  # PEFT: scaling pass in no_grad
        scalings = graph.call_module(CLASSIFIER_ATTR, (hidden,))
        routed = graph.call_function(route_scalings, (scalings, extra["xlora_top_k"], extra["xlora_softmax_topk"]))
        routed.meta.update({TAG: ("routed", None), "is_wrapped": True})  # a leaf when a pickled module is re-traced

        real_env = dict(placeholders)
        for node in old.nodes:
            if node.op == "output":
                outputs = torch.fx.map_arg(node.args[0], real_env.__getitem__)
                graph.output((*outputs, scalings))
            elif node.op != "placeholder":
                real_env[node] = graph.node_copy(node, real_env.__getitem__)
                real_env[node].meta[TAG] = (REAL, node.name)
        graph_module.graph = graph
        return PassResult(graph_module, True)


def find_embedding_layers(gm: torch.fx.GraphModule, module_types: Mapping[str, type]) -> list[Target]:
    """Every ``nn.Embedding`` lookup of ``gm`` as a ``Target`` (kind ``"embedding"``, in_features = vocabulary).

    In an exported graph the node is ``aten.embedding`` itself, so a scaled embedding (Gemma's) scales the experts'
    output too, as PEFT does.
    """
    found: dict[str, Target] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and issubclass(module_types.get(node.target, type(None)), nn.Embedding):
            path, weight = node.target, gm.get_submodule(node.target).weight
        elif node.target == torch.ops.aten.embedding.default and node.meta.get("nn_module_stack"):
            path = next(reversed(node.meta["nn_module_stack"].values()))[0]
            weight = attr_tensor(gm, node.args[0])
        else:
            continue
        nodes = (found[path].nodes if path in found else ()) + (node.name,)
        found[path] = Target(path, "embedding", int(weight.shape[0]), int(weight.shape[1]), False, nodes)
    return list(found.values())


def layer_input(node: torch.fx.Node) -> torch.fx.Node:
    """The input ``x`` of the linear-like or embedding layer whose output is ``node`` (a ``Target`` node)."""
    aten = torch.ops.aten
    if node.target == aten.embedding.default:
        return node.args[1]
    if node.op == "call_module" or node.target in (aten.linear.default, torch.nn.functional.linear):
        return node.args[0]
    # GPT-2 Conv1D: view(addmm(bias, view(x, [-1, in]), weight), size_out)
    mm = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if mm is not None and mm.target == aten.addmm.default and isinstance(mm.args[1], torch.fx.Node):
        return mm.args[1].args[0]
    raise RuntimeError(f"xlora: cannot find the input of layer node {node.name!r} ({node.op} {node.target}); "
                       "X-LoRA needs the layer's input next to its output in the graph")


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
        routed = next((n for n in graph.nodes if n.meta.get(TAG) == ("routed", None)), None)
        if routed is None:
            raise RuntimeError("xlora: no routed scalings in the graph; run TwoPassGraph before InsertXLoraExperts")
        sites = {}
        for target, (index, experts) in self.experts.items():
            modules[layer_key(target.name)] = experts
            sites.update({name: (target.name, index) for name in target.nodes})
        modified = False
        for node in list(graph.nodes):
            kind, source = node.meta.get(TAG, (None, None))
            if kind not in (SCALING, REAL) or source not in sites:
                continue
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
            node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
            for new in (weights, out):
                if new.op != "placeholder":  # match.py skips nodes tagged "fx_adapters"
                    new.meta["fx_adapters"] = ("xlora", name, kind)
            for key in ("nn_module_stack", "val"):
                if key in node.meta:
                    out.meta[key] = node.meta[key]
            modified = True
        return PassResult(graph_module, modified)
