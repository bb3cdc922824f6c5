"""MetaSchedule tuning with a reusable database.

``apply_tuning(mod, target, trials, db_dir)`` extracts the kernels of the
(legalized, fused) Relax module, tunes those the database has no record for
(``trials`` in all, in one MetaSchedule run so the builder and runner worker
processes start once), then applies the best records.  Kernels without a record keep the
default schedules.  The database is a MetaSchedule JSON database in
``db_dir`` (default ``$XDG_CACHE_HOME/prunec/tvm-tuning/<target>``); a later
compile of the same workloads, with or without ``--tune-trials``, reuses it
and takes seconds.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time

import tvm
import tvm_ffi
from tvm import relax

_BUILD_FUNC = "prunec.meta_schedule.build"


def default_db_dir(target: tvm.target.Target) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha1(str(target).encode()).hexdigest()[:12]
    return os.path.join(base, "prunec", "tvm-tuning", f"{target.kind.name}-{key}")


def _register_build() -> None:
    """A builder that skips ``import tvm.s_tir.tensor_intrin`` (~30 s per worker)."""
    if tvm.get_global_func(_BUILD_FUNC, True) is not None:
        return

    def _build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    tvm.register_global_func(_BUILD_FUNC, _build, override=True)


def _import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule's TuneContext does) in seconds.

    Its ~250 TVMScript kernels each call ``inspect.stack()``, which resolves the source
    module of every frame on the stack by scanning ``sys.modules``; with torch loaded
    that made the import take minutes.  TVMScript reads only the frames, their locals
    and the code line of the first few, so a stack without source lookups serves it.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    import inspect
    import linecache
    real = inspect.stack

    def stack(context: int = 1):
        frames, f = [], sys._getframe(1)
        while f is not None:
            line = linecache.getline(f.f_code.co_filename, f.f_lineno) if len(frames) < 4 else ""
            frames.append(inspect.FrameInfo(f, f.f_code.co_filename, f.f_lineno, f.f_code.co_name,
                                            [line] if line else None, 0 if line else None))
            f = f.f_back
        return frames

    inspect.stack = stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = real


def _search() -> tuple[str, str]:
    """(strategy, cost model).  With XGBoost installed (``pip install xgboost``) the evolutionary
    search is guided by a learned cost model; without it, evolution would rank candidates at random
    after seconds of sampling per round, so plain trace replay finds as good schedules faster."""
    try:
        import xgboost  # noqa: F401
        return "evolutionary", "xgb"
    except ImportError:
        return "replay-trace", "random"


def _worker_init() -> None:
    import prunec.backends.tvm_tune as t
    t._register_build()


def _progress_callback(total: int, enabled: bool):
    """A MetaSchedule measure callback that draws a progress bar on stderr."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.done = 0
            self.t0 = time.perf_counter()

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.done += len(measure_candidates)
            if not enabled:
                return
            width = 30
            fill = int(width * min(self.done, total) / max(total, 1))
            sys.stderr.write(f"\rtuning [{'#' * fill}{'.' * (width - fill)}] {self.done}/{total} trials "
                             f"{time.perf_counter() - self.t0:5.0f}s")
            sys.stderr.flush()

    return _Progress()


def apply_tuning(mod: tvm.IRModule, target: tvm.target.Target, trials: int, db_dir: str | None,
                 progress: bool = True) -> tuple[tvm.IRModule, dict]:
    from tvm.s_tir import meta_schedule as ms
    db_dir = db_dir or default_db_dir(target)
    os.makedirs(db_dir, exist_ok=True)
    db = ms.database.JSONDatabase(path_workload=os.path.join(db_dir, "database_workload.json"),
                                  path_tuning_record=os.path.join(db_dir, "database_tuning_record.json"))
    tasks = ms.relax_integration.extract_tasks(mod, target)
    todo = [t for t in tasks if not db.has_workload(t.dispatched[0])]
    info = {"db": db_dir, "kernels": len(tasks), "tuned_now": 0, "from_db": len(tasks) - len(todo),
            "trials": 0}
    if trials > 0 and todo:
        _register_build()
        # One tune_tasks call for every kernel: the builder and runner worker processes start once
        # (each start imports TVM), and the task scheduler spends trials where they pay.
        workers = max(1, min(4, os.cpu_count() or 1))  # builds run in parallel; the runner times alone
        builder = ms.builder.LocalBuilder(max_workers=workers, f_build=_BUILD_FUNC, initializer=_worker_init) \
            if os.environ.get("PRUNEC_MS_FAST_BUILD", "1") == "1" else ms.builder.LocalBuilder(max_workers=workers)
        runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1))
        strategy, cost_model = _search()
        _import_tensor_intrinsics()
        budget = max(trials, len(todo))
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _progress_callback(budget, progress)]
        t0 = time.perf_counter()
        # MetaSchedule copies its logger's level to a stdout handler when it creates its loggers (in
        # extracted_tasks_to_tune_contexts): keep tables and per-trial lines out of the user's output
        # (they still go to <db>/logs/*.log) unless logging was configured.
        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        quiet = ms_logger.level == logging.NOTSET
        if quiet:
            ms_logger.setLevel(logging.ERROR)
        try:
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                extracted_tasks=todo, work_dir=db_dir, space="post-order-apply", strategy=strategy)
            ms.tune.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=db_dir, max_trials_global=budget,
                               num_trials_per_iter=max(1, min(64, budget // len(todo))), builder=builder,
                               runner=runner, database=db, cost_model=cost_model, measure_callbacks=callbacks,
                               task_scheduler="gradient")
        finally:
            if quiet:  # MetaSchedule's logging config set it to DEBUG: back to "not configured"
                ms_logger.setLevel(logging.NOTSET)
        if progress:
            sys.stderr.write("\n")
        info.update(trials=budget, tuned_now=len(todo), tune_s=round(time.perf_counter() - t0, 1),
                    search=f"{strategy}/{cost_model}")
    before = {gv.name_hint: f for gv, f in mod.functions_items()}
    with target, db:
        tuned = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    applied = [gv for gv, f in tuned.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and not f.same_as(before.get(gv.name_hint))]
    keep = _keep_tuned(mod, tuned, applied, target, db_dir)
    for gv in applied:
        if keep[gv.name_hint]:
            mod[gv] = tuned[gv].with_attr("tirx.is_scheduled", True)
    info["applied"] = sum(keep.values())
    info["kept_default"] = len(applied) - info["applied"]
    return mod, info


# ---- tuned or default, per kernel ----------------------------------------------------------

def _keep_tuned(mod, tuned, applied, target, db_dir) -> dict[str, bool]:
    """Per tuned kernel: is the tuned schedule faster than prunec's default one on this machine?

    A small trial budget can leave MetaSchedule's best record slower than the hand-written
    default schedules, so tuning must never make a build slower: both are timed here, and the
    verdict is cached in ``<db>/prunec_schedule_choice.json`` by kernel (structural hash), so a
    repeat compile does not time again.  Without a device to time on (CUDA without a GPU) the
    tuned schedule is kept.
    """
    import json

    from . import tvm_schedule
    if not applied:
        return {}
    dev = tvm.cpu(0) if target.kind.name == "llvm" else tvm.cuda(0)
    if not dev.exist:
        return {gv.name_hint: True for gv in applied}
    path = os.path.join(db_dir, "prunec_schedule_choice.json")
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    defaults = tvm_schedule.schedule_module(tvm.IRModule({gv: mod[gv] for gv in applied}), target)
    out, timed = {}, False
    for gv in applied:
        key = str(tvm_ffi.structural_hash(mod[gv]))
        if key not in cache:
            t_tuned, t_default = _time_kernel(tuned[gv], target, dev), _time_kernel(defaults[gv], target, dev)
            cache[key] = {"kernel": gv.name_hint, "tuned_ms": t_tuned, "default_ms": t_default}
            timed = True
        c = cache[key]
        out[gv.name_hint] = c["tuned_ms"] is not None and (c["default_ms"] is None or c["tuned_ms"] <= c["default_ms"])
    if timed:  # a repeat compile finds every verdict cached and writes nothing
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    return out


def _time_kernel(func, target, dev) -> float | None:
    """Milliseconds per call of one PrimFunc on zero-filled (always in-bounds) inputs; None if it
    cannot be built or its shapes are dynamic."""
    import numpy as np

    from .tvm_sparse import time_func
    try:
        # TVM 0.27: buffer parameters carry their shape and dtype themselves
        args = [np.zeros([int(d) for d in buf.shape], str(buf.dtype)) for buf in func.params]
        return time_func(func, target, args, dev) * 1e3
    except Exception:  # noqa: BLE001 - an unbuildable candidate (or a dynamic shape) just loses
        return None
