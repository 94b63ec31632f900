"""A causal LM is exported once, as its cached step graph, and its forward is derived from it
(``fx_adapters.graph.forward_from_step``): the derived forward is the model's own, bit for bit, with transformers'
eager model as the oracle; a model it does not fit is captured on its own."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import DEVICE, VOCAB, build_hf

import fx_adapters as fxa
from fx_adapters.graph.capture import CaptureError
from fx_adapters.graph.capture_cache import capture_with_cache
from fx_adapters.graph.forward_from_step import ForwardFromStep, capture_model

ARCHS = ("llama", "qwen2", "gpt2", "opt")


@pytest.fixture
def exports(monkeypatch):
    """The calls of ``torch.export.export`` made in the test."""
    made = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: made.append(1) or real_export(*a, **k))
    return made


def masks(batch: int, seq: int) -> list[torch.Tensor | None]:
    """No mask, all ones, left padding, right padding, and a hole: each a different set of default positions."""
    ones = torch.ones(batch, seq, dtype=torch.long, device=DEVICE)
    left, right, hole = ones.clone(), ones.clone(), ones.clone()
    left[0, :seq // 2] = 0
    right[-1, seq - 2:] = 0
    hole[0, 1:3] = 0
    return [None, ones, left, right, hole]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


CASES = [(arch, dtype) for arch in ARCHS for dtype in DTYPES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{arch}-{dtype}" for arch, dtype in CASES])
def derived(request):
    arch, dtype = request.param
    model = build_hf(arch, dtype=DTYPES[dtype], initializer_range=0.2)  # positions matter: attention is not uniform
    return model, *capture_model(model)


@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 6), (3, 11)])
def test_the_forward_derived_from_the_step_graph_is_the_models_own_bit_for_bit(derived, batch, seq):
    model, captured, _ = derived
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq)).to(DEVICE)
    for mask in masks(batch, seq) if seq > 3 else [None]:
        with torch.no_grad():
            ours = captured.call(captured.graph_module, input_ids=ids, attention_mask=mask)
            theirs = model(input_ids=ids, attention_mask=mask, use_cache=False)
        assert type(ours) is type(theirs)
        assert torch.equal(ours.logits, theirs.logits), f"mask {mask}"


def test_the_derived_forward_takes_the_models_inputs_and_returns_its_logits_alone(derived):
    model, captured, graphs = derived
    graph = captured.graph_module.graph
    assert [n.target for n in graph.find_nodes(op="placeholder")] == ["input_ids", "attention_mask"]
    assert len(graph.output_node().args[0]) == 1
    assert len(graphs.cache_names) == 2 * model.config.num_hidden_layers  # the step graph generate runs


@pytest.mark.parametrize("arch", ARCHS)
def test_compiling_a_causal_lm_exports_once_and_its_first_generate_exports_nothing(arch, exports):
    model = build_hf(arch)
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules="all-linear"))
    assert len(exports) == 1
    with am.disable_adapters():
        assert torch.equal(am.generate(ids, max_new_tokens=4, do_sample=False),
                           model.generate(ids, max_new_tokens=4, do_sample=False))
    assert len(exports) == 1


class StretchedLlama(transformers.LlamaForCausalLM):
    """A Llama whose default positions step by 2 (a shift alone would change nothing: rotary attention sees
    differences of positions): no rule of ``POSITION_DEFAULTS`` makes them."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        if position_ids is None:
            past = 0 if cache is None else cache.get_seq_length()
            position_ids = 2 * torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, **kwargs)


def test_a_model_whose_default_positions_no_rule_makes_has_its_forward_captured_on_its_own(exports):
    torch.manual_seed(0)
    config = build_hf("llama", initializer_range=0.2).config
    model = StretchedLlama(config).to(DEVICE).eval()
    captured, graphs = capture_model(model)
    assert len(exports) == 2 and graphs is not None
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        ours = captured.call(captured.graph_module, input_ids=ids).logits
        assert torch.equal(ours, model(input_ids=ids).logits)
        plain = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(ours, plain(input_ids=ids).logits, atol=1e-4), "the stretch changes nothing"


def test_example_inputs_or_a_model_without_a_head_keep_the_forward_capture_alone(exports):
    model = build_hf("llama")
    ids = torch.randint(0, VOCAB, (2, 8)).to(DEVICE)
    captured, graphs = capture_model(model, example_kwargs={"input_ids": ids})
    assert graphs is None and captured.input_names == ("input_ids",) and len(exports) == 1
    captured, graphs = capture_model(model.model)  # the decoder alone: no output head, nothing to generate
    assert graphs is None and len(exports) == 2


def test_a_step_graph_using_its_past_otherwise_is_refused_by_name_and_left_untouched():
    graphs = capture_with_cache(build_hf("llama"))
    gm = graphs.step
    key = next(n for n in gm.graph.find_nodes(op="placeholder") if n.target == "value_1")
    with gm.graph.inserting_after(key):
        gm.graph.call_function(torch.ops.aten.mul.Tensor, (key, 2.0))
    before = str(gm.graph)
    with pytest.raises(CaptureError, match=r"uses its past 'value_1' in .*mul"):
        ForwardFromStep(graphs.cache_names, lambda *_: None).requires(gm)
    assert str(gm.graph) == before
