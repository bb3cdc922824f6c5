"""Find the reshapes that split a projection into attention heads (``[.., H*D] -> [.., H, D]``)
and merge them back after attention (``[.., H, Dv] -> [.., H*Dv]``).

The dependency analysis normally lets the outer factor of such a reshape carry
the channel (whole heads are removable, the head width is pinned).  With
``head_dim=True`` it lets the inner factor carry it instead at exactly these
reshapes: head-width element ``d`` is then the same channel in every head, so
removing it takes rows ``h*D + d`` of the projection for all ``h``.

Found by walking from each ``scaled_dot_product_attention`` operand back to the
first reshape whose input is wider than the head width (through transposes,
rotary embeddings and the like: any op with an operand of the head width), and
from its output forward through transposes to the merging reshape.  An
attention whose reshapes are not found keeps a pinned head width.

The same walks (also from attentions spelled out as ``bmm`` + ``softmax`` +
``bmm``) record every reshape on their way with the head count and width:
where one merges the heads with an outer dim (``nn.MultiheadAttention`` with
batch B: ``[L, B, H*D] -> [L, B*H, D]``), :func:`head_atom` finds the head
factor so that the heads, not the batch, carry the channel.
"""
from __future__ import annotations

from collections import defaultdict

from .ir import Graph, Value

SDPA_OPS = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu")
_VIEWS = {"view", "reshape", "_unsafe_view", "unflatten", "view_copy", "_reshape_alias"}
_COPIES = {"contiguous", "clone", "_to_copy", "alias", "detach"}
_LAYOUT = _COPIES | {"transpose", "permute", "swapaxes"}
_MAX_DEPTH = 24


def _consumers(graph: Graph) -> dict[int, list]:
    """{id(value): the nodes reading it}."""
    out = defaultdict(list)
    for n in graph.nodes:
        for v in n.inputs():
            out[id(v)].append(n)
    return out


def _splits(src: Value, width: int) -> bool:
    return bool(src.shape) and src.shape[-1] != width and src.shape[-1] % width == 0


def head_reshapes(graph: Graph) -> tuple[set[str], dict[str, tuple[int, int]]]:
    """The reshapes around every attention, found in one walk: (names of the split and merge reshapes,
    {name: (head count, head width)} for every reshape between an attention and its projections,
    the ones passed on the way included)."""
    producer = {id(o): n for n in graph.nodes for o in n.outputs}
    consumers = _consumers(graph)
    found: set[str] = set()
    paths: dict[str, tuple[int, int]] = {}
    for n in graph.nodes:
        if n.op not in SDPA_OPS:
            continue
        q = n.args[0]
        heads = q.shape[-3] if isinstance(q, Value) and q.shape and len(q.shape) >= 3 else 0
        for x in n.args[:3]:
            if isinstance(x, Value) and x.shape:
                seen: set[str] = set()
                _walk_back(x, x.shape[-1], producer, found, seen)
                paths.update({name: (heads, x.shape[-1]) for name in seen})
        out = n.outputs[0]
        if out.shape:
            seen = set()
            _walk_forward(out, out.shape[-1], consumers, found, seen)
            paths.update({name: (heads, out.shape[-1]) for name in seen})
    by_name = {m.name: m for m in graph.nodes}
    for q, k, v, weights, out in _bmm_attentions(graph, producer, consumers):
        # attention spelled out (Hugging Face "eager" attention, nn.MultiheadAttention with
        # need_weights=True): its scale is an op of its own with the original width baked in,
        # so head-width mode keeps the math as with SDPA
        width, mine, seen = q.shape[-1], set(), set()
        for x in (q, k, v):
            if isinstance(x, Value) and x.shape and x.shape[-1] == width:
                _walk_back(x, width, producer, mine, seen)
        _walk_forward(out, width, consumers, mine, seen)
        # the attention weights may leave too ([B*H, L, S] -> [B, H, L, S], averaged over heads)
        _walk_forward(weights, weights.shape[-1], consumers, set(), seen)
        # no head axis to read the count from ([B*H, L, D]): the split reshape's input width / D
        widths = [by_name[m].args[0].shape[-1] for m in sorted(mine) if _splits(by_name[m].args[0], width)]
        if widths:
            paths.update({name: (widths[0] // width, width) for name in seen})
        found |= mine
    return found, paths


_BMM = ("bmm", "baddbmm", "matmul")
_SOFTMAX = ("softmax", "_softmax", "_safe_softmax")
# between q @ k^T and the softmax: scale, mask, casts (Hugging Face eager attention has mul, add)
_SCORE_OPS = ("mul", "div", "add", "sub", "masked_fill", "where", "to", "_to_copy")
# between the softmax and weights @ v: casts and (inference) dropout
_WEIGHT_OPS = ("to", "_to_copy", "dropout", "clone", "contiguous", "alias", "detach", "type_as")
_CHAIN = 4


def bmm_attentions(graph: Graph):
    """(q, k, v, weights, output) of every attention spelled out with matmuls (see below)."""
    producer = {id(o): n for n in graph.nodes for o in n.outputs}
    return list(_bmm_attentions(graph, producer, _consumers(graph)))


def _bmm_attentions(graph: Graph, producer: dict, consumers: dict):
    """(q, k, v, weights, output) of every ``bmm(weights = softmax(bmm(q, k^T) [* scale, + mask]), v)``."""
    for n in graph.nodes:
        if n.op not in _SOFTMAX or not isinstance(n.args[0], Value):
            continue
        scores = producer.get(id(n.args[0]))
        for _ in range(_CHAIN):
            if scores is None or scores.op not in _SCORE_OPS:
                break
            # the operand that continues the chain (a mask or scale operand leads elsewhere)
            nxt = [producer.get(id(a)) for a in scores.args if isinstance(a, Value)]
            nxt = [m for m in nxt if m is not None and (m.op in _BMM or m.op in _SCORE_OPS)]
            scores = nxt[0] if nxt else None
        if scores is None or scores.op not in _BMM:
            continue
        q, kt = scores.args[-2], scores.args[-1]
        t = producer.get(id(kt)) if isinstance(kt, Value) else None
        if t is None or t.op not in ("transpose", "permute") or not isinstance(q, Value) or len(q.shape) < 3:
            continue
        k = t.args[0]
        w = n.outputs[0]
        for _ in range(_CHAIN):
            users = consumers.get(id(w), ())
            mm = [m for m in users if m.op in _BMM and m.args[-2] is w and isinstance(m.args[-1], Value)]
            if mm:
                yield q, k, mm[0].args[-1], n.outputs[0], mm[0].outputs[0]
                break
            casts = [m for m in users if m.op in _WEIGHT_OPS]
            if len(casts) != 1:
                break
            w = casts[0].outputs[0]


def _walk_back(x: Value, width: int, producer: dict, found: set, seen_views: set) -> None:
    stack, seen = [(x, 0)], set()
    while stack:
        v, depth = stack.pop()
        if id(v) in seen or depth > _MAX_DEPTH:
            continue
        seen.add(id(v))
        m = producer.get(id(v))
        if m is None:
            continue  # a graph input or a constant
        if m.op in _VIEWS:
            seen_views.add(m.name)
            src = m.args[0]
            if _splits(src, width):
                found.add(m.name)
            else:
                stack.append((src, depth + 1))
            continue
        for a in m.inputs():
            if not a.is_const and a.shape and a.shape[-1] == width:
                stack.append((a, depth + 1))


def _walk_forward(x: Value, width: int, consumers: dict, found: set, seen_views: set) -> None:
    stack = [(x, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > _MAX_DEPTH:
            continue
        for m in consumers.get(id(v), ()):
            if m.op in _VIEWS and m.outputs[0].shape and _splits(m.outputs[0], width):
                found.add(m.name)
                seen_views.add(m.name)
            elif m.op in _LAYOUT or (m.op in _VIEWS and m.outputs[0].shape[-1:] == (width,)):
                if m.op in _VIEWS:
                    seen_views.add(m.name)
                stack.append((m.outputs[0], depth + 1))


def head_atom(sizes_in: list[int], sizes_out: list[int], heads: int, width: int) -> tuple[int, int] | None:
    """(stride, size) of the head factor inside one reshape group, when it is not the outermost factor
    (else None: the default rule, outermost carries, already keeps whole heads).

    The group's factors are the common refinement of both sides' dims; the head factor is the one just
    outside the head width, or, in a group without the width, an innermost factor of the head count
    (heads are the inner part of a merged ``B*H``)."""
    bounds = set()
    for sizes in (sizes_in, sizes_out):
        p = 1
        bounds.add(p)
        for s in reversed(sizes):
            p *= s
            bounds.add(p)
    cuts = sorted(bounds, reverse=True)
    if any(a % b for a, b in zip(cuts, cuts[1:])):
        return None  # not a clean refinement
    factors = [(b, a // b) for a, b in zip(cuts, cuts[1:])]  # (stride, size), outermost first
    if len(factors) < 2:
        return None
    if factors[-1][1] == width:
        k = len(factors) - 2
    elif factors[-1][1] == heads:
        k = len(factors) - 1
    else:
        return None
    if k <= 0 or factors[k][1] != heads:
        return None
    has_width = factors[-1][1] == width and k == len(factors) - 2
    for sizes in (sizes_in, sizes_out):
        span = _span(sizes, factors, k)
        if has_width and len(factors) - 1 in span and min(span) < k:
            # the outer factor lives in the projection's own width (q/k/v stacked in one [3*H*D]):
            # that is the packed-heads case, opt-in through stacked_views
            return None
    return factors[k]


def factor_dim(sizes: list[int], stride: int) -> tuple[int, int]:
    """(position in ``sizes``, that dim's stride) of the dim of a reshape group, sizes outermost first,
    that holds the factor of stride ``stride``."""
    suffix = 1
    for pos in range(len(sizes) - 1, -1, -1):
        if suffix <= stride < suffix * sizes[pos]:
            return pos, suffix
        suffix *= sizes[pos]
    raise ValueError(f"no dim of {sizes} holds stride {stride}")


def _span(sizes: list[int], factors: list[tuple[int, int]], k: int) -> set[int]:
    """Indices of the factors held by the dim (of one side) that holds factor ``k``."""
    pos, suffix = factor_dim(sizes, factors[k][0])
    return {j for j, (st, _) in enumerate(factors) if suffix <= st < suffix * sizes[pos]}


def stacked_views(graph: Graph) -> dict[str, int]:
    """{reshape node name: output dim of its stack axis} for every reshape that splits one dim into
    a small stack axis followed by the parts, where every use of the stack axis is an index."""
    from .channel_rules_reindex import non_unit_groups
    consumers = _consumers(graph)
    out_dims: dict[str, int] = {}
    for n in graph.nodes:
        if n.op not in _VIEWS or not n.args or not isinstance(n.args[0], Value):
            continue
        x, out = n.args[0], n.outputs[0]
        if not x.shape or not out.shape:
            continue
        for _, _, real_i, real_o in non_unit_groups(x.shape, out.shape):
            if len(real_i) != 1 or len(real_o) < 2:
                continue  # not a split of one dim into several
            s = real_o[0]
            if 2 <= out.shape[s] <= 4 and _only_indexed(out, s, consumers, graph):
                out_dims[n.name] = s
    return out_dims


def _only_indexed(v: Value, d: int, consumers: dict, graph: Graph, depth: int = 0) -> bool:
    """Every path from ``v`` ends in a select or unbind of dim ``d`` (through layout ops)."""
    if depth > _MAX_DEPTH or any(o is v for o in graph.outputs):
        return False
    uses = consumers.get(id(v), ())
    if not uses:
        return False
    for m in uses:
        nd = len(v.shape)
        if m.op in _COPIES:
            nxt = d
        elif m.op == "permute":
            nxt = [p % nd for p in m.args[1]].index(d)
        elif m.op in ("transpose", "swapaxes"):
            a, b = m.args[1] % nd, m.args[2] % nd
            nxt = b if d == a else a if d == b else d
        elif m.op == "unsqueeze":
            u = m.args[1] % (nd + 1)
            nxt = d + 1 if u <= d else d
        elif m.op == "squeeze" and len(m.args) > 1:
            dims = m.args[1] if isinstance(m.args[1], (list, tuple)) else [m.args[1]]
            dims = [q % nd for q in dims if v.shape[q % nd] == 1]
            if d in dims:
                return False
            nxt = d - sum(q < d for q in dims)
        elif m.op == "select" and m.args[0] is v:
            sd = m.args[1] % nd
            if sd == d:
                continue
            nxt = d - (sd < d)
        elif m.op == "unbind" and m.args[0] is v and m.arg(1, "dim", 0) % nd == d:
            continue
        else:
            return False
        if not _only_indexed(m.outputs[0], nxt, consumers, graph, depth + 1):
            return False
    return True
