"""Run X-LoRA on one prompt and show how its classifier mixes the experts: load a local transformers model, compile
X-LoRA with the PEFT LoRA expert directories, run the prompt once, and print each token's expert scalings (what
get_latest_scalings returns) and the most likely next token.

--classifier FILE loads trained classifier weights: save_classifier's file, or a PEFT X-LoRA checkpoint
(adapter_model.safetensors or its directory). Without it the classifier keeps its random initialization (seed 0,
so runs repeat): untrained, its scalings show the mechanics, not a learned routing.

The classifier gives every token one scaling per expert for all adapted layers; with --layerwise each layer gets
its own, and the table shows their mean over the layers. With --top-k K the table shows what the layers apply:
each token's K largest scalings, the others 0 (averaged over the layers too with --layerwise).

--plot FILE.png (or .svg, .pdf) also draws the scalings as a heatmap, tokens × experts (with --layerwise: one per
layer, on one colour scale); it needs matplotlib: pip install "fx-adapters[plot]"."""

from __future__ import annotations

import torch

from ..figures import FIGURE_SUFFIXES, check_path, require_matplotlib
from ._models import bad_input, existing_dir, load_model, vocab_size
from ._ui import CLIError, first_line

HELP = "run X-LoRA on a prompt: a table of each token's expert scalings, and the next token"
UNTRAINED_SEED = 0  # the untrained classifier's initialization, the same on every run
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # tokenizer.save_pretrained writes both


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the base model: a local transformers directory")
    parser.add_argument("--expert", action="append", required=True, metavar="NAME=DIR",
                        help="an expert: a PEFT LoRA adapter directory and the name its column gets (repeat it)")
    parser.add_argument("--classifier", metavar="FILE", help="trained classifier weights (safetensors; default: "
                        "the untrained initialization)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", metavar="IDS", help="the prompt as comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt as text (needs a tokenizer in MODEL_DIR)")
    parser.add_argument("--top-k", type=int, metavar="K", help="the layers keep each token's K largest scalings")
    parser.add_argument("--layerwise", action="store_true", help="a scaling per layer (PEFT's layerwise_scalings)")
    parser.add_argument("--softmax-temperature", type=float, default=1.0, metavar="T",
                        help="the classifier's softmax temperature (default 1)")
    parser.add_argument("--plot", metavar="FILE", help="also draw the scalings as a heatmap (.png, .svg or .pdf; "
                        'needs matplotlib: pip install "fx-adapters[plot]")')


def run(args, ui) -> int:
    import fx_adapters as fxa

    from ..xlora.modules import route_scalings
    from ..xlora.plot import plot_scalings

    if args.plot:  # before any work: a missing matplotlib or a bad path is said at once, and nothing is written
        require_matplotlib("--plot")
        with bad_input():
            plot = check_path(args.plot, FIGURE_SUFFIXES, "--plot")
    with bad_input():  # the experts' configs (not a LoRA adapter, DoRA, ...), --top-k, --softmax-temperature
        config = fxa.XLoraConfig(adapters=_experts(args.expert), layerwise_scalings=args.layerwise,
                                 top_k_lora=args.top_k, softmax_temperature=args.softmax_temperature)
    with ui.steps(3 + bool(args.classifier)) as step:
        step("loading the model")
        tokenizer = _tokenizer(args.model_dir, needed=args.prompt is not None)
        ids = tokenizer(args.prompt)["input_ids"] if args.prompt is not None else _prompt_ids(args.prompt_ids)
        model = load_model(args.model_dir)
        _check_ids(ids, vocab_size(model))
        step("capturing + experts")
        torch.manual_seed(UNTRAINED_SEED)
        with bad_input():  # an expert that does not fit the model: the message names it and the module
            xm = fxa.compile_with_xlora(model, config)
        if args.classifier:
            step("loading the classifier")
            with bad_input():  # not safetensors, or tensors that do not fit: the message says which
                xm.load_classifier(args.classifier)
        step("running the prompt")
        with torch.no_grad():
            logits = xm(input_ids=torch.tensor([ids])).logits
        scalings = xm.get_latest_scalings()[0]  # (seq, layers, experts)
    if args.top_k is not None:
        scalings = route_scalings(scalings, args.top_k, False)
    per_token = scalings.mean(dim=1) if args.layerwise else scalings[:, 0]

    experts = ", ".join(f"{name} ({path})" for name, path in config.adapters.items())
    ui.print(f"X-LoRA on {type(model).__name__} from {args.model_dir}: {len(xm.experts)} experts ({experts}) on "
             f"{len(xm.targets)} layers")
    ui.print(f"Classifier: {args.classifier}" if args.classifier else
             f"Classifier: untrained (its random initialization, seed {UNTRAINED_SEED}; pass --classifier FILE for "
             "trained weights)")
    layers = (f"averaged over the {len(xm.targets)} layers (--layerwise: each layer has its own)" if args.layerwise
              else f"the same for all {len(xm.targets)} layers")
    kept = "" if args.top_k is None else f"; each token's {args.top_k} largest kept, the others 0 (--top-k)"
    ui.print(f"Expert scalings per token, {layers}{kept}:")
    ui.table(["token", "id", *([] if tokenizer is None else ["text"]), *xm.experts],
             [(i, token, *_text(tokenizer, token), *(f"{v:.4f}" for v in row.tolist()))
              for i, (token, row) in enumerate(zip(ids, per_token))])
    next_id = int(logits[0, -1].argmax())
    ui.print(" ".join(["Next token (argmax of the last position's logits):", str(next_id), *_text(tokenizer, next_id)]))
    if args.plot:
        labels = [(_text(tokenizer, token) or [str(token)])[0] for token in ids]
        title = (f"X-LoRA expert scalings per token, {type(model).__name__} from {args.model_dir}"
                 + ("" if args.top_k is None else f" (top {args.top_k} kept)"))
        plot_scalings(xm, labels, plot, layerwise=args.layerwise, scalings=scalings[None], title=title)
        ui.print(f"Heatmap of the scalings written to {plot}")
    return 0


def _experts(specs: list[str]) -> dict[str, str]:
    """``--expert NAME=DIR`` options → ``{NAME: DIR}``."""
    experts = {}
    for spec in specs:
        name, _, directory = spec.partition("=")
        if not name or not directory:
            raise CLIError(f"--expert {spec}: expected NAME=DIR, e.g. --expert math=./math-lora")
        if name in experts:
            raise CLIError(f"--expert {spec}: the name {name!r} is already taken by {experts[name]}")
        experts[name] = directory
    return experts


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise CLIError(f"--prompt-ids {text}: expected comma-separated token ids, e.g. 1,2,3") from None


def _check_ids(ids: list[int], vocab: int) -> None:
    if not ids:
        raise CLIError("the prompt has no tokens")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise CLIError(f"token id {bad[0]} is not in the model's vocabulary (ids 0 to {vocab - 1})")


def _tokenizer(model_dir: str, needed: bool):
    """MODEL_DIR's tokenizer, or None when it has none (bad input when ``needed``: ``--prompt``)."""
    from transformers import AutoTokenizer

    directory = existing_dir(model_dir, "transformers model")
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        try:
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, ... for files it cannot load
            if needed:
                raise CLIError(f"--prompt: cannot load the tokenizer in {model_dir} ({first_line(e)})") from e
            return None
    if needed:
        raise CLIError(f"--prompt needs a tokenizer in MODEL_DIR and {model_dir} has none "
                       f"({' or '.join(TOKENIZER_FILES)}); pass token ids with --prompt-ids")
    return None


def _text(tokenizer, token: int) -> list[str]:
    """The token's text, quoted (a list: empty without a tokenizer)."""
    return [] if tokenizer is None else [repr(tokenizer.decode([token]))]
