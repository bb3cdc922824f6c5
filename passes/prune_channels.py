"""prune-channels: structured pruning of channels, neurons and attention heads.

Units come from the dependency analysis (prunec/dependency.py), so every
parameter slice coupled to a removed channel goes with it.  A unit's importance
is aggregated over all of its members.
"""
from __future__ import annotations

import fnmatch
import math

import numpy as np
import torch

from prunec.compaction import compact, tracker
from prunec.dependency import ChannelGroups, build
from prunec.errors import UsageError
from prunec.ir import Graph, interpret
from prunec.registry import Option, PassResult, register_pass

_NORM_OPS = {"_native_batch_norm_legit_no_training", "batch_norm", "group_norm", "layer_norm",
             "instance_norm", "rms_norm"}

OPTIONS = {
    "ratio": Option("float-map", 0.5, "fraction of units to remove: a float, or [pattern:ratio,...] matched "
                    "against the parameters producing the channels (first match wins; no match: 0)",
                    minimum=0.0, maximum=1.0),
    "criterion": Option(str, "l1", "importance of a unit, summed over its members",
                        choices=("l1", "l2", "bn-scale", "taylor", "random")),
    "scope": Option(str, "local", "rank units within each group (local) or across groups (global)",
                    choices=("local", "global")),
    "round-to": Option(int, 1, "keep unit counts a multiple of this", minimum=1),
    "min-channels": Option(int, 1, "never keep fewer units than this in a group", minimum=1),
    "ignore": Option(list, [], "parameter-name patterns whose output channels (dim 0) are never pruned, "
                     "e.g. [fc.*,head.*]"),
    "heads": Option(bool, True, "prune whole attention heads"),
    "head-dim": Option(bool, False, "prune attention head widths instead of whole heads: the same "
                       "dimensions in every head (head counts are kept)"),
    "packed-heads": Option(bool, False, "also prune attention whose q/k/v come from one packed projection "
                           "(timm ViT, nn.MultiheadAttention); those modules tie the attention width to "
                           "their input width, so the in-place module follows only where both come out "
                           "equal (the program always does)"),
    "seed": Option(int, 0, "seed for criterion=random"),
    "exact": Option(bool, False, "only prune groups where compaction provably equals masking (skip groups "
                    "whose channels feed a layer/RMS norm, softmax or mean over the channel dimension)"),
}


def _slice_scores(t: torch.Tensor, d: int, kind: str, last: list | None = None) -> np.ndarray:
    """Per index along ``d``: the L1 norm (``l1``) or squared L2 norm of the slice.  ``last`` keeps
    the latest tensor's |t| or t*t for its next channel dimension (a conv weight's out, then in:
    a tensor's slots come one after another), keyed by the id of ``t``, which the caller keeps
    alive; one entry, as holding them all made fresh allocations cost more than it saved."""
    key = (id(t), kind)
    t = t.detach().float()
    other = [i for i in range(t.dim()) if i != d]
    if not other:
        r = t * t if kind == "l2" else t.abs()
    elif d == 0 and t.numel() >= _ONE_PASS_NUMEL:
        # rows of a large weight: vector_norm reduces in one pass, where abs().sum() first writes
        # a full-size temporary (5x slower on VGG's 25088x4096 classifier)
        r = torch.linalg.vector_norm(t, 2 if kind == "l2" else 1, dim=other)
        r = r.square() if kind == "l2" else r
    else:
        # small weights, and reductions across rows: vector_norm is 2-6x slower here
        if last and last[0] == key:
            m = last[1]
        else:
            m = t * t if kind == "l2" else t.abs()
            if last is not None:
                last[:] = [key, m]
        r = m.sum(other)
    return r.numpy().astype(np.float64)


_ONE_PASS_NUMEL = 1 << 22


def _taylor_grads(graph: Graph, am) -> dict[str, torch.Tensor]:
    ctx = getattr(am, "context", None)
    if ctx is None or not ctx.example_inputs:
        raise UsageError("prune-channels{criterion=taylor} needs a calibration batch (example inputs)")
    tensors = {k: (t.detach().clone().requires_grad_(True)
                   if t.is_floating_point() and graph.consts[k].kind == "parameter" else t)
               for k, t in graph.tensors.items()}
    with torch.enable_grad():
        outs = interpret(graph, ctx.example_inputs, tensors)
        # No labels here: the first-order change of the output energy stands in for the loss.
        loss = sum(0.5 * (o.float() ** 2).mean() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())
        loss.backward()
    return {k: t.grad for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.grad is not None}


def unit_scores(graph: Graph, cg, criterion: str, am, seed: int) -> np.ndarray:
    n_units = len(cg.unit_pinned)
    scores = np.zeros(n_units)
    if criterion == "random":
        return np.random.default_rng(seed).random(n_units)
    grads = _taylor_grads(graph, am) if criterion == "taylor" else None
    norm_weights = set()
    if criterion == "bn-scale":
        for n in graph.nodes:
            if n.op in _NORM_OPS:
                w = n.args[1] if n.op != "layer_norm" and n.op != "group_norm" else n.args[2]
                if getattr(w, "is_const", False):
                    norm_weights.add(w.name)
    fallback = np.zeros(n_units)
    last: list = []  # see _slice_scores
    for s, (v, d) in enumerate(cg.slots):
        if v.kind != "parameter":
            continue
        t = graph.tensors[v.name]
        if not t.is_floating_point():
            continue
        labels = cg.slot_labels(s)
        if cg.unit_pinned[labels].all():
            continue  # no unit here can go (kernel taps, pinned channels): a full read of t for nothing
        if criterion == "taylor":
            g = grads.get(v.name)
            vec = _slice_scores(t * g, d, "l1") if g is not None else np.zeros(t.shape[d])
        elif criterion == "bn-scale":
            np.add.at(fallback, labels, _slice_scores(t, d, "l1", last))
            if v.name not in norm_weights:
                continue
            vec = np.abs(t.detach().float().numpy())
        else:
            vec = _slice_scores(t, d, criterion, last)
        np.add.at(scores, labels, vec)
    if criterion == "l2":
        scores = np.sqrt(scores)
    if criterion == "bn-scale":  # groups without a norm layer fall back to l1
        scores = np.where(scores > 0, scores, fallback)
    return scores


def _group_ratio(ratio, cg, group) -> float:
    if not isinstance(ratio, dict):
        return float(ratio)
    # match the layers that produce the channels (dim 0: out channels, biases, norm weights)
    names = [cg.slots[s][0].name for s in group.param_slots if cg.slots[s][1] == 0] or \
        [cg.slots[s][0].name for s in group.param_slots]
    for pat, r in ratio.items():
        if any(fnmatch.fnmatchcase(n, pat) for n in names):
            return r
    return 0.0


def _max_removable(group, ratio: float, round_to: int, min_units: int) -> int:
    total, prunable = len(group.units), len(group.prunable)
    want = int(math.floor(ratio * prunable + 1e-9))
    keep = total - want
    keep = min(total, int(math.ceil(keep / round_to) * round_to))
    keep = max(keep, min(total, max(min_units, 1)))
    return max(0, min(prunable, total - keep))


def _head_groups(graph: Graph, cg) -> set[int]:
    slot_group = {s: g.id for g in cg.groups for s in g.slots}
    out = set()
    for n in graph.nodes:
        if n.op == "scaled_dot_product_attention":
            for x in n.args[:3]:
                gid = slot_group.get(cg.slot_of(x, len(x.shape) - 3))
                if gid is not None:
                    out.add(gid)
    return out


class _SlotCaps:
    """Per-member limits inside a group: no tensor dimension loses more than the
    group's ratio, and none is emptied.  This matters where a group spans
    several producers (the branches of a concatenation): a group-wide ranking
    alone could remove every channel of one branch."""

    def __init__(self, cg, group, ratio: float):
        self.unit_slots: dict[int, list[tuple[int, int]]] = {}
        self.left: dict[int, int] = {}
        every = np.asarray(group.units)  # sorted
        for s in group.slots:
            labels = cg.slot_labels(s)
            if len(labels) == len(every) and np.array_equal(np.sort(labels), every):
                continue  # holds every unit once: the group's own budget is the tighter limit
            self.left[s] = min(len(labels) - 1, int(math.floor(ratio * len(labels) + 1e-9)))
            srt = np.sort(labels)  # np.unique(return_counts=True) without its numpy.ma import
            first = np.flatnonzero(np.concatenate([[True], srt[1:] != srt[:-1]]))
            counts = np.diff(np.append(first, len(srt)))
            for u, c in zip(srt[first].tolist(), counts.tolist()):
                self.unit_slots.setdefault(u, []).append((s, c))

    def take(self, u: int) -> bool:
        need = self.unit_slots.get(u, ())
        if any(self.left[s] < c for s, c in need):
            return False
        for s, c in need:
            self.left[s] -= c
        return True


def select_units(graph, cg, scores, ratio, scope, round_to, min_units, skip_groups) -> np.ndarray:
    removed = np.zeros(len(cg.unit_pinned), dtype=bool)
    budgets, caps = {}, {}
    for g in cg.groups:
        if g.id in skip_groups or not g.prunable:
            continue
        r = _group_ratio(ratio, cg, g)
        budgets[g.id] = _max_removable(g, r, round_to, min_units)
        caps[g.id] = _SlotCaps(cg, g, r if scope == "local" else 1.0)
    if scope == "local":
        for g in cg.groups:
            k = budgets.get(g.id, 0)
            units = np.array(g.prunable)
            if k and not caps[g.id].unit_slots:  # no member limit binds: the k lowest scores go
                removed[units[np.argsort(scores[units], kind="stable")[:k]]] = True
                continue
            for u in (units[np.argsort(scores[units], kind="stable")] if k else ()):
                if k == 0:
                    break
                if caps[g.id].take(int(u)):
                    removed[u] = True
                    k -= 1
        return removed
    # global: rank units across groups by score normalised within each group
    cand = []
    for g in cg.groups:
        if budgets.get(g.id):
            units = np.array(g.prunable)
            top = scores[units].max() or 1.0
            cand += [(scores[u] / top, g.id, int(u)) for u in units]
    cand.sort()
    r = ratio if not isinstance(ratio, dict) else max(ratio.values(), default=0.0)
    target = int(math.floor(r * len(cand)))
    # a global budget may take more from one group than the local ratio would, but never
    # more than the group's floor (min-channels / round-to) allows
    left = {g.id: _max_removable(g, 1.0, round_to, min_units) for g in cg.groups if g.id in budgets}
    done = 0
    for _, gid, u in cand:
        if done >= target:
            break
        if left[gid] > 0 and caps[gid].take(u):
            removed[u] = True
            left[gid] -= 1
            done += 1
    return removed


@register_pass("prune-channels", summary="Remove whole channels, neurons and attention heads "
               "(dependency-aware structured pruning).", options=OPTIONS)
def prune_channels(graph, am, ratio, criterion, scope, round_to, min_channels, ignore, heads, head_dim,
                   packed_heads, seed, exact):
    cg = build(graph, pins=ignore, head_dim=head_dim, packed_heads=packed_heads) \
        if ignore or head_dim or packed_heads else am.get(ChannelGroups)
    scores = unit_scores(graph, cg, criterion, am, seed)
    skip = set() if heads else _head_groups(graph, cg)
    if exact:
        skip |= {g.id for g in cg.groups if g.stat}
    removed_units = select_units(graph, cg, scores, ratio, scope, round_to, min_channels, skip)
    if not removed_units.any():
        return PassResult(False, {"units-removed": 0, "groups-pruned": 0})
    sizes = {k: tuple(v.shape) for k, v in graph.consts.items()}
    removed = compact(graph, cg, removed_units)
    tracker(am).record(graph, removed, sizes)
    touched = [g for g in cg.groups if removed_units[g.prunable].any()] if cg.groups else []
    stats = {"units-removed": int(removed_units.sum()), "groups-pruned": len(touched),
             "groups-inexact": sum(1 for g in touched if g.stat),
             "params-sliced": len(removed)}
    return PassResult(True, stats)
