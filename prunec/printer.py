"""Stable, readable text form of the IR (diffable between passes, used in golden tests)."""
from __future__ import annotations

import torch

from .ir import Graph, Node, Value, full_op_name

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "i1",
}


def type_str(v: Value) -> str:
    return f"{_DTYPES.get(v.dtype, str(v.dtype))}[{','.join(map(str, v.shape))}]"


def _arg(a) -> str:
    if isinstance(a, Value):
        return repr(a)
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, torch.dtype):
        return _DTYPES.get(a, str(a))
    if isinstance(a, (torch.device, torch.memory_format, torch.layout)):
        return str(a)
    return repr(a)


def node_str(n: Node) -> str:
    parts = [_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()]
    lhs = ", ".join(repr(o) for o in n.outputs)
    types = ", ".join(type_str(o) for o in n.outputs)
    return f"{lhs} = {full_op_name(n.target)}({', '.join(parts)}) : {types}"


def print_graph(g: Graph) -> str:
    ins = ", ".join(f"{v!r}: {type_str(v)}" for v in g.inputs)
    lines = [f"graph({ins}) {{"]
    for name, v in g.consts.items():
        ann = g.annotations.get(name)
        tail = f"  # {', '.join(f'{k}={v}' for k, v in sorted(ann.items()) if not k.startswith('_'))}" if ann else ""
        lines.append(f"  {v.kind} {v!r}: {type_str(v)}{tail}")
    for n in g.nodes:
        lines.append("  " + node_str(n))
    lines.append("  return " + ", ".join(repr(v) for v in g.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
