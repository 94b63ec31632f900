"""The benchmark rows of issue 15 (``benchmarks/rows.py`` generate bars, ``benchmarks/coldstart.py``): what they check
before timing, how they count captures and judge the goals; tiny sizes, nothing timed against a goal here."""

from __future__ import annotations

import pytest
import torch

from benchmarks import coldstart
from benchmarks.rows import checked_tokens, generate_batch

PROMPT = generate_batch()["input_ids"].shape[1]


def generated(new_tokens: torch.Tensor):
    """A stand-in ``generate`` call returning the benchmark prompt followed by ``new_tokens``."""
    return lambda: torch.cat([generate_batch()["input_ids"], new_tokens], dim=1)


def test_generate_rows_return_the_new_tokens_when_ours_equal_peft():
    tokens = torch.ones(4, 3, dtype=torch.long)
    got = checked_tokens({"base": generated(tokens + 1), "peft": generated(tokens), "ours": generated(tokens)}, 3, "x")
    assert torch.equal(got["ours"], tokens) and torch.equal(got["base"], tokens + 1)


def test_generate_rows_refuse_to_time_when_ours_and_peft_chose_different_tokens():
    tokens = torch.ones(4, 3, dtype=torch.long)
    with pytest.raises(AssertionError, match="RoAd generate: fx_adapters and PEFT chose different tokens"):
        checked_tokens({"base": generated(tokens), "peft": generated(tokens), "ours": generated(tokens + 1)}, 3,
                       "RoAd generate")


def test_generate_rows_refuse_to_time_a_call_that_stopped_early():
    tokens = torch.ones(4, 3, dtype=torch.long)
    with pytest.raises(AssertionError, match="base stopped before 3 new tokens"):
        checked_tokens({"base": generated(tokens[:, :2]), "peft": generated(tokens), "ours": generated(tokens)}, 3,
                       "X-LoRA generate")


@pytest.fixture(scope="module")
def cold():
    """The cold start of the base model and of RoAd on the tiny model, measured in this process."""
    return {c: coldstart.measure(c, "tiny") for c in ("base", "road")}


def test_cold_start_counts_the_one_capture_at_compile_and_none_at_the_first_generate(cold):
    road = cold["road"]
    assert road["exports_compile"] == len(road["forward_signatures"]) == 1
    assert road["exports_generate"] == 0  # the step graph captured at compile serves generate
    assert cold["base"]["exports_compile"] == cold["base"]["exports_generate"] == 0


def test_cold_start_of_identity_adapters_generates_the_base_models_tokens(cold):
    assert cold["road"]["tokens"] == cold["base"]["tokens"]
    assert len(cold["road"]["tokens"][0]) == coldstart.NEW_TOKENS
    assert cold["road"]["compile_s"] > 0 and cold["road"]["generate_s"] > 0


def test_cold_start_counter_restores_torch_export():
    original = torch.export.export
    with coldstart.CountExports():
        assert torch.export.export is not original
    assert torch.export.export is original


@pytest.mark.parametrize("generate_s, exports_generate, met", [(1.2, 1, [True, True]), (1.3, 2, [False, False])])
def test_cold_start_lines_judge_first_generate_over_compile_and_the_extra_captures(generate_s, exports_generate, met):
    ours = {"compile_s": 1.0, "generate_s": generate_s, "exports_compile": 1, "exports_generate": exports_generate}
    peft = {"compile_s": 0.1, "generate_s": 0.5}
    lines = coldstart.method_lines("road", ours, peft)
    assert [line.met for line in lines[2:]] == met
    assert lines[3].ours == f"1 + {exports_generate}"
