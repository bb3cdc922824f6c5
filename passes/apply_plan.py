"""apply-plan: replay a pruning plan (JSON) on a fresh copy of the same architecture.

The plan lists, per parameter or buffer, the removed indices along each
dimension.  Replaying it removes the same units (channels and whole heads, or
head widths for a plan made with ``prune-channels{head-dim=true}``); a plan that
removes only part of a coupled unit, or names a tensor or index the model lacks,
is rejected (it was made for another architecture).  A plan from a pipeline that
pruned both whole heads and head widths (``prune-channels{...},prune-channels{...,head-dim=true}``)
is replayed in two stages: first every unit the plan removes entirely (channels, whole
heads), then what is left of it in head-width mode.
"""
from __future__ import annotations

import json
import os

import numpy as np

from prunec.compaction import compact, tracker
from prunec.dependency import ChannelGroups, build
from prunec.errors import UsageError
from prunec.registry import Option, PassResult, register_pass
from prunec.shapes import propagate


def load_plan(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"apply-plan: plan file {path} does not exist")
    try:
        with open(path) as f:
            plan = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"apply-plan: {path} is not valid JSON ({e})") from None
    if not isinstance(plan, dict) or plan.get("version") != 1 or not isinstance(plan.get("params"), dict):
        raise UsageError(f"apply-plan: {path} is not a prunec plan (expected {{\"version\": 1, \"params\": {{...}}}})")
    return plan


def plan_units(graph, cg, plan: dict, path: str = "plan") -> np.ndarray:
    removed = np.zeros(len(cg.unit_pinned), dtype=bool)
    wanted: dict[int, set] = {}
    for name, dims in plan["params"].items():
        if name not in graph.consts:
            raise UsageError(f"apply-plan: {path} names {name}, which this model does not have")
        v = graph.consts[name]
        for d_txt, idx in dims.items():
            d = int(d_txt)
            if d >= len(v.shape) or (idx and max(idx) >= v.shape[d]):
                raise UsageError(f"apply-plan: {path}: {name} dim {d} has size "
                                 f"{v.shape[d] if d < len(v.shape) else 'none'}; the plan was made for another model")
            s = cg.slot_of(v, d)
            wanted[s] = set(idx)
            removed[cg.slot_labels(s)[np.asarray(idx, dtype=np.int64)]] = True
    if (removed & cg.unit_pinned).any():
        raise UsageError(f"apply-plan: {path} removes channels this model pins (graph inputs/outputs or barriers)")
    # every const slice of a removed unit must be in the plan
    for s, (v, d) in enumerate(cg.slots):
        if not v.is_const:
            continue
        hit = np.nonzero(removed[cg.slot_labels(s)])[0]
        if len(hit) and set(hit.tolist()) != wanted.get(s, set()):
            raise UsageError(f"apply-plan: {path} removes channels coupled to {v.name} dim {d} but not those "
                             f"slices; the plan does not match this architecture")
    return removed


@register_pass("apply-plan", summary="Replay a pruning plan (JSON from --plan-out) on the same architecture.",
               options={"file": Option(str, "plan.json", "path of the plan JSON")})
def apply_plan(graph, am, file):
    plan = load_plan(file)
    cg = default = am.get(ChannelGroups)
    try:
        units = plan_units(graph, cg, plan, file)
    except UsageError as first:
        # a plan from prune-channels{head-dim=true} or {packed-heads=true} removes units only
        # those analyses have
        for mode in ({"head_dim": True}, {"packed_heads": True}):
            cg = build(graph, **mode)
            try:
                units = plan_units(graph, cg, plan, file)
                break
            except UsageError:
                continue
        else:
            return _replay_in_stages(graph, am, default, plan, file, first)
    if not units.any():
        return PassResult(False, {"units-removed": 0})
    removed = _remove(graph, am, cg, units)
    return PassResult(True, {"units-removed": int(units.sum()), "params-sliced": len(removed)})


def _remove(graph, am, cg, units: np.ndarray) -> dict:
    """Compact ``units`` away and record it in the plan; returns {const name: {dim: removed indices}}."""
    sizes = {k: tuple(v.shape) for k, v in graph.consts.items()}
    removed = compact(graph, cg, units)
    tracker(am).record(graph, removed, sizes)
    return removed


def contained_units(graph, cg, plan: dict) -> np.ndarray:
    """Units (not pinned) all of whose parameter slices the plan removes."""
    names = {id(v): k for k, v in graph.consts.items()}
    touched = np.zeros(len(cg.unit_pinned), dtype=bool)
    outside = np.zeros(len(cg.unit_pinned), dtype=bool)
    for s, (v, d) in enumerate(cg.slots):
        if not v.is_const or id(v) not in names:
            continue
        labels = cg.slot_labels(s)
        hit = np.zeros(len(labels), dtype=bool)
        hit[np.asarray(plan["params"].get(names[id(v)], {}).get(str(d), []), dtype=np.int64)] = True
        touched[labels[hit]] = True
        outside[labels[~hit]] = True
    return touched & ~outside & ~cg.unit_pinned


def _replay_in_stages(graph, am, cg, plan: dict, file: str, first: UsageError) -> PassResult:
    """Whole units first (``cg``: the default analysis), then the rest of the plan, re-indexed, in
    head-width mode."""
    units = contained_units(graph, cg, plan)
    if not units.any():
        raise first from None
    gone = _remove(graph, am, cg, units)
    propagate(graph)  # the second analysis reads the new shapes
    rest = {}
    for name, dims in plan["params"].items():
        for d_txt, idx in dims.items():
            done = np.asarray(gone.get(name, {}).get(int(d_txt), []), dtype=np.int64)
            left = np.setdiff1d(np.asarray(idx, dtype=np.int64), done)
            if len(left):
                rest.setdefault(name, {})[d_txt] = (left - np.searchsorted(done, left)).tolist()
    count = int(units.sum())
    if rest:
        cg = build(graph, head_dim=True)
        try:
            units2 = plan_units(graph, cg, {"version": 1, "params": rest}, file)
        except UsageError:
            raise first from None
        sliced = set(gone) | set(_remove(graph, am, cg, units2))
        count += int(units2.sum())
    else:
        sliced = set(gone)
    return PassResult(True, {"units-removed": count, "params-sliced": len(sliced)})
