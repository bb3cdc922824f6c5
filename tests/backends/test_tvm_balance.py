"""Self-balancing parallel loops (backends/tvm_balance.py): which loops are marked, the rewritten
loop runs every iteration for any thread count, and built kernels / models match the static build
bit for bit."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import s_tir, te, tirx  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from prunec.backends import tvm_balance, tvm_lower, tvm_schedule  # noqa: E402

pytestmark = pytest.mark.tvm


def _target(cores: int = 2):
    return tvm.target.Target({**tvm_lower.to_target("llvm").export(), "num-cores": cores})


def _rows(n: int):
    """b = a * 2 + 1 over n rows of 16, rows in parallel: running a row twice gives the same row."""
    a = te.placeholder((n, 16), "float32", name="a")
    b = te.compute((n, 16), lambda i, j: a[i, j] * 2.0 + 1.0, name="b")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    sch.parallel(sch.get_loops(sch.get_sblock("b"))[0])
    return sch.mod["main"]


_scale = _rows(1000)
_two_threads_only = _rows(2)


@T.prim_func(s_tir=True)
def _in_place(a: T.Buffer((1000, 16), "float32"), b: T.Buffer((1000, 16), "float32")):
    # reads and writes the output: a row run twice would add twice
    for i in T.parallel(1000):
        for j in range(16):
            with T.sblock("acc"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = b[vi, vj] + a[vi, vj]


def _marked(func, tasks: int = 2) -> list:
    out = tvm_balance.mark_balanced_loops(func, tasks)
    sch = s_tir.Schedule(out)
    loops = [sch.get(sch.get_loops(b)[0]) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return [dict(lp.annotations).get(tvm_balance.ANNOTATION) for lp in loops]


def test_marks_only_loops_safe_to_run_twice():
    assert _marked(_scale) == [2]
    assert _marked(_in_place) == [None]  # reads the buffer it writes (the output)
    assert _marked(_two_threads_only) == [None]  # no more iterations than tasks: nothing to balance
    assert _marked(_scale, tasks=1) == [None]


def test_private_accumulator_is_marked_shared_one_is_not():
    """A reduction's accumulator allocated in the function and used only inside the loop is private to
    each iteration once lowered; the same buffer also read by a later loop is shared."""
    x = te.placeholder((64, 32), "float32", name="x")
    r = te.reduce_axis((0, 32), name="r")
    s = te.compute((64,), lambda i: te.sum(x[i, r], axis=r), name="s")
    y = te.compute((64,), lambda i: s[i] * 2.0, name="y")
    func = te.create_prim_func([x, y])
    sch = s_tir.Schedule(func)
    ys = sch.get_sblock("y")
    sch.compute_at(sch.get_sblock("s"), sch.get_loops(ys)[0])
    sch.parallel(sch.get_loops(ys)[0])
    assert _marked(sch.mod["main"]) == [2, 2]  # the two blocks share the one loop

    sch = s_tir.Schedule(func)
    sch.parallel(sch.get_loops(sch.get_sblock("s"))[0])
    sch.parallel(sch.get_loops(sch.get_sblock("y"))[0])
    # "s" accumulates into a buffer the second loop reads: running a row twice could zero it mid-sum
    assert _marked(sch.mod["main"]) == [None, 2]


def _balanced_after_lowering(func, monkeypatch) -> list[int]:
    """Build ``func`` (marked for 2 tasks) with the prunec-llvm pipeline; the extents of the root
    parallel loops its lowered form ends with: 2 for a balanced loop (one per task), else its own."""
    import tvm_ffi
    target = _target(2)
    mod = tvm_balance.mark_module(tvm.IRModule({"main": func}), target)
    seen = []
    real = tvm_balance.balance_pass

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="spy")
    def spy(f, _mod, _ctx):
        out = real(tvm.IRModule({"main": f}))["main"]
        seen.append(out)
        return out

    monkeypatch.setattr(tvm_balance, "balance_pass", spy)
    tvm.compile(mod, target, tir_pipeline=tvm_balance.register())
    extents = []
    tvm_ffi.structural_walk(seen[0].body, [(tirx.stmt.For, lambda lp: extents.append(int(lp.extent))
                                            if lp.kind == tirx.ForKind.PARALLEL else None)])
    return extents


def test_loop_made_in_place_by_lowering_stays_static(monkeypatch):
    """t1 = a + 1; t2 = -t1; out = t2 + a, each in its own parallel loop: all three are marked, but
    TVM's storage rewrite gives t2 the storage of t1 (t1 = -t1) and that iteration run twice would
    negate twice.  A LLaMA rotary embedding lowered this way gave wrong outputs in 8 of 1000 runs
    (EfficientNet's SE gate lowers the same way)."""
    a = te.placeholder((64, 16), "float32", name="a")
    t1 = te.compute((64, 16), lambda i, j: a[i, j] + 1.0, name="t1")
    t2 = te.compute((64, 16), lambda i, j: t1[i, j] * -1.0, name="t2")
    out = te.compute((64, 16), lambda i, j: t2[i, j] + a[i, j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, out]))
    for name in ("t1", "t2", "out"):
        loops = sch.get_loops(sch.get_sblock(name))
        sch.parallel(loops[0])
        sch.vectorize(loops[1])
    assert _marked(sch.mod["main"]) == [2, 2, 2]
    assert _balanced_after_lowering(sch.mod["main"], monkeypatch) == [2, 64, 2]


def test_private_accumulator_is_balanced_after_lowering(monkeypatch):
    """An accumulator used only inside the loop is allocated inside it once lowered: balanced."""
    x = te.placeholder((64, 32), "float32", name="x")
    r = te.reduce_axis((0, 32), name="r")
    s = te.compute((64,), lambda i: te.sum(x[i, r], axis=r), name="s")
    y = te.compute((64,), lambda i: s[i] * 2.0, name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    ys = sch.get_sblock("y")
    sch.compute_at(sch.get_sblock("s"), sch.get_loops(ys)[0])
    sch.parallel(sch.get_loops(ys)[0])
    assert _balanced_after_lowering(sch.mod["main"], monkeypatch) == [2]


_RUN = """
import sys, numpy as np, tvm
lib = tvm.runtime.load_module(sys.argv[1])
a = np.random.RandomState(0).randn(1000, 16).astype("float32")
for _ in range(200):
    b = tvm.runtime.tensor(np.full((1000, 16), np.nan, "float32"))
    lib["main"](tvm.runtime.tensor(a), b)
    assert np.array_equal(b.numpy(), a * 2 + 1), "a row missed or wrong"
print("ok")
"""


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_rewritten_loop_runs_every_iteration(tmp_path, threads):
    """200 runs with 1, 2 (the tasks) and 3 threads: every row written, each exactly as the static loop does."""
    target = _target(2)
    mod = tvm_balance.mark_module(tvm.IRModule({"main": _scale}), target)
    lib = tvm.compile(mod, target, tir_pipeline=tvm_balance.register())
    assert "load volatile" in lib.mod.inspect_source("ll")  # the claims are re-read, never hoisted
    path = str(tmp_path / "scale.so")
    lib.export_library(path)
    env = {**os.environ, "TVM_NUM_THREADS": threads}
    r = subprocess.run([sys.executable, "-c", _RUN, path], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


class _Blocks(nn.Module):
    """A stride-2 and a stride-1 inverted residual block and a pointwise head: fused expand+depthwise
    kernels, padded depthwise, 1x1 products with ragged columns, a residual add."""

    def __init__(self):
        super().__init__()

        def block(cin, mid, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU6(),
                                 nn.Conv2d(mid, mid, 3, stride, 1, groups=mid), nn.BatchNorm2d(mid), nn.ReLU6(),
                                 nn.Conv2d(mid, cout, 1), nn.BatchNorm2d(cout))
        self.a = block(8, 48, 16, 2)
        self.b = block(16, 96, 16, 1)
        self.head = nn.Conv2d(16, 40, 1)

    def forward(self, x):
        y = self.a(x)
        return self.head(y + self.b(y))


def test_model_matches_static_build_bit_for_bit(monkeypatch):
    """The balanced build computes each output exactly as the static one (same code per iteration)."""
    import prunec
    torch.manual_seed(0)
    model = _Blocks().eval()
    x = torch.randn(1, 8, 28, 28)
    outs, marked = [], []
    real = tvm_balance.mark_module
    for balance in (False, True):
        def mark(mod, target, balance=balance):
            out = real(mod, target) if balance else mod
            marked.append(sum(f.script().count(tvm_balance.ANNOTATION) for f in out.functions.values()
                              if isinstance(f, tirx.PrimFunc)))
            return out
        monkeypatch.setattr(tvm_balance, "mark_module", mark)
        res = prunec.compile(model, (x,), passes="fold-bn,prune-channels{ratio=0.5}", target="llvm", in_place=False,
                             target_options={"tuning_db": False})
        run = res.artifact.load()
        outs.append([run(x).numpy() for _ in range(20)])
    assert marked[0] == 0 and marked[1] >= 4
    for got in outs[1]:
        assert np.array_equal(got, outs[0][0])


def test_schedule_module_marks_cpu_kernels_only():
    x = te.placeholder((256, 64), "float32", name="x")
    y = te.compute((256, 64), lambda i, j: x[i, j] * 2.0, name="y")
    mod = tvm.IRModule({"main": te.create_prim_func([x, y])})
    cpu = tvm_schedule.schedule_module(mod, _target(2))
    assert tvm_balance.ANNOTATION in cpu["main"].script()
    assert tvm_balance.mark_module(mod, tvm.target.Target({"kind": "cuda"})) is mod
