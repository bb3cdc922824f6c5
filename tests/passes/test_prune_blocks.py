"""prune-blocks: every tile is all-zero or kept, the zeroed tiles have the smallest norm."""
from __future__ import annotations

import pytest
import torch

import prunec
from prunec.errors import PipelineError

from _compress_models import cnn, compile_, mlp


def tiles(t, bh, bw):
    t2 = t.reshape(t.shape[0], -1)
    return t2.reshape(t2.shape[0] // bh, bh, t2.shape[1] // bw, bw).transpose(1, 2).reshape(-1, bh * bw)


@pytest.mark.parametrize("block, ratio", [("4x4", 0.5), ("1x16", 0.75), ("2x8", 0.3)])
def test_blocks_are_zero_or_kept(block, ratio):
    bh, bw = map(int, block.split("x"))
    model, x = mlp()
    r, orig = compile_(model, x, f"prune-blocks{{block={block},ratio={ratio}}}")
    for name in ("fc1.weight", "fc2.weight"):
        tb, ob = tiles(r.graph.tensors[name], bh, bw), tiles(orig[name], bh, bw)
        zero = (tb == 0).all(1)
        assert torch.equal(tb[~zero], ob[~zero])  # kept tiles untouched
        assert int(zero.sum()) == round(ratio * tb.shape[0])
        norms = ob.norm(dim=1)
        assert norms[zero].max() <= norms[~zero].min()
        ann = r.graph.annotations[name]
        assert ann["format"] == "block" and ann["block"] == [bh, bw]
        assert ann["nnz_blocks"] == int((~zero).sum())


def test_conv_viewed_as_out_by_in_k_k_and_indivisible_skipped():
    model, x = cnn()
    r, orig = compile_(model, x, "prune-blocks{block=4x16,ratio=0.5,criterion=l1}")
    t, o = r.graph.tensors["conv2.weight"], orig["conv2.weight"]  # [32, 16*3*3 = 144]
    tb, ob = tiles(t, 4, 16), tiles(o, 4, 16)
    zero = (tb == 0).all(1)
    assert int(zero.sum()) == round(0.5 * tb.shape[0])
    assert ob.abs().sum(1)[zero].max() <= ob.abs().sum(1)[~zero].min()
    assert torch.equal(r.graph.tensors["conv1.weight"], orig["conv1.weight"])  # 3*9 = 27 columns
    assert r.report["passes"][0]["stats"]["layers-skipped"] >= 1
    assert r.module is not None


def test_noop():
    model, x = mlp()
    r, orig = compile_(model, x, "prune-blocks{ratio=0}")
    assert not r.report["passes"][0]["changed"] and not r.graph.annotations
    assert all(torch.equal(r.graph.tensors[k], orig[k]) for k in orig)


@pytest.mark.parametrize("text, words", [
    ("prune-blocks{block=4}", ["prune-blocks", "block=4", "ROWSxCOLS"]),
    ("prune-blocks{block=0x4}", ["prune-blocks", "block=0x4"]),
    ("prune-blocks{ratio=2}", ["prune-blocks", "ratio"]),
    ("prune-blocks{criterion=max}", ["prune-blocks", "criterion", "l1, l2"]),
])
def test_bad_options(text, words):
    with pytest.raises(PipelineError) as e:
        prunec.parse_pipeline(text).instantiate()
    assert all(w in str(e.value) for w in words), str(e.value)
