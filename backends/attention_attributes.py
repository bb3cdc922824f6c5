"""Keep the int attributes that layers' forward code reshapes with in step with
the pruned parameter shapes.

- Hugging Face style attention (``num_heads`` / ``head_dim`` / ``all_head_size``
  ..., fused ``c_attn`` / ``qkv``; HF ``Conv1D.nf``): recomputed from the
  projection widths.
- ``nn.MultiheadAttention``: ``embed_dim``, ``kdim``, ``vdim``, ``num_heads``,
  ``head_dim``, ``_qkv_same_embed_dim``.  Its code takes the head width as
  ``embed_dim // num_heads`` from the query width, so the query width, the
  q/k/v widths and out_proj's input width must all be equal; when pruning made
  them differ, the module is named as a problem instead.
- torchvision ``VisionTransformer.hidden_dim`` (its ``_process_input``
  reshapes with it) and Swin's ``ShiftedWindowAttention`` (its code takes the
  head width as ``C // num_heads`` from the input width ``C``; same kind of
  problem line when qkv is not ``3*C`` wide).

``apply_to_module`` still compares the module with the IR afterwards.
"""
from __future__ import annotations

import torch

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_kv")
Q_NAMES = ("q_proj", "query", "q", "q_lin")
K_NAMES = ("k_proj", "key", "k", "k_lin")
FUSED_NAMES = ("c_attn", "qkv", "Wqkv", "query_key_value")


def _width(m) -> int | None:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if hasattr(m, "nf"):  # HF Conv1D stores the weight as [in, out]
        return w.shape[1]
    return w.shape[0]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _plain_attr(m, name: str):
    """``getattr(m, name, None)`` for an attribute that is not a parameter, buffer or submodule
    (an int, a flag): on a module, a missing name costs ``Module.__getattr__`` an exception with
    a formatted message, and the checks below ask for ~10 missing names on every module."""
    d = getattr(m, "__dict__", None)
    if d is not None and name in d:
        return d[name]
    return getattr(m, name, None) if hasattr(type(m), name) else None


def _first(obj, names):
    for n in names:
        if _is_int(_plain_attr(obj, n)):
            return n
    return None


def _child(m, names):
    mods = getattr(m, "_modules", None) or {}
    return next((mods[n] for n in names if isinstance(mods.get(n), torch.nn.Module)), None)


def attention_widths(m: torch.nn.Module, hd: int | None = None) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head width) of a Hugging Face style
    attention module, read from its projection widths and the head width
    (``hd``, else its own attribute); None if it is not one."""
    if isinstance(m, torch.nn.MultiheadAttention):
        return None
    dim_attr = _first(m, DIM_ATTRS)
    if dim_attr is None or getattr(m, dim_attr) <= 0:
        return None
    hd = hd or getattr(m, dim_attr)
    q, k, fused = _child(m, Q_NAMES), _child(m, K_NAMES), _child(m, FUSED_NAMES)
    if q is not None and _width(q):
        heads = _width(q) // hd
        kv = _width(k) // hd if k is not None and _width(k) else heads
    elif fused is not None and _width(fused):
        heads = kv = _width(fused) // (3 * hd)
    else:
        return None
    return heads, kv, hd


def graph_head_widths(graph) -> dict[str, int]:
    """Module path -> head width, read from the IR's attention ops and the module each was
    traced in.  A projection width alone is ambiguous after head-width pruning (6 heads of 64
    and 12 heads of 32 are both 384 wide)."""
    from prunec.head_views import SDPA_OPS, bmm_attentions
    out = {}
    for n in graph.nodes:
        stack = n.meta.get("stack") if n.op in SDPA_OPS else None
        if stack and n.args[0].shape:
            out[_traced_in(n)] = n.args[0].shape[-1]
    producer = {id(o): n for n in graph.nodes for o in n.outputs}
    for q, _, _, _, result in bmm_attentions(graph):  # "eager" attention: read q's width at weights @ v
        n = producer.get(id(result))
        if n is not None and n.meta.get("stack") and q.shape:
            out[_traced_in(n)] = q.shape[-1]
    return out


def _traced_in(node) -> str:
    """Path of the innermost module ``node`` was traced in (``nn_module_stack``)."""
    return list(node.meta["stack"].values())[-1][0]


def sync_attention(module: torch.nn.Module, head_widths: dict | None = None) -> list[str]:
    """Hugging Face style attention and ``Conv1D.nf``; returns the names of the
    attention modules it updated.  ``head_widths``: :func:`graph_head_widths`."""
    touched = []
    head_widths = head_widths or {}
    for name, m in module.named_modules():
        if _plain_attr(m, "nf") is not None and isinstance(getattr(m, "weight", None), torch.Tensor):
            m.nf = m.weight.shape[1]
        widths = attention_widths(m, head_widths.get(name))
        if widths is None:
            continue
        heads, kv, hd = widths
        for a in DIM_ATTRS:  # head-width pruning changes it; the score scale attribute stays
            if _is_int(_plain_attr(m, a)):
                setattr(m, a, hd)
        if _child(m, Q_NAMES) is None and _plain_attr(m, "split_size") is not None:  # GPT-2's fused c_attn
            m.split_size = heads * hd
        for a in HEAD_ATTRS:
            if _is_int(_plain_attr(m, a)):
                setattr(m, a, heads)
        for a in KV_ATTRS:
            if _is_int(_plain_attr(m, a)):
                setattr(m, a, kv)
        if _is_int(_plain_attr(m, "num_key_value_groups")) and kv:
            m.num_key_value_groups = heads // kv
        for a in ("all_head_size", "inner_dim"):
            if _is_int(_plain_attr(m, a)):
                setattr(m, a, heads * hd)
        touched.append(name)
    return touched


def _sync_mha(name: str, m: torch.nn.MultiheadAttention) -> str | None:
    packed = m.in_proj_weight is not None
    if packed:
        rows, eq = m.in_proj_weight.shape
        q_w = k_w = v_w = rows // 3 if rows % 3 == 0 else -1
        kdim = vdim = eq
    else:
        (q_w, eq), (k_w, kdim), (v_w, vdim) = (m.q_proj_weight.shape, m.k_proj_weight.shape,
                                               m.v_proj_weight.shape)
    out_in = m.out_proj.weight.shape[1]
    hd = m.head_dim
    if not (q_w == k_w == v_w == out_in == eq) or q_w % hd:
        return (f"{name or 'module'}: nn.MultiheadAttention takes its head width as embed_dim // num_heads "
                f"from the query width, so the query, q/k/v and out_proj input widths must be equal; "
                f"pruned: query {eq}, q/k/v {q_w}/{k_w}/{v_w}, out_proj input {out_in}")
    m.embed_dim, m.kdim, m.vdim = eq, kdim, vdim
    m.num_heads, m.head_dim = q_w // hd, hd
    m._qkv_same_embed_dim = packed  # the parameter layout decides which code path reads them
    return None


def _is_swin_attention(m) -> bool:
    return (type(m).__name__.startswith("ShiftedWindowAttention") and _is_int(_plain_attr(m, "num_heads"))
            and isinstance(getattr(m, "qkv", None), torch.nn.Linear)
            and isinstance(getattr(m, "proj", None), torch.nn.Linear))


def _sync_swin(name: str, m) -> str | None:
    c = m.qkv.weight.shape[1]
    qkv_w, proj_in = m.qkv.weight.shape[0], m.proj.weight.shape[1]
    if qkv_w != 3 * c or proj_in != c:
        return (f"{name}: {type(m).__name__} takes its head width as C // num_heads from its input width C, "
                f"so qkv must be 3*C wide and proj must read C; pruned: C {c}, qkv {qkv_w} wide, "
                f"proj reads {proj_in}")
    table = getattr(m, "relative_position_bias_table", None)  # [window cells, heads] (v1)
    scale = getattr(m, "logit_scale", None)  # [heads, 1, 1] (v2)
    heads = table.shape[-1] if isinstance(table, torch.Tensor) else \
        scale.shape[0] if isinstance(scale, torch.Tensor) else m.num_heads
    if c % heads:
        return f"{name}: {type(m).__name__}: input width {c} is not a multiple of its {heads} heads"
    m.num_heads = heads
    return None


def default_scale_problems(graph) -> list[str]:
    """One line per attention that used SDPA's default scale and lost head width: the program keeps
    1/sqrt(original width), but code that calls SDPA without ``scale=`` would use the new width."""
    out = []
    for n in graph.nodes:
        width = n.meta.get("default_scale_of_width")
        if width is None:
            continue
        where = _traced_in(n) if n.meta.get("stack") else f"%{n.name}"
        out.append(f"{where or 'module'}: its attention uses SDPA's default scale 1/sqrt(head width); the "
                   f"program keeps 1/sqrt({width}) but this code would use 1/sqrt({n.args[0].shape[-1]}): "
                   f"pass scale= explicitly (as Hugging Face models do) or prune whole heads instead")
    return out


def sync_layers(module: torch.nn.Module, graph=None) -> list[str]:
    """Update every attribute above; returns one problem line per module whose
    pruned widths its forward code cannot express (by attributes alone)."""
    sync_attention(module, graph_head_widths(graph) if graph is not None else None)
    problems = default_scale_problems(graph) if graph is not None else []
    for name, m in module.named_modules():
        problem = None
        if isinstance(m, torch.nn.MultiheadAttention):
            problem = _sync_mha(name, m)
        elif _is_swin_attention(m):
            problem = _sync_swin(name, m)
        if problem:
            problems.append(problem)
    for m in module.modules():  # after the attention modules they read
        if type(m).__name__ == "VisionTransformer" and _is_int(_plain_attr(m, "hidden_dim")) \
                and isinstance(getattr(m, "class_token", None), torch.Tensor):
            m.hidden_dim = m.class_token.shape[-1]  # torchvision: _process_input reshapes with it
        elif isinstance(m._modules.get("self_attention"), torch.nn.MultiheadAttention) \
                and _is_int(_plain_attr(m, "num_heads")):
            m.num_heads = m.self_attention.num_heads  # torchvision EncoderBlock (informational)
    return problems
