"""The verifier accepts traced IR and rejects deliberately broken IR, naming the node."""
from __future__ import annotations

import pytest
import torch

import prunec
from prunec.errors import IRError
from prunec.ir import Node, Value
from prunec.verifier import verify

aten = torch.ops.aten


@pytest.fixture
def graph(tiny):
    return prunec.trace(tiny[0], (tiny[1],))


def test_traced_graph_verifies(graph):
    verify(graph)


def test_wrong_declared_shape(graph):
    graph.node("relu").out.shape = (1, 4, 8, 9)
    with pytest.raises(IRError, match=r"node %relu \(relu\) declares f32\[1,4,8,9\].*\[1, 4, 8, 8\]") as e:
        verify(graph)
    assert e.value.node == "relu"


def test_wrong_declared_dtype(graph):
    graph.node("mean").out.dtype = torch.float16
    with pytest.raises(IRError, match=r"node %mean \(mean\) declares f16\[1,4\]") as e:
        verify(graph)
    assert e.value.node == "mean"


def test_use_before_def(graph):
    relu, mean = graph.node("relu"), graph.node("mean")
    i, j = graph.nodes.index(relu), graph.nodes.index(mean)
    graph.nodes[i], graph.nodes[j] = mean, relu
    with pytest.raises(IRError, match=r"node %mean \(mean\) uses %relu before it is defined") as e:
        verify(graph)
    assert e.value.node == "mean"


def test_use_of_removed_node(graph):
    graph.nodes.remove(graph.node("relu"))
    with pytest.raises(IRError, match=r"node %mean .* uses %relu before it is defined"):
        verify(graph)


def test_constant_tensor_disagrees(graph):
    graph.tensors["fc.weight"] = torch.zeros(3, 4)
    with pytest.raises(IRError, match=r"constant @fc.weight is declared f32\[2,4\] but holds \[3, 4\]"):
        verify(graph)


def test_constant_without_tensor(graph):
    del graph.tensors["fc.bias"]
    with pytest.raises(IRError, match=r"constant @fc.bias has no tensor"):
        verify(graph)


def test_incompatible_operands(graph):
    # a weight with the wrong input width: the linear cannot take its operands
    graph.set_tensor("fc.weight", torch.zeros(2, 5))
    with pytest.raises(IRError, match=r"node %linear \(linear\): operands do not fit") as e:
        verify(graph)
    assert e.value.node == "linear"


def test_incompatible_conv_operands(graph):
    graph.set_tensor("conv.weight", torch.zeros(4, 2, 3, 3))
    with pytest.raises(IRError, match=r"node %conv2d \(conv2d\): operands do not fit"):
        verify(graph)


def test_duplicate_value_name(graph):
    graph.node("relu").out.name = "conv2d"
    with pytest.raises(IRError, match=r"value name %conv2d is defined twice") as e:
        verify(graph)
    assert e.value.node == "relu"


def test_undefined_graph_output(graph):
    graph.outputs = [Value("ghost", (1,), torch.float32)]
    with pytest.raises(IRError, match=r"graph output %ghost is not defined"):
        verify(graph)


def test_output_not_pointing_at_producer(graph):
    relu = graph.node("relu")
    other = graph.node("mean")
    relu.outputs[0].producer = other
    with pytest.raises(IRError, match=r"%relu does not point back at its producer %relu"):
        verify(graph)


def test_inserted_node_checked(graph):
    relu = graph.node("relu")
    bad = Node("bad_add", aten.add.Tensor, (relu.out, graph.consts["fc.weight"]), {},
               [Value("bad_add", (1, 4, 8, 8), torch.float32)], False)
    graph.nodes.insert(graph.nodes.index(relu) + 1, bad)
    with pytest.raises(IRError, match=r"node %bad_add \(add\): operands do not fit"):
        verify(graph)


def test_shape_memo_keeps_scalar_types_apart():
    """propagate computes each (op, operand layouts) once: an int and a float scalar
    compare equal in Python but promote differently, so they must not share a result."""
    from prunec.shapes import propagate

    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1, x + 1.0, (x * 2).float() + 1

    g = prunec.trace(M(), (torch.arange(6).reshape(2, 3),))
    for o in g.outputs:
        o.dtype = None  # forget what the tracer said
    propagate(g)
    assert [o.dtype for o in g.outputs] == [torch.int64, torch.float32, torch.float32]
    verify(g)
