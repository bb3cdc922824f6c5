"""Lower prunec's compacted IR to TVM Relax and run prunec's Relax pipeline.

Op translation is TVM's own: the IR is emitted as a ``torch.export`` program
(``torch_backend.export_program``) and imported with
``tvm.relax.frontend.torch.from_exported_program``.  The weights are bound as
Relax constants, so the built library carries them and constant folding can
pre-transform them (layouts, sparse formats).

The prunec-specific steps are ordinary ``tvm.transform`` module passes
(see :func:`prunec_relax_passes`) that users may insert into their own TVM
pipelines; ``docs/tvm-backend.md`` shows how.
"""
from __future__ import annotations

import os

import numpy as np
import tvm
from tvm import relax

from prunec.errors import UsageError


def to_target(spec) -> tvm.target.Target:
    """A prunec ``TargetSpec`` (or text) as a TVM target; ``llvm`` gets a host."""
    from prunec.target import TargetSpec, parse_target
    if not isinstance(spec, TargetSpec):
        spec = parse_target(spec)
    d = spec.tvm_dict()
    if d["kind"] == "llvm" and "mcpu" not in d:
        d["mcpu"] = host_cpu()  # plain "llvm" means this machine (TVM's default is baseline x86-64)
    if d["kind"] == "llvm":
        d.setdefault("num-cores", _physical_cores())  # MetaSchedule needs it
    if d["kind"] == "cuda" and "host" not in d:
        d["host"] = {"kind": "llvm", "mcpu": host_cpu()}
    if d["kind"] == "cuda":
        # MetaSchedule's GPU rules and its GPU-code verifier need these; every CUDA GPU since
        # Fermi allows 1024 threads and 48 KiB of static shared memory per block
        d.setdefault("max_threads_per_block", 1024)
        d.setdefault("max_shared_memory_per_block", 49152)
    try:
        return tvm.target.Target(d)
    except Exception as e:  # noqa: BLE001 - TVM raises a generic error for a bad attribute
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UsageError(f"target {spec}: TVM rejects it: {msg}") from None


def _physical_cores() -> int:
    try:
        import psutil
        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return int(os.cpu_count() or 1)


def size_thread_pool() -> None:
    """Size TVM's CPU thread pool to the physical cores, as the schedules' task counts assume
    (``num-cores`` above), unless the user chose (``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS``).

    Left alone, TVM sizes its pool on first use to half the logical CPUs on x86, assuming two
    hyperthreads per core; on a VM whose vCPUs are whole cores that is half of them (this 2-vCPU
    machine ran every model on one thread).  TVM reads the variable when the pool is created, so
    this runs when prunec's TVM backend is imported."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(_physical_cores())


size_thread_pool()


def host_cpu() -> str:
    from tvm.target import codegen
    return str(codegen.llvm_get_system_cpu())


_KEY_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16", "avx2", "fma", "avx", "f16c",
                 "sse4.2", "neon", "sve", "sve2", "dotprod", "i8mm")


def cpu_features(target: tvm.target.Target) -> list[str]:
    """The instruction-set features a library built for ``target`` may use."""
    from tvm.target import codegen
    host = target.host if target.kind.name == "cuda" and target.host is not None else target
    try:
        feats = set(codegen.llvm_get_cpu_features(host))
    except Exception:  # noqa: BLE001
        return []
    return sorted(f for f in feats if f in _KEY_FEATURES)


def import_program(program, bind_params: bool = True) -> tvm.IRModule:
    """An ``ExportedProgram`` as a Relax module with ``main``; weights become constants."""
    from tvm.relax.frontend.torch import from_exported_program
    mod = from_exported_program(program, keep_params_as_input=not bind_params,
                                unwrap_unit_return_tuple=False)
    return mod


_NP_UNARY = {"relax.sqrt": np.sqrt, "relax.rsqrt": lambda a: 1 / np.sqrt(a), "relax.negative": np.negative,
             "relax.exp": np.exp}
_NP_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
              "relax.divide": np.divide, "relax.power": np.power}


def _np_fold(call, args):
    """numpy value of ``call`` when all its tensor args are constants (None if unsupported)."""
    name = call.op.name if isinstance(call.op, tvm.ir.Op) else None
    if name is None or not all(isinstance(a, tvm.ir.expr.Constant) for a in args):
        return None
    args = [a.value.numpy() for a in args]
    out_dtype = str(call.ty.dtype) if hasattr(call.ty, "dtype") else None
    if name in _NP_UNARY:
        res = _NP_UNARY[name](args[0])
    elif name in _NP_BINARY:
        res = _NP_BINARY[name](args[0], args[1])
    elif name == "relax.permute_dims":
        axes = call.attrs.axes
        res = np.transpose(args[0], None if axes is None else [int(a) for a in axes])
    elif name in ("relax.reshape", "relax.expand_dims", "relax.squeeze"):
        shape = [int(d) for d in call.ty.shape]
        res = args[0].reshape(shape)
    elif name == "relax.astype":
        res = args[0]
    else:
        return None
    return np.ascontiguousarray(res.astype(out_dtype) if out_dtype else res)


def _bool_cumsum_as_int(call):
    """torch counts booleans in int64 (a Hugging Face causal mask's positions); TVM's frontend types
    that cumsum bool, which no TVM kernel implements (LLaMA failed in VM codegen)."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.cumsum" and call.attrs.dtype is None):
        return call
    x = call.args[0]
    if str(getattr(x.ty, "dtype", "")) != "bool":
        return call
    return relax.op.cumsum(relax.op.astype(x, "int64"), axis=call.attrs.axis, dtype="int64",
                           exclusive=call.attrs.exclusive)


@relax.expr_functor.mutator
class _NumpyFolder(relax.PyExprMutator):
    def visit_call_(self, call):
        call = _bool_cumsum_as_int(super().visit_call_(call))
        args = []
        for a in call.args:
            if isinstance(a, relax.Var):
                bound = self.lookup_binding(a)
                a = bound if bound is not None else a
            args.append(a)
        try:
            val = _np_fold(call, args)
        except Exception:  # noqa: BLE001 - leave it to TVM's FoldConstant
            val = None
        return call if val is None else relax.const(val)


@tvm.transform.module_pass(opt_level=0, name="prunec.FoldConstantWeights")
def fold_constant_weights(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Fold everything computable from the weights alone (decomposed batch norm
    statistics, permuted/reshaped weights) before fusion.  Common weight
    arithmetic is folded with numpy (TVM's FoldConstant compiles a kernel per
    folded op: 40 s on ResNet-50); TVM folds whatever is left.  The same
    traversal gives a bool cumsum torch's int64 result type (``_bool_cumsum_as_int``)."""
    mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                    relax.transform.CanonicalizeBindings()])(mod)
    folder = _NumpyFolder(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            folder.builder_.update_func(gv, folder.visit_expr(func))
    mod = folder.builder_.get()
    return tvm.transform.Sequential([relax.transform.CanonicalizeBindings(), relax.transform.FoldConstant()])(mod)


def _decomposed_activation(call):
    """``call`` rewritten with exp / erf / tanh (which FastMathTransform replaces), or None."""
    name = call.op.name if isinstance(call.op, tvm.ir.Op) else None
    if name not in ("relax.nn.gelu", "relax.nn.gelu_tanh", "relax.sigmoid", "relax.nn.silu"):
        return None
    x = call.args[0]
    dtype = str(x.ty.dtype) if hasattr(x.ty, "dtype") else ""
    if dtype not in ("float32", "float16"):
        return None
    op, c = relax.op, (lambda v: relax.const(v, dtype))
    if name == "relax.nn.gelu":  # x * (1/2 + erf(x / sqrt 2) / 2)
        return op.multiply(x, op.add(c(0.5), op.multiply(c(0.5), op.erf(op.multiply(x, c(0.7071067811865476))))))
    if name == "relax.nn.gelu_tanh":  # x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inner = op.multiply(c(0.7978845608028654), op.add(x, op.multiply(c(0.044715), op.multiply(x, op.multiply(x, x)))))
        return op.multiply(op.multiply(c(0.5), x), op.add(c(1.0), op.tanh(inner)))
    sig = op.divide(c(1.0), op.add(c(1.0), op.exp(op.negative(x))))
    return sig if name == "relax.sigmoid" else op.multiply(x, sig)


@relax.expr_functor.mutator
class _ActivationDecomposer(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        new = _decomposed_activation(call)
        return call if new is None else new


@tvm.transform.module_pass(opt_level=0, name="prunec.FastActivations")
def fast_activations(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """GELU, tanh-GELU, sigmoid and SiLU written with exp / erf / tanh, then TVM's
    ``FastMathTransform``: vectorizable polynomial approximations (within ~3e-7 of the exact
    functions) instead of one libm call per element.  On AVX2 that is 8x (exp) to 35x (erf)
    faster; ViT-B/16's GELUs were 10% of its run time."""
    rewriter = _ActivationDecomposer(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    mod = rewriter.builder_.get()
    # no CanonicalizeBindings: it runs after SparseDenseRewrite's call_tir here (see PointwiseAsMatmul)
    return relax.transform.FastMathTransform()(mod)


def prunec_relax_passes(target: tvm.target.Target, sparse: dict | None = None, fast_math: bool = True) -> list:
    """prunec's own Relax passes, in order; each is a ``tvm.transform`` module pass.

    ``fast_math``: polynomial exp / erf / tanh on CPU (:func:`fast_activations`).

    ``sparse``: options for :func:`tvm_sparse.SparseDenseRewrite` (None: default
    measured choice).
    """
    from . import tvm_sparse
    from .tvm_softmax import RowSoftmax
    passes = [fold_constant_weights]
    if target.kind.name == "llvm":
        passes.append(RowSoftmax(target, fast_math=fast_math))  # before FastMathTransform takes softmax
    passes.append(tvm_sparse.SparseDenseRewrite(target, **(sparse or {})))
    if target.kind.name == "llvm":
        from .tvm_fuse_expand import FuseExpandDepthwise
        from .tvm_pointwise import PointwiseAsMatmul
        # after the sparse choice: a sparse 1x1 stays sparse
        passes.append(FuseExpandDepthwise(target))  # before PointwiseAsMatmul takes the small planes' 1x1s
        passes.append(PointwiseAsMatmul(target))
    if target.kind.name == "llvm" and fast_math:
        # after PointwiseAsMatmul: an activation it moved above a 1x1's reshape is decomposed there
        passes.append(fast_activations)
    return passes


def legalize_and_fuse() -> list:
    return [
        relax.backend.DispatchSortScan(),  # cumsum/sort/topk have no generic legalization
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        # a reshape kernel becomes a view (no copy); TVM's own pass for this runs after scheduling,
        # when the schedule has already made the kernel's loops unrecognizable
        relax.transform.RewriteDataflowReshape(),
        relax.transform.DeadCodeElimination(),
    ]


def finalize_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """The rest of TVM's default pipeline after legalization and scheduling."""
    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as p
    else:
        from tvm.relax.backend.cpu_generic import pipeline as p

    @tvm.transform.module_pass(opt_level=0, name="prunec.Finalize")
    def _finalize(mod, _ctx):
        with target:
            return tvm.transform.Sequential(p.dataflow_lower_passes(target) + p.finalize_passes(target))(mod)
    return _finalize
