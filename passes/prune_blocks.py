"""prune-blocks: block sparsity.

The weight, viewed as ``[out, in*kh*kw]``, is tiled into ``block`` tiles
(rows x cols); the fraction ``ratio`` of tiles with the smallest norm become
all-zero, the rest are kept untouched: the BSR pattern of block-sparse kernels
(TVM's ``sparse_dense`` among them).  Layers whose shape the block does not
divide are skipped and counted.
"""
from __future__ import annotations

import re

import torch

from prunec.artifact import annotate, bitzero, block_grid
from prunec.registry import Option, PassResult, register_pass
from prunec.selection import CompressionPass, layers_option, per_layer, skip_option, weight_layers

_BLOCK = re.compile(r"^(\d+)x(\d+)$")


def block_prune(t: torch.Tensor, bh: int, bw: int, ratio: float, criterion: str) -> torch.Tensor:
    blocks = block_grid(t, bh, bw)  # [rows, cols, bh, bw]
    p = 1 if criterion == "l1" else 2
    score = blocks.abs().pow(p).sum((2, 3)).flatten()
    k = round(ratio * score.numel())
    keep = torch.ones_like(score, dtype=torch.bool)
    keep[torch.argsort(score, stable=True)[:k]] = False
    # torch.where, not a multiply: 0 * -x is -0.0, which is not a stored zero
    kept = torch.where(keep.view(blocks.shape[:2])[..., None, None], blocks, torch.zeros((), dtype=t.dtype))
    return kept.permute(0, 2, 1, 3).reshape(t.shape).contiguous()


@register_pass("prune-blocks", summary="Block sparsity: zero whole weight tiles (e.g. 1x16, 4x4) by norm.",
               options={
                   "block": Option(str, "1x16", "tile shape ROWSxCOLS over [out, in*kh*kw]"),
                   "ratio": Option("float-map", 0.5, "fraction of tiles to zero: 0.5 or [pattern:value,...]",
                                   minimum=0, maximum=1),
                   "criterion": Option(str, "l2", "tile score", choices=("l1", "l2")),
                   "layers": layers_option(),
                   "skip": skip_option(),
               })
class PruneBlocks(CompressionPass):
    def check(self):
        m = _BLOCK.match(self.block)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            self.fail("block", "expected ROWSxCOLS with positive integers, e.g. 1x16 or 4x4")
        self.bh, self.bw = int(m.group(1)), int(m.group(2))

    def run(self, graph, am):
        pruned = skipped = zeroed = 0
        for node, w, layer, kind in weight_layers(graph, self.layers, self.skip):
            r = per_layer(self.ratio, layer)
            if r is None:
                continue
            t = graph.tensors[w.name]
            if t.dim() < 2 or t.shape[0] % self.bh or (t.numel() // t.shape[0]) % self.bw:
                skipped += 1
                continue
            new = block_prune(t, self.bh, self.bw, r, self.criterion)
            delta = int(bitzero(new).sum()) - int(bitzero(t).sum())
            if delta == 0:
                continue
            graph.set_tensor(w.name, new)
            kept = int((~bitzero(block_grid(new, self.bh, self.bw)).all(3).all(2)).sum())
            annotate(graph, w.name, {"format": "block", "block": [self.bh, self.bw], "nnz_blocks": kept})
            pruned += 1
            zeroed += delta
        return PassResult(pruned > 0, {"layers-pruned": pruned, "layers-skipped": skipped,
                                       "weights-zeroed": zeroed},
                          preserved="all" if not pruned else frozenset())
