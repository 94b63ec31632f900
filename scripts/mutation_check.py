"""Mutation check: the tests must fail for the right reason.

Each mutant is one deliberate bug, a single textual replacement in one file of ``fx_adapters``. For each, the
package, the tests, ``pyproject.toml`` and ``README.md`` are copied to a temporary directory, the bug is applied to
the copy, and the mutant's relevant tests run there (``PYTHONPATH`` = the copy, so nothing here is touched). A
mutant is *caught* when those tests fail, *missed* when they pass, *stale* when its text is no longer in the file
(update the mutant). Not part of the default test run: it takes minutes.

    python scripts/mutation_check.py                 # every mutant; exit status 1 if one is missed or stale
    python scripts/mutation_check.py --only dropout-no-rescale scaling-pass-not-detached
    python scripts/mutation_check.py --baseline      # first run every selection unmutated: it must pass
    python scripts/mutation_check.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("fx_adapters", "tests", "pyproject.toml", "README.md")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, -k expressions


MUTANTS = (
    Mutant("assert-equivalent-100x-looser", "fx_adapters/testing/__init__.py",
           "ok = bool((diff <= atol + rtol * b.abs()).all())",
           "ok = bool((diff <= 100 * atol + rtol * b.abs()).all())",
           ("tests/test_testing.py", "-k", "tolerance")),
    Mutant("xlora-dropout-no-rescale", "fx_adapters/xlora/modules.py",
           "masks = [F.dropout(ones, p, training=True) if p else ones for p in self.dropout]",
           "masks = [F.dropout(ones, p, training=True).ne(0).to(x.dtype) if p else ones for p in self.dropout]",
           ("tests/test_xlora.py", "-k", "gradient or dropout")),
    Mutant("xlora-dropout-on-the-wrong-experts", "fx_adapters/xlora/modules.py",
           "masks = [F.dropout(ones, p, training=True) if p else ones for p in self.dropout]",
           "masks = [F.dropout(ones, p, training=True) if p else ones for p in self.dropout[::-1]]",
           ("tests/test_xlora.py", "-k", "gradient or dropout")),
    Mutant("xlora-scaling-pass-draws-no-dropout-masks", "fx_adapters/xlora/modules.py",
           "if self.training and any(self.dropout):  # PEFT's scaling pass draws",
           "if False:  # PEFT's scaling pass draws",
           ("tests/test_xlora.py", "-k", "gradient or dropout")),
    Mutant("xlora-dropout-masks-for-experts-not-on-the-layer", "fx_adapters/xlora/experts.py",
           "dropout = [e.config.lora_dropout if rank and not embedding else 0.0 for e, rank in zip(experts, ranks)]",
           "dropout = [e.config.lora_dropout if not embedding else 0.0 for e, rank in zip(experts, ranks)]",
           ("tests/test_xlora.py", "-k", "gradient or dropout")),
    Mutant("xlora-scaling-pass-not-detached", "fx_adapters/xlora/passes.py",
           'hidden = graph.call_method("detach", (scaling_env[last_hidden],))',
           "hidden = scaling_env[last_hidden]",
           ("tests/test_xlora.py", "-k", "gradient or dropout")),
    Mutant("xlora-classifier-logits-scaled", "fx_adapters/xlora/modules.py",
           "scalings = torch.softmax(scalings / self.temperature, dim=-1)",
           "scalings = torch.softmax(1.5 * scalings / self.temperature, dim=-1)",
           ("tests/test_xlora_equivalence.py", "-k", "eager_oracle")),
    Mutant("xlora-rewrite-skips-the-first-layer", "fx_adapters/xlora/pipeline.py",
           "for i, name in enumerate(targets) if name in layers}",
           "for i, name in enumerate(targets) if name in layers and i}",
           ("tests/test_xlora_call_signatures.py", "-k", "labels")),
    Mutant("train-mode-runs-the-eval-capture", "fx_adapters/graph/captures.py",
           "training=module.training, dtype=dtype",
           "training=False, dtype=dtype",
           ("tests/test_xlora_call_signatures.py", "-k", "training")),
    Mutant("rotation-in-place-reads-overwritten-half", "fx_adapters/road/rotation.py",
           "torch.mul(pairs, d, out=out).add_(partners)",
           "torch.mul(pairs, d, out=out).addcmul_(pairs.flip(-2), f)",
           ("tests/test_rotation.py", "-k", "in_place")),
    Mutant("rotation-in-place-overwrites-the-first-half-it-reads", "fx_adapters/road/rotation.py",
           "first = y0.clone() if out.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() else y0",
           "first = y0",
           ("tests/test_rotation.py", "-k", "in_place")),
    Mutant("fold-computed-in-half-precision", "fx_adapters/road/fold.py",
           "compute = torch.promote_types(weight.dtype, torch.float32)",
           "compute = weight.dtype",
           ("tests/test_fold.py", "-k", "half_precision")),
    Mutant("quantized-merge-does-nothing", "fx_adapters/road/merge.py",
           "todo = [name for name in dict.fromkeys(names) if name not in self.names]",
           "todo = []",
           ("tests/test_bnb.py", "-k", "merge_error or moves_the_quantized")),
    Mutant("decode-positions-all-zero", "fx_adapters/graph/generation.py",
           '"attention_mask": attention_mask, "position_ids": position_ids}',
           '"attention_mask": attention_mask, "position_ids": position_ids * 0}',
           ("tests/test_generate.py", "-k", "greedy_road")),
    Mutant("generate-ignores-the-adapter", "fx_adapters/road/generation.py",
           "attrgetter(slot_map)(tables), rows,",
           "attrgetter(slot_map)(tables), None,",
           ("tests/test_generate.py", "-k", "greedy_road")),
    Mutant("derived-forward-accepted-unchecked", "fx_adapters/graph/forward_from_step.py",
           "        if torch.equal(logits, leaves[0]):",
           "        if True:",
           ("tests/test_forward_from_step.py", "-k", "bit_for_bit and opt")),
    Mutant("derived-forward-mask-keeps-the-step-shape", "fx_adapters/graph/forward_from_step.py",
           '        mask.meta["val"] = ids.meta.get("val")',
           "        pass",
           ("tests/test_export.py",)),
    Mutant("decode-without-a-mask-on-padded-rows", "fx_adapters/graph/generation.py",
           "return inputs[0].shape[1] == 1 and bool(inputs[1].all())",
           "return inputs[0].shape[1] == 1",
           ("tests/test_generate.py", "-k", "exactly_where")),
    Mutant("decode-without-a-mask-in-a-sliding-window", "fx_adapters/graph/generation.py",
           'return getattr(config, "sliding_window", None) is None and',
           'return True or',
           ("tests/test_generate.py", "-k", "sliding")),
    Mutant("decode-step-keeps-the-past-alive", "fx_adapters/graph/generation.py",
           "    cache.clear()\n    for part in inputs:\n",
           "    for part in ():\n",
           ("tests/test_generate.py", "-k", "frees_each")),
    Mutant("generate-computes-every-prompt-position-logits", "fx_adapters/road/generation.py",
           "road_step(am, source, index, last_logits=True)",
           "road_step(am, source, index, last_logits=False)",
           ("tests/test_generate.py", "-k", "matmuls")),
)


def copy_tree(into: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, into / name)


def run_tests(where: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """Whether the tests passed in ``where``, and pytest's last line."""
    env = dict(os.environ, PYTHONPATH=str(where), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=where, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode == 0, (lines[-1] if lines else done.stderr.strip()[-200:])


def check(mutant: Mutant, baseline: bool) -> tuple[str, str, float]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        where = Path(tmp)
        copy_tree(where)
        if baseline:
            passed, last = run_tests(where, mutant.tests)
            if not passed:
                return "BASELINE FAILS", last, time.perf_counter() - start
        path = where / mutant.file
        text = path.read_text()
        if text.count(mutant.old) != 1:
            return "STALE", f"{mutant.old!r} occurs {text.count(mutant.old)} times in {mutant.file}", 0.0
        path.write_text(text.replace(mutant.old, mutant.new))
        passed, last = run_tests(where, mutant.tests)
    return ("MISSED" if passed else "caught"), last, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--baseline", action="store_true", help="first check each selection passes unmutated")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"unknown mutant(s) {', '.join(unknown)}; --list shows them")
    selected = [known[name] for name in args.only] if args.only else list(MUTANTS)
    if args.list:
        for m in selected:
            print(f"{m.name:45} {m.file:35} {' '.join(m.tests)}")
        return 0
    rows = []
    for m in selected:
        result, last, seconds = check(m, args.baseline)
        rows.append((m.name, result, f"{seconds:.0f}s", last))
        print(f"{m.name:45} {result:8} {seconds:5.0f}s  {last}", flush=True)
    print("\n| mutant | result | time | tests (last line) |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if all(row[1] == "caught" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
