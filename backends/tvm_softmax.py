"""Softmax over the last axis as one vectorized CPU kernel (a Relax module pass).

Attention's softmax runs over rows of the sequence length: 197 in ViT-B/16, which no vector
width divides.  Legalized (``topi`` softmax, or ``fast_softmax`` after ``FastMathTransform``) it
is four stages (row max, exponentials, row sum, division), and a reduction over a ragged row
keeps one scalar accumulator (``RowReduction`` cannot ``rfactor`` it, see
tvm_schedule_rows.py): a chain of dependent maxes or adds as long as the row.  PyTorch's
``scaled_dot_product_attention`` decomposes into a *safe* softmax besides, which gives 0 instead
of NaN on a row that is all ``-inf`` (a fully masked query): ``where(all(s == -inf, -1), 0,
softmax(s))``, one more pass over the scores with an int8 max-reduction.  Attention's scores are
the one tensor in a transformer that pruning does not shrink (heads keep their sequence length),
so this time stays put while the matmuls around it shrink.

``RowSoftmax`` matches ``softmax(s, axis=-1)`` on float32 and the safe pattern around it, and
calls a kernel written here: per row (rows in parallel), one pass for the row max in vector
partials (and, for the safe form, whether any score is not ``-inf``), one for ``exp(s - max)``
stored and summed in vector partials, one to scale by the reciprocal of the sum; whole vectors
first, the ragged tail in scalars.  The exponential is TVM's ``fast_exp`` polynomial (the one
``FastMathTransform`` uses) unless ``fast_math`` is off.  A row that is all ``-inf`` gives 0 in
the safe form and NaN in the plain one, as in PyTorch.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import tirx as T

from .tvm_pointwise import CpuRewrite
from .tvm_pointwise import op_name as _op
from .tvm_sparse import _static_shape

_NEG_INF = float("-inf")


def fast_exp(x):
    """TVM's ``fast_exp`` for float32 (topi/elemwise.h) as a TIR expression: ``2^n * p(f)`` with
    ``n = round(x log2 e)``, a degree-7 polynomial for ``exp(f)``, the power of two built in the
    exponent bits; within ~1e-7 relative for ``x`` in [-88.4, 88.4], clamped outside."""
    f32 = "float32"
    c = [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1]
    x = T.max(T.min(x, T.float32(88.3762626647950)), T.float32(-88.3762626647949))
    n = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    f = x - n * T.float32(0.6931471805599453)
    p = T.float32(c[0])
    for ci in c[1:]:
        p = p * f + T.float32(ci)
    y = p * f * f + f + T.float32(1.0)
    two_n = T.reinterpret(f32, T.shift_left(T.Cast("int32", n + T.float32(127.0)), 23))
    return two_n * y


def row_softmax(rows: int, n: int, lanes: int, safe: bool, fast: bool):
    """The kernel for ``rows`` rows of ``n`` float32 scores (module docstring)."""
    nv, tail = n // lanes, n % lanes
    exp = fast_exp if fast else T.exp
    empty = 0.0 if safe else float("nan")  # what an all -inf row gives

    @T.prim_func(private=True, check_well_formed=False)
    def softmax(x: T.Buffer((rows, n), "float32"), y: T.Buffer((rows, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 4})
        with T.sblock("root"):
            for r in T.parallel(rows):
                part = T.alloc_buffer((lanes,), "float32")  # vector partials: max, then sum
                seen = T.alloc_buffer((lanes,), "float32")  # 1 where a score is not -inf
                acc = T.alloc_buffer((2,), "float32")
                for q in T.vectorized(lanes):
                    part[q] = T.float32(_NEG_INF)
                    seen[q] = T.float32(0)
                for j in range(nv):
                    for q in T.vectorized(lanes):
                        part[q] = T.max(part[q], x[r, j * lanes + q])
                        seen[q] = T.max(seen[q], T.Select(x[r, j * lanes + q] != T.float32(_NEG_INF),
                                                          T.float32(1), T.float32(0)))
                for q in range(tail):
                    part[q] = T.max(part[q], x[r, nv * lanes + q])
                    seen[q] = T.max(seen[q], T.Select(x[r, nv * lanes + q] != T.float32(_NEG_INF),
                                                      T.float32(1), T.float32(0)))
                acc[0] = T.float32(_NEG_INF)
                acc[1] = T.float32(0)
                for q in range(lanes):
                    acc[0] = T.max(acc[0], part[q])
                    acc[1] = T.max(acc[1], seen[q])
                if acc[1] > T.float32(0):
                    for q in T.vectorized(lanes):
                        part[q] = T.float32(0)
                    for j in range(nv):
                        for q in T.vectorized(lanes):
                            y[r, j * lanes + q] = exp(x[r, j * lanes + q] - acc[0])
                            part[q] = part[q] + y[r, j * lanes + q]
                    for q in range(tail):
                        y[r, nv * lanes + q] = exp(x[r, nv * lanes + q] - acc[0])
                        part[q] = part[q] + y[r, nv * lanes + q]
                    acc[1] = T.float32(0)
                    for q in range(lanes):
                        acc[1] = acc[1] + part[q]
                    acc[1] = T.float32(1) / acc[1]
                    for j in range(nv):
                        for q in T.vectorized(lanes):
                            y[r, j * lanes + q] = y[r, j * lanes + q] * acc[1]
                    for q in range(tail):
                        y[r, nv * lanes + q] = y[r, nv * lanes + q] * acc[1]
                else:
                    for j in range(n):
                        y[r, j] = T.float32(empty)
    return softmax


def _softmax_input(call, defs):
    """The scores ``s`` when ``call`` is ``softmax(s, axis=-1)`` on a static float32 tensor."""
    if _op(call) != "relax.nn.softmax":
        return None
    s = call.args[0]
    shape = _static_shape(s)
    if shape is None or not shape or str(s.ty.dtype) != "float32":
        return None
    return s if int(call.attrs.axis) in (-1, len(shape) - 1) else None


def _last_axis(call, ndim: int) -> bool:
    axes = call.attrs.axis
    return axes is not None and len(axes) == 1 and int(axes[0]) in (-1, ndim - 1)


def _chain(var, defs, ops):
    """Follow ``var``'s definition back through unary ``ops`` (outermost first); the innermost
    call, or None."""
    e = defs.get(var)
    for op in ops:
        if _op(e) != op:
            return None
        if op == ops[-1]:
            return e
        e = defs.get(e.args[0])
    return None


def _is_zero(e, defs) -> bool:
    """``e`` is zeros: ``full_like(_, 0)`` or a constant (constant folding turns the ``full_like``
    into a tensor of zeros the size of the scores)."""
    if isinstance(e, relax.Var):
        e = defs.get(e)
        if _op(e) != "relax.full_like":
            return False
        e = e.args[1]
    return isinstance(e, tvm.ir.expr.Constant) and not e.value.numpy().any()


def _safe_softmax_input(call, defs):
    """The scores ``s`` when ``call`` is PyTorch's safe softmax:
    ``where(!any(s != -inf, -1), 0, softmax(s, -1))`` as ``torch.export`` writes it
    (``logical_not(astype(max(astype(logical_not(equal(s, -inf)), int8), -1), bool))``)."""
    if _op(call) != "relax.where":
        return None
    cond, zero, sm = call.args
    s = _softmax_input(defs.get(sm), defs) if isinstance(sm, relax.Var) else None
    if s is None or not _is_zero(zero, defs) or not isinstance(cond, relax.Var):
        return None
    red = _chain(cond, defs, ["relax.logical_not", "relax.astype", "relax.max"])
    if red is None or not _last_axis(red, len(_static_shape(s))) or not red.attrs.keepdims:
        return None
    eq = _chain(red.args[0], defs, ["relax.astype", "relax.logical_not", "relax.equal"])
    if eq is None or not eq.args[0].same_as(s):
        return None
    inf = eq.args[1]
    if not isinstance(inf, tvm.ir.expr.Constant) or float(inf.value.numpy()) != _NEG_INF:
        return None
    return s


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, lanes, fast):
        super().__init__(mod)
        self.lanes, self.fast, self.count, self.found = lanes, fast, 0, {}

    def visit_var_binding_(self, binding):
        hit = self.found.get(binding.var)
        if hit is None:
            return super().visit_var_binding_(binding)
        s, safe = hit
        shape = _static_shape(s)
        n, rows = shape[-1], 1
        for d in shape[:-1]:
            rows *= d
        func = row_softmax(rows, n, self.lanes, safe, self.fast)
        gv = self.builder_.add_func(func, "prunec_safe_softmax" if safe else "prunec_softmax")
        x = self.builder_.emit(relax.op.reshape(self.visit_expr(s), [rows, n]))  # views
        y = self.builder_.emit(relax.call_tir(gv, [x], relax.TensorType([rows, n], "float32")))
        self.count += 1
        self.set_var_remap(binding.var, self.builder_.emit(relax.op.reshape(y, shape)))


def _find(func) -> dict:
    """{binding var: (scores, safe)} for each softmax (safe or plain) in ``func``."""
    defs = {}
    for block in func.body.blocks:
        for bnd in block.bindings:
            if isinstance(bnd, relax.VarBinding) and isinstance(bnd.value, relax.Call):
                defs[bnd.var] = bnd.value
    found = {}
    for var, call in defs.items():
        if (s := _safe_softmax_input(call, defs)) is not None:
            found[var] = (s, True)
    inner = {defs[v].args[2] for v in found}  # a safe softmax's own softmax: left to dead-code elimination
    for var, call in defs.items():
        if var not in found and var not in inner and (s := _softmax_input(call, defs)) is not None:
            found[var] = (s, False)
    return found


@tvm.transform.module_pass(opt_level=0, name="prunec.RowSoftmax")
class RowSoftmax(CpuRewrite):
    """Softmax over the last axis (and PyTorch's safe softmax) as prunec's vectorized row kernel
    (CPU targets).  ``fast_math``: the polynomial exponential (False: libm's ``exp``)."""

    def __init__(self, target: tvm.target.Target, lanes: int | None = None, fast_math: bool = True):
        super().__init__(target, lanes)
        self.fast_math = fast_math

    def transform_module(self, mod, _ctx):
        if self.target.kind.name != "llvm":
            return mod
        rw = _Rewriter(mod, self.lanes, self.fast_math)

        def prepare(func):
            rw.found = _find(func)
            return bool(rw.found)
        if not self._rewrite(mod, rw, prepare):
            return mod
        # the plain softmax under a safe one, its zeros and the -inf test are left unused
        return relax.transform.DeadCodeElimination()(rw.builder_.get())
