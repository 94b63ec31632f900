"""Shared builders: tiny random models (no downloads), PEFT's test MLP, and oracle helpers.

The device comes from ``FXA_TEST_DEVICE`` (default ``cpu``): ``FXA_TEST_DEVICE=cuda python -m pytest -q`` runs the
suite on a GPU. Models and batches built here are put on it, and it is torch's default device for everything else
the tests create; random draws use CPU generators (the same numbers on every device) and move. Tests marked
``cuda_only`` skip on other devices.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings

import pytest
import torch
from hypothesis import settings
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

# CI and the default run are deterministic (derandomize: the same cases every run). HYPOTHESIS_PROFILE=thorough draws
# new random cases each run, ten times as many (examples(n) in the tests' own @settings scales the same way):
#     HYPOTHESIS_PROFILE=thorough python -m pytest -q tests/test_testing.py tests/test_road_equivalence.py
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
settings.register_profile("default", max_examples=15, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=150, deadline=None, derandomize=False, print_blob=True)
settings.load_profile("thorough" if THOROUGH else "default")


def examples(n: int) -> int:
    """``max_examples`` for a test's own ``@settings``: ``n`` by default, ten times more with the thorough profile."""
    return 10 * n if THOROUGH else n

VOCAB = 128
DEVICE = torch.device(os.environ.get("FXA_TEST_DEVICE", "cpu"))
if DEVICE.type != "cpu":
    torch.set_default_device(DEVICE)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only: runs only when FXA_TEST_DEVICE is a CUDA device")


# In CI (CI=true, or FXA_NO_SKIPS=1 locally) a test skipped for want of one of these is a failure: their tests are
# the PEFT / quantization / property evidence, and a quiet skip would make a green run prove less than it says.
REQUIRED_IN_CI = ("bitsandbytes", "peft", "hypothesis", "console script")
# what a skip for want of one says (importorskip's "could not import", our reasons); a deliberate skip that merely
# names PEFT (e.g. "PEFT's adapter_names path raises on OPT") is not one
MISSING = ("could not import", "no module named", "not installed", "needs ", "not on path", "console script on path")
STRICT_SKIPS = os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("FXA_NO_SKIPS") == "1"
_forbidden_skips: dict[str, str] = {}  # node id: reason


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


def _note_skip(report):
    reason = _skip_reason(report).lower() if report.skipped else ""
    if STRICT_SKIPS and any(dep in reason for dep in REQUIRED_IN_CI) and any(word in reason for word in MISSING):
        _forbidden_skips[report.nodeid] = _skip_reason(report)


def pytest_collectreport(report):
    _note_skip(report)  # a module-level importorskip


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if _forbidden_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _forbidden_skips:
        terminalreporter.section("tests skipped in CI (a failure: pip install -e '.[test]' installs what they need)",
                                 red=True)
        for nodeid, reason in _forbidden_skips.items():
            terminalreporter.line(f"{nodeid}: {reason}")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"CUDA-only; FXA_TEST_DEVICE is {DEVICE}")
    for item in items:
        if "cuda_only" in item.keywords and DEVICE.type != "cuda":
            item.add_marker(skip)


class MLP(nn.Module):
    """PEFT's test MLP (tests/test_custom_models.py)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float()
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        return self.sm(X)


def mlp_input() -> torch.Tensor:
    return torch.arange(90, device=DEVICE).view(9, 10).float()


def build_hf(arch: str, dtype=torch.float32, **config):
    """A tiny random transformers model in eval mode, seeded; ``config`` overrides its config's fields (e.g.
    ``initializer_range=0.2``: with the default 0.02 attention is nearly uniform, so positions barely matter)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, pad_token_id=0, **config)
    if arch in ("llama", "mistral", "qwen2"):
        cfg_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
        model_cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM}
        model = model_cls[arch](cfg)
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common))
    elif arch == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                               max_position_embeddings=128, word_embed_proj_dim=64, **common))
    else:
        raise ValueError(arch)
    return model.to(device=DEVICE, dtype=dtype).eval()


def token_batch(batch: int, seq: int, seed: int = 0, left_pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g, device="cpu")
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :left_pad] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4):
    """Equal up to ``rtol`` of the reference's largest magnitude: for gradients, whose median may be 1e-6, where an
    absolute tolerance of 1e-6 would accept zeros."""
    assert want.abs().max() > 0, "a zero reference proves nothing"
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


def peft_road(model: nn.Module, **config):
    """PEFT's RoAd model on a copy of ``model`` (the oracle)."""
    from peft import RoadConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), RoadConfig(**config)).eval()


@pytest.fixture(scope="session")
def tmp_session(tmp_path_factory):
    return tmp_path_factory.mktemp("fxa")


def road_params_of(am, adapter_name):
    """{module path: (theta, alpha)} of one of our adapters."""
    params = am.adapter_parameters(adapter_name)
    return {t.name: (params[t.name, "road_theta"].detach(), params[t.name, "road_alpha"].detach())
            for t in am.adapter_targets(adapter_name)}


def eager_road_forward(model, call, adapters, assignment):
    """Oracle: run ``model`` eagerly one sample at a time with PEFT's ``_apply_road`` in forward hooks.

    ``adapters``: name -> (RoadConfig, {path: (theta, alpha)}); ``assignment``: a name or "__base__" per
    sample; ``call(model, i)`` runs the model on sample ``i`` and returns a tensor.
    """
    from peft.tuners.road.layer import _apply_road

    modules = dict(model.named_modules())
    outs = []
    for i, name in enumerate(assignment):
        handles = []
        if name != "__base__":
            cfg, params = adapters[name]
            for path, (theta, alpha) in params.items():
                def hook(_m, _inp, out, theta=theta, alpha=alpha, cfg=cfg):
                    return _apply_road(cfg.variant, cfg.group_size, theta, alpha, out.float()).to(out.dtype)
                handles.append(modules[path].register_forward_hook(hook))
        try:
            outs.append(call(model, i))
        finally:
            for h in handles:
                h.remove()
    return torch.cat(outs)


class RepeatedBatches(torch.utils.data.Dataset):
    """The same 4 token sequences, 4 times, with labels: a loss that training can lower."""

    def __init__(self):
        self.ids = torch.randint(1, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0)).repeat(4, 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def trainer_losses(module: nn.Module, directory, learning_rate: float = 0.1) -> list[float]:
    """Train ``module`` with transformers' ``Trainer`` on ``RepeatedBatches`` (2 epochs of batch 4: 8 steps) and
    return the logged loss of each step."""
    import transformers as tf

    args = tf.TrainingArguments(directory, per_device_train_batch_size=4, num_train_epochs=2,
                                learning_rate=learning_rate, logging_steps=1, report_to=[], save_strategy="no",
                                disable_tqdm=True, use_cpu=DEVICE.type == "cpu")
    trainer = tf.Trainer(model=module, args=args, train_dataset=RepeatedBatches())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_each_signature_is_captured_once_and_listed(module: nn.Module, caplog) -> None:
    """``module`` (RoAd or X-LoRA, compiled from a transformers model) captures a new call signature once (logged at
    debug level), reuses it for other sizes and lists it after its primary signature."""
    ids, _ = token_batch(2, 5, seed=5)
    with caplog.at_level(logging.DEBUG, logger="fx_adapters"):
        module(input_ids=ids, output_hidden_states=True)
        module(input_ids=ids[:1, :3], output_hidden_states=True)  # other sizes, same graph
    assert len([r for r in caplog.records if "call signature" in r.getMessage()]) == 1
    listed = [str(s) for s in module.captures.signatures]
    assert listed[0] == f"(input_ids, attention_mask) eval float32 {DEVICE}"
    assert f"(input_ids, attention_mask, output_hidden_states=True) eval float32 {DEVICE}" in listed
