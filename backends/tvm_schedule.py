"""Default (untuned) schedules.

CUDA: TVM's dlight GPU rules.  CPU: prunec's own rules, tried in order on each
fused kernel, with dlight's CPU rules as fallbacks:

* ``RegisterTiledReduction``: a kernel with one reduction block (convolution,
  matmul, pooling, depthwise convolution).  The output is tiled into a
  register block (``reg`` rows of the axis that the vectorized operand does not
  use, e.g. output channels of a convolution or rows of a matmul, times
  ``vec`` lanes of the innermost output axis), accumulated in a local buffer
  over the whole reduction, with the fused epilogue (bias, batch norm, ReLU,
  SiLU, residual add) applied when the tile is stored.  Outer tiles run in parallel, output
  channels or columns outermost, whichever re-reads fewer bytes from beyond the cache.
  A matmul (one reduction axis, the vector operand indexed by plain loop variables) is tiled as
  a GEMM instead: parallel strips of ``2 x vec`` columns, each packing its operand slice
  contiguously (a short one is read in place) and sweeping all rows in ``gemm_rows`` x ``2 x vec``
  register tiles; with a ragged column count the last strip overlaps the one before it
  (tvm_schedule_overlap.py).  Pooling reads its input with a bounds check instead of a
  padding pass.  A depthwise convolution (no axis to reuse an operand across) is tiled
  over several output rows with its window unrolled, so the rows share input loads.
  The tilings themselves are in tvm_schedule_tiles.py, the layout rewrites before them in
  tvm_schedule_layout.py.
* ``RowReduction`` (tvm_schedule_rows.py): layer norm, softmax and other row-wise chains of
  reductions, with vector partial sums.
* ``ParallelInjective``: element-wise/layout kernels: element-wise stages inlined into one
  pass, fused loops in parallel, innermost vectorized.

Kernels already scheduled (prunec's sparse kernels, MetaSchedule records) are
left alone.
"""
from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl

from .tvm_pack_weights import PACKED_ROWS, mark_constant_params, pack_call_sites, pack_rows
from .tvm_schedule_gemv import gemv_operand, tile_gemv
from .tvm_schedule_layout import deinterleave_strided, fuse_plane, inline_copy, plane_vectors, strided_read
from .tvm_schedule_layout import reads_using as _reads_using
from .tvm_schedule_layout import vars_in as _vars_in
from .tvm_schedule_overlap import OverlapRefused, overlap_last_strip
from .tvm_schedule_rows import RowReduction
from .tvm_schedule_tiles import (TILE_SCOPE, _largest_divisor, _numel, packable_operand, tile_conv, tile_gemm,
                                 tile_window, vectorize_innermost)

_DATA_PAR, _REDUCE = 0, 2
# reduction size (input channels x window) up to which each task pads its own rows: RGB stems
# up to 7x7, 3x3s of up to 16 channels
_ROW_TASK_WINDOW = 3 * 7 * 7


def _into_task(sch, blk, par, consumer: bool = False) -> None:
    """Run stage ``blk`` inside each task of the parallel loop ``par`` (a producer before the
    task's tiles, a ``consumer`` after them), its innermost loop vectorized where it can be."""
    (sch.reverse_compute_at if consumer else sch.compute_at)(blk, par)
    vectorize_innermost(sch, blk)


def _refusing(pro: list, move) -> list:
    """Apply ``move`` (inline, compute-at) to each prologue stage, last first (a stage's consumer
    moves before it); the stages it raised on, which stay parallel prologue passes."""
    kept = []
    for blk in reversed(pro):
        try:
            move(blk)
        except Exception:  # noqa: BLE001 - stays a parallel prologue stage
            kept.insert(0, blk)
    return kept


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
    elif len(loops) >= 2 and _largest_divisor(ext[-1], 16) >= 4:
        # split the innermost loop alone: fusing everything first would put an int64 div/mod
        # per lane into the vector loop (a padding stage ran 10x slower that way)
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(outer)
        _, vi = sch.split(loops[-1], [None, _largest_divisor(ext[-1], 16)])
        sch.vectorize(vi)
    elif len(loops) >= 2:
        # no vector width divides the row (226, 113): rows in parallel, the row loop left to
        # LLVM's vectorizer, which adds its own remainder loop; fusing everything and splitting
        # by a divisor of the total would again put a div/mod per lane in the vector loop
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(outer)
    else:
        fused = loops[0]
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
    def __init__(self, vec: int = 16, reg: int = 8, threads: int = 2, gemm_rows: int = 6):
        self.vec, self.reg, self.threads, self.gemm_rows = vec, reg, threads, gemm_rows

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self._apply(func, target, overlap=True)
        except OverlapRefused:  # a ragged GEMM the overlapping strips cannot be proved safe for
            return self._apply(func, target, overlap=False)

    def _apply(self, func, target, overlap: bool):
        sch = s_tir.Schedule(func)
        if not _has_root(sch):  # a hand-written kernel (TVM's scan for cumsum): not a loop nest to tile
            return None
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        red = [b for b in blocks if any(iv.iter_type == _REDUCE for iv in sch.get(b).iter_vars)]
        if len(red) != 1 or not _simple_loops(sch, red[0]):
            return None
        main = red[0]
        idx = [i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(main))][0]
        pro, epi = blocks[:idx], blocks[idx + 1:]
        b = sch.get(main)
        if len(b.writes) != 1:
            return None
        # an unpadded convolution's "padding" stage is a plain copy of its input: an extra pass over
        # memory (and a parallel launch) that scales with the input, not with the FLOPs
        # ... except for a strided read: the copy is then stored phase-split (deinterleave_strided)
        # so the vectors read contiguous lanes, not a gather (ResNet-50's stride-2 1x1s: 1.3-2x)
        vlast = [iv.var for iv in b.iter_vars if iv.iter_type == _DATA_PAR][-1:]
        pro = [blk for blk in pro if (vlast and strided_read(b, sch.get(blk), vlast[0]))
               or not inline_copy(sch, blk)]
        b = sch.get(main)
        if len(b.reads) == 1 and pro:
            # a window reduction (pooling) reads each padded value about once: reading the input
            # with a bounds check beats a separate padding pass (ResNet-18's max pool: 3x faster)
            pro = _refusing(pro, sch.compute_inline)
            b = sch.get(main)
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
        vec_reads = _reads_using(b, vvar)
        used = set()
        for r in vec_reads:
            for rg in r.region:
                used |= _vars_in(rg.min)
        for i in reversed(spatial[:-1]):
            if b.iter_vars[i].var.name not in used and ext[i] > 1:
                raxis = i
                break
        if raxis is None and gemv_operand(b, ext, spatial, reduce, vaxis, vec_reads):
            # a one-row product (a classifier head): the reduction is split over the threads
            cores = int(target.attrs["num-cores"]) if "num-cores" in target.attrs else 0
            tile_gemv(sch, main, epi, ext, reduce, vaxis, self.vec, max(self.threads, cores))
            for blk in pro:
                _parallel_vectorize(sch, blk, self.threads)
            return sch
        # 0. a matmul gets the GEMM tiling (its vector operand is packed per column strip)
        gemm = packable_operand(b, spatial, reduce, raxis, vec_reads)
        width, padded = 2 * self.vec, False
        # ragged columns (a 14x14 or 7x7 plane, 197 tokens; a pruned 80 or 48, whose best strips,
        # 20 or 24, are not whole vectors): whole-vector strips, the last one moved back to overlap
        # the one before it (below), so no vector loop needs a guard ...
        ragged = gemm is not None and ext[vaxis] > width and _largest_divisor(ext[vaxis], width) % self.vec > 0
        if ragged and not overlap:
            # ... or, where that cannot be proved safe, zero-pad them so the vector loop needs no
            # guard, which would leave it scalar; the padded result is cropped by an element-wise pass
            ragged = False
            pads = [1] * len(b.iter_vars)
            pads[vaxis] = width
            try:
                sch.pad_einsum(main, pads)
            except Exception:  # noqa: BLE001 - not an einsum TVM can pad: the conv-style tiling
                gemm = None
            else:
                padded = True
                blocks = sch.get_child_blocks(sch.get_sblock("root"))
                idx = [i for i, x in enumerate(blocks) if sch.get(x).same_as(sch.get(main))][0]
                pro, epi = blocks[:idx], blocks[idx + 1:]
                b = sch.get(main)
                loops = sch.get_loops(main)
                ext = [int(sch.get(lp).extent) for lp in loops]
                gemm = packable_operand(b, spatial, reduce, raxis, _reads_using(b, vvar))
        if padded:
            # TVM would reverse-inline the epilogue over the padded columns and write past the output:
            # the main block accumulates in the padded buffer, crop + epilogue stay one parallel pass
            cache = None
        else:
            # 1. epilogue into the accumulator's write-back (a register tile, or for a GEMM a whole
            # column strip).  Inline the epilogue's inner blocks into their consumers first: a value
            # read twice (SiLU: t * sigmoid(t)) cannot be reverse-inlined, and left behind as its own
            # loop nest it broke TVM's FlattenBuffer (EfficientNet).
            cache = sch.cache_write(main, 0, TILE_SCOPE)
        left = []
        for e in epi[:-1]:
            try:
                sch.compute_inline(e)
            except Exception:  # noqa: BLE001 - try reverse inlining below
                left.append(e)
        for e in left + epi[-1:] if cache is not None else []:
            try:
                sch.reverse_compute_inline(e)
            except Exception:  # noqa: BLE001
                if left:  # a partly inlined chain would read values computed after it
                    return None
                # the last block alone (e.g. a broadcast SE gate) stays its own loop nest after the
                # write-back; it reads only the finished reduction output
        # 2. tile
        overlaps = None  # (loop variable, vector width) whose ragged last tile overlap_last_strip moves back
        if gemm is not None:
            strips = tile_gemm(sch, main, cache, loops, ext, spatial, reduce, vaxis, raxis, gemm, self.vec,
                               self.gemm_rows, padded=padded, ragged=ragged)
            if ragged:
                overlaps = (sch.get(strips).loop_var, width)
            if padded:
                # each column strip's task zero-pads its operand as it packs it and crops its own
                # columns: one parallel launch, not three (a 1x1 on a 7x7 plane as a matmul)
                pro = _refusing(pro, sch.compute_inline)
                par = sch.get_loops(main)[0]
                blocks = sch.get_child_blocks(sch.get_sblock("root"))
                idx = [i for i, x in enumerate(blocks) if sch.get(x).same_as(sch.get(main))][0]
                for blk in blocks[idx + 1:]:
                    if blk_is_root_level(sch, blk):
                        try:
                            _into_task(sch, blk, par, consumer=True)
                        except Exception:  # noqa: BLE001 - stays its own pass
                            pass
        elif raxis is None and len(b.reads) >= 2 and len(spatial) >= 2 and cache is not None:
            # a stride-2 depthwise convolution reads its padded input phase-split too (MobileNetV2's
            # 96-channel one at 112x112: 1.55x; the pad stage then does the strided read, once)
            deinterleave_strided(sch, main, pro, b.iter_vars[vaxis].var)
            whole, overlap_cols = tile_window(sch, main, cache, loops, ext, spatial, reduce, vaxis, self.vec,
                                              padded=bool(pro), overlap=overlap)
            if overlap_cols is not None:
                overlaps = (sch.get(overlap_cols).loop_var, self.vec)
            if whole:
                # whole channels per task: pad each channel inside its task, in cache, instead of
                # in a separate parallel pass over all of them (one parallel launch, not two)
                par = sch.get_loops(main)[0]
                pro = _refusing(pro, lambda blk: _into_task(sch, blk, par))
        else:
            deinterleave_strided(sch, main, pro, b.iter_vars[vaxis].var)
            if plane_vectors(b, ext, spatial, reduce, vaxis, raxis, self.vec):
                fuse_plane(sch, main, cache, b, ext, spatial, reduce, vaxis)
                loops = sch.get_loops(main)
                ext = [int(sch.get(lp).extent) for lp in loops]
                spatial, reduce, vaxis = spatial[:-1], [i - 1 for i in reduce], vaxis - 1
            window = math.prod(ext[i] for i in reduce)
            rows = bool(pro) and raxis is not None and cache is not None and len(spatial) >= 3 \
                and window <= _ROW_TASK_WINDOW
            tile_conv(sch, main, cache, loops, ext, spatial, reduce, vaxis, raxis, self.vec, self.reg,
                      rows_per_task=rows)
            if rows:
                # few input channels (an RGB stem: 3x3x3): the padding pass costs about as much as
                # the convolution; each task (one output row) pads the rows it reads, in cache,
                # instead of a separate parallel pass over the whole input (the pruned MobileNetV2
                # stem 1.75x faster; 16-channel 3x3s 1.0-1.3x)
                par = sch.get_loops(main)[0]
                pro = _refusing(pro, lambda blk: _into_task(sch, blk, par))
        # 3. prologue (padding, layout) and left-over epilogue kernels
        for blk in pro:
            _parallel_vectorize(sch, blk, self.threads)
        for blk in sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []:
            if blk_is_root_level(sch, blk) and not any(sch.get(blk).same_as(sch.get(x)) for x in pro + [main]):
                try:
                    _parallel_vectorize(sch, blk, self.threads)
                except Exception:  # noqa: BLE001
                    pass
        packed = None
        if gemm is not None:
            # the weights (constant) stored row-tile by row-tile: one stream per tile (tvm_pack_weights)
            w_read = _row_operand(sch.get(main), raxis, reduce)
            if w_read is not None:
                packed = pack_rows(sch, main, sch.mod["main"], w_read, min(self.gemm_rows, ext[raxis]))
        if not (packed or overlaps):
            return sch
        out = sch.mod["main"] if not packed else sch.mod["main"].with_attr(PACKED_ROWS, packed)
        if overlaps:
            out = overlap_last_strip(out, *overlaps, ext[vaxis])
        return s_tir.Schedule(out)


def _row_operand(b, raxis, reduce) -> int | None:
    """Index in ``b.reads`` of a GEMM's row operand, read as ``W[i, k]`` (row, reduction)."""
    if raxis is None or len(reduce) != 1:
        return None
    rv, kv = b.iter_vars[raxis].var, b.iter_vars[reduce[0]].var
    for i, r in enumerate(b.reads):
        mins = [rg.min for rg in r.region]
        if len(mins) == 2 and mins[0].same_as(rv) and mins[1].same_as(kv):
            return i
    return None


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
        _inline_elementwise_chain(sch)
        for blk in sch.get_child_blocks(sch.get_sblock("root")):
            try:
                _parallel_vectorize(sch, blk, self.threads)
            except Exception:  # noqa: BLE001
                pass
        return sch


def _inline_elementwise_chain(sch) -> None:
    """Inline every element-wise stage of an element-wise kernel into its consumer, so the kernel is
    one pass over memory instead of one per stage (legalized GELU had five).  Only stages as large
    as the kernel's output and without a reduction: inlining a small stage into a broadcast would
    recompute it per output element."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) < 2:
        return
    out_size = _numel(sch.get(blocks[-1]).writes[0])
    for blk in blocks[:-1]:
        b = sch.get(blk)
        if out_size is None or any(iv.iter_type != _DATA_PAR for iv in b.iter_vars) or len(b.writes) != 1 \
                or _numel(b.writes[0]) != out_size:
            continue
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - e.g. a stage that writes a function output
            pass



def vector_lanes(target) -> int:
    """fp32 lanes of the widest vector register ``target`` has (16 with AVX-512, 8 with AVX2)."""
    from .tvm_lower import cpu_features
    feats = cpu_features(target)
    return 16 if "avx512f" in feats else 8 if "avx2" in feats or "avx" in feats else 4


def cpu_rules(target) -> list:
    # one vector register of lanes x 8 rows of accumulators: 8 registers, leaving room for
    # operands (16 lanes x 8 rows spills on AVX2's 16 registers)
    vec = vector_lanes(target)
    return [RegisterTiledReduction(vec=vec, reg=8), dl.cpu.GEMV(), RowReduction(lanes=vec), dl.cpu.Reduction(),
            ParallelInjective()]


def gpu_rules() -> list:
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def schedule_pass(target) -> tvm.transform.Pass:
    """The default-schedule module pass for ``target`` (use inside ``with target:``)."""
    rules = gpu_rules() if target.kind.name == "cuda" else cpu_rules(target)
    return dl.ApplyDefaultSchedule(*rules)


def schedule_module(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Every kernel of ``mod`` scheduled for ``target``; on CPU, the parallel loops that may balance
    their work between threads are marked for ``tvm_balance`` (built with its TIR pipeline)."""
    from .tvm_balance import mark_module
    with target:
        mod = schedule_pass(target)(mark_constant_params(mod))
        return pack_call_sites(mark_module(mod, target))
