"""What the commands share for loading: local models and adapter directories, and the library's input errors as
``CLIError``. Heavy libraries (transformers, PEFT, bitsandbytes) are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import torch

from ..graph.capture import CaptureError
from ._ui import CLIError, first_line

DTYPES = ("auto", "float32", "bfloat16", "float16")


def existing_dir(path: str, what: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise CLIError(f"{path}: no such directory (expected a local {what} directory)")
    return directory


def load_model(path: str, dtype: str = "auto", quantization: str | None = None) -> torch.nn.Module:
    """A local transformers causal LM in eval mode (``quantization``: ``"8bit"`` / ``"4bit"``, bitsandbytes)."""
    directory = existing_dir(path, "transformers model")
    if not (directory / "config.json").is_file():
        raise CLIError(f"{path}: not a transformers model directory (no config.json)")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "local_files_only": True}
    if quantization:
        if find_spec("bitsandbytes") is None:
            raise CLIError(f"--load-in-{quantization} needs bitsandbytes: pip install bitsandbytes")
        kwargs["quantization_config"] = BitsAndBytesConfig(**{f"load_in_{quantization}": True})
    try:
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for what it cannot load
        raise CLIError(f"{path}: cannot load a transformers causal LM from it ({first_line(e)})") from e
    missing = sorted(info["missing_keys"])
    if missing:  # transformers' own report of them is a table, silenced with its other logs
        warnings.warn(f"{path}: {len(missing)} weight(s) of {type(model).__name__} are not in the checkpoint and "
                      f"were initialized randomly, e.g. {missing[0]}", stacklevel=2)
    return model.eval()


@contextlib.contextmanager
def bad_input(prefix: str = "") -> Iterator[None]:
    """Turn the library's errors about its input (``ValueError``, ``CaptureError``) into ``CLIError``."""
    try:
        yield
    except (ValueError, CaptureError) as e:
        raise CLIError(prefix + first_line(e)) from e


def compile_adapter(model: torch.nn.Module, adapter_dir: str, adapter_name: str = "default"):
    """``compile_with_road`` ``model`` with the PEFT RoAd adapter in ``adapter_dir`` loaded as ``adapter_name``."""
    import fx_adapters as fxa

    directory = existing_dir(adapter_dir, "PEFT adapter")
    with bad_input():  # not JSON, not a RoAd adapter: the message names the file
        config = fxa.RoadConfig.from_pretrained(directory)
    with bad_input(f"adapter {adapter_dir} does not fit this model: "):  # nothing matched, group_size, capture
        am = fxa.compile_with_road(model, config, adapter_name=adapter_name)
    with bad_input():  # tensors that do not fit the layers: the message says so
        am.load_adapter(directory, adapter_name=adapter_name)
    return am.eval()


def random_batch(vocab_size: int, batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` and an ``attention_mask`` with the first sample left-padded by a third."""
    ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :seq // 3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def vocab_size(model: torch.nn.Module) -> int:
    return model.config.get_text_config().vocab_size
