"""``prunec inspect``: a summary of the IR (layers, params, FLOPs, channel groups)."""
from __future__ import annotations

from collections import Counter

from .cost import compute_cost
from .ir import Graph

_LAYER_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "linear", "layer_norm", "group_norm",
              "_native_batch_norm_legit_no_training", "batch_norm", "embedding",
              "scaled_dot_product_attention", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


def summarize(graph: Graph, head_dim: bool = False, packed_heads: bool = False) -> dict:
    """``head_dim`` / ``packed_heads``: show the groups of those prune-channels modes."""
    cost = compute_cost(graph)
    layers = []
    for n in graph.nodes:
        if n.op not in _LAYER_OPS:
            continue
        params = [v.name for v in n.inputs() if v.is_const]
        layers.append({"node": n.name, "op": n.op, "params": params,
                       "weight": list(n.args[1].shape) if len(n.args) > 1 and getattr(n.args[1], "is_const", False) else None,
                       "output": list(n.out.shape), "flops": cost.per_node_flops.get(n.name, 0)})
    out = {"inputs": [{"name": v.name, "shape": list(v.shape), "dtype": str(v.dtype)} for v in graph.inputs],
           "outputs": [{"name": v.name, "shape": list(v.shape)} for v in graph.outputs],
           "params": cost.params, "flops": cost.flops, "bytes": cost.bytes,
           "ops": dict(Counter(n.op for n in graph.nodes).most_common()), "layers": layers,
           "tracer": graph.tracer}
    try:
        from .dependency import build, groups_summary
    except ImportError:
        return out
    groups = build(graph, head_dim=head_dim, packed_heads=packed_heads)
    out.update(groups_summary(groups))
    return out


def format_summary(s: dict) -> str:
    lines = ["inputs:  " + ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in s["inputs"]),
             "outputs: " + ", ".join(f"{o['name']} {o['shape']}" for o in s["outputs"]),
             f"params: {s['params']:,}   FLOPs: {s['flops']:,}   bytes: {s['bytes']:,}",
             f"traced by: {s['tracer'] or '-'}",
             "ops: " + ", ".join(f"{k} x{v}" for k, v in s["ops"].items()), "", "layers:"]
    for layer in s["layers"]:
        lines.append(f"  %{layer['node']:<28} {layer['op']:<24} weight={layer['weight']} out={layer['output']}"
                     f" flops={layer['flops']:,}")
    if "groups" in s:
        lines += ["", f"channel groups: {len(s['groups'])} "
                      f"({sum(1 for g in s['groups'] if g['prunable'])} prunable)"]
        for g in s["groups"]:
            why = "" if g["prunable"] else f"  pinned: {g['pinned']}"
            lines.append(f"  group {g['id']}: {g['channels']} channels in {g['units']} units, "
                         f"{len(g['members'])} members{why}")
            for m in g["members"][:8]:
                lines.append(f"      {m}")
            if len(g["members"]) > 8:
                lines.append(f"      ... {len(g['members']) - 8} more")
        if s.get("barriers"):
            lines += ["", "barriers (ops without a channel rule; channels are not pruned across them):"]
            for b in s["barriers"]:
                lines.append(f"  %{b['node']} ({b['op']}): {b['why']}")
    return "\n".join(lines)
