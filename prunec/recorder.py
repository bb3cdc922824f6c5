"""The fast tracer: record one real forward pass of the model's ATen ops.

``torch.export`` traces with fake tensors through a proxy tracer, a symbolic shape
environment and a verifier; on small models that is 80% of a pruning call and more
than a second of it is its first call in a process.  This recorder runs the model
once on the example inputs and notes every ATen op at the same level as
``torch.export``'s training IR (``conv2d``, ``linear``, ``batch_norm``, ``sdpa``:
before autograd and before any decomposition), so the program it builds is the one
``torch.export`` would build, at the cost of one eager forward pass.

Where it listens: a plain dispatch mode at the Python key, with the autograd keys
excluded (``_AutoDispatchBelowAutograd``).  A composite op (``conv2d``, ``linear``,
``flatten``) decomposes in its autograd kernel; with autograd skipped it reaches the
Python key whole, where the mode notes it and runs it.  Grad mode stays on, so code
that asks ``torch.is_grad_enabled()`` takes the path export sees.  (Listening at the
PreDispatch key, as export does, needs torch's Python dispatcher, which doubled the
recording's cost; so did building the autograd graph nothing reads.)

It only keeps a recording it can vouch for.  It gives up (``record`` returns why,
and the caller uses ``torch.export``) when the Python code read a tensor's *values*
(``if x.sum() > 0``, ``.item()``, ``.tolist()``, ``.numpy()``: one run would bake
one branch in), when an op's output shape depends on data (``nonzero``), when a
tensor comes from somewhere it cannot name, when an input, parameter or buffer is
written, when an output is not a tensor the program computed, when the model
raises, or when a recording that must keep its intermediate tensors (see
``MAX_RECORDED_BYTES``) holds too many.  tests/test_recorder.py checks that its IR prints
exactly as ``torch.export``'s on every model it covers.

The IR is built while the model runs (``_Walker``), so the forward pass frees its
intermediate tensors as eager code does; keeping them all for a build afterwards nearly
doubled mobilenet_v2's recorded forward pass (fresh allocations, ~27 ms).  An in-place op that needs the view
analysis (a write through slices) stops that run; a second run keeps every op and
builds an fx graph for frontend's functionalization.
"""
from __future__ import annotations

import inspect
import operator
import re
import weakref

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.immutable_collections import immutable_list
from torch.utils._python_dispatch import TorchDispatchMode

from .frontend import _ALIASING, functional_twin, writes_nothing
from .ir import Graph, Node, Value, iter_values, op_name

aten = torch.ops.aten

# Ops whose result depends on tensor values in a way one run cannot stand for: a
# Python scalar read out of a tensor, or an output shape set by the data.
_REFUSED = {
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "nonzero_static",
    "argwhere", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "bincount", "histc", "repeat_interleave", "masked_scatter", "resize_", "resize_as_", "set_",
    "_assert_async", "_print",
}
# Tensor methods that hand values to Python without an ATen op.
_VALUE_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.__dlpack__,
                torch.Tensor.data_ptr}


# The fx path's recording keeps every intermediate tensor of the forward pass until the graph is
# built (torch.export keeps none: it traces with fake tensors).  Batch 1 of the torchvision zoo
# stays under 1 GiB (swin_v2_b, views counted in full); past this bound, torch.export traces instead.
MAX_RECORDED_BYTES = 2 << 30


class Unrecordable(Exception):
    """Why a recording cannot stand for the program; the caller falls back to torch.export."""


class _Guard(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _VALUE_READS:
            raise Unrecordable(f"the model reads tensor values in Python (Tensor.{func.__name__})")
        return func(*args, **(kwargs or {}))


class _Recorder(TorchDispatchMode):
    """A dispatch mode at the Python key, entered below autograd (see ``record``); hands every
    op, its arguments, result and module stack to ``on_op``."""

    def __init__(self, stack: list, on_op, fake=None):
        super().__init__()
        self.stack = stack   # the module path stack, kept by module hooks
        self.on_op = on_op
        self.fake = fake     # stands in for running an op (``prunec.module_check``); NotImplemented: run it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            return func(*args, **kwargs)
        name = op_name(func)
        if name in _REFUSED or (name == "index" and _bool_index(args)):
            raise Unrecordable(f"aten.{name} depends on tensor values")
        if "out" in kwargs:
            raise Unrecordable(f"aten.{name} writes an out= tensor")
        out = NotImplemented if self.fake is None else self.fake(func, args, kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
        self.on_op(func, args, kwargs, out, tuple(self.stack))
        return out


class _Kept:
    """The fx path's recording: every op with its arguments and results, kept to the end."""

    def __init__(self):
        self.ops: list = []  # (op, args, kwargs, result, module stack)
        self.held = 0        # bytes of the results kept so far

    def __call__(self, func, args, kwargs, out, stack):
        self.ops.append((func, args, kwargs, out, stack))
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.held += t.numel() * t.element_size()
        if self.held > MAX_RECORDED_BYTES:
            raise Unrecordable(f"the forward pass holds more than {MAX_RECORDED_BYTES / 2**30:g} GiB of "
                               f"intermediate tensors (torch.export traces without them)")


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx or ())


def _ident(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _input_names(module: torch.nn.Module, n: int) -> list[str]:
    """Names of the first ``n`` positional parameters of ``forward``, as torch.export names them
    (``*args`` become ``args_0``, ``args_1``, ...)."""
    names = []
    for p in inspect.signature(module.forward).parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            names += [f"{p.name}_{i}" for i in range(n - len(names))]
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        if len(names) >= n:
            return names[:n]
    raise Unrecordable("more example inputs than forward() takes")


def record(module: torch.nn.Module, example_inputs: tuple) -> Graph:
    """Run ``module`` once and return the program as prunec's IR.  Raises ``Unrecordable``."""
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise Unrecordable("a non-tensor example input")
    walker = _Walker(module, example_inputs, _IrSink())
    try:
        return walker.finish(_run(module, example_inputs, walker.op))
    except _General:  # an in-place op that needs the view analysis: through fx, as export's programs go
        pass
    from .frontend import _functionalize_inplace, _to_ir
    kept = _Kept()
    out = _run(module, example_inputs, kept)
    walker = _Walker(module, example_inputs, _FxSink())
    for op in kept.ops:
        walker.op(*op)
    g, specs, out_spec = walker.finish(out)
    if not _functionalize_inplace(g):
        raise Unrecordable("an in-place op the functionalization does not cover")
    return _to_ir(g, specs, out_spec)


def _run(module: torch.nn.Module, example_inputs: tuple, on_op, fake=None):
    """One forward pass under the recorder; returns the module's output."""
    paths = {id(m): name for name, m in module.named_modules()}
    stack: list = []  # (stack key, module path, module type) of the modules being called
    calls: dict[str, int] = {}

    def enter(m, args):
        p = paths.get(id(m))
        if p is not None:  # torch.export's stack keys: the path, and "@k" on its k-th call after the first
            k = calls[p] = calls.get(p, -1) + 1
            stack.append((f"{p}@{k}" if k else p, p, type(m)))

    def leave(m, args, out):
        if id(m) in paths:
            stack.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    try:
        # Grad mode on and cuDNN off, as torch.export traces: under no_grad eager code takes fast
        # paths the exported program does not hold (nn.MultiheadAttention's fused kernel), and
        # norms pass the cuDNN flag on as an argument.
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False), \
                torch._C._AutoDispatchBelowAutograd(), _Guard(), _Recorder(stack, on_op, fake):
            return module(*example_inputs)
    except (Unrecordable, _General):
        raise
    except Exception as e:  # noqa: BLE001 - torch.export gives the error the user should see
        raise Unrecordable(f"the forward pass raised {type(e).__name__}") from None
    finally:
        for h in hooks:
            h.remove()


class _General(Exception):
    """An in-place op that ``_IrSink`` does not rewrite."""


def _stack_meta(stack) -> dict:
    return {"L__self__" + k: (p, f"{c.__module__}.{c.__qualname__}") for k, p, c in stack}


class _FxSink:
    """Builds an fx graph (placeholders, then ops) for frontend's functionalization and ``_to_ir``;
    ``output`` returns (fx graph, placeholder specs ``(kind, name, tensor)``, output spec)."""

    def __init__(self):
        self.g = fx.Graph()
        self.specs: list = []

    def placeholder(self, kind, name, t, node_name):
        n = self.g.placeholder(node_name)
        n.meta["val"] = t
        self.specs.append((kind, name, t))
        return n

    def is_state(self, n) -> bool:
        return n.op == "placeholder"

    def call(self, func, args, kwargs, res, stack):
        g = self.g
        n = g.create_node("call_function", func, args, kwargs, name=g._target_to_str(func.overloadpacket.__name__))
        n.meta["val"] = res
        n.meta["nn_module_stack"] = _stack_meta(stack)
        if not isinstance(res, (list, tuple)):
            return n
        parts = []
        for i, r in enumerate(res):
            gi = g.call_function(operator.getitem, (n, i))
            gi.meta["val"] = r
            parts.append(gi)
        return parts

    def output(self, outs, out_spec):
        self.g.output(tuple(outs))
        return self.g, self.specs, out_spec


class _IrSink:
    """Builds prunec's IR straight from the recording (an fx graph and its conversion took 25 ms
    of mnasnet0_75's trace, this 14), with the names fx would give, so the IR prints as
    torch.export's.  In-place ops that need no view analysis are rewritten as they come:
    ``relu_(x)`` on a tensor the program computed, that no op has viewed, becomes ``relu(x)``
    (later reads of x already read its result: the walker maps a tensor to its newest value).
    Any other in-place op raises ``_General``, and the recording takes the fx path and frontend's
    functionalization (writes through slices and aliases)."""

    def __init__(self):
        self.names = fx.Graph()  # only for its namespace, so that names come out as fx's
        self.inputs: list[Value] = []
        self.input_names: list[str] = []
        self.consts: dict[str, Value] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.nodes: list[Node] = []
        self.viewed: set[int] = set()  # ids of the values some aliasing op has read

    def _name(self, candidate: str) -> str:
        return self.names._graph_namespace.create_name(candidate, None)

    def placeholder(self, kind, name, t, node_name):
        self._name(node_name)
        if kind == "input":
            v = Value(name, t.shape, t.dtype, kind="input")
            self.inputs.append(v)
            self.input_names.append(name)
            return v
        t = t.detach()
        v = self.consts[name] = Value(name, t.shape, t.dtype, kind=kind)
        self.tensors[name] = t
        return v

    def is_state(self, v) -> bool:
        return v.kind != "activation"

    def call(self, func, args, kwargs, res, stack):
        name = self._name(self.names._target_to_str(func.overloadpacket.__name__))
        target = functional_target(func, args, self.viewed) if func._schema.is_mutable else func
        if op_name(func) in _ALIASING:
            self.viewed.update(id(v) for v in iter_values(args))
        if isinstance(res, (list, tuple)):
            outs = [Value(f"{name}_{i}", r.shape, r.dtype) for i, r in enumerate(res)]
            for _ in res:
                self._name("getitem")  # fx's getitem nodes take names too
        else:
            outs = [] if res is None else [Value(name, res.shape, res.dtype)]
        multi = not isinstance(res, torch.Tensor)
        self.nodes.append(Node(name, target, args, kwargs, outs, multi, {"stack": _stack_meta(stack)}))
        return outs if multi else outs[0]

    def output(self, outs, out_spec):
        return Graph(self.inputs, self.nodes, outs, self.consts, self.tensors, out_spec, self.input_names)


def functional_target(func, args, viewed: set):
    """``func``'s functional twin where the rewrite is the simple case of frontend's
    ``_functionalize_inplace`` (which stays the reference); else raise ``_General``.
    ``viewed``: ids of the values some aliasing op has read."""
    functional = functional_twin(func)
    a = args[0] if args else None
    if functional is None or not isinstance(a, Value):
        raise _General
    if writes_nothing(func, args):
        return functional
    if a.producer is None or op_name(a.producer.target) in _ALIASING or id(a) in viewed:
        raise _General  # a view, or viewed: the write reaches other tensors
    return functional


class _Walker:
    """Turns the recorded ops into ``sink``'s program: placeholders for the inputs, parameters,
    buffers and the constants the ops read, then one call per op, its tensor arguments mapped
    to the values that hold them.  ``op`` takes each op as it runs (or as a kept recording
    replays); ``finish`` takes the module's output."""

    def __init__(self, module, example_inputs, sink):
        self.module, self.sink = module, sink
        # id(tensor) -> (weak reference or None, the sink's value for its latest version).  The
        # forward pass frees what it no longer needs, so an id may come back for a new tensor: an
        # entry counts only while its reference still points to the same tensor.  Inputs,
        # parameters, buffers and module attributes stay alive (None: no reference needed).
        self.where: dict[int, tuple] = {}
        self.attrs = None  # tensor attributes that are neither parameters nor buffers, found on demand
        self.lifted = 0
        for name, t in zip(_input_names(module, len(example_inputs)), example_inputs):
            self._placeholder("input", name, t, name)
        # every name of a tied parameter or buffer is a constant, and ops read the last, as in torch.export
        for name, p in module.named_parameters(remove_duplicate=False):
            self._placeholder("parameter", name, p, "p_" + _ident(name))
        for name, b in module.named_buffers(remove_duplicate=False):
            self._placeholder("buffer", name, b, "b_" + _ident(name))

    def _placeholder(self, kind, name, t, node_name, alive=True):
        self.where[id(t)] = (None if alive else weakref.ref(t), self.sink.placeholder(kind, name, t, node_name))

    def _get(self, t: torch.Tensor):
        e = self.where.get(id(t))
        if e is None or (e[0] is not None and e[0]() is not t):
            return None
        return e[1]

    def node_of(self, t: torch.Tensor):
        n = self._get(t)
        if n is not None:
            return n
        if self.attrs is None:
            self.attrs = {id(v): f"{p}.{k}" if p else k for p, m in self.module.named_modules()
                          for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
        if id(t) not in self.attrs:
            raise Unrecordable("a tensor that is not an input, parameter, buffer or module attribute")
        name = self.attrs[id(t)]
        self._placeholder("constant", name, t, "c_" + _ident(name))  # where it is first read, as below
        return self._get(t)

    def arg(self, a):
        if isinstance(a, torch.Tensor):
            return self.node_of(a)
        if isinstance(a, list):  # as fx stores list arguments
            return immutable_list(self.arg(x) for x in a)
        if isinstance(a, tuple):
            return tuple(self.arg(x) for x in a)
        return a

    def op(self, func, args, kwargs, res, stack):
        if func is aten.lift_fresh.default or func is aten.lift_fresh_copy.default:
            src = args[0]
            if self._get(src) is None:  # torch.tensor(...) in forward: a constant of the program
                inner = stack[-1][1] if stack else ""  # named after the module that made it, as export does
                name = f"{inner}.lifted_tensor_{self.lifted}" if inner else f"lifted_tensor_{self.lifted}"
                self._placeholder("constant", name, src, "c_" + _ident(name), alive=False)
                self.lifted += 1
            # eager lift_fresh returns its argument; as torch.export does, record a copy, so that
            # an in-place op on the result does not write the constant
            func = aten.lift_fresh_copy.default
        if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor) \
                and self.sink.is_state(self.node_of(args[0])):
            raise Unrecordable(f"aten.{op_name(func)} writes an input, parameter or buffer")
        parts = res if isinstance(res, (list, tuple)) else ()
        if not (res is None or isinstance(res, (torch.Tensor, list, tuple))) \
                or not all(isinstance(r, torch.Tensor) for r in parts):
            raise Unrecordable(f"aten.{op_name(func)} returns a non-tensor")
        # nodes append in order: constants found on demand land among the ops, which fx allows
        h = self.sink.call(func, self.arg(args), {k: self.arg(v) for k, v in kwargs.items()}, res, stack)
        if isinstance(res, torch.Tensor):
            self.where[id(res)] = (weakref.ref(res), h)
        for r, hr in zip(parts, h if parts else ()):
            self.where[id(r)] = (weakref.ref(r), hr)

    def finish(self, out):
        leaves, out_spec = pytree.tree_flatten(out)
        outs = []
        for t in leaves:
            n = self._get(t) if isinstance(t, torch.Tensor) else None
            if n is None or self.sink.is_state(n):
                raise Unrecordable("an output that is not a tensor the program computed")
            outs.append(n)
        return self.sink.output(outs, out_spec)
