"""Generation with KV caches gives PEFT's ``generate`` output token for token: X-LoRA (PEFT re-runs both passes on the
whole sequence each step; ours caches both) and RoAd (single adapter, mixed batches), on tiny Llama and Qwen2.

Each module captures its cached step graph once, at its first ``generate`` (or ``forward(use_cache=True)``, which
gives PEFT's logits and a cache to feed back); the fixtures are per module and architecture.
"""

from __future__ import annotations

import copy
import functools
import pickle
from types import SimpleNamespace

import pytest
import torch
from conftest import build_hf, peft_road, token_batch
from peft import RoadConfig as PeftRoadConfig
from torch import nn
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from xlora_helpers import peft_classifier_state, peft_to, peft_xlora, save_experts

import fx_adapters as fxa
from fx_adapters.graph.capture import CaptureError

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


def test_xlora_generate_after_a_dtype_move_equals_peft_after_the_same_move(tmp_path):
    model = build_hf("llama")
    dirs = save_experts(model, tmp_path, specs=SPECS[:2])
    peft_model = peft_xlora(model, dirs, **XLORA)
    ours = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={f"e{i}": d for i, d in enumerate(dirs)}, **XLORA))
    ours.classifier.load_state_dict(peft_classifier_state(peft_model))
    ids, mask = padded_batch()
    ours.generate(ids, attention_mask=mask, max_new_tokens=2)  # the float32 step graph exists before the move
    ours.to(torch.float64), peft_to(peft_model, torch.float64)
    expected = peft_generate(peft_model, ids, mask)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=NEW), expected)
    torch.testing.assert_close(ours.get_latest_scalings(), peft_model.get_latest_scalings(), atol=1e-6, rtol=0)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_generate_after_a_dtype_move_equals_peft_after_the_same_move(dtype, tmp_path):
    model = build_hf("llama", initializer_range=0.2)
    torch.manual_seed(1)
    peft_model = peft_road(model, variant="road_2", group_size=8, init_weights=False, target_modules="all-linear")
    peft_model.save_pretrained(tmp_path)
    ours = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules=["q_proj"]), adapter_name="init")
    ours.load_adapter(tmp_path, adapter_name="first")
    ours.set_adapter("first")
    ids, mask = padded_batch()
    ours.generate(ids, attention_mask=mask, max_new_tokens=2)  # the float32 step graph exists before the move
    ours.to(dtype), peft_model.to(dtype)
    expected = peft_generate(peft_model, ids, mask)
    with peft_model.disable_adapter():
        assert not torch.equal(expected, peft_generate(peft_model, ids, mask))  # the adapter changes the tokens
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=NEW), expected)


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


def generate_flops(generate) -> int:
    """The floating-point operations (matmuls and attention) of a greedy ``generate`` of 4 tokens on
    ``padded_batch()``."""
    from torch.utils.flop_counter import FlopCounterMode

    ids, mask = padded_batch()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    return counter.get_total_flops()


def test_road_generate_runs_the_matmuls_of_transformers_own_generate(road):
    """The prompt's output head runs on its last position only, as transformers' ``generate`` has the model do
    (``logits_to_keep=1``): with adapters disabled (RoAd adds elementwise ops only), our generate counts the
    floating-point operations of the model's own (``FlopCounterMode``)."""
    ids, mask = padded_batch()
    road.ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1)  # capture outside the counter
    with road.ours.disable_adapters():
        ours = generate_flops(road.ours.generate)
    assert ours == generate_flops(road.model.generate)


def test_disabled_xlora_generate_runs_the_matmuls_of_transformers_own_generate(xlora):
    ids, mask = padded_batch()
    xlora.ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1)  # capture outside the counter
    xlora.ours.disable_adapter_layers()
    try:
        ours = generate_flops(xlora.ours.generate)
    finally:
        xlora.ours.enable_adapter_layers()
    assert ours == generate_flops(xlora.model.generate)


def test_road_decode_step_frees_each_layers_past_once_extended_as_the_model_does(road):
    """The eager model drops layer 0's past keys as soon as it has concatenated the new ones; so must a step (its
    graph is boxed, its cache list emptied), or every step's new cache takes fresh memory while the old one lives."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from fx_adapters.graph import generation
    from fx_adapters.road.generation import road_step

    ids, mask = padded_batch()
    source = generation.source_of(road.ours)
    step = road_step(road.ours, source, road.ours.road_input(None, ids.shape[0]), last_logits=True)
    given = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        _, cache = step(tuple(given[n] for n in source.captured.input_names), [])
    past = list(cache)
    del cache
    first_key, second_key = weakref.ref(past[0]), id(past[2])
    seen = []

    class WatchConcatenations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.cat.default and id(args[0][0]) == second_key:
                seen.append(first_key() is None)  # layer 1 extends its past: is layer 0's gone?
            return func(*args, **(kwargs or {}))

    new = {"input_ids": ids[:, -1:], "attention_mask": torch.cat([mask, torch.ones_like(mask[:, :1])], -1),
           "position_ids": given["position_ids"][:, -1:] + 1}
    with torch.no_grad(), WatchConcatenations():
        step(tuple(new[n] for n in source.captured.input_names), past)
    assert seen == [True]


def attention_masks_of_decode_steps(call, layers: int) -> list[bool]:
    """Whether each attention of ``call``'s decode steps (after the prompt's ``layers`` attentions) was given a mask,
    as the dispatcher sees it (SDPA takes query, key, value and maybe a mask as tensors)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class WatchAttention(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "scaled_dot_product" in func.__name__:
                seen.append(sum(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())) > 3)
            return func(*args, **kwargs)

    with torch.no_grad(), WatchAttention():
        call()
    return seen[layers:]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_decode_steps_attend_with_a_mask_exactly_where_transformers_does_and_give_peft_logits(road, padded):
    """transformers skips the attention mask of a decode step when no row is padded; so do our steps (the graph's
    ``unmasked_twin``), with PEFT's logits at every step either way."""
    ids, mask = padded_batch() if padded else (token_batch(3, 7)[0], None)
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                   return_dict_in_generate=True)
    ours = road.ours.generate(ids, **options)
    with torch.no_grad():
        theirs = road.peft.generate(input_ids=ids, **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    for got, want in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    layers = road.model.config.num_hidden_layers
    masked = attention_masks_of_decode_steps(lambda: road.ours.generate(ids, **options), layers)
    assert masked == attention_masks_of_decode_steps(lambda: road.peft.generate(input_ids=ids, **options), layers)
    assert masked and all(masked) == padded and any(masked) == padded
    with road.ours.disable_adapters():  # the base model's steps too
        masked = attention_masks_of_decode_steps(lambda: road.ours.generate(ids, **options), layers)
    assert masked == attention_masks_of_decode_steps(lambda: road.model.generate(input_ids=ids, **options), layers)


@pytest.mark.parametrize("decode_scalings", ["token", "prompt"])
def test_xlora_decode_steps_attend_with_a_mask_only_for_padded_rows_and_give_peft_tokens(xlora, decode_scalings):
    """Both passes' attentions, as transformers' model would run them step by step (PEFT's X-LoRA re-runs the whole
    sequence, so only its tokens compare); the exact mode's tokens equal PEFT's either way."""
    layers = 2 * xlora.model.config.num_hidden_layers  # the prompt's two passes
    for ids, mask in (token_batch(2, 6), padded_batch()):
        padded = not bool(mask.all())
        options = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, decode_scalings=decode_scalings)
        masked = attention_masks_of_decode_steps(functools.partial(xlora.ours.generate, ids, **options), layers)
        assert masked and all(masked) == padded and any(masked) == padded
        if decode_scalings == "token":
            expected = peft_generate(xlora.peft, ids, mask)[:, :ids.shape[1] + 4]
            assert torch.equal(xlora.ours.generate(ids, **options), expected)


def test_a_model_with_a_sliding_window_keeps_its_decode_mask():
    from fx_adapters.graph.generation import attends_to_whole_past

    assert attends_to_whole_past(build_hf("llama")) and attends_to_whole_past(build_hf("qwen2"))
    mistral = build_hf("mistral", sliding_window=4)
    assert not attends_to_whole_past(mistral)
    am = fxa.compile_with_road(mistral, fxa.RoadConfig(group_size=8, target_modules=["q_proj"], init_weights=False))
    ids = token_batch(2, 3)[0]  # the window slides within the 6 new tokens
    options = dict(max_new_tokens=6, do_sample=False)
    masked = attention_masks_of_decode_steps(lambda: am.generate(ids, **options), mistral.config.num_hidden_layers)
    assert masked and all(masked)
    with am.disable_adapters():
        assert torch.equal(am.generate(ids, **options), mistral.generate(ids, **options))


# ----------------------------------------------------------------------------------- forward(use_cache=True)


def peft_forward(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs, use_cache=True)


@pytest.fixture(scope="module")
def cached(road):
    """``road`` with a module of its own, loaded from the same PEFT directory: the shared module's merge → unmerge
    (an earlier test) leaves its outputs ~1e-4 from PEFT's, which is not what these tests are about."""
    ours = fxa.compile_with_road(road.model, fxa.RoadConfig(group_size=8, target_modules=["q_proj"]),
                                 adapter_name="init")
    ours.load_adapter(road.directory, adapter_name="first")
    ours.load_adapter(road.directory / "second", adapter_name="second")
    ours.set_adapter("first")
    return SimpleNamespace(model=road.model, peft=road.peft, ours=ours.eval())


def test_use_cache_forward_fed_back_token_by_token_gives_peft_logits_and_cache(cached):
    """A left-padded prompt, then one token at a time: each call takes the cache the previous one returned."""
    ids, mask = padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt = dict(input_ids=ids[:, :4], attention_mask=mask[:, :4], position_ids=positions[:, :4])
    expected = peft_forward(cached.peft, **prompt)
    with torch.no_grad():
        got = cached.ours(**prompt, use_cache=True)
    for end in range(5, ids.shape[1] + 1):
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
        step = dict(input_ids=ids[:, end - 1:end], attention_mask=mask[:, :end], position_ids=positions[:, end - 1:end])
        expected = peft_forward(cached.peft, **step, cache=expected.cache)
        with torch.no_grad():
            got = cached.ours(**step, cache=got.cache, use_cache=True)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    assert got.cache.get_seq_length() == ids.shape[1]
    for ours, theirs in zip(got.cache.layers, expected.cache.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=0)


def test_use_cache_forward_continues_a_cache_the_model_made_with_a_mixed_batch(cached):
    """A cache from the base model's own forward, fed as ``past_key_values``, then two new tokens at once; per-sample
    adapters (``__base__`` gives the model itself)."""
    ids, _ = token_batch(2, 7)
    with torch.no_grad():
        made = cached.model(input_ids=ids[:, :5], use_cache=True).cache
        got = cached.ours(input_ids=ids[:, 5:], past_key_values=copy.deepcopy(made), use_cache=True,
                        adapter_names=["second", "__base__"])
    expected = peft_forward(cached.peft, input_ids=ids[:, 5:], cache=copy.deepcopy(made),
                            adapter_names=["second", "__base__"])
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    with torch.no_grad():  # the model's own continuation of its cache, for the __base__ row
        torch.testing.assert_close(got.logits[1], cached.model(input_ids=ids[1:, 5:], cache=_row(made, 1),
                                                             use_cache=True).logits[0], atol=1e-5, rtol=0)
    assert not torch.allclose(got.logits[0], cached.model(input_ids=ids[:1], use_cache=False).logits[0, 5:], atol=1e-3)


def _row(cache, row: int):
    cache = copy.deepcopy(cache)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[row:row + 1], layer.values[row:row + 1]
    return cache


def test_use_cache_forward_without_a_cache_returns_the_model_tuple_with_return_dict_false(cached):
    ids, _ = token_batch(2, 5)
    with torch.no_grad():
        logits, cache = cached.ours(input_ids=ids, use_cache=True, return_dict=False)
    expected = peft_forward(cached.peft, input_ids=ids)
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 5


@pytest.mark.parametrize(("arguments", "named"), [
    (lambda ids: dict(labels=ids), "'labels'"),
    (lambda ids: dict(attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0)), "position_ids"),
    (lambda ids: dict(cache=DynamicCache(config=build_hf("mistral", sliding_window=4).config)), "DynamicSlidingWindow"),
    (lambda ids: dict(train=True), "eval mode"),
])
def test_use_cache_forward_it_cannot_serve_raises_a_capture_error_naming_the_argument(cached, arguments, named):
    ids, _ = token_batch(2, 5)
    kwargs = arguments(ids)
    cached.ours.train(kwargs.pop("train", False))
    try:
        with pytest.raises(CaptureError, match=named):
            cached.ours(input_ids=ids, use_cache=True, **kwargs)
    finally:
        cached.ours.eval()


def test_xlora_forward_with_use_cache_raises_a_capture_error_pointing_to_generate(xlora):
    with pytest.raises(CaptureError, match=r"use_cache=True.*call generate\(\)"):
        xlora.ours(input_ids=token_batch(1, 4)[0], use_cache=True)


# ------------------------------------------------------------------------------------------------ captures


def test_compile_exports_one_graph_that_forward_generate_and_use_cache_forward_all_reuse(monkeypatch):
    """A causal LM is exported once, at compile, as its cached step graph (``forward_from_step``): its forward is
    derived from it, and the prompt and the decode steps share it. Neither forward, generate (greedy or beam), forward
    with use_cache=True, nor X-LoRA's prompt-scalings mode exports again."""
    exports = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    model = build_hf("llama")
    ids, mask = padded_batch()
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=8, target_modules=["q_proj"], init_weights=False))
    assert len(exports) == 1
    am(input_ids=ids, attention_mask=mask)
    am.generate(ids, attention_mask=mask, max_new_tokens=3)
    am.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2)
    with torch.no_grad():
        am(input_ids=ids[:, :1], use_cache=True)
    assert len(exports) == 1
    xm = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={"e0": expert(model, 0), "e1": expert(model, 1)},
                                                       xlora_size=16))
    xm(input_ids=ids, attention_mask=mask)
    xm.generate(ids, attention_mask=mask, max_new_tokens=3)
    xm.generate(ids, attention_mask=mask, max_new_tokens=3, decode_scalings="prompt")
    assert len(exports) == 2


def expert(model, seed: int, r: int = 2):
    """A random LoRA expert on every q_proj of ``model``, as (adapter_config, weights)."""
    g = torch.Generator().manual_seed(seed)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    return {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r}, {
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.randn(shape, generator=g)
        for i in range(layers) for ab, shape in (("A", (r, hidden)), ("B", (hidden, r)))}


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
