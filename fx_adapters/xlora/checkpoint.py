"""X-LoRA classifier weights on disk: ``save_classifier``'s safetensors file, and PEFT's X-LoRA checkpoints with
their folder quirks. Only safetensors are read, never a pickle; every check runs before anything is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..graph.peft_files import CONFIG_NAME, PICKLED_WEIGHTS_NAME, WEIGHTS_NAME

CLASSIFIER_KEY = "internal_xlora_classifier."  # PEFT's prefix of the classifier's state_dict keys
SAVE_FORMAT = "fx_adapters.xlora_classifier"  # the "format" metadata of save_classifier's files
PEFT_SAVE_HINT = (
    "PEFT 0.21's save_pretrained keeps classifier layer K out of adapter_model.safetensors when K is an expert's name "
    "('0', '1', …) and writes it into subfolder K instead: load the whole directory save_pretrained wrote (every "
    "adapter, not selected_adapters=['default']), or save PEFT's classifier with safetensors.torch.save_file("
    "{k: v for k, v in peft_model.state_dict().items() if 'internal_xlora_classifier' in k}, path)"
)


def save_classifier(state: Mapping[str, torch.Tensor], path: str | Path, experts: Sequence[str],
                    layers: Sequence[str]) -> Path:
    """Write a classifier's ``state_dict`` to a safetensors file, with the experts and layers it scores."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = {"format": SAVE_FORMAT, "experts": json.dumps(list(experts)), "layers": json.dumps(list(layers))}
    save_file(tensors, path, metadata=metadata)
    return path


def read_classifier(path: str | Path, expected: Mapping[str, torch.Tensor], describe: str) -> dict[str, torch.Tensor]:
    """The classifier tensors of ``save_classifier``'s file or a PEFT X-LoRA checkpoint (the directory PEFT's
    ``save_pretrained`` wrote, or its ``adapter_model.safetensors``), checked against the ``expected`` state dict's
    keys and shapes; ``describe`` says what the classifier is, for the error message.

    PEFT 0.21's ``save_pretrained`` also saves each expert, as adapter "0", "1", …, into the subfolder of that
    name, and its filtering of keys by adapter name moves classifier layer ``layers.K`` (``K`` an expert's name)
    out of the top file into subfolder ``K``'s file, keyed ``…internal_xlora_classifier.layers.weight`` or
    ``….bias`` (the adapter name stripped): such layers are read from there.
    """
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        pickled = (file.parent / PICKLED_WEIGHTS_NAME).is_file()
        raise FileNotFoundError(f"load_classifier: {file} does not exist; expected a file written by "
                                "save_classifier or a PEFT X-LoRA directory with adapter_model.safetensors"
                                + (f" (its {PICKLED_WEIGHTS_NAME} is a pickle, never loaded: save with PEFT's "
                                   "safe_serialization=True)" if pickled else ""))
    metadata, state = _read_safetensors(file)
    from_peft = metadata.get("format") != SAVE_FORMAT and (
        any(CLASSIFIER_KEY in key for key in state) or _is_peft_xlora_dir(file.parent))
    if from_peft:
        state = {key.split(CLASSIFIER_KEY, 1)[1]: value for key, value in state.items() if CLASSIFIER_KEY in key}
        state |= _layers_in_expert_folders(file.parent, [k for k in expected if k not in state])
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} ≠ {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"load_classifier({file}): it does not fit this classifier ({describe}): missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, shapes {shapes[:4]}"
            + (f"; {PEFT_SAVE_HINT}" if missing and (from_peft or not state) else ""))
    return state


def _read_safetensors(file: Path, wanted=None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata of safetensors ``file`` and its tensors (those whose key ``wanted(key)`` is true, if given)."""
    try:
        with safe_open(file, framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys() if wanted is None or wanted(k)}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"load_classifier({file}): not a readable safetensors file ({exc})") from None


def _is_peft_xlora_dir(directory: Path) -> bool:
    try:
        return json.loads((directory / CONFIG_NAME).read_text()).get("peft_type") == "XLORA"
    except (OSError, ValueError, AttributeError):
        return False


def _layers_in_expert_folders(directory: Path, missing: list[str]) -> dict[str, torch.Tensor]:
    """Those of the ``missing`` classifier tensors (keys like ``layers.0.weight``) that PEFT's ``save_pretrained``
    wrote into the subfolder of the expert named like the layer index, "0" here (see ``read_classifier``); only the
    matching tensors of those files are read."""
    found = {}
    for key in missing:
        layer, _, leaf = key.rpartition(".")
        sequential, _, index = layer.rpartition(".")
        file = directory / index / WEIGHTS_NAME
        if not (index.isdigit() and file.is_file()):
            continue
        suffix = f"{CLASSIFIER_KEY}{sequential}.{leaf}"  # "layers.0.weight" with adapter name "0" removed
        _, tensors = _read_safetensors(file, lambda k, suffix=suffix: k.endswith(suffix))
        if len(tensors) == 1:
            found[key] = next(iter(tensors.values()))
    return found
