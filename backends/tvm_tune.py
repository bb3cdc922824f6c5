"""MetaSchedule tuning with a reusable database.

``apply_tuning(mod, target, trials, db_dir)`` extracts the kernels of the
(legalized, fused) Relax module, tunes those the database has no record for
(``trials`` in all, one builder and one runner worker so a shared machine stays
usable), then applies the best records.  Kernels without a record keep the
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


def _worker_init() -> None:
    import prunec.backends.tvm_tune as t
    t._register_build()


def _progress(done: int, total: int, name: str, t0: float, enabled: bool) -> None:
    if not enabled:
        return
    width = 30
    fill = int(width * done / max(total, 1))
    sys.stderr.write(f"\rtuning [{'#' * fill}{'.' * (width - fill)}] {done}/{total} kernels "
                     f"{time.perf_counter() - t0:5.0f}s {name[:40]:<40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


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
        per_task = max(1, trials // len(todo))
        builder = ms.builder.LocalBuilder(max_workers=1, f_build=_BUILD_FUNC, initializer=_worker_init) \
            if os.environ.get("PRUNEC_MS_FAST_BUILD", "1") == "1" else ms.builder.LocalBuilder(max_workers=1)
        runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1))
        t0 = time.perf_counter()
        for i, task in enumerate(todo):
            _progress(i, len(todo), task.task_name, t0, progress)
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                extracted_tasks=[task], work_dir=db_dir, space="post-order-apply", strategy="evolutionary")
            ms.tune.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=db_dir, max_trials_global=per_task,
                               num_trials_per_iter=min(per_task, 16), builder=builder, runner=runner,
                               database=db, cost_model="random", task_scheduler="round-robin")
            info["trials"] += per_task
            info["tuned_now"] += 1
        _progress(len(todo), len(todo), "done", t0, progress)
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
