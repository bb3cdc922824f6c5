"""prunec.FastActivations: GELU / tanh-GELU / sigmoid / SiLU / softmax lowered to polynomial
exp / erf / tanh on CPU, within a few 1e-7 of torch; ``fast_math=False`` keeps the exact calls."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from prunec.backends import tvm_backend, tvm_lower  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tvm_helpers import build_and_compare, max_rel_err  # noqa: E402

pytestmark = pytest.mark.tvm


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 24)

    def forward(self, x):
        y = self.fc(x * 4)  # wide range: the approximations clamp at |x| = 4 (erf) and 88 (exp)
        return torch.cat([nn.functional.gelu(y), nn.functional.gelu(y, approximate="tanh"), torch.sigmoid(y),
                          nn.functional.silu(y), torch.softmax(y, -1), torch.tanh(y)], -1)


_TRANSCENDENTAL = ("T.erf(", "T.exp(", "T.tanh(", "T.sigmoid(")


def _kernel_text(model, x, fast_math: bool) -> str:
    import prunec
    res = prunec.compile(model, (x,), passes="", in_place=False)
    target = tvm_lower.to_target("llvm")
    mod, _ = tvm_backend.lower(res.graph, (x,), target, fast_math=fast_math)
    return "\n".join(f.script() for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def test_fast_activations_match_torch():
    torch.manual_seed(0)
    model, x = Activations().eval(), torch.randn(2, 24)
    res = build_and_compare(model, (x,), tol=2e-6)
    assert res.artifact.meta()["fast_math"] is True
    assert not any(t in _kernel_text(model, x, True) for t in _TRANSCENDENTAL)


def test_exact_math_keeps_the_library_calls():
    import prunec
    torch.manual_seed(0)
    model, x = Activations().eval(), torch.randn(2, 24)
    text = _kernel_text(model, x, False)
    assert "T.erf(" in text and "T.exp(" in text
    res = prunec.compile(model, (x,), passes="", target="llvm", in_place=False,
                         target_options={"fast_math": False})
    assert res.artifact.meta()["fast_math"] is False
    with torch.no_grad():
        ref = model(x)
    assert max_rel_err(res.artifact.load()(x), [ref]) <= 1e-6


def test_passes_in_a_users_own_pipeline_as_documented():
    """docs/tvm-backend.md's own-pipeline example: prunec's passes in a hand-built TVM pipeline, fast
    math after PointwiseAsMatmul (which moved the SiLU above the 1x1's reshape, into its kernel)."""
    import numpy as np
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from prunec.backends.tvm import (FuseExpandDepthwise, PointwiseAsMatmul, SparseDenseRewrite, fast_activations,
                                     relax_passes)
    from prunec.backends.tvm_schedule import schedule_pass
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                          nn.Conv2d(32, 8, 1)).eval()
    x = torch.randn(1, 8, 32, 32)
    target = tvm_lower.to_target("llvm")
    mod = from_exported_program(torch.export.export(model, (x,)))
    seq = tvm.transform.Sequential([*relax_passes(target)[:2], SparseDenseRewrite(target, mode="auto"),
                                    FuseExpandDepthwise(target), PointwiseAsMatmul(target), fast_activations,
                                    relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                    relax.transform.FuseTIR()])
    with target:
        mod = schedule_pass(target)(seq(mod))
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert any("matmul" in n and "fast_exp" in n for n in names), names
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    out = out if hasattr(out, "numpy") else out[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(out.numpy() - ref).max() <= 1e-4 * np.abs(ref).max()
