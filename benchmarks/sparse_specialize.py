"""Does baking the sparsity pattern into the kernel pay?  An experiment, side by side in one run.

    python benchmarks/sparse_specialize.py [--threads 2]

prunec's BSR kernel (``prunec.backends.tvm_sparse.bsr_xwt``) reads the non-zero block
coordinates from constant index arrays.  The alternative the TVM-backend issue asks
about bakes them in: this script generates, per layer, a TVMScript kernel whose rows are
straight-line code with the column of every non-zero block as an immediate (no index
loads; the block values stay a constant buffer), split into parallel chunks.  For each
layer it reports both kernels' times (TVM time_evaluator, median), the baked kernel's
parse + compile time, and checks both against numpy.  The generator lives here, not in
prunec, because the measurements below decided against shipping it (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time

import numpy as np


def baked_source(m, k, n, r, idx, ptr, chunks=8, terms=16) -> str:
    """TVMScript text of y[M, N] = x[M, K] @ W[N, K]^T with W's r x 1 block pattern baked in."""
    nb = n // r
    mt = next(d for d in (4, 2, 1) if m % d == 0)
    rows_per = (nb + chunks - 1) // chunks
    out = ["from tvm.script import tirx as T", "", "", "@T.prim_func(private=True)",
           f"def baked(x: T.Buffer(({m}, {k}), 'float32'), data: T.Buffer(({len(idx)}, 1, {r}), 'float32'),"
           f" y: T.Buffer(({m}, {n}), 'float32')):",
           "    T.func_attr({'tirx.noalias': True, 'tirx.is_scheduled': True})",
           f"    for c in T.parallel({chunks}):"]
    for c in range(chunks):
        rows = range(c * rows_per, min(nb, (c + 1) * rows_per))
        if not len(rows):
            continue
        out += [f"        if c == {c}:", f"            for mo in range({m // mt}):",
                f"                acc = T.alloc_buffer(({mt}, {r}), 'float32', scope='local')"]
        for i in rows:
            out += [f"                for mi in T.unroll({mt}):", f"                    for rr in T.vectorized({r}):",
                    "                        acc[mi, rr] = T.float32(0)"]
            js = range(ptr[i], ptr[i + 1])
            for s in range(0, len(js), terms):  # short sums keep the parser's recursion shallow
                e = " + ".join(f"data[{j}, 0, rr] * x[mo * {mt} + mi, {idx[j]}]" for j in js[s:s + terms])
                out.append(f"                        acc[mi, rr] = acc[mi, rr] + {e}")
            out.append(f"                        y[mo * {mt} + mi, {i * r} + rr] = acc[mi, rr]")
    return "\n".join(out) + "\n"


def load_baked(src: str):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    try:
        spec = importlib.util.spec_from_file_location("prunec_baked_kernel", f.name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # TVMScript parses at import
        return mod.baked
    finally:
        os.unlink(f.name)


def run(func, target, args):
    import tvm
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    dev = tvm.cpu(0)
    targs = [tvm.runtime.tensor(a, dev) for a in args]
    lib["main"](*targs)
    t = lib.mod.time_evaluator("main", dev, number=20, repeat=5, min_repeat_ms=20)(*targs)
    return float(np.median(t.results)) * 1e3, targs[-1].numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    from prunec.backends.tvm_lower import to_target
    from prunec.backends.tvm_sparse import bsr_xwt, to_bsr
    from prunec.target import parse_target
    target = to_target(parse_target("llvm"))
    rng = np.random.default_rng(0)
    r = 16
    print(f"16x1 blocks, {args.threads} threads, times in ms (median)\n")
    print("| layer (N x K) | sparsity | batch | non-zero blocks | index arrays | baked pattern | baked vs index "
          "| baked parse s | baked compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k, sp, m in [(768, 768, 0.95, 1), (768, 768, 0.9, 1), (3072, 768, 0.95, 1), (3072, 768, 0.95, 128),
                        (3072, 768, 0.9, 1)]:
        keep = rng.random((n // r, k)) > sp
        w = (rng.standard_normal((n // r, r, k)) * keep[:, None, :]).reshape(n, k).astype("float32")
        data, idx, ptr = to_bsr(w, r)
        x = rng.random((m, k)).astype("float32")
        ref = x @ w.T
        t0 = time.perf_counter()
        baked = load_baked(baked_source(m, k, n, r, idx, ptr))
        parse_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tb, yb = run(baked, target, [x, data, np.zeros((m, n), "float32")])
        compile_s = time.perf_counter() - t0
        ti, yi = run(bsr_xwt(m, k, n, r, len(idx)), target, [x, data, idx, ptr, np.zeros((m, n), "float32")])
        scale = float(np.abs(ref).max())
        assert np.abs(yb - ref).max() <= 1e-4 * scale and np.abs(yi - ref).max() <= 1e-4 * scale
        print(f"| {n} x {k} | {sp:.0%} | {m} | {len(idx)} | {ti:.4f} | {tb:.4f} | {ti / tb:.2f}x "
              f"| {parse_s:.1f} | {compile_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
