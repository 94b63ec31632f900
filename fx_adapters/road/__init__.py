"""RoAd (arXiv 2409.00119), as PEFT's ``peft/tuners/road/``: the config, the rotation math, the per-layer tables,
target selection, the rewrite passes and pipeline, ``modules_to_save``, fold / merge, checkpoints, generation and
the ``AdaptedModule`` façade."""

from .config import BASE, RoadConfig
from .fold import NotInvertibleError, fold_weight, unfold_weight
from .merge import unfold
from .model import AdaptedModule, compile_with_road

__all__ = ["BASE", "AdaptedModule", "NotInvertibleError", "RoadConfig", "compile_with_road", "fold_weight", "unfold",
           "unfold_weight"]
