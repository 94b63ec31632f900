"""What the commands share: errors for bad input, output (tables, progress bars), loading models and adapters.

Heavy libraries (transformers, PEFT, bitsandbytes) are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from importlib.util import find_spec
from pathlib import Path

import torch

from ..passes.capture import CaptureError

PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
DTYPES = ("auto", "float32", "bfloat16", "float16")


class CLIError(Exception):
    """Bad input: printed as one line, exit status 2."""


def first_line(error: BaseException) -> str:
    return next(iter(str(error).strip().splitlines()), type(error).__name__)


# ------------------------------------------------------------------------------------------------ noise


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings as one line on stderr; third-party ones (transformers, torch, PEFT) are dropped."""
    if str(Path(filename).resolve()).startswith(PACKAGE_DIR):
        print(f"fx-adapters: warning: {first_line(message)}", file=sys.stderr)


@contextlib.contextmanager
def quiet_libraries(debug: bool) -> Iterator[None]:
    """No network, and no third-party notices, warnings or progress bars unless ``debug``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if debug:
        yield
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # both read when transformers is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes' import-time notice about the `kernels` package, torch's warnings (e.g. from torch.export)
    loggers = {logger: logger.level for logger in map(logging.getLogger, ("bitsandbytes", "torch"))}
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            yield
    finally:
        for logger, level in loggers.items():
            logger.setLevel(level)


# ----------------------------------------------------------------------------------------------- output


class UI:
    """Results go to stdout; progress bars (tqdm, off with ``--quiet``) to stderr."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    @staticmethod
    def print(text: str = "") -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)  # moves an active progress bar out of the way

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """Columns sized to fit; numbers right-aligned."""
        cells = [list(map(str, headers))] + [[_cell(v) for v in row] for row in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
        numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]
        for r in cells:
            self.print("  ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(r, widths, numeric)).rstrip())

    @contextlib.contextmanager
    def steps(self, total: int) -> Iterator[Steps]:
        """A progress bar over ``total`` named steps; the bar goes away when they are done (or fail)."""
        from tqdm import tqdm

        bar = tqdm(total=total, disable=self.quiet, leave=False, file=sys.stderr,
                   bar_format="{desc:<24} {bar:20} {n_fmt}/{total_fmt} steps [{elapsed}]")
        try:
            yield Steps(bar)
        finally:
            bar.close()

    def bar(self, total: int, description: str):
        """A tqdm bar over ``total`` items (``--quiet``: none)."""
        from tqdm import tqdm

        return tqdm(total=total, desc=description, disable=self.quiet, leave=False, file=sys.stderr)


class Steps:
    """``step("capturing")`` marks the previous step done and names the current one."""

    def __init__(self, bar):
        self.bar, self.started = bar, False

    def __call__(self, description: str) -> None:
        if self.started:
            self.bar.update()
        self.bar.set_description_str(description)
        self.started = True


def _cell(value: object) -> str:
    return f"{value:.2e}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------ local files


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
