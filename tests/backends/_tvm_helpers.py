"""Helpers for the TVM backend tests: compile a module through prunec and compare with the torch backend."""
from __future__ import annotations

import numpy as np
import torch

import prunec
from prunec.ir import interpret


def max_rel_err(got, ref) -> float:
    got = [g.numpy() if hasattr(g, "numpy") else np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
    ref = [r.detach().numpy() for r in ref]
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape, (g.shape, r.shape)
        scale = max(float(np.abs(r).max()), 1e-6)
        worst = max(worst, float(np.abs(g - r).max()) / scale)
    return worst


def build_and_compare(model, inputs, passes: str = "", sparse: dict | None = None, tol: float = 1e-4,
                      target: str = "llvm"):
    """Compile with ``passes`` for ``target`` (a CPU); check the TVM output against the torch backend's."""
    model = model.eval()
    inputs = tuple(inputs)
    result = prunec.compile(model, inputs, passes=passes, target=target, in_place=False,
                            target_options={"sparse": sparse} if sparse else None)
    with torch.no_grad():
        ref = interpret(result.graph, inputs)
    got = result.artifact.load()(*inputs)
    err = max_rel_err(got, ref)
    assert err <= tol, f"max abs error {err:.3g} relative to the output scale"
    return result


def has_cuda() -> bool:
    """A CUDA GPU that TVM can run on (the CUDA tests skip without one)."""
    import tvm
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001
        return False


def op_names(mod) -> list[str]:
    """The Relax operators ``mod["main"]`` calls, in post order."""
    from tvm import ir, relax
    names = []
    relax.analysis.post_order_visit(mod["main"], lambda e: names.append(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, ir.Op) else None)
    return names


def task_allocations(module) -> list[int]:
    """Bytes of every workspace (heap) allocation made inside a parallel task of ``module``'s
    kernels (a runtime module, an executable or an artifact), read from the generated LLVM IR.  A buffer under
    1 KB belongs on the stack (or in registers): one here costs an allocation and a free per task."""
    import re
    module = getattr(module, "executable", module)  # an artifact
    module = module if hasattr(module, "imports") else module.mod  # an executable
    src = "".join(m.inspect_source("ll") for m in [module, *module.imports] if m.kind == "llvm")
    sizes = []
    for fn in re.split(r"\ndefine ", src)[1:]:
        name = re.match(r"[^@]*@([\w.]+)\(", fn).group(1)
        if not name.startswith("__tvm_parallel_lambda"):
            continue
        body = fn.split("\n}\n")[0]
        # ``%p = load ptr, ptr @__TVMBackendAllocWorkspace`` then ``call ptr %p(i32, i32, i64 BYTES, ...)``
        for ptr in re.findall(r"(%[\w.]+) = load ptr, ptr @__TVMBackendAllocWorkspace", body):
            sizes += [int(n) for n in re.findall(re.escape(ptr) + r"\(i32 [^,]+, i32 [^,]+, i64 (\d+)", body)]
    assert src, "no LLVM module to read"
    return sizes
