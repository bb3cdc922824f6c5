"""examples/my_passes.py (the pass of docs/writing-a-pass.md) loads and runs from the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import prunec

from conftest import REPO_DIR

EXAMPLE = os.path.join(REPO_DIR, "examples", "my_passes.py")


def _prunec(*args):
    return subprocess.run([sys.executable, "-m", "prunec.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO_DIR)


def test_custom_pass_runs_from_the_cli(tmp_path, tests_on_path):
    out = tmp_path / "out"
    p = _prunec("compile", "_helpers_artifact:small_cnn_module", "--input-shape", "2,3,16,16",
                "--load-passes", EXAMPLE, "--passes", "round-weights{step=0.05},dce", "-o", str(out))
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    stats = report["passes"][0]["stats"]
    assert report["passes"][0]["pass"] == "round-weights" and stats["layers-rounded"] == 3
    model = prunec.load_compressed(str(out))
    w = model.gm.conv2.weight
    assert torch.allclose(w, torch.round(w / 0.05) * 0.05)
    assert report["ratios"]["bytes"] > 3  # rounded layers are stored as codebooks + codes


def test_custom_pass_is_listed_and_checked():
    p = _prunec("passes", "--load-passes", EXAMPLE)
    assert p.returncode == 0 and "round-weights" in p.stdout and "step=0.01" in p.stdout
    p = _prunec("compile", "x.pt2", "--load-passes", EXAMPLE, "--passes", "round-weights{step=0}", "-o", "o")
    assert p.returncode == 2 and "round-weights" in p.stderr and "step" in p.stderr
