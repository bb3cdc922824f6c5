"""The timing helper the benchmark scripts share."""
from __future__ import annotations

import time

import numpy as np


def median_ms(fn, number: int = 5, repeat: int = 5) -> float:
    """Median over ``repeat`` runs of the mean time of ``number`` calls, in ms (after one warm-up call)."""
    fn()
    return float(np.median([_mean_s(fn, number) for _ in range(repeat)])) * 1e3


def _mean_s(fn, number: int) -> float:
    """Mean seconds of ``number`` calls of ``fn``."""
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def settle(fn, seconds: float = 0.02) -> None:
    """Call ``fn`` untimed (at least once) for ``seconds``.  Before timing one contender after
    another: the previous one's thread pool busy-waits for a while after its last call (OpenMP's
    and TVM's both do) and takes cores from this one's first calls."""
    if seconds <= 0:
        return
    t0 = time.perf_counter()
    fn()
    while time.perf_counter() - t0 < seconds:
        fn()


def interleaved_ms(fns: dict, number: int = 20, rounds: int = 9, settle_s: float = 0.02) -> dict:
    """Median ms per call of each callable, timed in alternating rounds of ``number`` calls.

    On a shared machine the load changes within seconds; alternating the contenders round by
    round gives each the same conditions, so their ratios hold even when the milliseconds drift.
    A callable may instead time itself: one with a ``per_call_s(number)`` attribute returns seconds.
    """
    ts = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            settle(fn, settle_s)
            own = getattr(fn, "per_call_s", None)
            ts[name].append(own(number) if own is not None else _mean_s(fn, number))
    return {name: float(np.median(v)) * 1e3 for name, v in ts.items()}
