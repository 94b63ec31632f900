"""fx-adapters: parameter-efficient adapters compiled into torch.fx graphs.

The method-agnostic compiler is in ``fx_adapters.graph``; each method has a folder of its own
(``fx_adapters.road``, ``fx_adapters.xlora``), as PEFT's ``tuners/<method>/``.

>>> import torch, fx_adapters as fxa
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8)).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules="all-linear"))
>>> [t.name for t in am.targets]
['0']
"""

from .export import adapter_mapping, export
from .graph.capture import CaptureError
from .graph.match import Target
from .road import AdaptedModule, NotInvertibleError, RoadConfig, compile_with_road, fold_weight, unfold, unfold_weight
from .xlora import XLoraConfig, XLoraModule, compile_with_xlora

__all__ = ["AdaptedModule", "CaptureError", "NotInvertibleError", "RoadConfig", "Target", "adapter_mapping",
           "compile_with_road", "export", "fold_weight", "unfold", "unfold_weight", "XLoraConfig", "XLoraModule",
           "compile_with_xlora"]
