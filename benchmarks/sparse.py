"""Sparse kernels: TVM sparse vs TVM dense (scheduled) vs torch F.linear vs torch.sparse, side by side.

    python benchmarks/sparse.py [--threads 2] [--sparsity 0.7,0.8,0.9,0.95] [--batches 1,128] [--target cuda]

Rows: a 768x3072 linear (y = x W^T, W: 3072x768) at batch 1 and 128 with 16x1 block
sparsity, and a BERT-style FFN (768 -> 3072 -> GELU -> 768, 128 tokens) compiled
end to end through prunec (prune-blocks{block=16x1}) vs the same model dense.
Times are medians in ms; speedups are over torch dense measured in the same run: each row's
contenders are timed in alternating rounds, so the machine's load hits them alike.
With ``--target cuda`` everything runs on the GPU: prunec's CUDA BSR kernels, TVM's
dlight-scheduled dense matmul, cuBLAS (F.linear) and cuSPARSE (torch.sparse); a torch
call is timed up to its ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _timing import interleaved_ms


def _block_sparse(n, k, r, sparsity, rng):
    w = rng.standard_normal((n, k)).astype("float32")
    keep = rng.random((n // r, k)) >= sparsity
    return w * np.repeat(keep, r, axis=0)


def _sync(fn, gpu):
    if not gpu:
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


def _tvm_call(func, target, args):
    """A callable running one PrimFunc, which times itself with TVM's ``time_evaluator``."""
    from prunec.backends.tvm_sparse import build_func
    lib, dev, targs = build_func(func, target, args)

    def call():
        lib["main"](*targs)
        dev.sync()

    def per_call_s(number):
        return lib.mod.time_evaluator("main", dev, number=number, repeat=1)(*targs).mean
    call.per_call_s = per_call_s
    return call


def _vm_call(model, x):
    """A callable running a loaded prunec artifact, which times itself with its VM's evaluator."""
    def call():
        model(x)

    call.per_call_s = lambda number: model.time(x, number=number, repeat=1)
    return call


def bench_linear(target, batches, sparsities, r=16):
    """Each row's four contenders run in alternating rounds (``interleaved_ms``)."""
    from prunec.backends import tvm_sparse
    xwt, _, dense = tvm_sparse.kernels(target)
    gpu = target.kind.name == "cuda"
    dev = "cuda" if gpu else "cpu"
    rng = np.random.default_rng(0)
    n, k = 3072, 768
    rows = []
    for m in batches:
        x = rng.standard_normal((m, k)).astype("float32")
        dense_tvm = None
        for sp in sparsities:
            w = _block_sparse(n, k, r, sp, rng)
            data, idx, ptr = tvm_sparse.to_bsr(w, r)
            t0 = time.perf_counter()
            sparse_tvm = _tvm_call(xwt(m, k, n, r, len(idx)), target,
                                   [x, data, idx, ptr, np.zeros((m, n), "float32")])
            build_s = time.perf_counter() - t0
            if dense_tvm is None:  # the same dense kernel for every sparsity
                dense_tvm = _tvm_call(dense(m, k, n, target), target,
                                      [x, np.ascontiguousarray(w.T), np.zeros((m, n), "float32")])
            xt, wt = torch.from_numpy(x).to(dev), torch.from_numpy(w).to(dev)
            wcsr = wt.to_sparse_csr()
            t = interleaved_ms({"sparse": sparse_tvm, "dense": dense_tvm,
                                "torch": _sync(lambda: torch.nn.functional.linear(xt, wt), gpu),
                                "torch.sparse": _sync(lambda: torch.sparse.mm(wcsr, xt.T), gpu)})
            rows.append((f"linear 768x3072 b{m}", sp, t["sparse"], t["dense"], t["torch"], t["torch.sparse"],
                         build_s))
    return rows


def bench_ffn(target, sparsities, tokens=128):
    import prunec
    from torch import nn
    gpu = target.kind.name == "cuda"
    kind = target.kind.name
    torch.manual_seed(0)
    rows = []
    x = torch.randn(1, tokens, 768)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)).eval()

    dense = prunec.compile(model(), (x,), target=kind, in_place=False).artifact.load()
    xn = x.numpy()
    for sp in sparsities:
        m = model()
        res = prunec.compile(m, (x,), passes=f"prune-blocks{{block=16x1,ratio={sp}}}", target=kind, in_place=False)
        comp = res.artifact.load()
        with torch.no_grad():
            dev = "cuda" if gpu else "cpu"
            m, xd = m.to(dev), x.to(dev)
            w1 = res.graph.tensors["0.weight"].to(dev).to_sparse_csr()
            w2 = res.graph.tensors["2.weight"].to(dev).to_sparse_csr()
            b1, b2, x2 = m[0].bias, m[2].bias, xd.reshape(-1, 768)

            def sparse_ffn():
                h = torch.nn.functional.gelu(torch.sparse.mm(w1, x2.T).T + b1)
                return torch.sparse.mm(w2, h.T).T + b2
            fns = {"sparse": _vm_call(comp, xn), "dense": _vm_call(dense, xn), "torch": _sync(lambda: m(xd), gpu)}
            try:
                sparse_ffn()
                fns["torch.sparse"] = _sync(sparse_ffn, gpu)
            except Exception:  # noqa: BLE001 - torch.sparse lacks some ops on some devices
                pass
            t = interleaved_ms(fns, number=5)
        ts, td_tvm, td, tsp = t["sparse"], t["dense"], t["torch"], t.get("torch.sparse", float("nan"))
        choice = ",".join(r["choice"] for r in res.artifact.sparse_report)
        rows.append((f"BERT FFN {tokens} tok ({choice})", sp, ts, td_tvm, td, tsp, sum(res.artifact.timings.values())))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsity", default="0.7,0.8,0.9,0.95")
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--no-ffn", action="store_true")
    ap.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    args = ap.parse_args()
    import os
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    from prunec.backends.tvm_lower import to_target
    from prunec.target import parse_target
    target = to_target(parse_target(args.target))
    sps = [float(s) for s in args.sparsity.split(",")]
    rows = bench_linear(target, [int(b) for b in args.batches.split(",")], sps)
    if not args.no_ffn:
        try:
            rows += bench_ffn(target, sps)
        except Exception as e:  # noqa: BLE001 - keep the kernel rows
            print(f"# FFN rows failed: {type(e).__name__}: {e}")
    where = (f"{torch.cuda.get_device_name()} (CUDA)" if args.target == "cuda"
             else f"{target.attrs.get('mcpu')}, {args.threads} threads")
    print(f"target: {where}, times in ms (median)\n")
    print("| workload | block sparsity | TVM sparse | TVM dense | torch dense | torch.sparse (CSR) "
          "| sparse vs torch dense | sparse vs TVM dense | build s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, sp, ts, tdv, td, tsp, b in rows:
        print(f"| {name} | {sp:.0%} | {ts:.3f} | {tdv:.3f} | {td:.3f} | {tsp:.3f} | {td / ts:.1f}x | {tdv / ts:.1f}x "
              f"| {b:.1f} |")


if __name__ == "__main__":
    main()
