"""Per-kernel scaling: how much of a pruning's FLOPs ratio each TVM kernel turns into time.

    python benchmarks/kernel_scaling.py [--models mobilenet_v2,efficientnet_b0]
        [--pipeline 'fold-bn,prune-channels{ratio=0.5}'] [--dense-pipeline fold-bn] [--rounds 9] [--top 15]

Builds the dense and the pruned model (same pipelines as benchmarks/latency.py), runs
both in interleaved rounds with a VM instrument that times every kernel call, and pairs
the i-th kernel call of one with the i-th of the other (pruning keeps the graph's
structure).  Kernels are timed from the VM's call to its return, so the VM's own
instructions between them are left out.  Per model it prints the FLOPs ratio, the measured ratio of the summed kernel
times, and the "ideal" ratio: every dense kernel sped up by exactly its own FLOPs ratio.
A depthwise convolution only loses its channels (2x at ratio 0.5) while a 1x1 convolution
loses inputs and outputs (4x), so a model whose time sits in depthwise layers cannot reach
its whole-model FLOPs ratio even with perfect kernels; the ideal column says how far it can.
Then the kernels that fall furthest short of their own ratio, by the time that costs.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def _flops(shapes: list[tuple]) -> float:
    """2 x MACs of a conv (x, w, ..., out) or matmul (a[.., K], b[.., K, N], ..., out) kernel; 0 for
    others.  PointwiseAsMatmul's products are ``W[Co, Ci] @ x[1, Ci, HW]``; FuseExpandDepthwise's
    kernels take ``(x[N, Ci, HW], w1[C, Ci, 1, 1], w2[C, 1, k, k], ..., out)``; a weight packed row tile
    by row tile (tvm_pack_weights) arrives as ``Wp[ceil(Co / 6), Ci, 6]``."""
    if len(shapes) >= 4 and len(shapes[0]) == 3 and len(shapes[1]) == 4 and len(shapes[2]) == 4 \
            and shapes[2][1] == 1:
        n, ci, hw = shapes[0]
        return 2.0 * n * shapes[1][0] * ci * hw + 2.0 * np.prod(shapes[-1]) * shapes[2][2] * shapes[2][3]
    if len(shapes) >= 3 and len(shapes[1]) == 4:
        return 2.0 * np.prod(shapes[-1]) * np.prod(shapes[1][1:])
    if len(shapes) >= 3 and len(shapes[1]) in (2, 3) and len(shapes[0]) >= 2 and shapes[0][-1] == shapes[1][-2]:
        return 2.0 * np.prod(shapes[-1]) * shapes[0][-1]
    if len(shapes) >= 3 and len(shapes[0]) == 3 and len(shapes[1]) == 3 and shapes[0][1] == shapes[1][1]:
        return 2.0 * np.prod(shapes[-1]) * shapes[0][1]  # row-tile packed weight Wp[M/6, K, 6] @ x[1, K, N]
    return 0.0


def _build(name: str, pipeline: str):
    import torchvision
    import tvm
    from tvm import relax

    import prunec
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    res = prunec.compile(model, (x,), passes=pipeline, target="llvm", in_place=True,
                         target_options={"tuning_db": False})
    return relax.VirtualMachine(res.artifact.executable, tvm.cpu()), tvm.runtime.tensor(x.numpy())


def _kernel_times(vm, x) -> list[tuple[str, float, tuple]]:
    """One run: (kernel name, seconds, argument shapes) per kernel call, in call order."""
    calls, start = [], [0.0]

    def instrument(_func, name, before, _ret, *args):
        if before:
            start[0] = time.perf_counter()
        elif not name.startswith("vm.builtin."):  # a kernel (fused or not), not the VM's own bookkeeping
            calls.append((name, time.perf_counter() - start[0],
                          tuple(tuple(int(s) for s in a.shape) for a in args if hasattr(a, "shape"))))
        return 0

    vm.set_instrument(instrument)
    vm["main"](x)
    return calls


def scaling(name: str, dense_pipeline: str, pipeline: str, rounds: int):
    variants = {"dense": _build(name, dense_pipeline), "pruned": _build(name, pipeline)}
    runs = {v: [] for v in variants}
    for _ in range(rounds + 1):  # the first round warms up
        for v, (vm, x) in variants.items():
            runs[v].append(_kernel_times(vm, x))
    out = {}
    for v, rs in runs.items():
        times = np.median(np.array([[t for _, t, _ in r] for r in rs[1:]]), axis=0)
        out[v] = (times, [(n, s) for n, _, s in rs[0]])
    (td, kd), (tp, kp) = out["dense"], out["pruned"]
    if len(td) != len(tp):
        raise SystemExit(f"{name}: dense and pruned run different kernel counts ({len(td)} vs {len(tp)})")
    # conv / matmul kernels scale with their FLOPs, the others (pooling, element-wise) with their output
    fd = np.array([_flops(s) or float(np.prod(s[-1])) for _, s in kd])
    fp = np.array([_flops(s) or float(np.prod(s[-1])) for _, s in kp])
    ideal = td * fp / fd
    macs = np.array([_flops(s) > 0 for _, s in kd])
    fr = fd[macs].sum() / fp[macs].sum()
    return {"td": td, "tp": tp, "ideal": ideal, "fr": fr, "kd": kd, "kp": kp}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mobilenet_v2,efficientnet_b0")
    ap.add_argument("--pipeline", default="fold-bn,prune-channels{ratio=0.5}")
    ap.add_argument("--dense-pipeline", default="fold-bn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    summary = []
    for name in args.models.split(","):
        r = scaling(name, args.dense_pipeline, args.pipeline, args.rounds)
        td, tp, ideal, fr = r["td"], r["tp"], r["ideal"], r["fr"]
        summary.append((name, fr, td.sum(), tp.sum(), td.sum() / tp.sum(), td.sum() / ideal.sum()))
        print(f"\n{name}: kernels furthest below their own FLOPs ratio (ms, median of {args.rounds} rounds)\n")
        print("| kernel (pruned) | input, weight (pruned) | dense ms | pruned ms | speedup | its FLOPs ratio | ms lost |")
        print("|---|---|---|---|---|---|---|")
        lost = tp - ideal
        for i in np.argsort(-lost)[:args.top]:
            kfr = td[i] / ideal[i]
            shp = ", ".join("x".join(map(str, s)) for s in r["kp"][i][1][:2])
            print(f"| {r['kp'][i][0][:28]} | {shp} | {td[i] * 1e3:.3f} | {tp[i] * 1e3:.3f} | {td[i] / tp[i]:.2f}x "
                  f"| {kfr:.2f}x | {lost[i] * 1e3:.3f} |")
    print(f"\n{args.threads} threads, dense `{args.dense_pipeline}` vs `{args.pipeline}`, summed kernel times\n")
    print("| model | FLOPs ratio | dense ms | pruned ms | measured speedup (of FLOPs ratio) "
          "| ideal speedup (of FLOPs ratio) |")
    print("|---|---|---|---|---|---|")
    for name, fr, d, p, sp, ideal in summary:
        print(f"| {name} | {fr:.2f}x | {d * 1e3:.2f} | {p * 1e3:.2f} | {sp:.2f}x ({sp / fr:.0%}) "
              f"| {ideal:.2f}x ({ideal / fr:.0%}) |")


if __name__ == "__main__":
    main()
