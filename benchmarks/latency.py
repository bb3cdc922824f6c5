"""Latency: PyTorch eager vs torch.compile (inductor) vs TVM (untuned, and tuned with --tune-trials),
dense and after a pruning pipeline, measured side by side in one run.

    python benchmarks/latency.py [--models resnet18,resnet50,mobilenet_v2,vit_b_16]
        [--pipeline 'fold-bn,prune-channels{ratio=0.5}'] [--threads 2] [--inductor] [--tune-trials N]

Batch 1, 224x224, random weights.  Prints a markdown table: ms per model and
variant, the FLOPs ratio dense/pruned, and each runtime's pruned/dense
speedup as a fraction of the FLOPs ratio.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def _median_ms(fn, number=5, repeat=5) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        ts.append((time.perf_counter() - t0) / number)
    return float(np.median(ts)) * 1e3


def measure(name: str, pipeline: str, args) -> dict:
    import torchvision

    import prunec
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    t0 = time.perf_counter()
    res = prunec.compile(model, (x,), passes=pipeline, target="llvm", in_place=True,
                         target_options={"tune_trials": args.tune_trials, "tuning_db": args.tuning_db}
                         if args.tune_trials else None)
    build_s = time.perf_counter() - t0
    eager = res.module if res.module is not None else res.program.module()
    row = {"flops": res.report["after"]["flops"], "build_s": build_s}
    with torch.no_grad():
        row["eager"] = _median_ms(lambda: eager(x))
        if args.inductor:
            try:
                comp = torch.compile(eager)
                comp(x)
                row["inductor"] = _median_ms(lambda: comp(x))
            except Exception as e:  # noqa: BLE001
                row["inductor"] = float("nan")
                print(f"# inductor failed on {name}: {type(e).__name__}")
    row["tvm"] = res.artifact.load().time(x.numpy(), number=5, repeat=5) * 1e3
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,vit_b_16")
    ap.add_argument("--pipeline", default="fold-bn,prune-channels{ratio=0.5}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inductor", action="store_true")
    ap.add_argument("--tune-trials", type=int, default=0)
    ap.add_argument("--tuning-db", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    cols = ["eager"] + (["inductor"] if args.inductor else []) + ["tvm"]
    tvm_label = f"TVM tuned ({args.tune_trials} trials)" if args.tune_trials else "TVM untuned"
    labels = {"eager": "eager", "inductor": "inductor", "tvm": tvm_label}
    print(f"batch 1, {args.threads} threads, pipeline `{args.pipeline}`, times in ms (median)\n")
    head = "| model | variant | GFLOPs | " + " | ".join(labels[c] for c in cols) + " | TVM vs eager | build s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    summary = []
    for name in args.models.split(","):
        dense = measure(name, "", args)
        pruned = measure(name, args.pipeline, args)
        for variant, r in (("dense", dense), ("pruned", pruned)):
            print(f"| {name} | {variant} | {r['flops'] / 1e9:.2f} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
                  + f" | {r['eager'] / r['tvm']:.2f}x | {r['build_s']:.0f} |", flush=True)
        fr = dense["flops"] / pruned["flops"]
        summary.append((name, fr, {c: dense[c] / pruned[c] for c in cols}))
    print("\n| model | FLOPs ratio | " + " | ".join(f"{labels[c]} speedup (of FLOPs ratio)" for c in cols) + " |")
    print("|" + "---|" * (2 + len(cols)))
    for name, fr, sp in summary:
        print(f"| {name} | {fr:.2f}x | " + " | ".join(f"{sp[c]:.2f}x ({sp[c] / fr:.0%})" for c in cols) + " |")


if __name__ == "__main__":
    main()
