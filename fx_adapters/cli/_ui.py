"""What the commands share for the terminal: errors for bad input, quiet third-party libraries, output (tables,
progress bars)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


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
    """Results go to stdout; progress bars (tqdm, off with ``--quiet``) to stderr when it is a terminal, else each
    step's name once, as a line (a log file gets no redrawn bars)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.terminal = sys.stderr.isatty()

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

        bar = tqdm(total=total, disable=self.quiet or not self.terminal, leave=False, file=sys.stderr,
                   bar_format="{desc:<24} {bar:20} {n_fmt}/{total_fmt} steps [{elapsed}]")
        try:
            yield Steps(bar, lines=not self.quiet and not self.terminal)
        finally:
            bar.close()

    def bar(self, total: int, description: str):
        """A tqdm bar over ``total`` items (``--quiet`` or not a terminal: none; else the description once)."""
        from tqdm import tqdm

        if not self.quiet and not self.terminal:
            print(f"{description} ({total})", file=sys.stderr)
        return tqdm(total=total, desc=description, disable=self.quiet or not self.terminal, leave=False,
                    file=sys.stderr)


class Steps:
    """``step("capturing")`` marks the previous step done and names the current one (with ``lines``, also prints
    it as a line on stderr)."""

    def __init__(self, bar, lines: bool = False):
        self.bar, self.started, self.lines = bar, False, lines

    def __call__(self, description: str) -> None:
        if self.lines:
            print(f"{description} ...", file=sys.stderr, flush=True)
        if self.started:
            self.bar.update()
        self.bar.set_description_str(description)
        self.started = True


def _cell(value: object) -> str:
    return f"{value:.2e}" if isinstance(value, float) else str(value)
