"""lowrank: IR rewrite, factor ranks, rank criteria, only-if-cheaper, the
activation-aware mode, the in-place module edit, errors."""
from __future__ import annotations

import pytest
import torch

import prunec
from prunec.errors import PipelineError

from _compress_models import cnn, compile_, mlp, out


def truncated(W, r):
    U, S, Vt = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]


def test_linear_becomes_two_linears_with_the_best_rank_r_product():
    model, x = mlp()
    r, orig = compile_(model, x, "lowrank{rank=5}")
    g = r.graph
    assert "fc2.weight" not in g.consts and "fc2.bias" not in g.consts
    A, B = g.tensors["fc2.0.weight"], g.tensors["fc2.1.weight"]
    assert A.shape == (5, 64) and B.shape == (48, 5)
    assert torch.equal(g.tensors["fc2.1.bias"], orig["fc2.bias"])
    assert torch.linalg.matrix_rank(B @ A) == 5
    assert torch.allclose((B @ A).double(), truncated(orig["fc2.weight"], 5), atol=1e-5)
    assert [n.op for n in g.nodes].count("linear") == 6
    ann = g.annotations["fc2.0.weight"]
    assert (ann["format"], ann["rank"], ann["layer"], ann["factor"]) == ("lowrank", 5, "fc2", 0)
    prunec.verify(g)
    # the user's module now holds nn.Sequential factors named like the IR's constants
    assert isinstance(r.module.fc2, torch.nn.Sequential)
    assert torch.equal(r.module.fc2[0].weight, A) and r.module.fc2[0].bias is None
    assert torch.allclose(r.module(x), out(r, x), atol=1e-6)
    assert r.report["after"]["params"] < r.report["before"]["params"]
    assert r.report["after"]["flops"] < r.report["before"]["flops"]


def test_conv_becomes_kxk_with_r_outputs_then_1x1():
    model, x = cnn()
    r, orig = compile_(model, x, "lowrank{rank=4,layers=[conv]}")
    g = r.graph
    A, B = g.tensors["conv2.0.weight"], g.tensors["conv2.1.weight"]
    assert A.shape == (4, 16, 3, 3) and B.shape == (32, 4, 1, 1)
    first = next(n for n in g.nodes if n.op == "conv2d" and n.args[1].name == "conv2.0.weight")
    assert list(first.args[3]) == [2, 2]  # the stride stays on the k x k factor
    W = (B.reshape(32, 4) @ A.reshape(4, -1)).double()
    assert torch.allclose(W, truncated(orig["conv2.weight"].reshape(32, -1), 4), atol=1e-5)
    assert "dw.0.weight" not in g.consts  # grouped convs are left alone
    assert isinstance(r.module.conv2, torch.nn.Sequential) and r.module.conv2[0].stride == (2, 2)
    assert torch.allclose(r.module(x), out(r, x), atol=1e-5)


def test_energy_picks_the_smallest_rank_that_reaches_it():
    model, x = mlp()
    W = model.fc1.weight.detach().clone()
    r, _ = compile_(model, x, "lowrank{energy=0.6,layers=[linear],skip=[fc2,fc3]}")
    S = torch.linalg.svdvals(W.double())
    e = (S ** 2).cumsum(0) / (S ** 2).sum()
    want = int((e < 0.6).sum()) + 1
    assert r.graph.tensors["fc1.0.weight"].shape[0] == want
    assert r.report["passes"][0]["stats"]["ranks"] == {"fc1": want}


def test_params_ratio():
    model, x = mlp()
    r, _ = compile_(model, x, "lowrank{params-ratio=0.25}")
    assert r.graph.tensors["fc2.0.weight"].shape[0] == int(0.25 * 48 * 64 / (48 + 64))


def test_only_where_cheaper_and_noop():
    model, x = mlp()
    # rank 20 of fc3 (48 -> 10): 20 * 58 > 480 weights, so it stays one layer
    r, orig = compile_(model, x, "lowrank{rank=20}")
    assert "fc3.weight" in r.graph.consts and "fc2.0.weight" in r.graph.consts
    r, orig = compile_(*mlp(), "lowrank{energy=1.0}")
    assert not r.report["passes"][0]["changed"]
    assert all(torch.equal(r.graph.tensors[k], orig[k]) for k in orig) and not r.graph.module_edits


def test_activation_aware_mode_lowers_the_output_error():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 64))
    scale = torch.logspace(-2, 1, 64)  # inputs whose features differ in scale, as in LLMs
    x = torch.randn(256, 64) * scale
    ref = lin(x).detach()
    errs = {}
    for mode in ("svd", "activation"):
        m = torch.nn.Sequential(torch.nn.Linear(64, 64))
        m.load_state_dict(lin.state_dict())
        r = prunec.compile(m, (x,), passes=f"lowrank{{rank=8,mode={mode}}}")
        assert r.graph.tensors["0.0.weight"].shape == (8, 64)
        errs[mode] = (out(r, x) - ref).norm().item()
    assert errs["activation"] < 0.5 * errs["svd"]


def test_root_module_is_not_factorized():
    r = prunec.compile(torch.nn.Linear(64, 64), (torch.randn(2, 64),), passes="lowrank{rank=2}")
    assert not r.report["passes"][0]["changed"]


def test_activation_mode_needs_calibration_inputs():
    from prunec.passmanager import PassManager
    model, x = mlp()
    g = prunec.trace(model, (x,))
    with pytest.raises(prunec.PassFailure, match="calibration inputs"):
        PassManager("lowrank{rank=2,mode=activation}").run(g)


@pytest.mark.parametrize("text, words", [
    ("lowrank{rank=4,energy=0.9}", ["lowrank", "energy", "one of rank, energy, params-ratio"]),
    ("lowrank{rank=0}", ["lowrank", "rank=0", ">= 1"]),
    ("lowrank{energy=1.2}", ["lowrank", "energy", "<= 1"]),
    ("lowrank{mode=asvd}", ["lowrank", "mode", "svd, activation"]),
    ("lowrank{layers=[embedding]}", ["lowrank", "layers", "linear and conv"]),
])
def test_bad_options(text, words):
    with pytest.raises(PipelineError) as e:
        prunec.parse_pipeline(text).instantiate()
    assert all(w in str(e.value) for w in words), str(e.value)
