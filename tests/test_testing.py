"""fx_adapters.testing: assert_equivalent localizes divergence; the strategies draw only valid, shrinkable cases."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import VOCAB, build_hf, examples, peft_road, token_batch
from hypothesis import find, given, settings
from hypothesis import strategies as st
from peft import set_peft_model_state_dict
from torch import nn
from xlora_helpers import peft_classifier_state, peft_xlora, save_experts

import fx_adapters as fxa
from fx_adapters.graph.match import layer_key
from fx_adapters.road.rotation import VARIANTS
from fx_adapters.testing import NotEquivalentError, assert_equivalent
from fx_adapters.testing.strategies import adapter_assignments, road_configs, road_state_dicts, token_batches
from fx_adapters.xlora.passes import EXPERTS_ATTR

_names = (f"t{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def llama():
    model = build_hf("llama")
    # a random (not identity) seed adapter: comparisons against it are not the base model against itself
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules=["q_proj"], init_weights=False),
                               adapter_name="seed")
    return model, am.eval()


def with_random_adapter(am, config, state):
    name = next(_names)
    am.add_adapter(name, config)
    am.load_adapter(state, adapter_name=name)
    am.set_adapter(name)
    return name


def peft_with(model, config, state):
    peft_model = peft_road(model, variant=config.variant, group_size=config.group_size,
                           target_modules=config.target_modules, init_weights=False)
    set_peft_model_state_dict(peft_model, state)
    return peft_model


@settings(max_examples=examples(8))
@given(data=st.data())
def test_unbroken_graph_is_equivalent_to_peft(llama, data):
    model, am = llama
    config = data.draw(road_configs(am.linear_layers))
    state = data.draw(road_state_dicts(am.match(config), config.variant))
    name = with_random_adapter(am, config, state)
    try:
        inputs = data.draw(token_batches(VOCAB, min_seq=2, min_attended=2))  # one token: q_proj cannot matter
        with pytest.raises(NotEquivalentError):  # the drawn adapter moves the output: the check below can fail
            assert_equivalent(am, model, inputs)
        assert_equivalent(am, peft_with(model, config, state), inputs)
    finally:
        am.delete_adapter(name)


@settings(max_examples=examples(8))
@given(data=st.data())
def test_perturbed_rotation_is_named_as_the_first_diverging_layer(llama, data):
    model, am = llama
    config = data.draw(road_configs(am.linear_layers))
    state = data.draw(road_state_dicts(am.match(config), config.variant))
    name = with_random_adapter(am, config, state)
    try:
        broken = data.draw(st.sampled_from(sorted(config.target_modules)))
        inputs = data.draw(token_batches(VOCAB, min_seq=2, padding=("none",)))  # one token: q does not matter
        with torch.inference_mode():
            am(**inputs)  # tables are built; now break one layer's columns behind the cache's back
        table = getattr(am.graph_module.road_adapters[layer_key(broken)], f"table_g{config.group_size}")
        table[:, 0] += 0.5
        with pytest.raises(NotEquivalentError, match=f"first diverging module: '{broken}' "):
            assert_equivalent(am, peft_with(model, config, state), inputs)
    finally:
        am.delete_adapter(name)


def test_compiled_reference_is_compared_node_by_node(llama):
    model, am = llama
    broken = "model.layers.1.self_attn.q_proj"
    inputs = dict(zip(("input_ids", "attention_mask"), token_batch(2, 5)))
    am.set_adapter("seed")
    folded = am.fold("seed")  # a standalone GraphModule computing the seed adapter from its parameters
    with pytest.raises(NotEquivalentError):  # the seed adapter moves the output: the next check is not vacuous
        assert_equivalent(am, model, inputs)
    assert_equivalent(am, folded, inputs)
    with torch.inference_mode():
        am(**inputs)  # tables are built; now break one layer's columns behind the cache's back
    table = am.graph_module.road_adapters[layer_key(broken)].table_g8
    original = table.clone()
    table[:, 0] += 0.5
    try:
        with pytest.raises(NotEquivalentError, match=f"first diverging module: '{broken}' "):
            assert_equivalent(am, folded, inputs)
    finally:
        table.copy_(original)


class Constant(nn.Module):
    """A module whose output is a given tensor: the comparator's input, nothing else."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, _x):
        return self.value


@pytest.mark.parametrize("atol, rtol, scale", [(1e-5, 0.0, 1.0), (0.0, 1e-3, 100.0), (1e-5, 1e-3, 0.0)],
                         ids=["atol", "rtol", "atol-on-zero-reference"])
def test_an_error_just_above_the_tolerance_fails_and_just_below_passes(atol, rtol, scale):
    """The bound is ``|got - want| <= atol + rtol * |want|`` elementwise: 10 % either side of it decides."""
    want = torch.full((2, 3), scale, dtype=torch.float64)
    bound = atol + rtol * scale
    x = torch.zeros(2, 3)
    for factor, sign in itertools.product((0.9, 1.1), (1, -1)):
        got = want.clone()
        got[1, 2] += sign * factor * bound  # one element off, above or below: every element is compared
        if factor < 1:
            assert_equivalent(Constant(got), Constant(want), x, atol=atol, rtol=rtol)
        else:
            with pytest.raises(NotEquivalentError, match=f"tolerance atol={atol:g}, rtol={rtol:g}"):
                assert_equivalent(Constant(got), Constant(want), x, atol=atol, rtol=rtol)


def test_the_default_tolerance_is_atol_1e_5():
    want, x = torch.ones(4, dtype=torch.float64), torch.zeros(1)
    assert_equivalent(Constant(want + 0.9e-5), Constant(want), x)
    with pytest.raises(NotEquivalentError, match="atol=1e-05, rtol=0"):
        assert_equivalent(Constant(want + 1.1e-5), Constant(want), x)


def test_a_divergence_in_the_final_outputs_only_says_whether_modules_were_compared():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules=["0"]))

    class Shifted(nn.Sequential):  # the same modules at the same paths, the output moved
        def forward(self, x):
            return super().forward(x) + 1

    class Opaque(nn.Module):  # no modules: nothing to compare but the output
        def forward(self, x):
            return model(x) + 1

    x = torch.randn(3, 4)
    with pytest.raises(NotEquivalentError, match=r"^no module output differs \(only the final outputs do\)"):
        assert_equivalent(am, Shifted(*model), x)
    with pytest.raises(NotEquivalentError, match=r"^no module output to compare "):
        assert_equivalent(am, Opaque(), x)


def test_mixed_batch_kwargs_go_to_the_compiled_side_only(llama):
    model, am = llama
    ids = torch.randint(0, VOCAB, (2, 5))
    assert_equivalent(am, model, {"input_ids": ids}, compiled_kwargs={"adapter_names": ["__base__"] * 2})


@settings(max_examples=examples(15))
@given(data=st.data())
def test_drawn_configs_always_compile(llama, data):
    """Non-empty targets whose out_features the group size divides; the compiled model runs a drawn batch."""
    _, am = llama
    config = data.draw(road_configs(am.linear_layers, max_targets=8))
    name = next(_names)
    am.add_adapter(name, config)
    try:
        targets = am.adapter_targets(name)
        assert targets and all(t.out_features % config.group_size == 0 for t in targets)
        inputs = data.draw(token_batches(VOCAB))
        am.set_adapter(name)
        with torch.no_grad():
            logits = am(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, VOCAB)
    finally:
        am.delete_adapter(name)


def test_configs_shrink_to_the_smallest_failing_case(llama):
    _, am = llama
    smallest = find(road_configs(am.linear_layers), lambda c: len(c.target_modules) >= 2)
    assert len(smallest.target_modules) == 2 and smallest.group_size == 2 and smallest.variant == "road_1"


def test_assignments_have_one_name_per_sample():
    drawn = find(adapter_assignments(["a", "b"], 5), lambda names: "__base__" in names and "b" in names)
    assert len(drawn) == 5 and set(drawn) <= {"a", "b", "__base__"}


def test_token_batches_pad_on_the_drawn_side():
    left = find(token_batches(VOCAB, padding=("left",)), lambda b: (b["attention_mask"] == 0).any())
    mask = left["attention_mask"]
    assert mask[:, -1].all() and (mask.cummax(dim=1).values == mask).all()


@settings(max_examples=examples(50))
@given(batch=token_batches(VOCAB, padding=("right",)))
def test_right_padded_rows_are_ones_then_zeros(batch):
    mask = batch["attention_mask"]
    assert mask[:, 0].all() and (mask[:, 1:] <= mask[:, :-1]).all()


def test_right_padding_masks_the_last_positions():
    right = find(token_batches(VOCAB, padding=("right",)), lambda b: (b["attention_mask"] == 0).any())
    assert right["attention_mask"][:, -1].eq(0).any()


def test_token_batches_shrink_to_the_smallest_padded_batch():
    smallest = find(token_batches(VOCAB), lambda b: (b["attention_mask"] == 0).any())
    assert smallest["attention_mask"].tolist() == [[0, 1]]  # one sample, two tokens, left-padded by one


def test_assignments_shrink_to_the_first_name_but_where_the_case_needs_another():
    drawn = find(adapter_assignments(["a", "b"], 5), lambda names: "__base__" in names)
    assert sorted(drawn) == ["__base__", "a", "a", "a", "a"]


@settings(max_examples=examples(50))
@given(data=st.data())
def test_drawn_alphas_stay_away_from_zero(llama, data):
    _, am = llama
    min_abs_alpha = data.draw(st.floats(0.01, 1.0))
    state = data.draw(road_state_dicts(am.linear_layers, data.draw(st.sampled_from(VARIANTS)),
                                       min_abs_alpha=min_abs_alpha))
    alphas = torch.cat([v for k, v in state.items() if k.endswith("road_alpha")])
    assert alphas.abs().min() >= torch.tensor(min_abs_alpha, dtype=alphas.dtype)  # the bound as α's float32 holds it


# ---------------------------------------------------------------------------------------------- X-LoRA


@pytest.fixture(scope="module")
def xlora(tmp_path_factory):
    """PEFT's X-LoRA model and ours on a tiny Llama: same experts, same classifier."""
    model = build_hf("llama")
    dirs = save_experts(model, tmp_path_factory.mktemp("experts"))
    peft_model = peft_xlora(model, dirs)
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={f"e{i}": d for i, d in enumerate(dirs)}))
    xm.classifier.load_state_dict(peft_classifier_state(peft_model))
    return peft_model, xm.eval()


def test_xlora_module_is_equivalent_to_peft_xlora(xlora):
    peft_model, xm = xlora
    assert_equivalent(xm, peft_model, {"input_ids": token_batch(2, 6)[0]})


def test_perturbed_xlora_expert_is_named_as_the_first_diverging_layer(xlora):
    peft_model, xm = xlora
    broken = "model.layers.1.self_attn.v_proj"  # every expert of EXPERT_SPECS but the last adapts it
    experts = getattr(xm.graph_module, EXPERTS_ATTR)[layer_key(broken)]
    original = experts.lora_B.clone()
    experts.lora_B += 0.5
    try:
        with pytest.raises(NotEquivalentError, match=f"first diverging module: '{broken}' "):
            assert_equivalent(xm, peft_model, {"input_ids": token_batch(2, 6)[0]})
    finally:
        experts.lora_B.copy_(original)
