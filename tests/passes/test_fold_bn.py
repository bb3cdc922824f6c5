"""fold-bn: before/expected IR, numbers, and the cases it must leave alone."""
from __future__ import annotations

import torch
from torch import nn

import prunec
from prunec.ir import interpret
from prunec.passmanager import PassManager
from prunec.printer import print_graph

from conftest import randomize_bn

BEFORE = """\
graph(%x: f32[1,3,8,8]) {
  parameter @conv.weight: f32[4,3,3,3]
  parameter @bn.weight: f32[4]
  parameter @bn.bias: f32[4]
  parameter @fc.weight: f32[2,4]
  parameter @fc.bias: f32[2]
  buffer @bn.running_mean: f32[4]
  buffer @bn.running_var: f32[4]
  buffer @bn.num_batches_tracked: i64[]
  %conv2d = aten.conv2d.default(%x, @conv.weight, None, [1, 1], [1, 1]) : f32[1,4,8,8]
  %batch_norm = aten.batch_norm.default(%conv2d, @bn.weight, @bn.bias, @bn.running_mean, @bn.running_var, False, 0.1, 1e-05, False) : f32[1,4,8,8]
  %relu = aten.relu.default(%batch_norm) : f32[1,4,8,8]
  %mean = aten.mean.dim(%relu, [2, 3]) : f32[1,4]
  %linear = aten.linear.default(%mean, @fc.weight, @fc.bias) : f32[1,2]
  return %linear
}
"""

EXPECTED = """\
graph(%x: f32[1,3,8,8]) {
  parameter @conv.weight: f32[4,3,3,3]
  parameter @fc.weight: f32[2,4]
  parameter @fc.bias: f32[2]
  parameter @conv.bias: f32[4]
  %conv2d = aten.conv2d.default(%x, @conv.weight, @conv.bias, [1, 1], [1, 1]) : f32[1,4,8,8]
  %relu = aten.relu.default(%conv2d) : f32[1,4,8,8]
  %mean = aten.mean.dim(%relu, [2, 3]) : f32[1,4]
  %linear = aten.linear.default(%mean, @fc.weight, @fc.bias) : f32[1,2]
  return %linear
}
"""


def close(a, b, rtol=1e-5):
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


def test_fold_bn_golden(tiny):
    model, x = tiny
    g = prunec.trace(model, (x,))
    assert print_graph(g) == BEFORE
    (rec,) = PassManager("fold-bn").run(g)
    assert print_graph(g) == EXPECTED
    assert rec.stats == {"batchnorms-folded": 1, "constants-removed": 5}
    with torch.no_grad():
        ref = model(x)
    assert close(interpret(g, [x])[0], ref)
    # the folded parameters are the closed form
    bn = model.bn
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(g.tensors["conv.weight"], model.conv.weight * s.view(-1, 1, 1, 1))
    torch.testing.assert_close(g.tensors["conv.bias"], bn.bias - bn.running_mean * s)


class Shapes(nn.Module):
    """conv with bias + BN (fold), conv whose output is also read elsewhere (keep),
    linear + BN1d on 2-D input (fold), linear + BN1d on 3-D input (keep)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 1, bias=False)
        self.b2 = nn.BatchNorm2d(6)
        self.l1 = nn.Linear(6, 5)
        self.b3 = nn.BatchNorm1d(5)
        self.l2 = nn.Linear(6, 4)
        self.b4 = nn.BatchNorm1d(3)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = self.c2(y)
        y = self.b2(z) + z  # z has two users: not folded
        v = y.mean((2, 3))
        a = self.b3(self.l1(v))
        t = self.l2(y.flatten(2).transpose(1, 2)[:, :3])  # [1, 3, 4]: BN1d over dim 1 = tokens
        return a, self.b4(t)


def test_fold_bn_only_where_valid():
    torch.manual_seed(0)
    m = randomize_bn(Shapes()).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
    res = prunec.compile(m, (x,), passes="fold-bn")
    assert res.report["passes"][0]["stats"]["batchnorms-folded"] == 2
    ops = [n.op for n in res.graph.nodes]
    assert ops.count("batch_norm") + ops.count("_native_batch_norm_legit_no_training") == 2
    assert "c1.bias" in res.graph.consts and "b1.weight" not in res.graph.consts
    assert "l1.bias" in res.graph.consts and "b3.running_mean" not in res.graph.consts
    assert "b2.weight" in res.graph.consts and "b4.weight" in res.graph.consts
    with torch.no_grad():
        for out in (res(x), res.program.module()(x), res.module(x)):
            assert all(close(a, b) for a, b in zip(out, ref))
    assert isinstance(m.b1, nn.Identity) and isinstance(m.b3, nn.Identity)
    assert isinstance(m.b2, nn.BatchNorm2d) and isinstance(m.b4, nn.BatchNorm1d)


def test_fold_bn_no_batchnorm_is_unchanged():
    g = prunec.trace(nn.Linear(3, 3).eval(), (torch.randn(2, 3),))
    (rec,) = PassManager("fold-bn").run(g)
    assert not rec.changed and rec.stats["batchnorms-folded"] == 0


def test_fold_bn_without_affine():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, affine=False)).eval()
    randomize_bn(m)
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        ref = m(x)
    res = prunec.compile(m, (x,), passes="fold-bn,dce")
    assert [n.op for n in res.graph.nodes] == ["conv2d"]
    with torch.no_grad():
        assert close(res(x), ref) and close(res.module(x), ref)
