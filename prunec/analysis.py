"""Analyses and the analysis manager (after LLVM's): computed lazily, cached,
and dropped after every pass unless the pass declares them preserved."""
from __future__ import annotations

from typing import Any

from .ir import Graph


class Analysis:
    """Subclass and implement ``run``.  ``name`` shows up in reports."""

    name = "analysis"

    @classmethod
    def run(cls, graph: Graph, am: "AnalysisManager") -> Any:
        raise NotImplementedError


class AnalysisManager:
    def __init__(self, graph: Graph):
        self.graph = graph
        self._cache: dict[type, Any] = {}
        self.computed: dict[str, int] = {}  # how often each analysis ran (for tests and reports)

    def get(self, analysis: type[Analysis]) -> Any:
        if analysis not in self._cache:
            self._cache[analysis] = analysis.run(self.graph, self)
            self.computed[analysis.name] = self.computed.get(analysis.name, 0) + 1
        return self._cache[analysis]

    def cached(self, analysis: type[Analysis]) -> bool:
        return analysis in self._cache

    def invalidate(self, preserved: "set[type] | str" = frozenset()) -> None:
        if preserved == "all":
            return
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}

    def rebind(self, graph: Graph) -> None:
        self.graph = graph
        self._cache.clear()


class Users(Analysis):
    """Value -> the nodes that read it."""

    name = "users"

    @classmethod
    def run(cls, graph, am):
        return graph.users()
