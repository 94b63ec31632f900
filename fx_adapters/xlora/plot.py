"""``plot_scalings``: an X-LoRA classifier's expert scalings as a heatmap, tokens × experts, as the X-LoRA paper
shows them (needs matplotlib: ``pip install "fx-adapters[plot]"``).

One heatmap of the scalings every adapted layer applies (their mean over the layers), or, when each layer has its
own (``layerwise_scalings``), a small heatmap per layer on one colour scale. The figure is returned (its heatmaps'
``get_array()`` are the numbers drawn) and written to ``path`` when one is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..figures import FIGURE_SUFFIXES, check_path, new_figure, require_matplotlib, save_figure
from ..graph import generation

MAX_COLUMNS = 4  # small multiples per row
MAX_HEIGHT = 14.0  # inches of heatmaps, whatever the prompt's length
MAX_TOKEN_LABELS = 48  # per heatmap; a longer prompt labels every few tokens


def plot_scalings(xm, tokens: Sequence[object] | None = None, path: str | Path | None = None, *,
                  layerwise: bool | None = None, sample: int = 0, scalings: torch.Tensor | None = None,
                  title: str | None = None):
    """Draw ``xm``'s latest scalings (``get_latest_scalings()``, or ``scalings`` of the same layout) of batch row
    ``sample``: one row per token (labelled with ``tokens``, e.g. the token strings; default: positions), one column
    per expert, a colour bar.

    ``layerwise``: a heatmap per adapted layer (default: when ``xm.config.layerwise_scalings``); otherwise the mean
    over the layers. Returns the ``matplotlib.figure.Figure``; ``path`` (``.png``, ``.svg`` or ``.pdf``) also
    writes it. Raises ``ValueError`` (nothing written) when there are no scalings yet or the arguments do not fit.
    """
    require_matplotlib("plot_scalings")
    where = "plot_scalings"
    if path is not None:
        path = check_path(path, FIGURE_SUFFIXES, f"{where}: path")
    values = _rows(xm.get_latest_scalings() if scalings is None else scalings, sample, where)  # (rows, layers, E)
    labels = [str(i) for i in range(values.shape[0])] if tokens is None else [str(t) for t in tokens]
    if len(labels) != values.shape[0]:
        raise ValueError(f"{where}: tokens has {len(labels)} labels but the scalings have {values.shape[0]} tokens; "
                         "pass one label per token of the prompt")
    layerwise = xm.config.layerwise_scalings if layerwise is None else layerwise
    layers = [t.name for t in xm.targets]
    panels = [(name, values[:, i]) for i, name in enumerate(layers)] if layerwise else [
        (f"mean over the {len(layers)} adapted layers", values.mean(dim=1))]
    figure = _heatmaps(panels, labels, list(xm.experts), title or _title(xm, layerwise))
    if path is not None:
        save_figure(figure, path)
    return figure


def _rows(scalings: torch.Tensor | None, sample: int, where: str) -> torch.Tensor:
    """The ``(tokens, layers, experts)`` scalings of batch row ``sample`` (a non-sequence model: its batch rows)."""
    if scalings is None:
        raise ValueError(f"{where}: the module has no scalings yet; call it (or its generate) on a prompt first")
    scalings = scalings.detach().float().cpu()
    if scalings.dim() == 3:  # (batch, layers, experts): a model without a sequence axis
        return scalings
    if scalings.dim() != 4:
        raise ValueError(f"{where}: scalings of shape {tuple(scalings.shape)}; expected (batch, seq, layers, experts) "
                         "as get_latest_scalings returns")
    if not -scalings.shape[0] <= sample < scalings.shape[0]:
        raise ValueError(f"{where}: sample={sample} but the batch has {scalings.shape[0]} rows")
    return scalings[sample]


def _title(xm, layerwise: bool) -> str:
    try:
        model = type(generation.source_of(xm).model).__name__
    except TypeError:  # not a transformers causal LM: no model kept
        model = "the model"
    what = "per adapted layer" if layerwise else "every adapted layer applies"
    return f"X-LoRA expert scalings per token on {model} ({what})"


def _heatmaps(panels: list[tuple[str, torch.Tensor]], tokens: list[str], experts: list[str], title: str):
    """One heatmap (tokens × experts) per panel, on one colour scale, with one colour bar."""
    columns = min(len(panels), MAX_COLUMNS)
    rows = math.ceil(len(panels) / columns)
    cell_w, cell_h = 0.45 + 0.06 * max(map(len, experts)), min(0.26, MAX_HEIGHT / rows / len(tokens))
    width = max(5.0, columns * (1.6 + cell_w * len(experts)) + 1.2)
    height = max(3.0, rows * (1.0 + cell_h * len(tokens)) + 0.8)
    figure = new_figure(width, height)
    axes = figure.subplots(rows, columns, squeeze=False, sharey=True)
    low = min(float(v.min()) for _, v in panels)
    high = max(float(v.max()) for _, v in panels)
    image = None
    for ax, (name, data) in zip(axes.flat, panels):
        image = ax.imshow(data.numpy(), cmap="viridis", vmin=low, vmax=high, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(experts)), experts, rotation=30 if max(map(len, experts)) > 6 else 0, fontsize=8)
        every = math.ceil(len(tokens) / MAX_TOKEN_LABELS)  # long prompts: every few tokens labelled
        ax.set_yticks(range(0, len(tokens), every), tokens[::every], fontsize=8)
        ax.set_xlabel("expert")
    for ax in axes[:, 0]:
        ax.set_ylabel("token")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    figure.colorbar(image, ax=axes, label="scaling (classifier weight)", shrink=0.9)
    figure.suptitle(title, fontsize=10)
    return figure
