"""How much of a pruning's speedup depends on what the caches hold: the whole TVM model against
its kernels replayed one by one with warm and with cold caches, dense and pruned.

    python benchmarks/cache_state.py [--models mobilenet_v2] [--pipeline 'fold-bn,prune-channels{ratio=0.5}']
        [--dense-pipeline fold-bn] [--threads 2] [--rounds 9] [--evict-mb 64] [--top 0]

One inference of each build is recorded (every kernel call with its own argument tensors, through
the VM's instrument), then per round, dense and pruned alternating:

* ``whole``: the VM runs the model (mean of 3 calls);
* ``warm``: every recorded kernel call again, each timed right after an untimed call of itself,
  so its code, weights and inputs sit in cache (the sum over the inference);
* ``cold``: every recorded call timed right after reading a buffer larger than the caches
  (``--evict-mb``), so all of it comes from memory.

Prints the medians and each column's pruned/dense speedup as a share of the FLOPs ratio (the
conv / matmul kernels' FLOPs, as ``kernel_scaling.py`` counts them).  Where ``whole`` sits between
``warm`` and ``cold`` says how much of the model's data a run finds in cache; a pruned model moves
more bytes per FLOP than its dense parent (activations shrink with the channels, FLOPs with their
square), so the colder the caches the lower its share.  ``--top N`` lists the N kernel calls of the
pruned model that lose the most time cold.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from _timing import median_ms
from kernel_scaling import _build, _flops


def record(vm, x) -> list[tuple[str, object, tuple, float]]:
    """One inference's kernel calls: (name, function, argument tensors, FLOPs), in call order."""
    calls = []

    def instrument(func, name, before, _ret, *args):
        if before and not name.startswith("vm.builtin."):
            shapes = tuple(tuple(int(s) for s in a.shape) for a in args if hasattr(a, "shape"))
            calls.append((name, func, tuple(args), _flops(list(shapes))))
        return 0

    vm.set_instrument(instrument)
    vm["main"](x)
    vm.set_instrument(None)
    return calls


def replay(calls, evict=None) -> np.ndarray:
    """Seconds of each recorded call, each timed after a warm-up call of itself or, with ``evict``,
    after ``evict()`` has pushed everything out of the caches."""
    out = np.empty(len(calls))
    for i, (_name, func, args, _f) in enumerate(calls):
        if evict is None:
            func(*args)
        else:
            evict()
        t0 = time.perf_counter()
        func(*args)
        out[i] = time.perf_counter() - t0
    return out


def measure(name: str, dense_pipeline: str, pipeline: str, rounds: int, evict_mb: int):
    junk = np.ones(evict_mb << 18, "float32")

    def evict():
        junk.sum()

    builds = {"dense": _build(name, dense_pipeline), "pruned": _build(name, pipeline)}
    calls = {v: record(vm, x) for v, (vm, x) in builds.items()}
    times = {v: {"whole": [], "warm": [], "cold": []} for v in builds}
    per_call = {v: [] for v in builds}
    for _ in range(rounds + 1):  # the first round warms up
        for v, (vm, x) in builds.items():
            f = vm["main"]
            times[v]["whole"].append(median_ms(lambda: f(x), number=3, repeat=1) / 1e3)
            warm, cold = replay(calls[v]), replay(calls[v], evict)
            times[v]["warm"].append(warm.sum())
            times[v]["cold"].append(cold.sum())
            per_call[v].append(cold - warm)
    fr = sum(c[3] for c in calls["dense"]) / sum(c[3] for c in calls["pruned"])
    med = {v: {k: float(np.median(t[1:])) for k, t in cols.items()} for v, cols in times.items()}
    # the ratio round by round: both variants ran within about a second of each other
    share = {k: float(np.median(np.array(times["dense"][k][1:]) / np.array(times["pruned"][k][1:]))) / fr
             for k in ("whole", "warm", "cold")}
    lost = np.median(np.array(per_call["pruned"][1:]), axis=0)
    return med, share, fr, [(c[0], lost[i]) for i, c in enumerate(calls["pruned"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mobilenet_v2")
    ap.add_argument("--pipeline", default="fold-bn,prune-channels{ratio=0.5}")
    ap.add_argument("--dense-pipeline", default="fold-bn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--evict-mb", type=int, default=64, help="size of the buffer read to empty the caches")
    ap.add_argument("--top", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    print(f"{args.threads} threads, dense `{args.dense_pipeline}` vs `{args.pipeline}`, ms (median of "
          f"{args.rounds} interleaved rounds); share: pruned/dense speedup as a share of the FLOPs ratio\n")
    print("| model | FLOPs ratio | variant | whole | warm kernels | cold kernels |")
    print("|---|---|---|---|---|---|")
    tops = []
    for name in args.models.split(","):
        med, share, fr, lost = measure(name, args.dense_pipeline, args.pipeline, args.rounds, args.evict_mb)
        for v in ("dense", "pruned"):
            print(f"| {name} | {fr:.2f}x | {v} | " + " | ".join(f"{med[v][k] * 1e3:.2f}" for k in ("whole", "warm", "cold"))
                  + " |")
        print(f"| {name} | | share | " + " | ".join(f"{share[k]:.0%}" for k in ("whole", "warm", "cold")) + " |")
        tops.append((name, lost))
    for name, lost in tops if args.top else []:
        print(f"\n{name} pruned: calls that lose the most cold (ms)\n\n| call | kernel | cold - warm |\n|---|---|---|")
        for i in sorted(range(len(lost)), key=lambda i: -lost[i][1])[:args.top]:
            print(f"| {i} | {lost[i][0]} | {lost[i][1] * 1e3:.3f} |")


if __name__ == "__main__":
    main()
