"""Torch backend: emit the compacted graph as (1) the user's own module, updated
in place, and (2) a ``torch.export`` program.

(2) is always exact: it is generated from the IR.  (1) is checked against (2)
on the example inputs; where a module's Python code cannot follow the change
(a hard-coded shape, a structure no edit knows), the result says which module
and why instead of returning a silently wrong model.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from prunec.ir import Graph, Value, map_values


def _build_root(graph: Graph) -> torch.nn.Module:
    root = torch.nn.Module()
    for name, v in graph.consts.items():
        *path, leaf = name.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p) or not isinstance(getattr(mod, p), torch.nn.Module):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        t = graph.tensors[name]
        if v.kind == "parameter":
            mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=t.is_floating_point()))
        else:
            mod.register_buffer(leaf, t, persistent=v.kind == "buffer")
    return root


class CompiledModule(torch.nn.Module):
    """The IR as a runnable module: an FX GraphModule plus the output structure."""

    def __init__(self, gm: fx.GraphModule, out_spec):
        super().__init__()
        self.gm = gm
        self._out_spec = out_spec

    def forward(self, *inputs):
        flat = self.gm(*inputs)
        if self._out_spec is None:
            return flat[0] if len(flat) == 1 else tuple(flat)
        return pytree.tree_unflatten(list(flat), self._out_spec)


def to_module(graph: Graph) -> CompiledModule:
    root = _build_root(graph)
    g = fx.Graph()
    env: dict[Value, fx.Node] = {}
    for v in graph.inputs:
        env[v] = g.placeholder(v.name)
    for name, v in graph.consts.items():
        env[v] = g.get_attr(name)
    look = lambda v: env[v]  # noqa: E731
    for n in graph.nodes:
        call = g.call_function(n.target, map_values(n.args, look), map_values(n.kwargs, look))
        call.name = n.name
        if n.multi:
            for i, o in enumerate(n.outputs):
                env[o] = g.call_function(operator.getitem, (call, i))
        else:
            env[n.out] = call
    g.output(tuple(env[v] for v in graph.outputs))
    return CompiledModule(fx.GraphModule(root, g), graph.out_spec)


def export_program(graph: Graph, example_inputs: tuple) -> torch.export.ExportedProgram:
    mod = to_module(graph).eval()
    return torch.export.export(mod, tuple(example_inputs), strict=False)


# ---- in-place update of the user's module ------------------------------------------

@dataclass
class ModuleUpdate:
    ok: bool
    problems: list[str] = field(default_factory=list)
    config_rewritten: dict = field(default_factory=dict)  # Hugging Face config field -> [old, new]
    config_not_rewritten: list[str] = field(default_factory=list)  # "field: why", see hf_config.py


def _set_tensor(owner, leaf: str, t: torch.Tensor, kind: str) -> None:
    if not isinstance(owner, torch.nn.Module):  # a tensor attribute of some other object
        setattr(owner, leaf, t.clone())
    elif kind == "parameter":
        old = owner._parameters.get(leaf)
        req = old.requires_grad if isinstance(old, torch.nn.Parameter) else t.is_floating_point()
        p = torch.nn.Parameter(t.clone(), requires_grad=req)
        if leaf in owner._parameters:
            owner._parameters[leaf] = p  # what setattr does for a parameter, without its checks
        else:
            setattr(owner, leaf, p)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = t.clone()
    else:
        setattr(owner, leaf, t.clone())


def _conv_groups(graph: Graph) -> dict[str, int]:
    """Weight name -> the groups argument of the convolution reading it."""
    out = {}
    for n in graph.nodes:
        if n.op in ("conv2d", "conv1d", "conv3d", "convolution"):
            w = n.args[1]
            groups = n.arg(6, "groups", 1) if n.op != "convolution" else n.arg(8, "groups", 1)
            out[w.name] = groups
    return out


_SIZED = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm,
          torch.nn.GroupNorm, torch.nn.Embedding)


def sync_attributes(module: torch.nn.Module, graph: Graph) -> list[str]:
    """Make layer attributes (``in_channels``, ``out_features``, ...) agree with
    the parameter shapes, so the module keeps working with the user's code.
    Returns a line per module whose code cannot express its new widths."""
    groups = _conv_groups(graph)
    for name, m in module.named_modules():
        if not isinstance(m, _SIZED):  # most modules (activations, containers) have no weight to read
            continue
        w = getattr(m, "weight", None)
        pre = f"{name}.weight" if name else "weight"
        if isinstance(m, torch.nn.modules.conv._ConvNd) and isinstance(w, torch.Tensor):
            m.groups = groups.get(pre, m.groups)
            if m.transposed:
                m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
            else:
                m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
        elif isinstance(m, torch.nn.Linear) and isinstance(w, torch.Tensor):
            m.out_features, m.in_features = w.shape
        elif isinstance(m, torch.nn.modules.batchnorm._NormBase):
            ref = w if isinstance(w, torch.Tensor) else m.running_mean
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, torch.nn.LayerNorm) and isinstance(w, torch.Tensor):
            m.normalized_shape = tuple(w.shape)
        elif isinstance(m, torch.nn.GroupNorm) and isinstance(w, torch.Tensor):
            m.num_channels = w.shape[0]
        elif isinstance(m, torch.nn.Embedding):
            m.num_embeddings, m.embedding_dim = w.shape
    from .attention_attributes import sync_layers
    return sync_layers(module, graph)


def apply_to_module(module: torch.nn.Module, graph: Graph, example_inputs: tuple,
                    reference_outputs: list | None = None) -> ModuleUpdate:
    """Update ``module`` in place to hold the graph's parameters and structure,
    then check it against the graph on the example inputs."""
    problems: list[str] = []
    for edit in graph.module_edits:
        try:
            edit.apply(module)
        except Exception as e:  # structure the edit does not recognise
            problems.append(f"{edit.describe()}: {type(e).__name__}: {e}")
    owners: dict[str, object] = {"": module}  # a path's object, looked up once for all its tensors
    for name, v in graph.consts.items():
        t = graph.tensors[name]
        path, _, leaf = name.rpartition(".")
        owner = _lookup(module, path, owners)
        cur = getattr(owner, leaf, None) if owner is not None else None
        cur = cur if isinstance(cur, torch.Tensor) else None
        if cur is None and v.kind == "constant":
            continue  # a tensor literal of the forward code (lifted by export), not module state
        if cur is None:
            problems.append(f"{name}: the IR has this {v.kind} but the module has no such attribute")
            continue
        if cur is not t and (cur.shape != t.shape or cur.dtype != t.dtype or not torch.equal(cur, t)):
            _set_tensor(owner, leaf, t, v.kind)
    problems += sync_attributes(module, graph)
    from .hf_config import rewrite_config
    rewritten, not_rewritten = rewrite_config(module)
    if not problems:
        problems += check_module(module, graph, example_inputs, reference_outputs)
    return ModuleUpdate(not problems, problems, rewritten, not_rewritten)


def _lookup(module: torch.nn.Module, path: str, owners: dict):
    """The object at dotted ``path`` under ``module`` (None if there is none), memoised in ``owners``."""
    if path in owners:
        return owners[path]
    parent, _, leaf = path.rpartition(".")
    obj = _lookup(module, parent, owners)
    obj = owners[path] = getattr(obj, leaf, None) if obj is not None else None
    return obj


def check_module(module, graph: Graph, example_inputs: tuple, reference_outputs=None) -> list[str]:
    """Problems with ``module`` computing ``graph`` on the example inputs (none: an empty list).
    First without computing (``prunec.module_check``: the module dispatches the graph's program
    op for op); where that cannot say, by running both and comparing."""
    from prunec.ir import interpret
    from prunec.module_check import runs_graph
    module.eval()
    if reference_outputs is None and runs_graph(module, graph, example_inputs):
        return []
    if reference_outputs is None:
        with torch.no_grad():
            reference_outputs = interpret(graph, example_inputs)
    try:
        with torch.no_grad():
            got = module(*example_inputs)
    except Exception as e:
        where = _module_in_traceback(module, e)
        return [f"the updated module fails to run{where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"]
    flat = [x for x in pytree.tree_leaves(got) if isinstance(x, torch.Tensor)]
    if len(flat) != len(reference_outputs):
        return [f"the updated module returns {len(flat)} tensors, the IR {len(reference_outputs)}"]
    for i, (a, b) in enumerate(zip(flat, reference_outputs)):
        if a.shape != b.shape:
            return [f"output {i}: the updated module gives shape {list(a.shape)}, the IR {list(b.shape)}"]
        scale = b.abs().max().item() if b.numel() and b.is_floating_point() else 1.0
        if b.is_floating_point() and (a - b).abs().max().item() > 1e-4 * max(scale, 1e-6):
            return [f"output {i}: the updated module's result differs from the IR's "
                    f"(its Python code likely hard-codes a shape)"]
    return []


def _module_in_traceback(module: torch.nn.Module, exc: BaseException) -> str:
    """Name the innermost submodule whose forward was running when ``exc`` was raised."""
    by_code = {}
    for name, m in module.named_modules():
        fwd = getattr(type(m), "forward", None)
        if fwd is not None and hasattr(fwd, "__code__"):
            by_code.setdefault(fwd.__code__, name or type(module).__name__)
    tb, hit = exc.__traceback__, None
    while tb is not None:
        name = by_code.get(tb.tb_frame.f_code)
        if name is not None:
            hit = name
        tb = tb.tb_next
    return f" in module {hit!r}" if hit else ""
