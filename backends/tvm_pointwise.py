"""1x1 convolutions as matrix products (a Relax module pass).

A 1x1, stride-1 convolution is ``W[Co, Ci] @ X[N, Ci, H*W]``.  The CPU convolution schedule
vectorizes along the output row; on a 7x7 or 14x14 plane the row (7, 14) and the plane (49,
196) are no multiple of 8 or 16, so its vectors run partly empty.  As a matmul it gets the GEMM
schedule instead: whole-vector strips of the plane (the last one overlapping the one before it,
tvm_schedule_overlap), register tiles of output channels; on ResNet-50's 7x7 and 14x14 layers that ran 1.3-1.8x faster, and with AVX2 on every
14x14 1x1 of a pruned MobileNetV2 (1.08-1.45x; with AVX-512 only above a weight count).  A 28x28
or 56x56 plane is whole vectors as one axis (784, 3136) but its rows are not (28, 56: padded to
32 and 64 in the convolution schedule): as matmuls MobileNetV2 and ResNet-50 ran 1-4% faster, dense and
pruned.  A 112x112 plane's rows are whole vectors, but its 1x1s have few input channels, and as
matmuls they read their operand in place (no packed copy; tvm_schedule_tiles): MobileNetV2's 32->16
(16->8 pruned) ran 0.83x (0.71x) the time.  Larger planes stay convolutions.  The
bias / BN, clip and residual add after the product move above the reshape back to 4-d, so they
fuse into the matmul's kernel as they did into the convolution's.
"""
from __future__ import annotations

import tvm
from tvm import relax

from .tvm_sparse import _static_shape

_MAX_PLANE = 256  # planes no vector width divides: up to 16x16
_MAX_WHOLE_PLANE = 112 * 112  # planes of whole vectors: up to 112x112
# with 16 lanes (AVX-512), ragged planes beyond 7x7 need this many weights: 192->48 at 14x14 ran 0.8x
# as a matmul on a Xeon.  With 8 (AVX2) every 14x14 1x1 of a pruned MobileNetV2 ran faster as a matmul
# on a Zen 3 host (0.69-0.93x the time; 192->48 0.73x), the whole model 0.82-0.88x dense, 0.85-0.93x pruned
_MIN_WEIGHTS = 1 << 16
_MIN_WEIGHTS_LANES = 16


def _as_matmul(call, lanes: int, reshape=relax.op.reshape):
    """``call`` (a ``relax.nn.conv2d``) rewritten as a matmul, or None when it is not a plain
    1x1, stride-1, unpadded, ungrouped NCHW convolution on a plane this pass takes (module docstring).
    ``reshape(x, shape)`` makes the 3-d view of the input."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW") or int(a.groups) != 1:
        return None
    if [int(s) for s in a.strides] != [1, 1] or any(int(p) for p in a.padding):
        return None
    x, w = call.args
    xs, ws = _static_shape(x), _static_shape(w)
    if xs is None or ws is None or len(xs) != 4 or ws[2:] != [1, 1]:
        return None
    dtype = str(x.ty.dtype)
    if str(w.ty.dtype) != dtype or (a.out_dtype and str(a.out_dtype) not in ("", dtype)):
        return None
    n, ci, h, wd = xs
    co = ws[0]
    plane = h * wd
    if plane % lanes == 0 or wd % lanes == 0:
        if plane > _MAX_WHOLE_PLANE:
            return None
    elif plane > _MAX_PLANE or (plane > 64 and lanes >= _MIN_WEIGHTS_LANES and ci * co < _MIN_WEIGHTS):
        return None  # a 14x14 plane with few channels on AVX-512: the convolution schedule wins
    if isinstance(w, tvm.ir.expr.Constant):  # fold the weight's reshape here: TVM's FoldConstant compiles a kernel
        w2 = relax.const(w.value.numpy().reshape(co, ci))
    else:
        w2 = relax.op.reshape(w, [co, ci])
    y = relax.op.matmul(w2, reshape(x, [n, ci, plane]))
    return relax.op.reshape(y, [n, co, h, wd])


def op_name(call) -> str:
    """The operator a Relax call applies (``relax.add``), or "" for anything else."""
    return call.op.name if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) else ""


def _tensor_const(e) -> bool:
    return isinstance(e, tvm.ir.expr.Constant) and hasattr(e.value, "numpy")


# element-wise ops an epilogue is made of: they commute with the reshape back to [N, Co, H, W]
_EPILOGUE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
             "relax.clip", "relax.nn.relu", "relax.nn.relu6", "relax.nn.leakyrelu"}
# ... and activations that cost more than a few instructions per element: they join the matmul's kernel,
# whose register tiles' write-back runs them in whole vectors (at 112x112 EfficientNet-B0's 16->96
# expansion with SiLU ran 0.75x the time of the two kernels; with the 7x7 and 14x14 layers too, since
# their strips overlap instead of being padded and cropped: the whole model 0.96x dense, 0.97x pruned).
# Cropping a padded product ran them in guarded 4-lane groups, 1.08-1.16x slower than apart.
_ACTIVATIONS = {"relax.nn.silu", "relax.sigmoid", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.tanh",
                "relax.negative", "relax.exp", "relax.erf"}
_SINKABLE = _EPILOGUE | _ACTIVATIONS


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, lanes):
        super().__init__(mod)
        self.lanes, self.count = lanes, 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        new = _as_matmul(call, self.lanes, self._reshape)
        if new is not None:
            self.count += 1
            return new
        if op_name(call) == "relax.reshape" and _static_shape(call) is not None:
            return self._reshape(call.args[0], _static_shape(call), call)
        sunk = self._sink_reshape(call)
        return call if sunk is None else sunk

    def _reshape(self, x, shape, call=None):
        """``x`` reshaped to ``shape``; when ``x`` is itself a reshape of a tensor of that shape
        (one rewrite's reshape back to 4-d met by the next one's to 3-d), that tensor: fused, the
        pair was a copy kernel, not a view."""
        value = self.lookup_binding(x) if isinstance(x, relax.Var) else None
        if op_name(value) == "relax.reshape" and _static_shape(value.args[0]) == list(shape):
            return value.args[0]
        return call if call is not None else relax.op.reshape(x, shape)

    def _split(self, arg):
        """``(y, [N, Co, H, W])`` when ``arg`` is this pass's ``reshape(matmul(W, x), [N, Co, H, W])``."""
        if not isinstance(arg, relax.Var):
            return None
        value = self.lookup_binding(arg)
        if op_name(value) != "relax.reshape":
            return None
        y, shape = value.args[0], _static_shape(arg)
        if shape is None or len(shape) != 4 or _static_shape(y) != [shape[0], shape[1], shape[2] * shape[3]]:
            return None  # not the split of the last axis that commutes with per-channel operands
        return (y, shape) if self._from_matmul(y) else None

    def _from_matmul(self, y, depth: int = 8) -> bool:
        """``y`` is this pass's ``matmul(W, x)``, or an epilogue op already sunk below its reshape."""
        if depth == 0:
            return False
        value = self.lookup_binding(y) if isinstance(y, relax.Var) else y
        op = op_name(value)
        if op == "relax.matmul":
            return _tensor_const(value.args[0])
        return op in _SINKABLE and any(self._from_matmul(a, depth - 1) for a in value.args
                                       if isinstance(a, relax.Var))

    def _sink_reshape(self, call):
        """``op(reshape(y), c)`` as ``reshape(op(y, c'))``: the epilogue (bias, clip, residual add)
        then follows the matmul directly, and FuseOps fuses it into the matmul's kernel instead of
        leaving it a kernel of its own (the reshape, injective, stopped the fusion)."""
        op = op_name(call)
        if op not in _SINKABLE:
            return None
        split = [self._split(a) for a in call.args]
        at = [i for i, sp in enumerate(split) if sp is not None]
        if not at or any(split[i][1] != split[at[0]][1] for i in at):
            return None
        shape = split[at[0]][1]
        n, co, h, w = shape
        args = []
        for i, a in enumerate(call.args):
            if split[i] is not None:  # a residual add of two products takes both unreshaped
                args.append(split[i][0])
            elif _tensor_const(a):
                v = a.value.numpy()
                if v.size == 1 and v.ndim <= 1:
                    args.append(a)  # a scalar broadcasts either way
                elif list(v.shape) in ([1, co, 1, 1], [co, 1, 1]):
                    args.append(relax.const(v.reshape(1, co, 1)))  # per channel
                else:
                    return None
            elif _static_shape(a) == shape:
                args.append(relax.op.reshape(a, [n, co, h * w]))  # a residual: reshaped as a view
            elif isinstance(a, tvm.ir.expr.Constant):
                args.append(a)  # a scalar operand (clip's bounds)
            else:
                return None
        return relax.op.reshape(relax.Call(call.op, args, call.attrs), shape)


class CpuRewrite:
    """What prunec's CPU-only Relax rewrites share: the target, the fp32 vector width they plan
    for (``lanes``, None: the target's), and a count of what they rewrote."""

    def __init__(self, target: tvm.target.Target, lanes: int | None = None):
        from .tvm_schedule import vector_lanes
        self.target = target
        self.lanes = lanes or vector_lanes(target)
        self.count = 0

    def _rewrite(self, mod, rw, prepare=lambda _func: True) -> int:
        """Visit every Relax function of ``mod`` with mutator ``rw`` (those ``prepare`` accepts)."""
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function) and prepare(func):
                rw.builder_.update_func(gv, rw.visit_expr(func))
        self.count = rw.count
        return rw.count


@tvm.transform.module_pass(opt_level=0, name="prunec.PointwiseAsMatmul")
class PointwiseAsMatmul(CpuRewrite):
    """Rewrite 1x1 convolutions on small, vector-ragged planes as matmuls (CPU targets).

    ``lanes``: the fp32 vector width the planes are checked against (None: the target's)."""

    def transform_module(self, mod, _ctx):
        if self.target.kind.name != "llvm":
            return mod
        rw = _Rewriter(mod, self.lanes)
        self._rewrite(mod, rw)
        # no CanonicalizeBindings here: after SparseDenseRewrite's call_tir it left ViT-B/16 with one
        # Relax var mapped to two buffers in FuseTIR ("Inconsistent buffers y and lv1")
        return rw.builder_.get() if rw.count else mod
