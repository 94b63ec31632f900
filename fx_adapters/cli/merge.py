"""Merge a PEFT RoAd adapter into its base model: load both from local directories, fold the adapter into the
weights, export a .pt2 that torch.export.load runs without fx_adapters, and check the export against the
unmerged model on a random batch (max abs diff; exit status 1 when it is off).

--save-pretrained DIR also writes the folded weights as a transformers checkpoint (safetensors, the base
model's config, and the other files of MODEL_DIR such as the tokenizer's) that from_pretrained loads."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import torch

from ..graph.peft_files import CONFIG_NAME
from ._models import DTYPES, compile_adapter, existing_dir, load_model, random_batch, vocab_size
from ._ui import CLIError

HELP = "fold a PEFT RoAd adapter into a model and export it (.pt2, optionally a transformers checkpoint)"
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
# export vs unmerged: max abs diff allowed, relative to the largest logit (the fold rounds once per weight)
RELATIVE_TOLERANCE = {torch.float16: 5e-2, torch.bfloat16: 5e-2}
DEFAULT_RELATIVE_TOLERANCE = 1e-4


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the base model: a local transformers directory")
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a PEFT RoAd adapter directory")
    parser.add_argument("--out", required=True, metavar="FILE.pt2", help="where to write the exported model")
    parser.add_argument("--adapter-name", default="default", metavar="NAME",
                        help="the adapter PEFT saved as NAME (ADAPTER_DIR/NAME when ADAPTER_DIR holds several)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="load the model in this dtype "
                        "(default: the checkpoint's)")
    parser.add_argument("--save-pretrained", metavar="DIR", help="also write a transformers checkpoint here")


def run(args, ui) -> int:
    import fx_adapters as fxa

    out, save_dir = _outputs(args)
    with ui.steps(5 + bool(save_dir)) as step:
        step("loading the model")
        model = load_model(args.model_dir, args.dtype)
        step("capturing + adapter")
        am = compile_adapter(model, _adapter_dir(args.adapter_dir, args.adapter_name), args.adapter_name)
        if save_dir:
            _refuse_tied(model, am.targets)
        config = am.peft_config[args.adapter_name]
        ui.print(f"{type(model).__name__} ({model.dtype}) from {args.model_dir}, RoAd adapter {args.adapter_name!r} "
                 f"({config.variant}, group_size {config.group_size}) on {len(am.targets)} layers")
        step("folding")
        folded = am.fold()
        step("exporting")
        fxa.export(folded, out)
        ui.print(f"Folded the adapter into the weights and exported {out} ({out.stat().st_size / 1e6:.1f} MB)")
        step("verifying the export")
        if not _verify(model, am, out, ui):
            return 1
        if save_dir:
            step("saving the checkpoint")
            _save_pretrained(model, folded, Path(args.model_dir), save_dir)
            ui.print(f"Wrote {save_dir}: a transformers checkpoint with the folded weights (from_pretrained loads it)")
    return 0


def _verify(model: torch.nn.Module, am, out: Path, ui) -> bool:
    """The reloaded export against the unmerged model on a random batch; prints the max abs diff."""
    batch = random_batch(vocab_size(model))
    with torch.no_grad():
        got = torch.export.load(out).module()(**batch)  # by keyword, as the model
        want = am(**batch).logits.float()
    diff = (got["logits"].float() - want).abs().max().item()
    tolerance = RELATIVE_TOLERANCE.get(model.dtype, DEFAULT_RELATIVE_TOLERANCE) * want.abs().max().item()
    ui.print(f"Export vs the unmerged model on a random {tuple(batch['input_ids'].shape)} batch: max abs diff "
             f"{diff:.2e} (tolerance {tolerance:.1e}): {'ok' if diff <= tolerance else 'TOO LARGE'}")
    return diff <= tolerance


def _outputs(args) -> tuple[Path, Path | None]:
    """``--out`` and ``--save-pretrained``, checked before any work."""
    out = Path(args.out)
    if out.suffix != ".pt2":
        raise CLIError(f"--out {args.out}: the file name must end in .pt2 (torch.export's archive format)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.save_pretrained:
        return out, None
    save_dir = Path(args.save_pretrained)
    if save_dir.resolve() == existing_dir(args.model_dir, "transformers model").resolve():
        raise CLIError(f"--save-pretrained {args.save_pretrained}: that is MODEL_DIR; choose another directory")
    return out, save_dir


def _adapter_dir(adapter_dir: str, adapter_name: str) -> str:
    """PEFT saves adapter NAME of a model with several in ``ADAPTER_DIR/NAME``."""
    nested = Path(adapter_dir) / adapter_name
    return str(nested) if (nested / CONFIG_NAME).is_file() else adapter_dir


def _refuse_tied(model: torch.nn.Module, targets) -> None:
    """A checkpoint ties weights by name (e.g. lm_head to the input embeddings): it cannot hold a folded copy."""
    state = model.state_dict()
    shared = Counter(t.data_ptr() for t in state.values())
    tied = [t.name for t in targets if shared[state[f"{t.name}.weight"].data_ptr()] > 1]
    if tied:
        raise CLIError(f"--save-pretrained: the adapter rotates {tied[0]!r}, whose weight the model ties to another "
                       "(e.g. tied input/output embeddings), so a checkpoint cannot hold the folded copy; use the .pt2")


def _save_pretrained(model: torch.nn.Module, folded: torch.fx.GraphModule, model_dir: Path, save_dir: Path) -> None:
    """``model``'s checkpoint with the folded module's tensors (same names), plus MODEL_DIR's non-weight files."""
    folded_state = folded.state_dict()
    model.save_pretrained(save_dir, state_dict={k: folded_state.get(k, v) for k, v in model.state_dict().items()})
    written = {p.name for p in save_dir.iterdir()}
    for path in model_dir.iterdir():
        if path.is_file() and path.name not in written and not path.name.endswith(WEIGHT_FILES):
            shutil.copy2(path, save_dir / path.name)
