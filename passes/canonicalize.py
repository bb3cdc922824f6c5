"""canonicalize: remove no-op ops so later passes see a clean graph.

Each rewrite here is value-preserving bit for bit: an identity view, a dropout
in inference, a full-range slice, a same-shape expand, alias/detach/clone, a
view of a view, and assertion nodes.
"""
from __future__ import annotations

from prunec.registry import PassResult, register_pass

_IDENTITY_OPS = {"alias", "detach", "lift_fresh_copy"}
_VIEW_OPS = {"view", "reshape", "_unsafe_view"}
_ASSERTS = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}
BIG = 2 ** 62


def _forward_of(n, users_of):
    """The value an op is equivalent to, or None if it is not a no-op."""
    op = n.op
    if not n.outputs or not n.args:
        return None
    x = n.args[0]
    shape = getattr(x, "shape", None)
    if op in _IDENTITY_OPS:
        return x
    if op == "clone" and n.kwargs.get("memory_format") is None:
        return x
    if op == "dropout" and not n.arg(2, "train", False):
        return x
    if op in _VIEW_OPS:
        if tuple(n.out.shape) == tuple(shape):
            return x
    if op == "expand" and tuple(n.out.shape) == tuple(shape):
        return x
    if op == "slice" and n.out.shape == shape:
        step = n.arg(4, "step", 1)
        start = n.arg(2, "start", None)
        if step == 1 and start in (None, 0):
            return x
    return None


def canonicalize_once(graph) -> dict:
    stats = {"ops-removed": 0, "views-merged": 0, "asserts-removed": 0}
    users = graph.users()
    keep = []
    for n in graph.nodes:
        if n.op in _ASSERTS and all(not users.get(o) for o in n.outputs):
            stats["asserts-removed"] += 1
            continue
        fwd = _forward_of(n, users)
        if fwd is not None and fwd.dtype == n.out.dtype:
            graph.replace_uses(n.out, fwd)
            stats["ops-removed"] += 1
            continue
        if n.op in _VIEW_OPS and n.args[0].producer is not None and n.args[0].producer.op in _VIEW_OPS:
            # view(view(x, a), b) == view(x, b): both are views of contiguous data
            inner = n.args[0].producer
            if inner.op == "view" and n.op == "view":
                n.args = (inner.args[0],) + tuple(n.args[1:])
                stats["views-merged"] += 1
        keep.append(n)
    graph.nodes = keep
    return stats


@register_pass("canonicalize", summary="Remove no-op ops (identity views, inference dropout, full slices, "
               "alias/clone, asserts) and merge view chains.", options={})
def canonicalize(graph, am):
    from .dce import eliminate_dead_code
    total = {"ops-removed": 0, "views-merged": 0, "asserts-removed": 0}
    while True:
        stats = canonicalize_once(graph)
        for k, v in stats.items():
            total[k] += v
        if not any(stats.values()):
            break
    dead, _ = eliminate_dead_code(graph, consts=False)
    total["ops-removed"] += dead
    return PassResult(any(total.values()), total)
