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

The encoders live in ``prunec/encoding.py``.  Files: ``weights.safetensors`` holds the parts as ``<param>::<part>`` (a dense
parameter as ``<param>``) with the layout in the header metadata
(``prunec.layout``); ``structure.pt2`` is the ``torch.export`` program with
placeholder weights (a few hundred KB).  ``load_compressed(dir)`` decodes the
weights into it; the round trip is bit-exact.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from .encoding import (SPARSE_FORMATS, EncodeError, bitzero, block_grid, decode, encode,  # noqa: F401
                       encoded_nbytes, index_bits, nbytes, nm_groups, nm_ungroup, pack_bits, share_groups,
                       unpack_bits)

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


def refresh(graph, name: str) -> dict | None:
    """Re-derive a stale annotation (a later pass, e.g. channel pruning, changed
    the tensor's shape): keep the format if the tensor still holds it, else fall
    back to ``sparse`` (if it has zeros) or drop the annotation."""
    ann = graph.annotations.get(name)
    t = graph.tensors[name]
    pattern = ann.get("sparsity")
    if pattern and pattern.get("format") in ("nm", "block"):
        try:  # the recorded sparse pattern is a kernel hint: keep it only while true
            encode(t, pattern)
        except (EncodeError, RuntimeError, ValueError):
            ann["sparsity"] = {"format": "sparse"}
    try:
        ann["shape"], ann["stored_bytes"] = list(t.shape), encoded_nbytes(t, ann)
        return ann
    except (EncodeError, RuntimeError, ValueError):
        pass
    keep = {k: ann[k] for k in ("lowrank",) if k in ann}
    if bool(bitzero(t).any()):
        new = {"format": "sparse", "nnz": int((~bitzero(t)).sum()), **keep}
        new["shape"], new["stored_bytes"] = list(t.shape), encoded_nbytes(t, new)
        graph.annotations[name] = new
        return new
    graph.annotations.pop(name)
    return None


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
        try:
            parts, lay = encode(t, ann)
        except EncodeError:  # changed after it was annotated (an out-of-order pass): still exact
            parts, lay = encode(t, refresh(graph, name))
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
