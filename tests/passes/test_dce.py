"""dce: before/expected IR and numbers."""
from __future__ import annotations

import torch

import prunec
from prunec.ir import Node, Value, interpret
from prunec.passmanager import PassManager
from prunec.printer import print_graph

aten = torch.ops.aten

CONSTS = """\
graph(%x: f32[1,3,8,8]) {
  parameter @conv.weight: f32[4,3,3,3]
  parameter @bn.weight: f32[4]
  parameter @bn.bias: f32[4]
  parameter @fc.weight: f32[2,4]
  parameter @fc.bias: f32[2]
  buffer @bn.running_mean: f32[4]
  buffer @bn.running_var: f32[4]
"""
BODY = """\
  %conv2d = aten.conv2d.default(%x, @conv.weight, None, [1, 1], [1, 1]) : f32[1,4,8,8]
  %batch_norm = aten.batch_norm.default(%conv2d, @bn.weight, @bn.bias, @bn.running_mean, @bn.running_var, False, 0.1, 1e-05, False) : f32[1,4,8,8]
  %relu = aten.relu.default(%batch_norm) : f32[1,4,8,8]
  %mean = aten.mean.dim(%relu, [2, 3]) : f32[1,4]
  %linear = aten.linear.default(%mean, @fc.weight, @fc.bias) : f32[1,2]
  return %linear
}
"""

BEFORE = CONSTS + """\
  buffer @bn.num_batches_tracked: i64[]
  parameter @extra.weight: f32[8]
  %conv2d = aten.conv2d.default(%x, @conv.weight, None, [1, 1], [1, 1]) : f32[1,4,8,8]
  %dead = aten.relu.default(%conv2d) : f32[1,4,8,8]
  %dead_1 = aten.mul.Tensor(%dead, @extra.weight) : f32[1,4,8,8]
""" + BODY.split("\n", 1)[1]

EXPECTED = CONSTS + BODY


def _before(tiny):
    model, x = tiny
    g = prunec.trace(model, (x,))
    w = g.add_const("extra.weight", torch.ones(8))
    conv = g.node("conv2d")
    dead = Node("dead", aten.relu.default, (conv.out,), {}, [Value("dead", (1, 4, 8, 8), torch.float32)], False)
    dead2 = Node("dead_1", aten.mul.Tensor, (dead.out, w), {}, [Value("dead_1", (1, 4, 8, 8), torch.float32)],
                 False)
    g.nodes[1:1] = [dead, dead2]
    return g


def test_dce_golden(tiny):
    g = _before(tiny)
    assert print_graph(g) == BEFORE
    ref = interpret(g, [tiny[1]])[0]
    (rec,) = PassManager("dce").run(g)
    assert print_graph(g) == EXPECTED
    assert rec.changed and rec.stats == {"nodes-removed": 2, "constants-removed": 2}
    assert torch.equal(interpret(g, [tiny[1]])[0], ref)
    with torch.no_grad():
        assert torch.equal(ref, tiny[0](tiny[1]))


def test_dce_is_idempotent(tiny):
    g = _before(tiny)
    PassManager("dce").run(g)
    (rec,) = PassManager("dce").run(g)
    assert not rec.changed and print_graph(g) == EXPECTED


def test_dce_keeps_side_effects_and_outputs(tiny):
    g = prunec.trace(tiny[0], (tiny[1],))
    relu = g.node("relu")
    g.outputs.append(relu.out)  # a second graph output keeps its producer
    g.nodes.append(Node("print", aten._print.default, ("hello",), {}, [], True))
    g.annotations["bn.num_batches_tracked"] = {"x": 1}
    PassManager("dce").run(g)
    assert [n.name for n in g.nodes][-1] == "print" and "relu" in [n.name for n in g.nodes]
    assert "bn.num_batches_tracked" not in g.annotations  # annotations of removed constants go too


def test_dce_roundtrip_through_compile(tiny):
    model, x = tiny
    with torch.no_grad():
        ref = model(x)
    res = prunec.compile(model, (x,), passes="dce")
    with torch.no_grad():
        assert torch.equal(res(x), ref) and torch.equal(res.program.module()(x), ref)
        assert torch.equal(res.module(x), ref)
