"""Drawing the rewritten graph: ``am.draw(path, layer=...)`` and ``fx-adapters inspect MODEL_DIR --graph FILE``.

The drawing shows one adapted layer before and after the rewrite. "Before" must be the captured model's own graph
there (checked against a fresh capture of the model), "after" the same plus the rotation, its table and slot map,
and the slot index input; the picture must name those nodes. Drawing changes nothing. Without pydot / graphviz: a
clear error naming what to install, exit 2, nothing written. SVG needs graphviz's ``dot`` (skipped without it);
``.dot`` not.
"""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch
from conftest import build_hf, token_batch

import fx_adapters as fxa
from fx_adapters.cli import main as cli_main
from fx_adapters.figures import MissingDependency
from fx_adapters.graph.forward_from_step import capture_model
from fx_adapters.road.draw import AFTER, BEFORE, layer_views
from fx_adapters.road.rotation import road_rotate

pytest.importorskip("pydot", reason="drawing graphs needs the graph extra (pydot)")
needs_graphviz = pytest.mark.skipif(shutil.which("dot") is None, reason="SVG needs graphviz's dot program")
LAYER = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def model():
    return build_hf("llama")


@pytest.fixture(scope="module")
def am(model):
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules=["q_proj", "v_proj"],
                                                     init_weights=False))
    return am.eval()


def described(node: torch.fx.Node) -> tuple:
    """What a node computes, by name: op, target, and its inputs' names."""
    return node.op, str(node.target), tuple(a.name for a in node.all_input_nodes)


def test_before_is_the_captured_graph_and_after_adds_the_rotation_its_table_slot_map_and_index(model, am):
    views = layer_views(am.graph_module, am.targets, LAYER)
    fresh = {n.name: n for n in capture_model(model)[0].graph_module.graph.nodes}  # never rewritten
    before = [n for n in views[BEFORE].graph.nodes if n.op in ("call_function", "get_attr")]
    assert [n.target for n in before if n.op == "call_function"].count(torch.ops.aten.linear.default) == 1
    for node in before:
        assert described(node) == described(fresh[node.name])
    added = {n.name for n in views[AFTER].graph.nodes} - {n.name for n in views[BEFORE].graph.nodes}
    after = {n.name: n for n in views[AFTER].graph.nodes}
    rotation = next(n for n in after.values() if n.target is road_rotate)
    linear, table, slot_map, index, group_size = rotation.args
    assert added == {rotation.name, table.name, slot_map.name, index.name}
    layer = "road_adapters.model__layers__1__self_attn__v_proj"
    assert (linear.target, table.op, table.target, slot_map.op, slot_map.target, index.target, group_size) == (
        torch.ops.aten.linear.default, "get_attr", f"{layer}.table_g8", "get_attr", f"{layer}.slots_g8",
        "road_index", 8)
    assert [u.name for u in linear.users] == [rotation.name]


@needs_graphviz
def test_draw_writes_an_svg_naming_the_layer_and_the_nodes_the_rewrite_added(model, am, tmp_path):
    ids, mask = token_batch(2, 5)
    code = am.graph_module.code
    with torch.no_grad():
        expected = am(input_ids=ids, attention_mask=mask).logits
    assert am.draw(tmp_path / "layer.svg", layer=LAYER) == tmp_path / "layer.svg"
    svg = (tmp_path / "layer.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and 10_000 < len(svg) < 1_000_000
    assert f"RoAd on {LAYER}: before and after the rewrite" in svg
    for text in (BEFORE, AFTER, "name=%road_rotate", "name=%road_index", "table_g8", "name=%linear"):
        assert text in svg
    with torch.no_grad():  # drawing changed nothing
        torch.testing.assert_close(am(input_ids=ids, attention_mask=mask).logits, expected, atol=0, rtol=0)
    assert am.graph_module.code == code


def test_dot_file_needs_no_graphviz_and_puts_the_rotation_only_after(am, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no graphviz program
    dot = am.draw(tmp_path / "layer.dot").read_text()  # default: the first adapted layer
    before, after = dot.split("subgraph cluster_panel1")
    assert "model.layers.0.self_attn.q_proj" in dot
    assert re.search(r"name=%linear\b", before) and re.search(r"name=%linear\b", after)
    assert "road_rotate" not in before and "name=%road_rotate" in after and "name=%road_index" in after
    with pytest.raises(MissingDependency, match="apt-get install graphviz"):
        am.draw(tmp_path / "layer.svg")
    assert [p.name for p in tmp_path.iterdir()] == ["layer.dot"]


def test_draw_names_the_adapted_layers_when_given_another(am, tmp_path):
    with pytest.raises(ValueError, match=r"layer 'lm_head' carries no adapter; pass one of the adapted layers, e\.g\. "
                                         r"'model\.layers\.0\.self_attn\.q_proj'"):
        am.draw(tmp_path / "x.svg", layer="lm_head")
    with pytest.raises(ValueError, match="suffixes .svg, .png, .pdf, .dot"):
        am.draw(tmp_path / "x.gif")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect-graph")
    model.save_pretrained(root / "llama")
    return root / "llama"


@needs_graphviz
def test_inspect_graph_draws_the_named_layer(model_dir, tmp_path, capsys):
    path = tmp_path / "down.svg"
    assert cli_main(["inspect", str(model_dir), "--graph", str(path), "--layer", "model.layers.1.mlp.down_proj",
                     "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"model.layers.1.mlp.down_proj before and after the RoAd rewrite: drawn in {path}")
    svg = path.read_text()
    assert "RoAd on model.layers.1.mlp.down_proj" in svg and "name=%road_rotate" in svg


@pytest.mark.parametrize(("missing", "file", "message"), [
    ("pydot", "g.dot", 'needs pydot, an optional dependency: pip install "fx-adapters[graph]"'),
    ("dot", "g.svg", "needs the graphviz program 'dot' on PATH: install the graphviz package (Debian / Ubuntu: "
                     "apt-get install graphviz"),
])
def test_inspect_graph_without_its_dependency_says_what_to_install_exits_2_and_writes_nothing(
        model_dir, tmp_path, capsys, monkeypatch, missing, file, message):
    if missing == "pydot":
        monkeypatch.setitem(sys.modules, "pydot", None)
    else:
        monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli_main(["inspect", str(model_dir), "--graph", str(tmp_path / file), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fx-adapters: error: --graph {message}") and err.count("\n") == 1  # one line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--layer", "lm_head"], "--layer names the layer --graph draws; pass --graph FILE.svg too"),
    (["--graph", "g.gif"], "--graph: cannot tell the format of 'g.gif'; name the file with one of the suffixes "
                           ".svg, .png, .pdf, .dot"),
])
def test_inspect_graph_options_that_cannot_work_are_bad_input(model_dir, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["inspect", str(model_dir), *argv, "--quiet"]) == 2
    assert capsys.readouterr().err == f"fx-adapters: error: {message}\n"
    assert list(tmp_path.iterdir()) == []
