"""The pass manager: runs a pipeline, verifies after each pass, collects a
report, and drives instrumentation hooks (timing, print-IR-after-change,
dump-dir) instead of printing."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from .analysis import AnalysisManager
from .cost import compute_cost
from .errors import IRError, PassFailure, PrunecError
from .ir import Graph
from .pipeline import Pipeline, parse
from .printer import print_graph
from .registry import Pass, PassResult, load_builtin_passes
from .shapes import propagate
from .verifier import verify


@dataclass
class PassRecord:
    name: str
    text: str
    changed: bool
    seconds: float
    before: dict
    after: dict
    stats: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"pass": self.name, "pipeline-item": self.text, "changed": self.changed,
                "seconds": round(self.seconds, 4), "before": self.before, "after": self.after,
                "stats": self.stats}


class Instrumentation:
    """Hooks around every pass (MLIR's PassInstrumentation)."""

    def before_pass(self, index: int, p: Pass, graph: Graph) -> None: ...

    def after_pass(self, index: int, p: Pass, graph: Graph, record: PassRecord) -> None: ...


class PrintIRAfterChange(Instrumentation):
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def after_pass(self, index, p, graph, record):
        if record.changed:
            self.stream.write(f"// -----// IR after {p.text()} //----- //\n{print_graph(graph)}")


class DumpDir(Instrumentation):
    """Writes ``00_input.txt`` and ``NN_<pass>.txt`` (the IR after each pass)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, exist_ok=True)

    def before_pass(self, index, p, graph):
        if index == 0:
            self._write("00_input.txt", print_graph(graph))

    def after_pass(self, index, p, graph, record):
        self._write(f"{index + 1:02d}_{p.name}.txt", print_graph(graph))

    def _write(self, name: str, text: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(text)


class Progress(Instrumentation):
    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr

    def before_pass(self, index, p, graph):
        self.stream.write(f"[{index + 1}/{self.total}] {p.text()} ...")
        self.stream.flush()

    def after_pass(self, index, p, graph, record):
        self.stream.write(f" {record.seconds:.2f}s{'' if record.changed else ' (no change)'}\n")


@dataclass
class PassManager:
    pipeline: Pipeline | str | list
    verify_each: bool = True
    instrumentations: list[Instrumentation] = field(default_factory=list)
    dump_dir: str | None = None
    reproducer: Callable[[Graph, str], None] | None = None  # saves a runnable reproducer

    def passes(self) -> list[Pass]:
        load_builtin_passes(plugins=False)  # the pipeline loads plugins if it names one
        if isinstance(self.pipeline, list):
            return self.pipeline
        pl = parse(self.pipeline) if isinstance(self.pipeline, str) else self.pipeline
        return pl.instantiate()

    def run(self, graph: Graph, am: AnalysisManager | None = None, context: Any = None) -> list[PassRecord]:
        passes = self.passes()
        am = am or AnalysisManager(graph)
        am.context = context
        records: list[PassRecord] = []
        done: list[str] = []
        for i, p in enumerate(passes):
            for ins in self.instrumentations:
                ins.before_pass(i, p, graph)
            before = compute_cost(graph).as_dict()
            snapshot = graph.clone() if self.dump_dir else None
            t0 = time.perf_counter()
            try:
                res = p.run(graph, am)
                if not isinstance(res, PassResult):
                    raise TypeError(f"run() returned {type(res).__name__}, expected PassResult")
                if res.changed:
                    propagate(graph)  # raises IRError where an op rejects its new operands
                if self.verify_each:
                    verify(graph, check_shapes=not res.changed)
            except PrunecError as e:
                raise self._failure(p, done, e, snapshot) from e
            except Exception as e:  # a bug in a pass: keep the traceback for --dump-dir
                raise self._failure(p, done, e, snapshot) from e
            dt = time.perf_counter() - t0
            if res.changed:  # an unchanged IR keeps every analysis valid
                am.invalidate(res.preserved)
            rec = PassRecord(p.name, p.text(), bool(res.changed), dt, before,
                             compute_cost(graph).as_dict(), dict(res.stats))
            records.append(rec)
            done.append(p.text())
            for ins in self.instrumentations:
                ins.after_pass(i, p, graph, rec)
        return records

    def _failure(self, p: Pass, done: list[str], e: Exception, snapshot: Graph | None) -> PassFailure:
        node = getattr(e, "node", None)
        where = f" at node %{node}" if node else ""
        first = str(e).splitlines()[0] if str(e) else ""
        detail = first if isinstance(e, PrunecError) else f"{type(e).__name__}: {first}"
        msg = f"pass '{p.text()}' failed{where}: {detail} (pipeline so far: '{','.join(done)}')"
        if self.dump_dir and snapshot is not None:
            os.makedirs(self.dump_dir, exist_ok=True)
            base = os.path.join(self.dump_dir, "reproducer")
            with open(base + ".txt", "w") as f:
                f.write(print_graph(snapshot))
            info = {"failed-pass": p.text(), "pipeline-so-far": ",".join(done),
                    "error": str(e), "traceback": traceback.format_exception(e)}
            if self.reproducer is not None:
                try:
                    self.reproducer(snapshot, base + ".pt2")
                    info["rerun"] = f"prunec compile {base}.pt2 --passes '{p.text()}' -o OUT"
                except Exception as ex:  # the reproducer itself is best effort
                    info["reproducer-error"] = str(ex)
            with open(base + ".json", "w") as f:
                json.dump(info, f, indent=2)
            msg += f"; reproducer saved in {self.dump_dir}"
        err = PassFailure(msg)
        err.node = node
        return err
