"""PEFT adapter directories round-trip both ways; bad checkpoints are refused and change nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_hf, peft_road, road_params_of, token_batch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import fx_adapters as fxa

CONFIG = dict(variant="road_4", group_size=4, init_weights=False, target_modules=["q_proj", "up_proj"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = build_hf("qwen2")
    torch.manual_seed(5)
    peft_model = peft_road(model, **CONFIG)
    peft_dir = tmp_path_factory.mktemp("peft")
    peft_model.save_pretrained(peft_dir)
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules=["k_proj"], init_weights=False))
    return model, peft_model, peft_dir, am.eval()


def logits(module, ids):
    with torch.no_grad():
        return module(input_ids=ids).logits


def snapshot(am):
    return {n: p.detach().clone() for n, p in am.named_parameters()}, dict(am.adapters), am.graph_module.code


def assert_unchanged(am, before):
    params, adapters, code = before
    now = dict(am.named_parameters())
    assert now.keys() == params.keys() and all(torch.equal(now[n], params[n]) for n in params)
    assert am.adapters == adapters and am.graph_module.code == code


def test_config_from_pretrained_reads_peft_config(setup):
    _, _, peft_dir, _ = setup
    cfg = fxa.RoadConfig.from_pretrained(peft_dir)
    assert (cfg.variant, cfg.group_size, cfg.init_weights, sorted(cfg.target_modules)) == (
        "road_4", 4, False, ["q_proj", "up_proj"])


def test_peft_saved_adapter_loads_under_a_new_name(setup):
    _, peft_model, peft_dir, am = setup
    am.load_adapter(peft_dir, adapter_name="from_peft")
    am.set_adapter("from_peft")
    ids, _ = token_batch(2, 5)
    torch.testing.assert_close(logits(am, ids), logits(peft_model, ids), atol=1e-5, rtol=0)


def test_saved_adapter_loads_in_peft_with_same_outputs(setup, tmp_path):
    model, _, _, am = setup
    am.set_adapter("default")
    am.save_adapter(tmp_path, adapter_name="default")
    peft_model = PeftModel.from_pretrained(build_hf("qwen2"), tmp_path).eval()
    ids, _ = token_batch(3, 4)
    torch.testing.assert_close(logits(peft_model, ids), logits(am, ids), atol=1e-5, rtol=0)


def test_saved_config_lists_exact_target_paths(setup, tmp_path):
    _, _, _, am = setup
    am.save_adapter(tmp_path, adapter_name="default")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ROAD"
    assert sorted(config["target_modules"]) == sorted(t.name for t in am.adapter_targets("default"))


def test_state_dict_with_config_creates_an_adapter(setup):
    _, _, peft_dir, am = setup
    state = load_file(peft_dir / "adapter_model.safetensors")
    am.load_adapter(state, adapter_name="from_state", config=fxa.RoadConfig.from_pretrained(peft_dir))
    loaded = road_params_of(am, "from_state")
    assert len(loaded) == 4
    for path, (theta, alpha) in loaded.items():
        torch.testing.assert_close(theta, state[f"base_model.model.{path}.road_theta"], atol=0, rtol=0)
        torch.testing.assert_close(alpha, state[f"base_model.model.{path}.road_alpha"], atol=0, rtol=0)


def test_loading_into_an_existing_adapter_replaces_its_values(setup, tmp_path):
    _, _, peft_dir, am = setup
    am.load_adapter(peft_dir, adapter_name="reload")
    am.set_adapter("reload")
    ids, _ = token_batch(1, 4)
    before = logits(am, ids)
    state = {k: v * 0.5 for k, v in load_file(peft_dir / "adapter_model.safetensors").items()}
    am.load_adapter(state, adapter_name="reload")
    assert not torch.allclose(logits(am, ids), before)


def test_checkpoint_with_wrong_shapes_is_refused_and_changes_nothing(setup, tmp_path):
    _, _, peft_dir, am = setup
    state = load_file(peft_dir / "adapter_model.safetensors")
    key = next(iter(state))
    state[key] = torch.zeros(3)
    before = snapshot(am)
    with pytest.raises(ValueError, match=r"has shape \(3,\).*does not fit"):
        am.load_adapter(state, adapter_name="bad", config=fxa.RoadConfig.from_pretrained(peft_dir))
    assert_unchanged(am, before)


def test_checkpoint_with_missing_or_extra_keys_is_refused_and_changes_nothing(setup):
    _, _, peft_dir, am = setup
    state = load_file(peft_dir / "adapter_model.safetensors")
    state.pop(next(iter(state)))
    state["base_model.model.model.nothing.road_theta"] = torch.zeros(2)
    before = snapshot(am)
    with pytest.raises(ValueError, match="1 unexpected key.*1 missing"):
        am.load_adapter(state, adapter_name="bad", config=fxa.RoadConfig.from_pretrained(peft_dir))
    assert_unchanged(am, before)


def test_pickled_checkpoint_is_never_loaded(setup, tmp_path):
    _, _, peft_dir, am = setup
    (tmp_path / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle"):
        am.load_adapter(tmp_path, adapter_name="pickled")


def test_non_road_adapter_dir_is_refused(setup, tmp_path):
    _, _, _, am = setup
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="not a RoAd adapter"):
        am.load_adapter(tmp_path, adapter_name="lora")


def test_state_dict_for_unknown_adapter_without_config_asks_for_one(setup):
    _, _, peft_dir, am = setup
    with pytest.raises(ValueError, match="does not exist; pass config="):
        am.load_adapter(load_file(peft_dir / "adapter_model.safetensors"), adapter_name="nope")
