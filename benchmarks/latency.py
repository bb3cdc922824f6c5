"""Latency: PyTorch eager vs torch.compile (inductor) vs TVM (untuned, and tuned with --tune-trials),
dense and after a pruning pipeline, measured side by side in one run.

    python benchmarks/latency.py [--models resnet18,resnet50,mobilenet_v2,vit_b_16]
        [--pipeline 'fold-bn,prune-channels{ratio=0.5}'] [--threads 2] [--inductor] [--tune-trials N]
        [--rounds 15] [--settle 0.05] [--tune-models resnet50] [--tune-variants pruned] [--tuning-db DIR] [--target cuda] [--mcpu znver3]

Batch 1, 224x224, random weights.  Prints a markdown table: ms per model and
variant, the FLOPs ratio dense/pruned, and each runtime's pruned/dense
speedup as a fraction of the FLOPs ratio; then the untuned TVM ratio's range
round by round, with dense's ms range (the ratio moves with this VM's load:
docs/benchmarks.md, twenty-first session).  With ``--target cuda`` every column runs on
the GPU (torch eager with cuDNN, inductor, TVM with its dlight GPU schedules); a torch
call is timed up to its ``torch.cuda.synchronize()``.  ``--mcpu`` builds for another CPU than
this machine's (``znver3``: AVX2 code on an AVX-512 host).  On a shared VM, run one model per
process (a shell loop over ``--models``): one process for several models ran MobileNetV2's TVM
builds up to 1.7x slower than a fresh process did (docs/benchmarks.md, fourteenth session).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import numpy as np
import torch
from _timing import median_ms, settle


# One measurement per round is the mean of 3 calls: rounds are short, so dense and pruned are timed
# within about a second of each other and the VM's speed drifts (up to 2x over minutes) hit both alike.
_median_ms = functools.partial(median_ms, number=3, repeat=1)


def _compile(model, x, pipeline, target="llvm", **target_options):
    import prunec
    t0 = time.perf_counter()
    res = prunec.compile(model, (x,), passes=pipeline, target=target, in_place=True,
                         target_options=target_options or None)
    return res, time.perf_counter() - t0


def prepare(name: str, pipeline: str, args, tune: bool) -> tuple[dict, dict]:
    """Compile one (model, variant); returns its row (FLOPs, build times) and one timer per column
    (each returns ms per call, one measurement)."""
    import tempfile

    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    # untuned, whatever the default database holds
    res, build_s = _compile(model, x, pipeline, args.target, tuning_db=False)
    eager = res.module if res.module is not None else res.program.module()
    row = {"flops": res.report["after"]["flops"], "build_s": build_s}
    gpu = args.target == "cuda"
    xt = x.cuda() if gpu else x
    if gpu:
        eager = eager.cuda()

    def torch_timer(fn):
        def call():
            fn()
            if gpu:
                torch.cuda.synchronize()

        def timer():
            with torch.no_grad():
                settle(call, args.settle)
                return _median_ms(call)
        return timer

    timers = {"eager": torch_timer(lambda: eager(xt))}
    if args.inductor:
        try:
            comp = torch.compile(eager)
            with torch.no_grad():
                comp(xt)
            timers["inductor"] = torch_timer(lambda: comp(xt))
        except Exception as e:  # noqa: BLE001
            print(f"# inductor failed on {name}: {type(e).__name__}")
    def tvm_timer(artifact):
        loaded = artifact.load()
        xn = x.numpy()

        def timer():
            settle(lambda: loaded.time(xn, number=1, repeat=1), args.settle)
            return loaded.time(xn, number=3, repeat=1) * 1e3
        return timer

    timers["tvm"] = tvm_timer(res.artifact)
    if tune:
        # One database per (model, variant), under --tuning-db (reused by later runs) or fresh.
        variant = "pruned" if pipeline != args.dense_pipeline else "dense"
        db = os.path.join(args.tuning_db, f"{name}-{variant}") if args.tuning_db \
            else tempfile.mkdtemp(prefix=f"tune-{name}-{variant}-")
        opts = {"tune_trials": args.tune_trials, "tuning_db": db, "progress": False}
        model = getattr(torchvision.models, name)().eval()
        tuned, row["tune_build_s"] = _compile(model, x, pipeline, args.target, **opts)
        row["tuning"] = tuned.artifact.tuning
        timers["tuned"] = tvm_timer(tuned.artifact)
        model = getattr(torchvision.models, name)().eval()
        _, row["repeat_build_s"] = _compile(model, x, pipeline, args.target, **opts)  # records come from the database
    return row, timers


def measure_interleaved(variants: dict, rounds: int) -> dict:
    """Time every (variant, column) once per round, round after round, and keep each one's median:
    drift on a shared machine then hits dense and pruned alike instead of skewing their ratio.
    Returns every round's times, {(variant, column): [ms, ...]}."""
    samples = {(v, c): [] for v, (_, timers) in variants.items() for c in timers}
    for _ in range(rounds):
        for v, (_, timers) in variants.items():
            for c, timer in timers.items():
                samples[(v, c)].append(timer())
    for (v, c), ts in samples.items():
        variants[v][0][c] = float(np.median(ts))
    return samples


def round_spread(samples: dict, col: str, flops_ratio: float) -> str:
    """The pruned/dense ratio round by round (each round times both within about a second), as
    "min-max (of the FLOPs ratio)", and dense's ms range: on a VM whose load moves within minutes
    the ratio moves with it (a pruned model of short kernels loses more under load)."""
    dense, pruned = samples[("dense", col)], samples[("pruned", col)]
    ratios = [d / p for d, p in zip(dense, pruned)]
    lo, hi = min(ratios), max(ratios)
    return (f"{lo:.2f}-{hi:.2f}x ({lo / flops_ratio:.0%}-{hi / flops_ratio:.0%}); "
            f"dense {min(dense):.1f}-{max(dense):.1f} ms")


def _fmt(v: float) -> str:
    return "–" if v != v else f"{v:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,vit_b_16")
    ap.add_argument("--pipeline", default="fold-bn,prune-channels{ratio=0.5}")
    ap.add_argument("--dense-pipeline", default="fold-bn",
                    help="passes for the dense variant (default: fold-bn, so both variants fold batch norm and "
                         "the ratio measures the pruning alone)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    ap.add_argument("--mcpu", default=None,
                    help="CPU to generate code for (default: this machine's), e.g. znver3 for AVX2 code on an "
                         "AVX-512 host")
    ap.add_argument("--inductor", action="store_true")
    ap.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per (model, variant)")
    ap.add_argument("--tune-models", default=None, help="comma list of models to tune (default: all)")
    ap.add_argument("--tune-variants", default="dense,pruned", help="which variants to tune (default: both)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (median kept)")
    ap.add_argument("--settle", type=float, default=0.05,
                    help="seconds each column runs untimed before its measurement, so the previous column's "
                         "threads have stopped spinning (0: none)")
    ap.add_argument("--tuning-db", default=None,
                    help="directory of tuning databases, one per model-variant (default: fresh temporary ones)")
    args = ap.parse_args()
    from prunec.backends.tvm_lower import host_cpu
    if args.mcpu:
        if args.target != "llvm":
            ap.error("--mcpu needs --target llvm")
        args.target = json.dumps({"kind": "llvm", "mcpu": args.mcpu})
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    tune_models = set((args.tune_models or args.models).split(",")) if args.tune_trials else set()
    cols = ["eager"] + (["inductor"] if args.inductor else []) + ["tvm"] + (["tuned"] if args.tune_trials else [])
    labels = {"eager": "eager", "inductor": "inductor", "tvm": "TVM untuned",
              "tuned": f"TVM tuned ({args.tune_trials} trials)"}
    where = (f"{torch.cuda.get_device_name()} (CUDA)" if args.target == "cuda" else
             f"{args.threads} threads, target {args.target} on a {host_cpu()} host")
    print(f"batch 1, {where}, pipeline `{args.pipeline}`, times in ms (median of {args.rounds} "
          "interleaved rounds)\n")
    head = ("| model | variant | GFLOPs | " + " | ".join(labels[c] for c in cols)
            + " | best TVM vs eager | build s (untuned) | build s (tuning) | repeat build s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    summary = []
    for name in args.models.split(","):
        tune = name in tune_models
        tuned = set(args.tune_variants.split(",")) if tune else set()
        variants = {"dense": prepare(name, args.dense_pipeline, args, "dense" in tuned),
                    "pruned": prepare(name, args.pipeline, args, "pruned" in tuned)}
        samples = measure_interleaved(variants, args.rounds)
        dense, pruned = (variants[v][0] for v in ("dense", "pruned"))
        for r in (dense, pruned):
            for c in cols:
                r.setdefault(c, float("nan"))
        for variant, r in (("dense", dense), ("pruned", pruned)):
            tuned = r.get("tuned", float("nan"))
            best = min(r["tvm"], tuned) if tuned == tuned else r["tvm"]
            print(f"| {name} | {variant} | {r['flops'] / 1e9:.2f} | " + " | ".join(_fmt(r[c]) for c in cols)
                  + f" | {r['eager'] / best:.2f}x | {r['build_s']:.0f} | {_fmt(r.get('tune_build_s', float('nan')))}"
                  f" | {_fmt(r.get('repeat_build_s', float('nan')))} |", flush=True)
            if "tuning" in r:
                print(f"<!-- {name} {variant} tuning: {r['tuning']} -->", flush=True)
        fr = dense["flops"] / pruned["flops"]
        summary.append((name, fr, {c: dense[c] / pruned[c] for c in cols},
                        round_spread(samples, "tvm", fr)))
    print("\n| model | FLOPs ratio | " + " | ".join(f"{labels[c]} speedup (of FLOPs ratio)" for c in cols) + " |")
    print("|" + "---|" * (2 + len(cols)))
    for name, fr, sp, _ in summary:
        print(f"| {name} | {fr:.2f}x | "
              + " | ".join("–" if sp[c] != sp[c] else f"{sp[c]:.2f}x ({sp[c] / fr:.0%})" for c in cols) + " |")
    print("\n| model | TVM untuned pruned/dense, round by round |\n|---|---|")
    for name, _, _, spread in summary:
        print(f"| {name} | {spread} |")


if __name__ == "__main__":
    main()
