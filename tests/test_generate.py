"""Generation with KV caches gives PEFT's ``generate`` output token for token: X-LoRA (PEFT re-runs both passes on the
whole sequence each step; ours caches both) and RoAd (single adapter, mixed batches), on tiny Llama and Qwen2.

Each module captures its cached graphs once, at its first ``generate``; the fixtures are per module and architecture.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
from conftest import build_hf, peft_road, token_batch
from peft import RoadConfig as PeftRoadConfig
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from xlora_helpers import peft_classifier_state, peft_xlora, save_experts

import fx_adapters as fxa

pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning",
                                        "ignore:`isinstance(treespec, LeafSpec)`:FutureWarning")
NEW = 32
# Weak random experts leave a tiny random model repeating one token, where token equality says little.
SPECS = (dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
         dict(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
         dict(r=2, lora_alpha=16, target_modules=["embed_tokens", "k_proj", "o_proj", "up_proj"]))
XLORA = dict(xlora_depth=2, xlora_size=32, layerwise_scalings=True)


def padded_batch():
    """Three prompts, two of them left-padded by different amounts."""
    ids, mask = token_batch(3, 7, left_pad=2)
    mask[2, :4] = 0
    return ids, mask


PROMPTS = {"batch-1-no-mask": lambda: (token_batch(1, 7)[0], None), "left-padded-batch": padded_batch}


def peft_generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **kwargs)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def xlora(request, tmp_path_factory):
    model = build_hf(request.param)
    dirs = save_experts(model, tmp_path_factory.mktemp(f"xlora-{request.param}"), specs=SPECS)
    peft_model = peft_xlora(model, dirs, **XLORA)
    ours = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={f"e{i}": d for i, d in enumerate(dirs)}, **XLORA))
    ours.classifier.load_state_dict(peft_classifier_state(peft_model))
    return SimpleNamespace(model=model, peft=peft_model, ours=ours)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_xlora_tokens_equal_peft(xlora, prompt):
    ids, mask = PROMPTS[prompt]()
    expected = peft_generate(xlora.peft, ids, mask)
    assert not torch.equal(expected, peft_generate(xlora.model, ids, mask))  # the experts change the tokens
    assert torch.equal(xlora.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask), expected)


def test_latest_scalings_after_generate_equal_peft_last_step(xlora):
    ids, mask = padded_batch()
    peft_generate(xlora.peft, ids, mask)
    xlora.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    expected = xlora.peft.get_latest_scalings()
    assert expected.shape[1] == ids.shape[1] + NEW - 1
    torch.testing.assert_close(xlora.ours.get_latest_scalings(), expected, atol=1e-5, rtol=0)


def test_scalings_log_has_every_step_as_peft(xlora):
    ids, mask = padded_batch()
    logs = []
    for module, xlora_model in ((xlora.peft, xlora.peft.base_model), (xlora.ours, xlora.ours)):
        xlora_model.enable_scalings_logging()
        try:
            peft_generate(module, ids, mask) if module is xlora.peft else module.generate(ids, max_new_tokens=NEW,
                                                                                            attention_mask=mask)
            logs.append(xlora_model.get_scalings_log())
        finally:
            xlora_model.disable_scalings_logging()
            xlora_model.clear_scalings_log()
    assert len(logs[1]) == len(logs[0]) == NEW
    for ours, expected in zip(logs[1], logs[0]):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_runtime_settings_reach_generate(xlora):
    ids, mask = padded_batch()
    modules = (xlora.peft.base_model, xlora.ours)
    try:
        for module in modules:
            module.set_topk_lora(2)
            module.set_global_scaling_weight(1.5)
            module.set_scaling_pass_value(0.2)
        expected = peft_generate(xlora.peft, ids, mask)
        assert torch.equal(xlora.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask), expected)
    finally:
        for module in modules:
            module.set_topk_lora(None)
            module.set_global_scaling_weight(1.0)
            module.set_scaling_pass_value(0.0)


def test_sampling_with_a_seed_equals_peft_sampling(xlora):
    ids, mask = padded_batch()
    options = dict(max_new_tokens=NEW, attention_mask=mask, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = xlora.peft.generate(input_ids=ids, **options)
    torch.manual_seed(0)
    assert torch.equal(xlora.ours.generate(ids, **options), expected)


def test_generation_stops_at_eos_and_pads_as_peft(xlora):
    ids, mask = padded_batch()
    eos = int(peft_generate(xlora.peft, ids, mask)[0, ids.shape[1] + 4])  # row 0 emits it after 4 tokens
    expected = peft_generate(xlora.peft, ids, mask, eos_token_id=eos, pad_token_id=0)
    got = xlora.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    assert (got[0, ids.shape[1] + 5:] == 0).all()


def test_xlora_beam_search_with_penalties_equals_peft_and_its_scalings_follow_the_beams(xlora):
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = xlora.peft.generate(input_ids=ids, attention_mask=mask, **BEAMS)
        assert not torch.equal(xlora.model.generate(input_ids=ids, attention_mask=mask, **BEAMS), expected)
    assert torch.equal(xlora.ours.generate(input_ids=ids, attention_mask=mask, **BEAMS), expected)
    torch.testing.assert_close(xlora.ours.get_latest_scalings(), xlora.peft.get_latest_scalings(), atol=1e-5, rtol=0)


def test_disabled_xlora_generates_the_base_model(xlora):
    ids, mask = padded_batch()
    xlora.ours.disable_adapter_layers()
    try:
        got = xlora.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    finally:
        xlora.ours.enable_adapter_layers()
    assert torch.equal(got, peft_generate(xlora.model, ids, mask))


# ------------------------------------------------------------------------------------------------ RoAd


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def road(request, tmp_path_factory):
    """PEFT's RoAd model with adapters "default" and "second"; ours loads them as "first" and "second".

    Initialized at 10× the default scale: the default tiny model attends almost uniformly, so its greedy tokens did
    not depend on the decode positions (a decode at position 0 gave PEFT's tokens)."""
    model = build_hf(request.param, initializer_range=0.2)
    torch.manual_seed(1)
    peft_model = peft_road(model, variant="road_2", group_size=8, init_weights=False, target_modules="all-linear")
    peft_model.add_adapter("second", PeftRoadConfig(variant="road_4", group_size=4, init_weights=False,
                                                    target_modules=["q_proj", "v_proj", "down_proj"]))
    directory = tmp_path_factory.mktemp(f"road-{request.param}")
    peft_model.save_pretrained(directory)
    ours = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules=["q_proj"]), adapter_name="init")
    ours.load_adapter(directory, adapter_name="first")
    ours.load_adapter(directory / "second", adapter_name="second")
    ours.set_adapter("first")
    peft_model.set_adapter("default")
    return SimpleNamespace(model=model, peft=peft_model, ours=ours.eval(), directory=directory)


class TokenRecorder(BaseStreamer):
    """A streamer keeping what ``generate`` streams: the prompt, then each step's tokens."""

    def __init__(self):
        self.tokens = []

    def put(self, value):
        self.tokens.append(value.clone())

    def end(self):
        self.tokens.append("end")


class BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.index_fill(-1, torch.tensor([self.token]), -float("inf"))


class StopAt(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length)


# num_beams with num_return_sequences, repetition and n-gram penalties, a minimum length: every beam reorders the cache
BEAMS = dict(num_beams=3, num_return_sequences=2, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=6,
             max_new_tokens=8, length_penalty=0.5)


def test_road_beam_search_with_penalties_equals_peft(road):
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = road.peft.generate(input_ids=ids, attention_mask=mask, **BEAMS)
        with road.peft.disable_adapter():
            assert not torch.equal(road.peft.generate(input_ids=ids, attention_mask=mask, **BEAMS), expected)
    assert torch.equal(road.ours.generate(input_ids=ids, attention_mask=mask, **BEAMS), expected)


def test_road_generation_config_logits_processor_stopping_criteria_and_streamer_as_peft(road):
    ids, mask = padded_batch()
    banned = int(peft_generate(road.peft, ids, mask)[0, ids.shape[1]])  # row 0's first greedy token
    outputs, streams = [], []
    config = GenerationConfig(max_new_tokens=10, do_sample=True, top_k=10, return_dict_in_generate=True,
                              output_scores=True)
    for module in (road.peft, road.ours):
        streams.append(TokenRecorder())
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(module.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, streamer=streams[-1],
                logits_processor=LogitsProcessorList([BanToken(banned)]),
                stopping_criteria=StoppingCriteriaList([StopAt(ids.shape[1] + 5)])))
    expected, got = outputs
    assert expected.sequences.shape[1] == ids.shape[1] + 5 and (expected.sequences[:, ids.shape[1]:] != banned).all()
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-5, rtol=0)
    ours, theirs = ([t if isinstance(t, str) else t.tolist() for t in stream.tokens] for stream in streams[::-1])
    assert len(ours) == 7 and ours == theirs  # the prompt, five tokens, the end


def test_road_mixed_batch_beams_keep_each_prompt_adapter_as_peft_row_by_row(road):
    ids, mask = padded_batch()
    got = road.ours.generate(ids[:2], attention_mask=mask[:2], adapter_names=["second", "first"], **BEAMS)
    for row, adapter in enumerate(("second", "default")):
        road.peft.set_adapter(adapter)
        try:
            with torch.no_grad():
                expected = road.peft.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], **BEAMS)
        finally:
            road.peft.set_adapter("default")
        assert torch.equal(got[2 * row:2 * row + 2], expected)


def test_greedy_road_tokens_equal_peft(road):
    ids, mask = padded_batch()
    expected = peft_generate(road.peft, ids, mask)
    assert not torch.equal(expected, peft_generate(road.model, ids, mask))  # the adapter changes the tokens
    assert torch.equal(road.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask), expected)


def test_road_mixed_batch_tokens_equal_peft(road):
    ids, mask = padded_batch()
    expected = peft_generate(road.peft, ids, mask, adapter_names=["second", "__base__", "default"])
    got = road.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask,
                             adapter_names=["second", "__base__", "first"])
    assert torch.equal(got, expected)


def test_road_generate_reads_merged_weights(road):
    ids, mask = padded_batch()
    road.ours.generate(ids, max_new_tokens=2, attention_mask=mask)  # graphs built before the merge
    road.ours.merge()
    try:
        got = road.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    finally:
        road.ours.unmerge()
    assert torch.equal(got, peft_generate(road.peft, ids, mask))


def test_road_generate_follows_adapters_added_after_it_ran(road):
    ids, mask = padded_batch()
    road.ours.generate(ids, max_new_tokens=2, attention_mask=mask)
    road.ours.load_adapter(road.directory / "second", adapter_name="late")  # new rotations on other layers
    try:
        got = road.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask, adapter_names=["late"] * 3)
    finally:
        road.ours.delete_adapter("late")
    assert torch.equal(got, peft_generate(road.peft, ids, mask, adapter_names=["second"] * 3))


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argument", [dict(assistant_model=object()), dict(cache_implementation="static"),
                                      dict(return_dict_in_generate=True, output_hidden_states=True),
                                      dict(generation_config=GenerationConfig(prompt_lookup_num_tokens=3))])
def test_generation_arguments_the_cached_graphs_cannot_serve_raise_naming_them_before_any_token(road, argument):
    ids, _ = token_batch(1, 5)
    streamer = TokenRecorder()
    name = next(n for n in ("assistant_model", "cache_implementation", "output_hidden_states",
                            "prompt_lookup_num_tokens") if n in argument or n in str(argument))
    with pytest.raises(ValueError, match=f"generate: {name}="):
        road.ours.generate(ids, max_new_tokens=4, streamer=streamer, **argument)
    assert streamer.tokens == []


def test_module_of_a_plain_model_cannot_generate():
    am = fxa.compile_with_road(nn.Sequential(nn.Linear(4, 8)).eval(),
                               fxa.RoadConfig(group_size=4, target_modules="all-linear"))
    with pytest.raises(TypeError, match="compiled from a Sequential, not a transformers causal LM"):
        am.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)


def test_unpickled_module_asks_for_its_model(xlora):
    restored = pickle.loads(pickle.dumps(xlora.ours))
    with pytest.raises(TypeError, match=r"unpickled.*fx_adapters\.graph\.generation\.attach\(module, model\)"):
        restored.generate(token_batch(1, 3)[0], max_new_tokens=2)


# --------------------------------------------------------------------------------------- other architectures


def greedy_without_cache(module, ids, new, **kwargs):
    """The oracle for the cache: re-run the whole sequence for every token and take the argmax."""
    with torch.no_grad():
        for _ in range(new):
            next_token = module(input_ids=ids, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids


@pytest.mark.parametrize("arch", ["gpt2", "opt", "mistral"])
def test_generate_on_other_architectures_equals_greedy_without_cache(arch):
    """GPT-2 (Conv1D, learned positions), OPT (batch-folding MLP) and Mistral: the cached graphs give the tokens of
    re-running the compiled forward, whose equivalence with PEFT / eager math the other tests establish.

    These tiny models repeat one token whatever a mild adapter does, so the rotations are strong (θ in ±π, α in
    [0.5, 3.5]) and the adapted row is checked to generate other, varying tokens than the base row of the same prompt.
    """
    am = fxa.compile_with_road(build_hf(arch), fxa.RoadConfig(group_size=8, target_modules="all-linear",
                                                              init_weights=False)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (_, kind), param in am.adapter_parameters("default").items():
            draw = torch.rand(param.shape, generator=g)
            param.copy_((2 * draw - 1) * torch.pi if kind == "road_theta" else 0.5 + 3 * draw)
    ids = token_batch(1, 5)[0].repeat(2, 1)
    names = ["default", "__base__"]
    expected = greedy_without_cache(am, ids, 8, adapter_names=names)
    adapted, base = expected[:, 5:]
    assert not torch.equal(adapted, base) and len(adapted.unique()) > 1
    assert torch.equal(am.generate(ids, max_new_tokens=8, adapter_names=names, eos_token_id=[]), expected)
