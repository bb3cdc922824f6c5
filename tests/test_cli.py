"""The command line end to end, in subprocesses.

Every command runs once, four at a time, from a module-scoped fixture (each
process pays for importing torch); the tests then check the recorded results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import REPO_DIR, TESTS_DIR

PROGRESS = ("tracing ", "[")  # progress lines on stderr (not errors)

USER_PASS = textwrap.dedent('''
    from prunec.registry import Option, PassResult, register_pass

    @register_pass("user-scale", summary="Multiply the last layer by a factor.",
                   options={"factor": Option(float, 2.0, "multiplier")})
    def user_scale(graph, am, factor):
        name = [k for k in graph.consts if k.endswith(".weight")][-1]
        graph.set_tensor(name, graph.tensors[name] * factor)
        return PassResult(True, {"scaled": name})
''')


class Run:
    def __init__(self, argv, cwd, proc):
        self.argv, self.cwd = argv, cwd
        self.rc, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    def errors(self) -> list[str]:
        return [l for l in self.err.splitlines() if not l.startswith(PROGRESS)]

    def __repr__(self):
        return f"Run({self.argv}, rc={self.rc}, stderr={self.err[-2000:]!r})"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, REPO_DIR, env.get("PYTHONPATH")) if p)
    return env


def _cases(root):
    """name -> (argv after 'prunec', working directory)."""
    def d(name):
        p = os.path.join(root, name)
        os.makedirs(p, exist_ok=True)
        return p

    tiny = "zoo_factories.models:small_cnn"
    cnn = ["--input-shape", "1,3,16,16"]
    # files the cases read
    data = d("data")
    with open(os.path.join(data, "junk.pt2"), "w") as f:
        f.write("this is not a model")
    import zoo_factories.models as zf
    torch.save(zf.small_cnn(), os.path.join(data, "model.pt"))
    ep = torch.export.export(zf.small_cnn(), (torch.randn(1, 3, 16, 16),))
    torch.export.save(ep, os.path.join(data, "model.pt2"))
    with open(os.path.join(data, "user_passes.py"), "w") as f:
        f.write(USER_PASS)
    exists = d("exists")
    os.makedirs(os.path.join(exists, "out"))
    with open(os.path.join(exists, "out", "keep.txt"), "w") as f:
        f.write("user data")
    force = d("force")
    os.makedirs(os.path.join(force, "out"))
    with open(os.path.join(force, "out", "old.txt"), "w") as f:
        f.write("old")

    cases = {
        "compile": (["compile", tiny, *cnn, "--passes", "fold-bn,canonicalize,dce", "-o", "out",
                     "--print-ir-after-change", "--dump-dir", "dump"], d("compile")),
        "compile-pt2": (["compile", os.path.join(data, "model.pt2"), "--no-verify-each", "-o", "out", "--quiet",
                         "--force"], force),
        "compile-pickle": (["compile", os.path.join(data, "model.pt"), "--trust-pickle", *cnn, "-o", "out",
                            "--passes", "fold-bn"], d("compile-pickle")),
        "compile-user-pass": (["compile", tiny, *cnn, "--load-passes", os.path.join(data, "user_passes.py"),
                               "--passes", "user-scale{factor=3.0},dce", "-o", "out"], d("compile-user-pass")),
        "inspect": (["inspect", tiny, *cnn, "--ir"], d("inspect")),
        "inspect-json": (["inspect", tiny, *cnn, "--json"], d("inspect-json")),
        "inspect-export": (["inspect", tiny, *cnn, "--ir", "--tracer", "export"], d("inspect-export")),
        "passes": (["passes"], d("passes")),
        # bad input: one error line, exit code 2, nothing left behind
        "bad-missing-file": (["compile", os.path.join(data, "missing.pt2"), "-o", "out"], d("bad-missing-file")),
        "bad-not-a-model": (["compile", os.path.join(data, "junk.pt2"), "-o", "out"], d("bad-not-a-model")),
        "bad-zoo-name": (["compile", "torchvision:resnet_nope", "-o", "out"], d("bad-zoo-name")),
        "bad-unknown-pass": (["compile", tiny, *cnn, "--passes", "fold-bn,nope", "-o", "out"],
                             d("bad-unknown-pass")),
        "bad-unknown-option": (["compile", tiny, *cnn, "--passes", "dce,fold-bn{ratio=0.5}", "-o", "out"],
                               d("bad-unknown-option")),
        "bad-malformed": (["compile", tiny, *cnn, "--passes", "fold-bn,,dce", "-o", "out"], d("bad-malformed")),
        "bad-shape": (["compile", tiny, "--input-shape", "1,5,16,16", "-o", "out"], d("bad-shape")),
        "bad-exists": (["compile", tiny, *cnn, "-o", "out"], exists),
        "bad-pickle": (["compile", os.path.join(data, "model.pt"), *cnn, "-o", "out"], d("bad-pickle")),
        "bad-usage": (["compile", tiny], d("bad-usage")),
        "bad-tracer": (["inspect", tiny, *cnn, "--tracer", "fx"], d("bad-tracer")),
    }
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli"))
    sys.path.insert(0, TESTS_DIR)
    cases = _cases(root)
    env = _env()

    def go(item):
        name, (argv, cwd) = item
        cmd = [sys.executable, "-m", "prunec.cli", *argv]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        return name, Run(argv, cwd, proc)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(go, cases.items()))


def test_compile_writes_outputs_and_table(runs):
    r = runs["compile"]
    assert r.rc == 0, r
    out = os.path.join(r.cwd, "out")
    assert {"model.pt2", "report.json"} <= set(os.listdir(out))
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["pipeline"] == "fold-bn,canonicalize,dce"
    assert [p["pass"] for p in report["passes"]] == ["fold-bn", "canonicalize", "dce"]
    assert report["passes"][0]["stats"]["batchnorms-folded"] == 1
    for p in report["passes"]:
        assert {"seconds", "before", "after", "stats", "changed"} <= set(p)
    # the table on stdout
    lines = r.out.splitlines()
    assert lines[0].split() == ["before", "after", "ratio"]
    assert lines[1].startswith("params") and lines[2].startswith("FLOPs")
    assert any(l.startswith("fold-bn") and l.rstrip().endswith("yes") for l in lines)
    assert lines[-1] == "wrote out"
    # the program loads back and matches the original model
    import zoo_factories.models as zf
    ep = torch.export.load(os.path.join(out, "model.pt2"))
    x = torch.randn(2, 3, 16, 16)[:1]
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), zf.small_cnn()(x), rtol=1e-5, atol=1e-6)
    # --print-ir-after-change and --dump-dir
    assert "// -----// IR after fold-bn //----- //" in r.err
    assert "// -----// IR after dce" not in r.err
    dump = os.path.join(r.cwd, "dump")
    assert sorted(os.listdir(dump)) == ["00_input.txt", "01_fold-bn.txt", "02_canonicalize.txt", "03_dce.txt"]
    assert not [f for f in os.listdir(r.cwd) if f.startswith(".prunec-")]


def test_compile_pt2_with_force_and_pickle(runs):
    r = runs["compile-pt2"]  # --force over an existing directory, --quiet, --no-verify-each
    assert r.rc == 0 and r.out == "" and r.err == "", r
    assert {"model.pt2", "report.json"} <= set(os.listdir(os.path.join(r.cwd, "out")))
    assert not os.path.exists(os.path.join(r.cwd, "out", "old.txt"))
    assert os.listdir(r.cwd) == ["out"]  # no .prunec-* temp dirs
    r = runs["compile-pickle"]
    assert r.rc == 0, r
    rep = json.load(open(os.path.join(r.cwd, "out", "report.json")))
    assert rep["model"].endswith("model.pt") and rep["module-update"]["ok"]


def test_user_pass_from_file(runs):
    r = runs["compile-user-pass"]
    assert r.rc == 0, r
    rep = json.load(open(os.path.join(r.cwd, "out", "report.json")))
    assert rep["passes"][0]["pipeline-item"] == "user-scale{factor=3.0}"
    assert rep["passes"][0]["stats"] == {"scaled": "5.weight"}
    import zoo_factories.models as zf
    m = zf.small_cnn()
    ep = torch.export.load(os.path.join(r.cwd, "out", "model.pt2"))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        y, ref = ep.module()(x), m(x)
        torch.testing.assert_close(y - m[5].bias, 3 * (ref - m[5].bias), rtol=1e-5, atol=1e-5)


def test_inspect(runs):
    r = runs["inspect"]
    assert r.rc == 0, r
    assert r.out.startswith("inputs:  input [1, 3, 16, 16] torch.float32\n")
    assert "params: 267   FLOPs: 110,640" in r.out and "layers:" in r.out
    assert "\ntraced by: recorder\n" in r.out
    assert "%conv2d" in r.out and "graph(%input: f32[1,3,16,16]) {" in r.out
    r = runs["inspect-json"]
    assert r.rc == 0, r
    s = json.loads(r.out)
    assert s["params"] == 267 and s["inputs"][0]["shape"] == [1, 3, 16, 16]
    assert [l["op"] for l in s["layers"]][:2] in (["conv2d", "batch_norm"], ["conv2d", "_native_batch_norm_legit_no_training"])
    assert s["layers"][0]["weight"] == [8, 3, 3, 3] and s["flops"] > 0


def test_inspect_with_torch_export_gives_the_same_ir(runs):
    rec, exp = runs["inspect"], runs["inspect-export"]
    assert exp.rc == 0, exp
    assert "\ntraced by: torch.export\n" in exp.out
    assert exp.out.replace("traced by: torch.export", "traced by: recorder") == rec.out


def test_passes_lists_registry(runs):
    r = runs["passes"]
    assert r.rc == 0, r
    lines = r.out.splitlines()
    assert lines[0] == "passes:"
    names = [l.split()[0] for l in lines if l.startswith("  ") and not l.startswith("      ")]
    for name in ("canonicalize", "dce", "fold-bn"):
        assert name in names
    assert "preset pipelines:" in lines


BAD = {
    "bad-missing-file": r"missing.pt2: no such file",
    "bad-not-a-model": r"junk.pt2: not a torch.export program",
    "bad-zoo-name": r"'torchvision:resnet_nope': torchvision has no model named 'resnet_nope'",
    "bad-unknown-pass": r"unknown pass 'nope' .* at column 9: fold-bn,>>>nope",
    "bad-unknown-option": r"pass 'fold-bn' has no option 'ratio'.* at column 5: dce,>>>fold-bn\{ratio=0.5\}",
    "bad-malformed": r"expected a pass name \(kebab-case\) at column 9: fold-bn,>>>,dce",
    "bad-shape": r"cannot be traced with inputs of shape \[1, 5, 16, 16\]: .*; check --input-shape",
    "bad-exists": r"out: output directory exists; pass --force to replace it",
    "bad-pickle": r"model.pt: loading a pickled module runs code from the file; pass --trust-pickle",
    "bad-usage": r"prunec compile: the following arguments are required: -o/--output",
    "bad-tracer": r"prunec inspect: argument --tracer: invalid choice: 'fx' \(choose from '?auto'?, '?export'?\)",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_left(runs, case):
    import re
    r = runs[case]
    assert r.rc == 2, r
    errs = r.errors()
    assert len(errs) == 1, r
    assert errs[0].startswith("prunec: error: ") and re.search(BAD[case], errs[0]), r
    assert "Traceback" not in r.err
    left = sorted(os.listdir(r.cwd))
    if case == "bad-exists":
        assert left == ["out"] and os.listdir(os.path.join(r.cwd, "out")) == ["keep.txt"]
    else:
        assert left == [], left  # no output directory, no .prunec-* temp dir
