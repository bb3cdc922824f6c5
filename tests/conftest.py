"""Shared fixtures: small models with fixed seeds, and a registry snapshot so a
test may register passes and presets without leaking them into other tests."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """A plain TVM compile consults the user's tuning cache: tests never see (or fill) it."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


class TinyConvNet(nn.Module):
    """conv (no bias) -> batch norm -> relu -> global mean -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding them matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def tiny_model() -> TinyConvNet:
    torch.manual_seed(0)
    return randomize_bn(TinyConvNet()).eval()


@pytest.fixture
def tiny():
    """(model, example input) for TinyConvNet."""
    return tiny_model(), torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def registry_snapshot():
    """Restore the pass and preset registries after the test."""
    from prunec.registry import PASSES, PIPELINES, load_builtin_passes
    load_builtin_passes()
    passes, pipelines = dict(PASSES), dict(PIPELINES)
    yield
    PASSES.clear()
    PASSES.update(passes)
    PIPELINES.clear()
    PIPELINES.update(pipelines)


@pytest.fixture
def tests_on_path(monkeypatch):
    """Put tests/ on sys.path and PYTHONPATH (for ``package.module:factory`` specs)."""
    monkeypatch.syspath_prepend(TESTS_DIR)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p))
    return TESTS_DIR
