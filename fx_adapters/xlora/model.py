"""``compile_with_xlora`` and the module it returns: X-LoRA (mixture of LoRA experts) as one rewritten graph.

The model is captured (once per call signature: ``graph/captures.py``); each graph is copied into a scaling pass
(every expert at ``scaling_pass_value``), the classifier (on the scaling pass's last hidden state: the output head's
input) and the real pass (each adapted layer adds its experts weighted by the classifier's per-token scalings). See
``pipeline.py``, ``passes.py`` and ``modules.py`` here.

>>> import torch, fx_adapters as fxa
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> def expert(seed):
...     g = torch.Generator().manual_seed(seed)
...     weights = {"0.lora_A.weight": torch.randn(2, 4, generator=g), "0.lora_B.weight": torch.randn(8, 2, generator=g)}
...     return {"peft_type": "LORA", "r": 2, "lora_alpha": 4}, weights
>>> xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={"math": expert(0), "code": expert(1)}))
>>> x = torch.randn(5, 4)
>>> out = xm(x)
>>> xm.get_latest_scalings().shape             # (batch, n_layers, n_experts) here; (batch, seq, …) for LMs
torch.Size([5, 1, 2])
>>> xm.disable_adapter_layers()
>>> torch.equal(xm(x), model(x))
True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..graph import generation
from ..graph.capture import CapturedModel
from ..graph.capture_cache import CacheGraphs
from ..graph.captures import Captures
from ..graph.forward_from_step import capture_model
from ..graph.graph_module import mark_non_persistent_buffers, outside_inference_mode
from ..graph.match import Target, layer_key
from ..graph.signature import CallSignature, SignedForward
from ..graph.torch_compile import CompileMixin
from . import checkpoint
from .config import XLoraConfig, check_number, check_top_k
from .experts import LoraExpert, check_experts, read_lora_expert, stack_experts
from .generation import check_forward_arguments, generate_xlora
from .modules import XLoraClassifier, route_scalings
from .passes import CLASSIFIER_ATTR, two_pass_spec
from .pipeline import adaptable_layers, apply_xlora, base_rewrite, classifier_head, xlora_rewrite


class XLoraModule(CompileMixin, nn.Module):
    """A captured model whose graph runs X-LoRA; call it like the original model, with any of its inputs and flags, in
    eval or train mode, in any dtype (each call signature is captured on first use, ``graph.captures``, and rewritten
    by ``pipeline.apply_xlora`` with this module's classifier and experts). Build it with ``compile_with_xlora`` (or
    ``from_captured`` to reuse a capture).

    ``experts``: the expert names, in the order of the scalings' last axis; ``targets``: the adapted layers, in the
    order of the scalings' layer axis (module order, as PEFT's ``n_layers``); ``config``: this module's own copy of
    the ``XLoraConfig``, updated by the setters as in PEFT.
    """

    accepts_loss_kwargs = False  # transformers' Trainer: the loss is the model's own, unscaled

    def __init__(self, captured: CapturedModel, graph_module: torch.fx.GraphModule, experts: tuple[str, ...],
                 targets: tuple[Target, ...], config: XLoraConfig):
        super().__init__()
        self.graph_module = graph_module
        self.experts, self.targets, self.config = experts, targets, config
        self.captures = Captures(captured, None, torch.float32, torch.device("cpu"))  # _build: Captures.of
        self._disabled = False
        self._latest: torch.Tensor | None = None
        self._log: list[torch.Tensor] = []
        self._logging = False
        self._cache_base(None)

    @classmethod
    def from_captured(cls, model: nn.Module, captured: CapturedModel, config: XLoraConfig) -> XLoraModule:
        """X-LoRA on an existing capture of ``model`` (left unchanged, so one capture serves several configs)."""
        return _build(model, captured, _checked(config, "XLoraModule"), _read_experts(config))

    # ------------------------------------------------------------------ forward
    @property
    def classifier(self) -> XLoraClassifier:
        """The X-LoRA classifier (its ``state_dict`` keys are PEFT's ``internal_xlora_classifier.*`` without it)."""
        return getattr(self.graph_module, CLASSIFIER_ATTR)

    @property
    def adapters_disabled(self) -> bool:
        """Whether ``disable_adapter_layers()`` is in force (the module computes the base model)."""
        return self._disabled

    def forward(self, *args, decode_scalings: str = "token", **kwargs):
        check_forward_arguments(decode_scalings, kwargs, f"{type(self).__name__}.forward")
        signature, values = self.captures.signature(self, args, kwargs)
        if self._disabled:
            return self.captures.call(signature, self._graph_of(signature, values, base=True), values)
        output, scalings = self.captures.call(signature, self._graph_of(signature, values), values,
                                              extra=self.graph_inputs(), out_spec=two_pass_spec)
        self.record_scalings(scalings)
        return output

    def generate(self, *args, decode_scalings: str = "token", **kwargs):
        """transformers' ``generate`` with KV caches (``fx_adapters.graph.generation``), and ``decode_scalings="token"``
        (PEFT's, exact) or ``"prompt"`` (each sequence keeps its last prompt token's scalings: one pass per decode
        step); scalings: ``fx_adapters.xlora.generation``."""
        return generate_xlora(self, *args, decode_scalings=decode_scalings, **kwargs)

    def graph_inputs(self) -> tuple:
        """The graph inputs after the model's (``passes.INPUTS``), from the current config."""
        cfg = self.config
        return self._pass_weights(), cfg.top_k_lora, cfg.enable_softmax_topk, cfg.global_scaling_weight

    def record_scalings(self, scalings: torch.Tensor) -> None:
        """Make ``scalings`` the latest (``get_latest_scalings``), and log them while logging is on."""
        self._latest = scalings
        if self._logging:
            self._log.append(scalings)

    def _pass_weights(self) -> torch.Tensor | None:
        """Every token's ``(n_experts,)`` expert weights in the scaling pass (PEFT's dummy scalings after top-k and
        softmax-top-k); None when they are all 0, as the experts then add exactly 0."""
        value = self.config.scaling_pass_value
        if value == 0:
            return None
        param = next(self.classifier.parameters())
        dummy = torch.full((1, 1, 1, len(self.experts)), value, dtype=param.dtype, device=param.device)
        return route_scalings(dummy, self.config.top_k_lora, self.config.enable_softmax_topk).flatten()

    def _graph_of(self, signature: CallSignature, values: dict, base: bool = False) -> torch.fx.GraphModule:
        """The X-LoRA graph of a call signature (``base``: the model's alone, for disabled adapters): this module's
        own for its primary signature, else a capture of the signature (``graph.captures``) rewritten by
        ``pipeline.apply_xlora``, reading this module's tensors."""
        if signature == self.captures.primary:
            return self._base_graph_module() if base else self._graph_to_call()
        key, build = base_rewrite() if base else xlora_rewrite(self.graph_module, [t.name for t in self.targets])
        return self.captures.graph(signature, values, key, build, self.graph_module, "base" if base else "xlora")

    def _base_graph_module(self) -> torch.fx.GraphModule:
        """The captured graph alone (for disabled adapters), reading this module's current parameters and buffers."""
        if self._base is None:
            graph = copy.deepcopy(self.captures.primary_captured.graph_module.graph)
            self._cache_base(torch.fx.GraphModule(self.graph_module, graph))
        return self._base

    def _cache_base(self, base: torch.fx.GraphModule | None) -> None:
        object.__setattr__(self, "_base", base)  # not a submodule: it shares this module's tensors

    def _apply(self, fn, recurse=True):
        self._cache_base(None)  # .to() / .half() may replace tensors the cached base module holds
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ PEFT's XLoraModel API
    def set_topk_lora(self, value: int | None) -> None:
        """Keep the top ``value`` experts per token (None: all of them)."""
        check_top_k(value, len(self.experts), self.config.enable_softmax_topk, "set_topk_lora")
        self.config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        """Multiply every expert's output by ``weight``."""
        check_number("global_scaling_weight", weight, "set_global_scaling_weight")
        self.config.global_scaling_weight = weight

    def get_global_scaling_weight(self) -> float:
        return self.config.global_scaling_weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        """The scalings every expert gets in the scaling pass; None means 1 / number of experts, as PEFT."""
        value = 1 / len(self.experts) if value is None else value
        check_number("scaling_pass_value", value, "set_scaling_pass_value")
        self.config.scaling_pass_value = value

    def get_latest_scalings(self) -> torch.Tensor | None:
        """The classifier's scalings of the last call, ``(batch, seq, n_layers, n_experts)``; None before any call."""
        return self._latest

    def enable_scalings_logging(self) -> None:
        self._logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging; the log is kept."""
        self._logging = False

    def clear_scalings_log(self) -> None:
        self._log.clear()

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the list of logged scalings (the tensors are not copied)."""
        return list(self._log)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length: ``{seq_len: (positions in the log, scalings)}``."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for position, scalings in enumerate(self._log):
            positions, tensors = buckets.setdefault(scalings.shape[1], ([], []))
            positions.append(position)
            tensors.append(scalings)
        return buckets

    def enable_adapter_layers(self) -> None:
        self._disabled = False

    def disable_adapter_layers(self) -> None:
        """Compute the base model (one pass, no classifier, scalings not updated) until ``enable_adapter_layers``."""
        self._disabled = True

    # ------------------------------------------------------------------ classifier checkpoints
    def save_classifier(self, path: str | Path) -> Path:
        """Write the classifier's weights to a safetensors file (keys as ``classifier.state_dict()``)."""
        layers = [t.name for t in self.targets]
        return checkpoint.save_classifier(self.classifier.state_dict(), path, self.experts, layers)

    def load_classifier(self, path: str | Path) -> None:
        """Load classifier weights from ``save_classifier``'s file or a PEFT X-LoRA checkpoint: the directory PEFT's
        ``save_pretrained`` wrote, or its ``adapter_model.safetensors`` (keys ``…internal_xlora_classifier.*``).
        Reads safetensors only, never a pickle. Checked first: on an error nothing changes. PEFT's folder quirks:
        ``checkpoint.read_classifier``.
        """
        cfg = self.config
        describe = (f"{len(self.experts)} experts, {len(self.targets)} layers, xlora_depth={cfg.xlora_depth}, "
                    f"layerwise_scalings={cfg.layerwise_scalings}")
        self.classifier.load_state_dict(checkpoint.read_classifier(path, self.classifier.state_dict(), describe))


def _checked(config, where: str) -> XLoraConfig:
    if not isinstance(config, XLoraConfig):
        raise TypeError(f"{where}: config must be a fx_adapters.XLoraConfig, got {type(config).__name__}")
    return config


def _read_experts(config: XLoraConfig) -> list[LoraExpert]:
    """Every expert of ``config``, read from disk or its (config, state dict) pair and checked on its own."""
    return [read_lora_expert(name, value) for name, value in config.adapters.items()]


def _build(model: nn.Module, captured: CapturedModel, config: XLoraConfig, experts: Sequence[LoraExpert],
           step_graph: CacheGraphs | None = None) -> XLoraModule:
    """The X-LoRA module, for every entry point: experts checked against the captured layers, the classifier, the
    stacked experts, ``pipeline.apply_xlora`` on a copy of the captured graph (as on every other capture); the model's
    ``step_graph`` for generate when the capture made it."""
    config = copy.copy(config)
    modules = dict(model.named_modules())
    linear, layers = adaptable_layers(captured.graph_module, model)
    check_experts(experts, layers, modules)
    order = {name: i for i, name in enumerate(modules)}
    targets = tuple(layers[p] for p in sorted({p for e in experts for p in e.weights}, key=order.__getitem__))
    head = classifier_head(model, linear)
    hidden_size = config.hidden_size or head.in_features
    if hidden_size != head.in_features:
        raise ValueError(f"XLoraConfig: hidden_size={config.hidden_size} but the classifier reads the input of the "
                         f"output head {head.name!r}, which has {head.in_features} features; pass "
                         f"hidden_size={head.in_features} or None")
    param = next(model.parameters())
    classifier = XLoraClassifier(
        hidden_size, len(experts), len(targets), depth=config.xlora_depth, size=config.xlora_size,
        dropout_p=config.xlora_dropout_p, layerwise=config.layerwise_scalings,
        enable_softmax=config.enable_softmax, temperature=config.softmax_temperature,
        dtype=param.dtype, device=param.device)
    # PEFT keeps LoRA weights in the model's dtype, fp16/bf16 ones upcast to fp32
    expert_dtype = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
    stacked = stack_experts(experts, targets, expert_dtype, param.device, config.use_trainable_adapters)
    source = captured.graph_module
    gm = torch.fx.GraphModule(source, copy.deepcopy(source.graph), type(source).__name__)
    mark_non_persistent_buffers(gm, source)
    apply_xlora(gm, model, classifier, {layer_key(t.name): stacked[t] for t in targets}, [t.name for t in targets])
    xm = XLoraModule(captured, gm, tuple(config.adapters), targets, config)
    generation.attach(xm, model, step_graph)
    xm.captures, xm.forward = Captures.of(captured, model), SignedForward(xm, model)
    return xm.train(model.training)


@outside_inference_mode
def compile_with_xlora(model: nn.Module, config: XLoraConfig, example_inputs: tuple | None = None,
                       example_kwargs: dict | None = None) -> XLoraModule:
    """Read ``config``'s experts (errors name the expert, before any capture), capture ``model`` and build its
    X-LoRA graph; ``model`` is not modified."""
    experts = _read_experts(_checked(config, "compile_with_xlora"))
    captured, step_graph = capture_model(model, example_inputs, example_kwargs)
    return _build(model, captured, config, experts, step_graph)
