"""Issue 16's rows: serving many adapters on the benchmark model (RoAd road_1 on all 7 projections, group 64).

- ``many``: modules with 1, 64 and 1024 adapters loaded (``--quick``: 1, 16, 256), timed interleaved with the base
  model: a mixed batch (16 × 64, 16 distinct adapters; all the same one with 1 loaded) ÷ base, and one 1 × 4 call
  ÷ the same call with 1 loaded; ``add_adapter`` time per add (average over all adds up to the largest N) and the
  memory the module adds (tables, slot maps and parameters) ÷ the adapters' own parameter bytes, also for 300
  adapters that adapt 3 layers each.
- ``pt2``: the multi-adapter ``.pt2`` (``export(mixed_batch=True)``), loaded, on the mixed batch ÷ the module's.
- ``threads``: N threads of mixed-batch calls, throughput ÷ one thread's.
- ``aoti`` (opt-in, minutes of C++ compilation): AOTInductor packages of the folded and of the multi-adapter graph
  ÷ the eager base model.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from . import models as m
from .rows import INFO, Line, Row, Settings, at_most

SERVED = 16  # distinct adapters in the mixed batch


def _am(n: int, seconds: list[float] | None = None):
    """An AdaptedModule on the benchmark model with ``n`` random adapters ``a0 …`` (add times into ``seconds``)."""
    import fx_adapters as fxa

    base, config = m.base_model(), fxa.RoadConfig(**m.ROAD)  # built (seeded) before our seed: same a0 every time
    torch.manual_seed(3)
    am = fxa.compile_with_road(base, config, adapter_name="a0").eval()
    for i in range(1, n):
        start = time.perf_counter()
        am.add_adapter(f"a{i}", config)
        if seconds is not None:
            seconds.append(time.perf_counter() - start)
    return am


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_ratio(am) -> float:
    """Everything the module adds beyond the base model (adapter parameters, tables, slot maps) ÷ the adapters'
    own parameter bytes."""
    adapters = am.graph_module.road_adapters
    params = _bytes(adapters.parameters())
    return (params + _bytes(adapters.buffers())) / params


def _few_layers_memory(n: int = 300) -> float:
    import fx_adapters as fxa

    am = _am(1)
    layers = [t.name for t in am.linear_layers if t.name.split(".")[-1] in m.PROJECTIONS]
    for i in range(1, n):
        config = fxa.RoadConfig(**{**m.ROAD, "target_modules": [layers[(3 * i + k) % len(layers)] for k in range(3)]})
        am.add_adapter(f"f{i}", config)
    return memory_ratio(am)


def names_for(am) -> list[str]:
    adapters = list(am.adapters)
    return [adapters[(i * 37) % len(adapters)] for i in range(m.BATCH)] if len(adapters) >= SERVED else \
        [adapters[0]] * m.BATCH


def many(s: Settings) -> Row:
    sizes = (1, 16, 256) if s.repeats < 10 else (1, 64, 1024)
    adds: list[float] = []
    modules = {n: _am(n, adds if n == max(sizes) else None) for n in sizes}
    one = {k: v[:1, :4] for k, v in m.inputs().items()}
    calls = {"base": m.eager(m.base_model())}
    for n, am in modules.items():
        calls[f"mixed_{n}"] = m.ours(am, adapter_names=names_for(am))
        calls[f"one_{n}"] = (lambda am=am: am(**one, adapter_name="a0").logits)
    calls["one_base"] = lambda: m.base_model()(**one, use_cache=False).logits
    with torch.inference_mode():
        small, large = modules[min(sizes)], modules[max(sizes)]
        m.check_close(large(**one, adapter_name="a0").logits, small(**one).logits, "one call, many vs one loaded")
    t = s.time(calls)
    lines = [Line.ratios(f"mixed batch, {SERVED} distinct among {n} loaded ÷ base" if n >= SERVED else
                         "mixed batch, 1 adapter loaded ÷ base", t, None, f"mixed_{n}",
                         at_most(1.12) if n == max(sizes) else INFO, "n/a") for n in sizes]
    flat = t.median(f"one_{max(sizes)}") / t.median(f"one_{min(sizes)}")
    lines.append(Line(f"one 1×4 call, {max(sizes)} loaded ÷ 1 loaded", "n/a", f"{flat:.3f}", "≤ 1.15", flat <= 1.15))
    per_add = statistics.mean(adds) * 1e3
    lines.append(Line(f"add_adapter, mean of {len(adds)} adds up to {max(sizes)} (ms)", "n/a",
                      f"{per_add:.1f} (last {adds[-1] * 1e3:.1f})", "≤ 50", per_add <= 50))
    few = _few_layers_memory(100 if s.repeats < 10 else 300)
    for label, ratio in ((f"{max(sizes)} adapters on all layers", memory_ratio(large)),
                         (f"{100 if s.repeats < 10 else 300} adapters on 3 layers each", few)):
        lines.append(Line(f"memory added ÷ adapter parameter bytes, {label}", "n/a", f"{ratio:.2f}", "≤ 4",
                          ratio <= 4))
    one_call = t.median("one_base")
    return Row(lines, t, [f"one 1×4 call: base {one_call * 1e3:.1f} ms, "
                          + ", ".join(f"{n} loaded {t.median(f'one_{n}') * 1e3:.1f} ms" for n in sizes)])


def pt2(s: Settings) -> Row:
    import fx_adapters as fxa

    am = _am(SERVED)
    names = names_for(am)
    with tempfile.TemporaryDirectory() as tmp:
        path = fxa.export(am, Path(tmp, "mixed.pt2"), mixed_batch=True)
        extra = {"adapters.json": ""}
        loaded = torch.export.load(path, extra_files=extra).module()
    mapping = json.loads(extra["adapters.json"])
    ids = torch.tensor([mapping[n] for n in names])
    calls = {"base": m.eager(m.base_model()), "ours": m.ours(am, adapter_names=names),
             "pt2": lambda: loaded(**m.inputs(), adapter_ids=ids)["logits"]}
    with torch.inference_mode():
        m.check_close(calls["pt2"](), calls["ours"](), "multi-adapter .pt2")
    t = s.time(calls)
    return Row([Line.ratios(f"multi-adapter .pt2, mixed batch of {SERVED} ÷ base", t, None, "pt2", INFO, "n/a"),
                Line(f"multi-adapter .pt2 ÷ the module's mixed batch of {SERVED}", "n/a",
                     f"{t.ratio('pt2', 'ours'):.3f}", INFO.text)], t)


def threads(s: Settings) -> Row:
    am = _am(SERVED)
    call = m.ours(am, adapter_names=names_for(am))
    per_thread = max(2, s.repeats // 2)
    rates = {}
    with torch.inference_mode():
        call()
        for n in (1, 2, 4):
            workers = [threading.Thread(target=lambda: [call() for _ in range(per_thread)]) for _ in range(n)]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            rates[n] = n * per_thread / (time.perf_counter() - start)
    return Row([Line(f"{n} threads of mixed-batch calls, throughput ÷ 1 thread", "n/a", f"{rates[n] / rates[1]:.2f}",
                     INFO.text) for n in (2, 4)],
               notes=[f"1 thread: {rates[1]:.2f} calls/s ({torch.get_num_threads()} torch threads each)"])


def aoti(s: Settings) -> Row:
    import torch._inductor

    import fx_adapters as fxa

    am = _am(SERVED)
    names = names_for(am)
    am.set_adapter("a1")
    with tempfile.TemporaryDirectory() as tmp:
        folded = torch._inductor.aoti_load_package(str(fxa.export(am, Path(tmp, "f.pt2"), aot_inductor=True)))
        path = fxa.export(am, Path(tmp, "m.pt2"), mixed_batch=True, aot_inductor=True)
        mixed, mapping = torch._inductor.aoti_load_package(str(path)), fxa.adapter_mapping(path)
    ids = torch.tensor([mapping[n] for n in names])
    calls = {"base": m.eager(m.base_model()), "ours": m.ours(am),
             "folded": lambda: folded(**m.inputs())["logits"],
             "ours_mixed": m.ours(am, adapter_names=names),
             "mixed": lambda: mixed(**m.inputs(), adapter_ids=ids)["logits"]}
    with torch.inference_mode():
        m.check_close(calls["folded"](), calls["ours"](), "AOTInductor folded")
        m.check_close(calls["mixed"](), calls["ours_mixed"](), "AOTInductor multi-adapter")
    t = s.time(calls)
    return Row([Line.ratios("AOTInductor package, folded adapter ÷ eager base", t, None, "folded", at_most(0.95),
                            "n/a"),
                Line.ratios(f"AOTInductor package, multi-adapter, mixed batch of {SERVED} ÷ eager base", t, None,
                            "mixed", INFO, "n/a")], t)


ROWS = {"many": many, "pt2": pt2, "threads": threads, "aoti": aoti}
DEFAULT_ROWS = ["many", "pt2", "threads"]  # "aoti" is opt-in (--aoti)
