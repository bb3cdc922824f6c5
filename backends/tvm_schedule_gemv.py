"""Batch-1 matrix-vector products (a classifier head, ``y[1, N] = x[1, K] @ W[K, N]``) for the CPU
default schedule (used by tvm_schedule.py).

With one row there is no register axis, and tiling the output columns in parallel makes each
task read a short piece of every weight row, a stride of ``4 N`` bytes per step that the
hardware prefetchers do not follow: MobileNetV2's 1280x1000 head ran on one thread at 2 GF/s.
Here the reduction is split instead (``rfactor``): ``parts`` tasks each stream a contiguous band
of weight rows into their own partial sum of the ``N`` outputs (4 KB, in L1), and a short pass
adds the partial sums.  The weights are read once, front to back.
"""
from __future__ import annotations

from tvm import tirx

_MIN_WEIGHTS = 1 << 15  # below this a parallel launch costs more than the product


def gemv_operand(b, ext, spatial, reduce, vaxis, vec_reads) -> bool:
    """Whether ``b`` is a one-row matrix-vector product: every output axis but the vector axis
    has extent 1, one reduction axis, and the vector operand is read as ``W[k, j]`` (plain loop
    variables), with enough weights to be worth two threads."""
    if len(reduce) != 1 or len(vec_reads) != 1 or any(ext[i] != 1 for i in spatial if i != vaxis):
        return False
    kvar, jvar = b.iter_vars[reduce[0]].var.name, b.iter_vars[vaxis].var.name
    mins = [rg.min for rg in vec_reads[0].region]
    if not all(isinstance(m, (tirx.Var, tirx.IntImm)) for m in mins):
        return False
    used = [m.name for m in mins if isinstance(m, tirx.Var)]
    return used == [kvar, jvar] and ext[reduce[0]] * ext[vaxis] >= _MIN_WEIGHTS


def _lanes(n: int, vec: int) -> int:
    """The widest power-of-two vector (at most ``vec``) that divides ``n``; ``vec`` if none does
    (a guarded tail)."""
    lanes = vec
    while lanes >= 4:
        if n % lanes == 0:
            return lanes
        lanes //= 2
    return vec


def tile_gemv(sch, main, epi, ext, reduce, vaxis, vec: int, threads: int) -> None:
    """Split the reduction into ``4 x threads`` contiguous bands computed in parallel (a few bands
    per thread even out a slow core; ``threads``: the target's cores), then sum the bands and apply
    the epilogue, vectorized."""
    k, n = ext[reduce[0]], ext[vaxis]
    parts = 4 * threads
    parts = next((p for p in range(parts, threads - 1, -1) if k % p == 0), parts)
    lanes = _lanes(n, vec)
    loops = sch.get_loops(main)
    ko, _ = sch.split(loops[reduce[0]], [parts, None])
    rf = sch.rfactor(ko, 0)
    rloops = sch.get_loops(rf)  # the main block's loops with ko and ki in the reduction's place
    r = reduce[0]
    band, inner = rloops[r], rloops[r + 1]
    jl = rloops[vaxis if vaxis < r else vaxis + 1]
    rest = [lp for lp in rloops if lp not in (band, inner, jl)]
    sch.reorder(band, *rest, inner, jl)
    sch.parallel(band)
    _, jv = sch.split(jl, [None, lanes])
    sch.vectorize(jv)
    sch.decompose_reduction(rf, inner)
    # the band sum and the epilogue touch N values each: one thread, vectorized
    floops = sch.get_loops(main)
    jo, jv = sch.split(floops[vaxis], [None, lanes])
    sch.reorder(*[lp for i, lp in enumerate(floops) if i != vaxis], jo, jv)
    sch.vectorize(jv)
    for blk in epi:
        eloops = sch.get_loops(blk)
        if eloops and int(sch.get(eloops[-1]).extent) % lanes == 0:
            _, ev = sch.split(eloops[-1], [None, lanes])
            sch.vectorize(ev)
        # else an epilogue of another shape (a reshape): its loops are left to LLVM
