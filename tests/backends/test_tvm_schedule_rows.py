"""RowReduction (backends/tvm_schedule_rows.py): row-wise kernels (layer norm, softmax, RMS norm)
against numpy, and the structure the rule is meant to produce: vector partial sums where the
row length is a multiple of the vector width, none where it is ragged."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import te, tirx, topi  # noqa: E402

from prunec.backends import tvm_lower, tvm_schedule  # noqa: E402
from prunec.backends.tvm_schedule_rows import RowReduction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tvm_helpers import build_and_compare  # noqa: E402

pytestmark = pytest.mark.tvm


def _layer_norm(rows: int, width: int):
    x = te.placeholder((1, rows, width), "float32", name="x")
    g = te.placeholder((width,), "float32", name="g")
    b = te.placeholder((width,), "float32", name="b")
    return te.create_prim_func([x, g, b, topi.nn.layer_norm(x, g, b, axis=[2], epsilon=1e-5)])


def _softmax(rows: int, width: int):
    x = te.placeholder((2, rows, width), "float32", name="x")
    return te.create_prim_func([x, topi.nn.softmax(x, axis=-1)])


def _rms_norm(rows: int, width: int):
    x = te.placeholder((rows, width), "float32", name="x")
    g = te.placeholder((width,), "float32", name="g")
    return te.create_prim_func([x, g, topi.nn.rms_norm(x, g, axis=[1], epsilon=1e-5)])


def _ref(kind: str, args: list[np.ndarray]) -> np.ndarray:
    x = args[0].astype("float64")
    if kind == "layer_norm":
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * args[1] + args[2]
    if kind == "softmax":
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * args[1]


_MAKERS = {"layer_norm": _layer_norm, "softmax": _softmax, "rms_norm": _rms_norm}


def _scheduled(func):
    target = tvm_lower.to_target("llvm")
    lanes = tvm_schedule.vector_lanes(target)
    with target:
        sch = RowReduction(lanes).apply(func, target, False)
    assert sch is not None, "the rule declined a row-wise kernel"
    return sch, target, lanes


def _loop_kinds(sch) -> dict[str, list]:
    """Each block's name: the kinds of the loops around it, outermost first."""
    return {sch.get(b).name_hint: [sch.get(lp).kind for lp in sch.get_loops(b)]
            for b in sch.get_child_blocks(sch.get_sblock("root"))}


def _vectorized_partials(sch) -> list[str]:
    """Blocks that update vector partial results (rfactor) inside a vectorized loop."""
    return sorted(n for n, kinds in _loop_kinds(sch).items()
                  if n.endswith("_rf_update") and kinds and kinds[-1] == tirx.ForKind.VECTORIZED)


@pytest.mark.parametrize("kind,rows,width", [
    ("layer_norm", 37, 64),    # width a multiple of both vector widths: partial sums
    ("layer_norm", 5, 197),    # ragged (prime) width: scalar reductions, LLVM-vectorized rows
    ("softmax", 7, 128),       # BERT's sequence length
    ("softmax", 3, 37),        # ViT's prime token count, scaled down
    ("rms_norm", 9, 48),       # 3 (AVX-512) or 6 (AVX2) vectors per row
])
def test_row_kernel_matches_numpy(kind, rows, width):
    sch, target, lanes = _scheduled(_MAKERS[kind](rows, width))
    func = sch.mod["main"]
    rng = np.random.default_rng(0)
    shapes = [[int(d) for d in p.shape] for p in func.params]
    args = [rng.standard_normal(s).astype("float32") * (4 if i == 0 else 1) for i, s in enumerate(shapes[:-1])]
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.zeros(shapes[-1], "float32"))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    np.testing.assert_allclose(out.numpy(), _ref(kind, args), rtol=1e-5, atol=2e-5)
    partials = _vectorized_partials(sch)
    if width % lanes == 0 and width >= 2 * lanes:
        assert partials, f"{kind} {rows}x{width}: no vectorized partial sums ({lanes} lanes)"
    else:
        assert not partials, f"{kind} {rows}x{width}: partial sums on a ragged row: {partials}"


def test_rows_run_under_one_parallel_loop():
    sch, _, _ = _scheduled(_layer_norm(37, 64))
    outer = {sch.get(b).name_hint: sch.get(sch.get_loops(b)[0]) for b in sch.get_child_blocks(sch.get_sblock("root"))}
    firsts = list(outer.values())
    assert all(lp.same_as(firsts[0]) for lp in firsts), "stages are not under one loop"
    assert firsts[0].kind == tirx.ForKind.PARALLEL and int(firsts[0].extent) == 37


def test_declines_a_kernel_without_a_reduction():
    x = te.placeholder((4, 32), "float32", name="x")
    y = te.compute((4, 32), lambda i, j: x[i, j] * 2.0, name="y")
    z = te.compute((4, 32), lambda i, j: y[i, j] + 1.0, name="z")
    target = tvm_lower.to_target("llvm")
    with target:
        assert RowReduction().apply(te.create_prim_func([x, z]), target, False) is None


class NormAttention(nn.Module):
    """BERT-like block with a 32-token sequence: layer norms and a softmax whose rows are a multiple
    of the vector width, through the whole compile."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.layer(x))


def test_transformer_block_matches_torch():
    torch.manual_seed(0)
    build_and_compare(NormAttention(), (torch.randn(1, 32, 64),))
