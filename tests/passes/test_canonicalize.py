"""canonicalize: before/expected IR and numbers."""
from __future__ import annotations

import torch

import prunec
from prunec.ir import Graph, Node, Value, interpret
from prunec.passmanager import PassManager
from prunec.printer import print_graph

aten = torch.ops.aten


class Views(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x).reshape(2, 4).view(8).view(2, 4)
        return torch.nn.functional.dropout(y.clone()[:, :], 0.5, training=False).expand(2, 4)


BEFORE = """\
graph(%x: f32[2,4]) {
  parameter @fc.weight: f32[4,4]
  parameter @fc.bias: f32[4]
  %linear = aten.linear.default(%x, @fc.weight, @fc.bias) : f32[2,4]
  %reshape = aten.reshape.default(%linear, [2, 4]) : f32[2,4]
  %view = aten.view.default(%reshape, [8]) : f32[8]
  %view_1 = aten.view.default(%view, [2, 4]) : f32[2,4]
  %clone = aten.clone.default(%view_1) : f32[2,4]
  %alias = aten.alias.default(%clone) : f32[2,4]
  %dropout = aten.dropout.default(%alias, 0.5, False) : f32[2,4]
  %expand = aten.expand.default(%dropout, [2, 4]) : f32[2,4]
  return %expand
}
"""

EXPECTED = """\
graph(%x: f32[2,4]) {
  parameter @fc.weight: f32[4,4]
  parameter @fc.bias: f32[4]
  %linear = aten.linear.default(%x, @fc.weight, @fc.bias) : f32[2,4]
  return %linear
}
"""


def test_canonicalize_traced_golden():
    torch.manual_seed(0)
    m = Views().eval()
    x = torch.randn(2, 4)
    g = prunec.trace(m, (x,))
    assert print_graph(g) == BEFORE
    (rec,) = PassManager("canonicalize").run(g)
    assert print_graph(g) == EXPECTED
    assert rec.changed and rec.stats["ops-removed"] >= 5
    with torch.no_grad():
        assert torch.equal(interpret(g, [x])[0], m(x))


def _v(name, shape, kind="activation"):
    return Value(name, shape, torch.float32, kind=kind)


def hand_graph() -> Graph:
    """Identity-like ops that canonicalize removes, next to look-alikes it must keep."""
    x = _v("x", (3, 4), "input")
    n = []

    def add(name, target, args, shape, kwargs=None):
        node = Node(name, target, args, kwargs or {}, [_v(name, shape)], False)
        n.append(node)
        return node.out

    a = add("drop", aten.dropout.default, (x, 0.5, False), (3, 4))            # inference dropout: removed
    b = add("slice", aten.slice.Tensor, (a, 1, 0, 2 ** 63 - 1), (3, 4))        # full slice: removed
    c = add("slice_1", aten.slice.Tensor, (b, 0, 1, 3), (2, 4))                # a real slice: kept
    d = add("view", aten.view.default, (c, [8]), (8,))                          # a real view: kept
    e = add("view_1", aten.view.default, (d, [4, 2]), (4, 2))                  # view of view: merged
    f = add("detach", aten.detach.default, (e,), (4, 2))                       # removed
    g_ = add("train_drop", aten.dropout.default, (f, 0.5, True), (4, 2))       # training dropout: kept
    h = add("mem", aten.clone.default, (g_,), (4, 2), {"memory_format": torch.contiguous_format})  # kept
    return Graph([x], n, [h], {}, {})


HAND_BEFORE = """\
graph(%x: f32[3,4]) {
  %drop = aten.dropout.default(%x, 0.5, False) : f32[3,4]
  %slice = aten.slice.Tensor(%drop, 1, 0, 9223372036854775807) : f32[3,4]
  %slice_1 = aten.slice.Tensor(%slice, 0, 1, 3) : f32[2,4]
  %view = aten.view.default(%slice_1, [8]) : f32[8]
  %view_1 = aten.view.default(%view, [4, 2]) : f32[4,2]
  %detach = aten.detach.default(%view_1) : f32[4,2]
  %train_drop = aten.dropout.default(%detach, 0.5, True) : f32[4,2]
  %mem = aten.clone.default(%train_drop, memory_format=torch.contiguous_format) : f32[4,2]
  return %mem
}
"""

HAND_EXPECTED = """\
graph(%x: f32[3,4]) {
  %slice_1 = aten.slice.Tensor(%x, 0, 1, 3) : f32[2,4]
  %view_1 = aten.view.default(%slice_1, [4, 2]) : f32[4,2]
  %train_drop = aten.dropout.default(%view_1, 0.5, True) : f32[4,2]
  %mem = aten.clone.default(%train_drop, memory_format=torch.contiguous_format) : f32[4,2]
  return %mem
}
"""


def test_canonicalize_hand_golden():
    g = hand_graph()
    prunec.verify(g)
    assert print_graph(g) == HAND_BEFORE
    (rec,) = PassManager("canonicalize").run(g)
    assert print_graph(g) == HAND_EXPECTED
    assert rec.stats == {"ops-removed": 4, "views-merged": 1, "asserts-removed": 0}


def test_canonicalize_hand_numbers():
    # without the training dropout (random) the values must be bit-identical
    g = hand_graph()
    g.nodes = g.nodes[:6]
    g.outputs = [g.nodes[-1].out]
    x = torch.randn(3, 4)
    ref = interpret(g, [x])[0]
    PassManager("canonicalize").run(g)
    assert [n.name for n in g.nodes] == ["slice_1", "view_1"]
    assert torch.equal(interpret(g, [x])[0], ref)
    assert torch.equal(ref, x[1:].reshape(4, 2))


def test_canonicalize_unchanged_reports_no_change():
    g = prunec.trace(torch.nn.Linear(3, 3).eval(), (torch.randn(1, 3),))
    (rec,) = PassManager("canonicalize").run(g)
    assert not rec.changed


def test_canonicalize_keeps_dtype_changing_view():
    x = Value("x", (2, 2), torch.float32, kind="input")
    out = Value("v", (2, 2), torch.int32)
    node = Node("v", aten.view.dtype, (x, torch.int32), {}, [out], False)
    g = Graph([x], [node], [out], {}, {})
    PassManager("canonicalize").run(g)
    assert [n.name for n in g.nodes] == ["v"]
