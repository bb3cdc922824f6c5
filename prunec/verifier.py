"""The IR verifier (run after every pass by default, like MLIR's).

Checks: every use is defined before it is used, names are unique, every
constant's Value matches its tensor, and every op accepts its operands with the
recorded result shapes and dtypes (checked on meta tensors, so it is cheap).
"""
from __future__ import annotations

from .errors import IRError
from .ir import Graph
from .printer import type_str
from .shapes import propagate


def verify(g: Graph, check_shapes: bool = True) -> None:
    """``check_shapes=False`` skips re-running every op on meta tensors: the pass
    manager uses it right after ``propagate`` rewrote those shapes (the same work)."""
    defined = set(g.inputs) | set(g.consts.values())
    names: set[str] = set()
    for v in defined:
        if v.name in names:
            raise IRError(f"value name {v!r} is defined twice")
        names.add(v.name)
    for name, v in g.consts.items():
        if name not in g.tensors:
            raise IRError(f"constant {v!r} has no tensor")
        t = g.tensors[name]
        if tuple(t.shape) != v.shape or t.dtype != v.dtype:
            raise IRError(f"constant {v!r} is declared {type_str(v)} but holds "
                          f"{list(t.shape)} {t.dtype}: the op reading it would see the wrong shape")
    for n in g.nodes:
        for v in n.inputs():
            if v not in defined:
                raise IRError(f"node %{n.name} ({n.op}) uses {v!r} before it is defined", node=n.name)
        for o in n.outputs:
            if o.name in names:
                raise IRError(f"value name {o!r} is defined twice", node=n.name)
            if o.producer is not n:
                raise IRError(f"value {o!r} does not point back at its producer %{n.name}", node=n.name)
            names.add(o.name)
            defined.add(o)
    for v in g.outputs:
        if v not in defined:
            raise IRError(f"graph output {v!r} is not defined")
    if not check_shapes:
        return
    found = propagate(g, update=False)
    for v, (shape, dtype) in found.items():
        if shape != v.shape or dtype != v.dtype:
            n = v.producer
            raise IRError(f"node %{n.name} ({n.op}) declares {type_str(v)} but its operands give "
                          f"{list(shape)} {dtype}", node=n.name)
