"""Block-sparse kernels for CUDA targets, the GPU twins of :mod:`tvm_sparse`'s CPU kernels.

Same BSR operands (``data[nnzb, 1, r]``, ``indices``, ``indptr``; ``r x 1``
blocks), same results, but with threads bound explicitly: one thread per
output element of a block row, so neighbouring threads read neighbouring
``data`` values (linear) or neighbouring pixels (1x1 convolution) and every
load is coalesced.  The dense kernels they are measured against are TVM's own
GPU schedules (dlight), as the dense layers of a cuda build get them.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from .tvm_sparse import _tile

_THREADS = 128
_SPLIT_ROWS = 4  # batch rows up to which the linear kernel splits each block row over threads


def bsr_xwt(m: int, k: int, n: int, r: int, nnzb: int, dtype: str = "float32"):
    """y[M, N] = x[M, K] @ W[N, K]^T.  Threads: r rows of a block row (x) times g block rows (y);
    each thread keeps ``mt`` batch rows in registers.  For a few batch rows see :func:`_bsr_xwt_split`."""
    if m <= _SPLIT_ROWS:
        return _bsr_xwt_split(m, k, n, r, nnzb, dtype)
    nb = n // r
    g = _tile(nb, max(1, _THREADS // r))
    mt = _tile(m, 8)

    @T.prim_func(private=True)
    def bsr_linear_cuda(x: T.Buffer((m, k), dtype), data: T.Buffer((nnzb, 1, r), dtype),
                        indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
                        y: T.Buffer((m, n), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 4})
        for bx in T.thread_binding(nb // g, thread="blockIdx.x"):
            for by in T.thread_binding(m // mt, thread="blockIdx.y"):
                for ty in T.thread_binding(g, thread="threadIdx.y"):
                    for tx in T.thread_binding(r, thread="threadIdx.x"):
                        acc = T.alloc_buffer((mt,), dtype, scope="local")
                        for mi in T.unroll(mt):
                            acc[mi] = T.cast(0, dtype)
                        for j in range(indptr[bx * g + ty], indptr[bx * g + ty + 1]):
                            for mi in T.unroll(mt):
                                acc[mi] = acc[mi] + data[j, 0, tx] * x[by * mt + mi, indices[j]]
                        for mi in T.unroll(mt):
                            y[by * mt + mi, (bx * g + ty) * r + tx] = acc[mi]
    return bsr_linear_cuda


def _bsr_xwt_split(m: int, k: int, n: int, r: int, nnzb: int, dtype: str = "float32"):
    """A few batch rows (batch 1 inference): one thread per output column walks a block row's whole
    list of blocks, a chain of dependent loads, so a block row is split over ``sp`` threads (y) that
    take every sp-th block and sum their partial results through shared memory at the end."""
    nb = n // r
    sp = max(1, _THREADS // r)

    @T.prim_func(private=True)
    def bsr_linear_split_cuda(x: T.Buffer((m, k), dtype), data: T.Buffer((nnzb, 1, r), dtype),
                              indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
                              y: T.Buffer((m, n), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 4})
        for bx in T.thread_binding(nb, thread="blockIdx.x"):
            part = T.alloc_buffer((sp, m, r), dtype, scope="shared")
            for ty in T.thread_binding(sp, thread="threadIdx.y"):
                for tx in T.thread_binding(r, thread="threadIdx.x"):
                    acc = T.alloc_buffer((m,), dtype, scope="local")
                    for mi in T.unroll(m):
                        acc[mi] = T.cast(0, dtype)
                    for jo in range((indptr[bx + 1] - indptr[bx] + sp - 1) // sp):
                        if indptr[bx] + jo * sp + ty < indptr[bx + 1]:
                            for mi in T.unroll(m):
                                acc[mi] = acc[mi] + data[indptr[bx] + jo * sp + ty, 0, tx] * \
                                    x[mi, indices[indptr[bx] + jo * sp + ty]]
                    for mi in T.unroll(m):
                        part[ty, mi, tx] = acc[mi]
                    T.tvm_storage_sync("shared")
                    if ty == 0:
                        for mi in T.unroll(m):
                            acc[mi] = T.cast(0, dtype)
                            for t in range(sp):
                                acc[mi] = acc[mi] + part[t, mi, tx]
                            y[mi, bx * r + tx] = acc[mi]
    return bsr_linear_split_cuda


def bsr_wx(b: int, n: int, k: int, p: int, r: int, nnzb: int, dtype: str = "float32"):
    """y[B, N, P] = W[N, K] @ x[B, K, P] (1x1 convolution).  One thread per pixel, ``r`` output
    channels (one block row) in its registers."""
    nb = n // r
    tp = min(_THREADS, (p + 31) // 32 * 32)
    po = (p + tp - 1) // tp

    @T.prim_func(private=True)
    def bsr_conv1x1_cuda(x: T.Buffer((b, k, p), dtype), data: T.Buffer((nnzb, 1, r), dtype),
                         indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
                         y: T.Buffer((b, n, p), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 4})
        for bx in T.thread_binding(b * nb * po, thread="blockIdx.x"):
            for tx in T.thread_binding(tp, thread="threadIdx.x"):
                acc = T.alloc_buffer((r,), dtype, scope="local")
                if bx % po * tp + tx < p:
                    for rr in T.unroll(r):
                        acc[rr] = T.cast(0, dtype)
                    for j in range(indptr[bx // po % nb], indptr[bx // po % nb + 1]):
                        for rr in T.unroll(r):
                            acc[rr] = acc[rr] + data[j, 0, rr] * x[bx // (nb * po), indices[j], bx % po * tp + tx]
                    for rr in T.unroll(r):
                        y[bx // (nb * po), bx // po % nb * r + rr, bx % po * tp + tx] = acc[rr]
    return bsr_conv1x1_cuda


def dense_matmul(m: int, k: int, n: int, target):
    """y[M, N] = x[M, K] @ w[K, N] with TVM's GPU schedules (what a dense layer gets in a cuda build)."""
    from tvm import te
    from tvm.s_tir import dlight as dl

    from . import tvm_schedule
    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((k, n), "float32", name="w")
    kk = te.reduce_axis((0, k), name="kk")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, kk] * w[kk, j], axis=kk), name="y")
    mod = tvm.IRModule({"main": te.create_prim_func([x, w, y])})
    with target:
        mod = dl.ApplyDefaultSchedule(*tvm_schedule.gpu_rules())(mod)
    return mod["main"]


def has_gpu() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001
        return False


def to_device(args: list[np.ndarray]):
    dev = tvm.cuda(0)
    return dev, [tvm.runtime.tensor(a, dev) for a in args]
