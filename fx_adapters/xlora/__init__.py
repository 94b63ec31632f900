"""X-LoRA (arXiv 2402.07148), as PEFT's ``peft/tuners/xlora/``: the configs, the LoRA experts, the classifier and
stacked experts (``modules``), the two-pass graph (``passes``), classifier checkpoints, generation, the
``XLoraModule`` and ``plot_scalings`` (a heatmap of the scalings; needs matplotlib)."""

from .config import XLoraConfig
from .model import XLoraModule, compile_with_xlora
from .plot import plot_scalings

__all__ = ["XLoraConfig", "XLoraModule", "compile_with_xlora", "plot_scalings"]
