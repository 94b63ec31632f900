"""Match pass: find the linear-like (and embedding) layers of a captured graph and select the ones an adapter targets.

A linear-like layer is a module whose output an adapter can follow: ``nn.Linear`` (``call_module`` in a
traced graph, ``aten.linear`` in an exported one), GPT-2's ``Conv1D`` (``aten.addmm`` plus views in an
exported graph) and bitsandbytes' 8-bit / 4-bit layers (opaque ``call_module`` nodes). How each appears in
a graph, where its output and its input are, is worked out here only. Selection follows PEFT's
``target_modules`` / ``exclude_modules`` rules on the module path.

>>> import torch
>>> from torch import nn
>>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
>>> layers = find_linear_layers(gm, {"0": nn.Linear, "2": nn.Linear})
>>> [(t.name, t.kind, t.in_features, t.out_features) for t in layers]
[('0', 'linear', 4, 8), ('2', 'linear', 8, 2)]
>>> [t.name for t in select_targets(layers, ["2"]).targets]
['2']
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .graph_module import attr_tensor
from .tags import is_tagged

# PEFT's TRANSFORMERS_MODELS_TO_ROAD_TARGET_MODULES_MAPPING (peft 0.21), used when target_modules is None.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"], "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"], "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"], "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


@dataclass(frozen=True)
class Target:
    """A linear-like layer of the captured graph.

    ``nodes`` names the graph nodes that carry the layer's output, one per call site: the rotation goes
    right after each of them.
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    has_bias: bool
    nodes: tuple[str, ...]


@dataclass
class MatchReport:
    """Which layers an adapter config selects, and why each of the others was left out."""

    targets: list[Target]
    skipped: dict[str, str] = field(default_factory=dict)


def layer_key(path: str) -> str:
    """Attribute-safe key of a module path, for the ``ModuleDict``s that hold a method's per-layer modules."""
    return path.replace(".", "__")


def layer_kind(module_type: type) -> str | None:
    """``"bnb8"``, ``"bnb4"``, ``"conv1d"``, ``"linear"`` or None. bnb layers subclass nn.Linear: test them first."""
    names = {cls.__module__ + "." + cls.__qualname__ for cls in module_type.__mro__}
    if any(n.startswith("bitsandbytes.") and n.endswith("Linear8bitLt") for n in names):
        return "bnb8"
    if any(n.startswith("bitsandbytes.") and n.endswith("Linear4bit") for n in names):
        return "bnb4"
    if "transformers.pytorch_utils.Conv1D" in names:
        return "conv1d"
    if issubclass(module_type, nn.Linear):
        return "linear"
    return None


def _innermost_module(node: torch.fx.Node) -> tuple[str, str] | None:
    """(call-site key, module path) of the innermost module a node of an exported graph belongs to."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (path, _cls) = next(reversed(stack.items()))
    return key, path


def _call_site_outputs(gm: torch.fx.GraphModule, module_types: Mapping[str, type]):
    """Yield (path, output node, weight shape, has bias) for each call of a linear-like module."""
    members: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in module_types and layer_kind(module_types[node.target]):
            module = gm.get_submodule(node.target)
            yield node.target, node, (module.out_features, module.in_features), module.bias is not None
        elif node.op == "call_function" and not is_tagged(node):
            site = _innermost_module(node)
            if site and site[1] in module_types and layer_kind(module_types[site[1]]) in ("linear", "conv1d"):
                members.setdefault(site[0], []).append(node)
    aten = torch.ops.aten
    for nodes in members.values():
        inside = set(nodes)
        outs = [n for n in nodes if any(u not in inside for u in n.users)]
        path = _innermost_module(nodes[0])[1]
        compute = [n for n in nodes if n.target in (aten.linear.default, aten.addmm.default)]
        if len(outs) != 1 or len(compute) != 1:
            raise RuntimeError(f"match: cannot find the output of layer {path!r} in the graph "
                               f"({len(outs)} outputs, {len(compute)} linear/addmm nodes)")
        (op,) = compute
        if op.target == aten.linear.default:
            out_f, in_f = attr_tensor(gm, op.args[1]).shape
            has_bias = len(op.args) > 2 and op.args[2] is not None
        else:  # Conv1D: addmm(bias, x, weight[in, out])
            in_f, out_f = attr_tensor(gm, op.args[2]).shape
            has_bias = True
        yield path, outs[0], (out_f, in_f), has_bias


def find_linear_layers(gm: torch.fx.GraphModule, module_types: Mapping[str, type]) -> list[Target]:
    """Every linear-like layer of ``gm`` in graph order; ``module_types`` maps module paths to classes."""
    found: dict[str, Target] = {}
    for path, out_node, (out_f, in_f), has_bias in _call_site_outputs(gm, module_types):
        prev = found.get(path)
        nodes = (prev.nodes if prev else ()) + (out_node.name,)
        found[path] = Target(path, layer_kind(module_types[path]), int(in_f), int(out_f), has_bias, nodes)
    return list(found.values())


def find_embedding_layers(gm: torch.fx.GraphModule, module_types: Mapping[str, type]) -> list[Target]:
    """Every ``nn.Embedding`` lookup of ``gm`` as a ``Target`` (kind ``"embedding"``, in_features = vocabulary).

    In an exported graph the node is ``aten.embedding`` itself, so a scaled embedding (Gemma's) scales what follows
    the lookup too, as PEFT does.
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
    # GPT-2 Conv1D: view(addmm(bias, view(x, [-1, in]), weight), size_out), the output found by _call_site_outputs
    mm = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if mm is not None and mm.target == aten.addmm.default and isinstance(mm.args[1], torch.fx.Node):
        return mm.args[1].args[0]
    raise RuntimeError(f"cannot find the input of layer node {node.name!r} ({node.op} {node.target}); an adapter that "
                       "reads the layer's input needs it next to the layer's output in the graph")


def _selector_matches(selector: Sequence[str] | str, path: str) -> bool:
    if isinstance(selector, str):
        return re.fullmatch(selector, path) is not None
    return path in selector or any(path.endswith("." + s) for s in selector)


def select_targets(
    layers: Sequence[Target],
    target_modules: Sequence[str] | str | None,
    exclude_modules: Sequence[str] | str | None = None,
    *,
    model_type: str | None = None,
    output_head: str | None = None,
) -> MatchReport:
    """Apply PEFT's selection rules. Raises ValueError naming candidates when nothing is selected."""
    if target_modules is None:
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"target_modules=None but there are no default targets for model type {model_type!r}; "
                f"pass target_modules (e.g. 'all-linear' or some of: {_examples(layers)})"
            )
        target_modules = DEFAULT_TARGETS[model_type]
    report = MatchReport(targets=[])
    for layer in layers:
        if exclude_modules and _selector_matches(exclude_modules, layer.name):
            report.skipped[layer.name] = "excluded by exclude_modules"
        elif target_modules == "all-linear":
            if layer.name == output_head:
                report.skipped[layer.name] = "output head (never targeted by 'all-linear')"
            else:
                report.targets.append(layer)
        elif _selector_matches(target_modules, layer.name):
            report.targets.append(layer)
        else:
            report.skipped[layer.name] = "not selected by target_modules"
    if not report.targets:
        raise ValueError(
            f"no linear-like layer matched target_modules={target_modules!r}"
            f"{f' (exclude_modules={exclude_modules!r})' if exclude_modules else ''}; "
            f"candidates are, e.g.: {_examples(layers, target_modules)}"
        )
    return report


def _examples(layers: Sequence[Target], near=None, n: int = 6) -> str:
    names = [layer.name for layer in layers]
    if isinstance(near, (list, tuple)) and near:
        close = [m for s in near for m in difflib.get_close_matches(s, [x.rsplit(".", 1)[-1] for x in names], 2)]
        names = sorted({x for x in names if x.rsplit(".", 1)[-1] in close}, key=names.index) + names
    uniq = list(dict.fromkeys(names))
    return ", ".join(uniq[:n]) + (", …" if len(uniq) > n else "") if uniq else "(no linear-like layers)"


def output_head(model: nn.Module) -> str | None:
    """Module path of a transformers model's output embedding (e.g. ``lm_head``), None for other models."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((name for name, m in model.named_modules() if m is head), None) if head is not None else None


class FindLinearLayers(PassBase):
    """Analysis pass: records ``self.layers`` and leaves the graph unchanged."""

    def __init__(self, module_types: Mapping[str, type]):
        super().__init__()
        self.module_types = module_types
        self.layers: list[Target] = []

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        self.layers = find_linear_layers(graph_module, self.module_types)
        return PassResult(graph_module, False)
