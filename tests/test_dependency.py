"""Channel rules, one coupling per tiny model: the units found, and the pruned model's exactness."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunec
from prunec.dependency import build
from prunec.oracle import masked_copy, max_rel_error


def units_of(graph, cg, param, dim):
    """For each unit along ``param``'s ``dim``: the sorted indices of that dim in it."""
    s = cg.slot_of(graph.consts[param], dim)
    labels = cg.slot_labels(s)
    return {int(l): sorted(np.nonzero(labels == l)[0].tolist()) for l in np.unique(labels)}


def members(graph, cg, unit, param, dim):
    s = cg.slot_of(graph.consts[param], dim)
    return sorted(np.nonzero(cg.slot_labels(s) == unit)[0].tolist())


def prune_and_check(model, x, passes="prune-channels{ratio=0.5}"):
    original = copy.deepcopy(model).eval()
    res = prunec.compile(model.eval(), (x,), passes=passes)
    assert res.plan["params"], "nothing was pruned"
    with torch.no_grad():
        err = max_rel_error(res(x), masked_copy(original, res.plan)(x))
        assert err <= 1e-5, err
        assert res.module is not None, res.module_problems
        assert max_rel_error(res.module(x), res(x)) <= 1e-6
    return res


class ConcatTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.b(torch.cat([y, y], 1))


def test_concat_of_the_same_tensor_twice():
    m, x = ConcatTwice(), torch.randn(1, 3, 6, 6)
    g = prunec.trace(m, (x,))
    cg = build(g)
    for unit, idx in units_of(g, cg, "a.weight", 0).items():
        (c,) = idx
        assert members(g, cg, unit, "b.weight", 1) == [c, c + 4]
    res = prune_and_check(m, x)
    assert res.module.a.out_channels == 2 and res.module.b.in_channels == 4


class SplitAdd(nn.Module):
    def __init__(self, hard_coded=False):
        super().__init__()
        self.hard_coded = hard_coded
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = self.a(x)
        p, q = torch.split(y, 4, dim=1) if self.hard_coded else torch.chunk(y, 2, dim=1)
        return self.b(p + q)


def test_split_then_add_couples_both_halves():
    m, x = SplitAdd(), torch.randn(1, 3, 5, 5)
    g = prunec.trace(m, (x,))
    cg = build(g)
    units = units_of(g, cg, "a.weight", 0)
    assert sorted(units.values()) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    res = prune_and_check(m, x)
    assert res.module.a.out_channels == 4 and res.module.b.in_channels == 2


def test_module_code_that_hard_codes_a_shape_is_named_and_the_program_stays_exact():
    m, x = SplitAdd(hard_coded=True), torch.randn(1, 3, 5, 5)
    original = copy.deepcopy(m)
    res = prunec.compile(m, (x,), passes="prune-channels{ratio=0.5}")
    assert res.module is None
    assert "in module 'SplitAdd'" in res.module_problems[0]
    with torch.no_grad():
        assert max_rel_error(res.program.module()(x), masked_copy(original, res.plan)(x)) <= 1e-5


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 16, 3, padding=1, groups=4)  # 2 in / 4 out per group
        self.c = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.c(F.relu(self.g(F.relu(self.a(x)))))


def test_grouped_conv_prunes_whole_groups():
    m, x = Grouped(), torch.randn(1, 3, 6, 6)
    g = prunec.trace(m, (x,))
    cg = build(g)
    units = units_of(g, cg, "a.weight", 0)
    assert sorted(units.values()) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for unit, idx in units.items():
        k = idx[0] // 2
        assert members(g, cg, unit, "g.weight", 0) == list(range(4 * k, 4 * k + 4))
    res = prune_and_check(m, x)
    assert res.module.g.groups == 2 and res.module.g.in_channels == 4 and res.module.g.out_channels == 8


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 10)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        return self.out(F.relu(self.fc(torch.flatten(F.relu(self.conv(x)), 1))))


def test_flatten_into_linear_maps_a_channel_to_its_features():
    m, x = FlattenLinear(), torch.randn(1, 3, 5, 5)
    g = prunec.trace(m, (x,))
    cg = build(g)
    for unit, (c,) in units_of(g, cg, "conv.weight", 0).items():
        assert members(g, cg, unit, "fc.weight", 1) == list(range(9 * c, 9 * c + 9))
    res = prune_and_check(m, x)
    assert res.module.fc.in_features == 18 and res.module.conv.out_channels == 2


class Shuffle(nn.Module):
    def __init__(self, native):
        super().__init__()
        self.native = native
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if self.native:
            y = F.channel_shuffle(y, 2)
        else:  # the view / transpose / view idiom of ShuffleNet
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(y)


@pytest.mark.parametrize("native", [False, True])
def test_channel_shuffle_is_not_pruned_across(native):
    m, x = Shuffle(native), torch.randn(1, 3, 4, 4)
    g = prunec.trace(m, (x,))
    cg = build(g)
    group = next(gr for gr in cg.groups if any(cg.slots[s][0].name == "a.weight" and cg.slots[s][1] == 0
                                                for s in gr.param_slots))
    assert group.prunable == []
    if native:
        assert [b.op for b in cg.barriers] == ["channel_shuffle"]
        assert "no channel rule" in cg.barriers[0].why
    res = prunec.compile(m, (x,), passes="prune-channels{ratio=0.5}")
    assert res.report["passes"][0]["changed"] is False


class GQA(nn.Module):
    def __init__(self, heads=4, kv=2, d=8, explicit_scale=False):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv, d
        self.scaling = d ** -0.5 if explicit_scale else None  # as Hugging Face attention does
        self.q = nn.Linear(32, heads * d)
        self.k = nn.Linear(32, kv * d)
        self.v = nn.Linear(32, kv * d)
        self.o = nn.Linear(heads * d, 32)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=self.scaling)
        return self.o(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def test_grouped_query_attention_removes_a_kv_head_with_its_query_heads():
    m, x = GQA(), torch.randn(1, 5, 32)
    g = prunec.trace(m, (x,))
    cg = build(g)
    units = units_of(g, cg, "k.weight", 0)
    assert sorted(units.values()) == [list(range(0, 8)), list(range(8, 16))]
    for unit, idx in units.items():
        j = idx[0] // 8
        assert members(g, cg, unit, "q.weight", 0) == list(range(16 * j, 16 * j + 16))
    res = prune_and_check(m, x)
    assert res.module.k.out_features == 8 and res.module.q.out_features == 16
    assert (res.module.num_heads, res.module.num_key_value_heads) == (2, 1)


def test_head_width_mode_couples_one_dimension_of_every_head():
    m, x = GQA(explicit_scale=True), torch.randn(1, 5, 32)
    g = prunec.trace(m, (x,))
    cg = build(g, head_dim=True)
    units = units_of(g, cg, "k.weight", 0)
    # unit d = row d of each key/value head, and row d of each of the 4 query heads
    assert sorted(units.values()) == [[d, d + 8] for d in range(8)]
    for unit, idx in units.items():
        d = idx[0]
        assert members(g, cg, unit, "q.weight", 0) == [d, d + 8, d + 16, d + 24]
        assert members(g, cg, unit, "v.weight", 0) == []  # v's width is its own channel
    v_units = units_of(g, cg, "v.weight", 0)
    for unit, idx in v_units.items():  # v's dim d feeds out_proj columns h*8 + d of every head
        assert members(g, cg, unit, "o.weight", 1) == [idx[0] + 8 * h for h in range(4)]
    res = prune_and_check(m, x, "prune-channels{ratio=0.5,head-dim=true}")
    assert res.module.q.out_features == 16 and res.module.k.out_features == 8
    assert res.module.head_dim == 4 and (res.module.num_heads, res.module.num_key_value_heads) == (4, 2)


def test_head_width_pruning_keeps_the_default_scale():
    # No explicit scale: SDPA would use 1/sqrt(4) after pruning; the program keeps 1/sqrt(8), and
    # the module, whose code cannot express that, is named instead of silently changing the math
    m, x = GQA(), torch.randn(1, 5, 32)
    original = copy.deepcopy(m)
    res = prunec.compile(m, (x,), passes="prune-channels{ratio=0.5,head-dim=true}")
    sdpa = next(n for n in res.graph.nodes if n.op == "scaled_dot_product_attention")
    assert sdpa.arg(6, "scale") == pytest.approx(8 ** -0.5) and sdpa.args[0].shape[-1] == 4
    with torch.no_grad():
        assert max_rel_error(res(x), masked_copy(original, res.plan)(x)) <= 1e-5
    assert res.module is None
    assert any("default scale" in p and "1/sqrt(8)" in p for p in res.module_problems), res.module_problems


def test_head_width_mode_keeps_head_counts_and_plain_mode_keeps_widths():
    m, x = GQA(), torch.randn(1, 5, 32)
    g = prunec.trace(m, (x,))
    plain, widths = build(g), build(g, head_dim=True)
    assert len(units_of(g, plain, "k.weight", 0)) == 2   # two key/value heads
    assert len(units_of(g, widths, "k.weight", 0)) == 8  # eight head-width dims
    pinned = [why for why in widths.pin_reason.values() if "head count" in why]
    assert pinned, "the head-count dims of the head reshapes are pinned in head-width mode"


def test_unknown_op_is_a_barrier_named_in_the_report():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.special.i0(self.a(x)))

    g = prunec.trace(Odd(), (torch.randn(2, 4),))
    cg = build(g)
    assert [(b.op, b.node) for b in cg.barriers] == [("special_i0", "special_i0")]
    assert not any(gr.prunable for gr in cg.groups)


class ConcatBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)
        with torch.no_grad():  # every channel of b is less important than any of a
            self.b.weight.mul_(1e-3)
            self.b.bias.mul_(1e-3)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1))


def test_concatenated_branches_each_keep_their_share():
    m, x = ConcatBranches(), torch.randn(1, 3, 4, 4)
    res = prune_and_check(m, x)
    assert res.module.a.out_channels == 2 and res.module.b.out_channels == 2 and res.module.c.in_channels == 4
    res = prunec.compile(ConcatBranches(), (x,), passes="prune-channels{ratio=0.9,scope=global}")
    assert res.graph.consts["b.weight"].shape[0] >= 1 and res.graph.consts["a.weight"].shape[0] >= 1


class PackedQKV(nn.Module):
    """timm-style attention: one qkv projection, split as reshape(B, N, 3, H, D) + permute + unbind."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1)) + x


def _prunable_rows(g, cg, param):
    s = cg.slot_of(g.consts[param], 0)
    labels = cg.slot_labels(s)
    return sorted(np.nonzero(~cg.unit_pinned[labels])[0].tolist())


@pytest.mark.parametrize("packed,batch", [(PackedQKV, 1), (None, 1), (PackedQKV, 2), (None, 2)])
def test_packed_qkv_loses_whole_heads_of_q_k_and_v_together(packed, batch):
    """With batch 2, nn.MultiheadAttention reshapes [L, B, E] -> [L, B*H, D] and [B*H, L, D] ->
    [B, H, L, D]: head h is every b*H + h there, and still one unit."""
    d, h = 32, 4
    if packed is None:  # nn.MultiheadAttention: in_proj output unflattened to [3, E], then select
        m = nn.TransformerEncoderLayer(d, h, 64, dropout=0.0, batch_first=True).eval()
        w, out = "self_attn.in_proj_weight", "self_attn.out_proj.weight"
    else:
        m, w, out = packed(d, h).eval(), "qkv.weight", "proj.weight"
    x = torch.randn(batch, 6, d)
    g = prunec.trace(m, (x,))
    assert _prunable_rows(g, build(g), w) == []  # by default the packed projection is left whole
    cg = build(g, packed_heads=True)
    units = units_of(g, cg, w, 0)
    heads = [idx for idx in units.values() if len(idx) == 3 * d // h]
    # one unit per head: its rows in q, k and v alike, and its columns of the output projection
    assert sorted(heads) == [[i * d + hh * 8 + r for i in range(3) for r in range(8)] for hh in range(h)]
    for unit, idx in units.items():
        if idx in heads:
            hh = idx[0] // 8
            assert members(g, cg, unit, out, 1) == list(range(hh * 8, hh * 8 + 8))
    original = copy.deepcopy(m)
    res = prunec.compile(m, (x,), passes="prune-channels{ratio=0.5,packed-heads=true}", in_place=False)
    assert res.graph.consts[w].shape[0] < 3 * d
    with torch.no_grad():
        assert max_rel_error(res(x), masked_copy(original, res.plan)(x)) <= 1e-5


def test_a_stack_axis_that_is_not_only_indexed_is_not_a_packed_projection():
    class Summed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 24)

        def forward(self, x):
            return self.a(x).reshape(1, 3, 2, 4).sum(1)

    from prunec.head_views import stacked_views
    g = prunec.trace(Summed().eval(), (torch.randn(1, 8),))
    assert stacked_views(g) == {}


@pytest.mark.parametrize("seed", range(6))
def test_connected_components_matches_scipy(seed):
    """The numpy labelling equals scipy's csgraph (same numbering: by smallest element) on
    random graphs, long chains (many hook rounds) and graphs without edges."""
    import scipy.sparse as sp  # a test dependency (through scikit-learn), no longer prunec's
    from scipy.sparse.csgraph import connected_components as reference
    from prunec.dependency import connected_components
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    if seed == 0:
        a = b = np.zeros(0, dtype=np.int64)
    elif seed == 1:  # one long chain in shuffled order
        perm = rng.permutation(n)
        a, b = perm[:-1], perm[1:]
    else:
        e = int(rng.integers(0, 2 * n))
        a, b = rng.integers(0, n, e), rng.integers(0, n, e)
    k, labels = connected_components(n, a, b)
    adj = sp.coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    rk, rlabels = reference(adj, directed=False)
    assert k == rk
    assert np.array_equal(labels, rlabels)


def test_slot_graph_components_are_the_groups():
    """``ChannelGraph.slot_graph()`` (networkx, built on demand) links exactly the slots of each group."""
    import networkx as nx
    torchvision = pytest.importorskip("torchvision")
    cg = build(prunec.trace(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),)))
    comps = {tuple(sorted(c)) for c in nx.connected_components(cg.slot_graph())}
    assert cg.groups and all(tuple(g.slots) in comps for g in cg.groups)
    with_params = [c for c in comps if any(cg.slots[s][0].kind == "parameter" for s in c)]
    assert len(with_params) == len(cg.groups)


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "shufflenet_v2_x0_5", "vit_b_16"])
def test_units_are_the_components_over_every_element(name):
    """Units are found on the identity classes' smallest slots only (prunec.dependency._unit_labels);
    they must be the connected components over all elements, every identity link expanded to its
    element pairs, numbered alike; groups likewise."""
    torchvision = pytest.importorskip("torchvision")
    from prunec import dependency as D
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **({"aux_logits": False, "init_weights": False}
                                                  if name == "googlenet" else {})).eval()
    size = 224 if name == "vit_b_16" else 64
    graph = prunec.trace(model, (torch.randn(1, 3, size, size),))
    b = D._apply_rules(graph, (), False, False)
    a, c = D._pair_edges(b)
    ia, ib = np.array(b.ident_a, dtype=np.int64), np.array(b.ident_b, dtype=np.int64)
    n = b.size[ia]
    within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    a = np.concatenate([a, np.repeat(b.offset[ia], n) + within])
    c = np.concatenate([c, np.repeat(b.offset[ib], n) + within])
    want_n, want = D.connected_components(b.n, a, c)
    got_n, got, kept = D._unit_labels(b)
    assert got_n == want_n and np.array_equal(got, want)
    cg = D.build(graph)  # groups read from the kept elements only: the same as from all of them
    assert [vars(g) for g in cg.groups] == [vars(g) for g in D._groups(cg)]
    assert b.ident_a and bool(b.pairs_a) == (name != "resnet18")  # concat, shuffle, heads: other links
