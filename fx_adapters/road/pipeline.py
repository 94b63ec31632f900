"""The RoAd rewrite of a captured graph, built in this one function: ``compile_with_road`` / ``add_adapter`` run it
on the module's graph, ``generate`` on the prefill and decode graphs of the same model. Also its undoing
(``remove_road``), and what lives in the rewritten graph module: each adapter's parameters, which are trainable.

>>> import torch
>>> from torch import nn
>>> from fx_adapters.graph.match import find_linear_layers
>>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
>>> rotated, saved = find_linear_layers(gm, {"0": nn.Linear, "1": nn.Linear})
>>> apply_road(gm, [(rotated, 4)], [saved])
{'_1': 'saved_modules_1'}
>>> [n.op for n in gm.graph.nodes]  # doctest: +NORMALIZE_WHITESPACE
['placeholder', 'placeholder', 'call_module', 'get_attr', 'get_attr', 'call_function', 'get_attr', 'get_attr',
 'call_module', 'output']
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import nn

from ..graph.graph_module import outside_inference_mode
from ..graph.match import Target, layer_key
from ..graph.passes import run_passes
from ..graph.tags import tagged
from .fold import Fold
from .modules_to_save import SavedTag, SaveLinearLayers, UnsaveLinearLayers, saved_modules
from .rewrite import InsertRoadRotations, RemoveRoadRotations, road_layers, rotations

ROAD_PARAMS = ("road_theta", "road_alpha")  # an adapter's parameters on each layer it rotates, PEFT's names


@outside_inference_mode
def apply_road(gm: torch.fx.GraphModule, sites: Sequence[tuple[Target, int]], saved: Sequence[Target]
               ) -> dict[str, str]:
    """Rotate each ``(layer, group size)`` of ``sites`` and route each ``saved`` layer through its
    ``modules_to_save`` copies (both idempotent: when the graph has them all, it is not touched, so adding an
    adapter to layers other adapters rotate costs no recompile); returns the saved layers' renamed nodes."""
    present = {(tag.layer, tag.group_size) for _, tag in rotations(gm.graph)}
    saved_present = {tag.layer for _, tag in tagged(gm.graph, SavedTag)}
    sites = [(t, g) for t, g in sites if (t.name, g) not in present]
    saved = [t for t in saved if t.name not in saved_present]
    if not sites and not saved:
        return {}
    save = SaveLinearLayers(saved)
    run_passes(gm, [InsertRoadRotations(sites), save])
    return save.renamed


@outside_inference_mode
def add_parameters(gm: torch.fx.GraphModule, adapter: str, config, rotated: Sequence[Target],
                   saved: Sequence[Target]) -> None:
    """Create ``adapter``'s parameters on the layers ``apply_road`` rewrote: PEFT-initialised ``road_theta`` /
    ``road_alpha`` (fp32, as PEFT) on each ``rotated`` layer, a copy of each ``saved`` layer's weight and bias."""
    layers = road_layers(gm)
    device = next(gm.parameters()).device
    for t in rotated:
        layers[layer_key(t.name)].add_adapter(adapter, config, torch.float32, device)
    for t in saved:
        bias = gm.get_parameter(f"{t.name}.bias") if t.has_bias else None
        saved_modules(gm)[layer_key(t.name)].add_copy(adapter, gm.get_parameter(f"{t.name}.weight"), bias)


@outside_inference_mode
def remove_road(gm: torch.fx.GraphModule, keep: Collection[tuple[str, int]], unsaved: Sequence[Target]
                ) -> dict[str, str]:
    """Remove the rotations of every ``(layer, group size)`` not in ``keep`` and route the ``unsaved`` layers around
    their ``modules_to_save`` copies again; returns their renamed nodes (old -> new name)."""
    unsave = UnsaveLinearLayers(unsaved)
    run_passes(gm, [RemoveRoadRotations(keep), unsave])
    return unsave.renamed


def drop_adapter(gm: torch.fx.GraphModule, adapter: str, rotated: Sequence[str], saved: Sequence[Target]
                 ) -> tuple[dict[str, str], list[Target]]:
    """Delete ``adapter``'s parameters from its ``rotated`` layers and its copies of the ``saved`` ones, and the
    rotations and ``modules_to_save`` nodes no other adapter needs (O(its layers), whatever the number of adapters).
    Returns the renamed nodes of the layers no adapter saves any more, and those layers."""
    layers, copies = road_layers(gm), saved_modules(gm)
    drop = set()
    for name in rotated:
        layer = layers[layer_key(name)]
        group_size = layer.group_size[adapter]
        layer.remove_adapter(adapter)
        if group_size not in layer.group_size.values():
            drop.add((name, group_size))
    unsaved = []
    for t in saved:
        copies[layer_key(t.name)].remove_copy(adapter)
        if not len(copies[layer_key(t.name)].weight):
            unsaved.append(t)
    if not drop and not unsaved:
        return {}, []
    keep = {(tag.layer, tag.group_size) for _, tag in rotations(gm.graph)} - drop
    return remove_road(gm, keep, unsaved), unsaved


def adapter_tensors(gm: torch.fx.GraphModule, adapter: str, rotated: Sequence[str], saved: Sequence[str]
                    ) -> dict[tuple[str, str], nn.Parameter]:
    """``(module path, PEFT parameter name) -> parameter`` of ``adapter``: ``road_theta`` / ``road_alpha`` on each
    ``rotated`` layer, ``weight`` / ``bias`` of its copy of each ``saved`` layer."""
    layers, copies = road_layers(gm), saved_modules(gm)
    tensors = {(name, p): getattr(layers[layer_key(name)], p)[adapter] for name in rotated for p in ROAD_PARAMS}
    for name in saved:
        module = copies[layer_key(name)]
        tensors[(name, "weight")] = module.weight[adapter]
        if adapter in module.bias:
            tensors[(name, "bias")] = module.bias[adapter]
    return tensors


def layer_folds(gm: torch.fx.GraphModule, adapter: str, rotated: Sequence[Target], group_size: int
                ) -> tuple[Fold, ...]:
    """The rotation of ``adapter`` on each ``rotated`` layer as a ``Fold`` (current parameters, no autograd)."""
    layers = road_layers(gm)
    with torch.no_grad():
        return tuple(Fold(t, layers[layer_key(t.name)].columns(adapter), group_size, adapter) for t in rotated)


def set_trainable(gm: torch.fx.GraphModule, active: Collection[str], only: str | None = None) -> None:
    """Only the ``active`` adapters' parameters require grad, as in PEFT (with ``only``: set just that adapter's)."""
    for layer in road_layers(gm).values():
        for name in layer.road_theta if only is None else [only] if only in layer.road_theta else []:
            layer.road_theta[name].requires_grad_(name in active)
            layer.road_alpha[name].requires_grad_(name in active)
    for module in saved_modules(gm).values():
        for name, p in (*module.weight.items(), *module.bias.items()):
            if only is None or name == only:
                p.requires_grad_(name in active)
