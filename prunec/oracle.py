"""The exactness oracle: a compacted model must equal the original model with
the same parameter slices zeroed ("masked").  Used by the tests and available
to users who want to check their own models."""
from __future__ import annotations

import copy

import torch
import torch.utils._pytree as pytree


def masked_copy(model: torch.nn.Module, plan: dict) -> torch.nn.Module:
    """A copy of ``model`` with every slice the plan removes set to zero."""
    masked = copy.deepcopy(model)
    state = dict(masked.named_parameters(remove_duplicate=False))
    state.update(dict(masked.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for name, dims in plan["params"].items():
            t = state[name]
            for d, idx in dims.items():
                t.index_fill_(int(d), torch.tensor(idx, dtype=torch.long), 0)
    return masked


def tensors(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def max_rel_error(a, b) -> float:
    """max |a - b| / max |b| over all output tensors (0 when both are empty)."""
    worst = 0.0
    for x, y in zip(tensors(a), tensors(b), strict=True):
        if x.shape != y.shape:
            return float("inf")
        if not y.is_floating_point() or y.numel() == 0:
            if not torch.equal(x, y):
                return float("inf")
            continue
        scale = y.abs().max().item() or 1.0
        worst = max(worst, (x.float() - y.float()).abs().max().item() / scale)
    return worst
