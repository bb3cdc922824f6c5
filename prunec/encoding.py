"""Exact compact encodings of the parameter formats in ``prunec.artifact``'s
schema: ``encode(tensor, annotation) -> (parts, layout)`` and ``decode``,
bit for bit.  The same encoder sizes ``stored_bytes`` and writes the file, so
the report counts exactly what is stored."""
from __future__ import annotations

import math

import torch

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.int8}
SPARSE_FORMATS = ("sparse", "nm", "block")


# ---- bit helpers -------------------------------------------------------------------

def bitzero(t: torch.Tensor) -> torch.Tensor:
    """True where the element is exactly +0 (bit pattern 0): -0.0 counts as a value,
    so decoding reproduces every bit."""
    if t.is_floating_point():
        return t.contiguous().view(_INT_VIEW[t.element_size()]) == 0
    return t == 0


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative ints < 2**bits into uint8, LSB first."""
    codes = codes.flatten().to(torch.uint8)
    if bits == 8:
        return codes.clone()
    shifts = torch.arange(bits, dtype=torch.uint8)
    b = ((codes[:, None] >> shifts) & 1).flatten()
    b = torch.nn.functional.pad(b, (0, (-b.numel()) % 8))
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (b.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return data[:n].long()
    b = ((data[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[: n * bits]
    return (b.view(n, bits).long() << torch.arange(bits)).sum(1)


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


# ---- views shared by passes and the encoder -----------------------------------------

def nm_groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """[groups, m] view along the input-channel dimension (see the schema)."""
    if t.dim() > 2:
        t = t.permute(0, *range(2, t.dim()), 1)
    return t.reshape(-1, m)


def nm_ungroup(g: torch.Tensor, shape) -> torch.Tensor:
    if len(shape) > 2:
        perm_shape = (shape[0], *shape[2:], shape[1])
        inv = (0, len(shape) - 1, *range(1, len(shape) - 1))
        return g.reshape(perm_shape).permute(inv).contiguous()
    return g.reshape(shape)


def block_grid(t: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """[rows, cols, bh, bw] blocks of the weight viewed as [out, rest]."""
    t2 = t.reshape(t.shape[0], -1)
    return t2.reshape(t2.shape[0] // bh, bh, t2.shape[1] // bw, bw).permute(0, 2, 1, 3)


def share_groups(t: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    rows = 1 if granularity == "per-tensor" else t.shape[0]
    x = t.reshape(rows, -1)
    return x.reshape(-1, group_size) if group_size else x


# ---- encode / decode ------------------------------------------------------------------

class EncodeError(ValueError):
    """The tensor does not hold the pattern its annotation claims."""


def encode(t: torch.Tensor, ann: dict | None) -> tuple[dict, dict]:
    """-> (parts: name -> tensor, layout dict).  Dense when ``ann`` is None."""
    t = t.detach().contiguous()
    fmt = (ann or {}).get("format", "dense")
    layout = {"format": fmt, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if fmt in ("dense", "lowrank") or not t.is_floating_point():
        layout["format"] = "dense"
        return {"": t.clone()}, layout
    if fmt == "sparse":
        nz = ~bitzero(t).flatten()
        return {"mask": pack_bits(nz, 1), "values": t.flatten()[nz].clone()}, layout
    if fmt == "nm":
        n, m = int(ann["n"]), int(ann["m"])
        g = nm_groups(t, m)
        nz = ~bitzero(g)
        if (nz.sum(1) > n).any():
            raise EncodeError(f"a group of {m} holds more than {n} non-zeros")
        key = (~nz).long() * m + torch.arange(m)
        idx = key.argsort(dim=1, stable=True)[:, :n].sort(1).values
        layout.update(n=n, m=m)
        return {"values": g.gather(1, idx).contiguous(), "index": pack_bits(idx, index_bits(m))}, layout
    if fmt == "block":
        bh, bw = (int(b) for b in ann["block"])
        blocks = block_grid(t, bh, bw)
        keep = ~bitzero(blocks).all(3).all(2)
        layout.update(block=[bh, bw])
        return {"mask": pack_bits(keep, 1), "values": blocks[keep].contiguous()}, layout
    if fmt == "shared":
        return _encode_shared(t, ann, layout)
    raise EncodeError(f"unknown format {fmt!r}")


def _encode_shared(t: torch.Tensor, ann: dict, layout: dict) -> tuple[dict, dict]:
    bits, gran, gs = int(ann["bits"]), ann["granularity"], int(ann.get("group_size", 0))
    sparse = bool(ann.get("sparse", False))
    x = share_groups(t, gran, gs)
    mask = ~bitzero(x) if sparse else torch.ones_like(x, dtype=torch.bool)
    # distinct bit patterns per row by one row-wise sort (exact: -0.0 and 0.0 differ)
    itype = _INT_VIEW[t.element_size()]
    keys = torch.where(mask, x.view(itype), torch.iinfo(itype).max)
    skeys, order = keys.sort(1)
    valid = mask.gather(1, order)
    first = valid & torch.cat([torch.ones_like(skeys[:, :1], dtype=torch.bool), skeys[:, 1:] != skeys[:, :-1]], 1)
    rank = first.long().cumsum(1) - 1
    counts = first.sum(1)
    if counts.numel() and int(counts.max()) > (1 << bits):
        raise EncodeError(f"a group holds {int(counts.max())} distinct values, more than 2**{bits}")
    codebook = torch.zeros(x.shape[0], 1 << bits, dtype=t.dtype)
    rows = torch.arange(x.shape[0])[:, None].expand_as(rank)
    codebook[rows[first], rank[first]] = skeys[first].view(t.dtype)
    codes = torch.empty_like(rank).scatter_(1, order, rank)[mask]
    parts = {"codebook": codebook, "codes": pack_bits(codes, bits)}
    if sparse:
        parts["mask"] = pack_bits(mask, 1)
    layout.update(bits=bits, granularity=gran, group_size=gs, sparse=sparse)
    return parts, layout


def decode(parts: dict, layout: dict) -> torch.Tensor:
    shape, fmt = layout["shape"], layout["format"]
    dtype = getattr(torch, layout["dtype"])
    numel = math.prod(shape)
    if fmt == "dense":
        return parts[""]
    if fmt == "sparse":
        nz = unpack_bits(parts["mask"], 1, numel).bool()
        out = torch.zeros(numel, dtype=dtype)
        out[nz] = parts["values"]
        return out.reshape(shape)
    if fmt == "nm":
        n, m = layout["n"], layout["m"]
        vals = parts["values"]
        idx = unpack_bits(parts["index"], index_bits(m), vals.numel()).view(-1, n)
        g = torch.zeros(vals.shape[0], m, dtype=dtype).scatter(1, idx, vals)
        return nm_ungroup(g, shape)
    if fmt == "block":
        bh, bw = layout["block"]
        rows, cols = shape[0] // bh, (numel // shape[0]) // bw
        keep = unpack_bits(parts["mask"], 1, rows * cols).bool().view(rows, cols)
        blocks = torch.zeros(rows, cols, bh, bw, dtype=dtype)
        blocks[keep] = parts["values"]
        return blocks.permute(0, 2, 1, 3).reshape(shape).contiguous()
    if fmt == "shared":
        cb = parts["codebook"]
        groups = cb.shape[0]
        per = numel // groups
        if layout["sparse"]:
            mask = unpack_bits(parts["mask"], 1, numel).bool().view(groups, per)
        else:
            mask = torch.ones(groups, per, dtype=torch.bool)
        count = int(mask.sum())
        codes = unpack_bits(parts["codes"], layout["bits"], count)
        gid = torch.arange(groups).repeat_interleave(mask.sum(1))
        x = torch.zeros(groups, per, dtype=dtype)
        x[mask] = cb[gid, codes]
        return x.reshape(shape)
    raise EncodeError(f"unknown format {fmt!r} in the artifact")


def nbytes(parts: dict) -> int:
    return sum(p.numel() * p.element_size() for p in parts.values())


def encoded_nbytes(t: torch.Tensor, ann: dict | None) -> int:
    return nbytes(encode(t, ann)[0])
