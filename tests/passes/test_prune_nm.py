"""prune-nm: every group of m along the input channels keeps at most n non-zeros."""
from __future__ import annotations

import pytest
import torch

import prunec
from prunec.errors import PipelineError

from _compress_models import cnn, compile_, mlp, out


def groups_along_inputs(t, m):
    """Independent of prunec's helper: [out, in, *k] -> groups of m input channels."""
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1)
    return t.reshape(-1, m)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 16)])
def test_pattern_holds_and_keeps_the_largest(n, m):
    model, x = cnn()
    r, orig = compile_(model, x, f"prune-nm{{n={n},m={m}}}")
    for name in ("conv2.weight", "conv3.weight", "fc.weight"):
        t, o = r.graph.tensors[name], orig[name]
        if o.shape[1] % m:
            continue
        g, go = groups_along_inputs(t, m), groups_along_inputs(o, m)
        assert ((g != 0).sum(1) == n).all()  # random weights: exactly n survivors
        assert torch.equal(g[g != 0], go[g != 0])
        kept_min = torch.where(g != 0, go.abs(), torch.inf).amin(1)
        gone_max = torch.where(g == 0, go.abs(), -torch.inf).amax(1)
        assert (gone_max <= kept_min).all()
        ann = r.graph.annotations[name]
        assert (ann["format"], ann["n"], ann["m"]) == ("nm", n, m)
    assert r.module is not None and torch.allclose(r.module(x), out(r, x), atol=1e-5)


def test_layers_that_do_not_divide_are_skipped():
    model, x = cnn()
    r, orig = compile_(model, x, "prune-nm")
    g = r.graph.tensors
    assert torch.equal(g["conv1.weight"], orig["conv1.weight"])  # 3 input channels
    assert torch.equal(g["dw.weight"], orig["dw.weight"])  # depthwise: 1 channel per group
    stats = r.report["passes"][0]["stats"]
    assert stats["layers-skipped"] == 2 and stats["layers-pruned"] == 3
    assert "conv1.weight" not in r.graph.annotations


def test_linear_groups_are_consecutive_inputs():
    model, x = mlp()
    r, _ = compile_(model, x, "prune-nm{layers=[linear]}")
    w = r.graph.tensors["fc1.weight"]
    assert ((w.view(64, 8, 4) != 0).sum(2) <= 2).all()
    assert r.graph.annotations["fc1.weight"]["stored_bytes"] < w.numel() * 4 * 0.6


def test_noop_and_idempotent():
    model, x = cnn()
    r, orig = compile_(model, x, "prune-nm{n=4,m=4}")
    assert not r.report["passes"][0]["changed"] and not r.graph.annotations
    assert all(torch.equal(r.graph.tensors[k], orig[k]) for k in orig)
    r, _ = compile_(*cnn(), "prune-nm,prune-nm")
    assert [p["changed"] for p in r.report["passes"]] == [True, False]


@pytest.mark.parametrize("text, words", [
    ("prune-nm{n=5,m=4}", ["prune-nm", "'n=5'", "n must be <= m"]),
    ("prune-nm{m=0}", ["prune-nm", "'m=0'", ">= 1"]),
    ("prune-nm{n=-1}", ["prune-nm", "n", ">= 0"]),
    ("prune-nm{layers=[embedding,foo]}", ["prune-nm", "layers", "foo"]),
])
def test_bad_options(text, words):
    with pytest.raises(PipelineError) as e:
        prunec.parse_pipeline(text).instantiate()
    assert all(w in str(e.value) for w in words), str(e.value)
