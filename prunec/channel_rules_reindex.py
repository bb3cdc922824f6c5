"""Channel rules for ops that move, select or create elements (re-index kind):
permute, reshapes, cat, split, slice, select, indexing, shuffles, factories.
Registered into ``prunec.channel_rules.RULES`` on import."""
from __future__ import annotations

import math

import numpy as np

from .head_views import factor_dim, head_atom

from .channel_rules import _nd, _t, rule
from .ir import Node

# ---- re-indexing ---------------------------------------------------------------

@rule("permute")
def permute(ctx, n: Node) -> None:
    x, out = n.args[0], n.out
    for i, d in enumerate(n.args[1]):
        ctx.same(x, d, out, i)


@rule("transpose", "t", "swapaxes")
def transpose(ctx, n: Node) -> None:
    x, out = n.args[0], n.out
    perm = list(range(_nd(x)))
    if n.op != "t" and _nd(x) > 1:
        a, b = n.args[1] % _nd(x), n.args[2] % _nd(x)
        perm[a], perm[b] = perm[b], perm[a]
    elif _nd(x) == 2:
        perm = [1, 0]
    for i, d in enumerate(perm):
        ctx.same(x, d, out, i)


def reshape_groups(src: tuple, dst: tuple) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims with equal products: ([0,1,2,3] -> [0,1]) for NCHW -> N,CHW."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        I, O, pi, po = [], [], 1, 1
        if i < len(src):
            I.append(i); pi *= src[i]; i += 1
        if j < len(dst):
            O.append(j); po *= dst[j]; j += 1
        while pi != po:
            if pi < po and i < len(src):
                I.append(i); pi *= src[i]; i += 1
            elif j < len(dst):
                O.append(j); po *= dst[j]; j += 1
            else:
                break
        while i < len(src) and src[i] == 1 and j == len(dst):
            I.append(i); i += 1
        while j < len(dst) and dst[j] == 1 and i == len(src):
            O.append(j); j += 1
        groups.append((I, O))
    return groups


def non_unit_groups(src: tuple, dst: tuple):
    """:func:`reshape_groups` with, per group, its dims longer than one: (I, O, real_i, real_o)."""
    for I, O in reshape_groups(src, dst):
        yield I, O, [d for d in I if src[d] > 1], [d for d in O if dst[d] > 1]


@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_copy",
      "_reshape_alias", "expand_dims")
def view(ctx, n: Node) -> None:
    x, out = n.args[0], n.out
    for I, O, real_i, real_o in non_unit_groups(x.shape, out.shape):
        for d in I:
            if d not in real_i:
                ctx.cover(x, d)
        for d in O:
            if d not in real_o:
                ctx.cover(out, d)
        if not real_i or not real_o:
            continue
        if len(real_i) == 1 and len(real_o) == 1:
            ctx.same(x, real_i[0], out, real_o[0])
            continue
        p = math.prod(x.shape[d] for d in real_i)
        f = np.arange(p)
        if n.name in ctx.b.head_views:
            # Attention heads in head-width mode: the innermost dim (the head width) carries the
            # channel, element d of it standing for every h*D + d; the head count is pinned.
            ii, oo = real_i[-1], real_o[-1]
            ctx.link(x, ii, f % x.shape[ii], out, oo, f % out.shape[oo])
            for d in real_i[:-1]:
                ctx.pin(x, d, "head count (head-dim mode prunes head widths)")
            for d in real_o[:-1]:
                ctx.pin(out, d, "head count (head-dim mode prunes head widths)")
            continue
        stack = ctx.b.stacked_views.get(n.name)
        if stack is not None and len(real_i) == 1 and real_o[0] == stack:
            # q/k/v packed in one projection, the stack axis only ever indexed: the dim after it
            # carries the channel for every part alike (whole heads of q, k and v together; for
            # [3E] -> [3, E] in nn.MultiheadAttention, element e of q, k and v)
            ctx.pin(out, stack, "q/k/v stack index")
            part = p // out.shape[stack]
            o1 = real_o[1]
            ctx.link(x, real_i[0], f, out, o1, (f % part) // (part // out.shape[o1]))
            for d in real_o[2:]:
                ctx.pin(out, d, "inner dimension of a reshape")
            continue
        hp = ctx.b.head_paths.get(n.name)
        atom = head_atom([x.shape[d] for d in real_i], [out.shape[d] for d in real_o], *hp) if hp else None
        if atom is not None:
            # attention heads merged with an outer dim (B*H): the heads carry the channel, head h
            # being every b*H + h; the outer dim (a batch) and the inner ones cannot shrink
            ii, ia = _holder(real_i, x.shape, atom, f)
            oo, ob = _holder(real_o, out.shape, atom, f)
            ctx.link(x, ii, ia, out, oo, ob)
            for d in real_i:
                if d != ii:
                    ctx.pin(x, d, "not the head factor of a merged heads dimension")
            for d in real_o:
                if d != oo:
                    ctx.pin(out, d, "not the head factor of a merged heads dimension")
            continue
        # Split or merge: the outermost dim carries the channel; removing index c
        # removes a contiguous block of the fused dim.  Inner dims cannot shrink.
        i0, o0 = real_i[0], real_o[0]
        ctx.link(x, i0, f // (p // x.shape[i0]), out, o0, f // (p // out.shape[o0]))
        for d in real_i[1:]:
            ctx.pin(x, d, "inner dimension of a reshape")
        for d in real_o[1:]:
            ctx.pin(out, d, "inner dimension of a reshape")


def _holder(dims: list[int], shape: tuple, atom: tuple[int, int], f: np.ndarray):
    """The dim among ``dims`` (one reshape group) that holds the factor ``atom`` = (stride, size), and
    that dim's index of each fused group element ``f``."""
    pos, suffix = factor_dim([shape[d] for d in dims], atom[0])
    d = dims[pos]
    return d, (f // suffix) % shape[d]


@rule("expand_as", "view_as")
def like(ctx, n: Node) -> None:
    """``x.expand_as(y)`` / ``x.view_as(y)``: the result has ``y``'s shape."""
    y, out = n.args[1], n.out
    for d in range(_nd(y)):
        ctx.same(y, d, out, d)
    (expand if n.op == "expand_as" else view)(ctx, n)


@rule("expand")
def expand(ctx, n: Node) -> None:
    x, out = n.args[0], n.out
    off = _nd(out) - _nd(x)
    for d in range(_nd(x)):
        if x.shape[d] == out.shape[d + off]:
            ctx.same(x, d, out, d + off)
        else:
            ctx.cover(x, d)
    for d in range(_nd(out)):
        ctx.cover(out, d)  # broadcast dims: the size argument is rewritten after pruning


@rule("cat", "concat")
def cat(ctx, n: Node) -> None:
    parts = [t for t in n.args[0] if _t(t)]
    out = n.out
    dim = n.arg(1, "dim", 0) % _nd(out)
    off = 0
    for t in parts:
        size = t.shape[dim]
        ctx.link(t, dim, np.arange(size), out, dim, off + np.arange(size))
        off += size
        for d in range(_nd(t)):
            if d != dim:
                ctx.same(t, d, out, d)


@rule("split", "split_with_sizes", "unsafe_split", "split_with_sizes_copy", "chunk", "unsafe_chunk")
def split(ctx, n: Node) -> None:
    x = n.args[0]
    dim = n.arg(2, "dim", 0) % _nd(x)
    off = 0
    for o in n.outputs:
        size = o.shape[dim]
        ctx.link(o, dim, np.arange(size), x, dim, off + np.arange(size))
        off += size
        for d in range(_nd(x)):
            if d != dim:
                ctx.same(x, d, o, d)


@rule("unbind")
def unbind(ctx, n: Node) -> None:
    x = n.args[0]
    dim = n.arg(1, "dim", 0) % _nd(x)
    ctx.pin(x, dim, "unbound dimension")
    for o in n.outputs:
        od = 0
        for d in range(_nd(x)):
            if d != dim:
                ctx.same(x, d, o, od)
                od += 1


def slice_bounds(size: int, start, end, step) -> tuple[int, int, int]:
    start = 0 if start is None else start
    end = size if end is None else end
    start = max(0, min(size, start + size if start < 0 else start))
    end = max(start, min(size, end + size if end < 0 else end))
    return start, end, step or 1


@rule("slice")
def slice_(ctx, n: Node) -> None:
    x, out = n.args[0], n.out
    dim = n.arg(1, "dim", 0) % _nd(x)
    start, _, step = slice_bounds(x.shape[dim], n.arg(2, "start"), n.arg(3, "end"), n.arg(4, "step", 1))
    for d in range(_nd(x)):
        if d != dim:
            ctx.same(x, d, out, d)
    if step != 1:
        ctx.pin(x, dim, "strided slice")
        ctx.pin(out, dim, "strided slice")
        return
    m = out.shape[dim]
    ctx.link(x, dim, start + np.arange(m), out, dim, np.arange(m))


@rule("select")
def select(ctx, n: Node) -> None:
    x, out = n.args[0], n.out
    dim = n.args[1] % _nd(x)
    index = n.args[2] % x.shape[dim]
    ctx.pin_elements(x, dim, [index], "selected element")
    od = 0
    for d in range(_nd(x)):
        if d != dim:
            ctx.same(x, d, out, od)
            od += 1


@rule("index_select")
def index_select(ctx, n: Node) -> None:
    x, dim, idx = n.args[0], n.args[1] % _nd(n.args[0]), n.args[2]
    out = n.out
    for d in range(_nd(x)):
        if d != dim:
            ctx.same(x, d, out, d)
    if idx.is_const:
        ids = ctx.b.graph_tensors[idx.name].numpy().astype(np.int64) % x.shape[dim]
        ctx.link(x, dim, ids, out, dim, np.arange(len(ids)))
        ctx.pin(idx, 0, "index values")
    else:
        ctx.pin(x, dim, "computed indices")
        ctx.pin(out, dim, "computed indices")
        ctx.pin(idx, 0, "computed indices")


@rule("index")
def index(ctx, n: Node) -> None:
    x, indices, out = n.args[0], n.args[1], n.out
    if len(indices) != 1 or not _t(indices[0]):
        ctx.barrier("advanced indexing beyond the first dimension")
        return
    k = _nd(indices[0])
    ctx.pin(x, 0, "indexed dimension")
    for d in range(k):
        ctx.pin(out, d, "index result dimension")
        ctx.pin(indices[0], d, "index values")
    for d in range(1, _nd(x)):
        ctx.same(x, d, out, k + d - 1)


@rule("pixel_shuffle", "pixel_unshuffle")
def pixel_shuffle(ctx, n: Node) -> None:
    x, out = n.args[0], n.out
    r2 = n.args[1] ** 2
    big, small = (x, out) if n.op == "pixel_shuffle" else (out, x)
    c = big.shape[-3]
    ctx.link(big, -3, np.arange(c), small, -3, np.arange(c) // r2)
    for d in range(_nd(x) - 3):
        ctx.same(x, d, out, d)
    for d in (-2, -1):
        ctx.pin(x, d, "spatial dimension")
        ctx.pin(out, d, "spatial dimension")


@rule("stack")
def stack(ctx, n: Node) -> None:
    out = n.out
    dim = n.arg(1, "dim", 0) % _nd(out)
    ctx.pin(out, dim, "stacked dimension")
    for t in n.args[0]:
        for d in range(_nd(t)):
            ctx.same(t, d, out, d if d < dim else d + 1)


@rule("cumsum", "cumprod", "flip", "roll", "tril", "triu", "sort", "topk")
def along_dims(ctx, n: Node) -> None:
    """Ops that mix elements along some dims: those are pinned, the rest pass through."""
    x = n.args[0]
    if n.op in ("tril", "triu"):
        dims = {_nd(x) - 2, _nd(x) - 1}
    elif n.op in ("flip",):
        dims = {d % _nd(x) for d in n.args[1]}
    elif n.op == "roll":
        dims = {d % _nd(x) for d in (n.arg(2, "dims") or range(_nd(x)))}
    elif n.op == "topk":
        dims = {n.arg(2, "dim", -1) % _nd(x)}
    else:
        dims = {n.arg(1, "dim", -1) % _nd(x)}
    for o in n.outputs:
        for d in range(_nd(x)):
            if d in dims:
                ctx.pin(x, d, f"mixed by {n.op}")
                ctx.pin(o, d, f"mixed by {n.op}")
            else:
                ctx.same(x, d, o, d)


@rule("arange", "zeros", "ones", "full", "empty", "scalar_tensor", "zeros_like", "ones_like", "full_like",
      "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "rand", "randn", "rand_like",
      "randn_like", "tensor", "linspace")
def factory(ctx, n: Node) -> None:
    """Created tensors carry no channels: pin them (the size arguments are literal)."""
    for v in n.inputs():
        for d in range(_nd(v)):
            ctx.cover(v, d)
    for o in n.outputs:
        for d in range(_nd(o)):
            ctx.pin(o, d, f"created by {n.op}")


@rule("_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range_for_size")
def assertion(ctx, n: Node) -> None:
    for v in n.inputs():
        for d in range(_nd(v)):
            ctx.cover(v, d)
