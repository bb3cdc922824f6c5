"""``prunec compile --target llvm`` writes model.so + meta.json; ``prunec run`` and ``load`` run them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm


def _prunec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prunec.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tvmcli")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 12, 12)
    torch.export.save(torch.export.export(model, (x,)), str(tmp / "m.pt2"))
    np.save(tmp / "x.npy", x.numpy())
    with torch.no_grad():
        ref = model(x).numpy()
    out = tmp / "out"
    r = _prunec("compile", str(tmp / "m.pt2"), "--target", "llvm", "--passes", "fold-bn", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    return tmp, out, ref


def test_outdir_contents(built):
    _, out, _ = built
    for f in ("model.so", "meta.json", "report.json"):
        assert (out / f).exists(), f
    meta = json.loads((out / "meta.json").read_text())
    assert meta["inputs"][0]["shape"] == [1, 3, 12, 12] and meta["inputs"][0]["dtype"] == "float32"
    assert meta["outputs"][0]["shape"] == [1, 4]
    assert meta["pipeline"] == "fold-bn" and meta["tvm_version"] and meta["prunec_version"]
    assert json.loads(meta["target"]) if meta["target"].startswith("{") else meta["target"] == "llvm"


def test_run_subprocess(built):
    tmp, out, ref = built
    r = _prunec("run", str(out), "--input", str(tmp / "x.npy"), "-o", str(tmp / "y.npy"))
    assert r.returncode == 0, r.stderr
    y = np.load(tmp / "y.npy")
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_load_numpy_and_torch(built):
    from prunec.backends.tvm import load
    tmp, out, ref = built
    m = load(str(out))
    x = np.load(tmp / "x.npy")
    assert isinstance(m(x), np.ndarray)
    y = m(torch.from_numpy(x))
    assert isinstance(y, torch.Tensor) and np.abs(y.numpy() - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bad_inputs(built):
    tmp, out, _ = built
    np.save(tmp / "bad_shape.npy", np.zeros((1, 3, 10, 12), "float32"))
    np.save(tmp / "bad_dtype.npy", np.zeros((1, 3, 12, 12), "float64"))
    r = _prunec("run", str(out), "--input", str(tmp / "bad_shape.npy"))
    assert r.returncode == 2 and "shape [1, 3, 10, 12]" in r.stderr and "[1, 3, 12, 12]" in r.stderr
    r = _prunec("run", str(out), "--input", str(tmp / "bad_dtype.npy"))
    assert r.returncode == 2 and "dtype float64" in r.stderr
    r = _prunec("run", str(out), "--input", str(tmp / "missing.npy"))
    assert r.returncode == 2 and "no such input file" in r.stderr
    r = _prunec("run", str(out), "--input", str(tmp / "x.npy"), "--input", str(tmp / "x.npy"))
    assert r.returncode == 2 and "2 inputs given" in r.stderr


def test_damaged_and_foreign_dirs(built, tmp_path):
    from prunec.backends.tvm import ArtifactError, load
    _, out, _ = built
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "model.so").write_bytes(b"not a library")
    with pytest.raises(ArtifactError, match="damaged"):
        load(str(bad))
    os.remove(bad / "model.so")
    with pytest.raises(ArtifactError, match="model.so is missing"):
        load(str(bad))
    (bad / "meta.json").write_text("{")
    with pytest.raises(ArtifactError, match="damaged"):
        load(str(bad))
    other = tmp_path / "other"
    shutil.copytree(out, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["cpu_features"] = meta["cpu_features"] + ["sve2"]  # a CPU this machine is not
    (other / "meta.json").write_text(json.dumps(meta))
    r = _prunec("run", str(other), "--input", str(built[0] / "x.npy"))
    assert r.returncode != 0 and "lacks" in r.stderr and "rebuild" in r.stderr
    r = _prunec("run", str(tmp_path / "nowhere"), "--input", str(built[0] / "x.npy"))
    assert r.returncode == 2 and "no such output directory" in r.stderr


def test_unknown_target_is_a_usage_error(tmp_path):
    r = _prunec("compile", "x.pt2", "--target", "tpu", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown target" in r.stderr


def test_contradicting_tuning_options_are_a_usage_error(built, tmp_path):
    out = tmp_path / "o"
    r = _prunec("compile", str(built[0] / "m.pt2"), "--target", "llvm", "--no-tuning-db", "--tune-trials", "4",
                "-o", str(out))
    assert r.returncode == 2 and "--no-tuning-db" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


_POOL_SIZE = ("import tvm, prunec.backends.tvm, prunec.backends.tvm_lower as l; "
              "print(tvm.get_global_func('runtime.NumThreads')(), l._physical_cores())")


def test_thread_pool_sized_to_physical_cores():
    """TVM alone takes half the logical CPUs on x86; prunec sizes its pool to the physical cores (what the
    schedules' task counts assume) unless the user set TVM_NUM_THREADS or OMP_NUM_THREADS."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", _POOL_SIZE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    threads, cores = map(int, r.stdout.split())
    assert threads == cores
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        r = subprocess.run([sys.executable, "-c", _POOL_SIZE], capture_output=True, text=True,
                           env={**env, var: "1"}, timeout=120)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout.split()[0]) == 1, var
