"""GEMM weights stored row-tile by row-tile at compile time (backends/tvm_pack_weights.py): the
layout, which kernels get it (a weight every call site passes as a constant), and built models
against torch."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import relax, te, tirx  # noqa: E402

from prunec.backends import tvm_backend, tvm_lower, tvm_pack_weights, tvm_schedule  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tvm_helpers import build_and_compare  # noqa: E402

pytestmark = pytest.mark.tvm


def test_packed_layout_is_row_tiles_then_reduction_then_row():
    w = np.arange(14 * 3, dtype="float32").reshape(14, 3)
    p = tvm_pack_weights.packed(w, 6)
    assert p.shape == (3, 3, 6) and p.flags["C_CONTIGUOUS"]
    for i in range(18):
        for k in range(3):
            assert p[i // 6, k, i % 6] == (w[i, k] if i < 14 else 0.0), (i, k)  # the last tile zero-padded


def _matmul_kernel(m: int, k: int, n: int):
    """y = W[m, k] @ x[k, n], as the GEMM schedule sees a 1x1 on a small plane."""
    w = te.placeholder((m, k), "float32", name="w")
    x = te.placeholder((k, n), "float32", name="x")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((m, n), lambda i, j: te.sum(w[i, r] * x[r, j], axis=r), name="y")
    return te.create_prim_func([w, x, y])


def _module(m: int, k: int, n: int, weights: list):
    """main(x) calling the kernel once per entry of ``weights`` (an array: a constant; None: the
    function's own weight input), summing the results."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((k, n), "float32"))
    wv = relax.Var("w", relax.TensorType((m, k), "float32"))
    params = [x] + ([wv] if any(w is None for w in weights) else [])
    with bb.function("main", params):
        gv = bb.add_func(_matmul_kernel(m, k, n).with_attr("global_symbol", "gemm"), "gemm")
        with bb.dataflow():
            outs = [bb.emit(relax.call_tir(gv, (relax.const(w) if w is not None else wv, x),
                                           relax.TensorType((m, n), "float32"))) for w in weights]
            total = outs[0]
            for o in outs[1:]:
                total = bb.emit(relax.op.add(total, o))
            out = bb.emit_output(total)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, target, *args):
    ex = tvm.compile(mod, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


@pytest.mark.parametrize("m", [480, 640])  # whole tiles of 6 rows; a ragged last tile (640 = 106 x 6 + 4)
def test_constant_weights_are_packed_and_the_result_is_unchanged(m):
    k, n = 160, 49
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((m, k)).astype("float32") for _ in range(2)]
    x = rng.standard_normal((k, n)).astype("float32")
    target = tvm_lower.to_target("llvm")
    mod = tvm_schedule.schedule_module(_module(m, k, n, ws), target)
    kernel = next(f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc))
    assert dict(kernel.attrs[tvm_pack_weights.PACKED_ROWS]) == {0: 6}, kernel.attrs
    assert [int(d) for d in kernel.params[0].shape] == [-(-m // 6), k, 6]
    # both call sites pass their own constant in the kernel's layout
    consts = [call.args[1].fields[0].value.numpy() for call in tvm_pack_weights._calls(mod)]
    assert len(consts) == 2
    for c, w in zip(consts, ws):
        np.testing.assert_array_equal(c, tvm_pack_weights.packed(w, 6))
    np.testing.assert_allclose(_run(mod, target, x), ws[0] @ x + ws[1] @ x, rtol=1e-4, atol=1e-3)


def test_a_weight_not_constant_at_every_call_site_keeps_its_layout():
    m, k, n = 480, 160, 49
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((m, k)).astype("float32")
    w1 = rng.standard_normal((m, k)).astype("float32")
    x = rng.standard_normal((k, n)).astype("float32")
    target = tvm_lower.to_target("llvm")
    marked = tvm_pack_weights.mark_constant_params(_module(m, k, n, [w0, None]))
    assert tvm_pack_weights.CONSTANT_PARAMS not in (marked["gemm"].attrs or {}), marked["gemm"].attrs
    both = tvm_pack_weights.mark_constant_params(_module(m, k, n, [w0, w1]))
    assert list(both["gemm"].attrs[tvm_pack_weights.CONSTANT_PARAMS]) == [0], both["gemm"].attrs
    mod = tvm_schedule.schedule_module(_module(m, k, n, [w0, None]), target)
    kernel = next(f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc))
    assert tvm_pack_weights.PACKED_ROWS not in (kernel.attrs or {}), kernel.attrs
    np.testing.assert_allclose(_run(mod, target, x, w1), w0 @ x + w1 @ x, rtol=1e-4, atol=1e-3)


class _SevenBySeven(nn.Module):
    """MobileNetV2's last block and head at 7x7: 1x1s as GEMMs with 160 -> 960, 960 -> 160 (a residual
    add) and 160 -> 640 rows (640: a ragged last tile)."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(160, 960, 1)
        self.dw = nn.Conv2d(960, 960, 3, padding=1, groups=960)
        self.project = nn.Conv2d(960, 160, 1)
        self.head = nn.Conv2d(160, 640, 1)

    def forward(self, x):
        y = self.project(nn.functional.relu6(self.dw(nn.functional.relu6(self.expand(x))))) + x
        return nn.functional.relu6(self.head(y))


@pytest.mark.parametrize("passes", ["", "prune-channels{ratio=0.5}"])
def test_built_model_matches_torch(passes):
    torch.manual_seed(0)
    inputs = (torch.randn(1, 160, 7, 7),)
    result = build_and_compare(_SevenBySeven(), inputs, passes=passes)
    # ... with its three 1x1s' weights packed
    target = tvm_lower.to_target("llvm")
    mod, _ = tvm_backend.lower(result.graph, inputs, target)
    mod = tvm_schedule.schedule_module(mod, target)
    packed = [gv.name_hint for gv, f in mod.functions.items()
              if isinstance(f, tirx.PrimFunc) and tvm_pack_weights.PACKED_ROWS in (f.attrs or {})]
    assert len(packed) == 3, packed


def test_a_kernel_also_used_in_place_keeps_its_layout():
    """A kernel referenced other than by ``call_tir`` (here ``call_tir_inplace``, with a weight that is
    not a constant) is left out, even where its ``call_tir`` passes a constant."""
    m, k, n = 96, 49, 49
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((k, n), "float32"))
    w = relax.Var("w", relax.TensorType((m, k), "float32"))
    with bb.function("main", [x, w]):
        gv = bb.add_func(_matmul_kernel(m, k, n).with_attr("global_symbol", "gemm"), "gemm")
        with bb.dataflow():
            a = bb.emit(relax.call_tir(gv, (relax.const(np.ones((m, k), "float32")), x),
                                       relax.TensorType((m, n), "float32")))
            b = bb.emit(relax.call_tir_inplace(gv, (w, x), [0], relax.TensorType((m, n), "float32")))
            out = bb.emit_output(relax.op.add(a, b))
        bb.emit_func_output(out)
    marked = tvm_pack_weights.mark_constant_params(bb.get())
    assert tvm_pack_weights.CONSTANT_PARAMS not in (marked["gemm"].attrs or {}), marked["gemm"].attrs
