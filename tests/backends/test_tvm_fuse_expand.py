"""prunec.FuseExpandDepthwise (backends/tvm_fuse_expand.py): which expansion + depthwise pairs
become one kernel, the IR it leaves, the kernel against numpy, and built models against torch."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

import tvm_ffi  # noqa: E402
from tvm import relax, s_tir, tirx  # noqa: E402

from prunec.backends import tvm_lower, tvm_schedule  # noqa: E402
from prunec.backends.tvm_backend import lower  # noqa: E402
from prunec.backends.tvm_fuse_expand import FuseExpandDepthwise, fused_kernel, schedule_fused  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tvm_helpers import build_and_compare, op_names, task_allocations  # noqa: E402

pytestmark = pytest.mark.tvm

_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})


def _block_module(ci=8, c=24, h=32, w=32, k=3, stride=1, n=1, extra_use=False, dilation=1, groups=None):
    """conv1x1 + bias -> clip(0, 6) -> depthwise conv + bias -> clip -> conv1x1 (the projection)."""
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, ci, h, w), "float32"))

    def const(*shape):
        return relax.const((0.3 * rng.standard_normal(shape)).astype("float32"))
    groups = c if groups is None else groups
    with bb.function("main", [x]):
        with bb.dataflow():
            e = bb.emit(relax.op.nn.conv2d(x, const(c, ci, 1, 1)))
            e = bb.emit(relax.op.add(e, const(1, c, 1, 1)))
            a = bb.emit(relax.op.clip(e, 0.0, 6.0))
            d = bb.emit(relax.op.nn.conv2d(a, const(c, c // groups, k, k), strides=stride, padding=(k // 2) * dilation,
                                           dilation=dilation, groups=groups))
            d = bb.emit(relax.op.add(d, const(1, c, 1, 1)))
            d = bb.emit(relax.op.nn.relu(d))
            y = relax.op.nn.conv2d(d, const(4, c, 1, 1))
            if extra_use:  # the expansion's output is read again: it must be kept, so nothing fuses
                y = relax.op.add(bb.emit(y), relax.op.mean(a, axis=[1, 2, 3], keepdims=True))
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    return bb.get()


def _run(mod, *inputs):
    with _TARGET:
        mod = tvm.transform.Sequential(tvm_lower.legalize_and_fuse())(mod)
        mod = tvm_schedule.schedule_module(mod, _TARGET)
    ex = tvm.compile(mod, _TARGET, relax_pipeline=tvm_lower.finalize_pipeline(_TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


def test_an_expansion_and_its_depthwise_convolution_become_one_kernel():
    before = _block_module(stride=2)
    fuse = FuseExpandDepthwise(_TARGET, lanes=16)
    after = fuse(before)
    assert fuse.count == 1
    # before: three convolutions; after: the projection only, plus one call_tir of the fused kernel
    assert op_names(before).count("relax.nn.conv2d") == 3
    ops = op_names(after)
    assert ops.count("relax.nn.conv2d") == 1 and ops.count("relax.call_tir") == 1, ops
    assert "relax.clip" not in ops and "relax.nn.relu" not in ops and "relax.add" not in ops, ops
    kernels = [gv.name_hint for gv, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels == ["prunec_expand_depthwise"], kernels
    assert after[kernels[0]].attrs["tirx.is_scheduled"]
    x = np.random.default_rng(1).standard_normal((1, 8, 32, 32)).astype("float32")
    np.testing.assert_allclose(_run(after, x), _run(before, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,why", [
    ({"extra_use": True}, "the expansion's output is read twice"),
    ({"h": 14, "w": 14}, "a 14-wide row: PointwiseAsMatmul's case"),
    ({"dilation": 2}, "a dilated window"),
    ({"groups": 1}, "a dense 3x3 convolution, not depthwise"),
    ({"k": 3, "stride": 1, "groups": 12}, "grouped, two channels per group"),
])
def test_other_blocks_are_left_alone(kwargs, why):
    before = _block_module(**kwargs)
    fuse = FuseExpandDepthwise(_TARGET, lanes=16)
    after = fuse(before)
    assert fuse.count == 0, why
    assert after.same_as(before), why


def test_cuda_modules_are_left_alone():
    before = _block_module()
    fuse = FuseExpandDepthwise(tvm.target.Target({"kind": "cuda"}))
    assert fuse(before).same_as(before) and fuse.count == 0


def _assert_reads_in_bounds(func, block: str, buffer: str) -> None:
    """Every index ``block`` reads from ``buffer`` lies inside the buffer, over the block's domain."""
    sch = s_tir.Schedule(func)
    b = sch.get(sch.get_sblock(block))
    ana = tvm.sym.Analyzer()
    for iv in b.iter_vars:
        ana.bind(iv.var, iv.dom)
    reads = [r for r in b.reads if r.source.name == buffer]
    assert reads
    for r in reads:
        for axis, (rg, dim) in enumerate(zip(r.region, r.source.shape)):
            lo = ana.const_int_bound(rg.min).min_value
            hi = ana.const_int_bound(rg.min + rg.extent - 1).max_value
            assert 0 <= lo and hi < int(dim), f"{block} reads {buffer} axis {axis} at [{lo}, {hi}], extent {dim}"


@pytest.mark.parametrize("shape", [
    (1, 8, 24, 32, 32, 3, 1),   # whole 32-lane rows
    (1, 8, 24, 56, 56, 3, 2),   # MobileNetV2's 56x56 planes: 28-wide output rows
    (2, 5, 7, 30, 34, 5, 2),    # batch 2, non-square, prime channel counts, a 5x5 window
    (1, 3, 6, 28, 28, 3, 1),    # fewer channels than a task takes
    (1, 4, 8, 29, 31, 3, 2),    # odd rows under stride 2: no phase split (s = 1)
    (1, 8, 16, 57, 57, 3, 2),   # ... and a 29-wide output row, which no vector width divides
    (1, 4, 8, 14, 14, 5, 2),    # a 5x5 window under stride 2: two columns of zeros left of each phase
])
@pytest.mark.parametrize("lanes", [8, 16])  # AVX2's and AVX-512's fp32 vectors: the tiles differ
def test_fused_kernel_matches_torch(shape, lanes):
    n, ci, c, h, w, k, stride = shape
    rng = np.random.default_rng(0)
    b1, s1, b2 = (rng.standard_normal(c).astype("float32") for _ in range(3))
    chain1 = [("add", b1), ("multiply", s1), ("clip", (0.0, 6.0))]
    chain2 = [("add", b2), ("relu", None)]
    func, consts = fused_kernel(n, ci, c, h, w, k, stride, chain1, chain2)
    # a tap past the padded plane reads whatever lies next to it: the comparison below passes when
    # that happens to be the next row's zeros, so check the bounds themselves
    _assert_reads_in_bounds(func, "depthwise", "expand_pad")
    func = schedule_fused(func, lanes)
    x = rng.standard_normal((n, ci, h, w)).astype("float32")
    w1 = (0.3 * rng.standard_normal((c, ci, 1, 1))).astype("float32")
    w2 = (0.3 * rng.standard_normal((c, 1, k, k))).astype("float32")
    t = torch.from_numpy
    e = torch.clamp((torch.nn.functional.conv2d(t(x), t(w1)) + t(b1)[:, None, None]) * t(s1)[:, None, None], 0, 6)
    ref = torch.relu(torch.nn.functional.conv2d(e, t(w2), stride=stride, padding=k // 2, groups=c)
                     + t(b2)[:, None, None]).numpy()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), _TARGET)
    out = tvm.runtime.tensor(np.full(ref.shape, np.nan, "float32"))  # every output written
    lib["main"](*[tvm.runtime.tensor(a) for a in (x.reshape(n, ci, h * w), w1, w2, *consts)], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w,vectorized", [(112, False), (56, False), (28, True)])
def test_a_long_strided_interior_is_left_to_llvm(w, vectorized):
    """The phase-split interior reads the 1x1's row with stride 2.  TVM builds such a vector lane by
    lane, so on rows of 24 or more lanes per phase (8-lane vectors) the loop is left scalar for
    LLVM's vectorizer (wide loads and shuffles); shorter ones stay TVM vectors."""
    func, _ = fused_kernel(1, 8, 24, w, w, 3, 2, [("clip", (0.0, 6.0))], [("clip", (0.0, 6.0))])
    func = schedule_fused(func, 8)
    kinds = {}

    def visit(lp):
        body = lp.body
        while isinstance(body, tirx.For):
            body = body.body
        if isinstance(body, s_tir.SBlockRealize) and body.block.name_hint == "expand_pad":
            kinds[int(lp.extent)] = lp.kind
    tvm_ffi.structural_walk(func.body, [(tirx.For, visit)])
    assert kinds.get(w // 2) == (tirx.ForKind.VECTORIZED if vectorized else tirx.ForKind.SERIAL), kinds


@pytest.mark.parametrize("w,stride", [(56, 2), (28, 1), (57, 2)])  # 28, 28 and 29 output columns
def test_a_ragged_output_row_runs_in_whole_vectors(w, stride):
    """An output row no vector width divides is tiled in whole 8-lane vectors, the last one moved
    back to end at the row's end (tvm_schedule_overlap), not in 14-lane (8 + 4 + 2) ones."""
    func, _ = fused_kernel(1, 8, 24, w, w, 3, stride, [("clip", (0.0, 6.0))], [("clip", (0.0, 6.0))])
    func = schedule_fused(func, 8)
    mins = {}

    def visit(r):
        name = r.block.name_hint
        if name.startswith("depthwise"):
            mins[name] = any(_has_min(v) for v in r.iter_values)
    tvm_ffi.structural_walk(func.body, [(s_tir.SBlockRealize, visit)])
    script = func.script()
    for blk in ("depthwise_init", "depthwise_update", "depthwise_global"):
        assert mins.get(blk), (blk, mins)
        body = script[script.index(f'T.sblock("{blk}")') - 120:script.index(f'T.sblock("{blk}")')]
        assert "T.vectorized(8)" in body, body


def _has_min(expr) -> bool:
    found = []
    tvm_ffi.structural_walk(expr, [(tirx.Min, found.append)])
    return bool(found)


def test_the_padding_is_a_zero_fill_and_an_interior_without_bounds_tests():
    """The padded plane's zeros are written once per task and its interior through the chain with
    no per-element bounds test (an ``if_then_else`` per element of every plane was the fused
    kernel's largest cost on MobileNetV2's stride-2 blocks)."""
    func, _ = fused_kernel(1, 8, 48, 112, 112, 3, 2, [("clip", (0.0, 6.0))], [("clip", (0.0, 6.0))])
    script = schedule_fused(func, 16).script()
    assert "expand_pad_pad_const" in script
    interior = script[script.index('T.sblock("expand_pad")'):]
    interior = interior[:interior.index("T.sblock(", 10)]
    assert "if_then_else" not in interior, interior
    # the expansion, the zero fill and the interior run inside the one parallel task loop
    assert script.count("T.parallel(") == 1


@pytest.mark.parametrize("passes", ["fold-bn", "fold-bn,prune-channels{ratio=0.5}"])
def test_built_blocks_match_torch_on_odd_planes(passes):
    """57x57 in, 29x29 out of the stride-2 block: rows that no vector width divides, built for an AVX2
    CPU (8 lanes; MobileNetV2 at 225x225 failed to compile there)."""
    torch.manual_seed(0)
    model = _random_bn(TwoBlocks())
    build_and_compare(model, (torch.randn(1, 16, 57, 57),), passes=passes,
                      target='{"kind": "llvm", "mcpu": "haswell"}')


class InvertedResidual(nn.Module):
    """MobileNetV2's block (torchvision's layout, batch norm folded by prunec)."""

    def __init__(self, ci=16, expand=6, stride=1, co=16):
        super().__init__()
        c = ci * expand
        self.expand = nn.Sequential(nn.Conv2d(ci, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(c, co, 1, bias=False), nn.BatchNorm2d(co))
        self.residual = stride == 1 and ci == co

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = InvertedResidual(16, 6, 1, 16)
        self.b = InvertedResidual(16, 6, 2, 24)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.b(self.a(x)).mean((2, 3)))


def _random_bn(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


# "": the batch norms stay, as subtract / divide / multiply / add by per-channel constants in the chains
@pytest.mark.parametrize("passes", ["fold-bn", "fold-bn,prune-channels{ratio=0.5}", "", "prune-channels{ratio=0.5}"])
def test_built_blocks_match_torch(passes):
    torch.manual_seed(0)
    model = _random_bn(TwoBlocks())
    x = torch.randn(2, 16, 56, 56)
    result = build_and_compare(model, (x,), passes=passes)
    # and both blocks ran as fused kernels
    mod, _ = lower(result.graph, (x,), tvm_lower.to_target("llvm"))
    fused = [gv.name_hint for gv, _f in mod.functions_items() if gv.name_hint.startswith("prunec_expand_depthwise")]
    assert len(fused) == 2, fused
    # the register tiles are stack buffers: the only per-task workspaces are the channels' planes
    small = [n for n in task_allocations(result.artifact) if n < 1024]
    assert not small, small
