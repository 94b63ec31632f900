"""The curves of ``python -m benchmarks --plot DIR``, drawn from ``curves.py``'s measurements: one function per
figure, returning the ``matplotlib.figure.Figure`` (its lines' data are the measured points), and ``write`` for all.
``python -m benchmarks.plot DIR`` draws them again from ``DIR/curves.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fx_adapters.figures import COLORS, new_figure, save_figure

OURS, PEFT, OURS_PROMPT, BASE = COLORS
FILES = {"adapters": "mixed_batch_vs_adapters.png", "generate": "xlora_generate_vs_tokens.png",
         "decode": "xlora_decode_modes.png"}


def adapters_figure(data: dict):
    """Mixed batch ÷ base against adapters loaded (log scale), ours and PEFT."""
    figure = new_figure(6.4, 4.0)
    ax = figure.subplots()
    ax.plot(data["adapters"], data["peft"], "o-", color=PEFT, label="PEFT 0.21 (loops over the batch's adapters)")
    ax.plot(data["adapters"], data["ours"], "o-", color=OURS, label="fx_adapters (one gather)")
    ax.axhline(1.0, color=BASE, linestyle=":", label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xticks(data["adapters"], [str(n) for n in data["adapters"]])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("RoAd adapters loaded (log scale)")
    ax.set_ylabel("forward time ÷ base model's")
    ax.set_title(f"Mixed batch: {data['batch']} samples × {data['seq']} tokens, each its own adapter "
                 f"(up to {max(data['distinct_in_batch'])} per call)\n{data['model']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def generate_figure(data: dict):
    """X-LoRA generate, tokens/s against new tokens: PEFT (no cache) falls as 1/n, ours stays flat."""
    figure = new_figure(6.4, 4.0)
    ax = figure.subplots()
    ax.plot(data["new_tokens"], data["peft"], "o-", color=PEFT, label="PEFT 0.21 (no KV cache: quadratic)")
    ax.plot(data["new_tokens"], data["ours"], "o-", color=OURS, label="fx_adapters (both passes cached: linear)")
    ax.plot(data["new_tokens"], data["base"], "o:", color=BASE, label="base model's generate (no adapters)")
    _tokens_axes(ax, data)
    ax.set_yscale("log")
    ax.set_title(f"X-LoRA generate ({data['experts']} experts), batch {data['batch']} × prompt {data['prompt']}"
                 f"\n{data['model']}", fontsize=9)
    return figure


def decode_figure(data: dict):
    """Ours: exact scalings at every step against the prompt's scalings reused (when this build has that mode)."""
    figure = new_figure(6.4, 4.0)
    ax = figure.subplots()
    ax.plot(data["new_tokens"], data["ours"], "o-", color=OURS, label="exact (scalings of every position)")
    if data["prompt_mode"]:
        ax.plot(data["new_tokens"], data["ours_prompt"], "s-", color=OURS_PROMPT,
                label="prompt scalings reused while decoding")
    else:
        ax.text(0.98, 0.04, "prompt-scalings decode: not in this build\n(xm.generate has no decode_scalings)",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color=BASE)
    ax.plot(data["new_tokens"], data["base"], "o:", color=BASE, label="base model's generate (no adapters)")
    _tokens_axes(ax, data)
    ax.set_ylim(bottom=0)
    ax.set_title(f"fx_adapters X-LoRA decode modes, batch {data['batch']} × prompt {data['prompt']}"
                 f"\n{data['model']}", fontsize=9)
    return figure


def _tokens_axes(ax, data: dict) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(data["new_tokens"], [str(n) for n in data["new_tokens"]])
    ax.set_xlabel("new tokens generated per sample (log scale)")
    ax.set_ylabel("new tokens / s (whole batch)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def write(curves: dict, directory: Path) -> list[Path]:
    """``curves.json`` and one PNG per figure in ``directory``; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "curves.json").write_text(json.dumps(curves, indent=1))
    figures = {"adapters": adapters_figure(curves["adapters"]), "generate": generate_figure(curves["generate"]),
               "decode": decode_figure(curves["generate"])}
    for figure in figures.values():
        figure.get_layout_engine().set(rect=(0, 0.03, 1, 0.97))  # room for the footnote
        figure.text(0.99, 0.005, footnote(curves), ha="right", va="bottom", fontsize=6, color=BASE)
    return [directory / "curves.json", *(save_figure(fig, directory / FILES[key]) for key, fig in figures.items())]


def footnote(curves: dict) -> str:
    """When, where and how it was measured (from ``curves["machine"]``)."""
    info = curves.get("machine", {})
    summaries = [line for name in ("adapters", "generate") for line in curves.get(name, {}).get("timings", [])]
    busy = sum(line.startswith("UNRELIABLE") for line in summaries)
    load = f"; {busy} of {len(summaries)} points UNRELIABLE (machine busy)" if busy else ""
    return (f"{info.get('date', '?')[:10]}, {info.get('cpu', '?')}, {info.get('threads', '?')} threads, torch "
            f"{info.get('torch', '?')}; medians; {info.get('command', 'python -m benchmarks --plot DIR')}{load}")


if __name__ == "__main__":
    for written in write(json.loads(Path(sys.argv[1], "curves.json").read_text()), Path(sys.argv[1])):
        print(f"wrote {written}")
