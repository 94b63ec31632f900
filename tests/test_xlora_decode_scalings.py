"""X-LoRA ``generate(decode_scalings="prompt")``: the prefill runs both passes exactly, each decode step runs the real
pass alone with the scalings of the sequence's last prompt token. PEFT has no such mode, so the oracle is the eager
transformers model with forward hooks adding the experts' LoRA deltas under those per-position scalings
(``xlora_helpers.eager_xlora``), re-run on the whole sequence for every new token (no cache).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import build_hf, token_batch
from xlora_helpers import eager_xlora, peft_classifier_state, peft_xlora, save_experts

import fx_adapters as fxa

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance(treespec, LeafSpec)`:FutureWarning")
NEW = 10
# Strong experts, so that the scalings change the tokens (weak ones leave a tiny model repeating one token).
SPECS = (dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
         dict(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
         dict(r=2, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"]))
XLORA = dict(xlora_depth=2, xlora_size=32, layerwise_scalings=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = build_hf("llama")
    dirs = save_experts(model, tmp_path_factory.mktemp("xlora-decode"), specs=SPECS)
    ours = fxa.compile_with_xlora(model, fxa.XLoraConfig(adapters={f"e{i}": d for i, d in enumerate(dirs)}, **XLORA))
    peft = peft_xlora(model, dirs, **XLORA)
    ours.classifier.load_state_dict(peft_classifier_state(peft))
    return SimpleNamespace(model=model, dirs=dirs, ours=ours, peft=peft)


def left_padded():
    ids, mask = token_batch(3, 7, seed=3, left_pad=2)
    mask[2, :4] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def reference_prompt_generate(model, peft, dirs, ids, mask, new):
    """Greedy tokens, each from a full re-run: prompt positions with PEFT's classifier's scalings of the prompt,
    later positions with the last prompt token's."""
    with torch.no_grad():
        peft(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        prompt = peft.get_latest_scalings()
        tokens = ids
        for _ in range(new):
            extra = tokens.shape[1] - ids.shape[1]
            scalings = torch.cat([prompt, prompt[:, -1:].expand(-1, extra, -1, -1)], dim=1)
            logits, _ = eager_xlora(model, None, dirs, tokens, scalings, attention_mask=mask,
                                    position_ids=positions(mask), use_cache=False)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    return tokens


def test_prompt_mode_equals_an_eager_model_that_keeps_the_last_prompt_tokens_scalings(setup):
    ids, mask = left_padded()
    expected = reference_prompt_generate(setup.model, setup.peft, setup.dirs, ids, mask, NEW)
    got = setup.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask, decode_scalings="prompt")
    assert torch.equal(got, expected)
    exact = setup.ours.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    assert not torch.equal(got, exact)  # the mode changes the tokens here: the comparison above says something


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_the_first_new_token_is_the_exact_modes(setup, sampling):
    ids, mask = left_padded()
    options = dict(max_new_tokens=4, attention_mask=mask, do_sample=sampling, top_k=20)
    torch.manual_seed(7)
    exact = setup.ours.generate(ids, **options)
    torch.manual_seed(7)
    prompt = setup.ours.generate(ids, **options, decode_scalings="prompt")
    assert torch.equal(prompt[:, :ids.shape[1] + 1], exact[:, :ids.shape[1] + 1])


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_a_classifier_whose_output_ignores_the_token_gives_the_exact_modes_tokens(setup, sampling):
    last = setup.ours.classifier.layers[-1]
    saved = {k: v.clone() for k, v in last.state_dict().items()}
    ids, mask = left_padded()
    options = dict(max_new_tokens=NEW, attention_mask=mask, do_sample=sampling)
    try:
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.randn(last.bias.shape, generator=torch.Generator().manual_seed(1)) * 3)
        torch.manual_seed(3)
        exact = setup.ours.generate(ids, **options)
        torch.manual_seed(3)
        prompt = setup.ours.generate(ids, **options, decode_scalings="prompt")
    finally:
        last.load_state_dict(saved)
    assert torch.equal(prompt, exact)


def test_latest_scalings_and_the_log_hold_the_scalings_each_position_used(setup):
    ids, mask = left_padded()
    xm = setup.ours
    xm.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    exact = xm.get_latest_scalings()
    xm.enable_scalings_logging()
    try:
        xm.generate(ids, max_new_tokens=NEW, attention_mask=mask, decode_scalings="prompt")
        log = xm.get_scalings_log()
    finally:
        xm.disable_scalings_logging()
        xm.clear_scalings_log()
    latest, p = xm.get_latest_scalings(), ids.shape[1]
    assert latest.shape == exact.shape == (3, p + NEW - 1, len(xm.targets), len(xm.experts))
    torch.testing.assert_close(latest[:, :p], exact[:, :p], atol=1e-6, rtol=0)  # the prompt: exact
    assert torch.equal(latest[:, p:], latest[:, p - 1:p].expand(-1, NEW - 1, -1, -1))
    assert [s.shape[1] for s in log] == list(range(p, p + NEW))  # one entry per step, as the exact mode
    assert torch.equal(log[-1], latest)


def test_an_unknown_decode_scalings_value_is_refused_naming_the_allowed_ones(setup):
    ids, _ = token_batch(2, 5)
    before = setup.ours.get_latest_scalings()
    with pytest.raises(ValueError, match=r"decode_scalings='per-layer'.*'token', 'prompt'"):
        setup.ours.generate(ids, max_new_tokens=2, decode_scalings="per-layer")
    assert setup.ours.get_latest_scalings() is before


def test_prompt_scalings_on_a_forward_call_are_refused_naming_the_allowed_values(setup):
    ids, _ = token_batch(2, 5)
    before = setup.ours.get_latest_scalings()
    with pytest.raises(ValueError, match=r"forward: decode_scalings='prompt' applies to generate only.*'token', "
                                         r"'prompt'"):
        setup.ours(input_ids=ids, decode_scalings="prompt")
    assert setup.ours.get_latest_scalings() is before


def test_layers_before_the_first_expert_run_once_for_both_passes(setup):
    """Layer 0's k_proj (no expert) reads the same input in both passes: one call in the graph, not two; q_proj's
    base linear too (its expert adds after it); layer 1's k_proj reads expert-changed inputs: two calls."""
    calls = [n for n in setup.ours.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    def count(path):
        return sum(any(p == path for p, _ in n.meta["nn_module_stack"].values()) for n in calls)
    assert count("model.layers.0.self_attn.k_proj") == count("model.layers.0.self_attn.q_proj") == 1
    assert count("model.layers.1.self_attn.k_proj") == 2
