"""Frontend: every model spec, example inputs, FQN parameter names, errors."""
from __future__ import annotations

import pytest
import torch

import prunec
from prunec.errors import UsageError
from prunec.frontend import load_model, make_inputs, parse_input_shape


def test_nn_module(tiny):
    model, x = tiny
    loaded = load_model(model)
    assert loaded.module is model and loaded.program is None and loaded.example_inputs is None
    assert loaded.source == "TinyConvNet"
    with pytest.raises(UsageError, match=r"TinyConvNet: no example inputs; give --input-shape"):
        prunec.compile(model)


def test_pt2_uses_its_example_inputs(tiny, tmp_path):
    model, x = tiny
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    loaded = load_model(str(path))
    assert loaded.module is None and loaded.program is not None
    assert [t.shape for t in loaded.example_inputs] == [x.shape]
    res = prunec.compile(path)  # PathLike too; no inputs given: the program's own
    assert res.example_inputs[0].shape == x.shape and res.module is None
    with torch.no_grad():
        assert torch.equal(res(x), model(x))
        assert torch.equal(res.program.module()(x), model(x))


def test_exported_program_object(tiny):
    model, x = tiny
    ep = torch.export.export(model, (x,))
    loaded = load_model(ep)
    assert loaded.program is ep and loaded.example_inputs[0].shape == x.shape


def test_pickled_pt_needs_trust(tiny, tmp_path):
    model, x = tiny
    path = tmp_path / "m.pt"
    torch.save(model, str(path))
    with pytest.raises(UsageError) as e:
        load_model(str(path))
    assert "pass --trust-pickle if you trust it, or save a .pt2 with torch.export.save" in str(e.value)
    assert str(path) in str(e.value)
    loaded = load_model(str(path), trust_pickle=True)
    assert isinstance(loaded.module, type(model))
    res = prunec.compile(str(path), (x,), trust_pickle=True)
    with torch.no_grad():
        assert torch.equal(res(x), model(x))


def test_pickled_state_dict_is_rejected(tiny, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(tiny[0].state_dict(), str(path))
    with pytest.raises(UsageError, match=r"holds a OrderedDict, not a whole pickled nn.Module.*package.module:factory"):
        load_model(str(path), trust_pickle=True)


def test_not_a_model_files(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_text("not a program")
    with pytest.raises(UsageError, match=r"junk.pt2: not a torch.export program"):
        load_model(str(junk))
    junk_pt = tmp_path / "junk.pt"
    junk_pt.write_text("not a pickle")
    with pytest.raises(UsageError, match=r"junk.pt: not a torch file"):
        load_model(str(junk_pt), trust_pickle=True)
    with pytest.raises(UsageError, match=r"missing.pt2: no such file"):
        load_model(str(tmp_path / "missing.pt2"))
    with pytest.raises(UsageError, match=r"missing.pt: no such file"):
        load_model(str(tmp_path / "missing.pt"))


def test_torchvision_spec():
    pytest.importorskip("torchvision")
    loaded = load_model("torchvision:squeezenet1_1")
    assert type(loaded.module).__name__ == "SqueezeNet" and loaded.source == "torchvision:squeezenet1_1"
    with pytest.raises(UsageError, match=r"'torchvision:no_such_net': torchvision has no model named 'no_such_net'"):
        load_model("torchvision:no_such_net")


def test_torchvision_default_inputs_compile():
    pytest.importorskip("torchvision")
    res = prunec.compile("torchvision:squeezenet1_1")
    assert res.example_inputs[0].shape == (1, 3, 224, 224)
    assert res.graph.outputs[0].shape == (1, 1000)


def test_timm_spec():
    pytest.importorskip("timm")
    loaded = load_model("timm:resnet18")
    assert type(loaded.module).__name__ == "ResNet"
    with pytest.raises(UsageError, match=r"'timm:no_such_net': timm has no model named 'no_such_net'"):
        load_model("timm:no_such_net")


def test_timm_compile_uses_pretrained_cfg_size():
    pytest.importorskip("timm")
    res = prunec.compile("timm:resnet10t", passes="fold-bn")
    cfg = res.module.pretrained_cfg
    assert tuple(res.example_inputs[0].shape) == (1, *cfg["input_size"])
    assert res.module is not None


def test_factory_spec(tests_on_path):
    loaded = load_model("zoo_factories.models:small_mlp")
    assert isinstance(loaded.module, torch.nn.Sequential)
    x = torch.randn(2, 8)
    res = prunec.compile("zoo_factories.models:small_mlp", (x,))
    with torch.no_grad():
        assert torch.equal(res(x), loaded.module(x))
    # a module instance (not a callable factory) is taken as is
    assert isinstance(load_model("zoo_factories.models:INSTANCE").module, torch.nn.Linear)


def test_factory_errors(tests_on_path):
    with pytest.raises(UsageError, match=r"cannot import module 'zoo_factories.nope'"):
        load_model("zoo_factories.nope:f")
    with pytest.raises(UsageError, match=r"module 'zoo_factories.models' has no attribute 'nope'"):
        load_model("zoo_factories.models:nope")
    with pytest.raises(UsageError, match=r"the factory returned int, not an nn.Module"):
        load_model("zoo_factories.models:not_a_module")
    with pytest.raises(UsageError, match=r"'resnet': not a model spec"):
        load_model("resnet")
    with pytest.raises(UsageError, match=r"cannot load a model from int"):
        load_model(3)


def test_parameter_names_are_fqns():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.proj(x))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x * self.scale

    net = Net().eval()
    g = prunec.trace(net, (torch.randn(1, 4),))
    assert set(g.consts) == set(dict(net.named_parameters())) | {"scale"}
    assert g.consts["blocks.1.norm.weight"].kind == "parameter" and g.consts["scale"].kind == "buffer"
    assert g.tensors["blocks.0.proj.weight"] is net.blocks[0].proj.weight.data or \
        torch.equal(g.tensors["blocks.0.proj.weight"], net.blocks[0].proj.weight)


@pytest.mark.parametrize("text,shape,dtype", [
    ("1,3,224,224", (1, 3, 224, 224), torch.float32),
    ("2,128:int64", (2, 128), torch.int64),
    (" 4 , 5 :f16", (4, 5), torch.float16),
    ("1,7:bool", (1, 7), torch.bool),
])
def test_parse_input_shape(text, shape, dtype):
    assert parse_input_shape(text) == (shape, dtype)


@pytest.mark.parametrize("text,msg", [
    ("1,x,3", "expected comma-separated integers"),
    ("", "every dimension must be a positive integer"),
    ("1,0", "every dimension must be a positive integer"),
    ("1,3:complex", "unknown dtype 'complex'"),
])
def test_bad_input_shape(text, msg):
    with pytest.raises(UsageError, match=msg):
        parse_input_shape(text)


def test_make_inputs_deterministic_and_typed():
    a, b = make_inputs(["2,3", "2,5:int64"])
    a2, _ = make_inputs(["2,3", "2,5:int64"])
    assert torch.equal(a, a2) and a.dtype == torch.float32
    assert b.dtype == torch.int64 and b.min() >= 0


def test_input_shape_that_does_not_fit(tiny):
    with pytest.raises(UsageError, match=r"TinyConvNet cannot be traced with inputs of shape \[1, 5, 8, 8\]: "
                                         r".*; check --input-shape"):
        prunec.compile(tiny[0], input_shapes=["1,5,8,8"])


class _InPlace(torch.nn.Module):
    """In-place ops as models write them: two on one tensor, and one through a
    full-width slice (exported as ``alias``, as timm's GhostNet does)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 1)
        self.b = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = self.b(x)
        y.add_(z)
        y.mul_(2.0)       # second in-place op on the same tensor; y is read below
        out = torch.cat([y, z], 1)[:, :8]  # full width: an alias of the concatenation
        out += torch.cat([z, y], 1)
        return out.relu_().sum(1, keepdim=True) + y


def test_inplace_ops_are_functionalized_without_decomposition(monkeypatch):
    from prunec import frontend
    torch.manual_seed(0)
    model, x = _InPlace().eval(), torch.randn(1, 3, 5, 5)
    ep = frontend.export_module(model, (x,))
    assert frontend._functionalize_inplace(ep.graph)  # the fast path, no run_decompositions
    assert not any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
                   for n in ep.graph.nodes)
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda *a, **k: pytest.fail("took the slow path"))
    res = prunec.compile(model, (x,), passes="")
    with torch.no_grad():
        assert torch.equal(res(x), model(x))


def test_inplace_write_to_a_base_read_later_takes_the_general_path():
    from prunec import frontend

    class M(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            v = y[:, :]          # alias of y
            v.add_(1.0)          # writes y too
            return y * 3         # reads the base after the write

    x = torch.randn(2, 3)
    ep = frontend.export_module(M(), (x,))
    assert not frontend._functionalize_inplace(ep.graph)
    res = prunec.compile(M(), (x,), passes="")
    assert torch.equal(res(x), M()(x))



def test_inplace_write_to_a_chunk_takes_the_general_path():
    """A part of ``chunk`` is a view: writing it writes the chunked tensor (a rewrite that
    treated the part as fresh returned the unwritten tensor; both tracers did)."""
    from prunec import frontend

    class M(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            a, b = y.chunk(2, 1)
            a.relu_()            # writes the first half of y
            return y + 1

    x = torch.randn(2, 4)
    ep = frontend.export_module(M(), (x,))
    assert not frontend._functionalize_inplace(ep.graph)
    for tracer in ("auto", "export"):
        res = prunec.compile(M(), (x,), passes="", tracer=tracer)
        assert torch.equal(res(x), M()(x))

class _SliceWrites(torch.nn.Module):
    """Writes into slices of a fresh tensor, as Swin builds its shifted-window mask."""

    def forward(self, x):
        mask = x.new_zeros((4, 6))
        cnt = 0
        for h in (slice(0, 2), slice(2, 4)):
            for w in (slice(0, 3), slice(3, 6)):
                mask[h, w] = cnt          # fill_ through slice(slice(mask))
                cnt += 1
        mask[:, 1:5] += x[0, :, 1:5]     # add_ through one slice, reading the earlier writes
        return x + mask, mask.sum()


def test_writes_through_slices_are_functionalized(monkeypatch):
    from prunec import frontend
    x = torch.randn(2, 4, 6)
    ep = frontend.export_module(_SliceWrites(), (x,))
    assert frontend._functionalize_inplace(ep.graph)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.slice_scatter.default in ops
    assert not any(isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable for t in ops)
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda *a, **k: pytest.fail("took the slow path"))
    res = prunec.compile(_SliceWrites(), (x,), passes="")
    for got, want in zip(res(x), _SliceWrites()(x)):
        assert torch.equal(got, want)


def test_a_view_kept_across_a_slice_write_takes_the_general_path():
    from prunec import frontend

    class M(torch.nn.Module):
        def forward(self, x):
            buf = x * 1.0
            row = buf[0]          # a view taken before the write ...
            buf[:, 0:2] = 0.0
            return row * 2        # ... and read after it: sees the write

    x = torch.randn(3, 4)
    ep = frontend.export_module(M(), (x,))
    assert not frontend._functionalize_inplace(ep.graph)
    res = prunec.compile(M(), (x,), passes="")
    assert torch.equal(res(x), M()(x))


def test_shift_tokens_right_pattern_is_functionalized(monkeypatch):
    """BART's shift_tokens_right: a slice write, a select write, then an in-place op on the
    whole tensor that reads both."""
    from prunec import frontend

    class Shift(torch.nn.Module):
        def forward(self, x):
            y = x.new_zeros(x.shape)
            y[:, 1:] = x[:, :-1].clone()
            y[:, 0] = 7.0
            y.masked_fill_(y == 0.5, -1.0)
            return y * 2

    x = torch.tensor([[0.5, 1.0, 2.0], [3.0, 0.5, 4.0]])
    ep = frontend.export_module(Shift(), (x,))
    assert frontend._functionalize_inplace(ep.graph)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.select_scatter.default in ops and torch.ops.aten.slice_scatter.default in ops
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda *a, **k: pytest.fail("took the slow path"))
    res = prunec.compile(Shift(), (x,), passes="")
    assert torch.equal(res(x), Shift()(x))
