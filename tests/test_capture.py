"""Tests of fx_adapters.graph.capture, with the eager model as the oracle."""

import copy
import pickle

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from fx_adapters.graph.capture import CaptureError, capture

VOCAB = 128
_DECODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
HF_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_DECODER, vocab_size=VOCAB)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_DECODER, vocab_size=VOCAB)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER, vocab_size=VOCAB)),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    ),
    "opt": lambda: OPTForCausalLM(
        OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
            max_position_embeddings=64, vocab_size=VOCAB,
        )
    ),
}
LINEAR_OPS = (torch.ops.aten.linear.default, torch.ops.aten.addmm.default)
llama_only = pytest.mark.parametrize("hf", ["llama"], indirect=True)


class Case:
    """A model, its state before capture, and its capture."""

    def __init__(self, model: nn.Module, *args, **kwargs):
        self.model = model
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.training = model.training
        self.captured = capture(model, *args, **kwargs)
        self.gm = self.captured.graph_module

    def __call__(self, *args, gm=None, **kwargs):
        return self.captured.call(gm or self.gm, *args, **kwargs)


def ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def assert_untouched(case: Case):
    state = case.model.state_dict()
    assert state.keys() == case.state.keys()
    assert all(torch.equal(state[k], v) for k, v in case.state.items())
    assert {n: p.requires_grad for n, p in case.model.named_parameters()} == case.requires_grad
    assert case.model.training == case.training


def assert_owned_and_frozen(case: Case):
    model_params = {id(p) for p in case.model.parameters()}
    assert all(id(p) not in model_params and not p.requires_grad for p in case.gm.parameters())


def scale_first_linear(gm: torch.fx.GraphModule, op_or_target) -> nn.Parameter:
    """Insert ``out * scale`` (a new trainable Parameter) after the first node calling ``op_or_target``."""
    node = next(n for n in gm.graph.nodes if n.target == op_or_target or n.target in op_or_target)
    scale = nn.Parameter(torch.full((node.meta["val"].shape[-1],) if "val" in node.meta else (1,), 1.5))
    gm.register_parameter("scale", scale)
    with gm.graph.inserting_after(node):
        attr = gm.graph.get_attr("scale")
    with gm.graph.inserting_after(attr):
        mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, attr))
    node.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
    gm.graph.lint()
    gm.recompile()
    return scale


# ------------------------------------------------------------------------------------ Hugging Face


@pytest.fixture(scope="module", params=list(HF_MODELS), ids=list(HF_MODELS))
def hf(request):
    torch.manual_seed(0)
    return Case(HF_MODELS[request.param]().eval())


@pytest.mark.parametrize("batch, seq", [(1, 1), (1, 5), (3, 17)])
def test_hf_matches_eager_for_any_batch_and_sequence_length(hf, batch, seq):
    input_ids = ids(batch, seq)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        assert_close(hf(input_ids, attention_mask=mask).logits, hf.model(input_ids, attention_mask=mask).logits)


def test_hf_matches_eager_with_input_ids_alone(hf):
    input_ids = ids(2, 6)
    with torch.no_grad():
        assert_close(hf(input_ids=input_ids).logits, hf.model(input_ids=input_ids).logits)


def test_hf_matches_eager_with_left_padding(hf):
    input_ids = ids(3, 9)
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    with torch.no_grad():
        assert_close(hf(input_ids, attention_mask=mask).logits, hf.model(input_ids, attention_mask=mask).logits)


def test_hf_output_rebuilds_eager_output_type(hf):
    input_ids = ids(2, 4)
    with torch.no_grad():
        out, expected = hf(input_ids), hf.model(input_ids)
    assert type(out) is type(expected)
    assert out.keys() == expected.keys() - {"past_key_values", "cache"}  # the KV cache (named "cache" from 5.24)


def test_hf_default_inputs_are_input_ids_and_attention_mask(hf):
    assert hf.captured.method == "export"
    assert hf.captured.input_names == ("input_ids", "attention_mask")


def test_hf_parameter_and_buffer_fqns_match_model(hf):
    assert hf.gm.state_dict().keys() == hf.model.state_dict().keys()
    for name, param in hf.model.named_parameters():
        assert torch.equal(hf.gm.get_parameter(name), param)


def test_hf_nn_module_stack_names_model_modules(hf):
    modules = dict(hf.model.named_modules())
    linear_modules = {n for n, m in modules.items() if isinstance(m, (nn.Linear, Conv1D))}
    found = set()
    for node in hf.gm.graph.nodes:
        if node.target in LINEAR_OPS:
            path, class_name = list(node.meta["nn_module_stack"].values())[-1]
            assert class_name == f"{type(modules[path]).__module__}.{type(modules[path]).__qualname__}"
            found.add(path)
    assert found == linear_modules


def test_hf_graph_module_is_plain_and_flat(hf):
    graph = hf.gm.graph
    assert type(graph._codegen) is torch.fx.graph.CodeGen
    assert tuple(n.target for n in graph.find_nodes(op="placeholder")) == hf.captured.input_names
    (outputs,) = graph.output_node().args
    assert isinstance(outputs, tuple) and all(isinstance(n, torch.fx.Node) for n in outputs)
    assert not hasattr(hf.gm, "_guards_fn")
    assert all(n.op != "call_module" and not isinstance(n.target, torch._ops.HigherOrderOperator) for n in graph.nodes)


def test_hf_capture_leaves_model_untouched(hf):
    assert_untouched(hf)


def test_hf_captured_params_are_owned_and_frozen(hf):
    assert_owned_and_frozen(hf)


def test_hf_new_parameter_receives_gradient(hf):
    gm = copy.deepcopy(hf.gm)
    scale = scale_first_linear(gm, LINEAR_OPS)
    hf(ids(2, 5), gm=gm).logits.sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in gm.named_parameters() if n != "scale")


def test_hf_graph_module_survives_deepcopy_and_pickle(hf):
    input_ids = ids(2, 7)
    with torch.no_grad():
        expected = hf.model(input_ids).logits
        for gm in (copy.deepcopy(hf.gm), pickle.loads(pickle.dumps(hf.gm))):
            assert_close(hf(input_ids, gm=gm).logits, expected)


def test_hf_graph_module_supports_train_and_eval(hf):
    gm = copy.deepcopy(hf.gm)  # ep.module() raises NotImplementedError on both
    assert gm.train() is gm and all(m.training for m in gm.modules())
    assert gm.eval() is gm and not any(m.training for m in gm.modules())


@llama_only
def test_call_binds_positional_and_keyword_inputs_alike(hf):
    input_ids = ids(2, 5)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        assert torch.equal(hf(input_ids, mask).logits, hf(attention_mask=mask, input_ids=input_ids).logits)


@llama_only
def test_call_rejects_unknown_input_naming_accepted_ones(hf):
    with pytest.raises(TypeError, match="labels.*accepted inputs: input_ids, attention_mask"):
        hf(ids(2, 5), labels=ids(2, 5))


@llama_only
def test_call_passes_extra_args_after_model_inputs(hf):
    gm = copy.deepcopy(hf.gm)
    output = gm.graph.output_node()
    (logits,) = output.args[0]
    with gm.graph.inserting_after(next(reversed(gm.graph.find_nodes(op="placeholder")))):
        factor = gm.graph.placeholder("factor")
    with gm.graph.inserting_before(output):
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (logits, factor))
    output.args = ((scaled,),)
    gm.recompile()
    input_ids = ids(2, 5)
    with torch.no_grad():
        assert_close(hf(input_ids, gm=gm, extra=(torch.tensor(3.0),)).logits, 3 * hf.model(input_ids).logits)


@pytest.fixture(scope="module")
def llama_input_ids_only():
    torch.manual_seed(0)
    model = HF_MODELS["llama"]().eval()
    return Case(model, example_kwargs={"input_ids": ids(2, 8)})


def test_example_kwargs_set_input_names(llama_input_ids_only):
    case = llama_input_ids_only
    assert case.captured.input_names == ("input_ids",)
    input_ids = ids(3, 6)
    with torch.no_grad():
        assert_close(case(input_ids).logits, case.model(input_ids).logits)
    with pytest.raises(TypeError, match="attention_mask.*accepted inputs: input_ids$"):
        case(input_ids, attention_mask=torch.ones_like(input_ids))


def test_example_inputs_of_size_one_raise_capture_error():
    model = HF_MODELS["llama"]()
    with pytest.raises(CaptureError, match="LlamaForCausalLM.*sizes must be > 1"):
        capture(model, example_kwargs={"input_ids": ids(1, 8)})


@pytest.fixture(scope="module")
def tied_llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_DECODER, vocab_size=VOCAB, tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return Case(model)


def test_tied_weights_stay_tied_and_match_eager(tied_llama):
    gm = tied_llama.gm
    assert gm.get_parameter("lm_head.weight") is gm.get_parameter("model.embed_tokens.weight")
    input_ids = ids(2, 7)
    with torch.no_grad():
        assert_close(tied_llama(input_ids).logits, tied_llama.model(input_ids).logits)
    assert_untouched(tied_llama)


# ---------------------------------------------------------------------------------- plain modules


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.drop = nn.Linear(10, 20), nn.ReLU(), nn.Dropout(0.5)
        self.fc2, self.log_softmax = nn.Linear(20, 2), nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.log_softmax(self.fc2(self.drop(self.act(self.fc1(x)))))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return Case(MLP().eval())


def test_mlp_is_traced_with_linear_leaves(mlp):
    assert mlp.captured.method == "symbolic_trace"
    assert mlp.captured.input_names == ("x",)
    calls = {n.target: n for n in mlp.gm.graph.nodes if n.op == "call_module"}
    assert {"fc1", "fc2"} <= calls.keys()
    assert list(calls["fc1"].meta["nn_module_stack"].values())[-1] == ("fc1", "torch.nn.modules.linear.Linear")


def test_mlp_matches_eager(mlp):
    x = torch.randn(4, 10)
    assert_close(mlp(x), mlp.model(x))


def test_mlp_dropout_follows_train_and_eval(mlp):
    gm, x = copy.deepcopy(mlp.gm), torch.randn(64, 10)
    gm.train()
    assert not torch.equal(mlp(x, gm=gm), mlp(x, gm=gm))
    gm.eval()
    assert torch.equal(mlp(x, gm=gm), mlp.model(x))


def test_mlp_capture_leaves_model_untouched(mlp):
    assert_untouched(mlp)


def test_mlp_captured_params_are_owned_and_frozen(mlp):
    assert_owned_and_frozen(mlp)
    assert mlp.gm.fc1.weight.data_ptr() == mlp.model.fc1.weight.data_ptr()


def test_mlp_new_parameter_receives_gradient(mlp):
    gm = copy.deepcopy(mlp.gm)
    scale = scale_first_linear(gm, "fc1")
    gm.eval()
    mlp(torch.randn(4, 10), gm=gm).sum().backward()
    assert scale.grad is not None
    assert all(p.grad is None for n, p in gm.named_parameters() if n != "scale")


def test_mlp_graph_module_survives_deepcopy_and_pickle(mlp):
    x = torch.randn(3, 10)
    for gm in (copy.deepcopy(mlp.gm), pickle.loads(pickle.dumps(mlp.gm))):
        assert_close(mlp(x, gm=gm.eval()), mlp.model(x))


def test_running_captured_graph_leaves_model_buffers_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    case = Case(model)
    case(torch.randn(8, 4))
    assert_untouched(case)


def test_bitsandbytes_linear_layers_stay_leaves():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(bnb.nn.Linear8bitLt(8, 16, has_fp16_weights=False), nn.ReLU(), bnb.nn.Linear4bit(16, 4))
    model.to("cpu")  # quantizes the weights
    case = Case(model)
    calls = {n.target: n for n in case.gm.graph.nodes if n.op == "call_module"}
    assert type(case.gm.get_submodule(calls["0"].target)) is bnb.nn.Linear8bitLt
    assert type(case.gm.get_submodule(calls["2"].target)) is bnb.nn.Linear4bit
    x = torch.randn(3, 8)
    assert_close(case(x), model(x))


class ShapeBranch(nn.Module):
    """Branches on a shape, which torch.fx cannot trace but torch.export can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, flip=False):
        y = self.fc(-x if flip else x)
        return {"y": y if x.shape[0] > 1 else y * 2, "aux": (x * 2, None)}


def test_untraceable_module_falls_back_to_export_with_examples():
    torch.manual_seed(0)
    model = ShapeBranch()
    case = Case(model, (torch.randn(3, 4),), {"flip": True})
    assert case.captured.method == "export"
    assert case.captured.input_names == ("x",)
    x = torch.randn(5, 4)
    out, expected = case(x), model(x, flip=True)
    assert out.keys() == expected.keys() and out["aux"][1] is None
    assert_close(out["y"], expected["y"])
    assert_untouched(case)


def test_untraceable_module_without_examples_raises_capture_error():
    with pytest.raises(CaptureError, match="ShapeBranch.*symbolic_trace.*example_inputs"):
        capture(ShapeBranch())


def test_export_failure_raises_capture_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(CaptureError, match="DataDependent.*torch.export.export failed"):
        capture(DataDependent(), (torch.randn(3, 4),))
