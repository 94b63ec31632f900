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
    import inspect, json, sys
    import torch

    cases = torch.load(sys.argv[1])
    outputs, signatures, refusals = {}, {}, {}
    for name, (path, calls) in cases.items():
        module = torch.export.load(path).module()
        outputs[name] = [module(**kwargs) for kwargs in calls]
        signatures[name] = list(inspect.signature(module.forward).parameters)
        if "input_ids" not in calls[0]:
            continue
        first = calls[0]  # called with the other set of inputs: a program's inputs are fixed
        other = {"input_ids": first["input_ids"]} if "attention_mask" in first else \\
            {**first, "attention_mask": torch.ones_like(first["input_ids"])}
        try:
            module(**other)
        except Exception as e:
            refusals[name] = f"{type(e).__name__}: {e}"
    torch.save(outputs, sys.argv[2])
    print(json.dumps({"fx_adapters": sorted(m for m in sys.modules if m.split(".")[0] == "fx_adapters"),
                      "types": {name: type(out[0]).__name__ for name, out in outputs.items()},
                      "signatures": signatures, "refusals": refusals}))
""")


def keywords(ids, mask=None) -> dict:
    return {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Llama exported from its AdaptedModule (input_ids and attention_mask), from its folded module with input_ids
    only, and the MLP from its folded module; all loaded in one subprocess, called by keyword."""
    tmp = tmp_path_factory.mktemp("export")
    llama = fxa.compile_with_road(build_hf("llama"), fxa.RoadConfig(variant="road_4", group_size=8,
                                                                    target_modules="all-linear", init_weights=False))
    mlp = fxa.compile_with_road(MLP().eval(), fxa.RoadConfig(group_size=4, target_modules=["lin0"],
                                                             init_weights=False))
    folded = {"llama": llama.fold(), "llama_ids": llama.fold(), "mlp": mlp.fold()}
    calls = {"llama": [keywords(*token_batch(b, s, seed=b, left_pad=s // 2)) for b, s in SHAPES],
             "llama_ids": [keywords(token_batch(b, s, seed=b)[0]) for b, s in SHAPES],
             "mlp": [{"X": mlp_input()[:b]} for b, _ in SHAPES]}
    paths = {"llama": fxa.export(llama, tmp / "llama.pt2"),
             "llama_ids": fxa.export(folded["llama_ids"], tmp / "llama_ids.pt2",
                                     example_kwargs=keywords(token_batch(2, 8)[0])),
             "mlp": fxa.export(folded["mlp"], tmp / "mlp.pt2", example_inputs=(mlp_input(),))}
    torch.save({name: (str(paths[name]), calls[name]) for name in paths}, tmp / "cases.pt")
    result = subprocess.run([sys.executable, "-c", LOADER, tmp / "cases.pt", tmp / "outputs.pt"],
                            capture_output=True, text=True, cwd=tmp)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        expected = {name: [folded[name](**kwargs) for kwargs in calls[name]] for name in folded}
    return report, torch.load(tmp / "outputs.pt"), expected, calls


def test_loading_never_imports_fx_adapters(exported):
    report, _, _, _ = exported
    assert report["fx_adapters"] == []


def test_exported_transformers_model_returns_a_logits_dict(exported):
    report, loaded, _, _ = exported
    for name in ("llama", "llama_ids"):
        assert report["types"][name] == "dict" and all(list(out) == ["logits"] for out in loaded[name])


@pytest.mark.parametrize("name", ["llama", "llama_ids"])
def test_exported_transformers_model_called_by_keyword_equals_the_folded_module_bit_for_bit(exported, name):
    _, loaded, expected, _ = exported
    for got, want in zip(loaded[name], expected[name], strict=True):
        assert torch.equal(got["logits"], want["logits"])


def test_the_default_program_takes_the_mask_and_the_examples_program_takes_input_ids_alone(exported):
    report, _, _, _ = exported
    assert report["signatures"] == {"llama": ["input_ids", "attention_mask"], "llama_ids": ["input_ids"],
                                    "mlp": ["X"]}


def test_a_program_called_with_another_set_of_inputs_raises_torchs_keyword_mismatch(exported):
    """What the export docstring and the README say: a torch.export program has no optional inputs."""
    report, _, _, _ = exported
    assert set(report["refusals"]) == {"llama", "llama_ids"}
    assert all("kwarg keyword mismatch" in message for message in report["refusals"].values())


def test_the_input_ids_program_computes_the_model_without_a_mask(exported):
    """The folded module's default mask built into the program: the model's own output without a mask."""
    _, loaded, _, calls = exported
    am = fxa.compile_with_road(build_hf("llama"), fxa.RoadConfig(variant="road_4", group_size=8,
                                                                 target_modules="all-linear", init_weights=False))
    with torch.no_grad():
        for got, kwargs in zip(loaded["llama_ids"], calls["llama_ids"], strict=True):
            torch.testing.assert_close(got["logits"], am(**kwargs).logits, atol=1e-5, rtol=0)


def test_exported_traced_module_equals_the_folded_module_bit_for_bit(exported):
    _, loaded, expected, _ = exported
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
