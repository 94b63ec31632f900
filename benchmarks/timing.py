"""The one timing helper every row uses: contenders run round-robin, so machine noise hits all alike.

Contention is measured, not just hoped away. With 2 threads on a 2-CPU machine, any other busy process
stalls PyTorch's OpenMP workers at every parallel kernel (a 0.05 ms ``mul`` then takes a scheduler slice,
~8 ms), so a forward slows down up to 10× and in proportion to how many kernels it launches, not to the
work it does: such repetitions say nothing about the code. Each repetition therefore records the CPU time
other processes used meanwhile (``/proc/stat`` minus our own); repetitions where that exceeded ``QUIET``
CPUs are set aside, more repetitions are run (up to ``patience`` × ``repeats`` in all) until ``repeats``
quiet ones are collected, and medians are taken over the quiet ones (over all of them if fewer than
``MIN_QUIET`` were quiet).
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

QUIET = 0.25  # mean CPUs used by other processes during a repetition, at most, for it to count as quiet
MIN_QUIET = 3


@dataclass
class Timings:
    """Seconds per call of each contender, one entry per repetition, and the machine's other load then."""

    samples: dict[str, list[float]]
    others_cpus: list[float | None]  # per repetition: mean CPUs other processes kept busy (None: unknown)

    @property
    def quiet(self) -> list[int]:
        """Indices of the repetitions used: the quiet ones, or all when fewer than ``MIN_QUIET`` were quiet."""
        quiet = [i for i, busy in enumerate(self.others_cpus) if busy is None or busy <= QUIET]
        return quiet if len(quiet) >= min(MIN_QUIET, len(self.others_cpus)) else list(range(len(self.others_cpus)))

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name][i] for i in self.quiet)

    def ratio(self, name: str, base: str = "base") -> float:
        """``name``'s median ÷ ``base``'s median (both from this run)."""
        return self.median(name) / self.median(base)

    def summary(self) -> str:
        n = len(self.others_cpus)
        busy = [b for b in self.others_cpus if b is not None]
        if len(busy) < n:
            return f"{n} repetitions (machine load unknown)"
        quiet = sum(b <= QUIET for b in busy)
        where = f"other processes used up to {max(busy):.2f} CPUs"
        if quiet >= min(MIN_QUIET, n):
            return f"medians of the {quiet} quiet repetitions of {n} (≤ {QUIET} CPUs busy elsewhere; {where})"
        return f"UNRELIABLE: only {quiet} of {n} repetitions were quiet, medians of all ({where})"

    def as_json(self) -> dict:
        return {"others_cpus": self.others_cpus, "used_repetitions": self.quiet,
                **{name: {"median_s": self.median(name), "samples_s": [round(t, 6) for t in ts]}
                   for name, ts in self.samples.items()}}


def interleaved(contenders: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                patience: float = 1.0,
                mode: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode) -> Timings:
    """Call every contender ``warmup`` times, then in round-robin repetitions until ``repeats`` quiet ones
    (at most ``max(repeats, patience * repeats)`` repetitions in all).

    The order within a repetition is the mapping's order (so ``merge`` can precede ``unmerge``). Calls run
    under ``mode()`` (inference mode by default) with the garbage collector paused.
    """
    samples = {name: [] for name in contenders}
    others: list[float | None] = []
    gc.collect()
    gc.disable()
    try:
        with mode():
            for _ in range(warmup):
                for fn in contenders.values():
                    fn()
            while len(others) < max(repeats, round(patience * repeats)):
                load = OtherLoad()
                for name, fn in contenders.items():
                    start = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - start)
                others.append(load.cpus())
                if sum(b is None or b <= QUIET for b in others) >= repeats:
                    break
    finally:
        gc.enable()
    return Timings(samples, others)


class OtherLoad:
    """CPU time used by other processes since creation, per second of wall time (None without /proc/stat)."""

    def __init__(self):
        self.start = (time.perf_counter(), _busy_seconds(), _own_seconds())

    def cpus(self) -> float | None:
        now = (time.perf_counter(), _busy_seconds(), _own_seconds())
        wall, busy, own = (b - a for a, b in zip(self.start, now))
        return None if busy != busy else round(max(0.0, busy - own) / wall, 3)


def _busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot (NaN when /proc/stat is unavailable)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system
