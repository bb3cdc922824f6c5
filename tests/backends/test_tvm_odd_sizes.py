"""Models at input sizes other than 224, built for an AVX2 CPU: rows that no vector width divides and
odd rows under stride 2 take other paths through the schedules (MobileNetV2 at 225x225 did not compile
for AVX2 until the twenty-first session; the fused expansion + depthwise kernel read one column past
its padded plane on odd rows)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("tvm")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tvm_helpers import build_and_compare  # noqa: E402

pytestmark = [pytest.mark.tvm, pytest.mark.zoo]

_AVX2 = '{"kind": "llvm", "mcpu": "haswell"}'  # runs on any AVX2 host, whatever this one has


@pytest.mark.parametrize("name,size", [
    ("mobilenet_v2", 225),        # 113 -> 57 -> 29 -> 15 -> 8: odd rows under every stride
    ("mnasnet0_5", 229),          # 5x5 fused blocks on odd rows
    ("shufflenet_v2_x0_5", 225),  # fused blocks without an activation after the depthwise
    ("resnet18", 225),            # strided 3x3s and 1x1s on odd planes
])
@pytest.mark.parametrize("passes", ["fold-bn", "fold-bn,prune-channels{ratio=0.5}"])
@pytest.mark.parametrize("lanes", [8, 16])
def test_odd_input_sizes_match_torch(name, size, passes, lanes, monkeypatch):
    """``lanes`` = 16 schedules as for AVX-512 (LLVM splits each vector in two for AVX2), so the
    AVX-512 tilings run on any AVX2 host."""
    tv = pytest.importorskip("torchvision")
    from prunec.backends import tvm_schedule
    monkeypatch.setattr(tvm_schedule, "vector_lanes", lambda target: lanes)
    torch.manual_seed(0)
    build_and_compare(getattr(tv.models, name)(), (torch.randn(1, 3, size, size),), passes=passes, target=_AVX2)
