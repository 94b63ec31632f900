"""fx-adapters: parameter-efficient adapters compiled into torch.fx graphs.

>>> import torch, fx_adapters as fxa
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8)).eval()
>>> am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules="all-linear"))
>>> [t.name for t in am.targets]
['0']
"""

from .adapted import AdaptedModule, compile_with_road
from .config import RoadConfig, XLoraConfig
from .export import export
from .merge import unfold
from .passes.capture import CaptureError
from .passes.fold import NotInvertibleError, fold_weight, unfold_weight
from .passes.match import Target
from .xlora_model import XLoraModule, compile_with_xlora

__all__ = ["AdaptedModule", "CaptureError", "NotInvertibleError", "RoadConfig", "Target", "compile_with_road", "export",
           "fold_weight", "unfold", "unfold_weight", "XLoraConfig", "XLoraModule", "compile_with_xlora"]
