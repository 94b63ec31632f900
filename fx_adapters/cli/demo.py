"""Compile RoAd on a tiny Llama built in the package (no downloads), show the matched layers, run a mixed
batch, fold, export a .pt2, reload it and check that the outputs match. Under 30 s on a laptop CPU."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..road.config import BASE

HELP = "the five-minute tour on a tiny built-in Llama (no downloads)"
TOLERANCE = 1e-5  # fp32
VOCAB = 256


def add_arguments(parser) -> None:
    parser.add_argument("--out", metavar="DIR", help="write demo.pt2 here (default: a temporary directory)")


def run(args, ui) -> int:
    return tour(ui, args.out)


def tiny_llama():
    """A small random Llama (2 layers, hidden 64) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def tour(ui, out_dir: str | None = None) -> int:
    """The tour; exit status 0 when the mixed batch and the reloaded export match, else 1."""
    import fx_adapters as fxa

    from ._models import random_batch

    start = time.perf_counter()
    with ui.steps(5) as step, tempfile.TemporaryDirectory() as tmp:
        step("building a tiny Llama")
        model = tiny_llama()
        step("capturing, adding RoAd")
        compile_start = time.perf_counter()
        am = fxa.compile_with_road(model, fxa.RoadConfig(variant="road_1", group_size=16, init_weights=False,
                                                         target_modules="all-linear"), adapter_name="math")
        am.add_adapter("code", fxa.RoadConfig(variant="road_4", group_size=8, init_weights=False,
                                              target_modules=["q_proj", "v_proj"]))
        ui.print(f"Compiled two RoAd adapters into a tiny random {type(model).__name__} in "
                 f"{time.perf_counter() - compile_start:.1f} s: 'math' (road_1, all linear layers), "
                 "'code' (road_4, q_proj and v_proj)")
        ui.table(["module", "kind", "in", "out", "adapters"],
                 [(t.name, t.kind, t.in_features, t.out_features,
                   ", ".join(a for a in am.adapters if t in am.adapter_targets(a))) for t in am.targets])

        step("running a mixed batch")
        mixed_ok = _mixed_batch(am, ui)

        step("folding, exporting")
        am.set_adapter("math")
        path = Path(out_dir or tmp) / "demo.pt2"
        path.parent.mkdir(parents=True, exist_ok=True)
        fxa.export(am.fold(), path)
        where = "" if out_dir else " (a temporary directory, removed at exit; --out DIR keeps it)"
        ui.print(f"Folded 'math' into the weights and exported {path}{where}: {path.stat().st_size / 1e6:.1f} MB")

        step("reloading the .pt2")
        batch = random_batch(VOCAB)
        with torch.no_grad():
            loaded = torch.export.load(path).module()(**batch)["logits"]
            expected = am(**batch).logits
        diff = (loaded - expected).abs().max().item()
        export_ok = diff <= TOLERANCE
        ui.print(f"Reloaded it with torch.export.load (no fx_adapters needed): max abs diff to the compiled model "
                 f"{diff:.2e}: {'outputs match' if export_ok else 'OUTPUTS DIFFER'}")
    ui.print(f"Done in {time.perf_counter() - start:.1f} s.")
    return 0 if mixed_ok and export_ok else 1


def _mixed_batch(am, ui) -> bool:
    """One adapter per sample in one call, compared with each sample run alone."""
    names = ["math", "code", BASE]
    ids = torch.randint(0, VOCAB, (len(names), 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = am(input_ids=ids, adapter_names=names).logits
        worst = 0.0
        for i, name in enumerate(names):
            if name == BASE:
                with am.disable_adapters():
                    alone = am(input_ids=ids[i:i + 1]).logits
            else:
                am.set_adapter(name)
                alone = am(input_ids=ids[i:i + 1]).logits
            worst = max(worst, (mixed[i:i + 1] - alone).abs().max().item())
    ui.print(f"Mixed batch {names}, one graph call: max abs diff to one-adapter runs {worst:.2e}")
    return worst <= TOLERANCE

