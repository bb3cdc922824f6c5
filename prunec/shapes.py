"""Shape and dtype propagation by running every op on meta tensors.

Meta tensors carry shape and dtype but no data, and ATen's own shape functions
give the result: no shape rule is written by hand, except for a closed list of
ops whose meta kernels are slow Python code (``prunec.shape_rules``), where a
rule covers the common case and leaves the rest to the meta kernel.
"""
from __future__ import annotations

from typing import Any

import torch

from .ir import Graph, Node, Value, map_values, bind_results, call_node
from .errors import IRError
from .shape_rules import RULES


def _meta(v: Value) -> torch.Tensor:
    return torch.empty(v.shape, dtype=v.dtype, device="meta")


_META = torch.device("meta")


def infer_node(node: Node, env: dict[Value, Any]) -> Any:
    for v in node.inputs():
        if v not in env:
            raise IRError(f"node %{node.name} ({node.op}) uses {v!r} before it is defined", node=node.name)
    try:
        rule = RULES.get(node.target)
        if rule is not None:
            out = rule(*map_values(node.args, lambda v: env[v]), **map_values(node.kwargs, lambda v: env[v]))
            if out is not None:
                return out
        if node.op in ("view", "_unsafe_view") and isinstance(node.args[1], (list, tuple)):  # not view.dtype
            # Meta kernels do not always reproduce real output strides (sdpa's
            # output), so a legal view can look illegal here; shapes are identical.
            x = env[node.args[0]]
            return torch.ops.aten.reshape.default(x, node.args[1])
        if "device" in node.kwargs or any(isinstance(a, torch.device) for a in node.args):
            # factory ops (arange) and .to(device): keep everything on meta
            args = tuple(_META if isinstance(a, torch.device) else env[a] if isinstance(a, Value) else a
                         for a in node.args)
            kwargs = {k: _META if k == "device" else env[v] if isinstance(v, Value) else v
                      for k, v in node.kwargs.items()}
            return node.target(*map_values(args, lambda v: env[v]), **kwargs)
        return call_node(node, env)
    except Exception as e:  # the op rejects its operands: a broken IR
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IRError(f"node %{node.name} ({node.op}): operands do not fit: {detail}",
                      node=node.name) from None


def propagate(graph: Graph, update: bool = True) -> dict[Value, tuple]:
    """Recompute every activation's (shape, dtype).  With ``update`` the Values
    are rewritten in place (after a pass changed parameter shapes); otherwise the
    mismatches are only returned for the verifier."""
    env: dict[Value, Any] = {}
    for v in graph.inputs:
        env[v] = _meta(v)
    for name, v in graph.consts.items():
        t = graph.tensors[name]
        env[v] = torch.empty(t.shape, dtype=t.dtype, device="meta")
    found: dict[Value, tuple] = {}
    memo: dict = {}
    for n in graph.nodes:
        # Repeated blocks repeat the same op on the same operand layouts, and some meta
        # kernels are Python decompositions (about 1 ms each): compute each case once.
        key = _signature(n, env)
        res = memo.get(key) if key is not None else None
        if res is None:
            res = infer_node(n, env)
            if key is not None:
                memo[key] = res
        bind_results(n, res, env)
        for o in n.outputs:
            m = env[o]
            if not isinstance(m, torch.Tensor):
                continue
            got = (tuple(m.shape), m.dtype)
            found[o] = got
            if update:
                o.shape, o.dtype = got
    return found


def _signature(node: Node, env: dict[Value, Any]):
    """A hashable key of the op and its operands' layouts, or None (not cacheable)."""
    def sig(a):
        if isinstance(a, Value):
            t = env.get(a)
            if isinstance(t, torch.Tensor):
                return ("T", tuple(t.shape), t.stride(), t.storage_offset(), t.dtype)
            return ("S", type(t), t)
        if isinstance(a, (list, tuple)):
            return (type(a), tuple(sig(x) for x in a))
        if isinstance(a, dict):
            return tuple((k, sig(v)) for k, v in a.items())
        return (type(a), a)  # 1 and 1.0 promote differently
    try:
        key = (node.target, sig(node.args), sig(node.kwargs))
        hash(key)
    except TypeError:  # an operand that is not hashable (symbolic sizes)
        return None
    return key
