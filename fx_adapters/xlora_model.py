"""``compile_with_xlora`` and the module it returns: X-LoRA (mixture of LoRA experts) as one rewritten graph.

The model is captured once; its graph is copied into a scaling pass (every expert at ``scaling_pass_value``), the
classifier (on the scaling pass's last hidden state: the output head's input) and the real pass (each adapted layer
adds its experts weighted by the classifier's per-token scalings). See ``passes/xlora.py`` and ``runtime/xlora.py``.

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
import dataclasses
import json
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import generation
from .config import CONFIG_NAME, PICKLED_WEIGHTS_NAME, WEIGHTS_NAME, XLoraConfig, check_number, check_top_k
from .lora_experts import check_experts, read_lora_expert, stack_experts
from .passes import run_passes
from .passes.capture import CapturedModel, _mark_non_persistent_buffers, capture
from .passes.match import Target, find_linear_layers, output_head
from .passes.xlora import CLASSIFIER_ATTR, InsertXLoraExperts, TwoPassGraph, find_embedding_layers
from .runtime.compiled import CompileMixin
from .runtime.xlora import XLoraClassifier, route_scalings

CLASSIFIER_KEY = "internal_xlora_classifier."  # PEFT's prefix of the classifier's state_dict keys
SAVE_FORMAT = "fx_adapters.xlora_classifier"  # the "format" metadata of save_classifier's files
PEFT_SAVE_HINT = (
    "PEFT 0.21's save_pretrained keeps classifier layer K out of adapter_model.safetensors when K is an expert's name "
    "('0', '1', …) and writes it into subfolder K instead: load the whole directory save_pretrained wrote (every "
    "adapter, not selected_adapters=['default']), or save PEFT's classifier with safetensors.torch.save_file("
    "{k: v for k, v in peft_model.state_dict().items() if 'internal_xlora_classifier' in k}, path)"
)


class XLoraModule(CompileMixin, nn.Module):
    """A captured model whose graph runs X-LoRA; call it like the original model. Build it with ``compile_with_xlora``
    (or ``from_captured`` to reuse a capture).

    ``experts``: the expert names, in the order of the scalings' last axis; ``targets``: the adapted layers, in the
    order of the scalings' layer axis (module order, as PEFT's ``n_layers``); ``config``: this module's own copy of
    the ``XLoraConfig``, updated by the setters as in PEFT.
    """

    def __init__(self, captured: CapturedModel, graph_module: torch.fx.GraphModule, experts: tuple[str, ...],
                 targets: tuple[Target, ...], config: XLoraConfig):
        super().__init__()
        self.graph_module = graph_module
        self.experts, self.targets, self.config = experts, targets, config
        self._captured = captured
        self._two_pass = dataclasses.replace(
            captured, graph_module=graph_module,
            out_spec=pytree.TreeSpec(tuple, None, [captured.out_spec, pytree.treespec_leaf()]))
        self._disabled = False
        self._latest: torch.Tensor | None = None
        self._log: list[torch.Tensor] = []
        self._logging = False
        self._cache_base(None)

    @classmethod
    def from_captured(cls, model: nn.Module, captured: CapturedModel, config: XLoraConfig) -> XLoraModule:
        """X-LoRA on an existing capture of ``model`` (left unchanged, so one capture serves several configs)."""
        if not isinstance(config, XLoraConfig):
            raise TypeError(f"XLoraModule: config must be a fx_adapters.XLoraConfig, got {type(config).__name__}")
        config = copy.copy(config)
        modules = dict(model.named_modules())
        types = {name: type(m) for name, m in modules.items()}
        linear = {t.name: t for t in find_linear_layers(captured.graph_module, types)}
        layers = {**linear, **{t.name: t for t in find_embedding_layers(captured.graph_module, types)}}
        experts = [read_lora_expert(name, value) for name, value in config.adapters.items()]
        check_experts(experts, layers, modules)
        order = {name: i for i, name in enumerate(modules)}
        targets = tuple(layers[p] for p in sorted({p for e in experts for p in e.weights}, key=order.__getitem__))
        head = _classifier_head(model, linear)
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
        _mark_non_persistent_buffers(gm, source)
        run_passes(gm, [TwoPassGraph(head.nodes[0], classifier),
                        InsertXLoraExperts({t: (i, stacked[t]) for i, t in enumerate(targets)})])
        xm = cls(captured, gm, tuple(config.adapters), targets, config).train(model.training)
        generation.attach(xm, model)
        return xm

    # ------------------------------------------------------------------ forward
    @property
    def classifier(self) -> XLoraClassifier:
        """The X-LoRA classifier (its ``state_dict`` keys are PEFT's ``internal_xlora_classifier.*`` without it)."""
        return getattr(self.graph_module, CLASSIFIER_ATTR)

    def forward(self, *args, **kwargs):
        if self._disabled:
            return self._captured.call(self._base_graph_module(), *args, **kwargs)
        output, scalings = self._two_pass.call(self._graph_to_call(), *args, extra=self._extra_inputs(), **kwargs)
        self._record(scalings)
        return output

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Generate with KV caches for both passes; arguments and scalings: ``fx_adapters.generation``."""
        return generation.generate_xlora(self, input_ids, **kwargs)

    def _extra_inputs(self) -> tuple:
        """The graph inputs after the model's (``passes.xlora.INPUTS``), from the current config."""
        cfg = self.config
        return self._pass_weights(), cfg.top_k_lora, cfg.enable_softmax_topk, cfg.global_scaling_weight

    def _record(self, scalings: torch.Tensor) -> None:
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

    def _base_graph_module(self) -> torch.fx.GraphModule:
        """The captured graph alone (for disabled adapters), reading this module's current parameters and buffers."""
        if self._base is None:
            graph = copy.deepcopy(self._captured.graph_module.graph)
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.classifier.state_dict().items()}
        metadata = {"format": SAVE_FORMAT, "experts": json.dumps(list(self.experts)),
                    "layers": json.dumps([t.name for t in self.targets])}
        save_file(state, path, metadata=metadata)
        return path

    def load_classifier(self, path: str | Path) -> None:
        """Load classifier weights from ``save_classifier``'s file or a PEFT X-LoRA checkpoint: the directory PEFT's
        ``save_pretrained`` wrote, or its ``adapter_model.safetensors`` (keys ``…internal_xlora_classifier.*``).
        Reads safetensors only, never a pickle. Checked first: on an error nothing changes.

        PEFT 0.21's ``save_pretrained`` also saves each expert, as adapter "0", "1", …, into the subfolder of that
        name, and its filtering of keys by adapter name moves classifier layer ``layers.K`` (``K`` an expert's name)
        out of the top file into subfolder ``K``'s file, keyed ``…internal_xlora_classifier.layers.weight`` or
        ``….bias`` (the adapter name stripped): such layers are read from there.
        """
        path = Path(path)
        file = path / WEIGHTS_NAME if path.is_dir() else path
        if not file.is_file():
            pickled = (file.parent / PICKLED_WEIGHTS_NAME).is_file()
            raise FileNotFoundError(f"load_classifier: {file} does not exist; expected a file written by "
                                    "save_classifier or a PEFT X-LoRA directory with adapter_model.safetensors"
                                    + (f" (its {PICKLED_WEIGHTS_NAME} is a pickle, never loaded: save with PEFT's "
                                       "safe_serialization=True)" if pickled else ""))
        metadata, state = _read_safetensors(file)
        from_peft = metadata.get("format") != SAVE_FORMAT and (
            any(CLASSIFIER_KEY in key for key in state) or _is_peft_xlora_dir(file.parent))
        expected = self.classifier.state_dict()
        if from_peft:
            state = {key.split(CLASSIFIER_KEY, 1)[1]: value for key, value in state.items() if CLASSIFIER_KEY in key}
            state |= _layers_in_expert_folders(file.parent, [k for k in expected if k not in state])
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [f"{k} {tuple(state[k].shape)} ≠ {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            cfg = self.config
            raise ValueError(
                f"load_classifier({file}): it does not fit this classifier ({len(self.experts)} experts, "
                f"{len(self.targets)} layers, xlora_depth={cfg.xlora_depth}, layerwise_scalings="
                f"{cfg.layerwise_scalings}): missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {shapes[:4]}"
                + (f"; {PEFT_SAVE_HINT}" if missing and (from_peft or not state) else ""))
        self.classifier.load_state_dict(state)


def _read_safetensors(file: Path, wanted=None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata of safetensors ``file`` and its tensors (those whose key ``wanted(key)`` is true, if given)."""
    try:
        with safe_open(file, framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys() if wanted is None or wanted(k)}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"load_classifier({file}): not a readable safetensors file ({exc})") from None


def _is_peft_xlora_dir(directory: Path) -> bool:
    try:
        return json.loads((directory / CONFIG_NAME).read_text()).get("peft_type") == "XLORA"
    except (OSError, ValueError, AttributeError):
        return False


def _layers_in_expert_folders(directory: Path, missing: list[str]) -> dict[str, torch.Tensor]:
    """Those of the ``missing`` classifier tensors (keys like ``layers.0.weight``) that PEFT's ``save_pretrained``
    wrote into the subfolder of the expert named like the layer index, "0" here (see ``XLoraModule.load_classifier``);
    only the matching tensors of those files are read."""
    found = {}
    for key in missing:
        layer, _, leaf = key.rpartition(".")
        sequential, _, index = layer.rpartition(".")
        file = directory / index / WEIGHTS_NAME
        if not (index.isdigit() and file.is_file()):
            continue
        suffix = f"{CLASSIFIER_KEY}{sequential}.{leaf}"  # "layers.0.weight" with adapter name "0" removed
        _, tensors = _read_safetensors(file, lambda k, suffix=suffix: k.endswith(suffix))
        if len(tensors) == 1:
            found[key] = next(iter(tensors.values()))
    return found


def _classifier_head(model: nn.Module, layers: dict[str, Target]) -> Target:
    """The layer whose input the classifier reads: the output head (``get_output_embeddings()``), else the last
    linear-like layer the graph calls."""
    head = output_head(model) or next(reversed(layers), None)
    if head not in layers:
        raise ValueError(f"X-LoRA: cannot find the output head of {type(model).__name__} among its linear layers "
                         f"(got {head!r}); the classifier reads the head's input (the last hidden state)")
    return layers[head]


def compile_with_xlora(model: nn.Module, config: XLoraConfig, example_inputs: tuple | None = None,
                       example_kwargs: dict | None = None) -> XLoraModule:
    """Capture ``model`` and build its X-LoRA graph with ``config``'s experts; ``model`` is not modified."""
    if not isinstance(config, XLoraConfig):
        raise TypeError(f"compile_with_xlora: config must be a fx_adapters.XLoraConfig, got {type(config).__name__}")
    captured = capture(model, example_inputs=example_inputs, example_kwargs=example_kwargs)
    return XLoraModule.from_captured(model, captured, config)
