"""Layout rewrites the CPU convolution schedule makes before tiling (used by tvm_schedule.py).

* ``inline_copy``: TVM legalizes an unpadded convolution (every 1x1) with a "padding" stage that
  is a plain copy of its input; read the input directly instead of copying it first (a pass over
  memory that scales with the input, not with the FLOPs).
* ``deinterleave_strided``: a strided convolution's padded input stored phase-split, so each
  window tap reads contiguous lanes.
* ``plane_vectors`` / ``fuse_plane``: a 1x1, stride-1 convolution whose row does not divide by
  the vector width but whose plane does (28 or 56 columns with AVX-512's 16 lanes) runs its
  vectors along the fused ``h*w`` axis, contiguous in input and output, instead of in ragged
  vectors of 14.
"""
from __future__ import annotations

from tvm import sym, tirx
from tvm.ir.expr import TensorLoad  # a buffer read (tirx.BufferLoad is a constructor, not its class)


def reads_using(block, var: str) -> list:
    """The block's read regions indexed with loop variable ``var``."""
    return [r for r in block.reads if any(var in vars_in(rg.min) for rg in r.region)]


def vars_in(expr) -> set:
    return {v.name for v in tirx.analysis.undefined_vars(expr)}


def inline_copy(sch, blk) -> bool:
    """Inline ``blk`` if it only copies a buffer element to the same indices; True if inlined."""
    b = sch.get(blk)
    body = b.body
    src = getattr(body, "value", None)
    if not isinstance(body, tirx.BufferStore) or not isinstance(src, TensorLoad):
        return False
    if len(src.indices) != len(body.indices) or not all(i.same_as(j) for i, j in zip(src.indices, body.indices)):
        return False
    if [int(d) for d in src.source.shape] != [int(d) for d in body.buffer.shape]:
        return False
    try:
        sch.compute_inline(blk)
    except Exception:  # noqa: BLE001 - e.g. it writes a function output
        return False
    return True


def _read_stride(region, vvar) -> int:
    """The stride of a read region's innermost index along ``vvar`` (1 when not a constant)."""
    coef = sym.detect_linear_equation(region.region[-1].min, [vvar])
    return int(coef[0]) if len(coef) == 2 and isinstance(coef[0], tirx.IntImm) else 1


def strided_read(main, producer, vvar) -> bool:
    """``main`` reads ``producer``'s output with a stride of 2 or more along ``vvar``."""
    if len(producer.writes) != 1:
        return False
    return any(r.source.same_as(producer.writes[0].source) and len(r.region) >= 2
               and _read_stride(r, vvar) >= 2 for r in main.reads)


def deinterleave_strided(sch, main, pro, vvar) -> None:
    """A stride-``s`` convolution reads its padded input at ``s * x + r`` along the vector axis: a
    gather per vector.  Store the padding stage phase-split, ``(w % s, w // s)``, so each tap reads
    contiguous lanes (ResNet-50's 7x7 stem and its stride-2 3x3s ran about 1.5-1.9x faster).
    Only buffers this kernel pads itself are re-laid out: a parameter's layout is the caller's."""
    producer = {sch.get(p).writes[0].source: p for p in pro if len(sch.get(p).writes) == 1}
    b = sch.get(main)
    for i, r in enumerate(b.reads):
        pad = producer.get(r.source)
        if pad is None or len(r.region) < 2:
            continue
        stride = _read_stride(r, vvar)
        width = r.source.shape[-1]
        if stride < 2 or not isinstance(width, tirx.IntImm) or int(width) % stride:
            continue
        nd = len(r.source.shape)
        imap = tirx.IndexMap.from_func(lambda *ix: (*ix[:-1], ix[-1] % stride, ix[-1] // stride), ndim=nd,
                                       index_dtype=str(width.ty))
        sch.transform_layout(main, ("read", i), imap)
        try:  # the padding stage loops in its new layout: contiguous stores
            sch.transform_block_layout(pad, imap)
        except Exception:  # noqa: BLE001 - keeps its loops
            pass
        return


def plane_vectors(b, ext, spatial, reduce, vaxis, raxis, lanes: int) -> bool:
    """A 1x1, stride-1 convolution (one reduction axis of more than one, the vector operand read
    at exactly [.., h, w]) whose row, but not whose plane, is ragged for the vector width."""
    if raxis is None or len(spatial) < 3 or vaxis - 1 == raxis or sum(ext[i] > 1 for i in reduce) != 1:
        return False
    width, plane = ext[vaxis], ext[vaxis - 1] * ext[vaxis]
    if width % lanes == 0 or plane % lanes:
        return False
    hvar, wvar = b.iter_vars[vaxis - 1].var, b.iter_vars[vaxis].var
    unit = {b.iter_vars[i].var.name for i in reduce if ext[i] == 1}
    for r in reads_using(b, wvar.name):
        mins, shape = [rg.min for rg in r.region], r.source.shape
        if len(mins) < 2 or [int(d) for d in shape[-2:]] != [ext[vaxis - 1], width]:
            return False
        for m, v in ((mins[-1], wvar), (mins[-2], hvar)):
            coef = sym.detect_linear_equation(m, [v])  # v + (unit reduction axes, always 0)
            if len(coef) != 2 or not isinstance(coef[0], tirx.IntImm) or int(coef[0]) != 1 \
                    or not vars_in(coef[1]) <= unit:
                return False
    return True


def fuse_plane(sch, main, cache, b, ext, spatial, reduce, vaxis) -> None:
    """Fuse the last two spatial axes (``h``, ``w``) of the main block into one, and lay its
    accumulator and write-back out the same way, so the tiling that follows vectorizes ``h*w``.
    Loops alone would not do: the write-back's loops are regenerated from its block's own
    ``(h, w)`` domain, row by row with guards."""
    w, nsp, nred = ext[vaxis], len(spatial), len(reduce)
    dt = str(b.iter_vars[vaxis].dom.extent.ty)  # int32 in TE-built kernels, int64 from Relax
    plane = tirx.IndexMap.from_func(lambda *ix: (*ix[:-2], ix[-2] * w + ix[-1]), ndim=nsp, index_dtype=dt)
    sch.transform_block_layout(main, tirx.IndexMap.from_func(
        lambda *ix: (*ix[:nsp - 2], ix[nsp - 2] * w + ix[nsp - 1], *ix[nsp:]), ndim=nsp + nred, index_dtype=dt))
    if cache is not None:
        sch.transform_layout(main, ("write", 0), plane)
        sch.transform_block_layout(cache, plane)
