"""Register tiling for the CPU reduction rule (``RegisterTiledReduction`` in tvm_schedule.py):
the three tilings it picks from and the loop-level helpers they share.

* ``tile_gemm``: a matmul, in parallel strips of ``2 x vec`` columns, each packing its operand slice
  and sweeping every row in ``gemm_rows`` x ``2 x vec`` register tiles.
* ``tile_window``: a depthwise convolution, several output rows x one or two vectors, the window
  unrolled so neighbouring rows share their loads.
* ``tile_conv``: any other convolution, ``reg`` output channels x ``vec`` lanes, channels or columns
  outermost, whichever re-reads fewer bytes from beyond the cache (``_columns_first``).
"""
from __future__ import annotations

import math

import tvm
from tvm import tirx

from .tvm_schedule_layout import reads_using as _reads_using

# Scope of register tiles and other per-task buffers.  On CPU TVM puts a buffer under 1 KB on the
# stack only in "global" scope; a "local" one became a workspace allocation (and free) per loop
# iteration, and heap memory LLVM cannot keep in registers (MobileNetV2: 11.6k allocations per
# inference; 13-17% of its time)
TILE_SCOPE = "global"


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def row_vector(width: int, lanes: int) -> int:
    """Lanes per vector tile of a row: two registers or one when they divide it, else the largest
    divisor up to two registers (TVM leaves a guarded vector loop scalar)."""
    return next((d for d in (2 * lanes, lanes) if width % d == 0), None) or _largest_divisor(width, 2 * lanes)


def vectorize_innermost(sch, *blocks) -> None:
    """Vectorize each block's innermost loop where TVM can; a ragged row or tail (no vector width
    divides it) is left to LLVM's own vectorizer."""
    for blk in blocks:
        try:
            sch.vectorize(sch.get_loops(blk)[-1])
        except Exception:  # noqa: BLE001 - ragged: scalar here
            pass


def _numel(region) -> int | None:
    """Elements of the buffer a region belongs to (None for a symbolic shape)."""
    n = 1
    for d in region.source.shape:
        if not isinstance(d, tirx.IntImm):
            return None
        n *= int(d)
    return n


def packable_operand(b, spatial, reduce, raxis, vec_reads):
    """Index in ``b.reads`` of a matmul's vector operand (``W[k, j]``, ``B[h, k, j]``: plain loop
    variables, one reduction axis), or None for a convolution-like block."""
    if raxis is None or len(reduce) != 1 or len(vec_reads) != 1:
        return None
    names = {iv.var.name for iv in b.iter_vars}
    kvar = b.iter_vars[reduce[0]].var.name
    rvar = b.iter_vars[raxis].var.name
    mins = [rg.min for rg in vec_reads[0].region]
    if not all(isinstance(m, (tirx.Var, tirx.IntImm)) for m in mins):
        return None
    used = {m.name for m in mins if isinstance(m, tirx.Var)}
    if kvar not in used or rvar in used or not used <= names:
        return None
    return [i for i, r in enumerate(b.reads) if r.same_as(vec_reads[0])][0]

# an operand strip (reduction length x strip width) up to this size is read in place, not packed:
# its lines stay in L1 (half of a 32 KB one) for all the strip's row tiles, so the copy only adds a
# pass.  Pruned MobileNetV2's 12- and 16-row products at 56x56 and 28x28 ran 0.70-0.76x the time
# in place (isolated, 12x72x3136 to 24x144x3136: 1.17-1.45x faster; 64-256 rows: 0.97-1.02x)
_IN_PLACE_STRIP_BYTES = 16 << 10
# ... when its rows start on cache lines.  A 14x14 or 7x7 plane's rows (196, 49 floats) do not, so each
# 16-lane row of the strip spans two lines, and a strip read in place by many row tiles lost to the
# packed copy: 1024x256 @ 256x196 1.12x, 160x240 @ 240x49 1.17x the time; with few rows it still won
# (32x192 @ 192x196 0.88x, 96x96 @ 96x196 0.91x).  Such a strip is read in place up to 8 KB, or by
# up to 64 rows
_IN_PLACE_SPLIT_LINE_BYTES = 8 << 10
_IN_PLACE_SPLIT_LINE_ROWS = 64
_LINE = 64


def tile_gemm(sch, main, cache, loops, ext, spatial, reduce, vaxis, raxis, operand, vec: int,
              gemm_rows: int, padded: bool = False, ragged: bool = False):
    """GEMM: for each strip of ``2 x vec`` output columns (in parallel), pack the operand's strip
    contiguously, then sweep every row in register tiles of ``gemm_rows`` x ``2 x vec``.
    Packing keeps a long strip in L1 for all rows; without it 3072-wide weights thrash the cache
    (ViT-B's MLP ran at a third of the speed).  A short strip of an unpadded operand is read in
    place (``_IN_PLACE_STRIP_BYTES``); a ``padded`` one is zero-padded as it is packed.  With
    ``ragged``, strips are ``2 x vec`` wide and the last one guarded, for the caller to overlap
    (tvm_schedule_overlap.py).  Returns the strips' parallel loop."""
    width = 2 * vec
    v = width if ragged else _largest_divisor(ext[vaxis], width)
    r = min(gemm_rows, ext[raxis])
    vo, vi = sch.split(loops[vaxis], [None, v])
    ro, ri = sch.split(loops[raxis], [None, r])
    others = [loops[i] for i in spatial if i not in (vaxis, raxis)]
    k = loops[reduce[0]]
    sch.reorder(*others, vo, ro, k, ri, vi)
    par = sch.fuse(*others, vo) if others else vo
    sch.parallel(par)
    sch.unroll(ri)
    sch.vectorize(vi)
    # the write-back (with the epilogue) right after each register tile, so its accumulators never
    # leave registers: MobileNetV2's and EfficientNet-B0's 1x1 products 0.81-0.97x the time (the
    # ones with a ReLU6 most).  Not with a ragged last row tile: its guarded write-back kept the
    # accumulators in memory (2-2.5x slower); those write the strip back after all its rows
    per_tile = cache is not None and ext[raxis] % r == 0
    if cache is not None:
        sch.reverse_compute_at(cache, ro if per_tile else par)
    src = sch.get(main).reads[operand].source
    size = tvm.DataType(str(src.dtype)).bits // 8
    strip = ext[reduce[0]] * v * size
    in_place = strip <= _IN_PLACE_STRIP_BYTES and (
        int(src.shape[-1]) * size % _LINE == 0 or strip <= _IN_PLACE_SPLIT_LINE_BYTES
        or ext[raxis] <= _IN_PLACE_SPLIT_LINE_ROWS)
    stages = [cache] if cache is not None else []
    if padded or not in_place:
        pack = sch.cache_read(main, operand, "global")
        sch.compute_at(pack, par)
        stages.append(pack)
    sch.decompose_reduction(main, k if per_tile else ro)
    vectorize_innermost(sch, *stages)
    return par

# output rows from which a padded depthwise convolution runs whole channels per task, padding each in
# its task: MobileNetV2's 112x112 one 1.3x faster (dense and pruned); its 14x14 ones 1.1-1.3x slower
# than with the separate padding pass
_CHANNEL_TASK_ROWS = 64


def window_tile(width: int, rows: int, lanes: int, overlap: bool) -> tuple[int, int, bool]:
    """(lanes per vector tile, rows per tile, overlapping) for a depthwise output plane ``rows`` x
    ``width``.  A row no vector width divides (28, 14 with 8 lanes) is covered by whole vectors, the
    last one moved back to end at the row's end (``overlap``: the caller rewrites it with
    ``tvm_schedule_overlap``), instead of divisor-wide ones (14 lanes: 8 + 4 + 2 on AVX2)."""
    v = row_vector(width, lanes)
    ragged = overlap and width % lanes != 0 and width > lanes
    if ragged:
        v = lanes
    r = 4 if v <= lanes else 2  # about four vector registers of accumulators
    r = r if rows % r == 0 else 2 if rows % 2 == 0 else 1
    return v, r, ragged


def tile_window(sch, main, cache, loops, ext, spatial, reduce, vaxis, vec: int, padded: bool = False,
                overlap: bool = False):
    """Depthwise convolution: no output axis reuses an operand, so tile ``r`` output rows x
    ``v`` columns and unroll the (small) window: after unrolling, rows share their input loads.
    Vector widths divide the row (a guarded vector loop is left scalar by TVM), or with ``overlap``
    whole vectors overlap at the row's end (``window_tile``).  MobileNetV2's depthwise kernels ran
    about 2x faster than with one row and a rolled window.  Returns (whole channels per task: a
    small plane, or a ``padded`` large one, so its caller pads per task; the column loop to
    overlap, or None)."""
    lanes = vec
    width = ext[vaxis]
    row = spatial[-2]
    v, r, ragged = window_tile(width, ext[row], lanes, overlap)
    # a small plane (7x7; 14x14 with AVX-512's 32 registers): one channel per task, all its rows'
    # accumulators in registers (MobileNetV2's 480-channel 7x7 depthwise: 0.071 -> 0.018 ms)
    plane = row_vector(width, lanes) == width and ext[row] * -(-width // lanes) <= (16 if lanes >= 16 else 8)
    if plane:
        v, r, ragged = width, ext[row], False
    window = math.prod(ext[i] for i in reduce)
    channels = padded and not plane and r > 1 and ext[row] >= _CHANNEL_TASK_ROWS
    cols = _register_tile(sch, main, cache, loops, spatial, reduce, vaxis, v, row, r,
                          serial_columns=True, unroll_window=window <= 49,  # up to 7x7
                          rows_per_task=channels)  # its row tiles inside the task
    return plane or channels, cols if ragged else None

def tile_conv(sch, main, cache, loops, ext, spatial, reduce, vaxis, raxis, vec: int, reg: int,
              rows_per_task=False) -> None:
    v = _largest_divisor(ext[vaxis], vec)
    if v < 4 and ext[vaxis] > 16:
        v = 16  # ragged: let the tail be guarded
    r = _largest_divisor(ext[raxis], reg) if raxis is not None else 1
    if raxis is not None and reg < ext[raxis] <= reg + reg // 2:
        # up to 12 rows (a pruned 1x1 convolution with 12 output channels): one tile holds them
        # all, so the input is read once, not twice; 12 accumulators + 2 operands fit AVX2's 16
        # registers (MobileNetV2's 48->12 and 72->12 at 56x56: 1.6x faster)
        r = ext[raxis]
    elif raxis is not None and r * 2 <= reg and ext[raxis] > reg:
        r = reg  # ragged (197 tokens is prime): a guarded tail tile beats no register tile
    if r > reg and vec >= 16 and v == vec and ext[vaxis] % (2 * v) == 0:
        # 9-12 rows x two vectors: 24 of AVX-512's 32 registers, and each tile reads two
        # adjacent lines of every input row, which the prefetcher pairs (the 72->12 and
        # 48->12 1x1s at 56x56: 1.4-1.5x faster)
        v = 2 * v
    _register_tile(sch, main, cache, loops, spatial, reduce, vaxis, v, raxis, r, rows_per_task=rows_per_task,
                   columns_first=_columns_first(sch.get(main), ext, spatial, vaxis, raxis, v, r))


_CACHE_BYTES = 1 << 20  # what stays cached between tiles: about half a core's L2 (1 MB on Zen 4/5, 2 MB on Xeon)


def _columns_first(b, ext, spatial, vaxis, raxis, v, r) -> bool:
    """Whether the parallel tiles should walk all row tiles (output channels) of one column tile
    before the next column tile, instead of the other way round.

    Rows first re-reads the input (the vector operand) once per row tile, columns first re-reads
    the weights once per column tile; a re-read is cheap while the operand stays cached.  Pick the
    order that moves fewer bytes from beyond the cache: ResNet-50's 256->64 1x1 at 56x56 (a
    3.2 MB input read eight times) ran at 37 GF/s rows first, 69 GF/s columns first."""
    if raxis is None or r >= ext[raxis]:
        return False
    vec_reads = _reads_using(b, b.iter_vars[vaxis].var.name)
    rvar = b.iter_vars[raxis].var.name
    other = _reads_using(b, rvar)
    if len(vec_reads) != 1 or len(other) != 1:
        return False
    x, w = _numel(vec_reads[0]), _numel(other[0])
    if x is None or w is None:
        return False
    x *= tvm.DataType(str(vec_reads[0].source.dtype)).bits // 8
    w *= tvm.DataType(str(other[0].source.dtype)).bits // 8
    row_tiles = ext[raxis] // r
    col_tiles = 1
    for i in spatial:
        if i != raxis:
            col_tiles *= ext[i]
    col_tiles //= v
    rows_first = w + (x if x <= _CACHE_BYTES else row_tiles * x)
    cols_first = x + (w if w <= _CACHE_BYTES else col_tiles * w)
    return cols_first < rows_first


def _register_tile(sch, main, cache, loops, spatial, reduce, vaxis, v, raxis, r, serial_columns=False,
                   unroll_window=False, columns_first=False, rows_per_task=False):
    """Tile the output into ``r`` (along ``raxis``) x ``v`` (vector lanes along ``vaxis``) accumulators
    kept over the whole reduction, outer tiles in parallel; the accumulator is written back (with the
    inlined epilogue) per tile, or with ``serial_columns`` per column tile inside a parallel row.
    Returns the column tiles' loop."""
    vo, vi = sch.split(loops[vaxis], [None, v])
    outer, inner = [], []
    for i in spatial:
        if i == vaxis:
            if not serial_columns:
                outer.append(vo)
        elif i == raxis and r > 1:
            ro, ri = sch.split(loops[i], [None, r])
            outer.append(ro)
            inner.append(ri)
        else:
            outer.append(loops[i])
    if columns_first and raxis is not None and r > 1:
        outer.remove(ro)
        outer.append(ro)
    serial = []
    if rows_per_task:  # one output row per task: its row tiles and column tiles run inside it
        serial = [lp for lp in outer if lp.same_as(ro) or lp.same_as(vo)] if r > 1 else [vo]
        outer = [lp for lp in outer if not any(lp.same_as(x) for x in serial)]
    red_loops = [loops[i] for i in reduce]
    sch.reorder(*outer, *serial, *([vo] if serial_columns else []), *red_loops, *inner, vi)
    par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(par)
    for lp in (red_loops if unroll_window else []) + inner:
        sch.unroll(lp)
    sch.vectorize(vi)
    sch.reverse_compute_at(cache, vo if serial_columns or rows_per_task else par)
    init = sch.decompose_reduction(main, red_loops[0])
    for blk in (init, cache):
        blk_loops = sch.get_loops(blk)
        if len(blk_loops) < 2 and blk is cache and not serial_columns:
            continue  # the write-back is the parallel loop itself
        try:
            sch.vectorize(blk_loops[-1])
        except Exception:  # noqa: BLE001 - a ragged tail: stays scalar
            pass
    return vo
