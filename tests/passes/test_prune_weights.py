"""prune-weights: exact zero counts, magnitude order, scopes, overrides, no-op, errors."""
from __future__ import annotations

import pytest
import torch

import prunec
from prunec.artifact import encoded_nbytes
from prunec.errors import PipelineError

from _compress_models import cnn, compile_, mlp, out, weights


def zeros(t):
    return int((t == 0).sum())


def test_local_ratio_prunes_exactly_the_smallest():
    model, x = mlp()
    r, orig = compile_(model, x, "prune-weights{ratio=0.7}")
    for name, t in weights(r.graph).items():
        o = orig[name]
        assert zeros(t) == round(0.7 * t.numel())
        kept = t != 0
        assert torch.equal(t[kept], o[kept])  # survivors are untouched
        assert o[~kept].abs().max() <= o[kept].abs().min()
        ann = r.graph.annotations[name]
        assert ann["format"] == "sparse" and ann["nnz"] == int(kept.sum())
        assert ann["stored_bytes"] == encoded_nbytes(t, ann) < t.numel() * 4
    for name in ("fc1.bias", "fc2.bias", "fc3.bias"):
        assert torch.equal(r.graph.tensors[name], orig[name])
    assert r.report["passes"][0]["stats"]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    # the in-place module carries the zeros and agrees with the IR
    assert r.module is not None and torch.equal(r.module.fc2.weight, r.graph.tensors["fc2.weight"])


def test_global_scope_uses_one_cut():
    model, x = mlp()
    r, orig = compile_(model, x, "prune-weights{ratio=0.6,scope=global}")
    ws = weights(r.graph)
    total = sum(t.numel() for t in ws.values())
    assert sum(zeros(t) for t in ws.values()) == round(0.6 * total)
    kept = torch.cat([orig[n][t != 0].abs() for n, t in ws.items()])
    gone = torch.cat([orig[n][t == 0].abs() for n, t in ws.items()])
    assert gone.max() <= kept.min()
    assert len({zeros(t) / t.numel() for t in ws.values()}) > 1  # sparsity differs per layer


def test_threshold():
    model, x = mlp()
    r, orig = compile_(model, x, "prune-weights{threshold=0.08}")
    for name, t in weights(r.graph).items():
        o = orig[name]
        assert torch.equal(t == 0, o.abs() < 0.08)


def test_per_layer_overrides_and_layer_types():
    model, x = cnn()
    r, orig = compile_(model, x, "prune-weights{ratio=[conv*:0.5,conv2:0.9],layers=[conv]}")
    g = r.graph.tensors
    assert zeros(g["conv1.weight"]) == round(0.5 * g["conv1.weight"].numel())
    assert zeros(g["conv2.weight"]) == round(0.9 * g["conv2.weight"].numel())  # last match wins
    assert torch.equal(g["dw.weight"], orig["dw.weight"])  # no pattern matches: left alone
    assert torch.equal(g["fc.weight"], orig["fc.weight"])  # linear not selected
    r2, orig2 = compile_(*cnn(), "prune-weights{ratio=0.5,skip=[conv3]}")
    assert torch.equal(r2.graph.tensors["conv3.weight"], orig2["conv3.weight"])
    assert zeros(r2.graph.tensors["fc.weight"]) > 0


def test_noop_settings_change_nothing():
    model, x = mlp()
    r, orig = compile_(model, x, "prune-weights{ratio=0.0}")
    assert not r.report["passes"][0]["changed"]
    assert all(torch.equal(r.graph.tensors[k], orig[k]) for k in orig)
    assert not r.graph.annotations
    # pruning twice to the same ratio: the second run finds nothing to do
    r, _ = compile_(*mlp(), "prune-weights{ratio=0.5},prune-weights{ratio=0.5}")
    assert [p["changed"] for p in r.report["passes"]] == [True, False]


def test_pruned_output_is_the_pruned_dense_model():
    model, x = mlp()
    r, orig = compile_(model, x, "prune-weights{ratio=0.5}")
    ref = torch.nn.functional.linear
    h = torch.relu(ref(x, r.graph.tensors["fc1.weight"], orig["fc1.bias"]))
    h = torch.relu(ref(h, r.graph.tensors["fc2.weight"], orig["fc2.bias"]))
    assert torch.allclose(out(r, x), ref(h, r.graph.tensors["fc3.weight"], orig["fc3.bias"]), atol=1e-6)


@pytest.mark.parametrize("text, words", [
    ("prune-weights{ratio=1.5}", ["prune-weights", "ratio", "<= 1"]),
    ("prune-weights{ratio=[fc1:-0.1]}", ["prune-weights", "ratio", ">= 0"]),
    ("prune-weights{ratio=0.5,threshold=0.1}", ["prune-weights", "threshold", "not both"]),
    ("prune-weights{scope=layer}", ["prune-weights", "scope", "local, global"]),
    ("prune-weights{layers=[lstm]}", ["prune-weights", "layers", "lstm"]),
    ("prune-weights{ratio=abc}", ["prune-weights", "ratio"]),
])
def test_bad_options_name_pass_and_option(text, words):
    with pytest.raises(PipelineError) as e:
        prunec.parse_pipeline(text).instantiate()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
