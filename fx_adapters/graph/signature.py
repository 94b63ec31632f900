"""Call signatures: what distinguishes one capture of a model from another, and binding a call to the model's own
``forward`` signature.

A ``CallSignature`` is what a captured graph bakes in: which tensor inputs are given (by name, with their rank and
whether they are floating point), the non-tensor arguments (flags such as ``output_hidden_states`` or
``return_dict``), train or eval mode, and the dtype and device of the parameters. Two calls with equal signatures run
the same graph.

>>> import torch
>>> from torch import nn
>>> class Model(nn.Module):
...     def forward(self, input_ids, attention_mask=None, labels=None, return_dict=None):
...         return input_ids
>>> params = {"dtype": torch.float32, "device": torch.device("cpu")}
>>> values, flags = bind_call(Model(), (torch.ones(2, 3, dtype=torch.long),), {"return_dict": False})
>>> signature = CallSignature.of(values, flags, training=False, **params)
>>> signature.input_names, signature.flags
(('input_ids',), (('return_dict', False),))
>>> bind_call(Model(), (torch.ones(1),), {"label": 1})
Traceback (most recent call last):
...
TypeError: Model.forward() got an unexpected keyword argument 'label'
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CallSignature", "SignedForward", "accepted_names", "bind_call"]

RETURN_DICT = "return_dict"  # handled by transformers' output decorators, in no signature


@dataclass(frozen=True)
class CallSignature:
    """What one captured graph serves (module docstring)."""

    inputs: tuple[tuple[str, int, bool], ...]
    """``(name, rank, is floating point)`` of each tensor input, in the model's parameter order."""
    flags: tuple[tuple[str, object], ...]
    """The non-tensor arguments given (not None), sorted by name."""
    training: bool
    dtype: str
    device: str

    @classmethod
    def of(cls, values: dict, flags: dict, *, training: bool, dtype: torch.dtype, device: torch.device
           ) -> CallSignature:
        inputs = tuple((n, v.dim(), v.is_floating_point()) for n, v in values.items())
        return cls(inputs, tuple(sorted(flags.items())), bool(training), str(dtype).removeprefix("torch."),
                   str(torch.device(device)))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.inputs)

    def __str__(self) -> str:
        flags = "".join(f", {k}={v!r}" for k, v in self.flags)
        mode = "train" if self.training else "eval"
        return f"({', '.join(self.input_names)}{flags}) {mode} {self.dtype} {self.device}"


def accepted_names(model: nn.Module) -> tuple[set[str], bool]:
    """The argument names ``model.forward`` takes, and whether it takes any keyword (a bare ``**kwargs``).

    A ``**kwargs: Unpack[SomeTypedDict]`` (transformers' ``TransformersKwargs``) takes the TypedDict's keys only, and
    transformers models also take ``return_dict``.
    """
    names, open_ended = set(), False
    for parameter in inspect.signature(model.forward).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            typed = typing.get_args(parameter.annotation)
            keys = [k for c in getattr(typed[0], "__mro__", ()) for k in getattr(c, "__annotations__", {})] \
                if typed else []
            names.update(keys)
            open_ended = open_ended or not keys
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.add(parameter.name)
    if hasattr(model, "config"):
        names.add(RETURN_DICT)
    return names, open_ended


def bind_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """Bind a call to ``model.forward``'s signature: (tensor inputs, other arguments), both by name in the model's
    order, None values left out. Raises the ``TypeError`` the model's own ``forward`` would raise."""
    where = f"{type(model).__name__}.forward()"
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{where} {e}") from None
    names, open_ended = accepted_names(model)
    arguments = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{where} takes its inputs by name; got {len(value)} extra positional argument(s)")
        arguments.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    unknown = [n for n in arguments if n not in names]
    if unknown and not open_ended:
        raise TypeError(f"{where} got an unexpected keyword argument {unknown[0]!r}")
    values = {n: v for n, v in arguments.items() if isinstance(v, torch.Tensor)}
    flags = {n: v for n, v in arguments.items() if v is not None and n not in values}
    return values, flags


class SignedForward:
    """``module.forward`` as an instance attribute that carries the model's signature (plus ``extra`` keywords), so
    ``inspect.signature(am.forward)`` — what transformers' ``Trainer`` reads to keep dataset columns — lists the
    model's inputs. Calls go to the class's ``forward``."""

    def __init__(self, module: nn.Module, model: nn.Module, extra: tuple[str, ...] = ()):
        self.module = module
        parameters = list(inspect.signature(model.forward).parameters.values())
        keyword = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in extra]
        at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
        self.__signature__ = inspect.Signature(parameters[:at] + keyword + parameters[at:])

    def __call__(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)
