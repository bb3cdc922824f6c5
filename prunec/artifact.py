"""The compressed artifact: every parameter stored in its compressed form.

Annotation schema (``graph.annotations[param_name]``, JSON-serializable)
-----------------------------------------------------------------------
The dense tensor in ``graph.tensors`` is always the ground truth (it holds the
zeros / clustered values); the annotation says how to store it compactly and
which kernel a backend may use.  Keys:

``format``        "sparse" | "nm" | "block" | "shared" | "lowrank"
``stored_bytes``  bytes of the encoded form below (read by ``prunec.cost``)
``shape``         the tensor's shape when the annotation was made

per format:

* ``sparse``: unstructured; ``nnz`` (int).  Stored as ``mask`` (1 bit per
  element, packed LSB first) + ``values`` (the non-zeros, row-major order).
* ``nm``: N:M along the reduction (input-channel) dimension; ``n``, ``m``.
  A linear weight ``[out, in]`` is grouped as ``[out, in/m, m]``; a conv weight
  ``[out, in, kh, kw]`` is permuted to ``[out, kh, kw, in]`` first (as NVIDIA
  ASP / cuSPARSELt do).  Every group of ``m`` holds at most ``n`` non-zeros.
  Stored as ``values [groups, n]`` + ``index`` (positions 0..m-1, packed with
  ceil(log2 m) bits each).
* ``block``: ``block: [bh, bw]`` on the weight viewed as ``[out, in*kh*kw]``;
  every block is all-zero or kept; ``nnz_blocks``.  Stored as ``mask`` (1 bit
  per block, row-major over the block grid) + ``values [kept, bh, bw]``.
* ``shared``: weight sharing (palettization); ``bits`` (1-8), ``granularity``
  ("per-tensor" | "per-channel"), ``group_size`` (0 = whole tensor/channel;
  else each tensor/channel row is split into groups of that many elements);
  ``sparse`` (bool: zeros are exact and carry no code; stored with a bitmask);
  ``sparsity``: the sparse/nm/block annotation it was built on (without
  ``stored_bytes``) or null.  Each group has at most 2**bits distinct values.
  Stored as ``codebook [groups, 2**bits]`` + ``codes`` (packed ``bits``-bit
  indices, one per stored element) + ``mask`` when sparse.
* ``lowrank``: a factor of a factorized layer: ``rank``, ``layer`` (the
  original layer name), ``factor`` (0 = first, k x k / r x in; 1 = second).
  Stored dense.  A factor later pruned or shared keeps this as ``lowrank: {...}``.

A pass that changes an annotated tensor afterwards must call
``annotate(graph, name, ann)`` again (or drop the annotation).

Files: ``weights.safetensors`` holds the parts as ``<param>::<part>`` (a dense
parameter as ``<param>``) with the layout in the header metadata
(``prunec.layout``); ``structure.pt2`` is the ``torch.export`` program with
placeholder weights (a few hundred KB).  ``load_compressed(dir)`` decodes the
weights into it; the round trip is bit-exact.
"""
from __future__ import annotations

import json
import math
import os
import warnings

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
    vals = x[mask]
    gid = torch.arange(x.shape[0]).repeat_interleave(mask.sum(1))
    # unique (group, bit pattern) pairs: exact, and one 1-D sort
    width = 8 * t.element_size()
    pattern = vals.view(_INT_VIEW[t.element_size()]).long() & ((1 << width) - 1)
    uniq, inverse = torch.unique(gid * (1 << width) + pattern, return_inverse=True)
    ugid = uniq >> width
    counts = torch.bincount(ugid, minlength=x.shape[0])
    if counts.numel() and int(counts.max()) > (1 << bits):
        raise EncodeError(f"a group holds {int(counts.max())} distinct values, more than 2**{bits}")
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(uniq.numel()) - start[ugid]
    codebook = torch.zeros(x.shape[0], 1 << bits, dtype=t.dtype)
    ubits = (uniq & ((1 << width) - 1))
    if width < 64:  # back to the signed pattern, then to the float
        ubits = torch.where(ubits >= (1 << (width - 1)), ubits - (1 << width), ubits)
    codebook[ugid, rank] = ubits.to(_INT_VIEW[t.element_size()]).view(t.dtype)
    codes = rank[inverse]
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


# ---- annotations (what passes call) -------------------------------------------------

def annotate(graph, name: str, ann: dict) -> dict:
    """Record ``ann`` for parameter ``name`` (merged with what it already carried:
    a low-rank factor stays marked, a shared tensor pruned again stays shared)
    and compute its ``stored_bytes`` with the real encoder."""
    prev = graph.annotations.get(name) or {}
    ann = dict(ann)
    if prev.get("format") == "shared" and ann["format"] in SPARSE_FORMATS:
        pattern = {k: v for k, v in ann.items() if k != "stored_bytes"}
        ann = {**prev, "sparse": True, "sparsity": pattern}
    if prev.get("format") == "lowrank":
        ann["lowrank"] = {k: prev[k] for k in ("rank", "layer", "factor")}
    elif "lowrank" in prev:
        ann["lowrank"] = prev["lowrank"]
    t = graph.tensors[name]
    ann["shape"] = list(t.shape)
    ann["stored_bytes"] = encoded_nbytes(t, ann)
    graph.annotations[name] = ann
    return ann


def sparsity_of(ann: dict | None) -> dict | None:
    """The sparse pattern a tensor carries (for share-weights), without byte counts."""
    if not ann:
        return None
    if ann.get("format") in SPARSE_FORMATS:
        return {k: v for k, v in ann.items() if k not in ("stored_bytes", "shape", "lowrank")}
    return ann.get("sparsity")


# ---- files --------------------------------------------------------------------------

def save_compressed(graph, outdir: str, example_inputs: tuple | None = None) -> dict:
    """Write ``weights.safetensors`` (and ``structure.pt2`` when ``example_inputs``
    are given).  Returns the layout: param -> format, shape, bytes."""
    from safetensors.torch import save_file
    tensors, layout = {}, {}
    for name in graph.consts:
        t = graph.tensors[name]
        ann = graph.annotations.get(name)
        parts, lay = encode(t, ann)
        lay["bytes"] = nbytes(parts)
        lay["kind"] = graph.consts[name].kind
        layout[name] = lay
        for part, p in parts.items():
            tensors[f"{name}::{part}" if part else name] = p.contiguous()
    save_file(tensors, os.path.join(outdir, "weights.safetensors"),
              metadata={"prunec.layout": json.dumps(layout, separators=(",", ":"))})
    if example_inputs is not None:
        save_structure(graph, example_inputs, os.path.join(outdir, "structure.pt2"))
    return layout


def save_structure(graph, example_inputs: tuple, path: str) -> None:
    """The program with every weight replaced by a broadcast zero (no storage)."""
    from prunec.backends.torch_backend import export_program
    g = graph.clone()
    g.tensors = {k: torch.zeros((), dtype=t.dtype).expand(t.shape) for k, t in graph.tensors.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(export_program(g, example_inputs), path)


def load_weights(outdir_or_file: str) -> tuple[dict, dict]:
    """Decode ``weights.safetensors`` -> ({param: dense tensor}, layout)."""
    from safetensors import safe_open
    path = outdir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "weights.safetensors")
    with safe_open(path, framework="pt") as f:
        layout = json.loads(f.metadata()["prunec.layout"])
        raw = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for name, lay in layout.items():
        parts = {k.partition("::")[2]: v for k, v in raw.items()
                 if k == name or k.startswith(name + "::")}
        out[name] = decode(parts, lay)
    return out, layout


def load_compressed(outdir: str) -> torch.nn.Module:
    """Rebuild the compiled model from ``outdir``: the program structure
    (``structure.pt2``, else ``model.pt2``) with weights decoded from
    ``weights.safetensors``."""
    from .errors import UsageError
    prog = os.path.join(outdir, "structure.pt2")
    if not os.path.isfile(prog):
        prog = os.path.join(outdir, "model.pt2")
    if not os.path.isfile(prog) or not os.path.isfile(os.path.join(outdir, "weights.safetensors")):
        raise UsageError(f"{outdir}: not a prunec torch output (needs weights.safetensors and structure.pt2)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.export.load(prog).module()
    weights, _ = load_weights(outdir)
    for name, t in weights.items():
        _assign(module, "gm." + name, t)
    return module


def _assign(module: torch.nn.Module, path: str, t: torch.Tensor) -> None:
    owner_path, _, leaf = path.rpartition(".")
    owner = module.get_submodule(owner_path)
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = t
    else:
        setattr(owner, leaf, t)


# ---- per-layer sizes for report.json ----------------------------------------------

def param_layer(graph, name: str) -> str:
    """The layer a parameter belongs to; both factors of a factorized layer
    (and its moved bias) count toward the original layer."""
    for key in (name, name.rpartition(".")[0] + ".weight"):
        ann = graph.annotations.get(key) or {}
        lr = ann if ann.get("format") == "lowrank" else ann.get("lowrank")
        if lr:
            return lr["layer"]
    return name.rpartition(".")[0] or name


def layer_sizes(graph) -> dict:
    """layer -> {params, bytes (as stored), formats} over its parameters."""
    from .cost import stored_bytes
    out: dict[str, dict] = {}
    for name, v in graph.consts.items():
        if v.kind != "parameter":
            continue
        row = out.setdefault(param_layer(graph, name), {"params": 0, "bytes": 0, "formats": []})
        row["params"] += graph.tensors[name].numel()
        row["bytes"] += stored_bytes(graph, name)
        fmt = (graph.annotations.get(name) or {}).get("format", "dense")
        if fmt not in row["formats"]:
            row["formats"].append(fmt)
    return out


def layers_report(before: dict, after: dict) -> dict:
    rows = {}
    for layer in list(before) + [k for k in after if k not in before]:
        b, a = before.get(layer, {}), after.get(layer, {})
        rows[layer] = {"params-before": b.get("params", 0), "params-after": a.get("params", 0),
                       "bytes-before": b.get("bytes", 0), "bytes-after": a.get("bytes", 0),
                       "formats": a.get("formats", [])}
    return rows
