"""prunec's default CPU schedules (backends/tvm_schedule.py): each kernel shape against numpy,
and the structure the schedule is meant to have (packed operand, padding, in-bounds writes)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import s_tir, te, tirx  # noqa: E402

from prunec.backends import tvm_lower, tvm_schedule, tvm_schedule_tiles  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tvm_helpers import build_and_compare, task_allocations  # noqa: E402

pytestmark = pytest.mark.tvm


def _matmul_bias(batch: int, m: int, k: int, n: int, batched_rhs: bool):
    """z = x @ w + bias, w shared across the batch (linear) or per batch (attention)."""
    x = te.placeholder((batch, m, k), "float32", name="x")
    w = te.placeholder((batch, k, n) if batched_rhs else (k, n), "float32", name="w")
    bias = te.placeholder((n,), "float32", name="bias")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((batch, m, n), lambda b, i, j: te.sum(
        x[b, i, r] * (w[b, r, j] if batched_rhs else w[r, j]), axis=r), name="y")
    z = te.compute((batch, m, n), lambda b, i, j: y[b, i, j] + bias[j], name="z")
    return te.create_prim_func([x, w, bias, z])


def _blocks(func) -> list:
    sch = s_tir.Schedule(func)
    return [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]


def _schedule(func):
    target = tvm_lower.to_target("llvm")
    rule = tvm_schedule.RegisterTiledReduction(vec=tvm_schedule.vector_lanes(target))
    with target:
        sch = rule.apply(func, target, False)
    assert sch is not None, "the rule declined a plain matmul"
    return sch.mod["main"], target


@pytest.mark.parametrize("shape", [
    (1, 37, 24, 48, False),   # prime row count: a guarded tail register tile
    (1, 5, 16, 37, False),    # ragged columns: the last strip overlaps the one before it
    (3, 37, 8, 37, True),     # attention q @ k^T: per-batch right operand, both sides ragged
    (3, 37, 37, 8, True),     # attention p @ v
    (1, 1, 32, 64, False),    # one row
    (1, 9, 16, 80, False),    # 80 columns: whole-vector strips (its best divisor, 20, is not one)
    (1, 24, 48, 196, False),  # a 1x1 on a 14x14 plane, as a matmul
    (1, 40, 80, 49, False),   # ... on a 7x7 plane: a ragged row tile too
    (1, 12, 72, 64, False),   # a short strip, read in place (no packed copy)
    (1, 14, 600, 64, False),  # a long strip, packed
])
def test_gemm_schedule_matches_numpy(shape):
    batch, m, k, n, batched = shape
    func, target = _schedule(_matmul_bias(batch, m, k, n, batched))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, m, k)).astype("float32")
    w = rng.standard_normal((batch, k, n) if batched else (k, n)).astype("float32")
    bias = rng.standard_normal(n).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.zeros((batch, m, n), "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(bias), out)
    np.testing.assert_allclose(out.numpy(), np.matmul(x, w) + bias, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,n", [
    (1280, 1000),  # MobileNetV2's head: 1000 columns, 8-lane vectors on AVX-512
    (300, 130),    # no power-of-two vector divides 130: a guarded tail; 300 splits into 6 bands
    (257, 256),    # prime reduction: 8 bands, the last one guarded
])
def test_one_row_matmul_splits_the_reduction(k, n):
    """A batch-1 linear layer has no register axis: its reduction is split into bands that
    stream contiguous weight rows in parallel (rfactor), then summed (MobileNetV2's 1280x1000
    head: 1.37 -> 0.34 ms in the model)."""
    func, target = _schedule(_matmul_bias(1, 1, k, n, False))
    sch = s_tir.Schedule(func)
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    rf = [b for b in blocks if "_rf" in b.name_hint]
    assert rf, [b.name_hint for b in blocks]
    band = sch.get(sch.get_loops(sch.get_child_blocks(sch.get_sblock("root"))[0])[0])
    assert band.kind == tirx.ForKind.PARALLEL and int(band.extent) >= 2, band
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, k)).astype("float32")
    w = rng.standard_normal((k, n)).astype("float32")
    bias = rng.standard_normal(n).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.zeros((1, 1, n), "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(bias), out)
    np.testing.assert_allclose(out.numpy(), np.matmul(x, w) + bias, rtol=1e-5, atol=1e-4)


class _HeadThenReshape(nn.Module):
    """A batch-1 linear layer whose epilogue changes shape (its loops are not the product's)."""

    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(640, n)

    def forward(self, x):
        y = self.fc(x)
        return torch.relu(y.reshape(1, 10, -1)) * 2 if y.shape[-1] % 10 == 0 else nn.functional.gelu(y)


@pytest.mark.parametrize("n", [1000, 1001])
def test_one_row_linear_models_match_torch(n):
    torch.manual_seed(0)
    build_and_compare(_HeadThenReshape(n), (torch.randn(1, 640),))


@pytest.mark.parametrize("cores,bands", [(2, 8), (16, 64)])
def test_one_row_matmul_takes_four_bands_per_core(cores, bands):
    """The bands follow the target's ``num-cores`` (a few per core even out a slow one)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": cores})
    with target:
        sch = tvm_schedule.RegisterTiledReduction(vec=16).apply(_matmul_bias(1, 1, 1280, 1000, False), target, False)
    s = s_tir.Schedule(sch.mod["main"])
    band = s.get(s.get_loops(s.get_child_blocks(s.get_sblock("root"))[0])[0])
    assert band.kind == tirx.ForKind.PARALLEL and int(band.extent) == bands


@pytest.mark.parametrize("k,packed", [(72, False), (512, True)])
def test_gemm_packs_only_a_strip_too_long_for_l1(k, packed):
    """An unpadded operand's strip of 72 rows (a pruned 1x1 at 56x56: 12 x 72 x 3136) is read in
    place; one of 512 rows (32 KB and more) is copied contiguously per strip first."""
    names = {b.name_hint for b in _blocks(_schedule(_matmul_bias(1, 12, k, 64, False))[0])}
    assert ("w_global" in names) == packed, names


class PrimeLengthAttention(nn.Module):
    """ViT-like: 37 tokens (ViT-B/16 has 197, a prime), a linear layer with a ragged width."""

    def __init__(self, d=48, heads=3):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 37, d) * 0.02)
        self.layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.out = nn.Linear(d, 37)

    def forward(self, x):
        return self.out(self.layer(x + self.pos))


def test_prime_length_attention_model():
    torch.manual_seed(0)
    build_and_compare(PrimeLengthAttention(), (torch.randn(1, 37, 48),))


def _depthwise(c: int, h: int, w: int, k: int, stride: int):
    """relu(depthwise_conv(x, weight) + bias), padded to keep 'same' size at stride 1."""
    pad = k // 2
    x = te.placeholder((1, c, h, w), "float32", name="x")
    wt = te.placeholder((c, 1, k, k), "float32", name="wt")
    bias = te.placeholder((c,), "float32", name="bias")
    xp = te.compute((1, c, h + 2 * pad, w + 2 * pad), lambda n, i, y, z: te.if_then_else(
        te.all(y >= pad, y < h + pad, z >= pad, z < w + pad), x[n, i, y - pad, z - pad], 0.0), name="xp")
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    ry, rx = te.reduce_axis((0, k), name="ry"), te.reduce_axis((0, k), name="rx")
    y = te.compute((1, c, oh, ow), lambda n, i, a, b: te.sum(
        xp[n, i, a * stride + ry, b * stride + rx] * wt[i, 0, ry, rx], axis=[ry, rx]), name="y")
    z = te.compute((1, c, oh, ow), lambda n, i, a, b: te.max(y[n, i, a, b] + bias[i], 0.0), name="z")
    return te.create_prim_func([x, wt, bias, z])


@pytest.mark.parametrize("shape", [
    (4, 56, 56, 3, 1),   # rows tiled by 4, vectors of one register
    (3, 32, 32, 3, 1),   # two-register vectors
    (5, 28, 28, 5, 2),   # 5x5, stride 2, 14 columns
    (6, 7, 7, 3, 1),     # a small plane: one channel per task, padded inside it
    (3, 14, 14, 3, 1),   # 14x14: a whole plane on AVX-512, row tiles on AVX2
    (5, 13, 13, 3, 1),   # odd rows, ragged columns
    (2, 13, 13, 3, 2),   # ragged everything
    (2, 112, 112, 3, 1),  # a large plane: whole channels per task, each padded inside its task
])
def test_depthwise_schedule_matches_torch(shape):
    c, h, w, k, stride = shape
    func, target = _schedule(_depthwise(c, h, w, k, stride))
    # the window taps and the row tile are unrolled, the columns vectorized
    sch = s_tir.Schedule(func)
    update = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
              if any(iv.iter_type == 2 for iv in sch.get(b).iter_vars)]
    kinds = [sch.get(lp).kind for lp in sch.get_loops(update[-1])] if update else []
    assert update and kinds[-1] == tirx.ForKind.VECTORIZED, kinds
    assert sum(kd == tirx.ForKind.UNROLLED for kd in kinds) >= 2, kinds
    # a plane whose rows' accumulators fit in registers is one task per channel, its padding
    # computed inside the task (the same loop as the convolution), not in a pass of its own
    # (7 rows of one vector fit on both AVX2 and AVX-512; 14 rows of a 14-lane vector only in AVX-512's
    # 32 registers)
    small = (c, h, w) == (6, 7, 7) or ((c, h, w) == (3, 14, 14) and tvm_schedule.vector_lanes(target) >= 16)
    pad = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint == "xp"]
    same_task = bool(pad) and sch.get(sch.get_loops(pad[0])[0]).same_as(sch.get(sch.get_loops(update[-1])[0]))
    if small:
        assert same_task, "the padding of a small plane runs as its own pass"
    if (c, h, w) == (4, 56, 56):
        assert not same_task, "a mid-size plane's padding moved into the row tiles"
    if h >= 64:
        assert same_task, "a large plane's padding runs as its own pass, not in its channel's task"
    if stride == 2 and (w + 2 * (k // 2)) % 2 == 0:
        # a strided window reads its padded input phase-split: contiguous lanes, not a gather
        assert len(sch.get(pad[0]).writes[0].source.shape) == 5, sch.get(pad[0]).writes[0].source.shape
    check_depthwise(func, target, shape)


def check_depthwise(func, target, shape) -> None:
    """The scheduled ``_depthwise`` kernel against torch, its output NaN-filled first (so every
    element must be written)."""
    c, h, w, k, stride = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, h, w)).astype("float32")
    wt = rng.standard_normal((c, 1, k, k)).astype("float32")
    bias = rng.standard_normal(c).astype("float32")
    ref = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(bias),
                                                stride=stride, padding=k // 2, groups=c)).numpy()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.full(ref.shape, np.nan, "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(wt), tvm.runtime.tensor(bias), out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def _conv(cin: int, cout: int, hw: int, k: int, stride: int):
    """relu(conv(x, weight)), zero-padded by k // 2."""
    pad = k // 2
    x = te.placeholder((1, cin, hw, hw), "float32", name="x")
    wt = te.placeholder((cout, cin, k, k), "float32", name="wt")
    xp = te.compute((1, cin, hw + 2 * pad, hw + 2 * pad), lambda n, i, y, z: te.if_then_else(
        te.all(y >= pad, y < hw + pad, z >= pad, z < hw + pad), x[n, i, y - pad, z - pad], 0.0), name="xp")
    out = (hw + 2 * pad - k) // stride + 1
    rc, ry, rx = te.reduce_axis((0, cin), "rc"), te.reduce_axis((0, k), "ry"), te.reduce_axis((0, k), "rx")
    y = te.compute((1, cout, out, out), lambda n, o, a, b: te.sum(
        xp[n, rc, a * stride + ry, b * stride + rx] * wt[o, rc, ry, rx], axis=[rc, ry, rx]), name="y")
    z = te.compute((1, cout, out, out), lambda n, o, a, b: te.max(y[n, o, a, b], 0.0), name="z")
    return te.create_prim_func([x, wt, z])


def _run_conv(func, target, cin, cout, hw, k, stride, seed=0):
    """Build the scheduled ``_conv`` and check it against torch."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, cin, hw, hw)).astype("float32")
    wt = rng.standard_normal((cout, cin, k, k)).astype("float32")
    ref = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(wt), stride=stride,
                                                padding=k // 2)).numpy()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.zeros(ref.shape, "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(wt), out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,split", [
    ((3, 16, 32, 7, 2), True),    # a ResNet stem: the padded input is stored phase-split
    ((8, 16, 16, 3, 2), True),
    ((3, 8, 31, 7, 2), False),    # odd padded width (37): left as it is
    ((4, 8, 16, 3, 1), False),    # stride 1: nothing to split
])
def test_strided_conv_schedule_matches_torch(shape, split):
    cin, cout, hw, k, stride = shape
    func, target = _schedule(_conv(cin, cout, hw, k, stride))
    xp = [b for b in _blocks(func) if b.name_hint == "xp"][0]
    assert (len(xp.writes[0].source.shape) == 5) == split, xp.writes[0].source.shape
    _run_conv(func, target, cin, cout, hw, k, stride)


@pytest.mark.parametrize("shape,in_task", [
    ((3, 16, 224, 3, 2), True),    # MobileNetV2's stem, pruned: 3x3x3 = 27 products per output
    ((3, 10, 37, 3, 2), True),     # odd everything: a ragged row tile, an odd padded width
    ((3, 64, 56, 7, 2), True),     # a ResNet stem: 147 products
    ((3, 8, 20, 3, 1), True),      # stride 1
    ((16, 16, 28, 3, 1), True),    # 144 products
    ((32, 16, 28, 3, 1), False),   # 288 products: the padding stays one pass over the input
])
def test_rgb_stem_pads_its_rows_inside_each_task(shape, in_task):
    """With few input channels the padding pass costs about as much as the convolution (the
    pruned MobileNetV2 stem: 0.23 -> 0.13 ms): each task, one output row, pads the rows it reads."""
    cin, cout, hw, k, stride = shape
    func, target = _schedule(_conv(cin, cout, hw, k, stride))
    sch = s_tir.Schedule(func)
    xp, y = sch.get_sblock("xp"), sch.get_sblock("y_update")
    shared = sch.get(sch.get_loops(xp)[0]).same_as(sch.get(sch.get_loops(y)[0]))
    assert shared == in_task  # the padding runs in the convolution's parallel loop
    _run_conv(func, target, cin, cout, hw, k, stride, seed=1)


def _pointwise(cin: int, cout: int, h: int, w: int, stride: int = 1):
    """relu6(conv1x1(x) + bias) + residual, with the plain copy stage TOPI emits for an unpadded conv."""
    x = te.placeholder((1, cin, h, w), "float32", name="x")
    wt = te.placeholder((cout, cin, 1, 1), "float32", name="wt")
    bias = te.placeholder((cout,), "float32", name="bias")
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = te.placeholder((1, cout, ho, wo), "float32", name="res")
    xp = te.compute((1, cin, h, w), lambda n, i, a, b: x[n, i, a, b], name="pad_temp")
    rc, ry, rx = te.reduce_axis((0, cin), "rc"), te.reduce_axis((0, 1), "ry"), te.reduce_axis((0, 1), "rx")
    y = te.compute((1, cout, ho, wo), lambda n, o, a, b: te.sum(
        xp[n, rc, a * stride + ry, b * stride + rx] * wt[o, rc, ry, rx], axis=[rc, ry, rx]), name="y")
    z = te.compute((1, cout, ho, wo), lambda n, o, a, b: te.min(te.max(y[n, o, a, b] + bias[o], 0.0), 6.0)
                   + res[n, o, a, b], name="z")
    return te.create_prim_func([x, wt, bias, res, z])


def _run_pointwise(func, target, cin, cout, h, w, stride=1):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cin, h, w)).astype("float32")
    wt = rng.standard_normal((cout, cin, 1, 1)).astype("float32")
    bias = rng.standard_normal(cout).astype("float32")
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(bias),
                                      stride=stride)
    res = rng.standard_normal(tuple(conv.shape)).astype("float32")
    ref = (torch.clamp(conv, 0.0, 6.0) + torch.from_numpy(res)).numpy()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.zeros(ref.shape, "float32"))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, wt, bias, res)], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-4 * max(1.0, np.sqrt(cin) / 4))


@pytest.mark.parametrize("shape", [
    (12, 72, 28, 28),   # a 28-wide row: ragged for AVX-512's 16 lanes, its 784-element plane is not
    (8, 12, 56, 56),    # 12 output channels in one register tile
    (16, 24, 7, 7),     # 49-element plane: ragged either way, rows kept
    (5, 9, 8, 8),       # a row of whole vectors on AVX2
])
def test_pointwise_conv_schedule_matches_torch(shape):
    cin, cout, h, w = shape
    func, target = _schedule(_pointwise(cin, cout, h, w))
    names = {b.name_hint for b in _blocks(func)}
    assert "pad_temp" not in names, names  # the copy is read through, not run as its own pass
    lanes = tvm_schedule.vector_lanes(target)
    sch = s_tir.Schedule(func)
    update = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
              if sch.get(b).name_hint.startswith("y") and any(iv.iter_type == 2 for iv in sch.get(b).iter_vars)]
    vec = int(sch.get(sch.get_loops(update[-1])[-1]).extent)
    if w % lanes and (h * w) % lanes == 0:
        assert vec % lanes == 0, (vec, lanes)  # whole vectors along the fused plane
    if 8 < cout <= 12 and lanes >= 16 and (h * w) % (2 * lanes) == 0:
        assert vec == 2 * lanes, (vec, lanes)  # 9-12 rows x two vectors: 24 of AVX-512's 32 registers
    _run_pointwise(func, target, cin, cout, h, w)


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv2d(16, 32, 3, padding=1), (1, 16, 28, 28)),
    (nn.Conv2d(16, 32, 3, stride=2, padding=1), (1, 16, 28, 28)),
    (nn.Conv2d(32, 32, 3, padding=1, groups=32), (1, 32, 28, 28)),
    (nn.Conv2d(32, 32, 3, padding=1, groups=32), (1, 32, 7, 7)),   # one channel's plane per task
    (nn.Conv2d(48, 12, 1), (1, 48, 56, 56)),                        # 12 rows x two vectors
    (nn.Linear(64, 96), (4, 64)),
])
def test_register_tiles_are_not_heap_allocated(layer, shape):
    """Every per-task buffer under 1 KB (a register tile, a small plane's padding) is a stack
    buffer, not a workspace allocation per task: a "local" scope buffer was one, 11.6k of them per
    MobileNetV2 inference, and LLVM could not keep those accumulators in registers."""
    torch.manual_seed(0)
    result = build_and_compare(nn.Sequential(layer, nn.ReLU()), (torch.randn(*shape),))
    small = [n for n in task_allocations(result.artifact) if n < 1024]
    assert not small, small


@pytest.mark.parametrize("shape", [(8, 16, 32, 32), (6, 4, 14, 14)])
def test_strided_pointwise_conv_reads_a_phase_split_copy(shape):
    """A stride-2 1x1 convolution keeps its copy stage, stored phase-split, instead of reading
    its input with a stride (a gather per vector)."""
    cin, cout, h, w = shape
    func, target = _schedule(_pointwise(cin, cout, h, w, stride=2))
    copy = [b for b in _blocks(func) if b.name_hint == "pad_temp"]
    assert copy and len(copy[0].writes[0].source.shape) == 5, [b.name_hint for b in _blocks(func)]
    _run_pointwise(func, target, cin, cout, h, w, stride=2)


@pytest.mark.parametrize("shape,columns_first", [
    ((256, 64, 56, 56), True),    # 3.2 MB input, 64 kB of weights: walk the weights per column tile
    ((2048, 512, 7, 7), False),   # 4 MB of weights, 400 kB input: walk the input per row tile
    ((16, 96, 112, 112), False),  # both small enough to stay cached: rows first, as before
    ((64, 12, 56, 56), False),    # one row tile: nothing to order
])
def test_tile_order_moves_the_fewest_bytes(shape, columns_first):
    cin, cout, h, w = shape
    func = _pointwise(cin, cout, h, w)
    sch = s_tir.Schedule(func)
    main = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint == "y"][0]
    ext = [int(sch.get(lp).extent) for lp in sch.get_loops(main)]
    lanes = 16
    r = cout if cout <= 12 else 8
    got = tvm_schedule_tiles._columns_first(sch.get(main), ext, [0, 1, 2, 3], 3, 1, lanes if w % lanes == 0 else w, r)
    assert got == columns_first
    if columns_first:  # and the reordered schedule computes the same
        sched, target = _schedule(func)
        _run_pointwise(sched, target, cin, cout, h, w)


@pytest.mark.parametrize("shape,per_tile", [
    ((1, 24, 48, 196), True),   # 24 rows: four whole 6-row tiles
    ((1, 36, 16, 49), True),    # a 7x7 plane's 49 columns: overlapping strips, written back per tile
    ((1, 37, 24, 48), False),   # a ragged last row tile: the strip is written back after all its rows
])
def test_gemm_writes_each_register_tile_back_after_its_reduction(shape, per_tile):
    """The epilogue (here the bias) is applied and stored right after each register tile's
    reduction, so the tile's accumulators never go through memory; with a guarded last row tile the
    strip's rows are written back together after the sweep."""
    batch, m, k, n = shape
    func, target = _schedule(_matmul_bias(batch, m, k, n, False))
    sch = s_tir.Schedule(func)
    writeback = [b for b in _all_blocks(sch) if any(w.source.name == "z" for w in sch.get(b).writes)]
    assert len(writeback) == 1
    loops = [sch.get(lp) for lp in sch.get_loops(writeback[0])]
    rows = int(loops[-2].extent)
    assert rows == (6 if per_tile else m), [int(lp.extent) for lp in loops]
    assert loops[-1].kind == tirx.ForKind.VECTORIZED
    x = np.random.default_rng(1).standard_normal((batch, m, k)).astype("float32")
    w = np.random.default_rng(2).standard_normal((k, n)).astype("float32")
    bias = np.random.default_rng(3).standard_normal(n).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.full((batch, m, n), np.nan, "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(bias), out)
    np.testing.assert_allclose(out.numpy(), np.matmul(x, w) + bias, rtol=1e-5, atol=1e-4)


def _all_blocks(sch) -> list:
    out = []

    def walk(blk):
        for child in sch.get_child_blocks(blk):
            out.append(child)
            walk(child)
    walk(sch.get_sblock("root"))
    return out
