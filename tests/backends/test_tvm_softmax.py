"""prunec.RowSoftmax (backends/tvm_softmax.py): which softmaxes become prunec's row kernel, the IR
it leaves, the kernel against numpy (ragged rows, -inf scores, fully masked rows), and attention
built end to end against torch."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

import prunec  # noqa: E402
from prunec.backends import tvm_lower, tvm_schedule, tvm_sparse  # noqa: E402
from prunec.backends.tvm_backend import lower  # noqa: E402
from prunec.backends.tvm_softmax import RowSoftmax, row_softmax  # noqa: E402
from prunec.ir import interpret  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tvm_helpers import max_rel_err, op_names  # noqa: E402

pytestmark = pytest.mark.tvm

_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})


class _Attention(nn.Module):
    """Scaled dot-product attention with an additive mask: torch.export writes PyTorch's safe softmax."""

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _Softmax(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return torch.softmax(x * 2.0, dim=self.dim)


def _imported(model, *inputs):
    program = torch.export.export(model.eval(), inputs)
    return tvm_lower.fold_constant_weights(tvm_lower.import_program(program))


def _run(mod, *inputs):
    with _TARGET:
        mod = tvm.transform.Sequential(tvm_lower.legalize_and_fuse())(mod)
        mod = tvm_schedule.schedule_module(mod, _TARGET)
    ex = tvm.compile(mod, _TARGET, relax_pipeline=tvm_lower.finalize_pipeline(_TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs])
    out = out if hasattr(out, "numpy") else out[0]  # a 1-tuple from torch.export
    return out.numpy()


def _kernels(mod) -> list[str]:
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def _attention_inputs(seq=13, masked_row=4):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, seq, 8)).astype("float32") for _ in range(3))
    mask = np.where(rng.random((seq, seq)) < 0.3, -np.inf, 0.0).astype("float32")
    mask[:, 0] = 0.0
    mask[masked_row] = -np.inf  # a query that sees nothing: the safe softmax gives 0, not NaN
    return q, k, v, mask


def test_the_safe_softmax_of_attention_becomes_one_kernel():
    inputs = _attention_inputs()
    before = _imported(_Attention(), *map(torch.from_numpy, inputs))
    ops = op_names(before)
    assert "relax.nn.softmax" in ops and "relax.where" in ops and "relax.equal" in ops, ops
    rewrite = RowSoftmax(_TARGET, lanes=16)
    after = rewrite(before)
    assert rewrite.count == 1
    ops = op_names(after)
    # the softmax, the -inf test and its max-reduction, the where and its zeros are gone
    for gone in ("relax.nn.softmax", "relax.where", "relax.equal", "relax.max", "relax.logical_not"):
        assert gone not in ops, (gone, ops)
    assert ops.count("relax.call_tir") == 1, ops
    assert _kernels(after) == ["prunec_safe_softmax"]
    assert after["prunec_safe_softmax"].attrs["tirx.is_scheduled"]
    got, ref = _run(after, *inputs), _run(before, *inputs)
    want = F.scaled_dot_product_attention(*map(torch.from_numpy, inputs)).numpy()
    assert not np.isnan(want).any() and not want[0, :, 4].any()  # torch: the masked query gives zeros
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)


def test_a_plain_softmax_over_the_last_axis_becomes_the_plain_kernel():
    x = np.random.default_rng(2).standard_normal((3, 5, 37)).astype("float32")
    before = _imported(_Softmax(-1), torch.from_numpy(x))
    rewrite = RowSoftmax(_TARGET, lanes=16)
    after = rewrite(before)
    assert rewrite.count == 1 and _kernels(after) == ["prunec_softmax"]
    assert "relax.nn.softmax" not in op_names(after)
    np.testing.assert_allclose(_run(after, x), torch.softmax(torch.from_numpy(x) * 2, -1).numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,why", [
    (lambda: (_Softmax(1), torch.randn(3, 5, 37)), "a softmax over another axis"),
    (lambda: (_Softmax(-1), torch.randn(3, 37).half()), "float16 scores"),
])
def test_other_softmaxes_are_left_alone(make, why):
    model, x = make()
    before = _imported(model, x)
    rewrite = RowSoftmax(_TARGET, lanes=16)
    after = rewrite(before)
    assert rewrite.count == 0 and after.same_as(before), why


def test_cuda_modules_are_left_alone():
    before = _imported(_Attention(), *map(torch.from_numpy, _attention_inputs()))
    rewrite = RowSoftmax(tvm.target.Target({"kind": "cuda"}))
    assert rewrite(before).same_as(before) and rewrite.count == 0


@pytest.mark.parametrize("n,lanes", [(197, 16), (128, 16), (7, 16), (33, 8), (16, 16)])
@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("fast", [True, False])
def test_kernel_matches_numpy(n, lanes, safe, fast):
    """Ragged rows (197 = 12 x 16 + 5), whole vectors, rows shorter than a vector; -inf scores
    in the vector part and in the tail, a fully masked row, large scores."""
    rows = 9
    rng = np.random.default_rng(n)
    x = (4 * rng.standard_normal((rows, n))).astype("float32")
    x[1, ::3] = -np.inf
    x[2, -1] = -np.inf
    x[3] = -np.inf  # fully masked
    x[4] += 80.0  # exp would overflow without the max
    lib, dev, args = tvm_sparse.build_func(row_softmax(rows, n, lanes, safe, fast), _TARGET,
                                           [x, np.zeros_like(x)])
    lib["main"](*args)
    got = args[1].numpy()
    live = [r for r in range(rows) if r != 3]
    e = np.exp(x[live].astype("float64") - x[live].max(1, keepdims=True))
    np.testing.assert_allclose(got[live], e / e.sum(1, keepdims=True), rtol=2e-6, atol=1e-7)
    assert (got[1, ::3] == 0).all() if not fast else (got[1, ::3] < 1e-30).all()
    if safe:
        assert (got[3] == 0).all()
    else:
        assert np.isnan(got[3]).all()  # as torch.softmax
    np.testing.assert_allclose(got[live].sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("fast_math", [True, False])
def test_built_attention_matches_torch(fast_math):
    """Through prunec.compile: nn.MultiheadAttention (its SDPA) with a mask under which one query
    sees nothing and one key is hidden from all."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            mask = torch.zeros(11, 11)
            mask[3] = float("-inf")
            mask[:, 5] = float("-inf")
            self.register_buffer("mask", mask)

        def forward(self, x):
            return self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0]
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 11, 32)
    result = prunec.compile(model, (x,), target="llvm", in_place=False, target_options={"fast_math": fast_math})
    with torch.no_grad():
        ref, want = interpret(result.graph, (x,)), model(x)
    assert not torch.isnan(want).any()
    got = result.artifact.load()(x)
    assert max_rel_err(got, ref) <= 1e-5 and max_rel_err(got, [want]) <= 1e-5
    mod, _ = lower(result.graph, (x,), _TARGET, fast_math=fast_math)
    assert "prunec_safe_softmax" in _kernels(mod)
