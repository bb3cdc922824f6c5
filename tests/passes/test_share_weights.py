"""share-weights: at most 2**bits values per group, nearest-centroid assignment,
pruned zeros stay exact and carry no cluster, idempotence, errors, the preset."""
from __future__ import annotations

import pytest
import torch

import prunec
from prunec.errors import PipelineError

from _compress_models import cnn, compile_, mlp, out, weights


def distinct(t):
    return t.unique().numel()


def test_per_tensor_bits_and_nearest_centroid():
    model, x = mlp()
    r, orig = compile_(model, x, "share-weights{bits=2}")
    for name, t in weights(r.graph).items():
        assert distinct(t) <= 4
        centroids = t.unique()
        nearest = centroids[(orig[name].flatten()[:, None] - centroids).abs().argmin(1)]
        assert torch.equal(nearest, t.flatten())  # k-means: every weight at its nearest centroid
        ann = r.graph.annotations[name]
        assert ann["format"] == "shared" and ann["bits"] == 2 and ann["sparse"] is False
        # codebook (4 floats) + 2-bit codes
        assert ann["stored_bytes"] == 4 * 4 + (t.numel() * 2 + 7) // 8
    assert (out(r, x) - model(x)).abs().max() < 1.0


def test_per_channel_and_groups():
    model, x = cnn()
    r, _ = compile_(model, x, "share-weights{bits=1,granularity=per-channel}")
    for t in weights(r.graph).values():
        assert max(distinct(row) for row in t.reshape(t.shape[0], -1)) <= 2
    r, _ = compile_(*mlp(), "share-weights{bits=2,granularity=per-channel,group-size=8}")
    for t in weights(r.graph).values():
        assert max(distinct(g) for g in t.reshape(-1, 8)) <= 4
    assert r.graph.annotations["fc1.weight"]["group_size"] == 8


def test_group_size_that_does_not_divide_is_skipped():
    model, x = mlp()
    r, orig = compile_(model, x, "share-weights{bits=2,granularity=per-channel,group-size=24}")
    g = r.graph.tensors
    assert torch.equal(g["fc1.weight"], orig["fc1.weight"])  # rows of 32
    assert torch.equal(g["fc2.weight"], orig["fc2.weight"])  # rows of 64
    assert max(distinct(grp) for grp in g["fc3.weight"].reshape(-1, 24)) <= 4  # rows of 48
    assert r.report["passes"][0]["stats"]["layers-skipped"] == 2


def test_pruned_zeros_stay_exact_and_get_no_cluster():
    model, x = mlp()
    r, _ = compile_(model, x, "prune-weights{ratio=0.8},share-weights{bits=2}")
    pruned = r.report["passes"][0]
    for name, t in weights(r.graph).items():
        nz = t[t != 0]
        assert int((t == 0).sum()) == round(0.8 * t.numel())  # no survivor became zero
        assert nz.unique().numel() <= 4  # 4 clusters for the survivors alone
        ann = r.graph.annotations[name]
        assert ann["sparse"] is True and ann["sparsity"]["format"] == "sparse"
        # bitmask + 4-entry codebook + 2-bit codes for the survivors only
        assert ann["stored_bytes"] == (t.numel() + 7) // 8 + 16 + (nz.numel() * 2 + 7) // 8
    assert pruned["changed"]


def test_share_after_nm_keeps_the_pattern_on_record():
    r, _ = compile_(*mlp(), "prune-nm{layers=[linear]},share-weights{bits=3,granularity=per-channel}")
    ann = r.graph.annotations["fc1.weight"]
    assert ann["format"] == "shared" and ann["sparsity"]["format"] == "nm" and ann["sparsity"]["n"] == 2
    t = r.graph.tensors["fc1.weight"]
    assert ((t.view(64, 8, 4) != 0).sum(2) <= 2).all()


def test_second_run_changes_nothing():
    model, x = mlp()
    r, _ = compile_(model, x, "share-weights{bits=3},share-weights{bits=3}")
    assert [p["changed"] for p in r.report["passes"]] == [True, False]
    first = prunec.compile(mlp()[0], (x,), passes="share-weights{bits=3}").graph
    assert all(torch.equal(first.tensors[k], r.graph.tensors[k]) for k in first.tensors)


def test_deep_compression_preset():
    model, x = mlp()
    r, _ = compile_(model, x, "deep-compression")
    assert [p["pass"] for p in r.report["passes"]] == ["prune-weights", "share-weights"]
    assert r.report["ratios"]["bytes"] > 10  # 90% zeros, 4-bit codes, bitmask overhead counted
    assert r.report["ratios"]["params"] == 1.0


@pytest.mark.parametrize("text, words", [
    ("share-weights{bits=0}", ["share-weights", "bits=0", ">= 1"]),
    ("share-weights{bits=9}", ["share-weights", "bits=9", "<= 8"]),
    ("share-weights{granularity=per-row}", ["share-weights", "granularity", "per-tensor, per-channel"]),
    ("share-weights{group-size=-4}", ["share-weights", "group-size"]),
    ("share-weights{bitz=4}", ["share-weights", "bitz"]),
])
def test_bad_options(text, words):
    with pytest.raises(PipelineError) as e:
        prunec.parse_pipeline(text).instantiate()
    assert all(w in str(e.value) for w in words), str(e.value)
