"""Time and peak memory to load, trace and emit torchvision classification models.

Each model runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its
own.  Phases:

* load   -- build the model with random init (``torchvision.models.get_model``)
* trace  -- ``prunec.trace``: the default recorder (one forward pass, see prunec/recorder.py),
            and, in a second fresh process, ``tracer="export"`` (torch.export + local
            functionalization + IR), side by side
* emit   -- ``torch_backend.export_program`` (IR -> torch.export program), after the recorder

Usage::

    python benchmarks/trace.py                      # every model with <= 100M params
    python benchmarks/trace.py resnet18 vit_b_16    # a subset
    python benchmarks/trace.py --max-params 30e6 --input-shape 1,3,224,224

Prints a markdown table on stdout (progress on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def classification_models(max_params: float) -> list[tuple[str, int]]:
    """(name, parameter count) for every torchvision classification model within the limit.
    Counts come from the weights' metadata, so nothing is built or downloaded."""
    import torchvision
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = list(torchvision.models.get_model_weights(name))
        n = weights[0].meta["num_params"]
        if n <= max_params:
            out.append((name, n))
    return out


def _rss_mib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_one(name: str, shape: str, tracer: str) -> dict:
    """Runs inside the child process."""
    import torch
    import torchvision
    import prunec
    from prunec.backends import torch_backend
    from prunec.frontend import make_inputs

    torch.manual_seed(0)
    base = _rss_mib()
    t0 = time.perf_counter()
    model = torchvision.models.get_model(name, weights=None).eval()
    inputs = make_inputs([shape])
    t1 = time.perf_counter()
    graph = prunec.trace(model, inputs, tracer=tracer)
    t2 = time.perf_counter()
    torch_backend.export_program(graph, inputs)
    t3 = time.perf_counter()
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "nodes": len(graph.nodes),
            "load_s": t1 - t0, "trace_s": t2 - t1, "emit_s": t3 - t2,
            "base_rss_mib": base, "peak_rss_mib": _rss_mib(), "tracer": graph.tracer}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="torchvision model names (default: all within --max-params)")
    ap.add_argument("--max-params", type=float, default=100e6)
    ap.add_argument("--input-shape", default="1,3,224,224")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tracer", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(measure_one(args.child, args.input_shape, args.tracer)))
        return 0

    names = args.models or [n for n, _ in classification_models(args.max_params)]
    rows, failed = [], []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name} ...", file=sys.stderr, end="", flush=True)
        row = {}
        for tracer in ("auto", "export"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--input-shape", args.input_shape,
                   "--tracer", tracer]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            except subprocess.TimeoutExpired:
                failed.append((name, f"{tracer}: timed out after {args.timeout:.0f}s"))
                break
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                failed.append((name, f"{tracer}: {err[:200]}"))
                break
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if tracer == "auto":
                row = r
            else:
                row["export_trace_s"], row["export_peak_rss_mib"] = r["trace_s"], r["peak_rss_mib"]
        else:
            rows.append(row)
            print(f" {row['trace_s']:.1f}s / {row['export_trace_s']:.1f}s trace", file=sys.stderr)
            continue
        print(" failed", file=sys.stderr)

    print(f"input {args.input_shape}, float32, CPU, random init; one fresh process per model and tracer\n")
    print("| model | params (M) | IR nodes | load (s) | trace (s) | trace, torch.export (s) | ratio | tracer "
          "| emit (s) | peak RSS (MiB) | peak RSS, torch.export (MiB) | RSS after imports (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        who = "recorder" if r["tracer"] == "recorder" else "torch.export"
        print(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['nodes']} | {r['load_s']:.2f} | {r['trace_s']:.2f} "
              f"| {r['export_trace_s']:.2f} | {r['export_trace_s'] / r['trace_s']:.1f}x | {who} "
              f"| {r['emit_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['export_peak_rss_mib']:.0f} "
              f"| {r['base_rss_mib']:.0f} |")
    if rows:
        tot = lambda k: sum(r[k] for r in rows)  # noqa: E731
        print(f"| **total ({len(rows)} models)** | | | {tot('load_s'):.1f} | {tot('trace_s'):.1f} "
              f"| {tot('export_trace_s'):.1f} | {tot('export_trace_s') / tot('trace_s'):.1f}x | "
              f"| {tot('emit_s'):.1f} | | | |")
    for name, why in failed:
        print(f"\nFAILED {name}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
