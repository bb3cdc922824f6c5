"""Ragged GEMM columns (backends/tvm_schedule_overlap.py): whole-vector strips, the last one moved
back to overlap the one before it, with no guard left; where that cannot be proved safe, the
operand is zero-padded and the result cropped instead.  Depthwise rows no vector width divides
(14, 28 columns) the same way, one vector per column tile."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import tvm_ffi  # noqa: E402
from tvm import s_tir, tirx  # noqa: E402

from prunec.backends import tvm_lower, tvm_schedule, tvm_schedule_overlap  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_tvm_schedule import _blocks, _depthwise, _matmul_bias, _schedule, check_depthwise  # noqa: E402

pytestmark = pytest.mark.tvm


def _realizes(func) -> list:
    out = []
    tvm_ffi.structural_walk(func.body, [(s_tir.SBlockRealize, out.append)])
    return [r for r in out if r.block.name_hint != "root"]


def _strip_loop(func):
    loops = []
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda lp: loops.append(lp) if lp.kind == tirx.ForKind.PARALLEL
                                         else None)])
    assert len(loops) == 1, loops  # pack, product and write-back: one parallel launch
    return loops[0]


def _run(func, target, batch, m, k, n, batched):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, m, k)).astype("float32")
    w = rng.standard_normal((batch, k, n) if batched else (k, n)).astype("float32")
    bias = rng.standard_normal(n).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.full((batch, m, n), np.nan, "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(bias), out)
    return out.numpy(), np.matmul(x, w) + bias


@pytest.mark.parametrize("shape", [
    (1, 24, 48, 196, False),  # a 1x1 on a 14x14 plane as a matmul: 13 strips of 16 (AVX2)
    (1, 40, 80, 49, False),   # on a 7x7 plane: 4 strips, the last one columns 33-48 (AVX2)
    (3, 37, 8, 37, True),     # attention scores, 37 tokens: strips fused with the batch
    (1, 9, 16, 40, False),    # a pruned 80 -> 40: its best divisor (20) is no whole vector, with 8 or 16 lanes
])
def test_ragged_columns_overlap_the_last_strip_unguarded(shape):
    batch, m, k, n, batched = shape
    func, target = _schedule(_matmul_bias(batch, m, k, n, batched))
    width = 2 * tvm_schedule.vector_lanes(target)
    strip = _strip_loop(func)
    assert int(strip.extent) == batch * -(-n // width), strip.extent
    uses = [r for r in _realizes(func) if any(_mentions(v, strip.loop_var) for v in r.iter_values)]
    assert len(uses) >= 3, [r.block.name_hint for r in uses]  # init, product, write-back (and pack)
    for r in uses:
        # no guard on the strip: every vector loop runs whole (a ragged row tile's guard may stay)
        assert not _mentions(r.predicate, strip.loop_var), (r.block.name_hint, r.predicate)
        # ... because the strip's first column is clamped to end at the last column
        assert any(_has_min(v) for v in r.iter_values), (r.block.name_hint, list(r.iter_values))
    # no padded buffer, no crop pass: the epilogue is applied as the tile is written back
    assert not any("pad" in b.name_hint for b in _blocks(func)), [b.name_hint for b in _blocks(func)]
    got, want = _run(func, target, batch, m, k, n, batched)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # every column written (NaN-filled before)


def test_a_binding_the_rewrite_cannot_clamp_is_refused(monkeypatch):
    """The rewrite proves its result in bounds: told the wrong strip width, it clamps no binding,
    the last strip's columns could pass the end, and it refuses."""
    seen = {}
    orig = tvm_schedule.overlap_last_strip

    def keep(func, strip, width, cols):  # the rule's ragged schedule, before the rewrite
        seen.update(func=func, strip=strip, width=width, cols=cols)
        return orig(func, strip, width, cols)
    monkeypatch.setattr(tvm_schedule, "overlap_last_strip", keep)
    _schedule(_matmul_bias(1, 24, 48, 196, False))
    assert seen["cols"] == 196
    with pytest.raises(tvm_schedule_overlap.OverlapRefused, match="may leave|not always true"):
        tvm_schedule_overlap.overlap_last_strip(seen["func"], seen["strip"], seen["width"] // 2, 196)
    with pytest.raises(tvm_schedule_overlap.OverlapRefused, match="do not fill"):
        tvm_schedule_overlap.overlap_last_strip(seen["func"], seen["strip"], 256, 196)


@pytest.mark.parametrize("shape", [(1, 24, 48, 196, False), (3, 37, 8, 37, True)])
def test_refused_overlap_pads_and_crops_in_one_launch(monkeypatch, shape):
    """The fallback: zero-pad the operand as each strip is packed, crop the result in the same
    task; no block writes the output over the padded width."""
    batch, m, k, n, batched = shape

    def refuse(*_a):
        raise tvm_schedule_overlap.OverlapRefused("test")
    monkeypatch.setattr(tvm_schedule, "overlap_last_strip", refuse)
    func, target = _schedule(_matmul_bias(batch, m, k, n, batched))
    blocks = _blocks(func)
    names = {b.name_hint for b in blocks}
    assert any(name.endswith("_pad_global") for name in names), names  # padded as it is packed
    _strip_loop(func)  # padding, product and crop in one parallel loop
    for b in blocks:
        for region in b.writes:
            if region.source.name == "z":
                # the output's own extents, never the padded width (TVM once reverse-inlined the
                # crop over 48 columns)
                extents = sorted(int(iv.dom.extent) for iv in b.iter_vars)
                assert extents == sorted(int(d) for d in region.source.shape), (b.name_hint, extents)
    got, want = _run(func, target, batch, m, k, n, batched)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _mentions(expr, var) -> bool:
    found = []
    tvm_ffi.structural_walk(expr, [(tirx.Var, lambda v: found.append(v) if v.same_as(var) else None)])
    return bool(found)


def _has_min(expr) -> bool:
    found = []
    tvm_ffi.structural_walk(expr, [(tirx.Min, found.append)])
    return bool(found)


@pytest.mark.parametrize("shape", [
    (3, 14, 14, 3, 1),   # MobileNetV2's 14x14 depthwise: two vectors of 8 (AVX2), columns 0-7 and 6-13
    (4, 28, 28, 3, 1),   # four vectors, the last one columns 20-27
    (5, 13, 13, 3, 1),   # odd rows and columns
    (2, 40, 40, 5, 2),   # stride 2: 20 columns
])
def test_ragged_depthwise_rows_are_whole_vectors(shape):
    """A depthwise row no vector width divides runs in whole vectors, the last one clamped to end
    at the row's end, with no guard: not in divisor-wide vectors (14 lanes: 8 + 4 + 2 on AVX2)."""
    c, h, w, k, stride = shape
    lanes = 8  # AVX2's fp32 vector (8-lane code runs on AVX-512 hosts too)
    target = tvm_lower.to_target("llvm")
    with target:
        func = tvm_schedule.RegisterTiledReduction(vec=lanes).apply(_depthwise(c, h, w, k, stride), target, False)
    func = func.mod["main"]
    width = (w + 2 * (k // 2) - k) // stride + 1
    vectors = []
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda lp: vectors.append(int(lp.extent))
                                         if lp.kind == tirx.ForKind.VECTORIZED else None)])
    conv = [r for r in _realizes(func) if r.block.name_hint in ("y", "y_init", "y_global")]
    assert conv and all(_has_min(v) for r in conv for v in r.iter_values[-1:]), [r.iter_values for r in conv]
    assert all(_true(r.predicate) for r in conv), [r.predicate for r in conv]
    assert lanes in vectors and not any(v % lanes and v < width for v in vectors), vectors
    check_depthwise(func, target, shape)  # every column written (NaN-filled before)


def _true(pred) -> bool:
    return isinstance(pred, tirx.IntImm) and bool(pred.value)
