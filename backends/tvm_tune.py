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
import os
import sys
import time

import tvm
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
        ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted_tasks=todo, work_dir=db_dir, space="post-order-apply", strategy=strategy)
        budget = max(trials, len(todo))
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _progress_callback(budget, progress)]
        t0 = time.perf_counter()
        ms.tune.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=db_dir, max_trials_global=budget,
                           num_trials_per_iter=max(1, min(64, budget // len(todo))), builder=builder,
                           runner=runner, database=db, cost_model=cost_model, measure_callbacks=callbacks,
                           task_scheduler="gradient")
        if progress:
            sys.stderr.write("\n")
        info.update(trials=budget, tuned_now=len(todo), tune_s=round(time.perf_counter() - t0, 1),
                    search=f"{strategy}/{cost_model}")
    before = {gv.name_hint: f for gv, f in mod.functions_items()}
    with target, db:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    applied = 0
    for gv, f in list(mod.functions_items()):
        if isinstance(f, tvm.tirx.PrimFunc) and not f.same_as(before.get(gv.name_hint)):
            mod[gv] = f.with_attr("tirx.is_scheduled", True)
            applied += 1
    info["applied"] = applied
    return mod, info
