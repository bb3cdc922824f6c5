"""Does an updated ``nn.Module`` compute prunec's graph?  Answered without computing.

After a pass pipeline, the torch backend writes the graph's tensors and layer widths back
into the user's module and must then show that the module's own Python code computes the
graph (code can hard-code a width).  Running both on the example inputs and comparing
costs two forward passes, the first paying oneDNN's kernel creation for every new conv
shape: 41 of mnasnet0_75's 127 ms pruning call.

This check replays the module's forward pass under the recorder (``prunec.recorder``) and
matches each ATen op, as it is dispatched, against the graph's next node: the same op
(after the recorder's in-place rewrite), the same non-tensor arguments, tensor arguments
that are the node's own operands (the example inputs, the graph's parameters, buffers and
constants by name and value, earlier nodes' results).  Nothing is computed: a matched op
returns uninitialised tensors of the node's shapes (views run for real on them, so
strides stay right; an in-place op returns its operand unwritten).  If every op matches
and the outputs are the graph's outputs, the module runs the graph's program, op for op,
on every input the recording stands for, a stronger statement than one numeric
comparison, at the cost of the Python code alone (mnasnet0_75: ~9 ms).
The one thing told apart less finely than by running: computed results come out
contiguous, so Python code that branches on strides sees the contiguous case.

Anything else (an op that differs, the Python code reading a value, an op that writes
state or returns no self, a graph from ``torch.export``) answers False, and the caller
falls back to the numeric comparison, which then names what differs.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .frontend import _ALIASING
from .ir import Graph, Value, iter_values, op_name
from .recorder import Unrecordable, _General, _run, _Walker, functional_target

aten = torch.ops.aten
_ABSENT = object()  # a module tensor the graph does not hold (or holds with other values)


class _Mismatch(Exception):
    pass


def runs_graph(module: torch.nn.Module, graph: Graph, example_inputs: tuple) -> bool:
    """True when ``module``'s forward pass dispatches exactly ``graph``'s program."""
    if getattr(graph, "tracer", "") != "recorder" or \
            not all(isinstance(x, torch.Tensor) for x in example_inputs):
        return False  # torch.export's programs differ from eager dispatch in small ways
    sink = _MatchSink(graph)
    try:
        walker = _Walker(module, example_inputs, sink)
        return walker.finish(_run(module, example_inputs, walker.op, sink.fake))
    except (Unrecordable, _General, _Mismatch):
        return False


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True  # the module's Parameter wraps the graph's tensor (the usual case after an update)
    return torch.equal(a, b.detach())


def _same(a, b) -> bool:
    """Structural equality of op arguments; values are compared by identity."""
    if isinstance(a, Value) or isinstance(b, Value):
        return a is b
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b  # 1, 1.0 and True are different arguments


def _same_args(func, a: tuple, b: tuple) -> bool:
    """``_same`` for positional arguments, where the dispatcher leaves out trailing ones
    that equal their schema default and a rewritten IR node may spell them out."""
    k = min(len(a), len(b))
    if not _same(a[:k], b[:k]):
        return False
    longer, schema = (a if len(a) > k else b), func._schema.arguments
    return all(i < len(schema) and schema[i].has_default_value() and _same(longer[i], schema[i].default_value)
               for i in range(k, len(longer)))


class _MatchSink:
    """A ``_Walker`` sink that builds nothing: it hands out the graph's own values and
    raises ``_Mismatch`` where the module's op differs from the graph's next node."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = graph.nodes
        self.i = 0
        self.inputs = list(graph.inputs)
        self.n_inputs = 0
        self.viewed: set[int] = set()

    def placeholder(self, kind, name, t, node_name):
        if kind == "input":
            if self.n_inputs >= len(self.inputs):
                raise _Mismatch
            self.n_inputs += 1
            return self.inputs[self.n_inputs - 1]
        v = self.graph.consts.get(name)
        if v is None or v.kind != kind or not _same_tensor(self.graph.tensors[name], t):
            return _ABSENT  # a mismatch only if an op reads it
        return v

    def is_state(self, v) -> bool:
        return not isinstance(v, Value) or v.kind != "activation"

    def _next(self):
        if self.i >= len(self.nodes):
            raise _Mismatch
        return self.nodes[self.i]

    def fake(self, func, args, kwargs):
        """The result the op would give, without running it (NotImplemented: run it)."""
        name = op_name(func)
        if name in _ALIASING or func is aten.lift_fresh.default:
            return NotImplemented  # no arithmetic, and the real strides
        rets = func._schema.returns
        if func._schema.is_mutable:
            # only ``op_(x, ...) -> x`` on activations: the walker checks what it writes
            if not (name.endswith("_") and len(rets) == 1 and args and isinstance(args[0], torch.Tensor)) \
                    or name[:-1] in _ALIASING:  # ``transpose_``: changes the operand's shape, not its values
                raise _Mismatch
            return args[0]
        n = self._next()
        if not rets:
            return None
        dev = next((a.device for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)), None) \
            or kwargs.get("device") or "cpu"
        made = [torch.empty(v.shape, dtype=v.dtype, device=dev) for v in n.outputs]
        if not n.multi:
            if len(made) != 1:
                raise _Mismatch
            return made[0]
        if len(rets) == 1 and isinstance(rets[0].type, torch.ListType):
            return made
        if len(made) != len(rets):
            raise _Mismatch
        return tuple(made)

    def call(self, func, args, kwargs, res, stack):
        n = self._next()
        target = functional_target(func, args, self.viewed) if func._schema.is_mutable else func
        if target is not n.target or not _same_args(func, args, n.args) or not _same(kwargs, n.kwargs):
            raise _Mismatch
        if op_name(func) in _ALIASING:
            self.viewed.update(id(v) for v in iter_values(args))
        self.i += 1
        return n.outputs if n.multi else n.out

    def output(self, outs, out_spec):
        g = self.graph
        return (self.i == len(self.nodes) and len(outs) == len(g.outputs)
                and all(a is b for a, b in zip(outs, g.outputs)) and out_spec == g.out_spec)
