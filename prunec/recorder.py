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
raises, or when the forward pass's intermediate tensors (which the recording keeps)
pass ``MAX_RECORDED_BYTES``.  tests/test_recorder.py checks that its IR prints exactly as
``torch.export``'s on every model it covers.
"""
from __future__ import annotations

import inspect
import re
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .ir import op_name

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


# The recording keeps every intermediate tensor of the forward pass until the graph is built
# (torch.export keeps none: it traces with fake tensors).  Batch 1 of the torchvision zoo stays
# under 1 GiB (swin_v2_b, views counted in full); past this bound, torch.export traces instead.
MAX_RECORDED_BYTES = 2 << 30


class Unrecordable(Exception):
    """Why a recording cannot stand for the program; the caller falls back to torch.export."""


class _Guard(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _VALUE_READS:
            raise Unrecordable(f"the model reads tensor values in Python (Tensor.{func.__name__})")
        return func(*args, **(kwargs or {}))


class _Recorder(TorchDispatchMode):
    """A dispatch mode at the Python key, entered below autograd (see ``record``)."""

    def __init__(self, stack: list):
        super().__init__()
        self.stack = stack   # the module path stack, kept by module hooks
        self.ops: list = []  # (op, args, kwargs, result, module stack)
        self.held = 0        # bytes of the results kept so far

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            return func(*args, **kwargs)
        name = op_name(func)
        if name in _REFUSED or (name == "index" and _bool_index(args)):
            raise Unrecordable(f"aten.{name} depends on tensor values")
        if "out" in kwargs:
            raise Unrecordable(f"aten.{name} writes an out= tensor")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out, tuple(self.stack)))
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.held += t.numel() * t.element_size()
        if self.held > MAX_RECORDED_BYTES:
            raise Unrecordable(f"the forward pass holds more than {MAX_RECORDED_BYTES / 2**30:g} GiB of "
                               f"intermediate tensors (torch.export traces without them)")
        return out


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


def record(module: torch.nn.Module, example_inputs: tuple) -> tuple[fx.Graph, list, Any]:
    """Run ``module`` once and return (fx graph, placeholder specs, output spec).

    Placeholder specs are ``(kind, name, tensor)`` in placeholder order, kind one of
    ``input`` / ``parameter`` / ``buffer`` / ``constant``.  Raises ``Unrecordable``."""
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise Unrecordable("a non-tensor example input")
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

    rec = _Recorder(stack)
    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    try:
        # Grad mode on and cuDNN off, as torch.export traces: under no_grad eager code takes fast
        # paths the exported program does not hold (nn.MultiheadAttention's fused kernel), and
        # norms pass the cuDNN flag on as an argument.
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False), \
                torch._C._AutoDispatchBelowAutograd(), _Guard(), rec:
            out = module(*example_inputs)
    except Unrecordable:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export gives the error the user should see
        raise Unrecordable(f"the forward pass raised {type(e).__name__}") from None
    finally:
        for h in hooks:
            h.remove()
    return _build(module, example_inputs, rec.ops, out)


def _build(module, example_inputs, ops, out):
    g = fx.Graph()
    specs: list = []
    # id(tensor) -> the node holding its latest version.  Ids stay unique while it is in use: every
    # result and argument is held by ``ops``, the rest by the module and the caller.
    where: dict[int, fx.Node] = {}

    def placeholder(kind, name, t, node_name):
        n = g.placeholder(node_name)
        n.meta["val"] = t
        specs.append((kind, name, t))
        where[id(t)] = n

    for name, t in zip(_input_names(module, len(example_inputs)), example_inputs):
        placeholder("input", name, t, name)
    # every name of a tied parameter or buffer is a constant, and ops read the last, as in torch.export
    for name, p in module.named_parameters(remove_duplicate=False):
        placeholder("parameter", name, p, "p_" + _ident(name))
    for name, b in module.named_buffers(remove_duplicate=False):
        placeholder("buffer", name, b, "b_" + _ident(name))
    attrs = None  # tensor attributes that are neither parameters nor buffers, found on demand
    lifted = 0

    def node_of(t: torch.Tensor) -> fx.Node:
        nonlocal attrs
        n = where.get(id(t))
        if n is not None:
            return n
        if attrs is None:
            attrs = {id(v): f"{p}.{k}" if p else k for p, m in module.named_modules()
                     for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
        if id(t) not in attrs:
            raise Unrecordable("a tensor that is not an input, parameter, buffer or module attribute")
        name = attrs[id(t)]
        placeholder("constant", name, t, "c_" + _ident(name))  # where it is first read, as below
        return where[id(t)]

    def arg(a):
        if isinstance(a, torch.Tensor):
            return node_of(a)
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a

    for func, args, kwargs, res, stack in ops:
        if func is aten.lift_fresh.default or func is aten.lift_fresh_copy.default:
            src = args[0]
            if id(src) not in where:  # torch.tensor(...) in forward: a constant of the program
                inner = stack[-1][1] if stack else ""  # named after the module that made it, as export does
                name = f"{inner}.lifted_tensor_{lifted}" if inner else f"lifted_tensor_{lifted}"
                placeholder("constant", name, src, "c_" + _ident(name))
                lifted += 1
            # eager lift_fresh returns its argument; as torch.export does, record a copy, so that
            # an in-place op on the result does not write the constant
            func = aten.lift_fresh_copy.default
        if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor) \
                and node_of(args[0]).op == "placeholder":
            raise Unrecordable(f"aten.{op_name(func)} writes an input, parameter or buffer")
        # nodes append in order: constants found on demand land among the ops, which fx allows
        n = g.create_node("call_function", func, arg(args), {k: arg(v) for k, v in kwargs.items()},
                          name=g._target_to_str(func.overloadpacket.__name__))
        n.meta["val"] = res
        n.meta["nn_module_stack"] = {"L__self__" + k: (p, f"{c.__module__}.{c.__qualname__}") for k, p, c in stack}
        if isinstance(res, torch.Tensor):
            where[id(res)] = n
        elif isinstance(res, (list, tuple)):
            for i, r in enumerate(res):
                if not isinstance(r, torch.Tensor):
                    raise Unrecordable(f"aten.{op_name(func)} returns a non-tensor")
                gi = g.call_function(operator.getitem, (n, i))
                gi.meta["val"] = r
                where[id(r)] = gi
        elif res is not None:
            raise Unrecordable(f"aten.{op_name(func)} returns a non-tensor")

    leaves, out_spec = pytree.tree_flatten(out)
    outs = []
    for t in leaves:
        n = where.get(id(t)) if isinstance(t, torch.Tensor) else None
        if n is None or n.op == "placeholder":
            raise Unrecordable("an output that is not a tensor the program computed")
        outs.append(n)
    g.output(tuple(outs))
    return g, specs, out_spec
