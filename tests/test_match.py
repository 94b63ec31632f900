"""The match pass selects exactly the layers PEFT's RoAd would adapt."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import MLP, build_hf, peft_road
from hypothesis import given
from hypothesis import strategies as st
from peft.tuners.road.layer import RoadLayer as PeftRoadLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import TRANSFORMERS_MODELS_TO_ROAD_TARGET_MODULES_MAPPING

import fx_adapters as fxa
from fx_adapters.graph.match import DEFAULT_TARGETS, select_targets
from fx_adapters.graph.tags import tagged
from fx_adapters.road.rewrite import RotationTag

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def llama():
    model = build_hf("llama")
    return model, fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules="all-linear"))


def peft_targets(model, **config):
    try:
        peft_model = peft_road(model, **config)
    except ValueError as exc:  # PEFT raises when nothing matches; we do too (our_targets gives set())
        assert "not found in the base model" in str(exc) or "No modules were targeted" in str(exc), exc
        return set()
    return {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
            if isinstance(m, PeftRoadLayer)}


def our_targets(am, **config):
    try:
        report = select_targets(list(am.linear_layers), config.get("target_modules"),
                                config.get("exclude_modules"), model_type="llama", output_head="lm_head")
    except ValueError:
        return set()
    return {t.name for t in report.targets}


selectors = st.one_of(
    st.lists(st.sampled_from(PROJECTIONS + ["self_attn.q_proj", "layers.1.mlp.up_proj"]), min_size=1, max_size=4,
             unique=True),
    st.sampled_from([r".*\.0\..*_proj", r"model\.layers\.1\.self_attn\.(q|k)_proj", r".*mlp\..*_proj", "all-linear"]),
)


@given(target_modules=selectors)
def test_selection_equals_peft(llama, target_modules):
    model, am = llama
    config = dict(group_size=8, target_modules=target_modules)
    assert our_targets(am, **config) == peft_targets(model, **config)


@given(target_modules=selectors.filter(lambda s: s != "all-linear"), exclude_modules=selectors.filter(
    lambda s: s != "all-linear"))
def test_exclude_modules_follow_peft_rule(llama, target_modules, exclude_modules):
    """PEFT's RoadConfig has no exclude_modules field; its shared rule (check_target_module_exists) is the oracle."""
    _, am = llama
    rule = SimpleNamespace(target_modules=target_modules, exclude_modules=exclude_modules, modules_to_save=None,
                           target_parameters=None, layers_to_transform=None, layers_pattern=None)
    expected = {t.name for t in am.linear_layers if check_target_module_exists(rule, t.name)}
    assert our_targets(am, target_modules=target_modules, exclude_modules=exclude_modules) == expected


def test_default_targets_are_peft_defaults():
    assert DEFAULT_TARGETS == dict(TRANSFORMERS_MODELS_TO_ROAD_TARGET_MODULES_MAPPING)


def test_all_linear_leaves_out_the_output_head(llama):
    _, am = llama
    names = {t.name for t in am.targets}
    assert "lm_head" not in names and len(names) == 2 * 7


def test_targets_report_kind_and_features(llama):
    _, am = llama
    q = next(t for t in am.targets if t.name == "model.layers.0.self_attn.q_proj")
    k = next(t for t in am.targets if t.name == "model.layers.0.self_attn.k_proj")
    assert (q.kind, q.in_features, q.out_features, q.has_bias) == ("linear", 64, 64, False)
    assert (k.in_features, k.out_features) == (64, 32)


def test_no_match_names_candidates(llama):
    _, am = llama
    with pytest.raises(ValueError, match=r"no linear-like layer matched.*q_prj.*candidates.*q_proj"):
        am.add_adapter("typo", fxa.RoadConfig(group_size=8, target_modules=["q_prj"]))
    assert "typo" not in am.adapters


def test_plain_module_linears_are_call_module_targets():
    am = fxa.compile_with_road(MLP().eval(), fxa.RoadConfig(group_size=2, target_modules="all-linear"))
    assert [(t.name, t.kind, t.in_features, t.out_features) for t in am.targets] == [
        ("lin0", "linear", 10, 20), ("lin1", "linear", 20, 2)]


def test_unknown_architecture_without_target_modules_asks_for_them():
    with pytest.raises(ValueError, match="no default targets.*pass target_modules"):
        fxa.compile_with_road(MLP().eval(), fxa.RoadConfig(group_size=2))


def test_rewritten_graph_lints_clean(llama):
    _, am = llama
    am.graph_module.graph.lint()
    rotations = [n for n, _ in tagged(am.graph_module.graph, RotationTag) if n.op == "call_function"]
    assert len(rotations) == len(am.targets)
