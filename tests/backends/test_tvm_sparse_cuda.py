"""CUDA sparse kernels: built for cuda without a GPU; exact against dense on a GPU when one is present."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from prunec.backends import tvm_sparse, tvm_sparse_gpu  # noqa: E402
from prunec.backends.tvm_lower import to_target  # noqa: E402
from prunec.target import parse_target  # noqa: E402

pytestmark = pytest.mark.tvm
CUDA = to_target(parse_target("cuda"))
needs_gpu = pytest.mark.skipif(not tvm_sparse_gpu.has_gpu(),
                               reason="no CUDA GPU on this machine (tvm.cuda(0).exist is False)")


def _pattern(n, k, r, density, rng):
    w = rng.standard_normal((n, k)).astype("float32")
    w *= np.repeat(rng.random((n // r, k)) < density, r, axis=0)
    w[0] = 0.0                                              # an empty row
    w[-1] = np.arange(1, k + 1, dtype="float32")            # a fully dense row
    return w


def _run_gpu(func, args, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), CUDA)
    dev, targs = tvm_sparse_gpu.to_device(list(args) + [np.zeros(out_shape, "float32")])
    lib["main"](*targs)
    dev.sync()
    return targs[-1].numpy()


@needs_gpu
@pytest.mark.parametrize("m,k,n,r,density", [(1, 64, 48, 16, 0.2), (3, 37, 16, 8, 0.1), (5, 23, 20, 4, 0.5),
                                             (128, 96, 64, 16, 0.1), (2, 31, 7, 1, 0.3), (9, 16, 32, 16, 0.0)])
def test_bsr_linear_cuda_exact(m, k, n, r, density):
    rng = np.random.default_rng(m * 1000 + k)
    w = _pattern(n, k, r, density, rng)
    data, idx, ptr = tvm_sparse.to_bsr(w, r)
    x = rng.standard_normal((m, k)).astype("float32")
    y = _run_gpu(tvm_sparse_gpu.bsr_xwt(m, k, n, r, len(idx)), [x, data, idx, ptr], (m, n))
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-4)


@needs_gpu
@pytest.mark.parametrize("b,n,k,p,r,density", [(1, 32, 16, 49, 8, 0.2), (2, 24, 13, 17, 1, 0.4),
                                               (1, 16, 8, 3, 16, 0.0), (2, 64, 40, 300, 16, 0.3)])
def test_bsr_conv1x1_cuda_exact(b, n, k, p, r, density):
    rng = np.random.default_rng(n + k + p)
    w = _pattern(n, k, r, density, rng)
    data, idx, ptr = tvm_sparse.to_bsr(w, r)
    x = rng.standard_normal((b, k, p)).astype("float32")
    y = _run_gpu(tvm_sparse_gpu.bsr_wx(b, n, k, p, r, len(idx)), [x, data, idx, ptr], (b, n, p))
    np.testing.assert_allclose(y, np.einsum("nk,bkp->bnp", w, x), rtol=1e-5, atol=1e-4)


def _block_sparse_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    with torch.no_grad():
        for lin in (model[0], model[2]):
            keep = torch.rand(lin.out_features // 16, lin.in_features) < 0.1
            lin.weight.mul_(keep.repeat_interleave(16, 0))
    return model, torch.randn(4, 64)


def test_cuda_build_chooses_sparse_kernels_per_layer():
    """Without a GPU the per-layer choice falls back to the cost model; with one it is measured."""
    import prunec
    model, x = _block_sparse_mlp()
    res = prunec.compile(model, (x,), target="cuda", in_place=False)
    layers = res.artifact.sparse_report
    assert len(layers) == 2, layers
    if tvm_sparse_gpu.has_gpu():  # measured on the GPU: the faster kernel wins
        for l in layers:
            assert l["reason"] == "measured" and l["choice"] == ("sparse" if l["sparse_ms"] < l["dense_ms"] else "dense")
    else:
        assert [(l["choice"], l["reason"]) for l in layers] == [("sparse", "cost model")] * 2, layers
    assert res.artifact.meta()["device"] == "cuda"


@needs_gpu
def test_cuda_sparse_model_matches_torch():
    import prunec
    model, x = _block_sparse_mlp()
    res = prunec.compile(model, (x,), target="cuda", in_place=False,
                         target_options={"sparse": {"mode": "sparse"}})
    assert all(l["choice"] == "sparse" for l in res.artifact.sparse_report)
    ref = model(x).detach().numpy()
    got = res.artifact.load()(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
