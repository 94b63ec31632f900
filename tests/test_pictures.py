"""The pictures: X-LoRA scalings heatmaps (``plot_scalings``, ``fx-adapters xlora --plot``), the benchmark curves
(``benchmarks/plot.py``) and the rewritten graph (``am.draw``, ``fx-adapters inspect --graph``).

Each picture is drawn from a tiny model: the file is a valid PNG / SVG of a sensible size, and the numbers drawn
(the heatmaps' arrays, the curves' points, the graph's nodes) are checked against an independent source: PEFT's
scalings, the measurements handed to the plot, the captured graph. Without the optional dependency the error names
the extra, the command exits 2 and nothing is written.
"""

from __future__ import annotations

import struct
import sys

import pytest
import torch
from conftest import build_hf, token_batch
from xlora_helpers import peft_classifier_state, peft_xlora, save_experts

import fx_adapters as fxa
from fx_adapters.cli import main as cli_main
from fx_adapters.figures import MissingDependency

matplotlib = pytest.importorskip("matplotlib", reason="the pictures need the plot extra (matplotlib)")
EXPERTS = ("math", "code", "chat")


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's header (and a check that it is one)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_sensible_png(path, max_bytes: int = 300_000) -> None:
    width, height = png_size(path)
    assert 300 <= width <= 3000 and 200 <= height <= 3000, (width, height)
    assert path.stat().st_size <= max_bytes


def heatmaps(figure) -> list:
    """The heatmap axes of a figure (the colour bar has no image)."""
    return [ax for ax in figure.axes if ax.images]


# ------------------------------------------------------------------------------------------ X-LoRA scalings


@pytest.fixture(scope="module")
def xlora_setup(tmp_path_factory):
    model = build_hf("llama")
    return model, save_experts(model, tmp_path_factory.mktemp("experts"))


def both(xlora_setup, **config):
    """PEFT's X-LoRA model and ours with the same classifier, both run on one batch."""
    model, dirs = xlora_setup
    peft_model = peft_xlora(model, dirs, **config)
    ours = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters=dict(zip(EXPERTS, dirs)), **config))
    ours.classifier.load_state_dict(peft_classifier_state(peft_model))
    ids, mask = token_batch(2, 6, seed=3)
    with torch.no_grad():
        peft_model(input_ids=ids, attention_mask=mask)
        ours(input_ids=ids, attention_mask=mask)
    return peft_model, ours


def test_scalings_heatmap_shows_peft_scalings_averaged_over_the_layers(xlora_setup, tmp_path):
    peft_model, ours = both(xlora_setup)
    tokens = ["The", " cat", " sat", " on", " a", " mat"]
    figure = fxa.xlora.plot_scalings(ours, tokens, tmp_path / "scalings.png", sample=1)
    (ax,) = heatmaps(figure)
    want = peft_model.get_latest_scalings()[1].mean(dim=1)  # (tokens, experts)
    torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array().data), want.float(), atol=1e-5, rtol=0)
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    assert [t.get_text() for t in ax.get_xticklabels()] == list(EXPERTS)
    assert len(figure.axes) == 2  # the heatmap and its colour bar
    assert "LlamaForCausalLM" in figure.get_suptitle()
    assert_sensible_png(tmp_path / "scalings.png")


def test_layerwise_scalings_get_a_heatmap_per_layer_on_one_colour_scale(xlora_setup, tmp_path):
    peft_model, ours = both(xlora_setup, layerwise_scalings=True)
    figure = fxa.xlora.plot_scalings(ours, path=tmp_path / "layers.svg")
    axes = heatmaps(figure)
    want = peft_model.get_latest_scalings()[0]  # (tokens, layers, experts)
    assert [ax.get_title() for ax in axes] == [t.name for t in ours.targets]
    for i, ax in enumerate(axes):
        torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array().data), want[:, i], atol=1e-5, rtol=0)
    assert len({ax.images[0].get_clim() for ax in axes}) == 1
    assert (tmp_path / "layers.svg").read_text().lstrip().startswith("<?xml")


def test_plot_scalings_refuses_labels_that_do_not_fit_and_writes_nothing(xlora_setup, tmp_path):
    _, ours = both(xlora_setup)
    with pytest.raises(ValueError, match="tokens has 2 labels but the scalings have 6 tokens"):
        fxa.xlora.plot_scalings(ours, ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="suffixes .png, .svg, .pdf"):
        fxa.xlora.plot_scalings(ours, None, tmp_path / "x.jpeg")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory, xlora_setup):
    """A saved tiny Llama with a one-character-per-token tokenizer, and two of the experts."""
    from test_cli import char_tokenizer

    model, dirs = xlora_setup
    root = tmp_path_factory.mktemp("cli-pictures")
    model.save_pretrained(root / "llama")
    char_tokenizer().save_pretrained(root / "llama")
    return root, dirs


def xlora_argv(cli_dir, *extra: str) -> list[str]:
    root, dirs = cli_dir
    return ["xlora", str(root / "llama"), "--expert", f"math={dirs[0]}", "--expert", f"code={dirs[1]}",
            "--prompt", "2+2=", "--quiet", *extra]


def test_xlora_plot_draws_the_scalings_the_table_prints(cli_dir, tmp_path, monkeypatch, capsys):
    from fx_adapters.xlora import plot

    drawn = []
    monkeypatch.setattr(plot, "plot_scalings", lambda *a, **k: drawn.append(fxa.xlora.plot_scalings(*a, **k)))
    assert cli_main(xlora_argv(cli_dir, "--layerwise", "--plot", str(tmp_path / "s.png"))) == 0
    out = capsys.readouterr().out
    start = out.splitlines().index(next(line for line in out.splitlines() if line.startswith("token")))
    table = [line.split() for line in out.splitlines()[start + 1:start + 5]]  # index, id, 'text', math, code
    axes = heatmaps(drawn[0])
    assert len(axes) == 6  # --layerwise: one per adapted layer (q, v, down_proj in 2 layers)
    mean = torch.stack([torch.as_tensor(ax.images[0].get_array().data) for ax in axes]).mean(dim=0)
    torch.testing.assert_close(mean, torch.tensor([[float(v) for v in row[3:]] for row in table]), atol=5.1e-5,
                               rtol=0)
    assert [t.get_text() for t in axes[0].get_yticklabels()] == [row[2] for row in table] == ["'2'", "'+'", "'2'",
                                                                                               "'='"]
    assert f"Heatmap of the scalings written to {tmp_path / 's.png'}" in out
    assert_sensible_png(tmp_path / "s.png")


def test_xlora_plot_without_matplotlib_names_the_extra_exits_2_and_writes_nothing(cli_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert cli_main(xlora_argv(cli_dir, "--plot", str(tmp_path / "s.png"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("fx-adapters: error: --plot needs matplotlib") and "fx-adapters[plot]" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MissingDependency, match=r"fx-adapters\[plot\]"):
        fxa.xlora.plot_scalings(None)


# ------------------------------------------------------------------------------------------ benchmark curves

CURVES = {  # measurements as curves.py returns them (the numbers here are inputs: the test checks they are drawn)
    "adapters": {"adapters": [1, 4, 16, 64], "peft": [1.21, 1.35, 1.9, 1.95], "ours": [1.04, 1.06, 1.07, 1.08],
                 "distinct_in_batch": [1, 4, 16, 16], "batch": 16, "seq": 64, "model": "random Llama (tiny)"},
    "generate": {"new_tokens": [2, 4, 8], "base": [300.0, 310.0, 320.0], "peft": [40.0, 25.0, 14.0],
                 "ours": [240.0, 250.0, 252.0], "ours_prompt": [None, None, None], "batch": 8, "prompt": 64,
                 "experts": 8, "model": "random Llama (tiny)", "prompt_mode": False},
}


def lines(figure) -> dict[str, tuple[list, list]]:
    """Legend label -> (x, y) of each line drawn."""
    (ax,) = figure.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_adapters_curve_draws_the_measured_ratios_for_both_sides():
    from benchmarks import plot

    drawn = lines(plot.adapters_figure(CURVES["adapters"]))
    data = CURVES["adapters"]
    assert drawn["PEFT 0.21 (loops over the batch's adapters)"] == (data["adapters"], data["peft"])
    assert drawn["fx_adapters (one gather)"] == (data["adapters"], data["ours"])
    (ax,) = plot.adapters_figure(data).axes
    assert ax.get_xlabel() == "RoAd adapters loaded (log scale)" and "÷ base" in ax.get_ylabel()


def test_generate_curves_draw_tokens_per_second_and_say_when_prompt_mode_is_missing():
    from benchmarks import plot

    data = CURVES["generate"]
    drawn = lines(plot.generate_figure(data))
    assert drawn["PEFT 0.21 (no KV cache: quadratic)"] == (data["new_tokens"], data["peft"])
    assert drawn["fx_adapters (both passes cached: linear)"] == (data["new_tokens"], data["ours"])
    decode = plot.decode_figure(data)
    assert set(lines(decode)) == {"exact (scalings of every position)", "base model's generate (no adapters)"}
    assert "prompt-scalings decode: not in this build" in decode.axes[0].texts[0].get_text()
    with_prompt = {**data, "prompt_mode": True, "ours_prompt": [260.0, 300.0, 330.0]}
    assert lines(plot.decode_figure(with_prompt))["prompt scalings reused while decoding"] == (
        data["new_tokens"], with_prompt["ours_prompt"])


def test_write_puts_small_pngs_and_the_measurements_in_the_directory(tmp_path):
    import json

    from benchmarks import plot

    written = plot.write(CURVES, tmp_path / "curves")
    assert json.loads((tmp_path / "curves" / "curves.json").read_text()) == CURVES
    assert sorted(p.name for p in written[1:]) == sorted(plot.FILES.values())
    for path in written[1:]:
        assert_sensible_png(path, max_bytes=120_000)


def test_benchmarks_plot_without_matplotlib_names_the_extra_exits_2_and_measures_nothing(tmp_path, monkeypatch,
                                                                                         capsys):
    from benchmarks.__main__ import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_:
        main(["--quick", "--plot", str(tmp_path / "curves")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("python -m benchmarks: error: --plot needs matplotlib, an optional "
                                              'dependency: pip install "fx-adapters[plot]"')
    assert list(tmp_path.iterdir()) == []
