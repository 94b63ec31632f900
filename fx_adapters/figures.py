"""What the pictures share: their optional dependencies, checked before any work, and matplotlib figures drawn
headless.

matplotlib (the ``plot`` extra: ``pip install "fx-adapters[plot]"``) draws the X-LoRA scalings and the benchmark
curves; pydot and the graphviz binary ``dot`` (the ``graph`` extra plus a system package) draw rewritten graphs.
Figures are ``matplotlib.figure.Figure`` objects drawn on matplotlib's Agg canvas: no display, no pyplot state.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PLOT_EXTRA = 'pip install "fx-adapters[plot]" (or: pip install matplotlib)'
GRAPH_EXTRA = 'pip install "fx-adapters[graph]" (or: pip install pydot)'
GRAPHVIZ = "the graphviz package (Debian / Ubuntu: apt-get install graphviz; macOS: brew install graphviz)"
FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#7f7f7f")  # ours, PEFT, a second mode of ours, the base model


class MissingDependency(ImportError):
    """An optional dependency a picture needs is not installed; the message says what to install."""


def require_matplotlib(what: str) -> None:
    """Raise ``MissingDependency`` naming the ``plot`` extra when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependency(f"{what} needs matplotlib, an optional dependency: {PLOT_EXTRA}") from None


def require_pydot(what: str, binary: bool) -> None:
    """Raise ``MissingDependency`` when pydot (the ``graph`` extra) or, with ``binary``, graphviz's ``dot`` is
    missing."""
    try:
        import pydot  # noqa: F401
    except ImportError:
        raise MissingDependency(f"{what} needs pydot, an optional dependency: {GRAPH_EXTRA}") from None
    if binary and shutil.which("dot") is None:
        raise MissingDependency(f"{what} needs the graphviz program 'dot' on PATH: install {GRAPHVIZ}; or write a "
                                ".dot file, which needs no graphviz")


def check_path(path: str | Path, suffixes: tuple[str, ...], what: str) -> Path:
    """``path`` as a Path, if its suffix is one of ``suffixes`` and its directory exists (else ``ValueError``)."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{what}: cannot tell the format of {str(path)!r}; name the file with one of the suffixes "
                         f"{', '.join(suffixes)}")
    if not path.parent.is_dir():
        raise ValueError(f"{what}: the directory of {str(path)!r} does not exist; create it first")
    return path


def new_figure(width: float, height: float):
    """An empty figure of ``width`` × ``height`` inches, laid out to fit its labels (matplotlib's Agg canvas)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure, path: Path) -> Path:
    """Write ``figure`` (format from the suffix); small PNGs: 100 dpi."""
    figure.savefig(path, dpi=100)
    return path
