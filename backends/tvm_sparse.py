"""Sparse kernels for linear layers and 1x1 convolutions, chosen per layer.

The pattern comes from the weight itself (its zeros), so it is always right;
compression-pass annotations are only hints.  A weight ``W[N, K]`` is stored
as block-sparse rows (BSR) with ``r x 1`` blocks (``r`` in 16, 8, 4, 1: the
block height that wastes the fewest multiplications on zeros; ``r = 1`` is
CSR).  Kernels are TIR, generated per layer and specialized to its shapes,
block size, row tile and batch; the block values, column indices and row
pointers are compile-time constants of the library.

``SparseDenseRewrite`` is a Relax module pass: ``R.matmul(x, W_const)`` (a
linear layer after import) and ``R.nn.conv2d(x, W_const)`` with a 1x1 kernel
become ``call_tir`` of the sparse kernel where that is faster: each candidate
layer's sparse and dense kernels are built and timed on the target (or, with
``measure=False``, compared by a cost model).  ``.report`` lists the choice
per layer.  The kernels here are the CPU ones; a cuda target gets the
thread-bound twins in :mod:`tvm_sparse_gpu` (``kernels(target)`` picks).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

_ROWS = (16, 8, 4, 1)


# ---- formats ---------------------------------------------------------------------------

def to_bsr(w: np.ndarray, r: int):
    """``W[N, K]`` -> (data[nnzb, 1, r], indices[nnzb], indptr[N/r + 1]) with r x 1 blocks."""
    n, k = w.shape
    b = w.reshape(n // r, r, k).transpose(0, 2, 1)  # nb, K, r
    nz = np.any(b != 0, axis=2)
    indptr = np.concatenate([[0], np.cumsum(nz.sum(1))]).astype("int32")
    rows, cols = np.nonzero(nz)
    data = np.ascontiguousarray(b[rows, cols]).reshape(-1, 1, r).astype(w.dtype)
    if len(cols) == 0:  # keep buffers non-empty
        data, cols = np.zeros((1, 1, r), w.dtype), np.zeros(1, "int32")
    return data, cols.astype("int32"), indptr


def pick_block(w: np.ndarray) -> tuple[int, int]:
    """(r, nnzb) minimizing an estimate of vector work (r/8 lanes + per-block overhead)."""
    n = w.shape[0]
    best = None
    for r in _ROWS:
        if n % r:
            continue
        nnzb = int(np.any(w.reshape(n // r, r, -1) != 0, axis=1).sum())
        cost = nnzb * (max(r / 8, 1) + 0.75)
        if best is None or cost < best[2]:
            best = (r, nnzb, cost)
    return best[0], best[1]


# ---- kernels --------------------------------------------------------------------------

def _tile(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


_PACK = 16  # batch rows per tile of the packed kernel


def _halves(rows: int, lanes: int) -> tuple[int, int]:
    """Rows of the first and second accumulator of a ``rows x lanes`` float tile: TVM 0.27 puts a CPU
    buffer on the stack (where LLVM keeps it in registers) only below 1 KB, so a 16 x 16 tile is two."""
    h = rows if rows * lanes * 4 < 1024 else rows // 2
    return h, rows - h
_PREFETCH = 16  # blocks ahead (8, 16 and 32 measured alike; 5-19% faster than none)


def bsr_xwt(m: int, k: int, n: int, r: int, nnzb: int, dtype: str = "float32"):
    """y[M, N] = x[M, K] @ W[N, K]^T, W in BSR (r x 1 blocks); vectorized over the block rows."""
    if m >= 2 * _PACK and r >= 8:  # one tile: packing costs more than it saves
        return bsr_xwt_packed(m, k, n, r, nnzb, dtype)
    nb, mt = n // r, _tile(m, 4)

    @T.prim_func(private=True)
    def bsr_linear(x: T.Buffer((m, k), dtype), data: T.Buffer((nnzb, 1, r), dtype),
                   indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
                   y: T.Buffer((m, n), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 4})
        for i in T.parallel(nb):
            for mo in range(m // mt):
                acc = T.alloc_buffer((mt, r), dtype)  # "global": on the stack (see TILE_SCOPE)
                for mi in T.unroll(mt):
                    for rr in T.vectorized(r):
                        acc[mi, rr] = T.cast(0, dtype)
                for j in range(indptr[i], indptr[i + 1]):
                    for mi in T.unroll(mt):
                        for rr in T.vectorized(r):
                            acc[mi, rr] = acc[mi, rr] + data[j, 0, rr] * x[mo * mt + mi, indices[j]]
                for mi in T.unroll(mt):
                    for rr in T.vectorized(r):
                        y[mo * mt + mi, i * r + rr] = acc[mi, rr]
    return bsr_linear


@T.macro
def _zero(acc, rows, lanes, dtype):
    for i in T.unroll(rows):
        for q in T.vectorized(lanes):
            acc[i, q] = T.cast(0, dtype)


def bsr_xwt_packed(m: int, k: int, n: int, r: int, nnzb: int, dtype: str = "float32"):
    """The batched linear: x packed into ``xp[M/16, K, 16]`` tiles, then 16 batch rows x r block rows per task.

    Each non-zero block is one vector load and 16 FMAs whose x operand is a broadcast from
    one cache line of ``xp``; in x's own layout those 16 values lie in 16 lines, K apart,
    and a task reads a fresh line per FMA.  Tasks run tile-major (all block rows of one x
    tile, then the next), so the tile (K x 64 bytes) stays in cache while the blocks stream.
    """
    nb, pt = n // r, _PACK
    mo = (m + pt - 1) // pt
    h, g = _halves(pt, r)

    @T.macro
    def block(acc, first, rows, xp, data, indices, t, j):
        # batch rows first .. first + rows of tile t times block j
        for mi in T.unroll(rows):
            for rr in T.vectorized(r):
                acc[mi, rr] = acc[mi, rr] + data[j, 0, rr] * xp[t, indices[j], first + mi]

    @T.macro
    def store(acc, first, rows, y, t, i):
        for mi in T.unroll(rows):
            for rr in T.vectorized(r):
                if t * pt + first + mi < m:
                    y[t * pt + first + mi, i * r + rr] = acc[mi, rr]

    @T.prim_func(private=True)
    def bsr_linear_packed(x: T.Buffer((m, k), dtype), data: T.Buffer((nnzb, 1, r), dtype),
                          indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
                          y: T.Buffer((m, n), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 4})
        xp = T.alloc_buffer((mo, k, pt), dtype)
        for t in T.parallel(mo):
            # vector loads along x's rows, scattered stores (2.4x faster than scalar copies)
            for k0 in range(k // pt):
                for mi in T.unroll(pt):
                    for kq in T.vectorized(pt):
                        xp[t, k0 * pt + kq, mi] = T.if_then_else(
                            t * pt + mi < m, x[T.min(t * pt + mi, m - 1), k0 * pt + kq], T.cast(0, dtype))
            for kq in range(k % pt):
                for mi in T.unroll(pt):
                    xp[t, k // pt * pt + kq, mi] = T.if_then_else(
                        t * pt + mi < m, x[T.min(t * pt + mi, m - 1), k // pt * pt + kq], T.cast(0, dtype))
        for f in T.parallel(mo * nb):
            # x tile f // nb, block row f % nb
            acc = T.alloc_buffer((h, r), dtype)
            acc2 = T.alloc_buffer((max(g, 1), r), dtype)
            _zero(acc, h, r, dtype)
            _zero(acc2, g, r, dtype)
            # two blocks per iteration (4-18% faster than one), then the odd one
            for jj in range((indptr[f % nb + 1] - indptr[f % nb]) // 2):
                for u in T.unroll(2):
                    # the x line a block _PREFETCH ahead needs (its row is random: no hardware
                    # prefetcher guesses it); read, keep in all cache levels, data cache
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        xp[f // nb, indices[T.min(indptr[f % nb] + jj * 2 + u + _PREFETCH, nnzb - 1)], 0]), 0, 3, 1))
                    block(acc, 0, h, xp, data, indices, f // nb, indptr[f % nb] + jj * 2 + u)
                    block(acc2, h, g, xp, data, indices, f // nb, indptr[f % nb] + jj * 2 + u)
            if (indptr[f % nb + 1] - indptr[f % nb]) % 2 == 1:
                block(acc, 0, h, xp, data, indices, f // nb, indptr[f % nb + 1] - 1)
                block(acc2, h, g, xp, data, indices, f // nb, indptr[f % nb + 1] - 1)
            store(acc, 0, h, y, f // nb, f % nb)
            store(acc2, h, g, y, f // nb, f % nb)
    return bsr_linear_packed


def bsr_wx(b: int, n: int, k: int, p: int, r: int, nnzb: int, dtype: str = "float32"):
    """y[B, N, P] = W[N, K] @ x[B, K, P] (a 1x1 convolution, P = H*W); vectorized over P."""
    nb, pt = n // r, _tile(p, 16)
    if pt < 4 and p > 16:
        pt = 16
    po = (p + pt - 1) // pt
    h, g = _halves(r, pt)

    @T.macro
    def block(acc, first, rows, x, data, indices, bi, c, j):
        # block rows first .. first + rows of block j times column tile c of batch bi
        for rr in T.unroll(rows):
            for q in T.vectorized(pt):
                if c * pt + q < p:
                    acc[rr, q] = acc[rr, q] + data[j, 0, first + rr] * x[bi, indices[j], c * pt + q]

    @T.macro
    def store(acc, first, rows, y, bi, i, c):
        for rr in T.unroll(rows):
            for q in T.vectorized(pt):
                if c * pt + q < p:
                    y[bi, i * r + first + rr, c * pt + q] = acc[rr, q]

    @T.prim_func(private=True)
    def bsr_conv1x1(x: T.Buffer((b, k, p), dtype), data: T.Buffer((nnzb, 1, r), dtype),
                    indices: T.Buffer((nnzb,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
                    y: T.Buffer((b, n, p), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 4})
        for f in T.parallel(b * nb * po):
            # block row f // po % nb, column tile f % po, batch f // (nb * po), written out: a
            # let-bound name there became a 4-byte workspace allocation per task
            acc = T.alloc_buffer((h, pt), dtype)  # on the stack below 1 KB
            acc2 = T.alloc_buffer((max(g, 1), pt), dtype)
            _zero(acc, h, pt, dtype)
            _zero(acc2, g, pt, dtype)
            for j in range(indptr[f // po % nb], indptr[f // po % nb + 1]):
                block(acc, 0, h, x, data, indices, f // (nb * po), f % po, j)
                block(acc2, h, g, x, data, indices, f // (nb * po), f % po, j)
            store(acc, 0, h, y, f // (nb * po), f // po % nb, f % po)
            store(acc2, h, g, y, f // (nb * po), f // po % nb, f % po)
    return bsr_conv1x1


# ---- measuring ------------------------------------------------------------------------

def kernels(target):
    """(linear kernel, 1x1-conv kernel, dense matmul) builders for ``target``'s kind."""
    if target.kind.name == "cuda":
        from . import tvm_sparse_gpu as g
        return g.bsr_xwt, g.bsr_wx, g.dense_matmul
    return bsr_xwt, bsr_wx, _dense_matmul


def build_func(func: tvm.tirx.PrimFunc, target, args: list[np.ndarray], dev=None):
    """(library, device, device tensors of ``args``) for one PrimFunc built as ``main`` on ``target``."""
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    if dev is None:
        dev = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)
    return lib, dev, [tvm.runtime.tensor(a, dev) for a in args]


def time_func(func: tvm.tirx.PrimFunc, target, args: list[np.ndarray], dev=None) -> float:
    """Median seconds per call of one PrimFunc on ``target``."""
    lib, dev, targs = build_func(func, target, args, dev)
    f = lib.mod.time_evaluator("main", dev, number=10, repeat=3, min_repeat_ms=20)
    return float(np.median(f(*targs).results))


def _dense_matmul(m: int, k: int, n: int, target):
    from tvm import te
    from . import tvm_schedule
    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((k, n), "float32", name="w")
    kk = te.reduce_axis((0, k), name="kk")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, kk] * w[kk, j], axis=kk), name="y")
    func = te.create_prim_func([x, w, y])
    with target:
        sch = tvm_schedule.RegisterTiledReduction().apply(func, target, False)
    return sch.mod["main"] if sch is not None else func


def measure_linear(w: np.ndarray, m: int, r: int, target) -> tuple[float, float]:
    """(sparse seconds, dense seconds) for y = x @ w.T on ``target``."""
    n, k = w.shape
    xwt, _, dense = kernels(target)
    data, idx, ptr = to_bsr(w, r)
    x = np.random.rand(m, k).astype("float32")
    ts = time_func(xwt(m, k, n, r, len(idx)), target, [x, data, idx, ptr, np.zeros((m, n), "float32")])
    td = time_func(dense(m, k, n, target), target, [x, np.ascontiguousarray(w.T), np.zeros((m, n), "float32")])
    return ts, td


def measure_conv1x1(w: np.ndarray, b: int, p: int, r: int, target) -> tuple[float, float]:
    n, k = w.shape
    _, wx, dense = kernels(target)
    data, idx, ptr = to_bsr(w, r)
    x = np.random.rand(b, k, p).astype("float32")
    ts = time_func(wx(b, n, k, p, r, len(idx)), target, [x, data, idx, ptr, np.zeros((b, n, p), "float32")])
    # dense 1x1 conv = W[N,K] @ x[K,P]: the transposed matmul problem (M=P)
    td = time_func(dense(p * b, k, n, target), target,
               [np.random.rand(p * b, k).astype("float32"), np.ascontiguousarray(w.T), np.zeros((p * b, n), "float32")])
    return ts, td


def weight_key(w: np.ndarray) -> tuple:
    """A key that finds a layer's name from its weight (as the importer drops names)."""
    w = np.asarray(w, dtype="float64").reshape(w.shape[0], -1)
    return (w.size, round(float(np.abs(w).sum()), 3), round(float((w != 0).sum()), 0))


def _gpu_present() -> bool:
    from .tvm_sparse_gpu import has_gpu
    return has_gpu()


# ---- the Relax pass -------------------------------------------------------------------

def _static_shape(expr) -> list[int] | None:
    si = expr.ty
    if not isinstance(si, relax.TensorType) or si.shape is None:
        return None
    try:
        return [int(s) for s in si.shape]
    except TypeError:
        return None


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, opts):
        super().__init__(mod)
        self.opts = opts
        self.report: list[dict] = []
        self._matmul = tvm.ir.Op.get("relax.matmul")
        self._conv = tvm.ir.Op.get("relax.nn.conv2d")

    def visit_call_(self, call):
        call = super().visit_call_(call)
        try:
            res = None
            if call.op.same_as(self._matmul):
                res = self._linear(call)
            elif call.op.same_as(self._conv):
                res = self._conv1x1(call)
            if res is not None:
                return res
        except Exception as e:  # noqa: BLE001 - never fail a build over a sparse candidate
            self.report.append({"layer": f"#{len(self.report)}", "choice": "dense", "reason": f"error: {e}"})
        return call

    def _decide(self, kind, w, batch, p=None):
        """Returns (use_sparse, r, info dict)."""
        zero = float((w == 0).mean())
        name = self.opts.get("names", {}).get(weight_key(w)) or f"{kind}{list(w.shape)}#{len(self.report)}"
        info = {"layer": name, "kind": kind, "shape": list(w.shape),
                "zeros": round(zero, 4)}
        if zero < self.opts["min_zeros"] or self.opts["mode"] == "dense":
            info.update(choice="dense", reason="too few zeros" if zero < self.opts["min_zeros"] else "forced")
            self.report.append(info)
            return False, 0, info
        r, nnzb = pick_block(w)
        info.update(block=[r, 1], nnz_blocks=nnzb, block_fill=round(nnzb * r / max(w.size, 1), 4))
        if self.opts["mode"] == "sparse":
            ok, why = True, "forced"
        elif self.opts["measure"]:
            if kind == "linear":
                ts, td = measure_linear(w, batch, r, self.opts["target"])
            else:
                ts, td = measure_conv1x1(w, batch, p, r, self.opts["target"])
            ok, why = ts < td, "measured"
            info.update(sparse_ms=round(ts * 1e3, 4), dense_ms=round(td * 1e3, 4))
        else:
            ok, why = nnzb * max(r / 8, 1) * 1.6 < w.size / 8, "cost model"
        info.update(choice="sparse" if ok else "dense", reason=why)
        self.report.append(info)
        return ok, r, info

    def _consts(self, w, r):
        data, idx, ptr = to_bsr(w, r)
        return [relax.const(a) for a in (data, idx, ptr)], len(idx)

    def _linear(self, call):
        x, wc = call.args
        if not isinstance(wc, tvm.ir.expr.Constant) or str(wc.value.dtype) != "float32":
            return None
        xs, ws = _static_shape(x), _static_shape(wc)
        if xs is None or ws is None or len(ws) != 2 or str(x.ty.dtype) != "float32":
            return None
        k, n = ws
        m = int(np.prod(xs[:-1])) if len(xs) > 1 else 1
        w = wc.value.numpy().T  # [N, K]
        ok, r, _ = self._decide("linear", w, m)
        if not ok:
            return None
        consts, nnzb = self._consts(w, r)
        gv = self.builder_.add_func(kernels(self.opts["target"])[0](m, k, n, r, nnzb), "prunec_bsr_linear")
        x2 = self.builder_.emit(relax.op.reshape(x, [m, k]))
        y = self.builder_.emit(relax.call_tir(gv, [x2, *consts], relax.TensorType([m, n], "float32")))
        return relax.op.reshape(y, [*xs[:-1], n]) if len(xs) != 2 else y

    def _conv1x1(self, call):
        x, wc = call.args
        a = call.attrs
        if not isinstance(wc, tvm.ir.expr.Constant) or str(wc.value.dtype) != "float32":
            return None
        xs, ws = _static_shape(x), _static_shape(wc)
        if (xs is None or ws is None or ws[2:] != [1, 1] or int(a.groups) != 1 or str(a.data_layout) != "NCHW"
                or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW"
                or any(int(s) != 1 for s in a.strides) or any(int(s) != 0 for s in a.padding)):
            return None
        b, c, h, wd = xs
        n = ws[0]
        w = wc.value.numpy().reshape(n, c)
        ok, r, _ = self._decide("conv1x1", w, b, h * wd)
        if not ok:
            return None
        consts, nnzb = self._consts(w, r)
        gv = self.builder_.add_func(kernels(self.opts["target"])[1](b, n, c, h * wd, r, nnzb), "prunec_bsr_conv1x1")
        x2 = self.builder_.emit(relax.op.reshape(x, [b, c, h * wd]))
        y = self.builder_.emit(relax.call_tir(gv, [x2, *consts], relax.TensorType([b, n, h * wd], "float32")))
        return relax.op.reshape(y, [b, n, h, wd])


@tvm.transform.module_pass(opt_level=0, name="prunec.SparseDenseRewrite")
class SparseDenseRewrite:
    """Relax module pass: sparse kernels in place of dense linear / 1x1 conv where faster.

    mode: "auto" (measure or cost model), "sparse" (always, for testing) or "dense" (never).
    ``.report`` (after running) lists the choice per layer.
    """

    def __init__(self, target, mode: str = "auto", measure: bool = True, min_zeros: float = 0.5,
                 names: dict | None = None):
        # Measuring needs the target's device here: a cuda build on a machine without a GPU uses the cost model.
        on_device = target.kind.name == "llvm" or _gpu_present()
        self.opts = {"target": target, "mode": mode, "measure": measure and on_device,
                     "min_zeros": min_zeros, "names": names or {}}
        self.report: list[dict] = []

    def transform_module(self, mod, _ctx):
        rw = _Rewriter(mod, self.opts)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        self.report[:] = rw.report
        return rw.builder_.get()
