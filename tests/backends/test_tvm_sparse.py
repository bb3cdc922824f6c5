"""Sparse kernels are exact against dense on random patterns, edge rows and odd shapes."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from prunec.backends import tvm_sparse  # noqa: E402
from prunec.backends.tvm_lower import to_target  # noqa: E402
from prunec.target import parse_target  # noqa: E402

pytestmark = pytest.mark.tvm
TARGET = to_target(parse_target("llvm"))


def _run(func, args, out_shape):
    func = func.with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), TARGET)
    dev = tvm.cpu(0)
    targs = [tvm.runtime.tensor(a, dev) for a in args] + [tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)]
    lib["main"](*targs)
    return targs[-1].numpy()


def _pattern(n, k, r, density, rng):
    w = rng.standard_normal((n, k)).astype("float32")
    keep = rng.random((n // r, k)) < density
    w *= np.repeat(keep, r, axis=0)
    return w


def _edge_rows(w):
    w[0] = 0.0                       # an empty row
    if w.shape[0] > 1:
        w[-1] = np.arange(1, w.shape[1] + 1, dtype="float32")  # a fully dense row
    return w


@pytest.mark.parametrize("m,k,n,density", [(1, 64, 48, 0.2), (3, 37, 16, 0.1), (5, 23, 20, 0.5), (8, 16, 32, 0.0),
                                           (2, 31, 7, 0.3), (4, 128, 64, 1.0)])
def test_bsr_linear_exact(m, k, n, density):
    rng = np.random.default_rng(m * 1000 + k)
    r, _ = tvm_sparse.pick_block(np.ones((n, k), "float32"))
    w = _edge_rows(_pattern(n, k, r, density, rng))
    r, nnzb = tvm_sparse.pick_block(w)
    data, idx, ptr = tvm_sparse.to_bsr(w, r)
    x = rng.standard_normal((m, k)).astype("float32")
    y = _run(tvm_sparse.bsr_xwt(m, k, n, r, len(idx)), [x, data, idx, ptr], (m, n))
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("r", [16, 8, 4, 1])
def test_every_block_height(r):
    rng = np.random.default_rng(r)
    w = _edge_rows(_pattern(32, 40, r, 0.3, rng))
    data, idx, ptr = tvm_sparse.to_bsr(w, r)
    x = rng.standard_normal((3, 40)).astype("float32")
    y = _run(tvm_sparse.bsr_xwt(3, 40, 32, r, len(idx)), [x, data, idx, ptr], (3, 32))
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("b,n,k,p,density", [(1, 32, 16, 49, 0.2), (2, 24, 13, 17, 0.4), (1, 16, 8, 3, 0.0)])
def test_bsr_conv1x1_exact(b, n, k, p, density):
    rng = np.random.default_rng(n + k + p)
    w = _edge_rows(_pattern(n, k, 8 if n % 8 == 0 else 1, density, rng))
    r, _ = tvm_sparse.pick_block(w)
    data, idx, ptr = tvm_sparse.to_bsr(w, r)
    x = rng.standard_normal((b, k, p)).astype("float32")
    y = _run(tvm_sparse.bsr_wx(b, n, k, p, r, len(idx)), [x, data, idx, ptr], (b, n, p))
    np.testing.assert_allclose(y, np.einsum("nk,bkp->bnp", w, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,k,n,r,density", [(32, 64, 48, 16, 0.2), (47, 37, 32, 16, 0.3), (40, 23, 24, 8, 0.5),
                                             (128, 96, 64, 16, 1.0), (33, 31, 16, 16, 0.0), (36, 3, 16, 16, 0.7)])
def test_packed_batch_kernel_exact(m, k, n, r, density):
    """From 32 batch rows the linear packs x into 16-row tiles: ragged last tiles, empty and dense rows."""
    rng = np.random.default_rng(m + k + n)
    w = _edge_rows(_pattern(n, k, r, density, rng))
    data, idx, ptr = tvm_sparse.to_bsr(w, r)
    x = rng.standard_normal((m, k)).astype("float32")
    func = tvm_sparse.bsr_xwt(m, k, n, r, len(idx))
    assert "xp = T.alloc_buffer" in func.script()  # the packed variant was chosen
    y = _run(func, [x, data, idx, ptr], (m, n))
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", ["linear", "packed linear", "conv1x1", "conv1x1 16x16"])
def test_bsr_accumulators_are_not_heap_allocated(kernel):
    """The accumulator tile is on the stack, not a workspace allocation per row block: TVM
    stack-allocates below 1 KB, so a 16 x 16 tile is split in two."""
    import sys
    import os
    sys.path.insert(0, os.path.dirname(__file__))
    from _tvm_helpers import task_allocations
    w = _pattern(64, 32, 16, 0.5, np.random.default_rng(0))
    r, nnzb = tvm_sparse.pick_block(w)
    func = {"linear": lambda: tvm_sparse.bsr_xwt(8, 32, 64, r, nnzb),
            "packed linear": lambda: tvm_sparse.bsr_xwt(128, 32, 64, 16, nnzb),
            "conv1x1": lambda: tvm_sparse.bsr_wx(1, 64, 32, 56, 8, nnzb),
            "conv1x1 16x16": lambda: tvm_sparse.bsr_wx(1, 64, 32, 784, 16, nnzb)}[kernel]()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)
    small = [n for n in task_allocations(lib) if n <= 1024]
    assert not small, small


def test_pick_block_prefers_matching_blocks():
    rng = np.random.default_rng(0)
    assert tvm_sparse.pick_block(_pattern(64, 64, 16, 0.1, rng))[0] == 16
    unstructured = rng.standard_normal((64, 64)) * (rng.random((64, 64)) < 0.05)
    assert tvm_sparse.pick_block(unstructured)[0] < 16


def test_relax_pass_standalone():
    """The pass works inside a user's own TVM pipeline on a hand-written Relax module."""
    from tvm import relax
    rng = np.random.default_rng(1)
    w = _pattern(64, 32, 16, 0.2, rng)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 32], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(w.T))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    rewrite = tvm_sparse.SparseDenseRewrite(TARGET, mode="sparse")
    mod = tvm.transform.Sequential([rewrite])(mod)
    assert rewrite.report[0]["choice"] == "sparse"
    assert any(isinstance(f, tvm.tirx.PrimFunc) for _, f in mod.functions_items())
    ex = tvm.compile(mod, TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xv = rng.standard_normal((4, 32)).astype("float32")
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xv)).numpy(), xv @ w.T, rtol=1e-5, atol=1e-4)
