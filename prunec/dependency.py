"""Dependency analysis: which channels must be removed together.

Every dimension of every tensor is a *slot*; every index along it an *element*.
Each op's channel rule (prunec/channel_rules.py) says which elements of its
operands and results are the same channel (``same``/``link``), which may not
be removed (``pin``), and which feed a channel statistic (``stat``: removing
them changes a mean or a norm).  Connected elements form *units*: the smallest
sets that can be removed without breaking a shape or the math.  Connected slots
form *groups* (what ``prunec inspect`` shows).  A unit is prunable if it holds
at least one parameter slice and no pinned element.

Closed world: an op without a rule is a barrier.  Every operand and result
dimension of it is pinned and the report names the op and node.  The same holds
for any dimension a rule does not mention.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from .analysis import Analysis
from .ir import Graph, Node, Value


@dataclass
class Barrier:
    node: str
    op: str
    why: str


class RuleContext:
    """What a channel rule sees: the node and union/pin operations on its operands."""

    def __init__(self, builder: "_Builder", node: Node):
        self.b = builder
        self.node = node
        self.covered: set[tuple[int, int]] = set()

    def _slot(self, v: Value, d: int) -> int:
        d = d % len(v.shape)
        self.covered.add((id(v), d))
        return self.b.slot_id[(id(v), d)]

    def same(self, a: Value, da: int, b: Value, db: int) -> None:
        """Element i of ``a`` along ``da`` is element i of ``b`` along ``db``."""
        sa, sb = self._slot(a, da), self._slot(b, db)
        size = self.b.size_of
        if size[sa] != size[sb]:
            self.b.pin_slot(sa, f"%{self.node.name}: sizes differ")
            self.b.pin_slot(sb, f"%{self.node.name}: sizes differ")
            return
        self.b.add_identity(sa, sb)

    def link(self, a: Value, da: int, ia, b: Value, db: int, ib) -> None:
        """Element ``ia[k]`` of ``a`` along ``da`` is element ``ib[k]`` of ``b`` along ``db``."""
        sa, sb = self._slot(a, da), self._slot(b, db)
        self.b.add_pairs(sa, np.asarray(ia, dtype=np.int64), sb, np.asarray(ib, dtype=np.int64))

    def cover(self, v: Value, d: int) -> None:
        """The rule handled this dimension without coupling it (e.g. a broadcast)."""
        self._slot(v, d)

    def pin(self, v: Value, d: int, why: str) -> None:
        self.b.pin_slot(self._slot(v, d), f"%{self.node.name} ({self.node.op}): {why}")

    def pin_elements(self, v: Value, d: int, idx, why: str) -> None:
        s = self._slot(v, d)
        self.b.pinned[self.b.offset[s] + np.asarray(idx, dtype=np.int64)] = True
        self.b.pin_reason.setdefault(s, f"%{self.node.name} ({self.node.op}): {why}")

    def stat(self, v: Value, d: int) -> None:
        s = self._slot(v, d)
        self.b.stat[self.b.offset[s]:self.b.offset[s] + self.b.size[s]] = True

    def barrier(self, why: str) -> None:
        self.b.barriers.append(Barrier(self.node.name, self.node.op, why))
        for v in tensors_of(self.node):
            for d in range(len(v.shape)):
                self.pin(v, d, why)


def tensors_of(node: Node) -> list[Value]:
    seen, out = set(), []
    for v in node.inputs() + list(node.outputs):
        if id(v) not in seen and v.shape is not None:
            seen.add(id(v))
            out.append(v)
    return out


class _Builder:
    def __init__(self, graph: Graph, head_dim: bool = False, packed_heads: bool = False):
        from .head_views import head_reshapes, stacked_views
        self.graph_tensors = graph.tensors
        # head-width mode: these reshapes let the head width, not the head count, carry the channel
        self.head_dim = head_dim
        found, paths = head_reshapes(graph)
        self.head_views = found if head_dim else set()
        # every reshape between an attention and its projections, with (head count, head width): where
        # one merges the heads with an outer dim (B*H), the heads carry the channel
        self.head_paths = paths
        # packed q/k/v projections (opt-in: their modules tie the attention width to the input
        # width, so the in-place module follows only where both come out equal): the stack axis
        # is an index, the parts carry the channel
        self.stacked_views = stacked_views(graph) if head_dim or packed_heads else {}
        self.slots: list[tuple[Value, int]] = []
        self.slot_id: dict[tuple[int, int], int] = {}
        for v in graph.values():
            for d in range(len(v.shape)):
                self.slot_id[(id(v), d)] = len(self.slots)
                self.slots.append((v, d))
        self.size = np.array([v.shape[d] for v, d in self.slots], dtype=np.int64)
        self.offset = np.concatenate([[0], np.cumsum(self.size)[:-1]]).astype(np.int64) if self.slots else np.zeros(0, np.int64)
        # the same as Python ints: rules look sizes up one at a time, where numpy scalars are slow
        self.size_of: list[int] = self.size.tolist()
        self.offset_of: list[int] = self.offset.tolist()
        self.n = int(self.size.sum())
        self.pinned = np.zeros(self.n, dtype=bool)
        self.stat = np.zeros(self.n, dtype=bool)
        self.pin_reason: dict[int, str] = {}
        # slots linked element by element (element i of one is element i of the other): most links
        self.ident_a: list[int] = []
        self.ident_b: list[int] = []
        # other linked element pairs, as indices within their slots; made global at the end, all at once
        self.pairs_a: list[np.ndarray] = []
        self.pairs_b: list[np.ndarray] = []
        self.pair_slots: list[tuple[int, int]] = []
        self.slot_edges: list[tuple[int, int]] = []  # slots linked by some channel pair
        self.barriers: list[Barrier] = []

    def add_pairs(self, sa: int, ia: np.ndarray, sb: int, ib: np.ndarray) -> None:
        if len(ia) == 0:
            return
        if ia.max() >= self.size[sa] or ib.max() >= self.size[sb]:
            raise IndexError("channel rule linked an element outside its dimension")
        self._append(sa, ia, sb, ib)

    def add_identity(self, sa: int, sb: int) -> None:
        """Element i of slot ``sa`` is element i of slot ``sb`` (equal sizes)."""
        if self.size_of[sa] == 0 or sa == sb:
            return
        self.ident_a.append(sa)
        self.ident_b.append(sb)
        self.slot_edges.append((sa, sb))

    def _append(self, sa: int, ia: np.ndarray, sb: int, ib: np.ndarray) -> None:
        self.pairs_a.append(ia)
        self.pairs_b.append(ib)
        self.pair_slots.append((sa, sb))
        if sa != sb:
            self.slot_edges.append((sa, sb))

    def pin_slot(self, s: int, why: str) -> None:
        self.pinned[self.offset[s]:self.offset[s] + self.size[s]] = True
        self.pin_reason.setdefault(s, why)


@dataclass
class Group:
    """Slots that share channels, and the removable units inside them."""

    id: int
    slots: list[int]
    units: list[int]                 # component labels of the units in this group
    prunable: list[int]              # the subset that may be removed
    param_slots: list[int]
    pinned_by: list[str] = field(default_factory=list)
    stat: bool = False


@dataclass
class ChannelGraph:
    graph: Graph
    slots: list[tuple[Value, int]]
    slot_id: dict
    size: np.ndarray
    offset: np.ndarray
    labels: np.ndarray               # element -> unit label
    unit_pinned: np.ndarray
    unit_stat: np.ndarray
    unit_has_param: np.ndarray
    groups: list[Group]
    barriers: list[Barrier]
    pin_reason: dict[int, str]
    slot_edges: list[tuple[int, int]] = field(default_factory=list)

    def slot_labels(self, s: int) -> np.ndarray:
        return self.labels[self.offset[s]:self.offset[s] + self.size[s]]

    def slot_of(self, v: Value, d: int) -> int:
        return self.slot_id[(id(v), d % len(v.shape))]

    def slot_name(self, s: int) -> str:
        v, d = self.slots[s]
        return f"{v!r}[{d}]"

    def slot_graph(self):
        """The slots as a networkx graph (nodes: slot indices; an edge where a channel rule linked
        two slots), for walking the dependencies by hand.  Built on demand: importing networkx
        costs more than the whole analysis of a ResNet."""
        import networkx as nx
        g = nx.Graph()
        g.add_nodes_from(range(len(self.slots)))
        g.add_edges_from(self.slot_edges)
        return g


def build(graph: Graph, pins: list[str] = (), head_dim: bool = False, packed_heads: bool = False) -> ChannelGraph:
    """The channel graph.  ``head_dim``: attention head widths are the channels (the same
    dimensions removed from every head) and head counts are pinned; ``packed_heads``: q/k/v packed
    in one projection (timm, ``nn.MultiheadAttention``) lose heads too; see prunec/head_views.py."""
    b = _apply_rules(graph, pins, head_dim, packed_heads)
    n_units, labels, kept = _unit_labels(b)
    # a unit is pinned (a statistic) if any of its elements is; setting True needs no ufunc.at
    pinned = np.zeros(n_units, dtype=bool)
    pinned[labels[b.pinned]] = True
    stat = np.zeros(n_units, dtype=bool)
    stat[labels[b.stat]] = True
    has_param = np.zeros(n_units, dtype=bool)
    for s, (v, d) in enumerate(b.slots):
        if v.kind == "parameter":
            has_param[labels[b.offset[s]:b.offset[s] + b.size[s]]] = True
    cg = ChannelGraph(graph, b.slots, b.slot_id, b.size, b.offset, labels, pinned, stat, has_param,
                      [], b.barriers, b.pin_reason, b.slot_edges)
    cg.groups = _groups(cg, kept)
    return cg


def _apply_rules(graph: Graph, pins, head_dim: bool, packed_heads: bool) -> _Builder:
    """Every op's channel rule, the pins and the closed world's barriers, as links between slots."""
    from .channel_rules import apply_rule
    b = _Builder(graph, head_dim, packed_heads)
    for v in list(graph.inputs) + list(graph.outputs):
        for d in range(len(v.shape)):
            b.pin_slot(b.slot_id[(id(v), d)], f"{v!r} is a graph {'input' if v in graph.inputs else 'output'}")
    read = {id(v) for n in graph.nodes for v in n.inputs()}
    for name, v in graph.consts.items():
        if id(v) not in read:  # unused (often a tied twin of a used weight): leave it alone
            for d in range(len(v.shape)):
                b.pin_slot(b.slot_id[(id(v), d)], f"{name} is not read by any op")
        if any(fnmatch.fnmatchcase(name, p) for p in pins) and v.shape:
            # ignore a layer = keep its output channels (dim 0); its inputs follow their producer
            b.pin_slot(b.slot_id[(id(v), 0)], f"{name} matches an ignore pattern")
    for n in graph.nodes:
        ctx = RuleContext(b, n)
        apply_rule(ctx, n)
        for v in tensors_of(n):  # closed world: a dimension the rule did not mention is pinned
            for d in range(len(v.shape)):
                if (id(v), d) not in ctx.covered:
                    ctx.pin(v, d, f"the rule for {n.op} does not define dimension {d}")
    return b


def _pair_edges(b: _Builder) -> tuple[np.ndarray, np.ndarray]:
    """The links other than slot identities, as global element indices."""
    if not b.pairs_a:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lens = np.fromiter(map(len, b.pairs_a), dtype=np.int64, count=len(b.pairs_a))
    sa, sb = np.array(b.pair_slots, dtype=np.int64).T
    return (np.concatenate(b.pairs_a) + np.repeat(b.offset[sa], lens),
            np.concatenate(b.pairs_b) + np.repeat(b.offset[sb], lens))


def _unit_labels(b: _Builder) -> tuple[int, np.ndarray, np.ndarray]:
    """(number of units, element -> unit label numbered by smallest element, mask of the
    elements of each identity class's smallest slot: every unit of every slot is among them).

    Identity links (element i of one slot is element i of another: element-wise ops, norms,
    most of every graph) are merged slot by slot first; the element-level components are then
    found only among the elements of each identity class's smallest slot, where the other links
    are moved.  Every element has a smaller twin in its class's smallest slot, so each unit's
    smallest element lies there and the numbering is the one over all elements (MNASNet 0.75 has
    142k elements; this leaves 18k, and a fifth of the time)."""
    n_slots = len(b.slots)
    n_cls, cls = connected_components(n_slots, np.array(b.ident_a, dtype=np.int64),
                                      np.array(b.ident_b, dtype=np.int64))
    first = np.empty(n_cls, dtype=np.int64)
    first[cls[::-1]] = np.arange(n_slots - 1, -1, -1)  # the last write wins: the smallest slot
    rep = first[cls]
    rep_size = np.where(rep == np.arange(n_slots), b.size, 0)
    rep_start = np.cumsum(rep_size) - rep_size  # where each class's slot starts among the kept elements
    # element offset[s] + i -> kept element rep_start[rep[s]] + i
    to_kept = np.arange(b.n, dtype=np.int64) + np.repeat(rep_start[rep] - b.offset, b.size)
    a, c = _pair_edges(b)
    n_units, labels = connected_components(int(rep_size.sum()), to_kept[a], to_kept[c])
    return n_units, labels[to_kept], np.repeat(rep_size > 0, b.size)


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> tuple[int, np.ndarray]:
    """Label the components of the undirected graph on ``n`` elements with edges ``a[i] - b[i]``;
    components are numbered by their smallest element (as a search from element 0 up would).

    Hook-and-shortcut in numpy: every root joins the smallest root it has an edge to, then
    pointer jumping flattens the trees.  Each round merges at least the largest root that still
    has an edge to another tree, so the loop ends; in practice it takes a few rounds (a chain
    in any order: one).  (scipy's csgraph does the same job, but importing it costs more than
    the whole analysis of a ResNet.)"""
    parent = np.arange(n)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        cross = ra != rb
        if not cross.any():
            break
        a, b, ra, rb = a[cross], b[cross], ra[cross], rb[cross]
        # roots only ever point to smaller roots, so the forest stays acyclic
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    # every tree's root is its smallest element: number the roots in order (np.unique would
    # sort, and its first call imports numpy.ma, 15 ms)
    is_root = parent == np.arange(n)
    rank = np.cumsum(is_root) - 1
    return int(is_root.sum()), rank[parent]


def _groups(cg: ChannelGraph, kept: np.ndarray | None = None) -> list[Group]:
    """One group per connected set of slots (in order of their smallest slot) that holds a parameter.
    ``kept``: the elements that hold every (slot set, unit) pair (see ``_unit_labels``)."""
    e = np.array(cg.slot_edges, dtype=np.int64).reshape(-1, 2)
    n_comp, comp_of = connected_components(len(cg.slots), e[:, 0], e[:, 1])
    members = np.argsort(comp_of, kind="stable")
    bounds = np.searchsorted(comp_of[members], np.arange(n_comp + 1))
    # the units of every component at once: sort (component, unit) keys of all elements, drop repeats
    n_units = len(cg.unit_pinned)
    key = np.repeat(comp_of, cg.size) * n_units + cg.labels
    key = key[kept] if kept is not None else key
    key.sort()
    key = key[np.concatenate([[True], key[1:] != key[:-1]])] if len(key) else key
    unit_bounds = np.searchsorted(key, np.arange(n_comp + 1) * n_units)
    groups = []
    for c in range(n_comp):
        slots = members[bounds[c]:bounds[c + 1]].tolist()
        params = [s for s in slots if cg.slots[s][0].kind == "parameter"]
        if not params:
            continue
        units = key[unit_bounds[c]:unit_bounds[c + 1]] - c * n_units
        ok = units[~cg.unit_pinned[units] & cg.unit_has_param[units]]
        why = sorted({cg.pin_reason[s] for s in slots if s in cg.pin_reason})
        groups.append(Group(len(groups), slots, units.tolist(), ok.tolist(), params, why,
                            bool(cg.unit_stat[units].any())))
    return groups


class ChannelGroups(Analysis):
    """The channel dependency graph of the IR (cached by the analysis manager)."""

    name = "channel-groups"

    @classmethod
    def run(cls, graph, am):
        pins = getattr(am, "pins", ()) if am is not None else ()
        return build(graph, pins)


def groups_summary(cg: ChannelGraph) -> dict:
    groups = []
    for g in cg.groups:
        if not g.prunable and all(d >= 2 for _, d in (cg.slots[s] for s in g.param_slots)):
            continue  # kernel taps and the like: never channels, only noise in a listing
        members = [cg.slot_name(s) for s in g.param_slots]
        channels = max(int(cg.size[s]) for s in g.param_slots)
        groups.append({"id": g.id, "channels": channels, "units": len(g.units),
                       "prunable": len(g.prunable), "members": members,
                       "statistics": g.stat, "pinned": g.pinned_by[:3]})
    return {"groups": groups,
            "barriers": [{"node": b.node, "op": b.op, "why": b.why} for b in cg.barriers]}
