"""A GEMM whose column count no strip width divides (a 14x14 or 7x7 plane: 196 or 49 columns; 197
tokens): its last strip is moved back to end at the last column, overlapping the one before it.

The tiled loop nest is scheduled as for ragged strips (the last one guarded), then every block
binding ``strip * width + lane`` becomes ``min(strip * width, columns - width) + lane`` and the
guards, now always true, are dropped.  Every strip is then whole vectors with no bounds check; the
overlapped columns are computed twice, by the same per-lane arithmetic, so both tasks store the
same values.  Against zero-padding the operand and cropping the output (the alternative, which
needs both passes guarded lane by lane), MobileNetV2's 1x1 products ran 0.78-0.96x the time.

The same rewrite covers a depthwise convolution's row of 28 or 14 columns (``window_tile`` in
tvm_schedule_tiles.py): its column tiles run in one task, one after the other, so the overlapped
columns are written twice by the same thread.

The rewrite is checked, not assumed: every binding under the strip loop must stay inside its
block's domain and every guard must be provably true afterwards, else ``OverlapRefused``.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, sym, tirx


class OverlapRefused(Exception):
    """The loop nest is not one the overlapping rewrite can prove safe; pad instead."""


def _vars(expr) -> list:
    return list(tirx.analysis.undefined_vars(expr))


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in _vars(expr))


def _conjuncts(e) -> list:
    return _conjuncts(e.a) + _conjuncts(e.b) if isinstance(e, tirx.And) else [e]


def overlap_last_strip(func: tirx.PrimFunc, strip, width: int, columns: int) -> tirx.PrimFunc:
    """``func`` with the strips of the parallel loop variable ``strip`` (``width`` columns each, the
    last one ragged) overlapping instead, so none reaches past ``columns``.  Each rewritten binding
    must provably stay inside its block's domain (loop variables over their ranges) and each guard on
    ``strip`` must be provably true, and is then dropped; other guards (a ragged row tile's) stay."""
    if columns <= width:
        raise OverlapRefused(f"{columns} columns do not fill a strip of {width}")
    last = tirx.IntImm(str(strip.ty), columns - width)
    ana = sym.Analyzer()
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda lp: ana.bind(
        lp.loop_var, tvm.ir.Range.from_min_extent(lp.min, lp.extent)))])
    problems = []

    def start(e):  # a strip's first column: ``strip * width`` (or ``strip % n * width`` when fused)
        vs = _vars(e.a)
        if isinstance(e.b, tirx.IntImm) and int(e.b) == width and vs and all(v.same_as(strip) for v in vs):
            return tirx.Min(e, last)
        return e

    def realize(r):
        if not any(_uses(v, strip) for v in r.iter_values) and not _uses(r.predicate, strip):
            return r
        values = [tvm_ffi.structural_map(v, [(tirx.Mul, start)]) for v in r.iter_values]
        for v, iv in zip(values, r.block.iter_vars):
            lo, hi = iv.dom.min, iv.dom.min + iv.dom.extent
            if _uses(v, strip) and not (ana.can_prove(v >= lo) and ana.can_prove(v < hi)):
                problems.append(f"{iv.var.name} = {v} may leave [{lo}, {hi})")
        kept = []
        for c in _conjuncts(tvm_ffi.structural_map(r.predicate, [(tirx.Mul, start)])):
            if not _uses(c, strip):
                kept.append(c)
            elif not ana.can_prove(c):
                problems.append(f"guard {c} is not always true")
        pred = kept[0] if kept else tirx.const(True, "bool")
        for c in kept[1:]:
            pred = tirx.And(pred, c)
        return s_tir.SBlockRealize(values, pred, r.block)

    body = tvm_ffi.structural_map(func.body, [(s_tir.SBlockRealize, realize)])
    if problems:
        raise OverlapRefused("; ".join(problems))
    return func.with_body(body)
