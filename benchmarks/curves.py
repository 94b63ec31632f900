"""The measurements behind the curves (``python -m benchmarks --plot DIR``), one function each; ``plot.py`` draws
them. Each returns plain lists (JSON as written to ``DIR/curves.json``), every point timed interleaved with the base
model in one run as the table's rows are, and checked against PEFT before it is timed.

- ``adapters_curve``: a mixed batch (one adapter per sample) ÷ the base model, against the adapters loaded;
- ``generate_curve``: X-LoRA ``generate`` in new tokens per second against the tokens generated: PEFT (no KV cache,
  both passes re-run on the whole sequence per token) and ours (both passes cached, the scalings of every position
  exact), and ours with the prompt's scalings reused while decoding when this build's ``generate`` has that mode
  (``decode_scalings="prompt"``).
"""

from __future__ import annotations

import copy
import sys

import torch

from . import models as m
from .rows import Settings

ADAPTER_COUNTS = {"full": (1, 4, 16, 64, 256, 1024), "quick": (1, 4, 16)}
NEW_TOKENS = {"full": (4, 8, 16, 32, 64), "quick": (2, 4, 8)}
MODEL = (f"random Llama (hidden {m.MODEL['hidden_size']}, {m.MODEL['num_hidden_layers']} layers, vocab "
         f"{m.MODEL['vocab_size']})")


def adapters_curve(s: Settings, mode: str) -> dict:
    """Mixed batch ÷ base against RoAd adapters loaded (``ADAPTER_COUNTS[mode]``), ours and PEFT: the batch's
    ``m.BATCH`` samples spread evenly over the adapters loaded (16 samples: up to 16 different ones per call)."""
    from peft import RoadConfig as PeftRoadConfig
    from peft import get_peft_model

    import fx_adapters as fxa

    base = m.base_model()
    torch.manual_seed(3)
    ours = fxa.compile_with_road(base, fxa.RoadConfig(**m.ROAD), adapter_name="a0").eval()
    peft = get_peft_model(copy.deepcopy(base), PeftRoadConfig(**m.ROAD), adapter_name="a0").eval()
    names: list[str] = []
    points = {"adapters": [], "peft": [], "ours": [], "distinct_in_batch": [], "timings": []}
    for count in ADAPTER_COUNTS[mode]:
        while len(names) < count:
            name = f"a{len(names)}"
            if names:
                ours.add_adapter(name, fxa.RoadConfig(**m.ROAD))
                peft.add_adapter(name, PeftRoadConfig(**m.ROAD))
            _copy_to_peft(ours, peft, name)
            names.append(name)
        batch_names = [names[i * count // m.BATCH] for i in range(m.BATCH)]
        calls = {"base": m.eager(base), "peft": m.eager(peft, adapter_names=batch_names),
                 "ours": m.ours(ours, adapter_names=batch_names)}
        with torch.inference_mode():
            m.check_close(calls["ours"](), calls["peft"](), f"mixed batch with {count} adapters loaded")
        t = s.time(calls)
        points["adapters"].append(count)
        points["distinct_in_batch"].append(len(set(batch_names)))
        points["timings"].append(t.summary())
        for name in ("peft", "ours"):
            points[name].append(round(t.ratio(name), 4))
        print(f"  [{count} adapters: PEFT {points['peft'][-1]:.3f}, ours {points['ours'][-1]:.3f} × base]",
              file=sys.stderr, flush=True)
    return {**points, "batch": m.BATCH, "seq": m.SEQ, "model": MODEL}


def _copy_to_peft(ours, peft, name: str) -> None:
    """Give PEFT's adapter ``name`` our adapter's parameters (both random; ours are the reference)."""
    with torch.no_grad():
        for (path, param_name), value in ours.adapter_parameters(name).items():
            getattr(peft.base_model.model.get_submodule(path), param_name)[name].copy_(value)


def generate_curve(s: Settings, mode: str) -> dict:
    """New tokens per second of X-LoRA ``generate`` (greedy, batch ``m.XLORA_BATCH`` × prompt ``m.SEQ``) against
    ``NEW_TOKENS[mode]``: the base model's own cached ``generate``, PEFT, ours (exact) and ours with prompt
    scalings (when available: ``prompt_mode`` says so)."""
    peft, ours = m.xlora_contenders()
    batch = m.xlora_inputs()
    prompt_mode = accepts_decode_scalings(ours)
    points = {"new_tokens": [], "base": [], "peft": [], "ours": [], "ours_prompt": [], "timings": []}
    for new in NEW_TOKENS[mode]:
        options = dict(max_new_tokens=new, do_sample=False)
        calls = {"base": lambda o=options: m.base_model().generate(**batch, **o),
                 "peft": lambda o=options: peft.generate(**batch, **o),
                 "ours": lambda o=options: ours.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                                         **o)}
        if prompt_mode:
            calls["ours_prompt"] = lambda o=options: ours.generate(
                batch["input_ids"], attention_mask=batch["attention_mask"], decode_scalings="prompt", **o)
        with torch.inference_mode():
            tokens = {name: call() for name, call in calls.items()}  # also the warm-up
        if not torch.equal(tokens["ours"], tokens["peft"]):
            raise AssertionError(f"X-LoRA generate, {new} new tokens: fx_adapters and PEFT chose different tokens")
        t = s.time(calls, s.generate_repeats, warmup=0)
        points["new_tokens"].append(new)
        points["timings"].append(t.summary())
        for name in ("base", "peft", "ours", "ours_prompt"):
            points[name].append(round(new * m.XLORA_BATCH / t.median(name), 1) if name in calls else None)
        print(f"  [{new} new tokens: PEFT {points['peft'][-1]}, ours {points['ours'][-1]} tokens/s]", file=sys.stderr,
              flush=True)
    return {**points, "batch": m.XLORA_BATCH, "prompt": m.SEQ, "experts": m.XLORA_EXPERTS, "model": MODEL,
            "prompt_mode": prompt_mode}


def accepts_decode_scalings(xm) -> bool:
    """Whether ``xm.generate`` has the prompt-scalings decode mode (``decode_scalings="prompt"``, issue 17)."""
    try:
        with torch.inference_mode():
            xm.generate(m.xlora_inputs()["input_ids"][:1, :4], max_new_tokens=1, decode_scalings="prompt")
    except TypeError:  # an unexpected keyword argument: not in this build
        return False
    return True
