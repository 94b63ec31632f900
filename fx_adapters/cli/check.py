"""Property-based check that the compiled model computes what PEFT computes: load the local base model, compile
it with the PEFT RoAd adapter, load the same adapter with PEFT's PeftModel.from_pretrained, and compare their
logits on random token batches drawn by hypothesis (fx_adapters.testing.strategies.token_batches: batch and
sequence sizes, left/right padding). Prints a table of the cases; on a mismatch hypothesis shrinks it to the
smallest failing batch, and fx_adapters.testing.assert_equivalent names the first diverging layer (exit 1)."""

from __future__ import annotations

import textwrap
import warnings
from importlib.util import find_spec
from pathlib import Path

import torch

from ._models import DTYPES, compile_adapter, load_model, vocab_size
from ._ui import CLIError, first_line

HELP = "compare the compiled model with PEFT on random batches (hypothesis); name the first diverging layer"


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the base model: a local transformers directory")
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a PEFT RoAd adapter directory")
    parser.add_argument("--examples", type=int, default=20, metavar="N", help="random batches to try (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0: reproducible)")
    parser.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="load the model in this dtype "
                        "(default: the checkpoint's)")


def run(args, ui) -> int:
    missing = [name for name in ("peft", "hypothesis") if find_spec(name) is None]
    if missing:
        raise CLIError(f"check needs {' and '.join(missing)}: pip install 'fx-adapters[test]'")
    if args.examples < 1:
        raise CLIError(f"--examples {args.examples}: need at least 1")
    with ui.steps(3) as step:
        step("loading the model")
        model = load_model(args.model_dir, args.dtype)
        step("capturing + adapter")
        am = compile_adapter(model, args.adapter_dir)  # captures a copy: PEFT may then wrap `model` itself
        step("loading it with PEFT")
        reference, notes = _peft_model(model, args.adapter_dir)
    for note in notes:
        ui.print(f"PEFT warned while loading the adapter: {note}")
    ui.print(f"Compiled model vs PEFT, {args.examples} random batches (seed {args.seed}, atol {args.atol:g}, "
             f"rtol {args.rtol:g}):")
    cases, failure = _run_cases(am, reference, vocab_size(model), args, ui)
    ui.table(["case", "batch", "seq", "padding", "max abs err", "result"], cases)
    if failure is None:
        ui.print(f"All {len(cases)} cases equivalent.")
        return 0
    ui.print(f"FAILED. Smallest failing case: {failure[0]}")
    ui.print(failure[1])
    return 1


def _peft_model(model: torch.nn.Module, adapter_dir: str) -> tuple[torch.nn.Module, list[str]]:
    """PEFT's model and the warnings PEFT gave while loading (e.g. checkpoint keys it did not use)."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = PeftModel.from_pretrained(model, adapter_dir).eval()
    notes = [textwrap.shorten(first_line(w.message), 200, placeholder=" …") for w in caught
             if "peft" in Path(w.filename).parts]
    return reference, notes


def _run_cases(am, reference, vocab: int, args, ui) -> tuple[list[tuple], tuple[str, str] | None]:
    """Table rows up to the first failure, and (smallest failing case, divergence message) or None."""
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis.reporting import with_reporter

    from ..testing import NotEquivalentError, assert_equivalent
    from ..testing.strategies import token_batches

    cases, failing = [], []
    bar = ui.bar(args.examples, "comparing with PEFT")

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(token_batches(vocab))
    def equivalent(batch):
        with torch.no_grad():
            ours, theirs = am(**batch).logits, reference(**batch).logits
        ok = torch.allclose(ours, theirs, atol=args.atol, rtol=args.rtol)
        if not failing:
            cases.append((len(cases) + 1, *batch["input_ids"].shape, _padding(batch["attention_mask"]),
                          (ours.double() - theirs.double()).abs().max().item(), "ok" if ok else "FAIL"))
            bar.update()
        if not ok:
            failing.append(batch)
            raise NotEquivalentError

    with bar, with_reporter(lambda _: None):
        try:
            equivalent()
        except NotEquivalentError:
            smallest = failing[-1]  # hypothesis replays the smallest failing case last
        else:
            return cases, None
    try:  # runs both again, recording every module's output, to name the first one that differs
        assert_equivalent(am, reference, smallest, atol=args.atol, rtol=args.rtol)
        message = "the outputs differed on one run and not on the next: the model is nondeterministic"
    except NotEquivalentError as e:
        message = str(e)
    return cases, (_describe(smallest), message)


def _padding(mask: torch.Tensor) -> str:
    if bool(mask.all()):
        return "none"
    return "left" if bool((mask[:, 0] == 0).any()) else "right"


def _describe(batch: dict[str, torch.Tensor]) -> str:
    size, seq = batch["input_ids"].shape
    return f"batch {size}, seq {seq}, padding {_padding(batch['attention_mask'])}"
