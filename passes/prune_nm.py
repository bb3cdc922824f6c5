"""prune-nm: N:M semi-structured sparsity along the reduction dimension.

In every group of ``m`` consecutive input channels (at a fixed output channel
and kernel position; see ``prunec.artifact`` for the exact grouping) the
``m - n`` smallest-magnitude weights become zero, the pattern sparse tensor
cores (2:4) and sparse CPU kernels run.  Layers whose input channels are not
a multiple of ``m`` (and grouped convs with fewer than ``m`` channels per
group) are skipped and counted.
"""
from __future__ import annotations

import torch

from prunec.artifact import annotate, bitzero, nm_groups, nm_ungroup
from prunec.registry import Option, PassResult, register_pass
from prunec.selection import CompressionPass, layers_option, skip_option, weight_layers


def nm_prune(t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    g = nm_groups(t, m)
    drop = g.abs().argsort(dim=1, stable=True)[:, : m - n]  # smallest first, ties by position
    return nm_ungroup(g.scatter(1, drop, 0.0), t.shape)


@register_pass("prune-nm", summary="N:M semi-structured sparsity (e.g. 2:4) along input channels.",
               options={
                   "n": Option(int, 2, "weights kept per group", minimum=0),
                   "m": Option(int, 4, "group size along the input channels", minimum=1, maximum=256),
                   "layers": layers_option(),
                   "skip": skip_option(),
               })
class PruneNM(CompressionPass):
    def check(self):
        if self.n > self.m:
            self.fail("n", f"n must be <= m (got n={self.n}, m={self.m})")

    def run(self, graph, am):
        pruned = skipped = zeroed = 0
        for node, w, layer, kind in weight_layers(graph, self.layers, self.skip):
            t = graph.tensors[w.name]
            if t.dim() < 2 or t.shape[1] % self.m or kind == "embedding":
                skipped += 1
                continue
            new = nm_prune(t, self.n, self.m)
            delta = int(bitzero(new).sum()) - int(bitzero(t).sum())
            if delta == 0:
                continue
            graph.set_tensor(w.name, new)
            annotate(graph, w.name, {"format": "nm", "n": self.n, "m": self.m})
            pruned += 1
            zeroed += delta
        return PassResult(pruned > 0, {"layers-pruned": pruned, "layers-skipped": skipped,
                                       "weights-zeroed": zeroed},
                          preserved="all" if not pruned else frozenset())
