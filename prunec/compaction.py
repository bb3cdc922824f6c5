"""Remove units of channels from the IR: slice constants, rewrite the ops'
shape arguments (view sizes, split sizes, groups, normalized shapes, slice
bounds), and keep the pruning plan in original-index terms."""
from __future__ import annotations

import numpy as np
import torch

from .dependency import ChannelGraph
from .head_views import SDPA_OPS
from .ir import Graph, Node, Value


def complement(n: int, idx) -> np.ndarray:
    """The indices of ``range(n)`` not in ``idx``, sorted (a mask: ``np.setdiff1d`` sorts and
    de-duplicates both sides, 10x slower at these sizes)."""
    keep = np.ones(n, dtype=bool)
    keep[np.asarray(idx, dtype=np.int64)] = False
    return np.flatnonzero(keep)


def removal_map(cg: ChannelGraph, removed_units: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """(id(value), dim) -> sorted indices removed along that dim."""
    out = {}
    for s, (v, d) in enumerate(cg.slots):
        rm = removed_units[cg.slot_labels(s)]
        if rm.any():
            out[(id(v), d)] = np.nonzero(rm)[0]
    return out


class _Shrink:
    def __init__(self, rm: dict):
        self.rm = rm

    def removed(self, v: Value, d: int) -> np.ndarray:
        return self.rm.get((id(v), d % len(v.shape)), np.zeros(0, dtype=np.int64))

    def size(self, v: Value, d: int) -> int:
        return v.shape[d] - len(self.removed(v, d))

    def new_shape(self, v: Value) -> list[int]:
        return [self.size(v, d) for d in range(len(v.shape))]

    def new_index(self, v: Value, d: int, i: int) -> int:
        """Position of old index ``i`` after removal."""
        return int(i - np.searchsorted(self.removed(v, d), i))


def _fix_node(n: Node, s: _Shrink) -> None:
    op = n.op
    if op in ("view", "reshape", "_unsafe_view", "expand"):
        if any(len(s.removed(n.out, d)) for d in range(len(n.out.shape))):
            n.set_arg(1, "size", s.new_shape(n.out))
    elif op == "unflatten":
        dim = n.args[1] % len(n.args[0].shape)
        n.set_arg(2, "sizes", s.new_shape(n.out)[dim:dim + len(n.args[2])])
    elif op in ("layer_norm", "rms_norm"):
        x = n.args[0]
        k = len(n.args[1])
        n.set_arg(1, "normalized_shape", s.new_shape(x)[len(x.shape) - k:])
    elif op == "group_norm":
        x = n.args[0]
        per = x.shape[1] // n.arg(1, "num_groups")
        n.set_arg(1, "num_groups", s.size(x, 1) // per)
    elif op in ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                "conv_transpose3d"):
        gi = 8 if op == "convolution" else 6
        groups = n.arg(gi, "groups", 1)
        if groups > 1:
            x = n.args[0]
            n.set_arg(gi, "groups", s.size(x, 1) // (x.shape[1] // groups))
    elif op in ("split", "split_with_sizes", "chunk", "unsafe_chunk", "unsafe_split"):
        x = n.args[0]
        dim = n.arg(2, "dim", 0) % len(x.shape)
        if len(s.removed(x, dim)):
            sizes = [s.size(o, dim) for o in n.outputs]
            n.target = torch.ops.aten.split_with_sizes.default
            n.args = (x, sizes, dim)
            n.kwargs = {}
    elif op == "slice":
        x = n.args[0]
        dim = n.arg(1, "dim", 0) % len(x.shape)
        if len(s.removed(x, dim)):
            from .channel_rules_reindex import slice_bounds
            start, _, _ = slice_bounds(x.shape[dim], n.arg(2, "start"), n.arg(3, "end"), n.arg(4, "step", 1))
            new_start = s.new_index(x, dim, start)
            n.args = (x, dim, new_start, new_start + s.size(n.out, dim)) + tuple(n.args[4:])
    elif op in SDPA_OPS:
        q = n.args[0]
        at = 6 if op == "scaled_dot_product_attention" else 99  # the CPU flash variant: keyword only
        if len(s.removed(q, -1)) and n.arg(at, "scale") is None:
            # the default scale is 1/sqrt(head width): keep the original width's
            n.set_arg(at, "scale", q.shape[-1] ** -0.5)
            n.meta["default_scale_of_width"] = q.shape[-1]  # the module update names such modules
    elif op == "select":
        x = n.args[0]
        dim = n.args[1] % len(x.shape)
        if len(s.removed(x, dim)):
            n.set_arg(2, "index", s.new_index(x, dim, n.args[2] % x.shape[dim]))


def compact(graph: Graph, cg: ChannelGraph, removed_units: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """Apply the removal; returns {const name: {dim: removed indices}} for the plan."""
    rm = removal_map(cg, removed_units)
    s = _Shrink(rm)
    # index_select with a constant index: remap the kept indices before shapes change
    for n in graph.nodes:
        if n.op == "index_select" and n.args[2].is_const:
            x, dim, idx = n.args[0], n.args[1] % len(n.args[0].shape), n.args[2]
            if len(s.removed(x, dim)):
                old = graph.tensors[idx.name].to(torch.int64) % x.shape[dim]
                keep_out = complement(len(old), s.removed(n.out, dim))
                new = [s.new_index(x, dim, int(old[j])) for j in keep_out]
                graph.set_tensor(idx.name, torch.tensor(new, dtype=graph.tensors[idx.name].dtype))
    for n in graph.nodes:
        _fix_node(n, s)
    removed: dict[str, dict[int, np.ndarray]] = {}
    for name, v in list(graph.consts.items()):
        t = graph.tensors[name]
        dims = {d: s.removed(v, d) for d in range(len(v.shape)) if len(s.removed(v, d))}
        if not dims:
            continue
        for d, idx in dims.items():
            keep = torch.from_numpy(complement(t.shape[d], idx))
            t = t.index_select(d, keep)
        graph.set_tensor(name, t.contiguous())
        removed[name] = dims
    return removed


class PlanTracker:
    """Keeps the plan in the original model's indices across several pruning passes."""

    def __init__(self):
        self.kept: dict[str, dict[int, np.ndarray]] = {}

    def record(self, graph: Graph, removed: dict[str, dict[int, np.ndarray]], sizes: dict) -> None:
        for name, dims in removed.items():
            per = self.kept.setdefault(name, {})
            for d, idx in dims.items():
                cur = per.get(d, np.arange(sizes[name][d]))
                per[d] = np.delete(cur, idx)
        self.sizes = {**sizes, **getattr(self, "sizes", {})}

    def plan(self) -> dict:
        params = {}
        for name, dims in self.kept.items():
            entry = {}
            for d, kept in dims.items():
                gone = complement(self.sizes[name][d], kept)
                if len(gone):
                    entry[str(d)] = gone.tolist()
            if entry:
                params[name] = entry
        return {"version": 1, "params": params}


def tracker(am) -> PlanTracker:
    if getattr(am, "plan_tracker", None) is None:
        am.plan_tracker = PlanTracker()
    return am.plan_tracker
