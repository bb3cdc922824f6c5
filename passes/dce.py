"""dce: remove ops whose results are never used, then unused parameters."""
from __future__ import annotations

from prunec.registry import PassResult, register_pass

# ATen ops here are functional (the frontend functionalizes), so any op whose
# results are unused can go; these few are kept for their side effects.
_SIDE_EFFECTS = {"_assert_async", "_print", "copy_"}


def eliminate_dead_code(graph, consts: bool = True) -> tuple[int, int]:
    live = set(graph.outputs)
    keep = []
    for n in reversed(graph.nodes):
        if n.op in _SIDE_EFFECTS or any(o in live for o in n.outputs):
            keep.append(n)
            live.update(n.inputs())
    removed = len(graph.nodes) - len(keep)
    graph.nodes = keep[::-1]
    dead_consts = graph.remove_unused_consts() if consts else []
    for name in dead_consts:
        graph.annotations.pop(name, None)
    return removed, len(dead_consts)


@register_pass("dce", summary="Remove ops whose results are unused and constants nothing reads.", options={})
def dce(graph, am):
    nodes, consts = eliminate_dead_code(graph)
    return PassResult(bool(nodes or consts), {"nodes-removed": nodes, "constants-removed": consts})
