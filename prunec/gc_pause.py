"""Pause Python's cyclic garbage collector for the length of a call.

A full collection scans every tracked object in the process (importing torch alone
brings about 300k), and tracing and pruning allocate enough short-lived objects to
trigger several: 0.1-0.15 s of a ResNet-50 pruning call.  The collector is paused
for the call and resumed after it; cycles made meanwhile are collected then.  Not
for long-running work (a TVM build or tuning run), where garbage would pile up."""
from __future__ import annotations

import contextlib
import gc


class gc_paused(contextlib.ContextDecorator):
    """``with gc_paused():`` or ``@gc_paused()``; nested uses leave it paused."""

    def __enter__(self):
        self._was = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, *exc):
        if self._was:
            gc.enable()
        return False
