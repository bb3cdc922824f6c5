"""The pass registry: names, typed options, defaults, rejected values, user passes."""
from __future__ import annotations

import re

import pytest
import torch

import prunec
from prunec.errors import PipelineError
from prunec.registry import (PASSES, PIPELINES, Option, Pass, PassResult, load_builtin_passes,
                             register_pass, register_pipeline)

KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@pytest.fixture(autouse=True)
def _snap(registry_snapshot):
    yield


def test_builtin_passes_registered():
    load_builtin_passes()
    assert {"dce", "canonicalize", "fold-bn"} <= set(PASSES)
    for name, cls in PASSES.items():
        assert KEBAB.match(name), name
        assert cls.name == name and issubclass(cls, Pass)
        assert cls.summary and "\n" not in cls.summary, name
        for key, opt in cls.options.items():
            assert KEBAB.match(key), f"{name}: option {key}"
            assert isinstance(opt, Option) and opt.help
            assert isinstance(opt.format(opt.default), str) and opt.type_name()
    for name in PIPELINES:
        assert KEBAB.match(name), name


@pytest.mark.parametrize("bad", ["FoldBn", "fold_bn", "fold--bn", "-x", "1x", "x-", ""])
def test_non_kebab_names_rejected(bad):
    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(bad)
    with pytest.raises(ValueError, match="kebab-case"):
        register_pipeline(bad, "dce", "x")


def _opts_pass():
    @register_pass("test-typed", options={
        "ratio": Option(float, 0.5, "fraction", minimum=0.0, maximum=1.0),
        "count": Option(int, 3, "how many", minimum=1),
        "flag": Option(bool, False, "a switch"),
        "mode": Option(str, "l1", "criterion", choices=("l1", "l2")),
        "round-to": Option(int, 1, "rounding"),
    })
    class TypedPass(Pass):
        """Typed options for tests.

        Second line of the doc is not the summary."""

        def run(self, graph, am):
            return PassResult(False, {"seen": (self.ratio, self.count, self.flag, self.mode, self.round_to)})

    return TypedPass


def test_defaults_and_typed_values():
    cls = _opts_pass()
    assert cls.summary == "Typed options for tests."
    p = cls()
    assert (p.ratio, p.count, p.flag, p.mode, p.round_to) == (0.5, 3, False, "l1", 1)
    assert p.text() == "test-typed"  # defaults are not printed
    p = cls(ratio="0.25", count="4", flag="on", mode="l2", round_to="8")
    assert (p.ratio, p.count, p.flag, p.mode, p.round_to) == (0.25, 4, True, "l2", 8)
    assert p.text() == "test-typed{ratio=0.25,count=4,flag=true,mode=l2,round-to=8}"
    # Python values (not text) are accepted and checked too
    p = cls(ratio=0.75, **{"round-to": 2})
    assert p.ratio == 0.75 and p.round_to == 2 and p.text() == "test-typed{ratio=0.75,round-to=2}"


@pytest.mark.parametrize("opts,why", [
    ({"ratio": "abc"}, "option 'ratio=abc'"),
    ({"ratio": "1.5"}, "option 'ratio=1.5': must be <= 1.0"),
    ({"ratio": -0.1}, "option 'ratio=-0.1': must be >= 0.0"),
    ({"count": "2.5"}, "option 'count=2.5'"),
    ({"count": "0"}, "option 'count=0': must be >= 1"),
    ({"flag": "maybe"}, "option 'flag=maybe': expected true or false"),
    ({"mode": "l3"}, "option 'mode=l3': expected one of l1, l2"),
    ({"nope": "1"}, "has no option 'nope'; options: ratio, count, flag, mode, round-to"),
])
def test_bad_option_values_rejected(opts, why):
    cls = _opts_pass()
    with pytest.raises(PipelineError) as e:
        cls(**opts)
    assert "pass 'test-typed'" in str(e.value)
    assert why in str(e.value)


def test_bad_option_in_pipeline_names_pass_option_and_column():
    _opts_pass()
    with pytest.raises(PipelineError) as e:
        prunec.parse_pipeline("dce,test-typed{mode=l9}").instantiate()
    msg = str(e.value)
    assert "pass 'test-typed': option 'mode=l9': expected one of l1, l2" in msg
    assert "at column 5" in msg


def test_float_map_option():
    opt = Option("float-map", 0.0, "x", minimum=0, maximum=1)
    assert opt.parse("0.3") == 0.3
    assert opt.parse("[layer1.*:0.3,fc:0.1]") == {"layer1.*": 0.3, "fc": 0.1}
    assert opt.format({"a": 0.5}) == "[a:0.5]"
    with pytest.raises(ValueError, match="pattern:value"):
        opt.parse("[fc]")
    with pytest.raises(ValueError, match="must be <= 1"):
        opt.parse("[fc:2]")
    with pytest.raises(ValueError, match="bracketed"):
        Option(list, [], "x").parse("a,b")


def test_duplicate_registration_rejected():
    _opts_pass()
    with pytest.raises(ValueError, match="already registered"):
        @register_pass("test-typed")
        def other(graph, am):
            return PassResult(False)


def test_function_pass_gets_options_and_runs_through_compile(tiny):
    calls = []

    @register_pass("test-scale-fc", summary="Scale the classifier.", options={
        "factor": Option(float, 2.0, "multiplier")})
    def scale_fc(graph, am, factor):
        calls.append(factor)
        graph.set_tensor("fc.weight", graph.tensors["fc.weight"] * factor)
        graph.set_tensor("fc.bias", graph.tensors["fc.bias"] * factor)
        return PassResult(True, {"scaled": 2})

    cls = PASSES["test-scale-fc"]
    assert cls.summary == "Scale the classifier." and cls.__name__ == "TestScaleFcPass"
    model, x = tiny
    with torch.no_grad():
        ref = model(x)
    res = prunec.compile(model, (x,), passes="test-scale-fc{factor=3.0}")
    assert calls == [3.0]
    assert res.report["passes"][0]["stats"] == {"scaled": 2}
    with torch.no_grad():
        torch.testing.assert_close(res(x), ref * 3)
        torch.testing.assert_close(res.program.module()(x), ref * 3)
        torch.testing.assert_close(res.module(x), ref * 3)
    # and from Python without text: a pass instance list
    from prunec.passmanager import PassManager
    g = prunec.trace(model, (x,))
    PassManager([cls(factor=0.5)]).run(g)
    assert calls == [3.0, 0.5]


def test_pass_returning_wrong_type_is_reported(tiny):
    @register_pass("test-bad-return")
    def bad(graph, am):
        return True

    with pytest.raises(prunec.PassFailure, match=r"pass 'test-bad-return' failed: TypeError: run\(\) returned bool"):
        prunec.compile(tiny[0], (tiny[1],), passes="test-bad-return")


def test_plugins_load_when_a_pipeline_names_a_pass_prunec_lacks(monkeypatch):
    """Installed packages' passes (entry points) are read only when a pipeline needs them: a
    pipeline of built-in passes never pays for scanning the installed distributions."""
    from prunec import registry
    from prunec.pipeline import parse
    calls = []

    def fake_entry_points():
        calls.append(1)

        @register_pass("from-a-plugin", summary="a pass an installed package provides")
        class FromPlugin(Pass):
            def run(self, graph, am, ctx):
                return PassResult(changed=False)

    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_load_entry_points", fake_entry_points)
    load_builtin_passes(plugins=False)
    assert [p.name for p in parse("dce,fold-bn").instantiate()] == ["dce", "fold-bn"]
    assert calls == []
    assert [p.name for p in parse("dce,from-a-plugin").instantiate()] == ["dce", "from-a-plugin"]
    assert calls == [1]
    with pytest.raises(PipelineError, match="unknown pass 'no-such-pass'"):
        parse("no-such-pass").instantiate()
    assert calls == [1]  # read once per process
