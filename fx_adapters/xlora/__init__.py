"""X-LoRA (arXiv 2402.07148), as PEFT's ``peft/tuners/xlora/``: the configs, the LoRA experts, the classifier and
stacked experts (``modules``), the two-pass graph (``passes``), classifier checkpoints, generation and the
``XLoraModule``."""

from .config import XLoraConfig
from .model import XLoraModule, compile_with_xlora

__all__ = ["XLoraConfig", "XLoraModule", "compile_with_xlora"]
