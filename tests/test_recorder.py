"""The fast tracer (prunec.recorder): its IR must be torch.export's, and where one real
forward pass cannot stand for the program it must hand over to torch.export.

The oracle is ``trace(..., tracer="export")``: the printed IR (names, ops, arguments,
types, constants), the module stacks and the output structure must be identical."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import prunec
from prunec.errors import UsageError
from prunec.frontend import trace
from prunec.printer import print_graph

torchvision = pytest.importorskip("torchvision")


def assert_same_as_export(model, inputs):
    rec = trace(model, inputs)
    assert rec.tracer == "recorder"
    exp = trace(model, inputs, tracer="export")
    assert exp.tracer == "torch.export"
    assert print_graph(rec) == print_graph(exp)
    assert [n.meta["stack"] for n in rec.nodes] == [n.meta["stack"] for n in exp.nodes]
    assert rec.out_spec == exp.out_spec
    assert rec.input_names == exp.input_names
    return rec


class Kitchen(nn.Module):
    """In-place ops, a multi-output split, concat, a constant made in forward, a plain
    tensor attribute, a shared module called twice, a pytree output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.scale = torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1)  # neither parameter nor buffer
        self.fc = nn.Linear(8, 5)

    def forward(self, x, y):
        h = self.act(self.bn(self.conv(x)))
        a, b = h.split(4, dim=1)
        h = torch.cat([b, a], 1) * self.scale
        h.add_(torch.tensor(1.0))
        h = self.act(h) + y
        z = self.fc(h.mean((2, 3)))
        return {"logits": z, "pair": (h, z.sigmoid())}


@pytest.mark.parametrize("make", [
    lambda: (torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),)),
    lambda: (torchvision.models.mobilenet_v3_small(), (torch.randn(1, 3, 64, 64),)),
    lambda: (torchvision.models.shufflenet_v2_x0_5(), (torch.randn(1, 3, 64, 64),)),
    lambda: (Kitchen(), (torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8))),
], ids=["resnet18", "mobilenet_v3_small", "shufflenet_v2", "kitchen"])
def test_recorded_ir_is_exports(make):
    torch.manual_seed(0)
    model, inputs = make()
    assert_same_as_export(model.eval(), inputs)


def test_recorded_graph_runs_like_the_model():
    torch.manual_seed(0)
    model = Kitchen().eval()
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8)
    g = trace(model, (x, y))
    x2, y2 = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8)  # other data, same shapes
    from prunec.ir import interpret
    got = interpret(g, (x2, y2))
    want = torch.utils._pytree.tree_leaves(model(x2, y2))
    assert len(got) == len(want) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_multihead_attention_under_no_grad_records_the_unfused_program():
    """Under no_grad, eager nn.MultiheadAttention takes a fused kernel that torch.export does not
    record; the recorder traces with grad on, as export does."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0).eval()
    with torch.no_grad():
        g = assert_same_as_export(layer, (torch.randn(1, 5, 16),))
    assert not any("native_multi_head" in str(n.target) for n in g.nodes)


class Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


class ReadsValues(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        n = x.shape[1]
        k = int(x.abs().argmax().tolist()) if self.how == "tolist" else int(x.abs().argmax().numpy())
        return x[:, : (k % n) + 1] * 2


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


class Nonzero(nn.Module):
    def forward(self, x):
        return x[x > 0].sum().reshape(1) + x.sum()



class SliceWrites(nn.Module):
    """Writes into slices of a fresh tensor (Swin's shifted-window mask), then a plain in-place op."""

    def forward(self, x):
        mask = x.new_zeros((4, 6))
        mask[0:2, 0:3] = 1.0
        mask[:, 1:5] += x[0, :, 1:5]
        return (x + mask).relu_()


class ViewThenWrite(nn.Module):
    def forward(self, x):
        y = x * 2
        flat = y.view(-1)  # a view taken before the write ...
        y.relu_()
        return flat + 1    # ... and read after it: sees the write


def test_writes_through_slices_take_the_fx_path_and_match_export():
    """The recorder builds the IR straight from the ops; writes through slices need frontend's
    functionalization, on an fx graph of the same recording: still export's program."""
    g = assert_same_as_export(SliceWrites(), (torch.randn(2, 4, 6),))
    assert not any(n.target._schema.is_mutable for n in g.nodes)


def test_a_write_to_a_viewed_tensor_is_not_rewritten_locally():
    x = torch.randn(2, 3)
    g = trace(ViewThenWrite(), (x,))
    assert "declined" in g.tracer and "in-place" in g.tracer
    from prunec.ir import interpret
    assert torch.equal(interpret(g, (x,))[0], ViewThenWrite()(x))

def test_a_branch_on_tensor_values_is_not_baked_in():
    """One run would take one branch; the recorder declines and torch.export reports the
    data-dependent branch as a one-line usage error, as it did before the recorder."""
    with pytest.raises(UsageError, match="cannot be traced"):
        trace(Branchy(), (torch.ones(1, 4),))


@pytest.mark.parametrize("how", ["tolist", "numpy"])
def test_values_read_in_python_are_not_baked_in(how):
    with pytest.raises(UsageError, match="cannot be traced"):
        trace(ReadsValues(how), (torch.randn(1, 6),))


def test_data_dependent_shapes_hand_over_to_export():
    """Boolean indexing: the recorder declines; torch.export traces it with a symbolic size, which
    prunec's static-shape IR refuses by name."""
    with pytest.raises(UsageError, match=r"node index \(index\): its output shape \[u0\] depends on tensor values"):
        trace(Nonzero(), (torch.randn(2, 3),))


def test_a_written_buffer_hands_over_to_export():
    g = trace(Counter(), (torch.randn(2, 4),))
    assert "declined" in g.tracer and "buffer" in g.tracer


def test_an_error_in_forward_is_torch_exports_error():
    class Bad(nn.Module):
        def forward(self, x):
            return x @ torch.ones(3, 3)  # wrong inner size for the example input
    with pytest.raises(UsageError, match=r"Bad cannot be traced with inputs of shape \[2, 4\]"):
        trace(Bad(), (torch.randn(2, 4),))


def test_unknown_tracer_is_a_usage_error():
    with pytest.raises(UsageError, match="tracer='fx'"):
        trace(Kitchen(), (torch.randn(1, 3, 4, 4), torch.randn(1, 8, 4, 4)), tracer="fx")


def test_report_names_the_tracer():
    torch.manual_seed(0)
    r = prunec.compile(torchvision.models.resnet18(), (torch.randn(1, 3, 32, 32),), "prune-channels{ratio=0.5}")
    assert r.report["tracer"] == "recorder"
    r = prunec.compile(Counter(), (torch.randn(2, 4),), "")
    assert r.report["tracer"].startswith("torch.export (the recorder declined")


def test_hugging_face_program_is_equivalent():
    """Hugging Face code takes other paths when exported (it builds an all-true attention mask
    that eager skips), so the programs differ in text; they must compute the same thing on
    other inputs of the same shape."""
    from prune_cases import hf_model
    from prunec.ir import interpret
    model, inputs = hf_model("bert")
    rec = trace(model, tuple(inputs))
    exp = trace(model, tuple(inputs), tracer="export")
    assert rec.tracer == "recorder"
    other = tuple(torch.randint_like(t, 0, 50) for t in inputs)
    la, lb = interpret(rec, other), interpret(exp, other)
    assert len(la) == len(lb) and all(torch.allclose(u, v, atol=1e-6) for u, v in zip(la, lb))
    assert not torch.allclose(la[0], interpret(rec, inputs)[0])  # the inputs mattered
    assert sorted(rec.consts) == sorted(exp.consts)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.c = self.a  # one module under two names
        self.register_buffer("buf", torch.ones(4))
        self.register_buffer("buf2", self.buf)

    def forward(self, x):
        return self.b(self.a(x)) + self.c(x) + self.buf2


def test_tied_parameters_and_shared_modules():
    """Every name of a tied tensor is a constant and ops read the last one, as in torch.export.
    A module reached under two names is named by its first (torch.export names it by the
    attribute the call went through); both name the same module object."""
    model, x = Tied().eval(), torch.randn(2, 4)
    rec, exp = trace(model, (x,)), trace(model, (x,), tracer="export")
    assert rec.tracer == "recorder"
    assert print_graph(rec) == print_graph(exp)
    assert "c.weight" in rec.consts and "buf2" in rec.consts
    mods = dict(model.named_modules(remove_duplicate=False))
    for r, e in zip(rec.nodes, exp.nodes):
        inner = lambda n: list(n.meta["stack"].values())[-1][0]  # noqa: E731
        assert mods[inner(r)] is mods[inner(e)]


def test_a_kept_recording_past_the_memory_bound_hands_over_to_export(monkeypatch):
    """The fx path's recording (writes through slices) keeps every intermediate tensor
    (torch.export keeps none): past the bound, torch.export traces, and the program is the same."""
    from prunec import recorder
    x = torch.randn(2, 4, 6)
    monkeypatch.setattr(recorder, "MAX_RECORDED_BYTES", 256)
    g = trace(SliceWrites(), (x,))
    assert g.tracer.startswith("torch.export (the recorder declined: the forward pass holds more than")
    assert print_graph(g) == print_graph(trace(SliceWrites(), (x,), tracer="export"))


class Frees(nn.Module):
    """Notes whether an intermediate tensor is still alive after the forward pass dropped it."""

    def forward(self, x):
        y = x * 2
        ref = weakref.ref(y)
        z = y + 1
        del y
        self.alive = ref() is not None
        return z * 3


def test_the_recording_frees_intermediates_as_eager_code_does(monkeypatch):
    """The IR is built while the model runs: nothing keeps a tensor the model dropped (a recording
    kept for a build afterwards held them all), and ids the allocator reuses do not confuse it."""
    from prunec import recorder
    monkeypatch.setattr(recorder, "MAX_RECORDED_BYTES", 256)  # would trip a kept recording
    m, x = Frees(), torch.randn(4, 64)
    g = trace(m, (x,))
    assert g.tracer == "recorder" and m.alive is False
    assert print_graph(g) == print_graph(trace(m, (x,), tracer="export"))
    from prunec.ir import interpret
    assert torch.equal(interpret(g, (x,))[0], m(x))
