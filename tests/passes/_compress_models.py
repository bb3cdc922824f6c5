"""Small seeded models and helpers shared by the compression-pass tests."""
from __future__ import annotations

import torch
from torch import nn

import prunec


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """conv1 has 3 input channels (not a multiple of 4), conv2/conv3 do; dw is depthwise."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv3 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        y = torch.relu(self.conv3(torch.relu(self.dw(y))))
        return self.fc(y.mean((2, 3)))


def mlp():
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(8, 32, generator=torch.Generator().manual_seed(1))


def cnn():
    torch.manual_seed(0)
    return CNN().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def compile_(model, x, passes):
    """Compile a copy of the original weights; returns (result, original state dict)."""
    orig = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return prunec.compile(model, (x,), passes=passes), orig


def weights(graph, kinds=("linear", "conv")):
    from prunec.selection import weight_layers
    return {w.name: graph.tensors[w.name] for _, w, _, _ in weight_layers(graph, kinds)}


def out(result, x):
    return prunec.interpret(result.graph, (x,))[0]
