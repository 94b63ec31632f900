"""fold → export → load in a fresh process that never imports fx_adapters → the folded module's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import MLP, build_hf, mlp_input, token_batch

import fx_adapters as fxa

# (batch, seq) of the calls: other sizes than the (2, 8) examples of the capture, to exercise dynamic dims
SHAPES = [(3, 5), (1, 11), (4, 1)]

LOADER = textwrap.dedent("""
    import json, sys
    import torch

    cases = torch.load(sys.argv[1])
    outputs = {}
    for name, (path, calls) in cases.items():
        module = torch.export.load(path).module()
        outputs[name] = [module(*args) for args in calls]
    torch.save(outputs, sys.argv[2])
    print(json.dumps({"fx_adapters": sorted(m for m in sys.modules if m.split(".")[0] == "fx_adapters"),
                      "types": {name: type(out[0]).__name__ for name, out in outputs.items()}}))
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Llama exported from its AdaptedModule, the MLP from its folded module; all loaded in one subprocess."""
    tmp = tmp_path_factory.mktemp("export")
    llama = fxa.compile_with_road(build_hf("llama"), fxa.RoadConfig(variant="road_4", group_size=8,
                                                                    target_modules="all-linear", init_weights=False))
    mlp = fxa.compile_with_road(MLP().eval(), fxa.RoadConfig(group_size=4, target_modules=["lin0"],
                                                             init_weights=False))
    folded = {"llama": llama.fold(), "mlp": mlp.fold()}
    calls = {"llama": [token_batch(b, s, seed=b, left_pad=s // 2) for b, s in SHAPES],
             "mlp": [(mlp_input()[:b],) for b, _ in SHAPES]}
    paths = {"llama": fxa.export(llama, tmp / "llama.pt2"),
             "mlp": fxa.export(folded["mlp"], tmp / "mlp.pt2", example_inputs=(mlp_input(),))}
    torch.save({name: (str(paths[name]), calls[name]) for name in paths}, tmp / "cases.pt")
    result = subprocess.run([sys.executable, "-c", LOADER, tmp / "cases.pt", tmp / "outputs.pt"],
                            capture_output=True, text=True, cwd=tmp)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        expected = {name: [folded[name](*args) for args in calls[name]] for name in folded}
    return report, torch.load(tmp / "outputs.pt"), expected


def test_loading_never_imports_fx_adapters(exported):
    report, _, _ = exported
    assert report["fx_adapters"] == []


def test_exported_transformers_model_returns_a_logits_dict(exported):
    report, loaded, _ = exported
    assert report["types"]["llama"] == "dict" and all(list(out) == ["logits"] for out in loaded["llama"])


def test_exported_transformers_model_equals_the_folded_module_bit_for_bit(exported):
    _, loaded, expected = exported
    for got, want in zip(loaded["llama"], expected["llama"], strict=True):
        assert torch.equal(got["logits"], want["logits"])


def test_exported_traced_module_equals_the_folded_module_bit_for_bit(exported):
    _, loaded, expected = exported
    for got, want in zip(loaded["mlp"], expected["mlp"], strict=True):
        assert torch.equal(got, want)


def test_export_of_a_symbolically_traced_module_needs_examples(tmp_path):
    am = fxa.compile_with_road(MLP(), fxa.RoadConfig(group_size=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="no example for input 'X'"):
        fxa.export(am, tmp_path / "mlp.pt2")


def test_export_of_a_graph_that_still_applies_adapters_is_refused(tmp_path):
    am = fxa.compile_with_road(MLP(), fxa.RoadConfig(group_size=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="pass the AdaptedModule or its am.fold()"):
        fxa.export(am.graph_module, tmp_path / "mlp.pt2", example_inputs=(mlp_input(),))
