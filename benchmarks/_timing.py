"""The timing helper the benchmark scripts share."""
from __future__ import annotations

import time

import numpy as np


def median_ms(fn, number: int = 5, repeat: int = 5) -> float:
    """Median over ``repeat`` runs of the mean time of ``number`` calls, in ms (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        ts.append((time.perf_counter() - t0) / number)
    return float(np.median(ts)) * 1e3
