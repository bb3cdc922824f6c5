"""prunec's IR: a flat, typed list of ATen op calls over named values.

Values carry a static shape and dtype.  Parameters, buffers and lifted constants
are values too (``kind != "activation"``), named by the module's fully
qualified names so that results map back onto the user's module.  Ops keep
their ATen target, so no op is re-implemented by hand: running the IR calls the
same kernels the original model called.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.utils._pytree as pytree


class Value:
    """A tensor in the graph: an input, a constant (param/buffer) or an op result."""

    __slots__ = ("name", "shape", "dtype", "producer", "index", "kind")

    def __init__(self, name: str, shape, dtype: torch.dtype, kind: str = "activation",
                 producer: "Node | None" = None, index: int = 0):
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.kind = kind  # "input" | "parameter" | "buffer" | "constant" | "activation"
        self.producer = producer
        self.index = index

    @property
    def is_const(self) -> bool:
        return self.kind in ("parameter", "buffer", "constant")

    def __repr__(self) -> str:
        sigil = "@" if self.is_const else "%"
        return f"{sigil}{self.name}"


def map_values(obj: Any, fn: Callable[[Value], Any]) -> Any:
    """Apply ``fn`` to every Value inside a nested args structure."""
    if isinstance(obj, Value):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_values(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_values(v, fn) for k, v in obj.items()}
    return obj


def _collect_values(obj: Any, out: list) -> None:
    for o in obj:
        if isinstance(o, Value):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            _collect_values(o, out)
        elif isinstance(o, dict):
            _collect_values(o.values(), out)


def iter_values(obj: Any) -> Iterator[Value]:
    """Every Value inside a nested args structure, in order."""
    out: list[Value] = []
    _collect_values((obj,), out)
    return iter(out)


class Node:
    """One op call.  ``outputs`` has one Value per tensor the op returns
    (a multi-output op such as ``split`` gets several; FX's getitem nodes are folded)."""

    __slots__ = ("name", "target", "args", "kwargs", "outputs", "multi", "meta")

    def __init__(self, name: str, target: Callable, args: tuple, kwargs: dict,
                 outputs: list[Value], multi: bool, meta: dict | None = None):
        self.name = name
        self.target = target
        self.args = args
        self.kwargs = kwargs
        self.outputs = outputs
        self.multi = multi  # the op returns a tuple/list even if it has one output
        self.meta = meta or {}
        for i, v in enumerate(outputs):
            v.producer, v.index = self, i

    @property
    def out(self) -> Value:
        return self.outputs[0]

    @property
    def op(self) -> str:
        """Short op name, e.g. ``conv2d`` for ``aten.conv2d.default``."""
        return op_name(self.target)

    def inputs(self) -> list[Value]:
        # the analyses ask for every node's inputs, often: a loop, not nested generators (4x faster)
        out: list[Value] = []
        _collect_values(self.args, out)
        if self.kwargs:
            _collect_values(self.kwargs.values(), out)
        return out

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument lookup following the ATen schema."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def set_arg(self, i: int, name: str, value: Any) -> None:
        if i < len(self.args):
            args = list(self.args)
            args[i] = value
            self.args = tuple(args)
        else:
            self.kwargs = {**self.kwargs, name: value}

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op})"


_OP_NAMES: dict = {}  # target -> short name: the passes and analyses ask Node.op thousands of times


def op_name(target: Callable) -> str:
    try:
        return _OP_NAMES[target]
    except (KeyError, TypeError):  # TypeError: an unhashable target
        pass
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    else:
        name = getattr(target, "__name__", str(target))
    try:
        _OP_NAMES[target] = name
    except TypeError:
        pass
    return name


def full_op_name(target: Callable) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::")
        return f"{ns}.{name}.{target._overloadname}"
    mod = getattr(target, "__module__", "") or ""
    return f"{mod}.{getattr(target, '__name__', target)}".lstrip(".")


@dataclass
class Graph:
    inputs: list[Value]
    nodes: list[Node]
    outputs: list[Value]
    consts: dict[str, Value] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    out_spec: Any = None
    input_names: list[str] = field(default_factory=list)
    # Per-parameter annotations set by compression passes (sparse form, codebook, ...)
    annotations: dict[str, dict] = field(default_factory=dict)
    # Structural edits the torch backend replays on the user's module (e.g. a folded
    # batch norm becomes nn.Identity); each has ``apply(module)`` and ``describe()``.
    module_edits: list = field(default_factory=list)
    # How the graph was traced ("recorder", or "torch.export" and why the recorder declined)
    tracer: str = ""

    # ---- queries -------------------------------------------------------
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.consts.values()
        for n in self.nodes:
            yield from n.outputs

    def users(self) -> dict[Value, list[Node]]:
        users: dict[Value, list[Node]] = {v: [] for v in self.values()}
        for n in self.nodes:
            for v in n.inputs():
                if n not in users.setdefault(v, []):
                    users[v].append(n)
        return users

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def param_count(self) -> int:
        return sum(t.numel() for n, t in self.tensors.items()
                   if self.consts[n].kind == "parameter")

    # ---- edits ---------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        taken = {v.name for v in self.values()} | {n.name for n in self.nodes}
        if base not in taken:
            return base
        for i in itertools.count(1):
            cand = f"{base}_{i}"
            if cand not in taken:
                return cand
        raise AssertionError

    def set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Replace a constant's data (e.g. a pruned weight), keeping its Value in sync."""
        v = self.consts[name]
        self.tensors[name] = tensor
        v.shape, v.dtype = tuple(tensor.shape), tensor.dtype

    def add_const(self, name: str, tensor: torch.Tensor, kind: str = "parameter") -> Value:
        if name in self.consts:
            raise ValueError(f"constant {name!r} already exists")
        v = Value(name, tensor.shape, tensor.dtype, kind=kind)
        self.consts[name] = v
        self.tensors[name] = tensor
        return v

    def replace_uses(self, old: Value, new: Value) -> None:
        swap = lambda v: new if v is old else v  # noqa: E731
        for n in self.nodes:
            n.args = map_values(n.args, swap)
            n.kwargs = map_values(n.kwargs, swap)
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_unused_consts(self) -> list[str]:
        used = {v.name for n in self.nodes for v in n.inputs() if v.is_const}
        used |= {v.name for v in self.outputs if v.is_const}
        dead = [k for k in self.consts if k not in used]
        for k in dead:
            del self.consts[k]
            del self.tensors[k]
        return dead

    def clone(self) -> "Graph":
        """Deep copy of the structure; tensors are shared (passes replace, never mutate)."""
        vmap: dict[int, Value] = {}

        def cp(v: Value) -> Value:
            if id(v) not in vmap:
                vmap[id(v)] = Value(v.name, v.shape, v.dtype, v.kind)
            return vmap[id(v)]

        inputs = [cp(v) for v in self.inputs]
        consts = {k: cp(v) for k, v in self.consts.items()}
        nodes = []
        for n in self.nodes:
            nodes.append(Node(n.name, n.target, map_values(n.args, cp), map_values(n.kwargs, cp),
                              [cp(o) for o in n.outputs], n.multi, dict(n.meta)))
        return Graph(inputs, nodes, [cp(v) for v in self.outputs], consts, dict(self.tensors),
                     self.out_spec, list(self.input_names),
                     {k: dict(v) for k, v in self.annotations.items()}, list(self.module_edits), self.tracer)


# ---- execution ------------------------------------------------------------

def call_node(node: Node, env: dict[Value, Any]) -> Any:
    lookup = lambda v: env[v]  # noqa: E731
    return node.target(*map_values(node.args, lookup), **map_values(node.kwargs, lookup))


def bind_results(node: Node, result: Any, env: dict[Value, Any]) -> None:
    if not node.outputs:  # ops run for their checks only (asserts)
        return
    if node.multi:
        for v, r in zip(node.outputs, result):
            env[v] = r
    else:
        env[node.out] = result


def interpret(graph: Graph, inputs: Iterable[torch.Tensor], tensors: dict | None = None) -> list:
    """Run the graph eagerly; returns the flat list of outputs."""
    tensors = graph.tensors if tensors is None else tensors
    env: dict[Value, Any] = {}
    for v, x in zip(graph.inputs, inputs):
        env[v] = x
    for name, v in graph.consts.items():
        env[v] = tensors[name]
    for n in graph.nodes:
        bind_results(n, call_node(n, env), env)
    return [env[v] for v in graph.outputs]


def unflatten_outputs(graph: Graph, flat: list) -> Any:
    if graph.out_spec is None:
        return flat[0] if len(flat) == 1 else tuple(flat)
    return pytree.tree_unflatten(flat, graph.out_spec)
