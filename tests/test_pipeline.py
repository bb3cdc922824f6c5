"""Textual pipelines: parse/print round trip, errors pointing at the column, presets."""
from __future__ import annotations

import pytest

import prunec
from prunec.errors import PipelineError
from prunec.pipeline import parse
from prunec.registry import PASSES, Option, Pass, PassResult, register_pass, register_pipeline


@pytest.fixture(autouse=True)
def _registry(registry_snapshot):
    @register_pass("test-opts", summary="A pass with every option type.", options={
        "ratio": Option(float, 0.5, "fraction", minimum=0.0, maximum=1.0),
        "count": Option(int, 3, "how many", minimum=1),
        "flag": Option(bool, False, "a switch"),
        "mode": Option(str, "l1", "criterion", choices=("l1", "l2")),
        "names": Option(list, [], "layer names"),
        "per": Option("float-map", 0.0, "global or per-pattern"),
    })
    def test_opts(graph, am, **kw):
        return PassResult(False)
    yield


@pytest.mark.parametrize("text", [
    "",
    "dce",
    "fold-bn,canonicalize,dce",
    "test-opts{ratio=0.25}",
    "test-opts{ratio=0.25,count=7,flag=true,mode=l2}",
    "test-opts{names=[layer1.0.conv1,fc]},dce",
    "test-opts{per=[layer1.*:0.3,fc:0.1]}",
    "test-opts{names=[]}",
    "fold-bn,test-opts{count=2},dce,test-opts{flag=false}",
])
def test_parse_print_round_trip(text):
    assert str(parse(text)) == text
    parse(text).instantiate()


def test_option_order_is_kept():
    assert str(parse("test-opts{mode=l2,ratio=0.1}")) == "test-opts{mode=l2,ratio=0.1}"


@pytest.mark.parametrize("text,expected", [
    ("test-opts{ratio=0.25}", "test-opts{ratio=0.25}"),
    ("test-opts{ratio=.5}", "test-opts{ratio=0.5}"),
    ("test-opts{count=7,flag=yes}", "test-opts{count=7,flag=true}"),
    ("test-opts{names=[a, b]}", "test-opts{names=[a,b]}"),
    ("test-opts{per=[fc:1]}", "test-opts{per=[fc:1.0]}"),
    ("test-opts{per=0.2}", "test-opts{per=0.2}"),
    ("test-opts", "test-opts"),
    ("dce", "dce"),
])
def test_instantiated_pass_text(text, expected):
    (p,) = parse(text).instantiate()
    assert p.text() == expected
    # the canonical text parses back to the same pass
    (q,) = parse(p.text()).instantiate()
    assert q.text() == expected


def test_pass_attributes_typed():
    (p,) = parse("test-opts{ratio=0.25,count=7,flag=true,names=[a,b],per=[x.*:0.5]}").instantiate()
    assert p.ratio == 0.25 and isinstance(p.ratio, float)
    assert p.count == 7 and isinstance(p.count, int)
    assert p.flag is True and p.mode == "l1"
    assert p.names == ["a", "b"] and p.per == {"x.*": 0.5}


@pytest.mark.parametrize("text,col,what", [
    ("fold-bn,,dce", 9, "expected a pass name"),
    ("fold-bn,", 9, "expected a pass name"),
    ("Fold-bn", 1, "expected a pass name"),
    ("dce fold-bn", 4, "expected ',' or '{' after 'dce'"),
    ("test-opts{ratio}", 16, "expected '=' after option 'ratio'"),
    ("test-opts{ratio=0.5", 20, "unterminated option list"),
    ("test-opts{names=[a,b}", 22, "unterminated option list"),
    ("test-opts{=1}", 11, "expected an option name"),
    ("test-opts{ratio=}", 17, "option 'ratio' has no value"),
    ("test-opts{ratio=1,ratio=2}", 19, "option 'ratio' given twice"),
    ("dce,no-such-pass", 5, "unknown pass 'no-such-pass'"),
    ("dce,test-opts{bogus=1}", 5, "pass 'test-opts' has no option 'bogus'"),
    ("dce,test-opts{ratio=2}", 5, "pass 'test-opts': option 'ratio=2': must be <= 1.0"),
])
def test_malformed_pipelines_point_at_column(text, col, what):
    with pytest.raises(PipelineError) as e:
        parse(text).instantiate()
    msg = str(e.value)
    assert what in msg
    assert f"at column {col}: " in msg, msg
    assert msg.endswith(f"{text[:col - 1]}>>>{text[col - 1:]}")
    assert e.value.col == col - 1
    assert "\n" not in msg


def test_unknown_pass_lists_registered():
    with pytest.raises(PipelineError, match=r"unknown pass 'nope' \(registered: .*canonicalize, dce, fold-bn"):
        parse("nope").instantiate()


def test_preset_expands_and_prints_as_written():
    register_pipeline("test-cleanup", "canonicalize,dce", "cleanup")
    register_pipeline("test-outer", "fold-bn,test-cleanup,test-opts{count=2}", "nested")
    pl = parse("test-outer,dce")
    assert str(pl) == "test-outer,dce"
    assert [p.text() for p in pl.instantiate()] == ["fold-bn", "canonicalize", "dce", "test-opts{count=2}", "dce"]


def test_preset_rejects_options_and_self_recursion():
    register_pipeline("test-cleanup", "canonicalize,dce", "cleanup")
    with pytest.raises(PipelineError, match=r"preset pipeline 'test-cleanup' takes no options at column 5"):
        parse("dce,test-cleanup{x=1}").instantiate()
    register_pipeline("test-loop", "dce,test-loop", "loops")
    with pytest.raises(PipelineError, match=r"preset pipeline 'test-loop' expands into itself"):
        parse("test-loop").instantiate()


def test_preset_runs_through_compile(tiny):
    register_pipeline("test-fold-clean", "fold-bn,canonicalize,dce", "fold and clean")
    model, x = tiny
    res = prunec.compile(model, (x,), passes="test-fold-clean")
    assert [p["pass"] for p in res.report["passes"]] == ["fold-bn", "canonicalize", "dce"]
    assert res.report["pipeline"] == "test-fold-clean"
    assert "_native_batch_norm_legit_no_training" not in {n.op for n in res.graph.nodes}
