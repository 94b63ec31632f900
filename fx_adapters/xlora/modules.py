"""X-LoRA at run time: the classifier, the routing of its scalings, and one layer's stacked LoRA experts.

The rewritten graph calls ``XLoraClassifier`` once (on the scaling pass's last hidden state), ``route_scalings``
once (PEFT's top-k / softmax-over-top-k, for all layers at once) and one ``XLoraExperts`` after each adapted layer.

>>> import torch
>>> experts = XLoraExperts(lora_A=torch.randn(2, 4, 8), lora_B=torch.randn(6, 2, 4), scale=torch.tensor([2.0, 0.5]))
>>> x, y = torch.randn(3, 5, 8), torch.randn(3, 5, 6)
>>> w = torch.softmax(torch.randn(3, 5, 2), -1)
>>> out = experts(y, x, w, 1.0)
>>> loop = y + sum(((x * w[..., e, None]) @ experts.lora_A[e].T @ experts.lora_B[:, e].T) * experts.scale[e]
...                for e in range(2))
>>> torch.allclose(out, loop, atol=1e-5)
True
>>> experts(y, x, None, 1.0) is y          # no weights (scaling pass value 0): the layer is left alone
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class XLoraClassifier(nn.Module):
    """PEFT's X-LoRA classifier: hidden state ``(..., hidden)`` → scalings ``(..., n_layers, n_experts)``.

    ``layers`` is built exactly as PEFT builds it, so ``state_dict()`` keys are PEFT's
    ``internal_xlora_classifier.*`` keys without that prefix.
    """

    def __init__(self, hidden_size: int, n_experts: int, n_layers: int, *, depth: int = 1, size: int = 2048,
                 dropout_p: float = 0.2, layerwise: bool = False, enable_softmax: bool = True,
                 temperature: float = 1.0, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.n_experts, self.n_layers = n_experts, n_layers
        self.layerwise, self.enable_softmax, self.temperature = layerwise, enable_softmax, temperature
        outputs = n_experts * n_layers if layerwise else n_experts
        kw = dict(dtype=dtype, device=device)
        layers: list[nn.Module] = []
        width = hidden_size
        for _ in range(depth - 1):
            layers += [nn.Linear(width, size, **kw), nn.ReLU()] + ([nn.Dropout(dropout_p)] if dropout_p > 0 else [])
            width = size
        self.layers = nn.Sequential(*layers, nn.Linear(width, outputs, **kw))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden)
        lead = hidden.shape[:-1]
        if not self.layerwise:
            logits = logits.unsqueeze(-2).expand(*lead, self.n_layers, self.n_experts)
        scalings = logits.reshape(*lead, self.n_layers, self.n_experts)
        if self.enable_softmax:
            scalings = torch.softmax(scalings / self.temperature, dim=-1)
        return scalings


def route_scalings(scalings: torch.Tensor, top_k: int | None, softmax_topk: bool) -> torch.Tensor:
    """PEFT's ``get_maybe_topk_scalings`` on every layer at once: keep the ``top_k`` experts per token (others 0),
    then optionally a softmax over the kept (non-zero) ones.

    >>> s = torch.tensor([[0.1, 0.5, 0.4]])
    >>> route_scalings(s, 2, False), route_scalings(s, 1, True)
    (tensor([[0.0000, 0.5000, 0.4000]]), tensor([[0., 1., 0.]]))
    """
    if top_k is not None:
        _, indices = torch.topk(scalings, k=top_k, dim=-1)
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, indices, True)
        scalings = scalings * mask.to(scalings.dtype)
    if softmax_topk:
        zero = scalings == 0
        scalings = torch.softmax(scalings.masked_fill(zero, float("-inf")), dim=-1).masked_fill(zero, 0.0)
    return scalings


class XLoraExperts(nn.Module):
    """The LoRA experts of one layer, stacked: ``lora_A`` (E, r, in), ``lora_B`` (out, E, r), ``scale`` (E,).

    Experts of smaller rank (or not adapting this layer: rank 0, scale 0) are zero-padded to ``r``. ``forward``
    adds ``Σₑ Bₑ Aₑ dropoutₑ(x) · wₑ · scaleₑ · global_weight`` to the layer output ``y`` with one matmul for all
    the A's and one for all the B's. ``weights`` is ``(..., E)`` per token, ``(E,)`` for every token, or None (adds
    nothing). Experts are buffers (frozen whatever is called) unless ``trainable``. With ``embedding``, ``x`` holds
    token ids and ``in`` is the vocabulary: the A's are one lookup (PEFT's ``lora_embedding_A``/``_B``, no dropout).
    """

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
                 dropout: Sequence[float] | None = None, trainable: bool = False, embedding: bool = False):
        super().__init__()
        self.embedding = embedding
        for name, value in (("lora_A", lora_A), ("lora_B", lora_B)):
            if trainable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self.register_buffer("scale", scale)
        self.dropout = tuple(dropout) if dropout is not None else (0.0,) * scale.numel()

    def forward(self, y: torch.Tensor, x: torch.Tensor, weights: torch.Tensor | None,
                global_weight: float) -> torch.Tensor:
        if weights is None:
            if self.training and any(self.dropout):  # PEFT's scaling pass draws its dropout masks: keep the RNG in step
                self._dropout_each(x.to(self.lora_A.dtype))
            return y
        a, b = self.lora_A, self.lora_B
        if self.embedding:
            z = F.embedding(x, a.flatten(0, 1).t()).unflatten(-1, a.shape[:2])
        elif self.training and any(self.dropout):
            z = torch.einsum("...ei,eri->...er", self._dropout_each(x.to(a.dtype)), a)
        else:  # dropout is the identity, so x·wₑ goes through Aₑ as wₑ·(Aₑx)
            z = F.linear(x.to(a.dtype), a.flatten(0, 1)).unflatten(-1, a.shape[:2])
        if weights.dim() > 1 and z.shape[:-2] != weights.shape[:-1]:  # layers that fold the batch (OPT's MLP)
            z = z.reshape(*weights.shape[:-1], *z.shape[-2:])
        coef = weights.to(a.dtype) * (self.scale * global_weight)
        delta = F.linear((z * coef.unsqueeze(-1)).flatten(-2), b.flatten(1))
        return (y + delta.reshape(y.shape)).to(y.dtype)

    def _dropout_each(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` → ``(..., E, in)``: each expert's dropout of ``x``, its masks drawn as PEFT draws them —
        ``F.dropout`` on the expert's input, expert after expert, none for p = 0 — so one seed gives PEFT's masks."""
        ones = torch.ones_like(x)
        masks = [F.dropout(ones, p, training=True) if p else ones for p in self.dropout]
        return x.unsqueeze(-2) * torch.stack(masks, dim=-2)
