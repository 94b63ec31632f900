"""``compile_with_road`` and the module it returns.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import generation
from .checkpoint import ROAD_PARAMS, read_adapter_dir, split_peft_key, write_adapter_dir
from .config import RoadConfig
from .merge import MergeMixin
from .passes import run_passes
from .passes.capture import CapturedModel, capture
from .passes.match import FindLinearLayers, Target, output_head, select_targets
from .passes.modules_to_save import SaveLinearLayers, UnsaveLinearLayers, saved_modules
from .passes.rewrite import InsertRoadRotations, OrderRoadRotations, RemoveRoadRotations, layer_key, road_layers
from .runtime.compiled import CompileMixin
from .runtime.rotation import param_size

BASE = "__base__"


class AdaptedModule(CompileMixin, MergeMixin, nn.Module):
    """A captured model whose graph applies RoAd adapters; call it like the original model.

    Extra call argument: ``adapter_names`` (one adapter name or ``"__base__"`` per sample) for mixed batches.
    """

    def __init__(self, captured: CapturedModel, layers: Sequence[Target], *, model_type: str | None = None,
                 output_head: str | None = None, name_or_path: str | None = None):
        super().__init__()
        self.graph_module = captured.graph_module
        self._captured = captured
        self._layers = {t.name: t for t in layers}
        self._model_type = model_type
        self._output_head = output_head
        self._name_or_path = name_or_path
        self.peft_config: dict[str, RoadConfig] = {}
        self._adapter_targets: dict[str, tuple[str, ...]] = {}
        self._saved: dict[str, tuple[str, ...]] = {}  # adapter -> linear layers it keeps a copy of
        self._active: list[str] = []
        self._disabled = False
        self._generation = 0
        self._cache_key = None

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> dict[str, RoadConfig]:
        """Adapter name → its config, in slot order."""
        return dict(self.peft_config)

    @property
    def active_adapter(self) -> str | list[str] | None:
        """The active adapter's name (a list when several are active, None when there is none), as PEFT."""
        if len(self._active) > 1:
            return list(self._active)
        return self._active[0] if self._active else None

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

    def _road_layers(self) -> nn.ModuleDict:
        return road_layers(self.graph_module)

    def _select(self, adapter_name: str, config: RoadConfig) -> tuple[list[Target], list[Target]]:
        """(layers to rotate, linear layers to save a copy of) for a new adapter; raises on bad input."""
        if not isinstance(config, RoadConfig):
            raise TypeError(f"adapter {adapter_name!r}: expected a fx_adapters.RoadConfig, got {type(config).__name__}")
        saved = self._saved_layers(adapter_name, config.modules_to_save or [])
        targets = [t for t in select_targets(list(self._layers.values()), config.target_modules,
                                             config.exclude_modules, model_type=self._model_type,
                                             output_head=self._output_head).targets if t not in saved]
        bad = [t for t in targets if t.out_features % config.group_size]
        if bad:
            listed = ", ".join(f"{t.name!r} (out_features={t.out_features})" for t in bad[:3])
            raise ValueError(
                f"adapter {adapter_name!r}: group_size={config.group_size} does not divide the out_features of "
                f"{listed}{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}; choose a group_size that divides "
                "them or exclude those layers"
            )
        saved_elsewhere = {name for names in self._saved.values() for name in names}
        clash = [t.name for t in targets if t.name in saved_elsewhere]
        clash += [t.name for t in saved if any(t.name in names for names in self._adapter_targets.values())]
        if clash:
            raise ValueError(f"adapter {adapter_name!r}: layer {clash[0]!r} cannot be both rotated by one adapter and "
                             "saved (modules_to_save) by another; exclude it from one of them")
        return targets, saved

    def _saved_layers(self, adapter_name: str, modules_to_save: Sequence[str]) -> list[Target]:
        saved = []
        for wanted in modules_to_save:
            found = [t for t in self._layers.values() if t.name == wanted or t.name.endswith("." + wanted)]
            if not found:
                raise ValueError(f"adapter {adapter_name!r}: modules_to_save entry {wanted!r} matches no linear layer "
                                 "of the model (only linear layers, e.g. classification heads, can be saved)")
            unsupported = [t for t in found if t.kind != "linear"]
            if unsupported:
                raise NotImplementedError(f"adapter {adapter_name!r}: modules_to_save of {unsupported[0].kind} layer "
                                          f"{unsupported[0].name!r} is not supported; only nn.Linear layers")
            saved += [t for t in found if t not in saved]
        return saved

    def add_adapter(self, adapter_name: str, config: RoadConfig) -> None:
        """Add an adapter (not active, not trainable until ``set_adapter``), rewriting layers it newly targets."""
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE or "." in adapter_name:
            raise ValueError(f"invalid adapter name {adapter_name!r}: use a non-empty name without '.', not {BASE!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        targets, saved = self._select(adapter_name, config)
        save = SaveLinearLayers(saved)
        run_passes(self.graph_module, [InsertRoadRotations([(t, config.group_size) for t in targets]), save])
        for t in saved:
            self._layers[t.name] = replace(t, nodes=tuple(save.renamed.get(n, n) for n in t.nodes))
        layers = self._road_layers()
        device = next(self.graph_module.parameters()).device
        for t in targets:
            layers[layer_key(t.name)].add_adapter(adapter_name, config, torch.float32, device)
        for t in saved:
            weight = self.graph_module.get_parameter(f"{t.name}.weight")
            bias = self.graph_module.get_parameter(f"{t.name}.bias") if t.has_bias else None
            saved_modules(self.graph_module)[layer_key(t.name)].add_copy(adapter_name, weight, bias)
        self.peft_config[adapter_name] = config
        self._adapter_targets[adapter_name] = tuple(t.name for t in targets)
        self._saved[adapter_name] = tuple(t.name for t in saved)
        self._generation += 1
        if not self._active:
            self.set_adapter(adapter_name)
        else:
            self._set_trainable()

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
        orders = self._rotation_orders(names)
        savers = [n for n in names if self._saved.get(n)]
        if len(savers) > 1:
            raise ValueError(f"set_adapter({names}): adapters {savers} all have modules_to_save; as in PEFT, at most "
                             "one active adapter may have them")
        if orders:
            run_passes(self.graph_module, [OrderRoadRotations(orders)])
        self._active = names
        self._set_trainable()
        self._generation += 1

    def _rotation_orders(self, names: Sequence[str]) -> dict[str, list[int]]:
        """Layer -> its rotations' group sizes in the order several active adapters need, for the layers whose
        graph order differs (the graph holds one rotation per layer and group size, run in graph order)."""
        if len(names) < 2:
            return {}
        order = {}  # layer -> group sizes in graph order
        for node in self.graph_module.graph.nodes:
            tag = node.meta.get("fx_adapters")
            if node.op == "call_function" and tag and tag[0] == "road" and tag[2] not in order.setdefault(tag[1], []):
                order[tag[1]].append(tag[2])
        orders = {}
        for layer, sizes in order.items():
            wanted = [self.peft_config[n].group_size for n in names if layer in self._adapter_targets[n]]
            blocks = [g for i, g in enumerate(wanted) if i == 0 or wanted[i - 1] != g]
            if len(blocks) != len(set(blocks)):
                raise NotImplementedError(
                    f"set_adapter({list(names)}): on layer {layer!r} these adapters use group sizes {wanted}: "
                    "adapters of one group size separated by another's are not supported (the graph applies all "
                    "adapters of one group size on a layer together); activate them so that adapters of equal "
                    "group size are adjacent"
                )
            if blocks != [g for g in sizes if g in blocks]:
                orders[layer] = blocks + [g for g in sizes if g not in blocks]
        return orders

    def _set_trainable(self) -> None:
        for layer in self._road_layers().values():
            for name in layer.road_theta:
                layer.road_theta[name].requires_grad_(name in self._active)
                layer.road_alpha[name].requires_grad_(name in self._active)
        for module in saved_modules(self.graph_module).values():
            for name, p in (*module.weight.items(), *module.bias.items()):
                p.requires_grad_(name in self._active)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; rotations and ``modules_to_save`` nodes that no remaining adapter needs leave the
        graph (a layer no adapter saves any more is called as in the captured graph again)."""
        self._check_known(adapter_name, "delete_adapter")
        layers = self._road_layers()
        for name in self._adapter_targets.pop(adapter_name):
            layers[layer_key(name)].remove_adapter(adapter_name)
        for name in self._saved[adapter_name]:
            saved_modules(self.graph_module)[layer_key(name)].remove_copy(adapter_name)
        del self.peft_config[adapter_name]
        still_saved = {name for a, names in self._saved.items() if a != adapter_name for name in names}
        unsave = UnsaveLinearLayers([self._layers[n] for n in self._saved.pop(adapter_name) if n not in still_saved])
        keep = {(name, cfg.group_size) for a, cfg in self.peft_config.items() for name in self._adapter_targets[a]}
        run_passes(self.graph_module, [RemoveRoadRotations(keep), unsave])
        for t in unsave.targets:
            self._layers[t.name] = replace(t, nodes=tuple(unsave.renamed.get(n, n) for n in t.nodes))
        self._generation += 1
        if adapter_name in self._active:
            self._active.remove(adapter_name)
            if not self._active and self.peft_config:
                self._active = [next(iter(self.peft_config))]
            self._set_trainable()

    def _single_active(self, where: str) -> str:
        if len(self._active) != 1:
            raise ValueError(f"{where}: {len(self._active)} adapters are active ({self._active}); name one")
        return self._active[0]

    def _check_known(self, adapter_name: str, where: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"{where}: unknown adapter {adapter_name!r}; known adapters: {list(self.peft_config)}")

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Within the block the module computes the base model."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    # ------------------------------------------------------------------ forward
    def _slots(self) -> dict[str, int]:
        return {name: i + 1 for i, name in enumerate(self.peft_config)}

    def _road_index(self, adapter_names, batch_size: int | None) -> torch.Tensor | None:
        if adapter_names is None:
            if self._disabled or not self._active:
                return None
            slots = self._slots()
            return torch.tensor(slots[self._active[0]] if len(self._active) == 1 else len(slots) + 1)
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list with one adapter name per sample, got {adapter_names!r}")
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call .eval() first")
        if batch_size is not None and len(adapter_names) != batch_size:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} samples")
        slots = self._slots()
        unknown = sorted({n for n in adapter_names if n != BASE and n not in slots})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; known: {list(slots)} and {BASE!r}")
        if self._disabled:
            return None
        return torch.tensor([0 if n == BASE else slots[n] for n in adapter_names])

    def _refresh_tables(self) -> None:
        """Recompute the column tables when the adapter parameters changed (every call while they train)."""
        layers = list(self._road_layers().values())
        params = [p for layer in layers for p in layer.parameters()]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            key = None
        else:
            key = (self._generation, tuple((p._version, p.data_ptr()) for p in params))
            if key == self._cache_key:
                return
        slots = self._slots()
        with contextlib.ExitStack() as stack:
            if key is not None:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.no_grad())
            for layer in layers:
                layer.rebuild_tables(slots, self._active if len(self._active) > 1 else ())
        for module in saved_modules(self.graph_module).values():
            module.set_slots(slots, self._active if len(self._active) > 1 else ())
        self._cache_key = key

    def _road_input(self, adapter_names, batch_size: int | None) -> torch.Tensor | None:
        """The ``road_index`` graph input of a call (refreshing the tables it selects from)."""
        merged = self._merged_forward(adapter_names)
        index = None if merged else self._road_index(adapter_names, batch_size)
        if index is not None:
            self._refresh_tables()
        return index

    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        index = self._road_input(adapter_names, None if first is None else first.shape[0])
        return self._captured.call(self._graph_to_call(), *args, extra=(index,), **kwargs)

    def generate(self, input_ids: torch.Tensor, adapter_names: Sequence[str] | None = None, **kwargs) -> torch.Tensor:
        """Generate with a KV cache (``adapter_names``: one adapter or ``"__base__"`` per row); see
        ``fx_adapters.generation``."""
        return generation.generate_road(self, input_ids, adapter_names, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def load_adapter(self, path_or_state_dict: str | Path | Mapping[str, torch.Tensor], adapter_name: str = "default",
                     config: RoadConfig | None = None) -> None:
        """Load a PEFT RoAd adapter (a directory or its state dict) into ``adapter_name``.

        A new name is created from the directory's ``adapter_config.json`` (or ``config``); an existing one
        gets the checkpoint's values. Everything is checked before anything changes.
        """
        if isinstance(path_or_state_dict, Mapping):
            state, source = dict(path_or_state_dict), "state dict"
        else:
            config_on_disk, state = read_adapter_dir(path_or_state_dict)
            config, source = config or config_on_disk, str(path_or_state_dict)
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
        expected = {(t.name, p): (param_size(config.variant, t.out_features),) for t in targets for p in ROAD_PARAMS}
        expected.update({(t.name, "weight"): (t.out_features, t.in_features) for t in saved})
        expected.update({(t.name, "bias"): (t.out_features,) for t in saved if t.has_bias})
        values = _check_checkpoint(state, expected, config, source)
        if adapter_name not in self.peft_config:
            self.add_adapter(adapter_name, config)
        destination = self._adapter_tensors(adapter_name)
        with torch.no_grad():
            for site, tensor in values.items():
                destination[site].copy_(tensor)
        self._generation += 1

    def _adapter_tensors(self, adapter_name: str) -> dict[tuple[str, str], nn.Parameter]:
        """(module path, PEFT parameter name) -> parameter, for everything an adapter saves."""
        layers, copies = self._road_layers(), saved_modules(self.graph_module)
        tensors = {(name, p): getattr(layers[layer_key(name)], p)[adapter_name]
                   for name in self._adapter_targets[adapter_name] for p in ROAD_PARAMS}
        for name in self._saved[adapter_name]:
            module = copies[layer_key(name)]
            tensors[(name, "weight")] = module.weight[adapter_name]
            if adapter_name in module.bias:
                tensors[(name, "bias")] = module.bias[adapter_name]
        return tensors

    def save_adapter(self, directory: str | Path, adapter_name: str | None = None) -> Path:
        """Write ``adapter_name`` (default: the active one) as a PEFT adapter directory.

        Its ``target_modules`` / ``modules_to_save`` list the exact module paths, so PEFT adapts exactly the
        same layers whatever rule selected them here.
        """
        adapter_name = adapter_name or self._single_active("save_adapter")
        self._check_known(adapter_name, "save_adapter")
        config = self.peft_config[adapter_name]
        exact = RoadConfig(variant=config.variant, group_size=config.group_size, init_weights=config.init_weights,
                           target_modules=sorted(self._adapter_targets[adapter_name]),
                           modules_to_save=sorted(self._saved[adapter_name]) or None)
        return write_adapter_dir(directory, exact, self._adapter_tensors(adapter_name), self._name_or_path)


def _check_checkpoint(state: Mapping[str, torch.Tensor], expected: Mapping[tuple[str, str], tuple[int, ...]],
                      config: RoadConfig, source: str) -> dict[tuple[str, str], torch.Tensor]:
    """The checkpoint's tensors by (module path, parameter) when they are exactly ``expected``; else raise."""
    values, unexpected = {}, []
    for key, tensor in state.items():
        site = split_peft_key(key)
        if site not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != expected[site]:
            raise ValueError(
                f"load_adapter({source}): {key} has shape {tuple(tensor.shape)}, but layer {site[0]!r} needs "
                f"{expected[site]} for variant={config.variant!r}; the checkpoint does not fit this model/config"
            )
        values[site] = tensor
    missing = [f"{path}.{param}" for path, param in expected if (path, param) not in values]
    if unexpected or missing:
        raise ValueError(
            f"load_adapter({source}): the checkpoint does not fit this model: "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}, {len(missing)} missing {missing[:3]}"
        )
    return values


def compile_with_road(model: nn.Module, config: RoadConfig, example_inputs: tuple | None = None,
                      example_kwargs: dict | None = None, adapter_name: str = "default") -> AdaptedModule:
    """Capture ``model`` as a graph and add the RoAd adapter ``adapter_name``; ``model`` is not modified."""
    if not isinstance(config, RoadConfig):
        raise TypeError(f"compile_with_road: config must be a fx_adapters.RoadConfig, got {type(config).__name__}")
    captured = capture(model, example_inputs=example_inputs, example_kwargs=example_kwargs)
    finder = FindLinearLayers({name: type(m) for name, m in model.named_modules()})
    finder(captured.graph_module)
    model_config = getattr(model, "config", None)
    am = AdaptedModule(captured, finder.layers, model_type=getattr(model_config, "model_type", None),
                       output_head=output_head(model), name_or_path=getattr(model_config, "_name_or_path", None))
    am.add_adapter(adapter_name, config)
    generation.attach(am, model)
    return am.train(model.training)
