"""A model factory importable as ``_helpers_artifact:small_cnn_module`` by the CLI tests."""
import torch
from torch import nn


def small_cnn_module():
    torch.manual_seed(0)
    return _Net().eval()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(y.mean((2, 3)))


def small_cnn():
    return small_cnn_module(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
