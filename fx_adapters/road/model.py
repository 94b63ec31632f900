"""``compile_with_road`` and the module it returns: a façade over the parts in this folder (targets, pipeline,
slots, merge, checkpoint, generation).

>>> import torch, fx_adapters as fxa
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules=["0"], init_weights=False))
>>> am.add_adapter("b", fxa.RoadConfig(group_size=2, target_modules=["0", "2"], init_weights=False))
>>> x = torch.randn(3, 4)
>>> out = am(x, adapter_names=["default", "b", "__base__"])
>>> torch.allclose(out[2], model(x[2:]), atol=1e-6)
True
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..graph import generation
from ..graph.capture import CapturedModel
from ..graph.captures import Captures
from ..graph.forward_from_step import capture_model
from ..graph.graph_module import outside_inference_mode
from ..graph.match import FindLinearLayers, Target, output_head
from ..graph.passes import run_passes
from ..graph.signature import SignedForward
from ..graph.torch_compile import CompileMixin
from . import checkpoint
from .captures import road_rewrite
from .config import BASE, RoadConfig
from .draw import draw_adapted
from .fold import Fold
from .generation import forward_road_with_cache, generate_road
from .merge import MergeState, folded_adapters, saved_copies
from .pipeline import adapter_tensors, add_parameters, apply_road, drop_adapter, layer_folds, set_trainable
from .rewrite import OrderRoadRotations, rotation_orders
from .serving import ContextFlag, ServingLock, exclusive, shared, switch
from .serving_export import mixed_batch_graph
from .slots import AdapterSlots
from .targets import select_layers


class AdaptedModule(CompileMixin, nn.Module):
    """A captured model whose graph applies RoAd adapters; call it like the original model, with its inputs (each
    call signature is captured on first use: ``graph.captures``) plus ``adapter_names`` (one adapter name or
    ``"__base__"`` per sample) or ``adapter_name`` (one for the batch). Calls are thread-safe, also while other
    threads change adapters (``serving.py``). While adapters are merged, forward runs the merged weights; passing
    ``adapter_names`` or running under ``disable_adapters()`` raises until ``unmerge()``."""

    accepts_loss_kwargs = False  # transformers' Trainer: the loss is the model's own, unscaled

    def __init__(self, captured: CapturedModel, layers: Sequence[Target], *, model_type: str | None = None,
                 output_head: str | None = None, name_or_path: str | None = None):
        super().__init__()
        self.graph_module = captured.graph_module
        self._captured = captured
        self._layers = {t.name: t for t in layers}
        self._model_type, self._output_head, self._name_or_path = model_type, output_head, name_or_path
        self.peft_config: dict[str, RoadConfig] = {}
        self._adapter_targets: dict[str, tuple[str, ...]] = {}
        self._saved: dict[str, tuple[str, ...]] = {}  # adapter -> linear layers it keeps a copy of
        self._active: list[str] = []
        self.disabled = ContextFlag()  # per thread / task: disable_adapters()
        self.serving = ServingLock()  # calls share it; what changes adapters or the graph holds it alone
        self.slots = AdapterSlots()
        self.register_load_state_dict_post_hook(self.slots.loaded)  # every adapter's rows anew after a state load
        self.merge_state = MergeState()
        self.captures = Captures(captured, None, torch.float32, torch.device("cpu"))  # compile_with_road: Captures.of

    @property
    def adapters(self) -> dict[str, RoadConfig]:
        """Adapter name → its config, in slot order."""
        return dict(self.peft_config)

    @property
    def active_adapter(self) -> str | list[str] | None:
        """The active adapter's name (a list when several are active, None when there is none), as PEFT."""
        return list(self._active) if len(self._active) > 1 else self._active[0] if self._active else None

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters, in the order they are applied on each layer."""
        return list(self._active)

    @property
    def targets(self) -> tuple[Target, ...]:
        """The layers that carry at least one adapter, in graph order."""
        used = {name for names in self._adapter_targets.values() for name in names}
        return tuple(t for name, t in self._layers.items() if name in used)

    @property
    def linear_layers(self) -> tuple[Target, ...]:
        """Every linear-like layer the match pass found, adapted or not, in graph order."""
        return tuple(self._layers.values())

    def match(self, config: RoadConfig) -> tuple[Target, ...]:
        """The layers ``config`` would adapt on this model (raises as ``add_adapter`` would); changes nothing."""
        return tuple(self._select("(match)", config)[0])

    def adapter_targets(self, adapter_name: str) -> tuple[Target, ...]:
        """The layers one adapter rotates."""
        self._check_known(adapter_name, "adapter_targets")
        return tuple(self._layers[name] for name in self._adapter_targets[adapter_name])

    def adapter_parameters(self, adapter_name: str) -> dict[tuple[str, str], nn.Parameter]:
        """``(module path, PEFT parameter name) -> parameter`` for everything ``adapter_name`` saves: its
        ``road_theta`` / ``road_alpha`` per rotated layer, and the ``weight`` / ``bias`` of its ``modules_to_save``
        copies. The parameters themselves (train them, or write them under ``torch.no_grad()``)."""
        self._check_known(adapter_name, "adapter_parameters")
        self.slots.watch(self.graph_module, adapter_name)  # it may be written: compare its versions at each call
        return adapter_tensors(self.graph_module, adapter_name, self._adapter_targets[adapter_name],
                               self._saved[adapter_name])

    def _select(self, adapter_name: str, config: RoadConfig) -> tuple[list[Target], list[Target]]:
        return select_layers(adapter_name, config, list(self._layers.values()), rotated_by=self._adapter_targets,
                             saved_by=self._saved, model_type=self._model_type, output_head=self._output_head)

    @exclusive
    def add_adapter(self, adapter_name: str, config: RoadConfig) -> None:
        """Add an adapter (not active, not trainable until ``set_adapter``), rewriting layers it newly targets."""
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE or "." in adapter_name:
            raise ValueError(f"invalid adapter name {adapter_name!r}: use a non-empty name without '.', not {BASE!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        targets, saved = self._select(adapter_name, config)
        renamed = apply_road(self.graph_module, [(t, config.group_size) for t in targets], saved)
        for t in saved:
            self._layers[t.name] = replace(t, nodes=tuple(renamed.get(n, n) for n in t.nodes))
        add_parameters(self.graph_module, adapter_name, config, targets, saved)
        self.peft_config[adapter_name] = config
        self._adapter_targets[adapter_name] = tuple(t.name for t in targets)
        self._saved[adapter_name] = tuple(t.name for t in saved)
        self.slots.assign(self.graph_module, adapter_name, *(self._adapter_targets[adapter_name],
                                                             self._saved[adapter_name]))
        if not self._active:
            self.set_adapter(adapter_name)
        else:
            set_trainable(self.graph_module, self._active, adapter_name)

    @switch
    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter, or several applied in the given order on each layer (R_last ··· R_first).

        The active adapters' parameters (only) become trainable, as in PEFT. Adapters of different group sizes on
        one layer: its rotation nodes are reordered to follow the list (adapters of equal group size must be
        adjacent in it; else ``NotImplementedError``).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"set_adapter: expected an adapter name or a list of distinct names, got {adapter_name!r}")
        for name in names:
            self._check_known(name, "set_adapter")
        group_sizes = {name: config.group_size for name, config in self.peft_config.items()}
        orders = rotation_orders(self.graph_module.graph, names, group_sizes, self._adapter_targets)
        savers = [n for n in names if self._saved.get(n)]
        if len(savers) > 1:
            raise ValueError(f"set_adapter({names}): adapters {savers} all have modules_to_save; as in PEFT, at most "
                             "one active adapter may have them")
        if orders:
            run_passes(self.graph_module, [OrderRoadRotations(orders)])
        self._active = names
        set_trainable(self.graph_module, self._active)
        self.slots.compose(self.graph_module, names)

    @exclusive
    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; rotations and ``modules_to_save`` nodes that no remaining adapter needs leave the
        graph (a layer no adapter saves any more is called as in the captured graph again)."""
        self._check_known(adapter_name, "delete_adapter")
        self.slots.release(self.graph_module, adapter_name)
        renamed, unsaved = drop_adapter(self.graph_module, adapter_name, self._adapter_targets.pop(adapter_name),
                                        [self._layers[n] for n in self._saved.pop(adapter_name)])
        del self.peft_config[adapter_name]
        for t in unsaved:
            self._layers[t.name] = replace(t, nodes=tuple(renamed.get(n, n) for n in t.nodes))
        if adapter_name in self._active:
            self._active.remove(adapter_name)
            if not self._active and self.peft_config:
                self._active = [next(iter(self.peft_config))]
            set_trainable(self.graph_module, self._active)
            self.slots.compose(self.graph_module, self._active)

    def _adapter_list(self, adapter_name: str | Sequence[str] | None, where: str) -> list[str]:
        names = list(self._active) if adapter_name is None else (
            [adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        if not names:
            raise ValueError(f"{where}: no adapter is active; name one")
        for name in names:
            self._check_known(name, where)
        return names

    def _check_known(self, adapter_name: str, where: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"{where}: unknown adapter {adapter_name!r}; known adapters: {list(self.peft_config)}")

    def disable_adapters(self) -> contextlib.AbstractContextManager[None]:
        """Within the block the module computes the base model: in this thread or asyncio task only."""
        return self.disabled.set(True)

    def road_input(self, adapter_names: Sequence[str] | None, batch_size: int | None,
                   adapter_name: str | None = None) -> torch.Tensor | None:
        """The ``road_index`` graph input of a call (``AdapterSlots.road_input``); raises on bad names or states."""
        return self.slots.road_input(self.graph_module, self._active, adapter_names, adapter_name, batch_size,
                                     self.training, self.disabled.get(), self.merge_state)

    @shared
    def forward(self, *args, adapter_names: Sequence[str] | None = None, adapter_name: str | None = None, **kwargs):
        if kwargs.get("use_cache"):  # the cached step graph of generate
            return forward_road_with_cache(self, args, kwargs, adapter_names, adapter_name)
        signature, values = self.captures.signature(self, args, kwargs)
        batch = next((v.shape[0] for v in values.values() if torch.is_tensor(v)), None)
        index = self.road_input(adapter_names, batch, adapter_name)
        graph = self._graph_to_call() if signature == self.captures.primary else self.captures.graph(
            signature, values, *road_rewrite(self.graph_module), self.graph_module)
        return self.captures.call(signature, graph, values, extra=(index,))

    generate = shared(generate_road)  # transformers' generate with a KV cache (road/generation.py)

    draw = draw_adapted  # am.draw(path, layer=None): the layer before and after the rewrite (road/draw.py)

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the weights, in merge order."""
        return self.merge_state.names

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the weights."""
        return bool(self.merge_state.merges)

    def folds(self, adapter_name: str) -> tuple[Fold, ...]:
        """The rotation of ``adapter_name`` on each of its layers (current parameters, no autograd)."""
        return layer_folds(self.graph_module, adapter_name, self.adapter_targets(adapter_name),
                           self.peft_config[adapter_name].group_size)

    def _saved_copies(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return saved_copies(self.adapter_parameters(name) for name in names)

    @switch
    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: the active one) into the weights, in the given order.

        Adapters already merged are skipped with a warning, as in PEFT. The merged weights are new tensors
        (the captured ones share storage with the caller's model and are never written). With
        ``safe_merge=True`` a non-finite result raises ``ValueError`` and nothing changes.
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"merge: adapter_names should be a list of strings, got {adapter_names!r}")
        names = self._adapter_list(list(adapter_names) if adapter_names is not None else None, "merge")
        self.merge_state.merge(self.graph_module, names, self.folds, self._saved_copies, safe_merge)

    @switch
    def unmerge(self, exact: bool = True) -> None:
        """Undo every merge. ``exact=True`` puts back the weights from before the first merge, bit for bit (the
        quantized layers themselves for bitsandbytes); ``exact=False`` applies the inverse of the rotations merged,
        last first (their ``(2, out)`` columns kept from merge time), as PEFT: it rounds (requantizes bitsandbytes
        layers), and raises ``NotInvertibleError`` naming the layer (weights unchanged) for a singular rotation.
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.merge_state.unmerge(self.graph_module, exact)

    @shared
    def fold(self, adapter_name: str | Sequence[str] | None = None) -> torch.fx.GraphModule:
        """A standalone ``torch.fx.GraphModule`` computing the model with adapters folded in.

        ``adapter_name`` is a name or a list composed in order (default: the active adapters). The module
        holds the base graph (no RoAd nodes, no fx_adapters code), new tensors for the folded weights and
        biases, and shares every other tensor with this module. Call it like the model, by keyword or positionally,
        with this module's graph inputs (``(input_ids, attention_mask=None)`` for a transformers model; the mask
        defaults as in the model); other inputs raise ``TypeError`` naming them. It returns the model's output type
        (``CausalLMOutputWithPast``; a tensor for a module returning one; a pickled copy, which torch.fx re-traces,
        returns a plain ``dict`` of the same tensors). See ``graph.passes`` ``DefaultAttentionMask``.
        """
        names = self._adapter_list(adapter_name, "fold")
        if self.merged:
            raise ValueError(f"fold: adapters {self.merged_adapters} are merged into this module's weights; call "
                             "unmerge() first (fold starts from the base weights)")
        folds = [f for name in names for f in self.folds(name)]
        return self.merge_state.fold(self.graph_module, names, folds, self._saved_copies(names),
                                     self._captured.out_spec)

    def unfold(self, folded: torch.fx.GraphModule, adapter_name: str | Sequence[str] | None = None,
               exact: bool = True) -> torch.fx.GraphModule:
        """The base model back from ``folded = self.fold(adapter_name)``; see ``fx_adapters.unfold``."""
        recorded = folded_adapters(folded)
        names = self._adapter_list(adapter_name if adapter_name is not None else recorded, "unfold")
        inverse = [fold.inverse(exact) for name in reversed(names) for fold in reversed(self.folds(name))]
        return self.merge_state.unfold(folded, names, inverse)

    @exclusive
    def load_adapter(self, path_or_state_dict: str | Path | Mapping[str, torch.Tensor], adapter_name: str = "default",
                     config: RoadConfig | None = None) -> None:
        """Load a PEFT RoAd adapter (a directory or its state dict) into ``adapter_name``.

        A new name is created from the directory's ``adapter_config.json`` (or ``config``); an existing one
        gets the checkpoint's values. Everything is checked before anything changes.
        """
        config, state, source = checkpoint.read_checkpoint(path_or_state_dict, config)
        if adapter_name in self.peft_config:
            config = self.peft_config[adapter_name] if config is None else config
            if config != self.peft_config[adapter_name]:
                raise ValueError(f"load_adapter({source}): its config does not match existing adapter "
                                 f"{adapter_name!r}; load it under a new name or delete {adapter_name!r} first")
            targets, saved = self.adapter_targets(adapter_name), [self._layers[n] for n in self._saved[adapter_name]]
        elif config is None:
            raise ValueError(f"load_adapter({source}): adapter {adapter_name!r} does not exist; pass config= "
                             "(a RoadConfig) to create it from a state dict")
        else:
            targets, saved = self._select(adapter_name, config)
        values = checkpoint.check_checkpoint(state, checkpoint.expected_shapes(config, targets, saved), config, source)
        if adapter_name not in self.peft_config:
            self.add_adapter(adapter_name, config)
        destination = adapter_tensors(self.graph_module, adapter_name, self._adapter_targets[adapter_name],
                                      self._saved[adapter_name])
        with torch.no_grad():
            for site, tensor in values.items():
                destination[site].copy_(tensor)
        self.slots.write(self.graph_module, adapter_name)

    @shared
    def save_adapter(self, directory: str | Path, adapter_name: str | None = None) -> Path:
        """Write ``adapter_name`` (default: the active one) as a PEFT adapter directory (exact module paths)."""
        if adapter_name is None:
            if len(self._active) != 1:
                raise ValueError(f"save_adapter: {len(self._active)} adapters are active ({self._active}); name one")
            adapter_name = self._active[0]
        self._check_known(adapter_name, "save_adapter")
        return checkpoint.write_road_adapter(directory, self.peft_config[adapter_name],
                                             self._adapter_targets[adapter_name], self._saved[adapter_name],
                                             self.adapter_parameters(adapter_name), self._name_or_path)

    @shared
    def mixed_batch_graph(self) -> tuple[torch.fx.GraphModule, dict[str, int]]:
        """What ``fxa.export(am, path, mixed_batch=True)`` writes, and its ids (``serving_export.py``)."""
        return mixed_batch_graph(self.graph_module, self._captured.out_spec, list(self.peft_config),
                                 self.slots.ids, self.merged_adapters, self._saved)


@outside_inference_mode
def compile_with_road(model: nn.Module, config: RoadConfig, example_inputs: tuple | None = None,
                      example_kwargs: dict | None = None, adapter_name: str = "default") -> AdaptedModule:
    """Capture ``model`` as a graph and add the RoAd adapter ``adapter_name``; ``model`` is not modified."""
    if not isinstance(config, RoadConfig):
        raise TypeError(f"compile_with_road: config must be a fx_adapters.RoadConfig, got {type(config).__name__}")
    captured, step_graph = capture_model(model, example_inputs, example_kwargs)
    finder = FindLinearLayers({name: type(m) for name, m in model.named_modules()})
    finder(captured.graph_module)
    model_config = getattr(model, "config", None)
    am = AdaptedModule(captured, finder.layers, model_type=getattr(model_config, "model_type", None),
                       output_head=output_head(model), name_or_path=getattr(model_config, "_name_or_path", None))
    am.add_adapter(adapter_name, config)
    generation.attach(am, model, step_graph)
    am.captures, am.forward = Captures.of(captured, model), SignedForward(am, model, ("adapter_names",))
    return am.train(model.training)
