"""``python -m benchmarks [--quick] [--json PATH] [--only ROW ...] [--compile] [--aoti] [--threads N] [--plot DIR]``

Issue 7's table (and issue 16's serving rows, ``benchmarks/serving.py``): PEFT and fx_adapters on the same
random Llama (hidden 512, 4 layers, all 7 projections,
RoAd group_size 64, batch 16 × seq 64, 2 threads), timed interleaved in one process. Each figure is a
median ÷ the base model's median from the same run, over the repetitions during which the machine was
quiet (see ``benchmarks/timing.py``); the lines under the table say how many that was.

``--only coldstart`` (opt-in, not in the default run) times issue 15's cold start instead, each contender in a fresh
process on a realistic-size bf16 Llama (``benchmarks/coldstart.py``; with ``--quick``, on the benchmark model).

``--plot DIR`` measures the curves instead (``benchmarks/curves.py``; with ``--only``, after those rows) and draws
them into DIR (``benchmarks/plot.py``; needs matplotlib: pip install "fx-adapters[plot]").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from . import coldstart, serving
from .rows import DEFAULT_ROWS, ROWS, Row, Settings

ROWS = {**ROWS, **serving.ROWS, **coldstart.ROWS}  # coldstart is opt-in (--only coldstart)
DEFAULT_ROWS = [*DEFAULT_ROWS, *serving.DEFAULT_ROWS]

THREADS = 2
FULL = Settings(repeats=25, warmup=2, fold_repeats=10, generate_repeats=5, new_tokens=128, patience=3)
QUICK = Settings(repeats=4, warmup=1, fold_repeats=1, generate_repeats=1, new_tokens=32, patience=1)


def machine() -> dict:
    import peft
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def table(rows: dict[str, Row]) -> str:
    """A Markdown table (pasteable into the README)."""
    cells = [["figure", "PEFT 0.21.2", "fx_adapters", "goal", "met?"]]
    for row in rows.values():
        for line in row.lines:
            met = {True: "yes", False: "NO", None: "—"}[line.met]
            cells.append([line.figure, line.peft, line.ours, line.goal, met])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def fmt(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, cells[1:])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (whole run < 2 min)")
    parser.add_argument("--json", metavar="PATH", help="write medians, ratios and machine info as JSON")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), metavar="ROW", help=f"rows to run: {', '.join(ROWS)}")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (slow to compile)")
    parser.add_argument("--aoti", action="store_true", help="add the AOTInductor rows (minutes of C++ compiling)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (issue 7: {THREADS})")
    parser.add_argument("--repeats", type=int, metavar="N", help="timed repetitions per figure / point (default: 25, "
                        "--quick 4; generate at most 5), busy ones not repeated")
    parser.add_argument("--plot", metavar="DIR", help="measure the curves and write them as PNGs (and curves.json) "
                        'into DIR instead of the table (with --only: after those rows); needs matplotlib: '
                        'pip install "fx-adapters[plot]"')
    args = parser.parse_args(argv)
    if args.plot:  # before anything is measured
        from fx_adapters.figures import MissingDependency, require_matplotlib

        try:
            require_matplotlib("--plot")
        except MissingDependency as e:
            parser.exit(2, f"python -m benchmarks: error: {e}\n")

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # peft imports it; it warns about optional kernels
    settings = QUICK if args.quick else FULL
    if args.repeats:
        settings = dataclasses.replace(settings, repeats=args.repeats, patience=1,
                                       generate_repeats=min(args.repeats, FULL.generate_repeats))
    extra = [*(["compile"] if args.compile else []), *(["aoti"] if args.aoti else [])]
    names = args.only or ([] if args.plot else [*DEFAULT_ROWS, *extra])
    started = time.perf_counter()
    rows = {}
    for name in names:
        t = time.perf_counter()
        rows[name] = ROWS[name](settings)
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    info = {**machine(), "settings": vars(settings), "wall_s": round(time.perf_counter() - started, 1)}

    print(f"\nfx_adapters vs PEFT — {info['date']} — {info['cpu']}, torch {info['torch']}, "
          f"{info['threads']} threads, {'quick' if args.quick else 'full'} ({settings.repeats} repeats, median)\n")
    if rows:
        print(table(rows))
    for name, row in rows.items():
        for note in row.notes:
            print(f"  {name}: {note}")
    for name, row in rows.items():
        if row.timings:
            print(f"  {name}: {row.timings.summary()}")
    if args.plot:
        command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
        _curves(settings, "quick" if args.quick else "full", Path(args.plot), {**info, "command": command})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": {n: r.as_json() for n, r in rows.items()}}, f, indent=2)
    return 0


def _curves(settings, mode: str, directory: Path, info: dict) -> None:
    from . import curves, plot

    measured = {}
    for name, measure in (("adapters", curves.adapters_curve), ("generate", curves.generate_curve)):
        t = time.perf_counter()
        measured[name] = measure(settings, mode)
        print(f"[curve {name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    for path in plot.write({**measured, "machine": info, "mode": mode}, directory):
        print(f"  wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
