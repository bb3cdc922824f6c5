"""Cost analysis: parameters, FLOPs and stored bytes.

FLOPs count 2 per multiply-accumulate of the ops that dominate inference
(convolutions, linear layers, matrix products, attention); element-wise ops are
not counted, as is usual for model FLOP tables.  Stored bytes are what the
compressed artifact holds: a parameter annotated by a compression pass reports
its compressed size (values, indices, codebooks), others their dense size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .analysis import Analysis
from .ir import Graph, Node


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def node_flops(n: Node) -> int:
    op = n.op
    if not n.outputs:
        return 0
    out = n.out.shape
    if op in ("conv1d", "conv2d", "conv3d", "convolution"):
        w = n.args[1].shape
        transposed = op == "convolution" and n.arg(6, "transposed", False)
        if transposed:  # every input element scatters through C_out/groups x kernel weights
            x = n.args[0].shape
            return 2 * _numel(x) * _numel(w[1:])
        return 2 * _numel(out) * _numel(w[1:])
    if op in ("linear",):
        w = n.args[1].shape
        return 2 * _numel(out) * w[1]
    if op in ("addmm", "mm", "bmm", "matmul", "baddbmm"):
        a = n.args[1] if op in ("addmm", "baddbmm") else n.args[0]
        return 2 * _numel(out) * a.shape[-1]
    if op in ("scaled_dot_product_attention",):
        q, k, v = n.args[0].shape, n.args[1].shape, n.args[2].shape
        lk = k[-2]
        return 2 * _numel(q[:-1]) * lk * q[-1] + 2 * _numel(q[:-1]) * lk * v[-1]
    if op == "embedding":
        return 0
    return 0


@dataclass
class Cost:
    params: int
    flops: int
    bytes: int
    per_node_flops: dict[str, int] = field(default_factory=dict)
    per_param_bytes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"params": self.params, "flops": self.flops, "bytes": self.bytes}


def stored_bytes(graph: Graph, name: str) -> int:
    ann = graph.annotations.get(name)
    t = graph.tensors[name]
    if ann and "format" in ann and ann.get("shape", list(t.shape)) != list(t.shape):
        from .artifact import refresh  # a later pass resized it (e.g. channel pruning)
        ann = refresh(graph, name)
    if ann and "stored_bytes" in ann:
        return int(ann["stored_bytes"])
    return t.numel() * t.element_size()


def compute_cost(graph: Graph) -> Cost:
    per_node = {n.name: node_flops(n) for n in graph.nodes}
    per_param = {k: stored_bytes(graph, k) for k in graph.consts}
    params = sum(graph.tensors[k].numel() for k, v in graph.consts.items() if v.kind == "parameter")
    return Cost(params, sum(per_node.values()), sum(per_param.values()), per_node, per_param)


class CostAnalysis(Analysis):
    name = "cost"

    @classmethod
    def run(cls, graph, am):
        return compute_cost(graph)
