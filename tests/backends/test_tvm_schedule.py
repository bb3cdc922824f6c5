"""prunec's default CPU schedules (backends/tvm_schedule.py): each kernel shape against numpy,
and the structure the schedule is meant to have (packed operand, padding, in-bounds writes)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import s_tir, te  # noqa: E402

from prunec.backends import tvm_lower, tvm_schedule  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tvm_helpers import build_and_compare  # noqa: E402

pytestmark = pytest.mark.tvm


def _matmul_bias(batch: int, m: int, k: int, n: int, batched_rhs: bool):
    """z = x @ w + bias, w shared across the batch (linear) or per batch (attention)."""
    x = te.placeholder((batch, m, k), "float32", name="x")
    w = te.placeholder((batch, k, n) if batched_rhs else (k, n), "float32", name="w")
    bias = te.placeholder((n,), "float32", name="bias")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((batch, m, n), lambda b, i, j: te.sum(
        x[b, i, r] * (w[b, r, j] if batched_rhs else w[r, j]), axis=r), name="y")
    z = te.compute((batch, m, n), lambda b, i, j: y[b, i, j] + bias[j], name="z")
    return te.create_prim_func([x, w, bias, z])


def _blocks(func) -> list:
    sch = s_tir.Schedule(func)
    return [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]


def _schedule(func):
    target = tvm_lower.to_target("llvm")
    rule = tvm_schedule.RegisterTiledReduction(vec=tvm_schedule.vector_lanes(target))
    with target:
        sch = rule.apply(func, target, False)
    assert sch is not None, "the rule declined a plain matmul"
    return sch.mod["main"], target


@pytest.mark.parametrize("shape", [
    (1, 37, 24, 48, False),   # prime row count: a guarded tail register tile
    (1, 5, 16, 37, False),    # ragged columns: zero-padded, then cropped
    (3, 37, 8, 37, True),     # attention q @ k^T: per-batch right operand, both sides ragged
    (3, 37, 37, 8, True),     # attention p @ v
    (1, 1, 32, 64, False),    # one row
])
def test_gemm_schedule_matches_numpy(shape):
    batch, m, k, n, batched = shape
    func, target = _schedule(_matmul_bias(batch, m, k, n, batched))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, m, k)).astype("float32")
    w = rng.standard_normal((batch, k, n) if batched else (k, n)).astype("float32")
    bias = rng.standard_normal(n).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.zeros((batch, m, n), "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(bias), out)
    np.testing.assert_allclose(out.numpy(), np.matmul(x, w) + bias, rtol=1e-5, atol=1e-4)


def test_gemm_schedule_packs_the_operand_and_writes_in_bounds():
    func, _ = _schedule(_matmul_bias(3, 37, 8, 37, True))
    blocks = _blocks(func)
    names = {b.name_hint for b in blocks}
    assert "w_pad" in names, names  # 37 columns padded to a multiple of the vector width
    assert any(n.endswith("_global") and n.startswith("w") for n in names), names  # the packed strip
    for b in blocks:
        for region in b.writes:
            if region.source.name != "z":
                continue
            # every spatial domain of a block writing the output is the output's own extent:
            # never the padded width (TVM once reverse-inlined the crop over 48 columns)
            extents = sorted(int(iv.dom.extent) for iv in b.iter_vars)
            assert extents == sorted(int(d) for d in region.source.shape), (b.name_hint, extents)


class PrimeLengthAttention(nn.Module):
    """ViT-like: 37 tokens (ViT-B/16 has 197, a prime), a linear layer with a ragged width."""

    def __init__(self, d=48, heads=3):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 37, d) * 0.02)
        self.layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.out = nn.Linear(d, 37)

    def forward(self, x):
        return self.out(self.layer(x + self.pos))


def test_prime_length_attention_model():
    torch.manual_seed(0)
    build_and_compare(PrimeLengthAttention(), (torch.randn(1, 37, 48),))
