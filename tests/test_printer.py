"""Golden tests for the IR's text form."""
from __future__ import annotations

import torch

import prunec
from prunec.printer import print_graph, type_str
from prunec.ir import Value

TINY_IR = """\
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


def test_tiny_model_golden(tiny):
    model, x = tiny
    assert print_graph(prunec.trace(model, (x,))) == TINY_IR


def test_printing_is_deterministic(tiny):
    model, x = tiny
    assert print_graph(prunec.trace(model, (x,))) == print_graph(prunec.trace(model, (x,)))


def test_type_strings():
    assert type_str(Value("a", (2, 3), torch.float16)) == "f16[2,3]"
    assert type_str(Value("a", (), torch.int64)) == "i64[]"
    assert type_str(Value("a", (1,), torch.bool)) == "i1[1]"
    assert type_str(Value("a", (4,), torch.bfloat16)) == "bf16[4]"


def test_int_input_and_kwargs_printed():
    class Emb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 3)

        def forward(self, ids):
            return self.emb(ids).sum(dim=1, keepdim=True).to(torch.float16)

    g = prunec.trace(Emb().eval(), (torch.randint(0, 10, (2, 5)),))
    text = print_graph(g)
    assert text.splitlines()[0] == "graph(%ids: i64[2,5]) {"
    assert "  parameter @emb.weight: f32[10,3]\n" in text
    assert "aten.embedding.default(@emb.weight, %ids) : f32[2,5,3]" in text
    assert "keepdim=True" in text or ", True)" in text
    assert "dtype=f16" in text or ", f16)" in text  # dtypes print in the short form


def test_annotations_are_printed(tiny):
    g = prunec.trace(tiny[0], (tiny[1],))
    g.annotations["fc.weight"] = {"sparsity": 0.5, "_private": 1, "bits": 4}
    line = next(l for l in print_graph(g).splitlines() if "@fc.weight:" in l)
    assert line == "  parameter @fc.weight: f32[2,4]  # bits=4, sparsity=0.5"
