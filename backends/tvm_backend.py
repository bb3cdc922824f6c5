"""TVM backend: build the compacted graph into a deployable library.

``build(graph, inputs, target)`` lowers the IR to Relax (tvm_lower), applies
prunec's Relax passes (sparse layers), legalizes and fuses, schedules every
kernel (tvm_schedule: dlight + prunec's CPU rules, or MetaSchedule records when
tuned, tvm_tune) and compiles.  The returned :class:`TVMArtifact` saves
``model.so`` and ``meta.json``; ``tvm_runner.load`` runs them.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch
import tvm
from tvm import relax

from prunec.errors import UsageError

from . import tvm_balance, tvm_lower, tvm_schedule

FORMAT_VERSION = 1


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


@dataclass
class TVMArtifact:
    executable: "relax.vm_build.Executable"
    target: tvm.target.Target
    target_text: str
    inputs: list[dict]
    outputs: list[dict]
    sparse_report: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)
    fast_math: bool = True

    def meta(self, pipeline: str = "") -> dict:
        import prunec
        return {
            "format": "prunec-tvm", "format_version": FORMAT_VERSION,
            "target": self.target_text, "target_json": _target_dict(self.target),
            "device": "cuda" if self.target.kind.name == "cuda" else "cpu",
            "cpu_features": tvm_lower.cpu_features(self.target),
            "inputs": self.inputs, "outputs": self.outputs, "pipeline": pipeline,
            "prunec_version": prunec.__version__, "tvm_version": tvm.__version__,
            "sparse_layers": self.sparse_report, "build_seconds": self.timings, "tuning": self.tuning,
            "fast_math": self.fast_math and self.target.kind.name == "llvm",
        }

    def save(self, outdir: str, result=None) -> None:
        self.executable.export_library(os.path.join(outdir, "model.so"))
        pipeline = result.report.get("pipeline", "") if result is not None else ""
        with open(os.path.join(outdir, "meta.json"), "w") as f:
            json.dump(self.meta(pipeline), f, indent=1)
        if result is not None:  # the report carries the per-layer sparse choice too
            result.report["tvm"] = {"target": self.target_text, "sparse_layers": self.sparse_report,
                                    "build_seconds": self.timings, "tuning": self.tuning}
            report = os.path.join(outdir, "report.json")
            if os.path.exists(report):  # the CLI wrote it before the library: refresh it
                with open(report, "w") as f:
                    json.dump(result.report, f, indent=2, default=str)

    def load(self):
        """The built module, runnable in this process (no save needed)."""
        from .tvm_runner import TVMModel
        return TVMModel(self.executable, self.meta())


def _plain(obj):
    """TVM containers (Map, Array, String, IntImm) as JSON-able Python values."""
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "Array":
        return [_plain(v) for v in obj]
    if hasattr(obj, "value"):
        return obj.value
    return str(obj)


def _target_dict(target: tvm.target.Target) -> dict:
    try:
        return _plain(target.export())
    except Exception:  # noqa: BLE001
        return {"kind": target.kind.name}


def _io_specs(graph, inputs) -> tuple[list[dict], list[dict]]:
    from prunec.ir import interpret
    names = graph.input_names or [v.name for v in graph.inputs]
    ins = [{"name": n, "shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for n, v in zip(names, graph.inputs)]
    outs = [{"name": v.name, "shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for v in graph.outputs]
    return ins, outs


def _weight_names(graph) -> dict:
    from .tvm_sparse import weight_key
    out = {}
    for name, t in graph.tensors.items():
        if t.dim() in (2, 4) and t.is_floating_point() and t.numel() > 0:
            w = t.detach().numpy()
            out[weight_key(w)] = name
            if t.dim() == 2:
                out[weight_key(w)] = name
    return out


def lower(graph, inputs, target: tvm.target.Target, sparse: dict | None = None,
          program=None, fast_math: bool = True) -> tuple[tvm.IRModule, list[dict]]:
    """The Relax module after prunec's passes, legalization and fusion (not yet scheduled)."""
    from prunec.backends.torch_backend import export_program
    if program is None:
        program = export_program(graph, inputs)
    mod = tvm_lower.import_program(program)
    sparse = dict(sparse or {})
    sparse.setdefault("names", _weight_names(graph))
    passes = tvm_lower.prunec_relax_passes(target, sparse, fast_math)
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
        mod = tvm.transform.Sequential(tvm_lower.legalize_and_fuse())(mod)
    report = []
    for p in passes:
        report += getattr(p, "report", [])
    return mod, report


def _default_db_has_records(target) -> bool:
    from .tvm_tune import default_db_dir
    path = os.path.join(default_db_dir(target), "database_tuning_record.json")
    return os.path.isfile(path) and os.path.getsize(path) > 0


def build(graph, inputs, target="llvm", *, tune_trials: int = 0, tuning_db: str | bool | None = None,
          parsed_target=None, sparse: dict | None = None, program=None, progress: bool = True,
          fast_math: bool = True) -> TVMArtifact:
    """Build ``graph`` for ``target`` (text, TargetSpec or tvm Target).

    ``tuning_db``: a MetaSchedule database directory; None uses the default one
    (``tvm_tune.default_db_dir``) when an earlier tuning run left records there;
    False ignores every database.  ``tune_trials`` > 0 tunes what it lacks.  ``fast_math``: CPU
    exp / erf / tanh (GELU, sigmoid, SiLU, softmax) as polynomials within ~3e-7 of exact."""
    from prunec.target import parse_target
    if isinstance(target, tvm.target.Target):
        tgt, text = target, json.dumps(_target_dict(target))
    else:
        spec = parsed_target or parse_target(target)
        if spec.kind not in ("llvm", "cuda"):
            raise UsageError(f"target {spec}: the TVM backend builds for llvm or cuda")
        tgt, text = tvm_lower.to_target(spec), str(spec)
    times = {}
    t0 = time.perf_counter()
    mod, sparse_report = lower(graph, inputs, tgt, sparse, program, fast_math)
    times["lower"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    tuning = {}
    if tune_trials > 0 or tuning_db or (tuning_db is None and _default_db_has_records(tgt)):
        # a plain compile picks up what an earlier --tune-trials run left in the default database
        from . import tvm_tune
        mod, tuning = tvm_tune.apply_tuning(mod, tgt, tune_trials, tuning_db or None, progress=progress)
    with tgt:
        mod = tvm_schedule.schedule_module(mod, tgt)
    times["schedule"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    ex = tvm.compile(mod, tgt, relax_pipeline=tvm_lower.finalize_pipeline(tgt),
                     tir_pipeline=tvm_balance.register() if tgt.kind.name == "llvm" else "default")
    times["codegen"] = round(time.perf_counter() - t0, 2)
    ins, outs = _io_specs(graph, inputs)
    return TVMArtifact(ex, tgt, text, ins, outs, sparse_report, times, tuning, fast_math)
