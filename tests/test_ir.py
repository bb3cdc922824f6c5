"""The IR data structures: tracing into values/nodes, queries, edits, clone, interpret."""
from __future__ import annotations

import torch

import prunec
from prunec.ir import Graph, Node, Value, interpret, iter_values, map_values, unflatten_outputs

aten = torch.ops.aten


def test_trace_structure(tiny):
    model, x = tiny
    g = prunec.trace(model, (x,))
    assert [v.name for v in g.inputs] == ["x"] and g.inputs[0].kind == "input"
    assert g.inputs[0].shape == (1, 3, 8, 8) and g.inputs[0].dtype == torch.float32
    # parameters and buffers are named by the module's fully qualified names
    assert set(g.consts) == {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert g.consts["conv.weight"].kind == "parameter" and g.consts["bn.running_mean"].kind == "buffer"
    assert [n.op for n in g.nodes] == ["conv2d", "batch_norm", "relu", "mean", "linear"]
    bn = g.nodes[1]
    assert all(o.producer is bn for o in bn.outputs) and [o.index for o in bn.outputs] == list(range(len(bn.outputs)))
    assert g.outputs == [g.nodes[-1].out] and g.outputs[0].shape == (1, 2)
    assert g.param_count() == sum(p.numel() for p in model.parameters())
    assert repr(g.consts["fc.bias"]) == "@fc.bias" and repr(g.nodes[0].out) == "%conv2d"


def test_interpret_matches_module(tiny):
    model, x = tiny
    g = prunec.trace(model, (x,))
    with torch.no_grad():
        assert torch.equal(interpret(g, [x])[0], model(x))


def test_users_and_node_lookup(tiny):
    g = prunec.trace(*tiny[:1], (tiny[1],))
    users = g.users()
    conv = g.node("conv2d")
    assert users[conv.out] == [g.node("batch_norm")]
    assert users[g.outputs[0]] == []
    assert users[g.consts["bn.num_batches_tracked"]] == []
    try:
        g.node("nope")
    except KeyError:
        pass
    else:
        raise AssertionError("missing node must raise KeyError")


def test_arg_and_set_arg(tiny):
    g = prunec.trace(tiny[0], (tiny[1],))
    conv = g.node("conv2d")
    assert conv.arg(1, "weight") is g.consts["conv.weight"]
    assert conv.arg(6, "groups", 1) == 1  # not given: the default
    conv.set_arg(6, "groups", 1)
    assert conv.kwargs == {"groups": 1}
    conv.set_arg(3, "stride", [2, 2])
    assert conv.args[3] == [2, 2]


def test_fresh_name_set_tensor_add_const(tiny):
    g = prunec.trace(tiny[0], (tiny[1],))
    assert g.fresh_name("conv2d") == "conv2d_1"
    assert g.fresh_name("brand_new") == "brand_new"
    g.set_tensor("fc.bias", torch.zeros(5, dtype=torch.float64))
    assert g.consts["fc.bias"].shape == (5,) and g.consts["fc.bias"].dtype == torch.float64
    v = g.add_const("extra", torch.ones(2))
    assert v.kind == "parameter" and g.tensors["extra"].shape == (2,)
    try:
        g.add_const("extra", torch.ones(2))
    except ValueError as e:
        assert "extra" in str(e)
    else:
        raise AssertionError("duplicate constant must be rejected")
    assert g.remove_unused_consts() == ["bn.num_batches_tracked", "extra"]


def test_replace_uses_rewires_nodes_and_outputs(tiny):
    g = prunec.trace(tiny[0], (tiny[1],))
    bn = g.node("batch_norm")
    conv = g.node("conv2d")
    g.replace_uses(bn.outputs[0], conv.out)
    assert g.node("relu").args[0] is conv.out
    lin = g.node("linear")
    g.replace_uses(lin.out, conv.out)
    assert g.outputs == [conv.out]


def test_clone_is_independent(tiny):
    g = prunec.trace(tiny[0], (tiny[1],))
    c = g.clone()
    assert prunec.print_graph(c) == prunec.print_graph(g)
    assert c.nodes[0] is not g.nodes[0] and c.inputs[0] is not g.inputs[0]
    # values inside the clone point at the clone's nodes
    assert all(o.producer is n for n in c.nodes for o in n.outputs)
    assert c.node("relu").args[0] is c.node("batch_norm").outputs[0]
    c.nodes.pop()
    c.consts["fc.bias"].shape = (9,)
    c.annotations["fc.weight"] = {"x": 1}
    assert len(g.nodes) == 5 and g.consts["fc.bias"].shape == (2,) and not g.annotations
    assert torch.equal(interpret(g.clone(), [tiny[1]])[0], interpret(g, [tiny[1]])[0])


def test_map_and_iter_values():
    a, b = Value("a", (1,), torch.float32), Value("b", (2,), torch.float32)
    nested = (a, [1, b], {"k": a, "n": 3})
    assert list(iter_values(nested)) == [a, b, a]
    assert map_values(nested, lambda v: v.name) == ("a", [1, "b"], {"k": "a", "n": 3})


def test_hand_built_graph_runs_and_unflattens():
    x = Value("x", (2, 3), torch.float32, kind="input")
    w = Value("w", (3,), torch.float32, kind="parameter")
    y = Value("y", (2, 3), torch.float32)
    s0, s1 = Value("s_0", (2, 1), torch.float32), Value("s_1", (2, 2), torch.float32)
    n1 = Node("y", aten.mul.Tensor, (x, w), {}, [y], False)
    n2 = Node("s", aten.split_with_sizes.default, (y, [1, 2], 1), {}, [s0, s1], True)
    g = Graph([x], [n1, n2], [s1, s0], {"w": w}, {"w": torch.tensor([1.0, 2.0, 3.0])})
    prunec.verify(g)
    inp = torch.arange(6.0).reshape(2, 3)
    out = interpret(g, [inp])
    assert torch.equal(out[0], (inp * torch.tensor([1.0, 2.0, 3.0]))[:, 1:])
    assert isinstance(unflatten_outputs(g, out), tuple) and len(unflatten_outputs(g, out)) == 2
    g.outputs = [s0]
    assert isinstance(unflatten_outputs(g, interpret(g, [inp])), torch.Tensor)


def test_tuple_and_dict_outputs_keep_structure():
    class M(torch.nn.Module):
        def forward(self, x):
            return {"a": x + 1, "b": (x * 2, x - 1)}

    x = torch.randn(2, 2)
    res = prunec.compile(M(), (x,))
    out = res(x)
    assert set(out) == {"a", "b"} and torch.equal(out["b"][0], x * 2)
    assert torch.equal(res.program.module()(x)["a"], x + 1)
