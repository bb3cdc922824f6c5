"""MetaSchedule tuning: records land in the database, are applied, and a later compile reuses them."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import prunec

sys.path.insert(0, os.path.dirname(__file__))
from _tvm_helpers import has_cuda, max_rel_err  # noqa: E402

pytestmark = pytest.mark.tvm


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(16 * 8 * 8, 10)).eval()


@pytest.mark.parametrize("search", [("replay-trace", "random"), ("evolutionary", "xgb")])
def test_tune_then_reuse_database(tmp_path, monkeypatch, capfd, search):
    """Both search set-ups prunec picks from (with and without xgboost installed); the
    replay-trace run uses the default database, which a later plain compile picks up."""
    from prunec.backends import tvm_lower, tvm_tune
    if search[1] == "xgb":
        import xgboost  # noqa: F401  (a test dependency: fail loudly, never skip)
    monkeypatch.setattr(tvm_tune, "_search", lambda: search)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, x = _model(), torch.randn(1, 3, 8, 8)
    use_default = search[0] == "replay-trace"
    db = tvm_tune.default_db_dir(tvm_lower.to_target("llvm")) if use_default else str(tmp_path / "db")
    options = {"tune_trials": 8, "progress": False} | ({} if use_default else {"tuning_db": db})
    res = prunec.compile(model, (x,), passes="", target="llvm", target_options=options)
    assert res.artifact.tuning["db"] == db
    # MetaSchedule's console logging stays out of the user's output (it goes to <db>/logs)
    printed = capfd.readouterr().out
    assert "task_scheduler" not in printed and "Logging directory" not in printed, printed[:300]
    assert os.listdir(os.path.join(db, "logs"))
    tuning = res.artifact.tuning
    assert tuning["tuned_now"] == tuning["kernels"] > 0 and tuning["from_db"] == 0
    # every tuned kernel was timed against prunec's default schedule and the faster one kept
    assert tuning["applied"] + tuning["kept_default"] == tuning["kernels"], tuning
    choice = json.load(open(os.path.join(db, "prunec_schedule_choice.json")))
    assert len(choice) == tuning["kernels"]
    assert sum(c["tuned_ms"] <= c["default_ms"] for c in choice.values()) == tuning["applied"]
    assert tuning["search"] == "/".join(search)
    records = open(os.path.join(db, "database_tuning_record.json")).read().splitlines()
    assert len(records) >= tuning["kernels"] and all(json.loads(r) for r in records)
    with torch.no_grad():
        ref = model(x)
    assert max_rel_err(res.artifact.load()(x), [ref]) <= 1e-4

    # A repeat compile of the same workloads takes its schedules from the database: no tuning.
    # With the default database that needs no option at all.
    again = prunec.compile(model, (x,), passes="", target="llvm",
                           target_options=None if use_default else {"tune_trials": 8, "tuning_db": db,
                                                                    "progress": False})
    assert again.artifact.tuning["from_db"] == tuning["kernels"] and again.artifact.tuning["tuned_now"] == 0
    assert again.artifact.tuning["applied"] == tuning["applied"]  # the cached choice, not timed again
    assert "tune_s" not in again.artifact.tuning
    assert max_rel_err(again.artifact.load()(x), [ref]) <= 1e-4
    if use_default:  # and --no-tuning-db (tuning_db=False) ignores it
        plain = prunec.compile(model, (x,), passes="", target="llvm", target_options={"tuning_db": False})
        assert plain.artifact.tuning == {}


@pytest.mark.skipif(not has_cuda(), reason="no CUDA GPU on this machine (tvm.cuda(0).exist is False)")
def test_tune_cuda(tmp_path):
    """MetaSchedule on a cuda target: candidates are built and timed on the GPU, the faster of the
    tuned and dlight schedules is kept per kernel, and a repeat compile reuses the database."""
    model, x = _model(), torch.randn(1, 3, 8, 8)
    db = str(tmp_path / "db")
    options = {"tune_trials": 16, "tuning_db": db, "progress": False}
    res = prunec.compile(model, (x,), passes="", target="cuda", target_options=options)
    tuning = res.artifact.tuning
    assert tuning["tuned_now"] == tuning["kernels"] > 0, tuning
    assert tuning["applied"] + tuning["kept_default"] == tuning["kernels"], tuning
    records = [json.loads(r) for r in open(os.path.join(db, "database_tuning_record.json")).read().splitlines()]
    run_secs = [s for r in records for s in (r[1][1] or [])]
    assert run_secs and min(run_secs) < 1.0, records[:2]  # measured on the GPU, not failed (1e10)
    choice = json.load(open(os.path.join(db, "prunec_schedule_choice.json")))
    assert sum(c["tuned_ms"] is not None and (c["default_ms"] is None or c["tuned_ms"] <= c["default_ms"])
               for c in choice.values()) == tuning["applied"]
    with torch.no_grad():
        ref = model(x)
    assert max_rel_err(res.artifact.load()(x), [ref]) <= 1e-4
    again = prunec.compile(model, (x,), passes="", target="cuda", target_options=options)
    assert again.artifact.tuning["from_db"] == tuning["kernels"] and again.artifact.tuning["tuned_now"] == 0
    assert max_rel_err(again.artifact.load()(x), [ref]) <= 1e-4


def test_cuda_target_carries_what_meta_schedule_needs():
    """MetaSchedule's GPU rules refuse a cuda target without these attributes."""
    from prunec.backends import tvm_lower
    attrs = tvm_lower.to_target("cuda").attrs
    assert int(attrs["max_threads_per_block"]) == 1024 and int(attrs["max_shared_memory_per_block"]) == 49152
    # a user's own value is kept
    t = tvm_lower.to_target('{"kind": "cuda", "max_threads_per_block": 512}')
    assert int(t.attrs["max_threads_per_block"]) == 512
