"""Keep attention modules' head-count attributes in step with pruned projections.

Hugging Face and similar attention modules store ``num_heads`` / ``head_dim``
style attributes that their forward code uses to reshape; after heads are
pruned these are recomputed from the projection widths.  The check in
``apply_to_module`` still compares the module with the IR afterwards.
"""
from __future__ import annotations

import torch

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_kv")
Q_NAMES = ("q_proj", "query", "q", "q_lin")
K_NAMES = ("k_proj", "key", "k", "k_lin")
FUSED_NAMES = ("c_attn", "qkv", "Wqkv", "query_key_value")


def _width(m) -> int | None:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if hasattr(m, "nf"):  # HF Conv1D stores the weight as [in, out]
        return w.shape[1]
    return w.shape[0]


def _first(obj, names):
    for n in names:
        if isinstance(getattr(obj, n, None), int) and not isinstance(getattr(obj, n), bool):
            return n
    return None


def sync_attention(module: torch.nn.Module) -> list[str]:
    """Returns the names of the modules it updated."""
    touched = []
    for name, m in module.named_modules():
        if hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor):
            m.nf = m.weight.shape[1]
        dim_attr = _first(m, DIM_ATTRS)
        head_attr = _first(m, HEAD_ATTRS)
        if dim_attr is None or head_attr is None:
            continue
        hd = getattr(m, dim_attr)
        q = next((getattr(m, n) for n in Q_NAMES if isinstance(getattr(m, n, None), torch.nn.Module)), None)
        k = next((getattr(m, n) for n in K_NAMES if isinstance(getattr(m, n, None), torch.nn.Module)), None)
        fused = next((getattr(m, n) for n in FUSED_NAMES if isinstance(getattr(m, n, None), torch.nn.Module)), None)
        if q is not None and _width(q):
            heads = _width(q) // hd
            kv = _width(k) // hd if k is not None and _width(k) else heads
        elif fused is not None and _width(fused):
            heads = kv = _width(fused) // (3 * hd)
            if hasattr(m, "split_size"):
                m.split_size = heads * hd
        else:
            continue
        for a in HEAD_ATTRS:
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, heads)
        for a in KV_ATTRS:
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, kv)
        if isinstance(getattr(m, "num_key_value_groups", None), int) and kv:
            m.num_key_value_groups = heads // kv
        for a in ("all_head_size", "inner_dim"):
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, heads * hd)
        touched.append(name)
    return touched
