"""prune-weights: unstructured magnitude pruning.

Zeroes the smallest-magnitude weights of the selected layers: a fraction
``ratio`` of each tensor (``scope=local``), of all selected tensors together
(``scope=global``), or every weight below ``threshold``.  Existing zeros count
toward the ratio, so re-running with the same ratio changes nothing.  Biases
are never pruned.  Also registers the ``deep-compression`` preset.
"""
from __future__ import annotations

import torch

from prunec.artifact import annotate, bitzero
from prunec.registry import Option, PassResult, register_pass, register_pipeline
from prunec.selection import CompressionPass, layers_option, per_layer, skip_option, weight_layers


def _prune_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """Zero exactly the k smallest |w| (existing zeros first, ties by position)."""
    if k <= 0:
        return t
    flat = t.flatten()
    idx = torch.argsort(flat.abs(), stable=True)[:k]
    out = flat.clone()
    out[idx] = 0.0
    return out.view_as(t)


@register_pass("prune-weights", summary="Unstructured magnitude pruning (ratio or threshold, local or global).",
               options={
                   "ratio": Option("float-map", 0.5, "fraction of weights to zero: 0.8 or [layer1.*:0.5,fc:0.9] "
                                   "(last matching pattern wins, unmatched layers are left alone)",
                                   minimum=0, maximum=1),
                   "threshold": Option(float, 0.0, "zero every |w| < threshold instead of a ratio (0: off)",
                                       minimum=0),
                   "scope": Option(str, "local", "local: ratio per tensor; global: one magnitude cut across "
                                   "the selected tensors", choices=("local", "global")),
                   "layers": layers_option(),
                   "skip": skip_option(),
               })
class PruneWeights(CompressionPass):
    def check(self):
        if "threshold" in self.given and "ratio" in self.given:
            self.fail("threshold", "give either ratio or threshold, not both")

    def run(self, graph, am):
        targets = list(weight_layers(graph, self.layers, self.skip))
        new: dict[str, torch.Tensor] = {}
        if "threshold" in self.given:
            for _, w, _, _ in targets:
                t = graph.tensors[w.name]
                new[w.name] = torch.where(t.abs() < self.threshold, torch.zeros((), dtype=t.dtype), t)
            return self._commit(graph, new)
        ratio = self.ratio
        if self.scope == "local":
            specific, base = ratio, None
        elif isinstance(ratio, dict):  # global: '*' sets the shared cut, other patterns are local
            specific = {p: v for p, v in ratio.items() if p != "*"}
            base = ratio.get("*")
        else:
            specific, base = {}, ratio
        shared = []
        for _, w, layer, _ in targets:
            r = per_layer(specific, layer)
            if r is None:
                shared.append(w)
                continue
            t = graph.tensors[w.name]
            new[w.name] = _prune_k(t, round(r * t.numel()))
        if base is not None:
            new.update(self._global(graph, shared, base))
        return self._commit(graph, new)

    @staticmethod
    def _global(graph, weights, ratio: float) -> dict:
        if not weights or ratio <= 0:
            return {}
        flat = torch.cat([graph.tensors[w.name].flatten() for w in weights])
        pruned = _prune_k(flat, round(ratio * flat.numel()))
        out, pos = {}, 0
        for w in weights:
            t = graph.tensors[w.name]
            out[w.name] = pruned[pos: pos + t.numel()].view_as(t).clone()
            pos += t.numel()
        return out

    @staticmethod
    def _commit(graph, new: dict) -> PassResult:
        layers = zeroed = total = 0
        for name, t in new.items():
            old = graph.tensors[name]
            before = int(bitzero(old).sum())
            after = int(bitzero(t).sum())
            total += t.numel()
            if after == before:
                continue  # nothing new became zero: leave tensor and annotation alone
            graph.set_tensor(name, t)
            annotate(graph, name, {"format": "sparse", "nnz": t.numel() - after})
            layers += 1
            zeroed += after - before
        zeros = sum(int(bitzero(graph.tensors[n]).sum()) for n in new)
        return PassResult(layers > 0, {"layers-pruned": layers, "weights-zeroed": zeroed,
                                       "sparsity": round(zeros / total, 4) if total else 0.0},
                          preserved="all" if not layers else frozenset())


register_pipeline("deep-compression", "prune-weights{ratio=0.9},share-weights{bits=4}",
                  "Deep Compression: magnitude pruning, then k-means weight sharing of the survivors")
