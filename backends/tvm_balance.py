"""Self-balancing parallel loops for CPU kernels.

TVM splits a parallel loop statically: with two threads, each runs half of the iterations, so a
kernel takes as long as its slower thread.  On a shared machine the cores do not run at the same
speed (on the 2-vCPU development VM each vCPU's vector throughput moved up to 3x within seconds,
independently of the other), and the faster thread then waits.

Here every eligible parallel loop becomes ``tasks`` ranges of chunks, one per thread: each task
claims chunks of its own range from the front and, when done, claims chunks of the next task's
range from the back, so a fast thread takes over work a slow one has not reached.  The claims are
plain volatile stores and loads (TIR has no CPU atomics): a task executes a chunk only after storing
its claim and seeing that the other side has not claimed it, and x86's store ordering can at worst
let both sides run the same chunk at the very end.  So a loop is rewritten only where running an
iteration twice, concurrently, is harmless: ``mark_balanced_loops`` (on the scheduled kernels,
where blocks declare their reads and writes) admits a loop whose iterations write no buffer they
also read, except buffers private to the loop (accumulators and packed operands allocated inside
it).  ``BalanceParallelLoops`` rewrites the marked loops after TIR lowering, and checks each one
again there: lowering can make a stage write in place into the buffer it reads (TVM's storage
rewrite gave a LLaMA rotary embedding's ``t = -x`` the storage of ``x``, and ``x = -x`` run twice
is ``x``), so a loop that stores to memory it also loads, other than memory allocated inside it,
stays static.  The registered TIR pipeline ``prunec-llvm`` is TVM's default with that pass at the end.

MobileNetV2 on the 2-vCPU VM under host load: 4-11% faster, dense and pruned alike (docs/benchmarks.md).
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import Call, TensorLoad
from tvm.tirx import (AllocBuffer, BufferLoad, BufferStore, DeclBuffer, For, ForKind, IfThenElse, IntImm, SeqStmt,
                      While)

ANNOTATION = "prunec.balance"  # value: the number of tasks (threads) to balance over
CHUNKS_PER_TASK = 8  # granularity of the balancing: a loop is claimed in 8 x tasks chunks at most
_LINE = 16  # int32 words per cache line: each task's two claims sit on their own lines
PIPELINE = "prunec-llvm"
_REDUCE = 2  # IterVar.CommReduce


def _eligible(sch, loop, root_allocs) -> bool:
    """Running an iteration twice, concurrently, leaves the same result: every buffer the loop's
    blocks both read and write is allocated in the function and touched by no block outside the loop."""
    inside = sch.get_child_blocks(loop)
    inside_stmts = [sch.get(b) for b in inside]
    if not inside_stmts or any(not s.writes for s in inside_stmts):
        return False
    read = [r.source for s in inside_stmts for r in s.reads]
    # a reduction block (not yet split into init and update) reads its output without listing it
    read += [w.source for s in inside_stmts if s.init is not None
             or any(iv.iter_type == _REDUCE for iv in s.iter_vars) for w in s.writes]
    written = [w.source for s in inside_stmts for w in s.writes]
    shared = [b for b in written if any(b.same_as(r) for r in read)]
    if not shared:
        return True
    root = sch.get_sblock("root")
    outside = [sch.get(b) for b in sch.get_child_blocks(root)
               if not any(sch.get(b).same_as(s) for s in inside_stmts)]
    for buf in shared:
        if not any(buf.same_as(a) for a in root_allocs):
            return False  # a parameter (the output) or a buffer from elsewhere
        for s in outside:
            if any(r.source.same_as(buf) for r in list(s.reads) + list(s.writes)):
                return False
    return True


def mark_balanced_loops(func: tirx.PrimFunc, tasks: int) -> tirx.PrimFunc:
    """Annotate each root-level parallel loop of ``func`` that ``BalanceParallelLoops`` may rewrite
    (more iterations than tasks, safe to run an iteration twice)."""
    if tasks < 2:
        return func
    try:
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - no root block (a hand-written loop nest): left static
        return func
    root_allocs = list(sch.get(root).alloc_buffers)
    for blk in sch.get_child_blocks(root):  # blocks sharing a loop see it again: checked again, same answer
        loops = sch.get_loops(blk)
        if not loops:
            continue
        lp = sch.get(loops[0])
        if lp.kind != ForKind.PARALLEL or ANNOTATION in lp.annotations or not isinstance(lp.extent, IntImm) \
                or int(lp.extent) <= tasks or not isinstance(lp.min, IntImm) or int(lp.min) != 0:
            continue
        if _eligible(sch, loops[0], root_allocs):
            sch.annotate(loops[0], ANNOTATION, tasks)
    return sch.mod["main"]


def mark_module(mod: tvm.IRModule, target) -> tvm.IRModule:
    """``mark_balanced_loops`` on every kernel of ``mod`` for a CPU ``target``, one task per core
    (its ``num-cores``, the physical cores prunec sizes TVM's thread pool to)."""
    if target.kind.name != "llvm" or "num-cores" not in target.attrs:
        return mod
    tasks = int(target.attrs["num-cores"])
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            new = mark_balanced_loops(func, tasks)
            if not new.same_as(func):
                updates[gv] = new
    for gv, func in updates.items():
        mod.update_func(gv, func)
    return mod


def _balanced(loop: For) -> SeqStmt:
    """The rewritten loop: claims initialised, then ``tasks`` parallel tasks claiming chunks."""
    tasks = int(loop.annotations[ANNOTATION])
    total = int(loop.extent)
    dt = str(loop.loop_var.ty)
    n = min(total, CHUNKS_PER_TASK * tasks)  # chunks

    def c(v):
        return IntImm(dt, v)

    def lo(x):  # first chunk of task x's range
        return tirx.FloorDiv(x * c(n), c(tasks))

    def front(x):  # next chunk its owner will claim (owner writes)
        return x * c(2 * _LINE)

    def back(x):  # lowest chunk its helper has claimed (helper writes)
        return x * c(2 * _LINE) + c(_LINE)

    claims = tirx.decl_buffer((tasks * 2 * _LINE,), dt, name="prunec_claims")
    state = tirx.decl_buffer((3,), dt, name="prunec_chunk")  # next chunk, phase, chunk to run (-1: none)
    t0, t = tirx.Var("t0", dt), tirx.Var("t", dt)
    init = For(t0, c(0), c(tasks), ForKind.SERIAL, SeqStmt([
        BufferStore(claims, lo(t0), [front(t0)]), BufferStore(claims, lo(t0 + c(1)), [back(t0)])]))
    nxt = tirx.FloorMod(t + c(1), c(tasks))
    k, phase, run = (BufferLoad(state, [c(i)]) for i in range(3))
    own = IfThenElse(k < BufferLoad(claims, [back(t)]),
                     SeqStmt([BufferStore(claims, k + c(1), [front(t)]), BufferStore(state, k, [c(2)]),
                              BufferStore(state, k + c(1), [c(0)])]),
                     SeqStmt([BufferStore(state, c(1), [c(1)]), BufferStore(state, lo(nxt + c(1)) - c(1), [c(0)])]))
    help_next = IfThenElse(k >= BufferLoad(claims, [front(nxt)]),
                           SeqStmt([BufferStore(claims, k, [back(nxt)]), BufferStore(state, k, [c(2)]),
                                    BufferStore(state, k - c(1), [c(0)])]),
                           BufferStore(state, c(2), [c(1)]))
    first = tirx.FloorDiv(run * c(total), c(n))
    size = tirx.FloorDiv((run + c(1)) * c(total), c(n)) - first
    chunk = For(loop.loop_var, first, size, ForKind.SERIAL, loop.body)
    step = SeqStmt([BufferStore(state, c(-1), [c(2)]), IfThenElse(phase == c(0), own, help_next),
                    IfThenElse(run >= c(0), chunk, None)])
    task = SeqStmt([AllocBuffer(state), BufferStore(state, lo(t), [c(0)]), BufferStore(state, c(0), [c(1)]),
                    While(phase < c(2), step)])
    # volatile: the claims are re-read on every chunk, never hoisted or merged by LLVM
    return SeqStmt([AllocBuffer(claims, {"tirx.volatile": True}), init, For(t, c(0), c(tasks), ForKind.PARALLEL, task)])


# calls that touch memory through a raw pointer, which the loads and stores below do not show
_OPAQUE = {"tirx.address_of", "tirx.tvm_access_ptr", "tirx.call_extern", "tirx.call_packed",
           "tirx.call_cpacked", "tirx.call_packed_lowered", "tirx.call_cpacked_lowered"}


def _views(body) -> list:
    """(view, viewed) buffer pairs: each lowered ``decl_buffer`` whose data is another buffer's."""
    pairs = []

    def decl(d):
        def data(c):
            if getattr(c.op, "name", "") == "tirx.buffer_data":
                pairs.append((d.buffer, c.args[0]))
        tvm_ffi.structural_walk(d.data, [(Call, data)])

    tvm_ffi.structural_walk(body, [(DeclBuffer, decl)])
    return pairs


def _owner(buf, views):
    """The buffer whose memory ``buf`` is (views followed back)."""
    for _ in range(len(views) + 1):
        viewed = next((src for v, src in views if v.same_as(buf)), None)
        if viewed is None:
            break
        buf = viewed
    return buf


def _runs_twice_safely(loop: For, views) -> bool:
    """The lowered ``loop`` loads no memory it stores to, except memory allocated inside it."""
    stores, loads, private, opaque = [], [], [], []
    tvm_ffi.structural_walk(loop.body, [
        (BufferStore, lambda st: stores.append(st.buffer)),
        (TensorLoad, lambda ld: loads.append(ld.source)),
        (AllocBuffer, lambda al: private.append(al.buffer)),
        (Call, lambda c: opaque.append(c) if getattr(c.op, "name", "") in _OPAQUE else None),
    ])
    if opaque:
        return False
    read = [_owner(b, views) for b in loads]
    for w in (_owner(b, views) for b in stores):
        if any(w.same_as(r) for r in read) and not any(w.same_as(p) for p in private):
            return False
    return True


def _rewrite(s, views):
    """``s`` with its marked parallel loops balanced (the statement kinds that hold loops after lowering)."""
    if isinstance(s, For):
        if s.kind == ForKind.PARALLEL and ANNOTATION in s.annotations:
            if _runs_twice_safely(s, views):
                return _balanced(s)
            return For(s.loop_var, s.min, s.extent, s.kind, s.body, s.thread_binding,
                       {k: v for k, v in s.annotations.items() if k != ANNOTATION})
        b = _rewrite(s.body, views)
        return s if b.same_as(s.body) else For(s.loop_var, s.min, s.extent, s.kind, b, s.thread_binding,
                                                s.annotations)
    if isinstance(s, SeqStmt):
        seq = [_rewrite(x, views) for x in s.seq]
        return s if all(a.same_as(b) for a, b in zip(seq, s.seq)) else SeqStmt(seq)
    if isinstance(s, tirx.AttrStmt):
        b = _rewrite(s.body, views)
        return s if b.same_as(s.body) else tirx.AttrStmt(s.node, s.attr_key, s.value, b)
    if isinstance(s, IfThenElse):
        a = _rewrite(s.then_case, views)
        b = _rewrite(s.else_case, views) if s.else_case is not None else None
        same = a.same_as(s.then_case) and (b is None or b.same_as(s.else_case))
        return s if same else IfThenElse(s.condition, a, b)
    return s


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="prunec.BalanceParallelLoops")
def balance_pass(func, _mod, _ctx):
    body = _rewrite(func.body, _views(func.body))
    return func if body.same_as(func.body) else func.with_body(body)


def _pipeline():
    from tvm.s_tir.pipeline import default_s_tir_pipeline
    lower, host, device = default_s_tir_pipeline()
    return tvm.transform.Sequential([lower, balance_pass]), host, device


def register() -> str:
    """Register the ``prunec-llvm`` TIR pipeline (TVM's default, then ``BalanceParallelLoops``)."""
    from tvm.tirx import compilation_pipeline
    compilation_pipeline.register_tir_pipeline(PIPELINE, _pipeline)
    return PIPELINE
