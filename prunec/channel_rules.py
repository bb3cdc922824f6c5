"""Channel rules: for every supported ATen op, how channels flow through it.

Kinds (see docs/dependency-analysis.md):
- pass-through: result element i is operand element i (element-wise ops, norms, pooling)
- re-index: elements move (cat, split, slice, permute, view, pixel shuffle)
- reduce: a dimension is reduced (mean, softmax, norms): removal is allowed but
  marked as changing a statistic
- barrier: everything else; its dimensions are pinned and the op is reported

A rule is ``fn(ctx, node)``; register with ``@rule("op", ...)``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .head_views import SDPA_OPS
from .ir import Node, Value

RULES: dict[str, Callable] = {}


def rule(*ops: str):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


def apply_rule(ctx, node: Node) -> None:
    fn = RULES.get(node.op)
    if fn is None:
        ctx.barrier(f"no channel rule for {node.op}")
        return
    fn(ctx, node)


def _t(a) -> bool:
    return isinstance(a, Value) and len(a.shape) > 0


def _nd(v: Value) -> int:
    return len(v.shape)


# ---- pass-through --------------------------------------------------------------

ELEMENTWISE = (
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "exp", "log", "log1p", "sqrt", "rsqrt", "neg", "abs", "sin",
    "cos", "erf", "reciprocal", "square", "sign", "logical_not", "bitwise_not", "isnan", "floor", "ceil",
    "round", "add", "sub", "mul", "div", "rsub", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_and", "logical_or", "bitwise_and", "bitwise_or", "pow", "fmod", "remainder", "floor_divide",
    "where", "masked_fill", "clamp", "clamp_min", "clamp_max", "lerp", "addcmul", "addcdiv", "clone",
    "_to_copy", "to", "alias", "detach", "contiguous", "dropout", "native_dropout", "lift_fresh_copy",
    "copy", "type_as", "gelu_", "prelu", "threshold", "log_sigmoid", "sigmoid_", "nan_to_num", "trunc",
    "expm1", "exp2", "log2", "log10", "tan", "atan", "asin", "acos", "sinh", "cosh", "erfinv", "frac",
)


@rule(*ELEMENTWISE)
def elementwise(ctx, n: Node) -> None:
    ins = [a for a in n.inputs() if _t(a)]
    for out in n.outputs:
        if not _t(out):
            continue
        for x in ins:
            off = _nd(out) - _nd(x)
            for d in range(_nd(x)):
                od = d + off
                if od < 0:
                    ctx.pin(x, d, "operand has more dimensions than the result")
                elif x.shape[d] == out.shape[od]:
                    ctx.same(x, d, out, od)
                elif x.shape[d] == 1:
                    ctx.cover(x, d)  # broadcast: nothing to remove on this side
        for d in range(_nd(out)):
            ctx.cover(out, d)  # a broadcast-only result dim: its size follows the operands


def _identity_dims(ctx, x: Value, out: Value, skip=()) -> None:
    for d in range(_nd(x)):
        if d not in skip:
            ctx.same(x, d, out, d)


@rule("_native_batch_norm_legit_no_training", "batch_norm", "_native_batch_norm_legit",
      "native_batch_norm", "instance_norm")
def batch_norm(ctx, n: Node) -> None:
    x, out = n.args[0], n.outputs[0]
    _identity_dims(ctx, x, out)
    for p in n.args[1:5]:
        if _t(p):
            ctx.same(p, 0, x, 1)
    for o in n.outputs[1:]:
        for d in range(_nd(o)):
            if o.shape[d] == x.shape[1]:
                ctx.same(o, d, x, 1)
            else:
                ctx.pin(o, d, "batch norm side output")


@rule("layer_norm", "rms_norm")
def layer_norm(ctx, n: Node) -> None:
    x, out = n.args[0], n.outputs[0]
    k = len(n.args[1])
    _identity_dims(ctx, x, out)
    for j in range(k):
        d = _nd(x) - k + j
        ctx.stat(x, d)
        for p in n.args[2:4]:
            if _t(p):
                ctx.same(p, j, x, d)


@rule("group_norm")
def group_norm(ctx, n: Node) -> None:
    x, out = n.args[0], n.outputs[0]
    groups = n.arg(1, "num_groups")
    c = x.shape[1]
    per = c // groups
    idx = np.arange(c)
    ctx.link(x, 1, idx, x, 1, (idx // per) * per)  # a group is removed whole: statistics stay exact
    _identity_dims(ctx, x, out)
    for p in n.args[2:4]:
        if _t(p):
            ctx.same(p, 0, x, 1)


@rule("softmax", "_softmax", "log_softmax", "_log_softmax")
def softmax(ctx, n: Node) -> None:
    x, out = n.args[0], n.outputs[0]
    _identity_dims(ctx, x, out)
    ctx.stat(x, n.args[1])


# ---- reductions and pooling ----------------------------------------------------

@rule("mean", "sum", "amax", "amin", "var", "std", "max", "min", "argmax", "argmin", "prod", "norm",
      "linalg_vector_norm", "logsumexp", "any", "all")
def reduce(ctx, n: Node) -> None:
    x = n.args[0]
    if not _t(x):
        return
    dims = n.arg(1, "dim", None)
    if isinstance(dims, Value):  # max.other / min.other: element-wise
        elementwise(ctx, n)
        return
    if n.op in ("var", "std") and dims is None:
        dims = n.kwargs.get("dim")
    if n.op in ("linalg_vector_norm", "norm") and len(n.args) > 2:
        dims = n.args[2]
    keep = bool(n.kwargs.get("keepdim", False))
    for a in n.args[2:]:
        if isinstance(a, bool):
            keep = a
    if isinstance(dims, int):
        dims = [dims]
    if not dims:
        dims = list(range(_nd(x)))
    dims = {d % _nd(x) for d in dims}
    for out in n.outputs:
        od = 0
        for d in range(_nd(x)):
            if d in dims:
                ctx.stat(x, d)
                if keep and _nd(out) == _nd(x):
                    ctx.cover(out, od)
                    od += 1
            elif od < _nd(out):
                ctx.same(x, d, out, od)
                od += 1


@rule("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d",
      "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
      "max_pool3d_with_indices", "adaptive_max_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
      "upsample_nearest1d", "upsample_nearest3d", "upsample_bicubic2d", "upsample_linear1d",
      "_upsample_bilinear2d_aa", "_upsample_nearest_exact2d", "upsample_trilinear3d", "_adaptive_avg_pool2d")
def spatial(ctx, n: Node) -> None:
    """Batch and channel dims pass through; spatial dims are resized (pinned)."""
    x = n.args[0]
    spatial_dims = {"1d": 1, "2d": 2, "3d": 3}
    k = next((v for s, v in spatial_dims.items() if s in n.op), 2)
    for out in n.outputs:
        lead = _nd(x) - k
        for d in range(lead):
            ctx.same(x, d, out, d)
        for d in range(lead, _nd(x)):
            ctx.pin(x, d, "spatial dimension")
            ctx.pin(out, d, "spatial dimension")


@rule("constant_pad_nd", "pad", "reflection_pad2d", "replication_pad2d", "reflection_pad1d", "replication_pad1d")
def pad(ctx, n: Node) -> None:
    x, out = n.args[0], n.out
    padded = {_nd(x) - 1 - i // 2 for i, p in enumerate(n.args[1]) if p}
    if n.op not in ("constant_pad_nd", "pad"):
        padded |= set(range(_nd(x) - len(n.args[1]) // 2, _nd(x)))
    for d in range(_nd(x)):
        if d in padded:
            ctx.pin(x, d, "padded dimension")
            ctx.pin(out, d, "padded dimension")
        else:
            ctx.same(x, d, out, d)


# ---- layers with weights --------------------------------------------------------

@rule("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(ctx, n: Node) -> None:
    x, w, out = n.args[0], n.args[1], n.out
    b = n.arg(2, "bias")
    if n.op == "convolution":
        transposed, groups = n.arg(6, "transposed", False), n.arg(8, "groups", 1)
    elif n.op.startswith("conv_transpose"):
        transposed, groups = True, n.arg(6, "groups", 1)
    else:
        transposed, groups = False, n.arg(6, "groups", 1)
    if not _t(w) or not w.is_const:
        ctx.barrier("convolution with a computed weight")
        return
    ctx.same(x, 0, out, 0)
    if _t(b):
        ctx.same(b, 0, out, 1)
    # weight layout: [out, in/groups, k...] for a conv, [in, out/groups, k...] transposed
    full_side, grouped_side = (x, out) if transposed else (out, x)
    ctx.same(w, 0, full_side, 1)
    if groups == 1:
        ctx.same(w, 1, grouped_side, 1)
    else:
        # Grouped (and depthwise) conv: a whole group goes at once, so every
        # remaining group keeps its in/out widths and only ``groups`` shrinks.
        cin, cout = x.shape[1], out.shape[1]
        gi, go = np.arange(cin) // (cin // groups), np.arange(cout) // (cout // groups)
        first_out = np.searchsorted(go, np.arange(groups))
        ctx.link(x, 1, np.arange(cin), out, 1, first_out[gi])
        ctx.link(out, 1, np.arange(cout), out, 1, first_out[go])
        ctx.pin(w, 1, "per-group width of a grouped conv")
    for d in range(2, _nd(w)):
        ctx.pin(w, d, "kernel dimension")
    for d in range(2, _nd(x)):
        ctx.pin(x, d, "spatial dimension")
        ctx.pin(out, d, "spatial dimension")


@rule("linear")
def linear(ctx, n: Node) -> None:
    x, w, out = n.args[0], n.args[1], n.out
    b = n.arg(2, "bias")
    ctx.same(x, -1, w, 1)
    ctx.same(out, -1, w, 0)
    if _t(b):
        ctx.same(b, 0, w, 0)
    for d in range(_nd(x) - 1):
        ctx.same(x, d, out, d)


def _matmul_dims(ctx, a: Value, b: Value, out: Value) -> None:
    ctx.same(a, -1, b, -2)
    ctx.same(a, -2, out, -2)
    ctx.same(b, -1, out, -1)
    for x in (a, b):
        off = _nd(out) - _nd(x)
        for d in range(_nd(x) - 2):
            if x.shape[d] == out.shape[d + off]:
                ctx.same(x, d, out, d + off)
            else:
                ctx.cover(x, d)
    for d in range(_nd(out) - 2):
        ctx.cover(out, d)


@rule("mm", "bmm", "matmul")
def matmul(ctx, n: Node) -> None:
    a, b = n.args[0], n.args[1]
    if _nd(a) < 2 or _nd(b) < 2:
        ctx.barrier("matmul with a vector operand")
        return
    _matmul_dims(ctx, a, b, n.out)


@rule("addmm", "baddbmm")
def addmm(ctx, n: Node) -> None:
    bias, a, b, out = n.args[0], n.args[1], n.args[2], n.out
    _matmul_dims(ctx, a, b, out)
    if _t(bias):
        off = _nd(out) - _nd(bias)
        for d in range(_nd(bias)):
            if bias.shape[d] == out.shape[d + off]:
                ctx.same(bias, d, out, d + off)
            else:
                ctx.cover(bias, d)


@rule("embedding")
def embedding(ctx, n: Node) -> None:
    w, idx, out = n.args[0], n.args[1], n.out
    ctx.same(w, 1, out, -1)
    ctx.pin(w, 0, "vocabulary dimension")
    for d in range(_nd(idx)):
        ctx.same(idx, d, out, d)


@rule(*SDPA_OPS)
def sdpa(ctx, n: Node) -> None:
    q, k, v = n.args[:3]
    out = n.outputs[0]
    mask = n.arg(3, "attn_mask")
    nd = _nd(q)
    for d in range(nd - 3):
        for x in (k, v, out):
            ctx.same(q, d, x, d)
    h = nd - 3
    hq, hk = q.shape[h], k.shape[h]
    ctx.same(q, h, out, h)
    ctx.same(k, h, v, h)
    if hq == hk:
        ctx.same(q, h, k, h)
    else:  # grouped-query attention: query head i reads key/value head i // (hq // hk)
        ctx.link(q, h, np.arange(hq), k, h, np.arange(hq) // (hq // hk))
    ctx.same(q, -2, out, -2)
    ctx.same(k, -2, v, -2)
    if ctx.b.head_dim:  # q . k contracts over the head width; the output has v's head width
        ctx.same(q, -1, k, -1)  # (compaction keeps the scale at 1/sqrt(original width))
        ctx.same(v, -1, out, -1)
    else:
        for x in (q, k, v, out):
            ctx.pin(x, -1, "head dimension (whole heads are pruned; prune-channels{head-dim=true} prunes it)")
    if _t(mask):  # broadcast to [..., heads, L, S]
        off = _nd(out) - _nd(mask)
        for d in range(_nd(mask)):
            od = d + off
            ref, rd = (k, _nd(k) - 2) if od == _nd(out) - 1 else (out, od)
            if od >= 0 and mask.shape[d] != 1 and mask.shape[d] == ref.shape[rd]:
                ctx.same(mask, d, ref, rd)
            else:
                ctx.cover(mask, d)
    for o in n.outputs[1:]:
        for d in range(_nd(o)):
            ctx.pin(o, d, "attention side output")


from . import channel_rules_reindex  # noqa: E402,F401  (registers the re-index rules)
