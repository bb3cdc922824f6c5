"""The compile driver: load, trace, run the pipeline, lower to a backend."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .analysis import AnalysisManager
from .cost import compute_cost
from .gc_pause import gc_paused
from .errors import UsageError
from .frontend import LoadedModel, load_model, make_inputs, trace
from .ir import Graph, interpret
from .passmanager import Instrumentation, PassManager, PassRecord

TARGETS = ("torch", "llvm", "cuda")


@dataclass
class CompileContext:
    """What passes may need beyond the IR: example (calibration) inputs and the user module."""

    example_inputs: tuple
    module: torch.nn.Module | None


@dataclass
class CompileResult:
    graph: Graph
    module: torch.nn.Module | None
    _program: Any
    report: dict
    plan: dict | None
    example_inputs: tuple
    module_problems: list[str] = field(default_factory=list)
    artifact: Any = None  # backend-specific (e.g. the TVM build)

    @property
    def program(self) -> torch.export.ExportedProgram:
        """The compacted model as a ``torch.export`` program (exported on first use)."""
        if self._program is None:
            from prunec.backends import torch_backend
            self._program = torch_backend.export_program(self.graph, self.example_inputs)
        return self._program

    def __call__(self, *inputs):
        from .ir import unflatten_outputs
        return unflatten_outputs(self.graph, interpret(self.graph, inputs))


def default_inputs(loaded: LoadedModel, spec: Any) -> tuple | None:
    if loaded.example_inputs:
        return loaded.example_inputs
    if isinstance(spec, str) and spec.startswith("torchvision:"):
        return make_inputs(["1,3,224,224"])
    if isinstance(spec, str) and spec.startswith("timm:") and loaded.module is not None:
        cfg = getattr(loaded.module, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (3, 224, 224))
        return make_inputs([",".join(map(str, (1, *size)))])
    return None


def prepare(model: Any, example_inputs: Sequence | None = None, input_shapes: Sequence[str] = (),
            trust_pickle: bool = False) -> tuple[LoadedModel, tuple]:
    loaded = load_model(model, trust_pickle=trust_pickle)
    if example_inputs is not None:
        inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    elif input_shapes:
        inputs = make_inputs(input_shapes)
    else:
        inputs = default_inputs(loaded, model)
    if inputs is None:
        raise UsageError(f"{loaded.source}: no example inputs; give --input-shape (e.g. 1,3,224,224) "
                         f"or example_inputs=")
    return loaded, inputs


def compile(model: Any, example_inputs: Sequence | None = None, passes: str = "", target: str | dict = "torch", *,
            input_shapes: Sequence[str] = (), trust_pickle: bool = False, verify_each: bool = True,
            instrumentations: Sequence[Instrumentation] = (), dump_dir: str | None = None,
            in_place: bool = True, target_options: dict | None = None, tracer: str = "auto") -> CompileResult:
    """Compile ``model`` through the pipeline ``passes`` for ``target``.

    ``.module`` is the user's module updated in place (None if that is impossible;
    ``.module_problems`` says why), ``.program`` the ``torch.export`` program,
    ``.report`` the per-pass report, ``.plan`` the pruning plan (if any).  ``tracer``: see
    ``prunec.trace``."""
    target = _target_text(target)  # raises a clear error for unknown targets
    loaded, inputs = prepare(model, example_inputs, input_shapes, trust_pickle)
    graph = trace(loaded.module if loaded.module is not None else loaded.program, inputs, tracer=tracer)
    return compile_graph(graph, inputs, passes, target, module=loaded.module if in_place else None,
                         source=loaded.source, verify_each=verify_each, instrumentations=instrumentations,
                         dump_dir=dump_dir, target_options=target_options)


def _target_text(target) -> str:
    """``target`` (text, dict or TargetSpec) as the text the report and backends carry."""
    if isinstance(target, str) and target in TARGETS:
        return target
    from .target import parse_target
    return str(parse_target(target))


def compile_graph(graph: Graph, inputs: tuple, passes: str = "", target: str | dict = "torch", *,
                  module: torch.nn.Module | None = None, source: str = "graph", verify_each: bool = True,
                  instrumentations: Sequence[Instrumentation] = (), dump_dir: str | None = None,
                  target_options: dict | None = None) -> CompileResult:
    from prunec.backends import torch_backend
    from .artifact import layer_sizes, layers_report
    target = _target_text(target)
    before = compute_cost(graph)
    before_layers = layer_sizes(graph)
    insts = list(instrumentations)
    if dump_dir:
        from .passmanager import DumpDir
        insts.append(DumpDir(dump_dir))
    pm = PassManager(passes, verify_each=verify_each, instrumentations=insts, dump_dir=dump_dir,
                     reproducer=lambda g, path: torch.export.save(torch_backend.export_program(g, inputs), path))
    am = AnalysisManager(graph)
    problems: list[str] = []
    out_module = None
    config_fields: tuple = ({}, [])
    with gc_paused():  # see prunec/gc_pause.py; not around the TVM build below
        records = pm.run(graph, am, CompileContext(inputs, module))
        after = compute_cost(graph)
        if module is not None:
            upd = torch_backend.apply_to_module(module, graph, inputs)
            problems = upd.problems
            out_module = module if upd.ok else None
            config_fields = (upd.config_rewritten, upd.config_not_rewritten)
    program = None  # exported lazily by CompileResult.program
    plan = am.plan_tracker.plan() if getattr(am, "plan_tracker", None) else None
    report = make_report(source, passes, target, before, after, records, problems, graph.tracer)
    # Hugging Face ``model.config`` of the in-place module: fields rewritten ({field: [old, new]}) and
    # "field: why" lines for fields (or parameter shapes) the config could not be made to express
    report["hf-config"] = {"rewritten": config_fields[0], "not-rewritten": config_fields[1]}
    report["layers"] = layers_report(before_layers, layer_sizes(graph))  # stored bytes per layer
    result = CompileResult(graph, out_module, program, report, plan, inputs, problems)
    if target in ("llvm", "cuda") or (target not in TARGETS):
        from prunec.backends import tvm_backend
        result.artifact = tvm_backend.build(graph, inputs, target, **(target_options or {}))
    return result


def make_report(source, passes, target, before, after, records: list[PassRecord], problems, tracer: str = "") -> dict:
    def ratio(a, b):
        return round(a / b, 4) if b else None
    return {
        "model": source, "pipeline": str(passes), "target": target, "tracer": tracer,
        "before": before.as_dict(), "after": after.as_dict(),
        "ratios": {"params": ratio(before.params, after.params), "flops": ratio(before.flops, after.flops),
                   "bytes": ratio(before.bytes, after.bytes)},
        "passes": [r.as_dict() for r in records],
        "module-update": {"ok": not problems, "problems": problems},
        "per-layer-bytes": after.per_param_bytes,
    }


# ---- writing an output directory atomically ------------------------------------------

def prepare_outdir(path: str, force: bool) -> str:
    """Check ``path`` and return a temporary sibling to write into; ``commit_outdir`` renames it."""
    if os.path.exists(path) and not force:
        raise UsageError(f"{path}: output directory exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"{path}: parent directory {parent} does not exist")
    return tempfile.mkdtemp(prefix=".prunec-", dir=parent)


def commit_outdir(tmp: str, path: str) -> None:
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=".prunec-old-", dir=os.path.dirname(os.path.abspath(path)))
        os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def write_torch_outputs(result: CompileResult, outdir: str) -> None:
    torch.export.save(result.program, os.path.join(outdir, "model.pt2"))
    with open(os.path.join(outdir, "report.json"), "w") as f:
        json.dump(result.report, f, indent=2, default=str)
