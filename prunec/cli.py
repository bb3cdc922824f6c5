"""The ``prunec`` command line: compile, inspect, passes, run."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from .errors import PrunecError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        raise UsageError(f"{self.prog}: {message}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .pt2 file, a pickled .pt (with --trust-pickle), torchvision:NAME, "
                                 "timm:NAME or package.module:factory")
    p.add_argument("--input-shape", action="append", default=[], metavar="SHAPE[:DTYPE]",
                   help="example input shape, e.g. 1,3,224,224 or 1,128:int64 (repeat for several inputs)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled .pt module (runs its code)")
    p.add_argument("--tracer", choices=("auto", "export"), default="auto",
                   help="auto: record one forward pass, torch.export where that cannot stand for the program "
                        "(the report says which ran); export: always torch.export")
    p.add_argument("--load-passes", action="append", default=[], metavar="FILE.py",
                   help="import a Python file that registers passes with @register_pass")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="prunec", description="A pruning compiler for PyTorch models.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    c = sub.add_parser("compile", help="run a pass pipeline and emit the compacted model")
    _add_model_args(c)
    c.add_argument("--passes", default="", help="pipeline, e.g. 'fold-bn,prune-channels{ratio=0.5},dce'")
    c.add_argument("--target", default="torch", help="torch | llvm | cuda | a TVM target as a JSON dict")
    c.add_argument("--mcpu", default=None, help="CPU name for llvm targets, e.g. znver4")
    c.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    c.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    c.add_argument("--plan-out", default=None, metavar="FILE.json", help="write the pruning plan")
    c.add_argument("--no-verify-each", action="store_true", help="skip the IR verifier after each pass")
    c.add_argument("--print-ir-after-change", action="store_true", help="print the IR after every pass that changed it")
    c.add_argument("--dump-dir", default=None, help="write the IR after every pass (and a reproducer on failure)")
    c.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials (TVM targets)")
    c.add_argument("--tuning-db", default=None,
                   help="tuning database directory (TVM targets; default: the per-target cache, used when it has records)")
    c.add_argument("--no-tuning-db", action="store_true", help="ignore every tuning database (TVM targets)")
    c.add_argument("--no-fast-math", action="store_true",
                   help="exact exp/erf/tanh instead of polynomial approximations (llvm target)")
    c.add_argument("--quiet", action="store_true", help="no progress or table")

    i = sub.add_parser("inspect", help="print the IR summary: layers, params, FLOPs, channel groups")
    _add_model_args(i)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--ir", action="store_true", help="also print the full IR")
    i.add_argument("--head-dim", action="store_true",
                   help="show the channel groups of head-width pruning (prune-channels{head-dim=true})")
    i.add_argument("--packed-heads", action="store_true",
                   help="show the groups with packed q/k/v projections split into heads "
                        "(prune-channels{packed-heads=true})")

    ps = sub.add_parser("passes", help="list registered passes and preset pipelines")
    ps.add_argument("--load-passes", action="append", default=[], metavar="FILE.py",
                    help="also list the passes a Python file registers")

    r = sub.add_parser("run", help="run a compiled TVM output directory")
    r.add_argument("outdir")
    r.add_argument("--input", action="append", default=[], metavar="X.npy", required=True)
    r.add_argument("-o", "--output", default=None, metavar="Y.npy")
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return {"compile": cmd_compile, "inspect": cmd_inspect, "passes": cmd_passes, "run": cmd_run}[args.cmd](args)
    except PrunecError as e:
        print(f"prunec: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("prunec: interrupted", file=sys.stderr)
        return 130


def _load_user_passes(args) -> None:
    from .registry import load_builtin_passes, load_pass_file
    load_builtin_passes()
    for path in args.load_passes:
        load_pass_file(path)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _table(report: dict) -> str:
    b, a, r = report["before"], report["after"], report["ratios"]
    lines = [f"{'':10}{'before':>12}{'after':>12}{'ratio':>9}"]
    for key, label in (("params", "params"), ("flops", "FLOPs"), ("bytes", "stored")):
        ratio = f"{r[key]:.2f}x" if r[key] else "-"
        lines.append(f"{label:10}{_human(b[key]):>12}{_human(a[key]):>12}{ratio:>9}")
    if r["bytes"]:
        lines.append(f"compression ratio {r['bytes']:.2f}x (bytes as stored: values, indices and codebooks)")
    lines.append("")
    lines.append(f"{'pass':<40}{'time':>9}  changed")
    for p in report["passes"]:
        lines.append(f"{p['pipeline-item'][:39]:<40}{p['seconds']:>8.2f}s  {'yes' if p['changed'] else 'no'}")
    return "\n".join(lines)


def cmd_compile(args) -> int:
    from .driver import commit_outdir, compile, prepare_outdir, write_torch_outputs
    from .passmanager import PrintIRAfterChange, Progress
    from .pipeline import parse
    from .target import parse_target

    _load_user_passes(args)
    n_passes = len(parse(args.passes).instantiate())  # reject a bad pipeline before any work
    tgt = parse_target(args.target, args.mcpu)
    if args.no_tuning_db and (args.tuning_db or args.tune_trials):
        raise UsageError("--no-tuning-db: drop it, or drop --tuning-db / --tune-trials (they contradict it)")
    if args.plan_out and os.path.exists(args.plan_out) and not args.force:
        raise UsageError(f"{args.plan_out}: file exists; pass --force to replace it")
    tmp = prepare_outdir(args.output, args.force)
    try:
        insts = []
        # progress is for people watching a terminal; logs and pipes get only the result or one error line
        progress = not args.quiet and sys.stderr.isatty()
        if progress:
            insts.append(Progress(n_passes))
            print(f"tracing {args.model} ...", file=sys.stderr)
        if args.print_ir_after_change:
            insts.append(PrintIRAfterChange())
        options = {}
        if tgt.kind != "torch":
            options = {"tune_trials": args.tune_trials, "parsed_target": tgt, "fast_math": not args.no_fast_math,
                       "tuning_db": False if args.no_tuning_db else args.tuning_db}
        result = compile(args.model, passes=args.passes, target=tgt.kind if tgt.kind == "torch" else args.target,
                         input_shapes=args.input_shape, trust_pickle=args.trust_pickle,
                         verify_each=not args.no_verify_each, instrumentations=insts,
                         dump_dir=args.dump_dir, in_place=True, target_options=options, tracer=args.tracer)
        write_torch_outputs(result, tmp)
        if result.artifact is not None:
            result.artifact.save(tmp, result)
        from .artifact import save_compressed  # always: the compact, pickle-free weights
        save_compressed(result.graph, tmp, result.example_inputs)
        if args.plan_out:
            plan = result.plan or {"version": 1, "params": {}}
            ptmp = args.plan_out + ".tmp"
            with open(ptmp, "w") as f:
                json.dump(plan, f, indent=1)
            os.replace(ptmp, args.plan_out)
        commit_outdir(tmp, args.output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not args.quiet:
        print(_table(result.report))
        for p in result.module_problems:
            print(f"note: in-place module not produced: {p} (the .pt2 program is exact)", file=sys.stderr)
        print(f"wrote {args.output}")
    return 0


def cmd_inspect(args) -> int:
    from .driver import prepare
    from .frontend import trace
    from .inspect_model import summarize, format_summary
    _load_user_passes(args)
    loaded, inputs = prepare(args.model, None, args.input_shape, args.trust_pickle)
    graph = trace(loaded.module if loaded.module is not None else loaded.program, inputs, tracer=args.tracer)
    summary = summarize(graph, head_dim=args.head_dim, packed_heads=args.packed_heads)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(format_summary(summary))
        if args.ir:
            from .printer import print_graph
            print(print_graph(graph))
    return 0


def cmd_passes(args) -> int:
    from .registry import PASSES, PIPELINES
    _load_user_passes(args)
    print("passes:")
    for name in sorted(PASSES):
        cls = PASSES[name]
        print(f"  {name:<18} {cls.summary}")
        for key, opt in cls.options.items():
            extra = f" one of {'|'.join(map(str, opt.choices))}" if opt.choices else ""
            print(f"      {key}={opt.format(opt.default)} ({opt.type_name()}{extra}): {opt.help}")
    print("preset pipelines:")
    for name in sorted(PIPELINES):
        text, summary = PIPELINES[name]
        print(f"  {name:<18} {summary}\n      = {text}")
    return 0


def cmd_run(args) -> int:
    from prunec.backends.tvm_runner import run_cli
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
