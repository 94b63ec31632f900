"""The rows of issue 7's table, one small function each.

A row function takes the ``Settings`` and returns a ``Row``: its table lines plus the raw timings (for the
JSON). Ratios are a contender's median ÷ the base model's median from the same interleaved run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import models as m
from .timing import Timings, interleaved


@dataclass(frozen=True)
class Settings:
    repeats: int  # timed forward calls per contender
    warmup: int
    fold_repeats: int  # PEFT's merge + unmerge takes seconds: fewer repeats for row 4
    generate_repeats: int  # a generate call takes seconds: fewer repeats for the generate rows
    new_tokens: int  # new tokens per prompt in the generate rows (issue 15: 128)
    patience: float  # up to patience × repeats repetitions to collect the quiet ones (see timing.py)

    def time(self, contenders, repeats: int | None = None, warmup: int | None = None, **kwargs) -> Timings:
        """``interleaved`` with these settings (``repeats`` and ``warmup`` overridable)."""
        repeats, warmup = repeats or self.repeats, self.warmup if warmup is None else warmup
        return interleaved(contenders, repeats, warmup, self.patience, **kwargs)


@dataclass(frozen=True)
class Goal:
    text: str
    check: Callable[[float], bool] | None = None  # None: informative line, no goal


def at_most(x: float) -> Goal:
    return Goal(f"≤ {x:.2f}", lambda r: r <= x)


NOISE = 0.02  # "1.00 within noise": at most 2 % above the base model


def within_noise() -> Goal:
    return Goal(f"1.00 (≤ {1 + NOISE:.2f})", lambda r: r <= 1 + NOISE)


INFO = Goal("(info)")


@dataclass
class Line:
    figure: str
    peft: str
    ours: str
    goal: str
    met: bool | None = None  # None: no goal, or not measured

    @classmethod
    def ratios(cls, figure: str, t: Timings, peft: str | None, ours: str | None, goal: Goal,
               missing: str = "not available") -> Line:
        """A line of two ratios to ``t``'s base; a contender given as None prints as ``missing``."""
        p = t.ratio(peft) if peft else None
        o = t.ratio(ours) if ours else None
        met = goal.check(o) if goal.check and o is not None else None
        return cls(figure, _fmt(p, missing), _fmt(o, missing), goal.text, met)


def _fmt(ratio: float | None, missing: str) -> str:
    return missing if ratio is None else f"{ratio:.3f}"


@dataclass
class Row:
    lines: list[Line]
    timings: Timings | None = None
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)  # measurements that are not Timings (e.g. the cold start's), for the JSON

    def as_json(self) -> dict:
        ratios = {}
        if self.timings and "base" in self.timings.samples:
            ratios = {n: self.timings.ratio(n) for n in self.timings.samples if n != "base"}
        return {"lines": [vars(line) for line in self.lines], "ratios_to_base": ratios, "notes": self.notes,
                "timings": self.timings.as_json() if self.timings else None, **({"raw": self.raw} if self.raw else {})}


# ------------------------------------------------------------------------------------------------ rows


def unmerged(s: Settings) -> Row:
    """Row 1, plus adapters disabled ÷ base on both sides (the wrapper / captured-graph overhead)."""
    c = m.contenders(1)
    base, peft, ours = m.eager(m.base_model()), m.eager(c.peft), m.ours(c.ours)
    with torch.inference_mode():
        m.check_close(ours(), peft(), "unmerged forward")
    t = s.time({
        "base": base,
        "peft": peft,
        "ours": ours,
        "peft_disabled": m.within(c.peft.disable_adapter, peft),
        "ours_disabled": m.within(c.ours.disable_adapters, ours),
    })
    return Row([
        Line.ratios("RoAd unmerged forward ÷ base", t, "peft", "ours", at_most(1.08)),
        Line.ratios("adapters disabled ÷ base (wrapper / capture overhead)", t, "peft_disabled", "ours_disabled",
                    INFO),
    ], t)


def mixed(s: Settings) -> Row:
    """Row 2: 8 adapters + ``__base__`` cycled over the batch."""
    c = m.contenders(8)
    cycle = [*c.names, "__base__"]
    names = [cycle[i % len(cycle)] for i in range(m.BATCH)]
    peft, ours = m.eager(c.peft, adapter_names=names), m.ours(c.ours, adapter_names=names)
    with torch.inference_mode():
        m.check_close(ours(), peft(), "mixed batch")
    t = s.time({"base": m.eager(m.base_model()), "peft": peft, "ours": ours})
    return Row([Line.ratios(f"mixed batch, {len(c.names)} adapters + __base__ ÷ base", t, "peft", "ours",
                            at_most(1.12))], t)


def merged(s: Settings) -> Row:
    """Row 3: PEFT's merge_adapter vs our ``am.merge()`` (in place) and ``am.fold()`` (a standalone GraphModule)."""
    c = m.contenders(1)
    expected = m.eager(c.peft)
    with torch.inference_mode():
        expected = expected()
    peft_model = copy.deepcopy(c.peft)
    peft_model.merge_adapter()
    folded = c.ours.fold()
    contenders = {"base": m.eager(m.base_model()), "peft": m.eager(peft_model),
                  "ours_folded": lambda: folded(**m.inputs())["logits"], "ours_merged": m.ours(c.ours)}
    c.ours.merge()
    try:
        with torch.inference_mode():
            for name in contenders.keys() - {"base"}:
                m.check_close(contenders[name](), expected, f"merged: {name}")
        t = s.time(contenders)
    finally:
        c.ours.unmerge()
    return Row([
        Line.ratios("merged (PEFT merge_adapter / our am.merge()) ÷ base", t, "peft", "ours_merged", within_noise()),
        Line.ratios("folded GraphModule (am.fold()) ÷ base", t, "peft", "ours_folded", within_noise()),
    ], t)


def fold_linear(s: Settings) -> Row:
    """Row 4: fold + unfold of one 2048→5632 Linear vs PEFT's merge + unmerge of its RoAd Linear (same adapter)."""
    layer = _peft_road_linear()
    contenders = {"peft_merge": layer.merge, "peft_unmerge": layer.unmerge, **_our_fold_contenders(layer)}
    t = s.time(contenders, s.fold_repeats, warmup=0, mode=torch.no_grad)
    peft = [t.median(f"peft_{step}") for step in ("merge", "unmerge")]
    ours = [t.median(f"ours_{step}") for step in ("fold", "unfold")]
    speedup = sum(peft) / sum(ours)
    return Row([Line("fold + unfold, one 2048→5632 Linear", "{:.2f} s ({:.2f} + {:.2f})".format(sum(peft), *peft),
                     f"{sum(ours) * 1e3:.0f} ms ({ours[0] * 1e3:.0f} + {ours[1] * 1e3:.0f}): {speedup:.0f}× faster",
                     "≥ 50× faster", speedup >= 50)], t)


def _our_fold_contenders(layer) -> dict:
    """``fold_weight`` then ``unfold_weight`` on PEFT's layer's weights, columns computed from its parameters."""
    import fx_adapters as fxa
    from fx_adapters.road.rotation import road_columns

    adapter = layer.active_adapters[0]
    weight, bias = layer.get_base_layer().weight, layer.get_base_layer().bias
    args = (layer.variant[adapter], layer.group_size[adapter], layer.road_theta[adapter], layer.road_alpha[adapter])
    folded = {}

    def fold():
        folded["wb"] = fxa.fold_weight(weight, bias, road_columns(*args).detach(), args[1])

    def unfold():
        return fxa.unfold_weight(*folded["wb"], road_columns(*args).detach(), args[1])

    with torch.no_grad():  # check once: our fold is PEFT's merge, and unfold gets the weights back
        original = weight.detach().clone()
        fold()
        layer.merge()
        merged = layer.get_base_layer().weight.clone()
        layer.unmerge()
        fold_err = (folded["wb"][0] - merged).abs().max().item()
        round_trip = (unfold()[0] - original).abs().max().item()
    if fold_err > 1e-4 or round_trip > 1e-6:  # issue 3: the round trip restores the weights to 1e-6
        raise AssertionError(f"fold: differs from PEFT's merge by {fold_err:.1e}, round trip error {round_trip:.1e}")
    return {"ours_fold": fold, "ours_unfold": unfold}


def _peft_road_linear(in_features: int = 2048, out_features: int = 5632) -> torch.nn.Module:
    """PEFT's RoAd ``Linear`` wrapping a random ``nn.Linear(in_features, out_features)`` (random adapter)."""
    from peft import RoadConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(in_features, out_features)

        def forward(self, x):
            return self.linear(x)

    torch.manual_seed(2)
    config = RoadConfig(**{**m.ROAD, "target_modules": ["linear"]})
    return get_peft_model(One(), config).base_model.model.linear


def xlora(s: Settings) -> Row:
    """Row 5: X-LoRA forward, 8 experts r=8 on q, v, o, down, batch 8 (both passes and the classifier)."""
    peft, ours = m.xlora_contenders()
    batch = m.xlora_inputs()
    calls = {"base": lambda: m.base_model()(**batch, use_cache=False).logits,
             "peft": lambda: peft(**batch).logits, "ours": lambda: ours(**batch).logits}
    with torch.inference_mode():
        m.check_close(calls["ours"](), calls["peft"](), "X-LoRA forward")
    t = s.time(calls)
    return Row([Line.ratios("X-LoRA, 8 experts r=8 on q,v,o,down ÷ base (batch 8)", t, "peft", "ours",
                            at_most(2.10))], t)


GENERATE_BATCH = 4  # issue 15's generate bars (and issue 17's): batch 4 × 128 new tokens
PEFT_XLORA_REPEATS = 1  # PEFT's X-LoRA generate at 128 new tokens takes tens of seconds a call


def generate_batch() -> dict[str, torch.Tensor]:
    return {k: v[:GENERATE_BATCH] for k, v in m.inputs().items()}


def greedy(model, new: int) -> Callable[[], torch.Tensor]:
    """A greedy ``generate`` call of ``model`` (transformers', PEFT's or ours) on ``generate_batch()``."""
    batch = generate_batch()
    return lambda: model.generate(**batch, max_new_tokens=new, do_sample=False)


def checked_tokens(calls: dict[str, Callable[[], torch.Tensor]], new: int, what: str) -> dict[str, torch.Tensor]:
    """Each call's new tokens, from one call each (also the warm-up: our first call captures); raises when a call
    stopped before ``new`` tokens (every row met EOS), as its time would not compare."""
    prompt = generate_batch()["input_ids"].shape[1]
    with torch.inference_mode():
        tokens = {name: call()[:, prompt:] for name, call in calls.items()}
    short = [name for name, t in tokens.items() if t.shape[1] != new]
    if short:
        raise AssertionError(f"{what}: {', '.join(short)} stopped before {new} new tokens; not timing it")
    if not torch.equal(tokens["ours"], tokens["peft"]):
        raise AssertionError(f"{what}: fx_adapters and PEFT chose different tokens; not timing it")
    return tokens


def generate(s: Settings) -> Row:
    """Issue 15's X-LoRA bars: greedy ``generate``, batch 4 × prompt 64 × ``new_tokens`` new tokens (128 in a full
    run), warm: ours (both passes cached) ÷ the base model's own cached ``generate`` (≤ 2.3), and ours in new tokens per
    second ÷ PEFT's (≥ 5; PEFT's X-LoRA forces ``use_cache=False``, so each token re-runs both passes on the whole
    sequence). PEFT takes tens of seconds a call: it is timed in a run of its own with the base model
    (``PEFT_XLORA_REPEATS`` repetitions) and compared through the base: ours ÷ PEFT = (ours ÷ base) ÷ (PEFT ÷ base),
    each ratio from one interleaved run."""
    peft, ours = m.xlora_contenders()
    new = s.new_tokens
    calls = {"base": greedy(m.base_model(), new), "peft": greedy(peft, new), "ours": greedy(ours, new)}
    checked_tokens(calls, new, "X-LoRA generate")
    t = s.time({n: calls[n] for n in ("base", "ours")}, s.generate_repeats, warmup=0)
    t_peft = s.time({n: calls[n] for n in ("base", "peft")}, PEFT_XLORA_REPEATS, warmup=0)
    ours_to_base, peft_to_base = t.ratio("ours"), t_peft.ratio("peft")
    speedup = peft_to_base / ours_to_base

    def rate(seconds: float) -> str:
        return f"{new * GENERATE_BATCH / seconds:.0f}"
    shape = f"{new} new × batch {GENERATE_BATCH}"
    return Row([
        Line(f"X-LoRA generate, {shape} (tokens/s)", rate(t_peft.median("peft")),
             f"{rate(t.median('ours'))}: {speedup:.1f}× PEFT", "≥ 5× PEFT", speedup >= 5),
        Line(f"X-LoRA generate ÷ base model's generate, {shape}", f"{peft_to_base:.3f}", f"{ours_to_base:.3f}",
             at_most(2.3).text, ours_to_base <= 2.3),
    ], t, [f"the base model's own generate: {rate(t.median('base'))} tokens/s",
           f"PEFT timed apart with the base model ({rate(t_peft.median('base'))} tokens/s then): {t_peft.summary()}"])


def road_generate(s: Settings) -> Row:
    """Issue 15's RoAd bar: ``am.generate`` ÷ the base model's own ``generate`` (greedy, batch 4 × prompt 64 ×
    ``new_tokens`` new tokens, warm, both with a KV cache; ≤ 1.10), PEFT's RoAd ``generate`` beside it; our
    tokens are checked against PEFT's first."""
    c = m.contenders(1)
    new = s.new_tokens
    calls = {"base": greedy(m.base_model(), new), "peft": greedy(c.peft, new), "ours": greedy(c.ours, new)}
    checked_tokens(calls, new, "RoAd generate")
    t = s.time(calls, s.generate_repeats, warmup=0)
    return Row([Line.ratios(f"RoAd generate ÷ base model's generate, {new} new × batch {GENERATE_BATCH}", t, "peft",
                            "ours", at_most(1.10))], t)


def prompt_generate(s: Settings) -> Row:
    """X-LoRA ``generate(decode_scalings="prompt")`` (one pass per decode step) vs the exact mode (both passes), greedy,
    batch 4 × prompt 64, ``new_tokens`` new tokens (128 in a full run), in new tokens per second; the notes say
    how many new tokens agree with the exact mode's (the first must) on this random model and classifier."""
    _, ours = m.xlora_contenders()
    batch = generate_batch()
    new = s.new_tokens
    options = dict(attention_mask=batch["attention_mask"], max_new_tokens=new, do_sample=False)
    calls = {"exact": lambda: ours.generate(batch["input_ids"], **options),
             "prompt": lambda: ours.generate(batch["input_ids"], **options, decode_scalings="prompt")}
    with torch.inference_mode():
        tokens = {name: call()[:, -new:] for name, call in calls.items()}  # also the warm-up (the first captures)
    if not torch.equal(tokens["prompt"][:, 0], tokens["exact"][:, 0]):
        raise AssertionError("X-LoRA generate: decode_scalings='prompt' changed the first new token; not timing it")
    t = s.time(calls, s.generate_repeats, warmup=0)
    rate = {name: new * GENERATE_BATCH / t.median(name) for name in calls}
    ratio = t.median("prompt") / t.median("exact")
    same = (tokens["prompt"] == tokens["exact"]).float().mean(dim=1)
    diverge = [int((~row).int().argmax()) if not row.all() else new for row in tokens["prompt"] == tokens["exact"]]
    line = Line(f"X-LoRA generate, decode_scalings=\"prompt\" time ÷ exact, {new} new × batch {GENERATE_BATCH}", "n/a",
                f"{ratio:.3f} ({rate['prompt']:.0f} vs {rate['exact']:.0f} tokens/s)", "≤ 0.60", ratio <= 0.60)
    return Row([line], t, [f"new tokens equal to the exact mode's, per prompt: "
                           f"{', '.join(f'{x:.0%}' for x in same.tolist())}; first difference at new token "
                           f"{diverge} (0-based; {new} = none)"])


def compiled(s: Settings) -> Row:
    """Opt-in: ``am.compile()`` (torch.compile of the emitted graph, inductor on CPU), unmerged and on row 2's mixed
    batch, checked against the eager graph first."""
    c = m.contenders(8)
    cycle = [*c.names, "__base__"]
    names = [cycle[i % len(cycle)] for i in range(m.BATCH)]
    am, (_, xm) = copy.deepcopy(c.ours), m.xlora_contenders()
    xm_compiled = copy.deepcopy(xm)
    for module in (am, xm_compiled):
        module.compile()
    xlora_batch = m.xlora_inputs()
    base_compiled = torch.compile(m.base_model())
    calls = {"base": m.eager(m.base_model()), "ours_compiled": m.ours(am),
             "ours_compiled_mixed": m.ours(am, adapter_names=names),
             "xlora_base": lambda: m.base_model()(**xlora_batch, use_cache=False).logits,
             "xlora_base_compiled": lambda: base_compiled(**xlora_batch, use_cache=False).logits,
             "xlora_compiled": lambda: xm_compiled(**xlora_batch).logits}
    try:
        with torch.inference_mode():  # compiles here
            m.check_close(calls["ours_compiled"](), m.ours(c.ours)(), "torch.compile")
            m.check_close(calls["ours_compiled_mixed"](), m.ours(c.ours, adapter_names=names)(), "torch.compile mixed")
            m.check_close(calls["xlora_compiled"](), xm(**xlora_batch).logits, "torch.compile X-LoRA")
            m.check_close(calls["xlora_base_compiled"](), calls["xlora_base"](), "torch.compile base")
    except Exception as e:  # noqa: BLE001 - report the failure, keep the run going
        # the first line that says something (inductor's first line is just "backend='inductor' raised:")
        first = next((ln for ln in str(e).strip().splitlines() if ln.strip() and not ln.endswith(":")), "")
        return Row([Line("am.compile() (torch.compile) forward ÷ base", "n/a", "failed (see below)", INFO.text)],
                   notes=[f"torch.compile failed on this machine: {type(e).__name__}: {first}"])
    t = s.time(calls)
    xlora_vs_compiled = t.ratio("xlora_compiled", "xlora_base_compiled")
    return Row([Line.ratios("am.compile() (torch.compile) unmerged forward ÷ base", t, None, "ours_compiled", INFO,
                            "n/a"),
                Line.ratios(f"am.compile(), mixed batch, {len(c.names)} adapters + __base__ ÷ base", t, None,
                            "ours_compiled_mixed", INFO, "n/a"),
                Line("xm.compile(), X-LoRA as row 5 ÷ base (batch 8)", "n/a",
                     f"{t.ratio('xlora_compiled', 'xlora_base'):.3f}", INFO.text),
                Line("xm.compile() ÷ torch.compile(base), X-LoRA as row 5", "n/a",
                     f"{xlora_vs_compiled:.3f}", at_most(2.05).text, xlora_vs_compiled <= 2.05)], t)


ROWS: dict[str, Callable[[Settings], Row]] = {
    "unmerged": unmerged, "mixed": mixed, "merged": merged, "fold": fold_linear, "xlora": xlora, "generate": generate,
    "road_generate": road_generate, "prompt_generate": prompt_generate, "compile": compiled,
}
DEFAULT_ROWS = ["unmerged", "mixed", "merged", "fold", "xlora", "generate", "road_generate",
                "prompt_generate"]  # "compile" is opt-in
