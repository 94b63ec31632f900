"""The ``fx-adapters`` command line, run in subprocesses on tiny models saved to a temporary directory.

Each command line runs once per session (``cli`` caches by arguments; ``test_readme.py`` shares the cache). The
module's fixture starts them all, a few processes at a time, so their start-up (~3 s each) and work overlap.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, build_hf, eager_road_forward, peft_road, road_params_of, token_batch
from peft import RoadConfig
from safetensors.torch import load_file, save_file
from xlora_helpers import EXPERT_SPECS, lora_expert

HAS_BNB = find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes")
WORKERS = min(4, max(2, os.cpu_count() or 2))  # the commands run this many at a time
Q_PROJ = "model.layers.0.self_attn.q_proj"
UP_PROJ = "model.layers.1.mlp.up_proj.weight"  # missing from incomplete-llama's checkpoint
BATCH = token_batch(3, 7, left_pad=2)  # (input_ids, attention_mask) the outputs are compared on
KEYWORDS = dict(zip(("input_ids", "attention_mask"), BATCH))  # the same, as a .pt2 takes them

DEMO = ("demo",)
INSPECT = ("inspect", "my-llama", "--target-modules", "all-linear", "--exclude", "down_proj")
INSPECT_4BIT = ("inspect", "my-llama", "--load-in-4bit", "--quiet")
INSPECT_8BIT = ("inspect", "my-llama", "--load-in-8bit", "--quiet")
MERGE = ("merge", "my-llama", "my-road-adapter", "--out", "merged.pt2", "--save-pretrained", "merged-llama")
MERGE_OTHER = ("merge", "my-llama", "my-road-adapter", "--adapter-name", "other", "--dtype", "bfloat16",
               "--out", "other.pt2", "--quiet")
CHECK = ("check", "my-llama", "my-road-adapter", "--examples", "10")
CHECK_UNPREFIXED = ("check", "my-llama", "unprefixed-adapter", "--examples", "5", "--quiet")
XLORA_EXPERTS = {"math": "math-lora", "code": "code-lora"}  # expert name -> its PEFT LoRA directory
EXPERT_ARGS = tuple(arg for name, path in XLORA_EXPERTS.items() for arg in ("--expert", f"{name}={path}"))
CLASSIFIER = "xlora-classifier.safetensors"
PROMPT, PROMPT_IDS = "2 + 2 =", (5, 17, 42, 9)
XLORA = ("xlora", "my-llama", *EXPERT_ARGS, "--classifier", CLASSIFIER, "--prompt", PROMPT)  # the README's
XLORA_LAYERWISE = ("xlora", "my-llama", *EXPERT_ARGS, "--prompt-ids", ",".join(map(str, PROMPT_IDS)), "--layerwise",
                   "--top-k", "1", "--softmax-temperature", "0.5", "--quiet")  # untrained classifier
ERRORS = {  # command line -> the one line it prints
    "missing directory": (("merge", "no-such-model", "my-road-adapter", "--out", "x.pt2"),
                          "no-such-model: no such directory (expected a local transformers model directory)"),
    "not a model": (("inspect", "my-road-adapter"),
                    "my-road-adapter: not a transformers model directory (no config.json)"),
    "adapter that does not fit": (("merge", "my-llama", "opt-adapter", "--out", "x.pt2"),
                                  "load_adapter(opt-adapter): the checkpoint does not fit this model: 8 unexpected "
                                  "key(s) ['base_model.model.model.decoder.layers.0"),
    "nothing matched": (("inspect", "my-llama", "--target-modules", "qkv"),
                        "no linear-like layer matched target_modules=['qkv']; candidates are, e.g.: "
                        "model.layers.0.self_attn.q_proj"),
    "tied weight": (("merge", "my-gpt2", "gpt2-head-adapter", "--out", "x.pt2", "--save-pretrained", "gpt2-merged"),
                    "--save-pretrained: the adapter rotates 'lm_head', whose weight the model ties to another"),
    "not a .pt2 file": (("merge", "my-llama", "my-road-adapter", "--out", "merged"),
                        "--out merged: the file name must end in .pt2 (torch.export's archive format)"),
    "overwriting the model": (("merge", "my-llama", "my-road-adapter", "--out", "x.pt2", "--save-pretrained",
                               "my-llama"), "--save-pretrained my-llama: that is MODEL_DIR; choose another directory"),
    "bad --expert": (("xlora", "my-llama", "--expert", "math-lora", "--prompt-ids", "1"),
                     "--expert math-lora: expected NAME=DIR, e.g. --expert math=./math-lora"),
    "missing expert": (("xlora", "my-llama", "--expert", "math=no-such-lora", "--prompt-ids", "1"),
                       "X-LoRA expert 'math': no-such-lora is not a directory; expected a PEFT LoRA adapter directory"),
    "expert not LoRA": (("xlora", "my-llama", "--expert", "road=my-road-adapter", "--prompt-ids", "1"),
                        "X-LoRA expert 'road' (my-road-adapter): peft_type is 'ROAD'; an X-LoRA expert must be a LoRA "
                        "adapter"),
    "classifier that does not fit": (("xlora", "my-llama", *EXPERT_ARGS, "--layerwise", "--classifier", CLASSIFIER,
                                      "--prompt-ids", "1"),
                                     f"load_classifier({CLASSIFIER}): it does not fit this classifier (2 experts, "
                                     "11 layers, xlora_depth=1, layerwise_scalings=True)"),
    "prompt without tokenizer": (("xlora", "my-gpt2", "--expert", "math=math-lora", "--prompt", "hi"),
                                 "--prompt needs a tokenizer in MODEL_DIR and my-gpt2 has none"),
}
DEBUG = ("inspect", "my-road-adapter", "--debug")
INSPECT_INCOMPLETE = ("inspect", "incomplete-llama", "--quiet")
# the console script pip installs for this interpreter (its scripts directory first), else the first on PATH
SCRIPT = shutil.which("fx-adapters", path=os.pathsep.join((sysconfig.get_path("scripts"), os.environ.get("PATH", ""))))
COMMANDS = [MERGE, MERGE_OTHER, CHECK, CHECK_UNPREFIXED, XLORA, XLORA_LAYERWISE,  # longest first
            *([INSPECT_4BIT, INSPECT_8BIT] if HAS_BNB else []), INSPECT,
            INSPECT_INCOMPLETE, *(argv for argv, _ in ERRORS.values()), DEBUG]

_pool = ThreadPoolExecutor(WORKERS)
_runs: dict[tuple[str, ...], Future] = {}


def workspace(tmp_path_factory, start_first: tuple[tuple[str, ...], ...] = ()) -> Path:
    """The directory the commands run in (built once per session): tiny models, PEFT RoAd adapters, LoRA experts.

    ``start_first``: command lines that need none of these files, started before they are built.
    """
    root = tmp_path_factory.getbasetemp() / "cli"
    if root.exists():
        return root
    root.mkdir()
    for argv in start_first:
        cli(root, *argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on GPT-2's tied lm_head
        llama = build_hf("llama")
        llama.save_pretrained(root / "my-llama")
        char_tokenizer().save_pretrained(root / "my-llama")  # merge copies it over, xlora --prompt uses it
        shutil.copytree(root / "my-llama", root / "incomplete-llama")
        weights = root / "incomplete-llama" / "model.safetensors"
        save_file({k: v for k, v in load_file(weights).items() if k != UP_PROJ}, weights, metadata={"format": "pt"})
        peft_model = peft_road(llama, group_size=8, target_modules=["q_proj", "v_proj"], init_weights=False)
        peft_model.add_adapter("other", RoadConfig(variant="road_2", group_size=4, init_weights=False,
                                                   target_modules=["o_proj", "down_proj"]))
        peft_model.save_pretrained(root / "my-road-adapter")  # "other" goes to my-road-adapter/other
        # PEFT ignores tensors without its `base_model.model.` prefix (warning of missing keys); fx_adapters reads them
        shutil.copytree(root / "my-road-adapter", root / "unprefixed-adapter")
        weights = root / "unprefixed-adapter" / "adapter_model.safetensors"
        save_file({k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}, weights)
        opt_adapter = peft_road(build_hf("opt"), group_size=8, target_modules=["q_proj", "v_proj"])
        opt_adapter.save_pretrained(root / "opt-adapter")
        gpt2 = build_hf("gpt2")  # ties lm_head to the input embeddings
        gpt2.save_pretrained(root / "my-gpt2")
        peft_road(gpt2, group_size=8, target_modules=["lm_head"]).save_pretrained(  # without a copy of lm_head
            root / "gpt2-head-adapter", save_embedding_layers=False)
        for seed, (path, spec) in enumerate(zip(XLORA_EXPERTS.values(), (EXPERT_SPECS[0], EXPERT_SPECS[2]))):
            lora_expert(llama, seed, **spec).save_pretrained(root / path)  # the second one adapts the embedding too
    write_classifier(root / CLASSIFIER, llama.config.hidden_size)
    return root


def char_tokenizer():
    """A transformers tokenizer with one token per printable ASCII character (ids 2-96; 0 pads, 1 is unknown)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")


def write_classifier(path: Path, hidden_size: int) -> None:
    """An X-LoRA classifier checkpoint for the two experts, not layerwise (random weights stand for trained ones)."""
    from fx_adapters.xlora.modules import XLoraClassifier

    torch.manual_seed(1)  # not the CLI's seed 0: these weights differ from the untrained classifier's
    save_file(XLoraClassifier(hidden_size, len(XLORA_EXPERTS), n_layers=1).state_dict(), path)


STEP_COUNT = re.compile(r"^[\w ,.-]+ \(\d+\)$")  # `UI.bar`'s line: "description (total)"


def cli(root: Path, *args: str, script: bool = False) -> Future:
    """``python -m fx_adapters *args`` in ``root`` (``script``: the console script ``SCRIPT *args``), started once per
    session; the future of its CompletedProcess."""
    key = (SCRIPT,) + args if script else args
    if key not in _runs:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread each, several processes at once
        program = [SCRIPT] if script else [sys.executable, "-m", "fx_adapters"]
        _runs[key] = _pool.submit(_run, root, [*program, *args], env)
    return _runs[key]


def _run(root: Path, argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """Decoded by hand: text mode would turn the progress bars' carriage returns into newlines."""
    result = subprocess.run(argv, cwd=root, capture_output=True, env=env)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def visible_lines(text: str) -> list[str]:
    """What a terminal shows, but the step lines printed in place of progress bars (stderr is a pipe here): the text
    after each line's last carriage return, non-blank."""
    shown = (line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return [line for line in shown if line.strip() and not line.endswith(" ...") and not STEP_COUNT.search(line)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = workspace(tmp_path_factory, start_first=(DEMO,))
    for argv in COMMANDS:
        cli(root, *argv)
    if SCRIPT:
        cli(root, *INSPECT, script=True)
    yield root
    for args in [args for args, run in _runs.items() if run.cancel()]:  # not started: no selected test needs it
        del _runs[args]


def ok(root: Path, *args: str) -> str:
    """stdout of a command that must succeed."""
    result = cli(root, *args).result()
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@functools.cache
def peft_logits(root: Path, adapter: str = "my-road-adapter", dtype=torch.float32) -> torch.Tensor:
    """The oracle on ``BATCH``: PEFT's model with the adapter directory loaded on the saved base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "my-llama", dtype=dtype)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, root / adapter).eval()(*BATCH).logits


# --------------------------------------------------------------------------------------------------- demo


def test_demo_tour_prints_the_matched_layers_and_passes_its_checks(ws):
    out = ok(ws, *DEMO)
    assert "model.layers.1.self_attn.v_proj  linear   64   32  math, code" in out
    assert "Mixed batch ['math', 'code', '__base__'], one graph call: max abs diff to one-adapter runs" in out
    assert "outputs match" in out


def test_demo_exports_to_a_temporary_directory_it_removes(ws):
    out = ok(ws, *DEMO)
    path = next(word for word in out.split() if word.endswith(".pt2"))
    assert "(a temporary directory, removed at exit" in out and not Path(path).exists()


def test_demo_out_keeps_a_pt2_that_computes_the_math_adapter_eagerly(tmp_path, monkeypatch):
    """In this process: the tour's work is the same as in a subprocess, without the start-up. The oracle is the
    demo's tiny Llama run eagerly with PEFT's rotation in forward hooks, from the 'math' adapter's parameters."""
    import fx_adapters as fxa
    from fx_adapters.cli._ui import UI
    from fx_adapters.cli.demo import tiny_llama, tour

    compiled, compile_with_road = [], fxa.compile_with_road

    def compile_and_keep(*args, **kwargs):
        compiled.append(compile_with_road(*args, **kwargs))
        return compiled[-1]

    monkeypatch.setattr(fxa, "compile_with_road", compile_and_keep)
    assert tour(UI(quiet=True), str(tmp_path / "out")) == 0
    (am,) = compiled  # its adapters' parameters are the ones the tour drew
    with torch.no_grad():
        got = torch.export.load(tmp_path / "out" / "demo.pt2").module()(**KEYWORDS)["logits"]
        want = eager_road_forward(tiny_llama(), lambda model, _: model(*BATCH).logits,
                                  {"math": (am.peft_config["math"], road_params_of(am, "math"))}, ["math"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_without_a_terminal_steps_are_printed_once_as_lines_unless_quiet(ws):
    stderr = cli(ws, *MERGE).result().stderr
    assert "\r" not in stderr and "steps [" not in stderr  # no redrawn bars in a log
    steps = [line for line in stderr.splitlines() if line.endswith(" ...")]
    assert steps and len(steps) == len(set(steps))
    assert cli(ws, *MERGE_OTHER).result().stderr == ""


@pytest.mark.parametrize("argv", [DEMO, INSPECT, pytest.param(INSPECT_4BIT, marks=needs_bnb),
                                  pytest.param(INSPECT_8BIT, marks=needs_bnb), MERGE, MERGE_OTHER,
                                  CHECK, CHECK_UNPREFIXED], ids=" ".join)
def test_runs_print_no_third_party_noise(ws, argv):
    """Nothing from transformers, torch, PEFT or bitsandbytes (its `kernels` notice); bars clear themselves."""
    assert visible_lines(cli(ws, *argv).result().stderr) == []


@pytest.mark.skipif(SCRIPT is None, reason="no fx-adapters console script on PATH (pip install -e . installs it)")
def test_console_script_runs_what_python_m_fx_adapters_runs(ws):
    result = cli(ws, *INSPECT, script=True).result()
    assert result.returncode == 0, result.stderr
    assert result.stdout == ok(ws, *INSPECT)


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_lists_every_linear_layer_and_why_it_is_not_matched(ws):
    rows = {line.split()[0]: line.split(maxsplit=5)[1:] for line in ok(ws, *INSPECT).splitlines()[1:-1]}
    assert len(rows) == 15
    assert rows[Q_PROJ] == ["linear", "64", "64", "yes"]
    assert rows["model.layers.1.mlp.down_proj"] == ["linear", "128", "64", "no", "excluded by exclude_modules"]
    assert rows["lm_head"] == ["linear", "64", "128", "no", "output head (never targeted by 'all-linear')"]


@needs_bnb
def test_inspect_loads_4bit_layers_with_peft_default_targets(ws):
    out = ok(ws, *INSPECT_4BIT)
    assert f"{Q_PROJ}  bnb4" in out
    assert "4 of 15 linear-like layers of LlamaForCausalLM match PEFT's default target_modules for llama" in out


@needs_bnb
def test_inspect_loads_8bit_layers_with_peft_default_targets(ws):
    out = ok(ws, *INSPECT_8BIT)
    assert f"{Q_PROJ}  bnb8" in out
    assert "4 of 15 linear-like layers of LlamaForCausalLM match PEFT's default target_modules for llama" in out


def test_weights_missing_from_the_checkpoint_are_one_warning_line(ws):
    result = cli(ws, *INSPECT_INCOMPLETE).result()
    assert result.returncode == 0
    assert result.stderr == (f"fx-adapters: warning: incomplete-llama: 1 weight(s) of LlamaForCausalLM are not in the "
                             f"checkpoint and were initialized randomly, e.g. {UP_PROJ}\n")


# -------------------------------------------------------------------------------------------------- merge


def test_merge_verifies_the_export_against_the_unmerged_model(ws):
    assert "Export vs the unmerged model on a random (2, 12) batch: max abs diff" in ok(ws, *MERGE)


def test_merged_pt2_computes_what_peft_computes(ws):
    ok(ws, *MERGE)
    got = torch.export.load(ws / "merged.pt2").module()(**KEYWORDS)["logits"]
    torch.testing.assert_close(got, peft_logits(ws), atol=1e-5, rtol=0)


def test_saved_checkpoint_loads_with_from_pretrained_and_computes_what_peft_computes(ws):
    from transformers import AutoModelForCausalLM

    ok(ws, *MERGE)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(ws / "merged-llama")(*BATCH).logits
    torch.testing.assert_close(got, peft_logits(ws), atol=1e-5, rtol=0)
    assert (ws / "merged-llama" / "tokenizer_config.json").is_file()


def test_merge_adapter_name_picks_the_adapter_peft_saved_under_that_name(ws):
    ok(ws, *MERGE_OTHER)
    got = torch.export.load(ws / "other.pt2").module()(**KEYWORDS)["logits"].float()
    want = peft_logits(ws, "my-road-adapter/other", torch.bfloat16).float()
    exact = peft_logits(ws, "my-road-adapter/other")  # PEFT in float32
    # bfloat16 rounds: within two bfloat16 steps of logits below 1 (1e-2 of the adapter's effect) of PEFT in
    # bfloat16, and no farther from PEFT in float32 than PEFT's bfloat16 run is
    torch.testing.assert_close(got, want, atol=8e-3, rtol=0)
    assert (got - exact).abs().max() <= 1.25 * (want - exact).abs().max()
    assert (got - peft_logits(ws)).abs().max() > 0.1  # not the default adapter


def test_merge_dtype_sets_the_exported_weights_dtype(ws):
    ok(ws, *MERGE_OTHER)
    program = torch.export.load(ws / "other.pt2")
    assert {p.dtype for p in program.state_dict.values() if p.is_floating_point()} == {torch.bfloat16}


# -------------------------------------------------------------------------------------------------- check


def test_check_passes_and_tabulates_the_cases(ws):
    lines = ok(ws, *CHECK).splitlines()
    assert lines[1].split() == ["case", "batch", "seq", "padding", "max", "abs", "err", "result"]
    assert [row.split()[-1] for row in lines[2:-1]] == ["ok"] * 10
    assert lines[-1] == "All 10 cases equivalent."


def test_check_names_the_first_diverging_layer_when_peft_reads_the_adapter_differently(ws):
    result = cli(ws, *CHECK_UNPREFIXED).result()
    assert result.returncode == 1
    assert "PEFT warned while loading the adapter: Found missing adapter keys" in result.stdout
    assert f"first diverging module: '{Q_PROJ}' (nn.Linear)" in result.stdout


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_prints_one_line_and_exits_2(ws, case):
    argv, message = ERRORS[case]
    result = cli(ws, *argv).result()
    assert result.returncode == 2
    (line,) = visible_lines(result.stderr)
    assert line.startswith(f"fx-adapters: error: {message}")


def test_debug_shows_the_traceback(ws):
    result = cli(ws, *DEBUG).result()
    assert "Traceback (most recent call last)" in result.stderr
    assert "CLIError: my-road-adapter: not a transformers model directory" in result.stderr


# -------------------------------------------------------------------------------------------------- xlora


@functools.cache
def xlora_oracle(root: Path, ids: tuple[int, ...], classifier: bool, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """In this process, what ``fx-adapters xlora`` runs: ``get_latest_scalings()`` (seq, layers, experts) and the
    logits (seq, vocab) of the saved model with the experts, on ``ids``."""
    from transformers import AutoModelForCausalLM

    import fx_adapters as fxa

    model = AutoModelForCausalLM.from_pretrained(root / "my-llama").eval()
    torch.manual_seed(0)  # the CLI's seed for the untrained classifier (set before the capture, which draws too)
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(
        adapters={name: root / path for name, path in XLORA_EXPERTS.items()}, **config))
    if classifier:
        xm.load_classifier(root / CLASSIFIER)
    with torch.no_grad():
        logits = xm(input_ids=torch.tensor([ids])).logits[0]
    return xm.get_latest_scalings()[0], logits


def scalings_table(out: str) -> tuple[list[list[str]], torch.Tensor]:
    """The table's rows (token index, id[, text]) and its scalings (tokens, experts), read back from ``%.4f``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("token  id"))
    rows = [line.rsplit(maxsplit=len(XLORA_EXPERTS)) for line in lines[start + 1:-1]]  # the last: the next token
    return [head.split(maxsplit=2) for head, *_ in rows], torch.tensor([[float(v) for v in values]
                                                                        for _, *values in rows])


def assert_printed(printed: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(printed, want.float(), atol=5.1e-5, rtol=0)  # 4 decimals


def prompt_ids() -> tuple[int, ...]:
    return tuple(char_tokenizer()(PROMPT)["input_ids"])


def test_xlora_prints_the_scalings_get_latest_scalings_returns(ws):
    _, printed = scalings_table(ok(ws, *XLORA))
    scalings, _ = xlora_oracle(ws, prompt_ids(), classifier=True)
    assert_printed(printed, scalings[:, 0])  # not layerwise: every layer gets the same


def test_xlora_prompt_is_tokenized_by_the_model_directory_tokenizer(ws):
    tokens, _ = scalings_table(ok(ws, *XLORA))
    assert tokens == [[str(i), str(token), repr(char)] for i, (token, char) in enumerate(zip(prompt_ids(), PROMPT))]


def test_xlora_prints_the_argmax_next_token(ws):
    _, logits = xlora_oracle(ws, prompt_ids(), classifier=True)
    token = int(logits[-1].argmax())
    assert ok(ws, *XLORA).splitlines()[-1] == (f"Next token (argmax of the last position's logits): {token} "
                                               f"{char_tokenizer().decode([token])!r}")


def test_xlora_without_classifier_says_it_is_untrained(ws):
    assert "Classifier: untrained (its random initialization, seed 0;" in ok(ws, *XLORA_LAYERWISE)


def test_xlora_layerwise_top_k_says_what_the_table_shows(ws):
    assert ("Expert scalings per token, averaged over the 11 layers (--layerwise: each layer has its own); each "
            "token's 1 largest kept, the others 0 (--top-k):") in ok(ws, *XLORA_LAYERWISE)


def test_xlora_layerwise_top_k_prints_the_kept_scalings_averaged_over_layers(ws):
    scalings, _ = xlora_oracle(ws, PROMPT_IDS, classifier=False, layerwise_scalings=True, top_k_lora=1,
                               softmax_temperature=0.5)
    largest = scalings.max(dim=-1, keepdim=True).values
    kept = torch.where(scalings == largest, largest, 0.0)
    assert_printed(scalings_table(ok(ws, *XLORA_LAYERWISE))[1], kept.mean(dim=1))


@pytest.mark.parametrize("argv", [XLORA, XLORA_LAYERWISE], ids=" ".join)
def test_xlora_prints_no_third_party_noise(ws, argv):
    assert visible_lines(cli(ws, *argv).result().stderr) == []
