"""Training: only adapter parameters learn, gradients equal PEFT's, and inference sees every update."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    MLP,
    assert_close_relative,
    build_hf,
    eager_road_forward,
    mlp_input,
    peft_road,
    road_params_of,
    token_batch,
)

import fx_adapters as fxa

CONFIG = dict(variant="road_2", group_size=8, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = build_hf("llama")
    torch.manual_seed(3)
    peft_model = peft_road(model, **CONFIG)
    directory = tmp_path_factory.mktemp("train")
    peft_model.save_pretrained(directory)
    am = fxa.compile_with_road(model, fxa.RoadConfig.from_pretrained(directory))
    am.load_adapter(directory)
    am.add_adapter("other", fxa.RoadConfig(group_size=8, target_modules=["k_proj"]))
    return model, peft_model, am


def test_only_the_active_adapter_is_trainable(llama):
    _, _, am = llama
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".default") and ".road_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 3  # theta and alpha, 2 layers × 3 targets


def test_set_adapter_moves_trainability_like_peft(llama):
    _, _, am = llama
    am.set_adapter("other")
    try:
        trainable = {n for n, p in am.named_parameters() if p.requires_grad}
        assert trainable and all(n.endswith(".other") for n in trainable)
    finally:
        am.set_adapter("default")


def test_gradients_equal_peft_gradients(llama):
    _, peft_model, am = llama
    ids, mask = token_batch(2, 6, left_pad=2)
    am.train()
    peft_model.train()
    try:
        am(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
        peft_model(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
        peft_grads = {n.removeprefix("base_model.model.").removesuffix(".default"): p.grad
                      for n, p in peft_model.named_parameters() if p.requires_grad}
        for target in am.adapter_targets("default"):
            for param in ("road_theta", "road_alpha"):
                assert_close_relative(am.adapter_parameters("default")[target.name, param].grad,
                                      peft_grads[f"{target.name}.{param}"])
    finally:
        am.zero_grad(set_to_none=True)
        peft_model.zero_grad(set_to_none=True)
        am.eval()
        peft_model.eval()


def test_mixed_batches_in_training_mode_raise(llama):
    _, _, am = llama
    ids, _ = token_batch(2, 4)
    am.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            am(input_ids=ids, adapter_names=["default", "__base__"])
    finally:
        am.eval()


def test_training_loop_lowers_loss_and_inference_sees_the_update():
    model = MLP().eval()
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules=["lin0"], init_weights=False))
    x, y = mlp_input(), torch.arange(9) % 2
    am.train()
    optimizer = torch.optim.SGD([p for p in am.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.nll_loss(am(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9
    am.eval()
    adapters = {"default": (am.adapters["default"], road_params_of(am, "default"))}
    with torch.no_grad():
        expected = eager_road_forward(model, lambda m, i: m(x[i:i + 1]), adapters, ["default"] * 9)
        torch.testing.assert_close(am(x), expected, atol=1e-5, rtol=0)


def test_in_place_parameter_edit_invalidates_cached_columns():
    model = MLP().eval()
    am = fxa.compile_with_road(model, fxa.RoadConfig(group_size=4, target_modules=["lin0"])).eval()
    x = mlp_input()
    with torch.inference_mode():
        before = am(x)
    with torch.no_grad():
        am.adapter_parameters("default")["lin0", "road_theta"].fill_(0.7)
    with torch.inference_mode():
        after = am(x)
    adapters = {"default": (am.adapters["default"], road_params_of(am, "default"))}
    with torch.no_grad():
        expected = eager_road_forward(model, lambda m, i: m(x[i:i + 1]), adapters, ["default"] * 9)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)
