"""Torch backend: the in-place module keeps training and its layer attributes follow
the new shapes; the exported program saves, loads back and matches."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunec
from prunec.backends import torch_backend
from prunec.registry import PassResult, register_pass


@pytest.fixture(autouse=True)
def _passes(registry_snapshot):
    @register_pass("test-keep-two", summary="Keep the first two channels of TinyConvNet's conv.")
    def keep_two(graph, am):
        t = graph.tensors
        for name in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
            if name in graph.consts:
                graph.set_tensor(name, t[name][:2].clone())
        if "conv.bias" in graph.consts:
            graph.set_tensor("conv.bias", t["conv.bias"][:2].clone())
        graph.set_tensor("fc.weight", t["fc.weight"][:, :2].clone())
        return PassResult(True)
    yield


def _sliced_reference(model, x):
    """TinyConvNet with channels 2 and 3 removed by hand."""
    ref = type(model)()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        ref.conv.weight.copy_(model.conv.weight[:2])
        bn = nn.BatchNorm2d(2)
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, k).copy_(getattr(model.bn, k)[:2])
        ref.bn = bn
        fc = nn.Linear(2, 2)
        fc.weight.copy_(model.fc.weight[:, :2])
        fc.bias.copy_(model.fc.bias)
        ref.fc = fc
    return ref.eval()


def test_attributes_follow_new_shapes(tiny):
    model, x = tiny
    expected = _sliced_reference(model, x)
    res = prunec.compile(model, (x,), passes="test-keep-two")
    assert res.module is model and res.module_problems == []
    assert (model.conv.out_channels, model.conv.in_channels) == (2, 3)
    assert model.bn.num_features == 2
    assert (model.fc.in_features, model.fc.out_features) == (2, 2)
    assert model.conv.weight.shape == (2, 3, 3, 3) and isinstance(model.conv.weight, nn.Parameter)
    assert model.bn.running_mean.shape == (2,) and "running_mean" in model.bn._buffers
    with torch.no_grad():
        ref = expected(x)
        torch.testing.assert_close(res(x), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res.program.module()(x), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)
    assert "conv2d = aten.conv2d.default(%x, @conv.weight" in prunec.print_graph(res.graph)
    assert res.graph.node("conv2d").out.shape == (1, 2, 8, 8)


def test_module_keeps_training_after_fold_bn(tiny):
    model, x = tiny
    res = prunec.compile(model, (x,), passes="fold-bn,test-keep-two")
    m = res.module
    assert m is model and isinstance(m.bn, nn.Identity)
    assert isinstance(m.conv.bias, nn.Parameter) and m.conv.bias.shape == (2,) and m.conv.out_channels == 2
    params = dict(m.named_parameters())
    assert set(params) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    assert all(p.requires_grad for p in params.values())
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in params.items()}
    xb = torch.randn(4, 3, 8, 8)
    target = torch.tensor([0, 1, 1, 0])
    loss0 = nn.functional.cross_entropy(m(xb), target)
    loss0.backward()
    assert all(p.grad is not None for p in m.parameters())
    opt.step()
    assert all(not torch.equal(before[k], v) for k, v in m.named_parameters())
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(xb), target)
        loss.backward()
        opt.step()
    assert loss.item() < loss0.item()
    # the compiled IR kept its own tensors: training the module does not change it
    assert not torch.equal(res.graph.tensors["fc.weight"], m.fc.weight.detach())


def test_program_saves_and_loads(tiny, tmp_path):
    model, x = tiny
    with torch.no_grad():
        ref = model(x)
    res = prunec.compile(model, (x,), passes="fold-bn,canonicalize,dce")
    path = tmp_path / "model.pt2"
    torch.export.save(res.program, str(path))
    back = torch.export.load(str(path))
    y = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back.module()(x), ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(back.module()(y), res.program.module()(y))
        assert torch.equal(back.module()(y), res(y))
    names = {n for n, _ in back.named_parameters()}
    assert "gm.conv.bias" in names or "conv.bias" in {n.split("gm.", 1)[-1] for n in names}
    # and it compiles again as a .pt2 spec
    again = prunec.compile(str(path))
    with torch.no_grad():
        assert torch.equal(again(x), back.module()(x))


def test_to_module_runs_graph(tiny):
    model, x = tiny
    g = prunec.trace(model, (x,))
    mod = torch_backend.to_module(g)
    with torch.no_grad():
        assert torch.equal(mod(x), model(x))
    assert dict(mod.named_parameters()).keys() == {f"gm.{n}" for n, _ in model.named_parameters()}


def test_module_problem_is_reported_not_silent():
    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).view(-1, 3)  # hard-codes the width

    @register_pass("test-shrink-fc")
    def shrink(graph, am):
        graph.set_tensor("fc.weight", graph.tensors["fc.weight"][:2].clone())
        graph.set_tensor("fc.bias", graph.tensors["fc.bias"][:2].clone())
        view = next(n for n in graph.nodes if n.op == "view")
        view.set_arg(1, "size", [-1, 2])  # the IR follows; the module's Python cannot
        return PassResult(True)

    m = HardCoded().eval()
    x = torch.randn(2, 4)
    res = prunec.compile(m, (x,), passes="test-shrink-fc")
    assert res.module is None
    assert len(res.module_problems) == 1
    assert res.module_problems[0].startswith("the updated module fails to run in module 'HardCoded'")
    assert res.report["module-update"]["ok"] is False
    assert res(x).shape == (2, 2) and res.program.module()(x).shape == (2, 2)


def test_not_in_place(tiny):
    model, x = tiny
    res = prunec.compile(model, (x,), passes="fold-bn", in_place=False)
    assert res.module is None and isinstance(model.bn, nn.BatchNorm2d)
