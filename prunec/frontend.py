"""Frontend: load a model from any supported spec and trace it into prunec's IR.

Tracing goes through ``torch.export``; the graph is then made functional (no
in-place ops) without decomposing any op, so the IR keeps high-level ATen ops
(conv2d, linear, layer_norm, sdpa).
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind

from .errors import UsageError
from .gc_pause import gc_paused
from .ir import Graph, Node, Value

_DTYPE_NAMES = {
    "float32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "i64": torch.int64, "long": torch.int64,
    "int32": torch.int32, "i32": torch.int32, "bool": torch.bool,
}


@dataclass
class LoadedModel:
    """What a spec resolves to: a module (or only a program) and its example inputs."""

    module: torch.nn.Module | None
    program: torch.export.ExportedProgram | None
    example_inputs: tuple | None
    source: str


def parse_input_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    """``1,3,224,224`` or ``1,128:int64`` -> (shape, dtype)."""
    shape_txt, _, dtype_txt = text.partition(":")
    try:
        shape = tuple(int(s) for s in shape_txt.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected comma-separated integers "
                         f"such as 1,3,224,224 (optionally :int64)") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r}: every dimension must be a positive integer")
    dtype_txt = dtype_txt.strip() or "float32"
    if dtype_txt not in _DTYPE_NAMES:
        raise UsageError(f"--input-shape {text!r}: unknown dtype {dtype_txt!r}; "
                         f"use one of {', '.join(sorted(_DTYPE_NAMES))}")
    return shape, _DTYPE_NAMES[dtype_txt]


def make_inputs(shapes: Sequence[str], seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for text in shapes:
        shape, dtype = parse_input_shape(text)
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.ones(shape, dtype=torch.bool))
        else:  # token ids: small non-negative integers fit every vocabulary
            out.append(torch.randint(0, 100, shape, generator=gen, dtype=dtype))
    return tuple(out)


def _zoo_model(kind: str, name: str) -> torch.nn.Module:
    if kind == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise UsageError(f"'{kind}:{name}' needs torchvision: pip install torchvision") from None
        try:
            return torchvision.models.get_model(name, weights=None)
        except (ValueError, KeyError):
            raise UsageError(f"'{kind}:{name}': torchvision has no model named {name!r}; "
                             f"see torchvision.models.list_models()") from None
    try:
        import timm
    except ImportError:
        raise UsageError(f"'{kind}:{name}' needs timm: pip install timm") from None
    if name not in timm.list_models():
        raise UsageError(f"'{kind}:{name}': timm has no model named {name!r}; see timm.list_models()")
    return timm.create_model(name, pretrained=False)


def load_model(spec: Any, *, trust_pickle: bool = False) -> LoadedModel:
    """Resolve a model spec: an nn.Module, a ``.pt2`` file, a pickled ``.pt`` file
    (only with ``trust_pickle``), ``torchvision:NAME`` / ``timm:NAME`` (random init),
    or ``package.module:factory``."""
    if isinstance(spec, torch.nn.Module):
        return LoadedModel(spec, None, None, type(spec).__name__)
    if isinstance(spec, torch.export.ExportedProgram):
        return LoadedModel(None, spec, _program_inputs(spec), "ExportedProgram")
    if not isinstance(spec, (str, os.PathLike)):
        raise UsageError(f"cannot load a model from {type(spec).__name__}; pass an nn.Module or a spec string")
    spec = os.fspath(spec)
    if spec.endswith(".pt2"):
        if not os.path.isfile(spec):
            raise UsageError(f"{spec}: no such file")
        export_log = logging.getLogger("torch.export")
        level = export_log.level
        export_log.setLevel(logging.CRITICAL)  # torch logs a traceback before raising: keep errors one line
        try:
            ep = torch.export.load(spec)
        except Exception as e:
            raise UsageError(f"{spec}: not a torch.export program ({type(e).__name__}); "
                             f"write one with torch.export.save") from None
        finally:
            export_log.setLevel(level)
        return LoadedModel(None, ep, _program_inputs(ep), spec)
    if spec.endswith((".pt", ".pth")) or os.path.sep in spec or os.path.isfile(spec):
        return _load_pickle(spec, trust_pickle)
    kind, sep, name = spec.partition(":")
    if sep and kind in ("torchvision", "timm"):
        return LoadedModel(_zoo_model(kind, name), None, None, spec)
    if sep and name:
        try:
            mod = importlib.import_module(kind)
        except ImportError as e:
            raise UsageError(f"{spec}: cannot import module {kind!r} ({e})") from None
        factory = getattr(mod, name, None)
        if factory is None:
            raise UsageError(f"{spec}: module {kind!r} has no attribute {name!r}")
        model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"{spec}: the factory returned {type(model).__name__}, not an nn.Module")
        return LoadedModel(model, None, None, spec)
    raise UsageError(f"{spec!r}: not a model spec; use a .pt2/.pt file, torchvision:NAME, "
                     f"timm:NAME or package.module:factory")


def _load_pickle(path: str, trust: bool) -> LoadedModel:
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    if not trust:
        raise UsageError(f"{path}: loading a pickled module runs code from the file; "
                         f"pass --trust-pickle if you trust it, or save a .pt2 with torch.export.save")
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:
        raise UsageError(f"{path}: not a torch file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if isinstance(obj, torch.export.ExportedProgram):
        return LoadedModel(None, obj, _program_inputs(obj), path)
    if not isinstance(obj, torch.nn.Module):
        raise UsageError(f"{path}: holds a {type(obj).__name__}, not a whole pickled nn.Module "
                         f"(a state_dict needs the architecture: use package.module:factory)")
    return LoadedModel(obj, None, None, path)


def _program_inputs(ep: torch.export.ExportedProgram) -> tuple | None:
    ex = getattr(ep, "example_inputs", None)
    if not ex:
        return None
    args, kwargs = ex
    return tuple(args) if not kwargs else None


# ---- tracing -----------------------------------------------------------------

def _prepare(module: torch.nn.Module) -> None:
    module.eval()
    cfg = getattr(module, "config", None)
    if getattr(cfg, "use_cache", False):  # Hugging Face: a KV cache object is not a traceable output
        cfg.use_cache = False


def export_module(module: torch.nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    _prepare(module)
    import torch.fx.config as fx_config
    emit = getattr(fx_config, "do_not_emit_stack_traces", None)  # torch >= 2.12
    if emit is not None:
        fx_config.do_not_emit_stack_traces = True  # nothing reads them; recording costs 10-20% of export
    try:
        ep = torch.export.export(module, tuple(example_inputs), strict=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        shapes = ", ".join(str(list(x.shape)) for x in example_inputs if isinstance(x, torch.Tensor))
        raise UsageError(f"{type(module).__name__} cannot be traced with inputs of shape {shapes}: "
                         f"{first}; check --input-shape") from None
    finally:
        if emit is not None:
            fx_config.do_not_emit_stack_traces = emit
    return ep


# Ops whose result may alias their input: an in-place op on a tensor that has such
# a view cannot be rewritten locally, so those graphs take the general path.
_ALIASING = {"view", "_unsafe_view", "reshape", "expand", "expand_as", "permute", "transpose", "t", "squeeze",
             "unsqueeze", "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "flatten",
             "unflatten", "alias", "detach", "as_strided", "narrow", "diagonal", "view_as", "contiguous",
             "movedim", "swapaxes", "unfold", "indices", "values", "real", "imag"}


def _functionalize_inplace(graph: fx.Graph) -> bool:
    """Rewrite ``relu_(x)`` style ops into their functional form, redirecting later
    reads of ``x`` to the result.  Returns False (graph untouched) when some mutation
    is not this simple case: a mutated input, parameter or buffer, or a mutated
    tensor that has views (other than fresh slices written into: ``x[a:b] = v``).
    ``run_decompositions({})`` does the same in general but costs more than the
    export itself."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    plan = []
    last_write: dict = {}  # base -> order of its last write (through slices, or directly after them)
    heads: set = set()     # the outermost slice of every write through slices planned so far
    for n in nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if not n.target._schema.is_mutable:
            continue
        functional = functional_twin(n.target)
        a = n.args[0] if n.args else None
        if functional is None or not isinstance(a, fx.Node):
            return False
        if writes_nothing(n.target, n.args):
            plan.append((n, functional, a))
            continue
        # ``out[:, :c]`` over all of ``out`` exports as ``alias(out)``: writing into the alias
        # writes its base, which is fine as long as nothing reads the base afterwards.
        base = a
        while base.op == "call_function" and _op_short(base) == "alias" and isinstance(base.args[0], fx.Node):
            prev, base = base, base.args[0]
            if any(u is not prev and (order[u] > order[n] or _op_short(u) in _ALIASING) for u in base.users):
                return False
        chain = _slice_chain(a, n)
        if chain is not None:  # x[a:b, c:d] = v (Swin's attention masks): write through slices
            base = chain[0].args[0]
            if not _fresh(base) or order[chain[0]] < last_write.get(base, -1):
                return False  # the slices were taken before an earlier write to the same tensor
            last_write[base] = order[n]
            heads.add(chain[0])
            plan.append((n, functional, chain))
            continue
        # views of ``a`` other than the slices already written through would see this write
        if not _fresh(base) or any(_op_short(u) in _ALIASING and u not in heads for u in a.users if u is not n):
            return False
        if a is base:
            last_write[a] = order[n]
        plan.append((n, functional, a))
    for base, last in last_write.items():  # a view kept across a write through slices would see it
        if any(_op_short(u) in _ALIASING and u not in heads and order[u] < last for u in base.users):
            return False
    for n, functional, a in plan:
        n.target = functional
        if isinstance(a, list):
            _scatter_back(graph, n, a, order)
            continue
        a = n.args[0]  # an earlier rewrite may have redirected it (two in-place ops on one tensor)
        for u in list(a.users):
            if u is not n and order[u] > order[n]:
                u.replace_input_with(a, n)
    return True


def functional_twin(op: torch._ops.OpOverload):
    """``aten.relu.default`` for ``aten.relu_.default``: the out-of-place overload of an in-place
    op, or None (not an in-place op, or no twin)."""
    name = op._schema.name.split("::")[-1]
    packet = getattr(torch.ops.aten, name[:-1], None) if name.endswith("_") else None
    return getattr(packet, op._overloadname, None) if packet is not None else None


def writes_nothing(op: torch._ops.OpOverload, args) -> bool:
    """Inference dropout: an in-place op that leaves its operand as it is."""
    return op._schema.name.split("::")[-1] in ("dropout_", "feature_dropout_", "alpha_dropout_") \
        and not args[2]


def _fresh(base: fx.Node) -> bool:
    """A tensor the program computed itself, not a view (nor an input, parameter or buffer).
    A part of ``split`` / ``chunk`` / ``unbind`` is a view too: writing it writes their input."""
    if base.op != "call_function":
        return False
    if base.target is _getitem:
        base = base.args[0]
    return _op_short(base) not in _ALIASING


# a view written through, and the op that puts the written view back (same trailing arguments)
_SCATTER = {"slice": torch.ops.aten.slice_scatter.default, "select": torch.ops.aten.select_scatter.default}


def _slice_chain(a: fx.Node, n: fx.Node) -> list[fx.Node] | None:
    """``[slice(base), slice(slice(base)), ...]`` (outermost first; ``select`` too) when ``a`` is
    such a chain and each view is read only by the next one (the last by ``n``)."""
    chain, user = [], n
    while a.op == "call_function" and _op_short(a) in _SCATTER and isinstance(a.args[0], fx.Node) \
            and list(a.users) == [user]:
        chain.append(a)
        user, a = a, a.args[0]
    return chain[::-1] or None


def _scatter_back(graph: fx.Graph, n: fx.Node, chain: list[fx.Node], order: dict) -> None:
    """After the functional ``n`` computed the new contents of the innermost slice, put it back
    with ``slice_scatter`` level by level, and let every later reader of the base read the result."""
    cur = n
    for c in reversed(chain):
        src = c.args[0]
        with graph.inserting_after(cur):
            cur = graph.call_function(_SCATTER[_op_short(c)], (src, cur, *c.args[1:]), dict(c.kwargs))
        cur.meta["val"] = src.meta.get("val")
        cur.meta["nn_module_stack"] = n.meta.get("nn_module_stack")
    base = chain[0].args[0]  # the newest version of it (an earlier write redirected the slice)
    for u in list(base.users):
        if order.get(u, -1) > order[n]:
            u.replace_input_with(base, cur)


def _op_short(n: fx.Node) -> str:
    t = n.target
    return t._schema.name.split("::")[-1] if isinstance(t, torch._ops.OpOverload) else ""


def trace(module_or_program, example_inputs: tuple | None = None, tracer: str = "auto") -> Graph:
    """Trace a module (or take a loaded program) into prunec's IR.

    ``tracer="auto"`` records one real forward pass (``prunec.recorder``) and falls back
    to ``torch.export`` where a recording cannot stand for the program; ``"export"``
    always uses ``torch.export``."""
    if tracer not in ("auto", "export"):
        raise UsageError(f"tracer={tracer!r}: use 'auto' or 'export'")
    decomposed, note = True, "torch.export"
    if isinstance(module_or_program, torch.export.ExportedProgram):
        ep = module_or_program.run_decompositions({})  # a loaded program: never edit the caller's
    else:
        if tracer == "auto":
            graph, why = _record(module_or_program, example_inputs)
            if graph is not None:
                return graph
            note = f"torch.export (the recorder declined: {why})"
        ep = export_module(module_or_program, example_inputs)
        if _functionalize_inplace(ep.graph):  # edits the graph only: nothing runs ep's code after this
            decomposed = False
        else:
            ep = ep.run_decompositions({})
    graph = from_exported_program(ep)
    graph.tracer = note
    if decomposed:
        # After decomposition, fake-tensor and meta shape functions disagree on a few
        # unused side outputs (batch norm's saved statistics); the verifier uses meta,
        # so start from it.  The training IR's shapes already agree (and this is a
        # tenth of the tracing time).
        from .shapes import propagate
        propagate(graph)
    return graph


@gc_paused()  # not around torch.export, which runs for seconds and leaves cyclic garbage
def _record(module: torch.nn.Module, example_inputs: tuple) -> tuple[Graph | None, str]:
    """The recorder's graph, or None and why it declined."""
    from .recorder import Unrecordable, record
    _prepare(module)
    try:
        graph = record(module, tuple(example_inputs))
    except Unrecordable as e:
        return None, str(e)
    graph.tracer = "recorder"
    return graph, ""


def from_exported_program(ep: torch.export.ExportedProgram) -> Graph:
    specs = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            specs.append(("input", spec.arg.name, None))
        else:
            kind = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer"}.get(spec.kind, "constant")
            name = spec.target
            specs.append((kind, name, ep.state_dict[name] if name in ep.state_dict else ep.constants[name]))
    user = [spec.kind == OutputKind.USER_OUTPUT for spec in ep.graph_signature.output_specs]
    return _to_ir(ep.graph, specs, ep.call_spec.out_spec if ep.call_spec else None, user)


def _to_ir(fx_graph: fx.Graph, specs: list, out_spec, user_outputs: list[bool] | None = None) -> Graph:
    """Convert an ATen-level fx graph into the IR.  ``specs`` gives, per placeholder,
    (kind, name, tensor): every value is named by ``name`` (an input's name as ``forward``
    calls it, a constant's fully qualified name); constants hold ``tensor``."""
    env: dict[fx.Node, Any] = {}
    inputs: list[Value] = []
    input_names: list[str] = []
    consts: dict[str, Value] = {}
    tensors: dict[str, torch.Tensor] = {}
    placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    for fxn, (kind, name, t) in zip(placeholders, specs):
        if kind == "input":
            val = fxn.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise UsageError(f"input {fxn.name} is not a tensor; prunec traces tensor inputs only")
            v = Value(name, val.shape, val.dtype, kind="input")
            inputs.append(v)
            input_names.append(name)
        else:
            t = t.detach()
            if isinstance(t, torch.nn.Parameter):
                t = t.data
            v = Value(name, t.shape, t.dtype, kind=kind)
            consts[name] = v
            tensors[name] = t
        env[fxn] = v

    nodes: list[Node] = []
    for fxn in fx_graph.nodes:
        if fxn.op != "call_function":
            continue
        if fxn.target is _getitem:
            src, idx = fxn.args
            env[fxn] = env[src][idx]
            continue
        val = fxn.meta.get("val")
        multi = isinstance(val, (list, tuple))
        vals = list(val) if multi else ([] if val is None else [val])
        outs = []
        for i, t in enumerate(vals):
            name = fxn.name if not multi else f"{fxn.name}_{i}"
            if isinstance(t, torch.Tensor):
                if not all(isinstance(d, int) for d in t.shape):
                    raise UsageError(f"node {fxn.name} ({_op_short(fxn) or fxn.target}): its output shape "
                                     f"{list(t.shape)} depends on tensor values; prunec needs static shapes "
                                     f"(compute the shape from input shapes, or mask instead of indexing)")
                outs.append(Value(name, t.shape, t.dtype))
            else:
                outs.append(Value(name, (), torch.float32, kind="activation"))
        multi = multi or val is None
        node = Node(fxn.name, fxn.target, _map(fxn.args, env), _map(fxn.kwargs, env), outs, multi,
                    {"stack": fxn.meta.get("nn_module_stack")})
        nodes.append(node)
        env[fxn] = outs if multi else outs[0]

    out_node = next(n for n in fx_graph.nodes if n.op == "output")
    outputs = [env[a] for i, a in enumerate(out_node.args[0]) if user_outputs is None or user_outputs[i]]
    return Graph(inputs, nodes, outputs, consts, tensors, out_spec, input_names)


_getitem = __import__("operator").getitem


def _map(a, env):
    if isinstance(a, fx.Node):
        return env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_map(x, env) for x in a)
    if isinstance(a, dict):
        return {k: _map(v, env) for k, v in a.items()}
    return a
