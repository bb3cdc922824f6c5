"""Default (untuned) schedules.

CUDA: TVM's dlight GPU rules.  CPU: prunec's own rules, tried in order on each
fused kernel, then dlight's CPU rules, then a parallel fallback:

* ``RegisterTiledReduction``: a kernel with one reduction block (convolution,
  matmul, pooling, depthwise convolution).  The output is tiled into a
  register block (``reg`` rows of the axis that the vectorized operand does not
  use, e.g. output channels of a convolution or rows of a matmul, times
  ``vec`` lanes of the innermost output axis), accumulated in a local buffer
  over the whole reduction, with the fused epilogue (bias, batch norm, ReLU,
  SiLU, residual add) applied when the tile is stored.  Outer tiles run in parallel.
* ``ParallelInjective``: element-wise/layout kernels: fused loops in parallel,
  innermost vectorized.

Kernels already scheduled (prunec's sparse kernels, MetaSchedule records) are
left alone.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

_DATA_PAR, _REDUCE = 0, 2


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def _vars_in(expr) -> set:
    return {v.name for v in tirx.analysis.undefined_vars(expr)}


def _is_scheduled(func) -> bool:
    return "tirx.is_scheduled" in func.attrs and bool(func.attrs["tirx.is_scheduled"])


def _simple_loops(sch, block) -> bool:
    """The block's loops bind its iter vars one to one (nothing scheduled yet)."""
    b = sch.get(block)
    loops = sch.get_loops(block)
    return len(loops) == len(b.iter_vars) and all(
        int(sch.get(lp).extent) == int(iv.dom.extent) for lp, iv in zip(loops, b.iter_vars))


def _parallel_vectorize(sch, block, threads: int, vec_limit: int = 64) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    b = sch.get(block)
    if any(iv.iter_type != _DATA_PAR for iv in b.iter_vars):
        # a reduction outside prunec's rule: parallelize its leading spatial loops only
        lead = []
        for lp, iv in zip(loops, b.iter_vars):
            if iv.iter_type != _DATA_PAR:
                break
            lead.append(lp)
        if lead and _simple_loops(sch, block):
            sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
        return
    ext = [int(sch.get(lp).extent) for lp in loops]
    if len(loops) >= 2 and ext[-1] <= vec_limit:
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(outer)
        sch.vectorize(loops[-1])
    else:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        total = 1
        for e in ext:
            total *= e
        v = _largest_divisor(total, 16)
        if v > 1 and total > v:
            o, i = sch.split(fused, [None, v])
            sch.parallel(o)
            sch.vectorize(i)
        else:
            sch.parallel(fused)


class RegisterTiledReduction(dl.ScheduleRule):
    def __init__(self, vec: int = 16, reg: int = 8, threads: int = 2):
        self.vec, self.reg, self.threads = vec, reg, threads

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root") if _has_root(sch) else None)
        red = [b for b in blocks if any(iv.iter_type == _REDUCE for iv in sch.get(b).iter_vars)]
        if len(red) != 1 or not _simple_loops(sch, red[0]):
            return None
        main = red[0]
        idx = [i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(main))][0]
        pro, epi = blocks[:idx], blocks[idx + 1:]
        b = sch.get(main)
        if len(b.writes) != 1:
            return None
        spatial = [i for i, iv in enumerate(b.iter_vars) if iv.iter_type == _DATA_PAR]
        reduce = [i for i, iv in enumerate(b.iter_vars) if iv.iter_type == _REDUCE]
        if len(spatial) + len(reduce) != len(b.iter_vars) or not spatial:
            return None
        loops = sch.get_loops(main)
        ext = [int(sch.get(lp).extent) for lp in loops]
        vaxis = spatial[-1]
        vvar = b.iter_vars[vaxis].var.name
        # the register axis: a spatial axis not used by the operand read with the vector axis
        raxis = None
        vec_reads = [r for r in b.reads if any(vvar in _vars_in(rg.min) for rg in r.region)]
        used = set()
        for r in vec_reads:
            for rg in r.region:
                used |= _vars_in(rg.min)
        for i in reversed(spatial[:-1]):
            if b.iter_vars[i].var.name not in used and ext[i] > 1:
                raxis = i
                break
        # 1. epilogue into a local-accumulator write-back.  Inline the epilogue's inner blocks into
        # their consumers first: a value read twice (SiLU: t * sigmoid(t)) cannot be reverse-inlined,
        # and left behind as its own loop nest it broke TVM's FlattenBuffer (EfficientNet).
        cache = sch.cache_write(main, 0, "local")
        left = []
        for e in epi[:-1]:
            try:
                sch.compute_inline(e)
            except Exception:  # noqa: BLE001 - try reverse inlining below
                left.append(e)
        for e in left + epi[-1:]:
            try:
                sch.reverse_compute_inline(e)
            except Exception:  # noqa: BLE001
                if left:  # a partly inlined chain would read values computed after it
                    return None
                # the last block alone (e.g. a broadcast SE gate) stays its own loop nest after the
                # write-back; it reads only the finished reduction output
        # 2. tile
        v = _largest_divisor(ext[vaxis], self.vec)
        if v < 4 and ext[vaxis] > 16:
            v = 16  # ragged: let the tail be guarded
        r = _largest_divisor(ext[raxis], self.reg) if raxis is not None else 1
        vo, vi = sch.split(loops[vaxis], [None, v])
        outer, inner = [], []
        for i in spatial:
            if i == vaxis:
                outer.append(vo)
            elif i == raxis and r > 1:
                ro, ri = sch.split(loops[i], [None, r])
                outer.append(ro)
                inner.append(ri)
            else:
                outer.append(loops[i])
        red_loops = [loops[i] for i in reduce]
        sch.reorder(*outer, *red_loops, *inner, vi)
        par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(par)
        for lp in inner:
            sch.unroll(lp)
        sch.vectorize(vi)
        sch.reverse_compute_at(cache, par)
        init = sch.decompose_reduction(main, red_loops[0])
        try:
            sch.vectorize(sch.get_loops(init)[-1])
        except Exception:  # noqa: BLE001
            pass
        cl = sch.get_loops(cache)
        if len(cl) > 1:
            try:
                sch.vectorize(cl[-1])
            except Exception:  # noqa: BLE001
                pass
        # 3. prologue (padding, layout) and left-over epilogue kernels
        for blk in pro:
            _parallel_vectorize(sch, blk, self.threads)
        for blk in sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []:
            if blk_is_root_level(sch, blk) and not any(sch.get(blk).same_as(sch.get(x)) for x in pro + [main]):
                try:
                    _parallel_vectorize(sch, blk, self.threads)
                except Exception:  # noqa: BLE001
                    pass
        return sch


def blk_is_root_level(sch, blk) -> bool:
    loops = sch.get_loops(blk)
    if not loops:
        return False
    try:
        return sch.get(loops[0]).kind == tirx.ForKind.SERIAL
    except Exception:  # noqa: BLE001
        return False


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


class ParallelInjective(dl.ScheduleRule):
    def __init__(self, threads: int = 2):
        self.threads = threads

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        for blk in sch.get_child_blocks(sch.get_sblock("root")):
            try:
                _parallel_vectorize(sch, blk, self.threads)
            except Exception:  # noqa: BLE001
                pass
        return sch


def vector_lanes(target) -> int:
    """fp32 lanes of the widest vector register ``target`` has (16 with AVX-512, 8 with AVX2)."""
    from .tvm_lower import cpu_features
    feats = cpu_features(target)
    return 16 if "avx512f" in feats else 8 if "avx2" in feats or "avx" in feats else 4


def cpu_rules(target) -> list:
    # one vector register of lanes x 8 rows of accumulators: 8 registers, leaving room for
    # operands (16 lanes x 8 rows spills on AVX2's 16 registers)
    vec = vector_lanes(target)
    return [RegisterTiledReduction(vec=vec, reg=8), dl.cpu.GEMV(), dl.cpu.Reduction(), ParallelInjective()]


def gpu_rules() -> list:
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def schedule_pass(target) -> tvm.transform.Pass:
    """The default-schedule module pass for ``target`` (use inside ``with target:``)."""
    rules = gpu_rules() if target.kind.name == "cuda" else cpu_rules(target)
    return dl.ApplyDefaultSchedule(*rules)


def schedule_module(mod: tvm.IRModule, target) -> tvm.IRModule:
    with target:
        return schedule_pass(target)(mod)
