"""RoAd on captured transformers models computes what PEFT computes (max abs diff ≤ 1e-5, fp32)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import VOCAB, build_hf, eager_road_forward, examples, peft_road, road_params_of, token_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import Oracle
from peft import RoadConfig as PeftRoadConfig
from peft import get_peft_model, set_peft_model_state_dict

import fx_adapters as fxa
from fx_adapters.testing import assert_equivalent
from fx_adapters.testing.strategies import adapter_assignments, road_configs, road_state_dicts, token_batches

ATOL = 1e-5
PEFT_ARCHS = ["llama", "mistral", "qwen2", "opt"]
VARIANT_OF = {"llama": "road_1", "mistral": "road_2", "qwen2": "road_4", "opt": "road_2"}
_names = (f"h{i}" for i in itertools.count())


@pytest.fixture(scope="module", params=PEFT_ARCHS)
def arch_setup(request, tmp_path_factory):
    """One captured model per architecture, with two PEFT adapters loaded from disk."""
    arch = request.param
    model = build_hf(arch)
    first = dict(variant=VARIANT_OF[arch], group_size=8, init_weights=False, target_modules="all-linear")
    second = dict(variant="road_4", group_size=4, init_weights=False, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    peft_model = peft_road(model, **first)
    peft_model.add_adapter("second", type(peft_model.peft_config["default"])(**second))
    directory = tmp_path_factory.mktemp(arch)
    peft_model.save_pretrained(directory)
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules=["q_proj"]), adapter_name="init")
    am.load_adapter(directory, adapter_name="first")
    am.load_adapter(directory / "second", adapter_name="second")
    return arch, model, peft_model, am.eval()


def batch(*args, **kwargs) -> dict[str, torch.Tensor]:
    """``conftest.token_batch`` as the keyword inputs ``assert_equivalent`` gives both sides."""
    return dict(zip(("input_ids", "attention_mask"), token_batch(*args, **kwargs)))


def test_loaded_adapter_matches_peft(arch_setup):
    _, _, peft_model, am = arch_setup
    peft_model.set_adapter("default")
    am.set_adapter("first")
    assert_equivalent(am, peft_model, batch(3, 7, left_pad=2), atol=ATOL, rtol=0)


def test_set_adapter_switches_to_the_second_adapter_as_peft(arch_setup):
    _, _, peft_model, am = arch_setup
    peft_model.set_adapter("second")
    am.set_adapter("second")
    assert_equivalent(am, peft_model, batch(2, 5), atol=ATOL, rtol=0)


def test_disabled_adapters_compute_the_base_model(arch_setup):
    _, model, _, am = arch_setup
    with am.disable_adapters():
        assert_equivalent(am, model, batch(2, 6), atol=ATOL, rtol=0)


def peft_per_sample(peft_model):
    """PEFT run one sample at a time, each with its adapter (none for ``"__base__"``): logits of the batch."""
    def run(input_ids, attention_mask, adapter_names):
        rows = []
        for i, name in enumerate(adapter_names):
            sample = dict(input_ids=input_ids[i:i + 1], attention_mask=attention_mask[i:i + 1])
            if name == "__base__":
                with peft_model.disable_adapter():
                    rows.append(peft_model(**sample).logits)
            else:
                peft_model.set_adapter(name)
                rows.append(peft_model(**sample).logits)
        return torch.cat(rows)
    return Oracle(run)


def test_mixed_batch_matches_peft_run_per_sample(arch_setup):
    """PEFT's own adapter_names path crashes on OPT (its MLP flattens the batch), so PEFT runs each sample."""
    _, _, peft_model, am = arch_setup
    peft_names = ["default", "second", "__base__", "second", "default"]
    ours = [{"default": "first"}.get(n, n) for n in peft_names]
    assert_equivalent(am, peft_per_sample(peft_model), batch(5, 6, left_pad=3), atol=ATOL, rtol=0,
                      compiled_kwargs={"adapter_names": ours}, reference_kwargs={"adapter_names": peft_names})


def test_mixed_batch_matches_peft_adapter_names(arch_setup):
    arch, _, peft_model, am = arch_setup
    if arch == "opt":
        pytest.skip("PEFT's adapter_names path raises on OPT (covered per sample above)")
    peft_names = ["second", "__base__", "default", "second"]
    ours = [{"default": "first"}.get(n, n) for n in peft_names]
    assert_equivalent(am, peft_model, batch(4, 6, left_pad=3), atol=ATOL, rtol=0,
                      compiled_kwargs={"adapter_names": ours}, reference_kwargs={"adapter_names": peft_names})


def test_input_ids_alone_match_the_model_with_adapters_disabled(arch_setup):
    _, model, _, am = arch_setup
    ids, _ = token_batch(2, 9)
    with am.disable_adapters():
        assert_equivalent(am, model, {"input_ids": ids}, atol=ATOL, rtol=0)


def test_output_has_the_model_output_type(arch_setup):
    _, model, _, am = arch_setup
    ids, _ = token_batch(1, 3)
    with torch.no_grad():
        assert type(am(input_ids=ids)) is type(model(input_ids=ids))


# ---------------------------------------------------------------- property-based, against PEFT

@pytest.fixture(scope="module")
def llama():
    model = build_hf("llama")
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules=["q_proj"]), adapter_name="base0")
    return model, am.eval()


@settings(max_examples=examples(10))
@given(data=st.data())
def test_mixed_batches_match_peft_across_drawn_configs(llama, data):
    model, am = llama
    configs = data.draw(st.lists(road_configs(am.linear_layers), min_size=1, max_size=3))
    names = [next(_names) for _ in configs]
    peft_model = None
    try:
        for name, cfg in zip(names, configs):
            state = data.draw(road_state_dicts(am.match(cfg), cfg.variant))
            am.add_adapter(name, cfg)
            am.load_adapter(state, adapter_name=name)
            peft_cfg = PeftRoadConfig(variant=cfg.variant, group_size=cfg.group_size, init_weights=False,
                                      target_modules=cfg.target_modules)
            if peft_model is None:
                peft_model = get_peft_model(copy.deepcopy(model), peft_cfg, adapter_name=name).eval()
            else:
                peft_model.add_adapter(name, peft_cfg)
            set_peft_model_state_dict(peft_model, state, adapter_name=name)
        inputs = data.draw(token_batches(VOCAB, min_seq=2, min_attended=2))  # one token: q_proj cannot matter
        assignment = data.draw(adapter_assignments(names, len(inputs["input_ids"])))
        adapted = [i for i, name in enumerate(assignment) if name != "__base__"]
        if adapted:  # the adapted rows move: the comparison below can fail
            with torch.no_grad():
                moved = (am(**inputs, adapter_names=assignment).logits - model(**inputs).logits)[adapted]
            assert moved.abs().max() > 1e-3
        assert_equivalent(am, peft_model, inputs, compiled_kwargs={"adapter_names": assignment},
                          reference_kwargs={"adapter_names": assignment}, atol=ATOL)
    finally:
        for name in names:
            am.delete_adapter(name)


# ---------------------------------------------------------------- GPT-2: Conv1D, which PEFT's RoAd cannot adapt

@pytest.fixture(scope="module")
def gpt2():
    model = build_hf("gpt2")
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=16, variant="road_2", init_weights=False,
                                                     target_modules="all-linear"))
    am.add_adapter("other", fxa.RoadConfig(group_size=4, variant="road_4", init_weights=False))  # PEFT default: c_attn
    return model, am.eval()


def test_gpt2_targets_conv1d_layers(gpt2):
    _, am = gpt2
    kinds = {t.name.rsplit(".", 1)[-1]: t.kind for t in am.targets}
    assert kinds == {"c_attn": "conv1d", "c_proj": "conv1d", "c_fc": "conv1d"}


def test_gpt2_default_targets_are_peft_defaults(gpt2):
    _, am = gpt2
    expected = {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    assert {t.name for t in am.adapter_targets("other")} == expected


@pytest.mark.parametrize("assignment", [["default"] * 3, ["other", "__base__", "default"]])
def test_gpt2_matches_eager_reference_of_the_same_math(gpt2, assignment):
    model, am = gpt2
    adapters = {n: (am.adapters[n], road_params_of(am, n)) for n in ("default", "other")}

    def eager(input_ids, attention_mask, adapter_names):
        def one(m, i):
            return m(input_ids=input_ids[i:i + 1], attention_mask=attention_mask[i:i + 1]).logits
        return eager_road_forward(model, one, adapters, adapter_names)

    assert_equivalent(am, Oracle(eager), batch(3, 6, left_pad=2), atol=ATOL, rtol=0,
                      compiled_kwargs={"adapter_names": assignment}, reference_kwargs={"adapter_names": assignment})
