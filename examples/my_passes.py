"""A custom prunec pass, written from scratch (see docs/writing-a-pass.md).

round-weights: snap every weight of the selected layers to a grid of ``step``
(fixed-point rounding).  A layer left with at most 256 distinct values is
annotated as weight-shared, so the artifact stores it as a codebook plus
k-bit codes.  Run it with

    prunec compile torchvision:resnet18 --load-passes examples/my_passes.py \\
        --passes 'round-weights{step=0.02}' -o OUT
"""
from __future__ import annotations

import math

import torch

from prunec import Option, PassResult, register_pass
from prunec.artifact import annotate, bitzero


@register_pass("round-weights", summary="Snap weights to a grid of `step` (fixed-point rounding).",
               options={
                   "step": Option(float, 0.01, "grid spacing", minimum=1e-8),
                   "layers": Option(list, ["linear", "conv"], "layer types: linear, conv"),
               })
def round_weights(graph, am, step: float, layers: list):
    ops = {"linear": ("linear",), "conv": ("conv1d", "conv2d", "conv3d")}
    wanted = {op for kind in layers for op in ops.get(kind, ())}
    changed_layers, changed_values = 0, 0
    for node in graph.nodes:
        if node.op not in wanted:
            continue
        w = node.args[1]  # linear(x, W, b) and convNd(x, W, b, ...): the weight is argument 1
        if not w.is_const:
            continue
        old = graph.tensors[w.name]
        new = torch.round(old / step) * step
        new = torch.where(bitzero(new), torch.zeros((), dtype=new.dtype), new)  # no -0.0
        diff = int((new != old).sum())
        if diff == 0:
            continue  # already on the grid: leave it (the pass is idempotent)
        graph.set_tensor(w.name, new)  # replace, never mutate: tensors may be shared with a clone
        distinct = new.unique().numel()
        if distinct <= 256:  # few values: store as codebook + codes
            annotate(graph, w.name, {"format": "shared", "bits": max(1, math.ceil(math.log2(distinct))),
                                     "granularity": "per-tensor", "group_size": 0, "sparse": False,
                                     "sparsity": None})
        changed_layers += 1
        changed_values += diff
    return PassResult(changed_layers > 0, {"layers-rounded": changed_layers, "values-changed": changed_values})
