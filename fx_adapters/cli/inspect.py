"""Capture a local transformers model and list its linear-like layers: module path, kind, in/out features,
and whether an adapter with the given target_modules / exclude_modules would adapt it (and if not, why).
Without --target-modules, PEFT's default targets for the model type are used."""

from __future__ import annotations

from ._models import bad_input, load_model

HELP = "list a model's linear-like layers and which ones an adapter would target"


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a local transformers model directory")
    parser.add_argument("--target-modules", nargs="+", metavar="NAME",
                        help="module names or path suffixes (as PEFT), or all-linear (default: PEFT's for the model)")
    parser.add_argument("--exclude", nargs="+", metavar="NAME", help="module names or path suffixes never adapted")
    quantized = parser.add_mutually_exclusive_group()
    quantized.add_argument("--load-in-8bit", action="store_true", help="load with bitsandbytes 8-bit layers")
    quantized.add_argument("--load-in-4bit", action="store_true", help="load with bitsandbytes 4-bit layers")


def run(args, ui) -> int:
    from ..graph.capture import capture
    from ..graph.match import DEFAULT_TARGETS, FindLinearLayers, output_head, select_targets

    quantization = "8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None
    with ui.steps(2) as step:
        step("loading the model")
        model = load_model(args.model_dir, quantization=quantization)
        step("capturing its graph")
        with bad_input():
            captured = capture(model)
        finder = FindLinearLayers({name: type(m) for name, m in model.named_modules()})
        finder(captured.graph_module)
    model_type = model.config.model_type
    targets = "all-linear" if args.target_modules == ["all-linear"] else args.target_modules
    with bad_input():  # nothing matched, or no default targets for the model type: the message says what to pass
        report = select_targets(finder.layers, targets, args.exclude, model_type=model_type,
                                output_head=output_head(model))
    ui.table(["module", "kind", "in", "out", "matched", "why not"],
             [(t.name, t.kind, t.in_features, t.out_features, "no" if t.name in report.skipped else "yes",
               report.skipped.get(t.name, "")) for t in finder.layers])
    rule = (f"target_modules={targets!r}" if targets else
            f"PEFT's default target_modules for {model_type} ({DEFAULT_TARGETS[model_type]!r})")
    excluded = f", exclude_modules={args.exclude!r}" if args.exclude else ""
    ui.print(f"{len(report.targets)} of {len(finder.layers)} linear-like layers of {type(model).__name__} match "
             f"{rule}{excluded}.")
    return 0
