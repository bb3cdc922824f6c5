"""An inverted-residual block's expansion and depthwise convolution as one CPU kernel (a Relax
module pass).

MobileNet-style blocks widen the features with a 1x1 convolution, then run a depthwise
convolution over them: ``dw(act1(conv1x1(x) + b1)) ...``.  Compiled separately, the wide
intermediate (96x112x112 floats, 4.8 MB, in MobileNetV2's second block) is written to memory
by one kernel and read back by the next.  Both kernels are then bound by memory, not by
arithmetic, and pruning, which halves that tensor but quarters the 1x1's work, cannot turn
its FLOPs ratio into time.

``FuseExpandDepthwise`` matches ``conv1x1 -> per-channel chain -> depthwise conv -> chain``
(chains of adds, subtracts, multiplies and divides by per-channel constants: a batch norm,
folded by ``fold-bn`` or not; clip, ReLU; every intermediate used once) and replaces it with a ``call_tir`` of one kernel built here with its own schedule:
each task takes a few channels, computes their 1x1 output plane into a task-local buffer
(in cache), pads it, applies the chain and runs the depthwise window over it.  The wide
tensor never reaches memory.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax, s_tir, te

from .tvm_pointwise import CpuRewrite
from .tvm_pointwise import op_name as _op
from .tvm_schedule_overlap import OverlapRefused, overlap_last_strip
from .tvm_sparse import _static_shape

_Constant = tvm.ir.expr.Constant  # relax.const(...) builds one

_MIN_WIDTH = 28  # narrower rows leave the 1x1's vectors partly empty; PointwiseAsMatmul takes those
_CHANNELS_PER_TASK = 4
_TASK_BYTES = 1 << 20  # the task-local 1x1 output and its padded copy stay within about half an L2


def _per_channel(expr, c: int) -> np.ndarray | None:
    """A constant that broadcasts along the channel axis of an NCHW tensor with ``c`` channels,
    as a length-``c`` vector."""
    if not isinstance(expr, _Constant) or str(expr.value.dtype) != "float32":
        return None
    v = expr.value.numpy()
    shape = list(v.shape)
    while shape and shape[0] == 1 and len(shape) > 3:
        shape.pop(0)
    if v.size == 1:
        return np.full(c, float(v.reshape(-1)[0]), "float32")
    if v.size == c and len(shape) == 3 and shape == [c, 1, 1]:
        return v.reshape(c).astype("float32")
    return None


_PER_CHANNEL = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


def _step(call, c: int):
    """One element-wise op of a chain: (kind, per-channel vector or (lo, hi)), or None."""
    op = _op(call)
    if op in _PER_CHANNEL and len(call.args) == 2:
        k = _per_channel(call.args[1], c)
        return None if k is None else (op.split(".")[-1], k)
    if op == "relax.clip":
        lo, hi = call.args[1], call.args[2]
        vals = [getattr(a, "value", None) for a in (lo, hi)]
        if any(v is None for v in vals):
            return None
        return ("clip", (float(vals[0]), float(vals[1])))
    if op == "relax.nn.relu":
        return ("relu", None)
    return None


def _conv(call, depthwise: bool):
    """The attributes of a plain NCHW float32 convolution with a constant weight, or None."""
    if _op(call) != "relax.nn.conv2d":
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    x, w = call.args
    xs, ws = _static_shape(x), _static_shape(w)
    if xs is None or ws is None or len(xs) != 4 or not isinstance(w, _Constant):
        return None
    if str(x.ty.dtype) != "float32" or str(w.value.dtype) != "float32":
        return None
    if str(a.out_dtype) not in ("", "void", "None", "float32"):  # unset prints as "None" or "void"
        return None
    if any(int(d) != 1 for d in a.dilation):
        return None
    stride, pad, groups = [int(s) for s in a.strides], [int(p) for p in a.padding], int(a.groups)
    if depthwise:
        k = ws[2]
        if groups != xs[1] or ws[0] != xs[1] or ws[1] != 1 or ws[3] != k or k % 2 == 0:
            return None
        if stride[0] != stride[1] or stride[0] not in (1, 2) or pad != [k // 2] * 4:
            return None
        return {"k": k, "stride": stride[0]}
    if groups != 1 or ws[2:] != [1, 1] or stride != [1, 1] or any(pad):
        return None
    return {}


def _apply(chain, v, c):
    for kind, arg in chain:
        if kind == "add":
            v = v + arg[c]
        elif kind == "subtract":
            v = v - arg[c]
        elif kind == "multiply":
            v = v * arg[c]
        elif kind == "divide":
            v = v / arg[c]
        elif kind == "clip":
            v = te.max(te.min(v, arg[1]), arg[0])
        else:
            v = te.max(v, 0.0)
    return v


def fused_kernel(n, ci, c, h, w, k, stride, chain1, chain2):
    """The TE definition: 1x1 conv, chain1, zero padding, depthwise conv, chain2.  ``chainN`` is a
    list of (kind, arg); per-channel vectors become placeholders.  Returns (func, constants).

    The padded plane is stored phase-split along the row, ``[row, phase, column]`` with padded
    column ``q + s * (column - off) + phase`` (``s``: the stride when it divides the row, else 1),
    so a strided window reads contiguous lanes at every tap and the unpadded interior is a box,
    ``column in [off, off + w / s)`` for every phase, which the schedule splits off the zeros."""
    q = k // 2
    hp = h + 2 * q
    ho, wo = (hp - k) // stride + 1, (w + 2 * q - k) // stride + 1
    s = stride if w % stride == 0 else 1
    off = -((-q) // s)  # ceil(q / s): the columns left of the interior
    last = (wo - 1) * stride + k - 1 - q  # the unpadded column the last tap reads
    cols = max(off + w // s, last // s + off + 1)
    x = te.placeholder((n, ci, h * w), "float32", name="x")  # the plane flat: whole vectors along h*w
    w1 = te.placeholder((c, ci, 1, 1), "float32", name="w1")
    w2 = te.placeholder((c, 1, k, k), "float32", name="w2")
    consts, bufs = [], []

    def bind(chain):
        out = []
        for kind, arg in chain:
            if kind in ("add", "subtract", "multiply", "divide"):
                buf = te.placeholder((c,), "float32", name=f"k{len(consts)}")
                consts.append(arg)
                bufs.append(buf)
                arg = buf
            out.append((kind, arg))
        return out

    c1, c2 = bind(chain1), bind(chain2)
    rc = te.reduce_axis((0, ci), "rc")
    e = te.compute((n, c, h * w), lambda b, o, f: te.sum(x[b, rc, f] * w1[o, rc, 0, 0], axis=rc), name="expand")
    p = te.compute((n, c, hp, s, cols), lambda b, o, y, ph, j: te.if_then_else(
        te.all(y >= q, y < h + q, j >= off, j < off + w // s),
        _apply(c1, e[b, o, (y - q) * w + (j - off) * s + ph], o), 0.0), name="expand_pad")
    ry, rx = te.reduce_axis((0, k), "ry"), te.reduce_axis((0, k), "rx")

    def tap(b, o, y, z):  # padded column q + stride * z + rx - q
        col = z * stride + rx - q
        return p[b, o, y * stride + ry, col % s, col // s + off]
    d = te.compute((n, c, ho, wo), lambda b, o, y, z: te.sum(tap(b, o, y, z) * w2[o, 0, ry, rx], axis=[ry, rx]),
                   name="depthwise")
    out = te.compute((n, c, ho, wo), lambda b, o, y, z: _apply(c2, d[b, o, y, z], o), name="out")
    return te.create_prim_func([x, w1, w2, *bufs, out]), consts


def schedule_fused(func, lanes: int, overlap: bool = True):
    """Per task: ``_CHANNELS_PER_TASK`` channels.  The 1x1 output plane is computed in register
    tiles (the channels x one or two vectors, over the input channels) and written to a task-local
    buffer; the padded plane is zero-filled, its interior written through the chain (no bounds test
    per element), then the depthwise window runs in row x vector register tiles, as in the separate
    depthwise schedule (a row no vector width divides, 28 or 14, in whole vectors, the last one
    overlapping: ``window_tile``; pruned MobileNetV2's 28x28 kernels 0.82-0.90x the time)."""
    from .tvm_schedule_tiles import TILE_SCOPE, _largest_divisor, row_vector, vectorize_innermost, window_tile
    sch = s_tir.Schedule(func)
    expand, pad, dw, out = (sch.get_sblock(nm) for nm in ("expand", "expand_pad", "depthwise", "out"))
    acc = sch.cache_write(dw, 0, TILE_SCOPE)
    sch.reverse_compute_inline(out)
    b, c, y, x, ry, rx = sch.get_loops(dw)
    ho, wo, ch = (int(sch.get(lp).extent) for lp in (y, x, c))
    # channels per task: the 1x1's register tile is these channels x one or two vectors (4 x 32
    # lanes: 8 registers; 8 channels measured the same on MobileNetV2), and their planes stay cached
    g = _CHANNELS_PER_TASK
    plane = int(sch.get(sch.get_loops(expand)[2]).extent) + \
        int(np.prod([int(sch.get(lp).extent) for lp in sch.get_loops(pad)[2:]]))
    while g > 1 and g * plane * 4 > _TASK_BYTES:
        g //= 2
    g = _largest_divisor(ch, g)
    v, r, ragged = window_tile(wo, ho, lanes, overlap)
    co, cc = sch.split(c, [None, g])
    yo, yi = sch.split(y, [None, r])
    xo, xi = sch.split(x, [None, v])
    sch.reorder(b, co, cc, yo, xo, ry, rx, yi, xi)
    task = sch.fuse(b, co)
    # the padding joins each task by merging its channel loop into the task loop (compute_at would
    # cut it to the rows and columns the window reads, a ragged zero fill)
    pb, pc = sch.get_loops(pad)[:2]
    pco, _ = sch.split(pc, [None, g])
    task = sch.merge(sch.fuse(pb, pco), task)
    sch.compute_at(expand, task)
    sch.parallel(task)
    for lp in (ry, rx, yi):
        sch.unroll(lp)
    sch.vectorize(xi)
    sch.reverse_compute_at(acc, xo)
    init = sch.decompose_reduction(dw, ry)
    vectorize_innermost(sch, init, acc)  # scalar where no vector width divides the row (29 with 8 lanes)
    # ... then splits into zeros over the plane and the interior through the chain
    fill = sch.decompose_padding(pad, sch.get_loops(pad)[1])
    # a phase-split interior reads the 1x1's row with a stride (2): TVM's vector of such a read is
    # built lane by lane; left scalar, LLVM vectorizes it with wide loads and shuffles, which pays on
    # long rows (MobileNetV2's 112x112 block 0.84x pruned, 0.90x dense, its 56-wide one 0.98-1.00x; the
    # 28-wide one, 14 lanes per phase, ran 1.1-1.2x slower that way)
    phases = int(sch.get(pad).writes[0].source.shape[3])
    long_strided = phases > 1 and int(sch.get(sch.get_loops(pad)[-1]).extent) >= 3 * lanes
    vectorize_innermost(sch, fill, *([] if long_strided else [pad]))
    # the 1x1: [task, channel, plane, input channel] -> plane tile, input channel, channel
    # (unrolled), plane lanes (vector); accumulators in registers per plane tile.  Along the flat
    # plane the vectors are whole where a row's are not (56 = 3.5 x 16: 28-lane accumulators
    # ran 7x slower)
    loops = sch.get_loops(expand)
    pc = loops[-3] if len(loops) >= 4 else None  # one channel per task: no channel loop
    pcol, prc = loops[-2:]
    pv = row_vector(int(sch.get(pcol).extent), lanes)
    pco, pci = sch.split(pcol, [None, pv])
    sch.reorder(pco, prc, *([pc] if pc is not None else []), pci)
    pacc = sch.cache_write(expand, 0, TILE_SCOPE)
    sch.reverse_compute_at(pacc, pco)
    if pc is not None:
        sch.unroll(pc)
    sch.vectorize(pci)
    pinit = sch.decompose_reduction(expand, prc)
    vectorize_innermost(sch, pinit, pacc)
    out = sch.mod["main"]
    if ragged:
        try:
            out = overlap_last_strip(out, sch.get(xo).loop_var, v, wo)
        except OverlapRefused:
            return schedule_fused(func, lanes, overlap=False)
    return out.with_attr("tirx.is_scheduled", True).without_attr("global_symbol")


class _Match(NamedTuple):
    x: relax.Expr
    w1: relax.Expr
    w2: relax.Expr
    conv: dict
    chain1: list
    chain2: list
    shape: tuple


def _chain_back(var, defs, uses):
    """Walk back from ``var``'s binding through single-use element-wise steps to the convolution
    that starts them: (the steps in order, that convolution's call), or None."""
    chain, e = [], defs.get(var)
    while e is not None and _op(e) != "relax.nn.conv2d":
        xs = _static_shape(e)
        s = _step(e, xs[1]) if xs is not None and len(xs) == 4 else None
        prev = e.args[0] if e.args else None
        if s is None or not isinstance(prev, relax.Var) or uses.get(prev) != 1:
            return None
        chain.insert(0, s)
        e = defs.get(prev)
    return None if e is None else (chain, e)


def _match(end, defs, uses):
    """The block ending at binding var ``end``, or None."""
    back = _chain_back(end, defs, uses)
    conv = _conv(back[1], depthwise=True) if back is not None else None
    if conv is None or not isinstance(back[1].args[0], relax.Var) or uses.get(back[1].args[0]) != 1:
        return None
    chain2, dw = back
    back = _chain_back(dw.args[0], defs, uses)
    if back is None or _conv(back[1], depthwise=False) is None:
        return None
    chain1, pw = back
    xs = _static_shape(pw.args[0])
    if xs[3] < _MIN_WIDTH or (xs[3] // conv["stride"]) < _MIN_WIDTH // 2:
        return None
    c = _static_shape(pw.args[1])[0]
    return _Match(pw.args[0], pw.args[1], dw.args[1], conv, chain1, chain2, (*xs, c))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, lanes):
        super().__init__(mod)
        self.lanes, self.count, self.ends = lanes, 0, {}

    def visit_var_binding_(self, binding):
        m = self.ends.get(binding.var)
        if m is None:
            return super().visit_var_binding_(binding)
        n, ci, h, w, c = m.shape
        k, s = m.conv["k"], m.conv["stride"]
        func, consts = fused_kernel(n, ci, c, h, w, k, s, m.chain1, m.chain2)
        gv = self.builder_.add_func(schedule_fused(func, self.lanes), "prunec_expand_depthwise")
        ho = (h + 2 * (k // 2) - k) // s + 1
        wo = (w + 2 * (k // 2) - k) // s + 1
        x = self.builder_.emit(relax.op.reshape(self.visit_expr(m.x), [n, ci, h * w]))  # a view
        args = [x, m.w1, m.w2, *[relax.const(v) for v in consts]]
        call = relax.call_tir(gv, args, relax.TensorType([n, c, ho, wo], "float32"))
        self.count += 1
        self.set_var_remap(binding.var, self.builder_.emit(call))


def _find(func) -> dict:
    defs, uses, users = {}, {}, {}

    def count(expr, user):
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1
            users.setdefault(expr, []).append(user)
        elif isinstance(expr, relax.Call):
            for a in expr.args:
                count(a, user)
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                count(f, user)
        elif isinstance(expr, relax.TupleGetItem):
            count(expr.tuple_value, user)

    body = func.body
    for block in body.blocks:
        for bnd in block.bindings:
            if isinstance(bnd, relax.VarBinding):
                count(bnd.value, bnd.var)
                if isinstance(bnd.value, relax.Call):
                    defs[bnd.var] = bnd.value
            else:
                count(bnd.value, bnd.var)
    count(body.body, None)
    matches = {var: m for var in defs if (m := _match(var, defs, uses)) is not None}
    # only the longest chain: skip an end whose single user extends it
    return {var: m for var, m in matches.items()
            if not (len(users.get(var, [])) == 1 and users[var][0] in matches)}


@tvm.transform.module_pass(opt_level=0, name="prunec.FuseExpandDepthwise")
class FuseExpandDepthwise(CpuRewrite):
    """Fuse each 1x1 expansion with the depthwise convolution it feeds (CPU targets).

    ``lanes``: the fp32 vector width to schedule for (None: the target's)."""

    def transform_module(self, mod, _ctx):
        if self.target.kind.name != "llvm":
            return mod
        rw = _Rewriter(mod, self.lanes)

        def prepare(func):
            rw.ends = _find(func)
            return bool(rw.ends)
        if not self._rewrite(mod, rw, prepare):
            return mod
        return relax.transform.DeadCodeElimination()(rw.builder_.get())
