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
"""
from __future__ import annotations

from collections import defaultdict

from .ir import Graph, Value

SDPA_OPS = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu")
_VIEWS = {"view", "reshape", "_unsafe_view", "unflatten", "view_copy", "_reshape_alias"}
_LAYOUT = {"transpose", "permute", "contiguous", "clone", "_to_copy", "alias", "detach", "swapaxes"}
_MAX_DEPTH = 24


def _splits(src: Value, width: int) -> bool:
    return bool(src.shape) and src.shape[-1] != width and src.shape[-1] % width == 0


def head_reshapes(graph: Graph) -> set[str]:
    """Names of the split and merge reshape nodes around every attention."""
    producer = {id(o): n for n in graph.nodes for o in n.outputs}
    consumers = defaultdict(list)
    for n in graph.nodes:
        for v in n.inputs():
            consumers[id(v)].append(n)
    found: set[str] = set()
    for n in graph.nodes:
        if n.op not in SDPA_OPS:
            continue
        for x in n.args[:3]:
            if isinstance(x, Value) and x.shape:
                _walk_back(x, x.shape[-1], producer, found)
        out = n.outputs[0]
        if out.shape:
            _walk_forward(out, out.shape[-1], consumers, found)
    return found


def _walk_back(x: Value, width: int, producer: dict, found: set) -> None:
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
            src = m.args[0]
            if _splits(src, width):
                found.add(m.name)
            else:
                stack.append((src, depth + 1))
            continue
        for a in m.inputs():
            if not a.is_const and a.shape and a.shape[-1] == width:
                stack.append((a, depth + 1))


def _walk_forward(x: Value, width: int, consumers: dict, found: set) -> None:
    stack = [(x, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > _MAX_DEPTH:
            continue
        for m in consumers.get(id(v), ()):
            if m.op in _VIEWS and m.outputs[0].shape and _splits(m.outputs[0], width):
                found.add(m.name)
            elif m.op in _LAYOUT or (m.op in _VIEWS and m.outputs[0].shape[-1:] == (width,)):
                stack.append((m.outputs[0], depth + 1))
