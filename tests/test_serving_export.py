"""The multi-adapter ``.pt2`` (``fxa.export(am, path, mixed_batch=True)``) and AOTInductor packages: loaded in a
process that never imports fx_adapters, equal to the compiled module's mixed batches; ids checked in the graph;
rows overwritten in the loaded program; clear refusals."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import MLP, build_hf, mlp_input, token_batch

import fx_adapters as fxa

LOADER = textwrap.dedent("""
    import json, sys
    import torch

    extra = {"adapters.json": ""}
    module = torch.export.load(sys.argv[1], extra_files=extra).module()
    mapping = json.loads(extra["adapters.json"])
    calls = torch.load(sys.argv[2])
    outputs = [module(input_ids=ids, attention_mask=mask, adapter_ids=torch.tensor([mapping[n] for n in names]))
               for ids, mask, names in calls]
    torch.save(outputs, sys.argv[3])
    print(json.dumps({"mapping": mapping, "fx_adapters": [m for m in sys.modules if m.startswith("fx_adapters")]}))
""")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A Llama with three adapters of different variants / group sizes / targets (one deleted and its id reused),
    exported once with mixed_batch=True."""
    am = fxa.compile_with_road(build_hf("llama"), fxa.RoadConfig(group_size=16, target_modules=["q_proj", "v_proj"],
                                                                 init_weights=False), adapter_name="gone")
    am.add_adapter("b", fxa.RoadConfig(variant="road_4", group_size=8, target_modules="all-linear",
                                       init_weights=False))
    am.add_adapter("c", fxa.RoadConfig(group_size=16, target_modules=["o_proj", "down_proj"], init_weights=False))
    am.delete_adapter("gone")
    am.add_adapter("d", fxa.RoadConfig(variant="road_2", group_size=8, target_modules=["q_proj"], init_weights=False))
    path = fxa.export(am.eval(), tmp_path_factory.mktemp("mixed") / "mixed.pt2", mixed_batch=True)
    return am, path


def test_the_multi_adapter_pt2_serves_mixed_batches_without_fx_adapters(served, tmp_path):
    am, path = served
    calls = [(*token_batch(5, 7, seed=1), ["b", "__base__", "c", "d", "b"]),
             (*token_batch(2, 3, seed=2, left_pad=1), ["d", "c"])]
    torch.save(calls, tmp_path / "calls.pt")
    run = subprocess.run([sys.executable, "-c", LOADER, str(path), str(tmp_path / "calls.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"mapping": {"__base__": 0, "b": 1, "c": 2, "d": 3}, "fx_adapters": []}
    outputs = torch.load(tmp_path / "out.pt")
    with torch.inference_mode():
        for (ids, mask, names), out in zip(calls, outputs):
            want = am(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            torch.testing.assert_close(out["logits"], want, atol=1e-5, rtol=0)


def test_adapter_ids_out_of_range_raise_instead_of_reading_another_row(served):
    _, path = served
    module = torch.export.load(path).module()
    ids, mask = token_batch(2, 4)
    for bad in ([0, 4], [-1, 0]):
        with pytest.raises(RuntimeError, match="adapter_ids out of range"):
            module(input_ids=ids, attention_mask=mask, adapter_ids=torch.tensor(bad))


def test_one_adapters_rows_are_overwritten_in_the_loaded_program_without_reexporting(served):
    am, path = served
    extra = {"adapters.json": ""}
    module = torch.export.load(path, extra_files=extra).module()
    adapter_id = json.loads(extra["adapters.json"])["c"]
    ids, mask = token_batch(3, 5, seed=3)
    torch.manual_seed(7)
    params = am.adapter_parameters("c")
    old = {site: p.detach().clone() for site, p in params.items()}
    try:
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn_like(p) * 0.3)
        with torch.no_grad():  # the README's recipe: new columns per layer into the row the slot map names
            for fold in am.folds("c"):
                key, g = fold.target.name.replace(".", "__"), fold.group_size
                row = int(module.get_buffer(f"road_adapters.{key}.slots_g{g}")[adapter_id])
                module.get_buffer(f"road_adapters.{key}.table_g{g}")[row] = fold.cols
        names = ["c", "b", "c"]
        with torch.inference_mode():
            want = am(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            got = module(input_ids=ids, attention_mask=mask, adapter_ids=torch.tensor([2, 1, 2]))["logits"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    finally:
        with torch.no_grad():
            for site, p in params.items():
                p.copy_(old[site])


def test_a_multi_adapter_pt2_exported_from_input_ids_alone_is_called_without_a_mask(served, tmp_path):
    """The examples choose the program's inputs: input_ids only, the model's all-ones mask built in."""
    am, _ = served
    ids, _ = token_batch(2, 8)
    path = fxa.export(am, tmp_path / "ids.pt2", example_kwargs={"input_ids": ids}, mixed_batch=True)
    module = torch.export.load(path).module()
    assert list(inspect.signature(module.forward).parameters) == ["input_ids", "adapter_ids"]
    ids, _ = token_batch(3, 6, seed=4)
    with torch.inference_mode():
        want = am(input_ids=ids, adapter_names=["d", "__base__", "b"]).logits
        got = module(input_ids=ids, adapter_ids=torch.tensor([3, 0, 1]))["logits"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_exporting_without_adapters_merged_or_with_modules_to_save_says_what_to_do(tmp_path):
    am = fxa.compile_with_road(MLP().eval(), fxa.RoadConfig(group_size=4, target_modules=["lin0"]))
    am.merge()
    with pytest.raises(ValueError, match=r"merged into the weights; call am.unmerge\(\) first"):
        fxa.export(am, tmp_path / "x.pt2", (mlp_input(),), mixed_batch=True)
    am.unmerge()
    am.add_adapter("saver", fxa.RoadConfig(group_size=4, target_modules=["lin0"], modules_to_save=["lin1"]))
    with pytest.raises(ValueError, match=r"\['saver'\] have modules_to_save"):
        fxa.export(am, tmp_path / "x.pt2", (mlp_input(),), mixed_batch=True)
    am.delete_adapter("saver")
    am.delete_adapter("default")
    with pytest.raises(ValueError, match="has no adapter"):
        fxa.export(am, tmp_path / "x.pt2", (mlp_input(),), mixed_batch=True)
    with pytest.raises(TypeError, match="expected an AdaptedModule"):
        fxa.export(torch.nn.Linear(2, 2), tmp_path / "x.pt2", mixed_batch=True)
    assert not (tmp_path / "x.pt2").exists()


def test_an_aot_inductor_package_of_the_multi_adapter_graph_equals_the_module(tmp_path):
    import torch._inductor

    am = fxa.compile_with_road(MLP().eval(), fxa.RoadConfig(group_size=4, target_modules=["lin0"],
                                                            init_weights=False), adapter_name="a")
    am.add_adapter("b", fxa.RoadConfig(variant="road_2", group_size=2, target_modules=["lin0", "lin1"],
                                       init_weights=False))
    x = mlp_input()
    path = fxa.export(am, tmp_path / "mlp.pt2", (x[:2],), mixed_batch=True, aot_inductor=True)
    mapping = fxa.adapter_mapping(path)
    assert mapping == {"__base__": 0, "a": 1, "b": 2}
    runner = torch._inductor.aoti_load_package(str(path))
    names = ["a", "b", "__base__", "b", "a", "a", "b", "__base__", "a"]
    with torch.inference_mode():
        want = am(x, adapter_names=names)
    got = runner(X=x, adapter_ids=torch.tensor([mapping[n] for n in names]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
