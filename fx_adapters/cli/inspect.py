"""Capture a local transformers model and list its linear-like layers: module path, kind, in/out features,
and whether an adapter with the given target_modules / exclude_modules would adapt it (and if not, why).
Without --target-modules, PEFT's default targets for the model type are used.

--graph FILE.svg (or .png, .pdf, .dot) also draws one layer's neighbourhood in the graph before and after the RoAd
rewrite (the linear, the rotation node, the table it reads, the slot index input): the first matched layer, or
--layer NAME. It needs pydot (pip install "fx-adapters[graph]") and, except for .dot, graphviz's dot program
(Debian / Ubuntu: apt-get install graphviz)."""

from __future__ import annotations

from ..figures import check_path, require_pydot
from ..graph.draw import DRAWING_SUFFIXES
from ._models import bad_input, load_model
from ._ui import CLIError

HELP = "list a model's linear-like layers and which ones an adapter would target"


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a local transformers model directory")
    parser.add_argument("--target-modules", nargs="+", metavar="NAME",
                        help="module names or path suffixes (as PEFT), or all-linear (default: PEFT's for the model)")
    parser.add_argument("--exclude", nargs="+", metavar="NAME", help="module names or path suffixes never adapted")
    parser.add_argument("--graph", metavar="FILE", help="draw a layer before and after the RoAd rewrite (.svg, .png, "
                        '.pdf or .dot; needs pydot: pip install "fx-adapters[graph]", and graphviz except for .dot)')
    parser.add_argument("--layer", metavar="NAME", help="the layer --graph draws (default: the first matched)")
    quantized = parser.add_mutually_exclusive_group()
    quantized.add_argument("--load-in-8bit", action="store_true", help="load with bitsandbytes 8-bit layers")
    quantized.add_argument("--load-in-4bit", action="store_true", help="load with bitsandbytes 4-bit layers")


def run(args, ui) -> int:
    from ..graph.capture import capture
    from ..graph.match import DEFAULT_TARGETS, FindLinearLayers, output_head, select_targets

    if args.layer and not args.graph:
        raise CLIError("--layer names the layer --graph draws; pass --graph FILE.svg too")
    if args.graph:  # before any work: a missing pydot / graphviz or a bad path is said at once, nothing is written
        with bad_input():
            graph_file = check_path(args.graph, DRAWING_SUFFIXES, "--graph")
        require_pydot("--graph", binary=graph_file.suffix.lower() != ".dot")
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
    drawn = _layer(model, finder.layers, args.layer or _first(report.targets)) if args.graph else None
    ui.table(["module", "kind", "in", "out", "matched", "why not"],
             [(t.name, t.kind, t.in_features, t.out_features, "no" if t.name in report.skipped else "yes",
               report.skipped.get(t.name, "")) for t in finder.layers])
    rule = (f"target_modules={targets!r}" if targets else
            f"PEFT's default target_modules for {model_type} ({DEFAULT_TARGETS[model_type]!r})")
    excluded = f", exclude_modules={args.exclude!r}" if args.exclude else ""
    ui.print(f"{len(report.targets)} of {len(finder.layers)} linear-like layers of {type(model).__name__} match "
             f"{rule}{excluded}.")
    if drawn is not None:
        _draw(model, captured, finder.layers, drawn, graph_file)
        ui.print(f"{drawn.name} before and after the RoAd rewrite: drawn in {graph_file}")
    return 0


def _first(targets) -> str:
    if not targets:
        raise CLIError("--graph: no layer matched; pass --layer NAME (a module path inspect lists)")
    return targets[0].name


def _layer(model, layers, name: str):
    """The linear-like layer ``--graph`` draws (bad input when it cannot be drawn)."""
    layer = next((t for t in layers if t.name == name), None)
    if layer is None:
        raise CLIError(f"--layer {name}: not a linear-like layer of {type(model).__name__}; pass a module path "
                       "from the table inspect prints without --graph")
    if layer.out_features % 2:
        raise CLIError(f"--layer {name}: RoAd rotates pairs of outputs and this layer has {layer.out_features}; pick "
                       "a layer with an even number of outputs")
    return layer


def _draw(model, captured, layers, layer, path) -> None:
    """Rewrite ``captured`` with a RoAd adapter on ``layer`` alone and draw the layer before and after."""
    import math

    import fx_adapters as fxa

    from ..graph.match import output_head

    name = layer.name
    am = fxa.AdaptedModule(captured, layers, model_type=model.config.model_type, output_head=output_head(model))
    with bad_input(f"--layer {name}: "):
        am.add_adapter("default", fxa.RoadConfig(group_size=math.gcd(layer.out_features, 64), target_modules=[name]))
    am.draw(path, layer=name)
