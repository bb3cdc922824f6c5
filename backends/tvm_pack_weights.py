"""GEMM weights stored row-tile by row-tile at compile time.

The GEMM schedule (tvm_schedule_tiles.tile_gemm) sweeps the rows of ``W[M, K]`` in register tiles
of ``r`` rows; at each reduction step a tile reads one value from each of its ``r`` rows, ``K``
floats apart, so every tile streams ``r`` short rows at once.  With the weights cold (as in a
model, where each layer's weights were last read an inference ago) that defeats the hardware
prefetcher on short rows: a pruned 7x7 layer (640x160) ran at 0.69x the time with its weights
stored as ``Wp[ceil(M / r), K, r]``, one contiguous stream per tile (the dense 1280x320: 0.82x;
14x14 layers 0.93-0.95x).  The weights are constants, so the layout costs nothing at run time.

Three steps, all in ``tvm_schedule.schedule_module``:

1. ``mark_constant_params``: each kernel learns which of its parameters every call site passes a
   constant for (``CONSTANT_PARAMS``).
2. The schedule (``pack_rows``) re-lays such a GEMM weight out with ``transform_layout`` and
   records it (``PACKED_ROWS``: parameter index -> ``r``).
3. ``pack_call_sites``: every call of such a kernel gets its constant in the new layout (rows
   zero-padded to whole tiles).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

CONSTANT_PARAMS = "prunec.constant_params"
PACKED_ROWS = "prunec.packed_rows"


def _calls(mod: tvm.IRModule, refs: dict | None = None) -> list:
    """Every ``call_tir`` in the module's Relax functions; ``refs`` counts each GlobalVar's uses."""
    out = []

    @relax.expr_functor.visitor
    class _Visit(relax.PyExprVisitor):
        def visit_call_(self, call):
            if getattr(call.op, "name", "") == "relax.call_tir":
                out.append(call)
            super().visit_call_(call)

        def visit_global_var_(self, gv):
            if refs is not None:
                refs[gv] = refs.get(gv, 0) + 1

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            _Visit().visit_expr(func)
    return out


def mark_constant_params(mod: tvm.IRModule) -> tvm.IRModule:
    """Annotate each kernel with the indices of the parameters every call site passes a constant for
    (a kernel used other than by ``call_tir``, e.g. in place, gets none)."""
    mod = mod.clone()
    const: dict = {}
    calls: dict = {}
    refs: dict = {}
    for call in _calls(mod, refs):
        gv, args = call.args[0], list(call.args[1].fields)
        flags = [isinstance(a, tvm.ir.expr.Constant) for a in args]
        const[gv] = flags if gv not in const else [a and b for a, b in zip(const[gv], flags)]
        calls[gv] = calls.get(gv, 0) + 1
    for gv, flags in const.items():
        func = mod[gv]
        idx = [i for i, f in enumerate(flags) if f]
        if isinstance(func, tirx.PrimFunc) and idx and refs.get(gv) == calls[gv]:
            mod.update_func(gv, func.with_attr(CONSTANT_PARAMS, idx))
    return mod


def pack_rows(sch, main, func, w_read: int, rows: int) -> dict | None:
    """Store the weight that ``main`` reads as ``b.reads[w_read]`` (``W[i, k]``, a parameter every
    call site passes a constant for) as ``Wp[i // rows, k, i % rows]``; the {parameter index: rows}
    to record, or None where it is not such a weight."""
    attrs = func.attrs if func.attrs is not None else {}
    if CONSTANT_PARAMS not in attrs:
        return None
    buf = sch.get(main).reads[w_read].source
    params = [i for i, p in enumerate(func.params) if p.same_as(buf)]
    if not params or params[0] not in [int(i) for i in attrs[CONSTANT_PARAMS]] or len(buf.shape) != 2:
        return None
    m = int(buf.shape[0])
    if m <= rows:
        return None  # one tile: already one stream
    sch.transform_layout(main, ("read", w_read), lambda i, k: (i // rows, k, i % rows),
                         pad_value=None if m % rows == 0 else 0.0)
    return {params[0]: rows}


def packed(w: np.ndarray, rows: int) -> np.ndarray:
    """``w[M, K]`` as ``[ceil(M / rows), K, rows]``, the last tile's missing rows zero."""
    m, k = w.shape
    tiles = -(-m // rows)
    padded = np.zeros((tiles * rows, k), w.dtype)
    padded[:m] = w
    return np.ascontiguousarray(padded.reshape(tiles, rows, k).transpose(0, 2, 1))


def pack_call_sites(mod: tvm.IRModule) -> tvm.IRModule:
    """Every call of a kernel whose weight ``pack_rows`` re-laid out passes it in that layout."""
    kernels = {gv: {int(i): int(r) for i, r in mod[gv].attrs[PACKED_ROWS].items()}
               for gv, f in mod.functions.items()
               if isinstance(f, tirx.PrimFunc) and f.attrs is not None and PACKED_ROWS in f.attrs}
    if not kernels:
        return mod
    # the kernels' signatures changed: a GlobalVar carries its function's type, so each gets a new one
    bb = relax.BlockBuilder()
    renamed = {gv: bb.add_func(mod[gv], gv.name_hint) for gv in kernels}
    mod = tvm.IRModule({renamed.get(gv, gv): f for gv, f in mod.functions.items()}, attrs=mod.attrs,
                       global_infos=mod.global_infos)

    @relax.expr_functor.mutator
    class _Pack(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") != "relax.call_tir" or call.args[0] not in kernels:
                return call
            args = list(call.args[1].fields)
            for i, rows in kernels[call.args[0]].items():
                if not isinstance(args[i], tvm.ir.expr.Constant):  # mark_constant_params said it is
                    raise ValueError(f"{call.args[0].name_hint}: argument {i} is not a constant")
                args[i] = relax.const(packed(args[i].value.numpy(), rows))
            return relax.Call(call.op, [renamed[call.args[0]], relax.Tuple(args), *call.args[2:]], call.attrs,
                              call.ty_args)

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod.update_func(gv, _Pack().visit_expr(func))
    return mod
