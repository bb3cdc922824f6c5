"""Structured-pruning coverage: prunec vs Torch-Pruning on the same models.

Every (model, tool) pair runs in a fresh subprocess, so wall time and peak
memory are independent of what ran before.  Both tools prune channels at the
same ratio from the same randomly initialised model (seed 0) and the same
example input (1x3x224x224; 299 for inception_v3; timm: its pretrained_cfg
input_size); the final classifier is left alone.

* prunec: ``prunec.compile(model, (x,), passes="prune-channels{ratio=R}")``, run as its two
  steps (``prunec.trace`` then ``compile_graph``) so that the table also shows the tracing
  time (the recorder, or ``torch.export`` where it declines, and the conversion to prunec's IR)
  in parentheses; a trace by ``torch.export`` is marked "E".
* Torch-Pruning: ``tp.pruner.MagnitudePruner(model, x,
  importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=R,
  ignored_layers=[classifier])`` then ``pruner.step()``.

Success means the pruning call returned and the pruned model (prunec: the
compiled IR, Torch-Pruning: the module) runs on the example input with the
original output shape.  Params and FLOPs after pruning are computed the same
way for both tools: the pruned model is traced with ``prunec.trace`` and
costed with ``prunec.cost.compute_cost`` (parameters; FLOPs = 2 x MACs of
conv/linear/matmul/attention).  Wall time is the pruning call alone (prunec:
trace + pipeline + module update; Torch-Pruning: pruner construction, i.e. the
dependency graph, + ``step()``), without imports (Torch-Pruning's package, and the
prunec modules a call would import on first use), model construction and
checks, and after a ``gc.collect()`` (the collection that imports and model
construction leave pending would otherwise land in whichever call crosses the
collector's threshold first).  Peak memory is the child's peak RSS (``ru_maxrss``) taken right
after the pruning call (it includes Python, torch, the model and one dense
forward pass, identical for both tools); the parent also records the whole
child's ``ru_maxrss`` via ``os.wait4`` (= ``getrusage(RUSAGE_CHILDREN)`` of a
fresh parent) in the JSONL log.  For prunec the child then runs the exactness
oracle: ``prune-channels{ratio=R,exact=true}`` on a copy of the model with
randomised norm statistics, compared against ``prunec.oracle.masked_copy``
(max relative error, as tests/prune_cases.py does).

A child that runs past ``--timeout`` counts as "timeout"; one whose RSS
exceeds ``--mem-cap-gb`` (the machine is shared) is killed and counts as
"killed: RSS > N GB".

    python benchmarks/coverage.py --models torchvision --out cov.md
    python benchmarks/coverage.py --models timm --only resnet18,vit_small_patch16_224
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

MAX_PARAMS = 100e6
TIMM_MODELS = [
    "resnet18", "resnet50",                          # ResNet
    "resnext50_32x4d",                               # ResNeXt
    "efficientnet_b0",                               # EfficientNet
    "mobilenetv3_large_100",                         # MobileNetV3
    "regnetx_016", "regnety_016",                    # RegNet
    "convnext_atto", "convnext_tiny",                # ConvNeXt
    "vit_small_patch16_224", "deit_tiny_patch16_224",  # ViT / DeiT
    "swin_tiny_patch4_window7_224",                  # Swin
    "cspresnet50", "cspdarknet53",                   # CSPNet
    "densenet121",                                   # DenseNet
    "ghostnet_100",                                  # GhostNet
    "repvgg_a0",                                     # RepVGG
    "inception_v3", "inception_v4",                  # Inception
]
TOOLS = ("prunec", "torch-pruning")
MARK = "@@RESULT "


# ---- model lists ---------------------------------------------------------------------

def torchvision_models() -> list[str]:
    """Every torchvision classification model with at most 100M parameters (counted on
    the meta device, so nothing is allocated)."""
    import torch
    import torchvision
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):
                m = torchvision.models.get_model(name)
        except Exception:  # an init that cannot run on meta: build it for real
            m = torchvision.models.get_model(name)
        if sum(p.numel() for p in m.parameters()) <= MAX_PARAMS:
            out.append(name)
    return out


# ---- the worker (one model, one tool, in a fresh process) ---------------------------

def build(suite: str, name: str):
    import torch
    from torch import nn
    torch.manual_seed(0)
    if suite == "torchvision":
        import torchvision
        model = torchvision.models.get_model(name)
        size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
        classifier = [m for m in model.modules()
                      if (isinstance(m, nn.Linear) and m.out_features == 1000)
                      or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)]
    else:
        import timm
        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        classifier = [model.get_classifier()]
    model.eval()
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    return model, x, classifier


def _maxrss_bytes(who=resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # KiB on Linux


def _shape(out):
    from prunec.oracle import tensors
    return [tuple(t.shape) for t in tensors(out)]


def _cost_of(module, x):
    import prunec
    from prunec.cost import compute_cost
    c = compute_cost(prunec.trace(module, (x,)))
    return c.params, c.flops


def worker(tool: str, suite: str, name: str, ratio: float, time_only: bool = False) -> dict:
    """One tool on one model in this (fresh) process.  ``time_only``: skip what is not timed (the
    oracle, the cost of Torch-Pruning's result), for the repeats of ``--repeat``."""
    import torch
    import prunec  # noqa: F401  (imports count for both tools alike)
    res: dict = {"model": name, "suite": suite, "tool": tool}
    model, x, classifier = build(suite, name)
    res["rss_base_bytes"] = _maxrss_bytes()  # python + torch + the model
    with torch.no_grad():
        ref_shape = _shape(model(x))
    # Importing torch and building the model leave a full collection of their ~340k objects
    # pending; whichever call next crosses the collector's threshold pays it (0.3 s seen inside
    # one tool's call on efficientnet_b1). Collect now, so that neither tool's time holds it.
    gc.collect()
    if tool == "prunec":
        from prunec.driver import compile_graph
        _import_prunec()
        t0 = time.perf_counter()
        # prunec.compile(model, (x,), passes=...) in its two steps, to time the tracing apart
        graph = prunec.trace(model, (x,))
        res["trace_s"] = time.perf_counter() - t0
        res["tracer"] = graph.tracer
        result = compile_graph(graph, (x,), f"prune-channels{{ratio={ratio}}}", module=model,
                               source=type(model).__name__)
        res["time_s"] = time.perf_counter() - t0
        res["rss_bytes"] = _maxrss_bytes()
        with torch.no_grad():
            shape = _shape(result(x))
        if shape != ref_shape:
            raise RuntimeError(f"output shape {shape} != {ref_shape}")
        rep = result.report
        res.update(params_before=rep["before"]["params"], flops_before=rep["before"]["flops"],
                   params_after=rep["after"]["params"], flops_after=rep["after"]["flops"],
                   module_problems=len(result.module_problems),
                   module_problem_first=(str(result.module_problems[0]).splitlines() or [""])[0][:300]
                   if result.module_problems else "",
                   groups_inexact=rep["passes"][0]["stats"].get("groups-inexact", 0))
        res["ok"] = True
        del result, model
        if not time_only:
            res.update(oracle(suite, name, ratio))
    else:
        import torch_pruning as tp
        t0 = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=classifier)
        pruner.step()
        res["time_s"] = time.perf_counter() - t0
        res["rss_bytes"] = _maxrss_bytes()
        del pruner
        with torch.no_grad():
            shape = _shape(model(x))
        if shape != ref_shape:
            raise RuntimeError(f"output shape {shape} != {ref_shape}")
        res["ok"] = True
        if time_only:
            return res
        try:
            res["params_after"], res["flops_after"] = _cost_of(model, x)
        except Exception as e:  # the pruned module runs but prunec cannot trace it
            res["cost_error"] = f"{type(e).__name__}: {_first_line(e)}"
    return res


def _import_prunec() -> None:
    """Import the modules a pruning call imports on first use (the passes, the analyses, the torch
    backend: 10-15 ms), as Torch-Pruning is imported before its timer starts."""
    import importlib
    from prunec.registry import load_builtin_passes
    load_builtin_passes(plugins=False)
    for mod in ("recorder", "dependency", "channel_rules", "compaction", "head_views", "selection",
                "backends.torch_backend", "backends.attention_attributes", "backends.hf_config"):
        importlib.import_module(f"prunec.{mod}")


def oracle(suite: str, name: str, ratio: float) -> dict:
    """Exact variant vs the masked model, on a copy with randomised norm statistics."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from prune_cases import randomize_norms
    import prunec
    from prunec.driver import compile_graph
    from prunec.oracle import masked_copy, max_rel_error
    import torch
    try:
        model, x, _ = build(suite, name)
        randomize_norms(model)
        traced = prunec.trace(model, (x,))
        exact = compile_graph(traced.clone(), (x,), f"prune-channels{{ratio={ratio},exact=true}}", module=None)
        if not exact.plan["params"]:
            return {"oracle_err": 0.0, "exact_params_after": exact.report["after"]["params"]}
        with torch.no_grad():
            err = max_rel_error(exact(x), masked_copy(model, exact.plan)(x))
        return {"oracle_err": err, "exact_params_after": exact.report["after"]["params"]}
    except Exception as e:
        return {"oracle_error": f"{type(e).__name__}: {_first_line(e)}"}


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else "")[:300]


def worker_main(tool, suite, name, ratio, time_only=False):
    try:
        res = worker(tool, suite, name, ratio, time_only)
    except BaseException as e:  # noqa: BLE001 - report everything, one line
        res = {"model": name, "suite": suite, "tool": tool, "ok": False,
               "error": f"{type(e).__name__}: {_first_line(e)}"}
        import traceback
        traceback.print_exc()
    print(MARK + json.dumps(res), flush=True)


# ---- the parent ----------------------------------------------------------------------

def _rss_now(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_one(tool, suite, name, ratio, timeout, mem_cap, time_only=False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", tool, suite, name, "--ratio", str(ratio)]
    cmd += ["--time-only"] if time_only else []
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        status, ru, why = None, None, None
        while True:
            pid, st, r = os.wait4(p.pid, os.WNOHANG)
            if pid:
                status, ru = st, r
                break
            if time.time() - t0 > timeout:
                why = "timeout"
            elif mem_cap and _rss_now(p.pid) > mem_cap:
                why = f"killed: RSS > {mem_cap / 2**30:.0f} GB"
            if why:
                os.killpg(p.pid, signal.SIGKILL)
                _, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.25)
        p.returncode = 0  # reaped by wait4
        out.seek(0)
        text = out.read()
    res = None
    for line in text.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
    if res is None:
        tail = [l for l in text.strip().splitlines() if l.strip()]
        res = {"model": name, "suite": suite, "tool": tool, "ok": False,
               "error": why or (f"crashed (status {status}): " + (tail[-1][:300] if tail else ""))}
    res["child_maxrss_bytes"] = ru.ru_maxrss * 1024 if ru else None
    res["child_wall_s"] = round(time.time() - t0, 1)
    return res


def fmt_int(n, unit=""):
    if n is None:
        return "–"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n}{unit}"


def cell_status(r):
    if r is None:
        return "(not run)"
    if r.get("ok"):
        s = "ok"
        if r.get("module_problems"):
            s += f" (module update: {r['module_problems']} problems"
            s += f": {r['module_problem_first']})" if r.get("module_problem_first") else ")"
        if r.get("cost_error"):
            s += f" (trace for cost failed: {r['cost_error']})"
        return s.replace("|", "\\|").replace("\n", " ")
    return "FAIL: " + r.get("error", "?").replace("|", "\\|").replace("\n", " ")


def render(results: dict, models: list[tuple[str, str]], ratio: float, cap_gb: float) -> str:
    lines = []
    for suite in ("torchvision", "timm"):
        names = [n for s, n in models if s == suite]
        if not names:
            continue
        lines += [f"### {suite} (ratio {ratio})", "",
                  "| model | params before | FLOPs before | prunec | params after | FLOPs after | time s (trace) | peak RSS "
                  "| oracle (exact vs masked) | Torch-Pruning | params after | FLOPs after | time s | peak RSS |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ok = {t: 0 for t in TOOLS}
        done = {t: 0 for t in TOOLS}
        for n in names:
            pc, tpr = results.get((suite, n, "prunec")), results.get((suite, n, "torch-pruning"))
            for t, r in (("prunec", pc), ("torch-pruning", tpr)):
                if r is not None:
                    done[t] += 1
                    ok[t] += bool(r.get("ok"))

            def nums(r):
                if not r or not r.get("ok"):
                    return ["–"] * 4 if not r or "time_s" not in r else \
                        ["–", "–", f"{r['time_s']:.2f}", fmt_int(r.get("rss_bytes"), "B")]
                t = f"{r['time_s']:.2f}" + (f" ({r['trace_s']:.2f}" + (" E" if r.get("tracer", "recorder")
                                                                        != "recorder" else "") + ")"
                                            if "trace_s" in r else "")
                return [fmt_int(r.get("params_after")), fmt_int(r.get("flops_after")), t,
                        fmt_int(r.get("rss_bytes"), "B")]
            if pc and "oracle_err" in pc:
                orc = f"{pc['oracle_err']:.1e}"
            elif pc and "oracle_error" in pc:
                orc = "error: " + pc["oracle_error"].replace("|", "\\|")
            else:
                orc = "–"
            row = [n, fmt_int((pc or {}).get("params_before")), fmt_int((pc or {}).get("flops_before")),
                   cell_status(pc), *nums(pc), orc, cell_status(tpr), *nums(tpr)]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"{suite}: prunec {ok['prunec']}/{done['prunec']} succeeded, Torch-Pruning "
                  f"{ok['torch-pruning']}/{done['torch-pruning']} succeeded (of {len(names)} models).", ""]
        slower = [n for n in names if _slower(results, suite, n)]
        big = [n for n in names if (results.get((suite, n, "prunec")) or {}).get("rss_bytes", 0) > 4 * 2**30]
        lines += [f"prunec slower than Torch-Pruning (both succeeded): {', '.join(slower) or 'none'}.",
                  f"prunec above 4 GB peak RSS: {', '.join(big) or 'none'}.", ""]
    return "\n".join(lines)


def _slower(results, suite, n):
    a, b = results.get((suite, n, "prunec")), results.get((suite, n, "torch-pruning"))
    return bool(a and b and a.get("ok") and b.get("ok") and a["time_s"] > b["time_s"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", choices=("torchvision", "timm", "all"), default="all")
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per (model, tool) subprocess")
    ap.add_argument("--mem-cap-gb", type=float, default=12, help="kill a child above this RSS (0: no cap)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--out", default="coverage.md")
    ap.add_argument("--resume", action="store_true", help="keep results already in OUT.jsonl")
    ap.add_argument("--shard", default="", help="I/N: run every N-th model starting at I (for parallel runs)")
    ap.add_argument("--list-cache", default=None, help="JSON file caching the torchvision model list")
    ap.add_argument("--from-logs", default="", help="comma-separated OUT.jsonl files: only render them to --out")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each tool in N fresh processes, the tools taking turns; report the median "
                         "(this VM's single calls spread by up to 2x on sub-second models)")
    ap.add_argument("--worker", nargs=3, metavar=("TOOL", "SUITE", "NAME"), help=argparse.SUPPRESS)
    ap.add_argument("--time-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(*args.worker, args.ratio, args.time_only)
        return
    if args.repeat < 1:
        ap.error(f"--repeat {args.repeat}: give 1 or more runs per tool")
    only = [s for s in args.only.split(",") if s]
    models: list[tuple[str, str]] = []
    if args.models in ("torchvision", "all"):
        names = _torchvision_list(args.list_cache)
        models += [("torchvision", n) for n in names if not only or n in only]
    if args.models in ("timm", "all"):
        models += [("timm", n) for n in TIMM_MODELS if not only or n in only]
    if args.from_logs:  # render the runs recorded in several logs (e.g. shards) as one table
        results = {}
        for path in args.from_logs.split(","):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    results[(r["suite"], r["model"], r["tool"])] = r
        with open(args.out, "w") as f:
            f.write(render(results, models, args.ratio, args.mem_cap_gb))
        return
    if args.shard:
        i, n = map(int, args.shard.split("/"))
        models = models[i::n]
    run_models(args, models)


def _torchvision_list(cache: str | None) -> list[str]:
    if cache and os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    # in a subprocess, so this process stays small (children would inherit its RSS high-water mark)
    names = json.loads(subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                                           "import coverage as c; print(json.dumps(c.torchvision_models()))",
                                           os.path.dirname(os.path.abspath(__file__))],
                                          check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    if cache:
        with open(cache, "w") as f:
            json.dump(names, f)
    return names


def run_models(args, models):
    tools = [t for t in args.tools.split(",") if t]
    log = args.out + ".jsonl"
    results: dict = {}
    if args.resume and os.path.exists(log):
        with open(log) as f:
            for line in f:
                r = json.loads(line)
                results[(r["suite"], r["model"], r["tool"])] = r
    elif os.path.exists(log):
        os.remove(log)
    cap = int(args.mem_cap_gb * 2**30)
    timing = "" if args.repeat == 1 else (f"; times are medians of {args.repeat} fresh processes per tool, "
                                          f"the tools taking turns")
    header = (f"<!-- python benchmarks/coverage.py {' '.join(sys.argv[1:])} -->\n"
              f"{len(models)} models, tools: {', '.join(tools)}, ratio {args.ratio}, timeout {args.timeout:.0f} s, "
              f"RSS cap {args.mem_cap_gb:.0f} GB{timing}\n\n")
    for suite, name in models:
        todo = [t for t in tools if (suite, name, t) not in results]
        runs: dict = {t: [] for t in todo}
        for rep in range(args.repeat):  # the tools take turns, so that a slow spell hits both
            for tool in todo:
                if rep and not runs[tool][0].get("ok"):
                    continue  # a failure is not retimed
                runs[tool].append(run_one(tool, suite, name, args.ratio, args.timeout, cap, time_only=rep > 0))
        for tool in todo:
            r = _merge_repeats(runs[tool])
            results[(suite, name, tool)] = r
            with open(log, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{suite}/{name} {tool}: {cell_status(r)} time={r.get('time_s', '-')} "
                  f"rss={fmt_int(r.get('rss_bytes'), 'B')} oracle={r.get('oracle_err', r.get('oracle_error', '-'))}",
                  flush=True)
        with open(args.out, "w") as f:
            f.write(header + render(results, models, args.ratio, args.mem_cap_gb))


def _merge_repeats(runs: list[dict]) -> dict:
    """The first run's result (it ran the oracle), with the median time of the runs that succeeded
    (all of them listed) and the highest peak RSS."""
    r = dict(runs[0])
    ok = [x for x in runs if x.get("ok")]
    if len(runs) > 1 and ok:
        import statistics
        r["times_s"] = [round(x["time_s"], 3) for x in ok]
        r["time_s"] = statistics.median(x["time_s"] for x in ok)
        if all("trace_s" in x for x in ok):
            r["trace_s"] = statistics.median(x["trace_s"] for x in ok)
        r["rss_bytes"] = max(x.get("rss_bytes") or 0 for x in ok)
        r["repeat_failures"] = len(runs) - len(ok)
    return r


if __name__ == "__main__":
    main()
