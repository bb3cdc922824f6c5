"""prunec.module_check: the updated module is shown to run the graph's program op for op,
without computing; every way it can differ answers False, and the torch backend's numeric
comparison (the fallback) then reports the difference."""
from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

import prunec
from prunec.backends import torch_backend
from prunec.module_check import runs_graph
from prunec.oracle import max_rel_error


def _pruned(model, x, passes="prune-channels{ratio=0.5}"):
    res = prunec.compile(model, (x,), passes=passes)
    assert res.module is model, res.module_problems
    return res


def test_pruned_torchvision_model_runs_its_graph_and_nothing_is_written():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()  # in-place hardswish / relu
    x = torch.randn(1, 3, 64, 64)
    res = _pruned(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x0 = x.clone()
    assert runs_graph(model, res.graph, (x,))
    # nothing ran, and nothing was written: the module's state and the input are untouched
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x0)
    # what the structural check stands for, computed: the module gives the graph's output
    with torch.no_grad():
        assert max_rel_error(model(x), res(x)) == 0.0


def test_a_changed_weight_or_layer_argument_is_a_mismatch():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    res = _pruned(model, x)
    assert runs_graph(model, res.graph, (x,))
    w = model.layer1[0].conv1.weight
    kept = w.detach().clone()
    with torch.no_grad():
        w[0, 0, 0, 0] += 1.0
    assert not runs_graph(model, res.graph, (x,))
    with torch.no_grad():
        w.copy_(kept)
    assert runs_graph(model, res.graph, (x,))
    model.layer1[0].conv1.dilation = (2, 2)  # same shapes at padding 2 would need another change too
    model.layer1[0].conv1.padding = (2, 2)
    assert not runs_graph(model, res.graph, (x,))
    assert torch_backend.check_module(model, res.graph, (x,)) != []  # the numbers differ, reported


class ShapeBranch(nn.Module):
    """Code that takes another path when a width changes: the shapes still fit, the math does not."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.shape[1] == 8:
            h = h * 2.0
        return self.fc2(h)


def test_silent_difference_falls_back_and_is_reported():
    torch.manual_seed(0)
    model, x = ShapeBranch().eval(), torch.randn(2, 6)
    res = prunec.compile(model, (x,), passes="prune-channels{ratio=0.5}")
    assert res.graph.consts["fc1.weight"].shape[0] == 4
    assert not runs_graph(model, res.graph, (x,))
    assert res.module is None
    assert res.module_problems == ["output 0: the updated module's result differs from the IR's "
                                   "(its Python code likely hard-codes a shape)"]


class WritesThroughAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        y[:, :2].relu_()  # a write through a view: the recorder's fx path, not the match
        return y


def test_write_through_a_view_is_not_matched_and_writes_nothing():
    model, x = WritesThroughAView().eval(), torch.randn(3, 4)
    g = prunec.trace(model, (x,))
    x0, w0 = x.clone(), model.fc.weight.detach().clone()
    assert not runs_graph(model, g, (x,))
    assert torch.equal(x, x0) and torch.equal(model.fc.weight, w0)
    assert torch_backend.check_module(model, g, (x,)) == []  # the numeric comparison agrees


def test_an_exported_graph_is_left_to_the_numeric_check():
    torch.manual_seed(0)
    model, x = ShapeBranch().eval(), torch.randn(2, 6)
    g = prunec.trace(model, (x,), tracer="export")
    assert not runs_graph(model, g, (x,))
    g2 = prunec.trace(copy.deepcopy(model), (x,))
    assert g2.tracer == "recorder" and runs_graph(model, g2, (x,))


class TransposesInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        y.t_()  # changes the operand's shape: not matched without running it
        return y * 2.0


def test_shape_changing_in_place_op_is_left_to_the_numeric_check():
    model, x = TransposesInPlace().eval(), torch.randn(2, 4)
    g = prunec.trace(model, (x,))
    assert g.tracer == "recorder"
    assert not runs_graph(model, g, (x,))
    assert torch_backend.check_module(model, g, (x,)) == []
