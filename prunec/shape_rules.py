"""Hand-written shape rules for ops whose meta kernels are slow.

Shape propagation runs every op on meta tensors (``prunec.shapes``).  Most meta
kernels are C++ and cost microseconds, but some are Python decompositions or
Python references costing 0.2-2.5 ms a call (element-wise ops, ``linear`` with a
bias, pooling, reductions, norms, ``cat``), ``conv2d`` costs 0.05-0.1 ms and is the
most frequent op of a CNN, and a pruning call propagates shapes over the whole
graph after every pass.  A rule here gives the same result as the
meta kernel (shape, strides, dtype) for the common, unambiguous case, and
returns ``None`` for everything else -- operands by keyword, layouts other than
plain contiguous, mixed dtypes, operands that do not fit -- so the meta kernel
decides those and raises its own error on a broken IR.  ``tests/test_shapes.py``
checks each rule against the meta kernel on layouts of both kinds.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten
_CL = torch.channels_last


def _dense(x) -> bool:
    """Floating and dense in the standard or the channels-last layout."""
    return isinstance(x, torch.Tensor) and x.dtype.is_floating_point and (
        x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=_CL)))


def _plain(x) -> bool:
    """Floating, contiguous, and not also channels-last contiguous (a 4-d tensor with one channel
    or a 1x1 image is both, and meta kernels pick their output layout from that)."""
    return isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.is_contiguous() and not (
        x.dim() == 4 and x.is_contiguous(memory_format=_CL))


def _fits(p, x: torch.Tensor, shape) -> bool:
    """An optional parameter (bias, norm weight) that is absent, or a tensor of x's dtype and this shape."""
    return p is None or (isinstance(p, torch.Tensor) and p.dtype == x.dtype and tuple(p.shape) == tuple(shape))


def _new(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


# ---- ops whose output is laid out like their input --------------------------------------

def _unary(*args, **kwargs):
    if not args or kwargs.keys() - {"approximate"}:  # operands by keyword: the meta kernel decides
        return None
    x, scalars = args[0], (*args[1:], *kwargs.values())
    if not _dense(x) or any(isinstance(a, torch.Tensor) for a in scalars):
        return None
    return torch.empty_like(x)


def _batch_norm(*args, **kwargs):
    if len(args) < 6 or kwargs:
        return None
    x, weight, bias, running_mean, running_var, training = args[:6]
    if training or not _dense(x) or x.dim() < 2:
        return None
    c = x.shape[1]
    for what, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.shape[0] != c):
            raise RuntimeError(f"{what} should contain {c} elements not {t.numel()}")
    return torch.empty_like(x)


SAME_AS_INPUT = {op: _unary for op in (
    aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.hardswish.default,
    aten.hardsigmoid.default, aten.sigmoid.default, aten.silu.default, aten.gelu.default,
    aten.tanh.default, aten.clamp.default, aten.dropout.default, aten.leaky_relu.default,
    aten.elu.default, aten.mish.default, aten.softplus.default)}
SAME_AS_INPUT[aten.batch_norm.default] = _batch_norm


# ---- ops that compute a new shape ------------------------------------------------------

def _binary(*args, **kwargs):
    """add / sub / mul / div of two contiguous tensors of one dtype, one of them plain and of the
    output's shape (its layout sets the output's), or of a tensor and a Python number."""
    if len(args) != 2 or kwargs:  # alpha=, rounding_mode=
        return None
    a, b = args
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return torch.empty_like(a) if _plain(a) else None
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype \
            or not a.dtype.is_floating_point or not (a.is_contiguous() and b.is_contiguous()):
        return None
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        return None
    if not any(t.shape == shape and _plain(t) for t in (a, b)):  # else TensorIterator's stride order decides
        return None
    return _new(shape, a)


def _pair(v) -> tuple[int, int] | None:
    if isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(isinstance(i, int) for i in v):
        return (v[0], v[-1])
    return None


def _conv2d(*args, **kwargs):
    """A 2-d convolution of a plain NCHW input: the output is contiguous NCHW."""
    if kwargs or not 2 <= len(args) <= 7:
        return None
    x, w, bias, stride, padding, dilation, groups = (*args, *(None, [1], [0], [1], 1)[len(args) - 2:])
    if not _plain(x) or x.dim() != 4 or not isinstance(w, torch.Tensor) or w.dim() != 4 or w.dtype != x.dtype:
        return None
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)  # padding="same": meta
    if None in (stride, padding, dilation) or not isinstance(groups, int) or groups < 1:
        return None
    cout = w.shape[0]
    if x.shape[1] != w.shape[1] * groups or cout % groups or cout == 0:
        return None
    if not _fits(bias, x, (cout,)):
        return None
    if min(stride) < 1 or min(padding) < 0 or min(dilation) < 1:
        return None
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    if min(size) < 1:
        return None
    return _new((x.shape[0], cout, *size), x)


def _linear(*args, **kwargs):
    if kwargs or len(args) not in (2, 3):
        return None
    x, w = args[0], args[1]
    bias = args[2] if len(args) == 3 else None
    if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.dtype.is_floating_point and x.is_contiguous()):
        return None
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != x.dtype or x.shape[-1] != w.shape[1]:
        return None
    if not _fits(bias, x, (w.shape[0],)):
        return None
    return _new((*x.shape[:-1], w.shape[0]), x)


def _adaptive_avg_pool2d(*args, **kwargs):
    if kwargs or len(args) != 2:
        return None
    x, size = args
    if not _plain(x) or x.dim() not in (3, 4) or any(s == 0 for s in x.shape[1:]):
        return None
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        return None
    return _new((*x.shape[:-2], *size), x)


def _reduced_dims(x: torch.Tensor, dims) -> set[int] | None:
    if not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims):
        return None  # None or [] (every dim): the meta kernel decides
    n = x.dim()
    if any(not -n <= d < n for d in dims):
        return None
    out = {d % n for d in dims}
    return out if len(out) == len(dims) else None  # a repeated dim is an error: meta says so


def _mean_dim(*args, **kwargs):
    if kwargs or len(args) not in (2, 3):
        return None
    x, dims = args[0], args[1]
    keepdim = args[2] if len(args) == 3 else False
    if not _plain(x) or x.dim() == 0 or not isinstance(keepdim, bool):
        return None
    red = _reduced_dims(x, dims)
    if red is None:
        return None
    shape = [1 if i in red else s for i, s in enumerate(x.shape) if keepdim or i not in red]
    return _new(shape, x)


def _layer_norm(*args, **kwargs):
    if kwargs or len(args) < 2:
        return None
    x, shape = args[0], args[1]
    weight = args[2] if len(args) > 2 else None
    bias = args[3] if len(args) > 3 else None
    if not _plain(x) or not isinstance(shape, (list, tuple)) or not shape:
        return None
    k = len(shape)
    if x.dim() < k or list(x.shape[-k:]) != list(shape):
        return None
    if not (_fits(weight, x, shape) and _fits(bias, x, shape)):
        return None
    return torch.empty_like(x)


def _cat(*args, **kwargs):
    if kwargs or len(args) not in (1, 2):
        return None
    ts = args[0]
    dim = args[1] if len(args) == 2 else 0
    if not isinstance(ts, (list, tuple)) or not ts or not isinstance(dim, int):
        return None
    first = ts[0]
    if not all(_plain(t) and t.dtype == first.dtype and t.dim() == first.dim() for t in ts) or first.dim() == 0:
        return None
    n = first.dim()
    if not -n <= dim < n:
        return None
    dim %= n
    for t in ts[1:]:
        if any(t.shape[i] != first.shape[i] for i in range(n) if i != dim):
            return None
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in ts)
    return _new(shape, first)


RULES = dict(SAME_AS_INPUT)
RULES.update({op: _binary for op in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)})
RULES.update({
    aten.conv2d.default: _conv2d,
    aten.linear.default: _linear,
    aten.adaptive_avg_pool2d.default: _adaptive_avg_pool2d,
    aten.mean.dim: _mean_dim,
    aten.layer_norm.default: _layer_norm,
    aten.cat.default: _cat,
})
