"""Issue 15's cold start: ``python -m benchmarks --only coldstart`` (opt-in, minutes: not in the default run; with
``--quick``, the benchmark model's size instead of the realistic one).

Each contender runs in a fresh ``python -m benchmarks.coldstart CONTENDER SIZE`` process, so no cache, capture or
lazy import carries over from another. The process imports torch and transformers, builds a random Llama from its
config (seeded, bf16; ``SIZES``: 16 layers, hidden 2048 for the full run), then times, in this order:

- ``import_s``: importing the contender's library (``fx_adapters`` or ``peft``; torch and transformers already in);
- ``compile_s``: ``compile_with_road`` / ``compile_with_xlora`` for ours, ``get_peft_model`` for PEFT (the import
  above not included);
- ``generate_s``: the first greedy ``generate`` of ``NEW_TOKENS`` new tokens for a ``PROMPT`` prompt (the base
  model: its own first ``generate``).

Captures are counted as the calls of ``torch.export.export`` during compile and during the first generate: every
capture fx_adapters makes of a transformers model is one export, whatever the library's internals (one graph or two
for generation). Adapters start as PEFT initialises them (RoAd's identity rotations, LoRA experts with B = 0), so
every contender must pick the base model's tokens: the row checks it. X-LoRA's experts are written once, by a process
of their own (``experts``), before the contenders run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import models as m
from .rows import INFO, Line, Row, Settings, at_most
from .timing import OtherLoad

SIZES = {
    "full": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                 vocab_size=32000),
    "quick": m.MODEL,
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
}
DTYPE = torch.bfloat16
PROMPT = (1, 16)  # batch × prompt length of the first generate
NEW_TOKENS = 8
FIRST_GENERATE_GOAL = 1.2  # issue 15: the first generate takes at most 1.2 × the compile time
METHODS = {"road": "RoAd", "xlora": "X-LoRA"}  # ours; PEFT's contender is "peft_" + the method
CONTENDERS = ("base", *METHODS, *(f"peft_{method}" for method in METHODS))
ROAD = {**m.ROAD, "init_weights": True}  # identity rotations: the base model's tokens
ROOT = Path(__file__).resolve().parents[1]


def build(size: str) -> torch.nn.Module:
    """The random bf16 Llama of ``SIZES[size]`` (seeded: the same weights in every process)."""
    import transformers as tf

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SIZES[size], pad_token_id=0)).eval()
    finally:
        torch.set_default_dtype(default)


def prompt(size: str) -> torch.Tensor:
    return torch.randint(1, SIZES[size]["vocab_size"], PROMPT, generator=torch.Generator().manual_seed(0))


def write_experts(size: str, directory: Path) -> dict[str, str]:
    """``m.XLORA_EXPERTS`` LoRA experts (PEFT's own initialisation) for ``build(size)``, saved by PEFT under
    ``directory``; returns expert name → adapter directory."""
    from peft import LoraConfig, get_peft_model

    names = [f"e{i}" for i in range(m.XLORA_EXPERTS)]
    config = LoraConfig(r=m.XLORA_RANK, lora_alpha=16, target_modules=m.XLORA_TARGETS)
    peft = get_peft_model(build(size), config, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, config)
    peft.save_pretrained(directory)  # adapters not named "default" go to <directory>/<name>
    return experts(directory)


def experts(directory: Path) -> dict[str, str]:
    return {f"e{i}": str(Path(directory, f"e{i}")) for i in range(m.XLORA_EXPERTS)}


class CountExports:
    """Counts the calls of ``torch.export.export`` while active (the captures made)."""

    def __init__(self):
        self.count, self.original = 0, torch.export.export

    def __enter__(self) -> CountExports:
        def export(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)
        torch.export.export = export
        return self

    def __exit__(self, *_):
        torch.export.export = self.original


def adapt(contender: str, model: torch.nn.Module, size: str, directory: Path | None) -> torch.nn.Module:
    """The contender's module for ``model`` (imports its library first: time it)."""
    if contender == "road":
        import fx_adapters as fxa

        return fxa.compile_with_road(model, fxa.RoadConfig(**ROAD))
    if contender == "xlora":
        import fx_adapters as fxa

        return fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters=experts(directory)))
    import peft

    if contender == "peft_road":
        return peft.get_peft_model(model, peft.RoadConfig(**ROAD))
    model.config.use_cache = False  # PEFT's X-LoRA requires it
    return peft.get_peft_model(model, peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=SIZES[size]["hidden_size"],
                                                       adapters={str(i): d for i, d in
                                                                 enumerate(experts(directory).values())}))


def library(contender: str) -> str | None:
    return None if contender == "base" else "peft" if contender.startswith("peft_") else "fx_adapters"


def measure(contender: str, size: str, directory: Path | None = None) -> dict:
    """One contender's cold start (module docstring), in this process: meant for a fresh one."""
    started = time.perf_counter()
    model = build(size)
    ids = prompt(size)
    result = {"contender": contender, "size": size, "params": sum(p.numel() for p in model.parameters()),
              "build_s": time.perf_counter() - started, "import_s": 0.0, "compile_s": 0.0, "exports_compile": 0}
    load = OtherLoad()
    with CountExports() as exports:
        name = library(contender)
        if name:
            already = name in sys.modules
            start = time.perf_counter()
            __import__(name)
            result["import_s"] = None if already else time.perf_counter() - start
            start = time.perf_counter()
            model = adapt(contender, model, size, directory)
            result["compile_s"], result["exports_compile"] = time.perf_counter() - start, exports.count
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
        result["generate_s"] = time.perf_counter() - start
        result["exports_generate"] = exports.count - result["exports_compile"]
    captures = getattr(model, "captures", None)  # ours: the forward's call signatures
    return {**result, "tokens": out[:, ids.shape[1]:].tolist(), "others_cpus": load.cpus(),
            "forward_signatures": [str(s) for s in captures.signatures] if captures is not None else None,
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


# ------------------------------------------------------------------------------------------------ the row


def run_child(contender: str, size: str, directory: Path) -> dict:
    """``measure`` in a fresh process (its JSON: the last line it prints)."""
    argv = [sys.executable, "-m", "benchmarks.coldstart", contender, size, "--experts", str(directory),
            "--threads", str(torch.get_num_threads())]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this checkout's packages
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if done.returncode:
        raise RuntimeError(f"cold start of {contender} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    if contender != "experts":
        print(f"  [cold start {contender}: compile {result['compile_s']:.1f} s, first generate "
              f"{result['generate_s']:.1f} s]", file=sys.stderr, flush=True)
    return result


def method_lines(method: str, ours: dict, peft: dict) -> list[Line]:
    """The cold-start lines of one method: compile and first-generate seconds beside PEFT's, first generate ÷
    compile against the goal, and the captures each step made."""
    label = METHODS[method]
    ratio = ours["generate_s"] / ours["compile_s"]
    more = ours["exports_generate"]
    return [
        Line(f"{label} cold start: compile, s (PEFT: get_peft_model)", f"{peft['compile_s']:.2f}",
             f"{ours['compile_s']:.2f}", INFO.text),
        Line(f"{label} cold start: first generate, {NEW_TOKENS} new × batch {PROMPT[0]}, s",
             f"{peft['generate_s']:.2f}", f"{ours['generate_s']:.2f}", INFO.text),
        Line(f"{label} cold start: first generate ÷ compile", "n/a", f"{ratio:.2f}", at_most(FIRST_GENERATE_GOAL).text,
             ratio <= FIRST_GENERATE_GOAL),
        Line(f"{label} captures (torch.export runs): compile + first generate", "n/a",
             f"{ours['exports_compile']} + {more}", "generate ≤ 1", more <= 1),
    ]


def describe(size: str, result: dict) -> str:
    cfg = SIZES[size]
    return (f"random bf16 Llama, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, intermediate "
            f"{cfg['intermediate_size']}, {cfg['num_attention_heads']} heads, vocab {cfg['vocab_size']}: "
            f"{result['params'] / 1e9:.2f} B parameters")


def coldstart(s: Settings) -> Row:
    """Issue 15's cold start (module docstring): every contender in a fresh process, one after the other."""
    size = "quick" if s.repeats < 10 else "full"
    with tempfile.TemporaryDirectory(prefix="fxa-coldstart-") as tmp:
        run_child("experts", size, Path(tmp))
        results = {contender: run_child(contender, size, Path(tmp)) for contender in CONTENDERS}
    base = results["base"]
    lines = [line for method in METHODS for line in method_lines(method, results[method], results[f"peft_{method}"])]
    differ = [c for c, r in results.items() if r["tokens"] != base["tokens"]]
    notes = [describe(size, base) + f"; prompt {PROMPT[0]} × {PROMPT[1]}, greedy, {torch.get_num_threads()} threads",
             f"the base model's own first generate: {base['generate_s']:.2f} s",
             "imports (not in compile): " + ", ".join(f"{c} {r['import_s']:.2f} s" for c, r in results.items()
                                                      if r["import_s"]),
             "tokens equal to the base model's (identity-initialised adapters): "
             + ("all" if not differ else f"all but {', '.join(differ)}"),
             "other processes' CPUs during each process: " + ", ".join(f"{c} {r['others_cpus']}"
                                                                       for c, r in results.items()),
             "peak memory (GB): " + ", ".join(f"{c} {r['max_rss_gb']:.1f}" for c, r in results.items())]
    return Row(lines, notes=notes, raw=results)


ROWS = {"coldstart": coldstart}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coldstart", description=__doc__.split("\n\n")[1])
    parser.add_argument("contender", choices=[*CONTENDERS, "experts"], help='"experts": write the X-LoRA experts')
    parser.add_argument("size", choices=list(SIZES))
    parser.add_argument("--experts", metavar="DIR", type=Path, help="where the X-LoRA experts are (or go)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.contender == "experts":
        print(json.dumps(write_experts(args.size, args.experts)))
    else:
        print(json.dumps(measure(args.contender, args.size, args.experts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
