"""The analysis manager: lazy, cached, invalidated after a changing pass unless preserved."""
from __future__ import annotations

import pytest

import prunec
from prunec.analysis import Analysis, AnalysisManager, Users
from prunec.passmanager import PassManager
from prunec.registry import Pass, PassResult


class Counting(Analysis):
    name = "counting"
    runs = 0

    @classmethod
    def run(cls, graph, am):
        cls.runs += 1
        return len(graph.nodes)


class Other(Analysis):
    name = "other"

    @classmethod
    def run(cls, graph, am):
        return am.get(Counting) * 10  # an analysis may use another one


class Query(Pass):
    name = "test-query"

    def run(self, graph, am):
        am.get(Counting)
        am.get(Counting)
        return PassResult(False)


class Change(Pass):
    name = "test-change"

    def __init__(self, preserved=frozenset()):
        super().__init__()
        self._preserved = preserved

    def run(self, graph, am):
        return PassResult(True, preserved=self._preserved)


class NoChange(Pass):
    name = "test-nochange"

    def run(self, graph, am):
        return PassResult(False)


@pytest.fixture
def graph(tiny):
    Counting.runs = 0
    return prunec.trace(tiny[0], (tiny[1],))


def test_lazy_and_cached(graph):
    am = AnalysisManager(graph)
    assert Counting.runs == 0 and not am.cached(Counting)
    assert am.get(Counting) == 5 and am.get(Counting) == 5
    assert Counting.runs == 1 and am.cached(Counting) and am.computed == {"counting": 1}
    assert am.get(Other) == 50 and Counting.runs == 1


def test_invalidate_keeps_preserved(graph):
    am = AnalysisManager(graph)
    am.get(Counting), am.get(Users)
    am.invalidate({Users})
    assert am.cached(Users) and not am.cached(Counting)
    am.invalidate("all")
    assert am.cached(Users)
    am.invalidate()
    assert not am.cached(Users)
    am.get(Counting)
    assert Counting.runs == 2


def test_rebind_clears(graph):
    am = AnalysisManager(graph)
    am.get(Counting)
    am.rebind(graph.clone())
    assert not am.cached(Counting)


def _run(graph, passes):
    am = AnalysisManager(graph)
    PassManager(passes).run(graph, am)
    return am


def test_unchanged_pass_keeps_cache(graph):
    _run(graph, [Query(), NoChange(), Query()])
    assert Counting.runs == 1


def test_changing_pass_invalidates(graph):
    am = _run(graph, [Query(), Change(), Query()])
    assert Counting.runs == 2 and am.computed["counting"] == 2


def test_changing_pass_preserving_keeps(graph):
    _run(graph, [Query(), Change(preserved={Counting}), Query()])
    assert Counting.runs == 1
    _run(graph, [Query(), Change(preserved="all"), Query()])
    assert Counting.runs == 2  # one per fresh manager


def test_builtin_dce_invalidates(graph):
    # dce removes the unused num_batches_tracked buffer: a change
    am = _run(graph, [Query(), prunec.registry.PASSES["dce"](), Query()])
    assert Counting.runs == 2 and am.computed["counting"] == 2
