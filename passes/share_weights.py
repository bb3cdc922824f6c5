"""share-weights: weight sharing by k-means clustering (palettization).

Each group (the whole tensor, each output channel, or ``group-size``
consecutive elements of either) is clustered into at most ``2**bits`` values
by 1-D k-means with linear initialisation (which Deep Compression found best:
it keeps the rare large weights).  Exact zeros left by earlier pruning stay
zero and are not given a cluster; the artifact stores them with a bitmask, so
the order that pays is prune first, then share the survivors.  A group that
already has at most ``2**bits`` distinct values is left as is, so running the
pass twice changes nothing the second time.
"""
from __future__ import annotations

import torch

from prunec.artifact import annotate, bitzero, share_groups, sparsity_of
from prunec.registry import Option, PassResult, register_pass
from prunec.selection import CompressionPass, layers_option, skip_option, weight_layers


def distinct_counts(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    xs = torch.where(mask, x, torch.nan).sort(1).values
    valid = ~torch.isnan(xs)
    new = valid[:, 1:] & (xs[:, 1:] != xs[:, :-1])
    return valid[:, :1].long().squeeze(1) + new.sum(1)


def kmeans_1d(x: torch.Tensor, mask: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Cluster each row's masked values into k centroids; returns x with every
    masked value replaced by its centroid (unmasked entries untouched).

    In 1-D every cluster is a run of the sorted values, so after one sort each
    Lloyd step is a binary search for the k-1 boundaries plus prefix sums."""
    xf = x.double()
    xs = torch.where(mask, xf, torch.inf).sort(1).values  # masked-out entries at the end
    count = mask.sum(1, keepdim=True)
    csum = torch.nn.functional.pad(torch.where(mask.sort(1, descending=True).values, xs, 0.0).cumsum(1), (1, 0))
    last = (count - 1).clamp(min=0)
    lo, hi = xs[:, :1], xs.gather(1, last)
    lo, hi = torch.where(count > 0, lo, 0.0), torch.where(count > 0, hi, 0.0)
    c = lo + (hi - lo) * torch.linspace(0, 1, k, dtype=torch.float64)  # linear init, sorted
    for _ in range(iters):
        cut = torch.searchsorted(xs, ((c[:, 1:] + c[:, :-1]) / 2).contiguous())
        edges = torch.cat([torch.zeros_like(count), torch.minimum(cut, count), count], 1)
        n = edges[:, 1:] - edges[:, :-1]
        sums = csum.gather(1, edges[:, 1:]) - csum.gather(1, edges[:, :-1])
        new = torch.where(n > 0, sums / n.clamp(min=1), c).sort(1).values
        moved = (new - c).abs().max() if c.numel() else 0.0
        c = new
        if moved <= 1e-6 * float((hi - lo).max()):  # settled (to far below float32 resolution of the data)
            break
    y = c.gather(1, _assign(xf, c)).to(x.dtype)
    return torch.where(mask, y, x)


def _assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest centroid by binary search over the midpoints of sorted centroids."""
    mid = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mid, x.contiguous())


@register_pass("share-weights", summary="Weight sharing: k-means cluster weights into 2**bits values per group.",
               options={
                   "bits": Option(int, 4, "index width: at most 2**bits distinct values per group",
                                  minimum=1, maximum=8),
                   "granularity": Option(str, "per-tensor", "one codebook per tensor or per output channel",
                                         choices=("per-tensor", "per-channel")),
                   "group-size": Option(int, 0, "split each tensor/channel into groups of this many "
                                        "elements, one codebook each (0: no split)", minimum=0),
                   "iters": Option(int, 20, "k-means iterations (at most)", minimum=1),
                   "layers": layers_option(),
                   "skip": skip_option(),
               })
class ShareWeights(CompressionPass):
    def run(self, graph, am):
        k = 1 << self.bits
        shared = skipped = groups = annotated = 0
        for node, w, layer, kind in weight_layers(graph, self.layers, self.skip):
            t = graph.tensors[w.name]
            row = t.numel() if self.granularity == "per-tensor" else t.numel() // t.shape[0]
            if self.group_size and row % self.group_size:
                skipped += 1
                continue
            x = share_groups(t, self.granularity, self.group_size)
            zeros = bitzero(x)
            sparse = bool(zeros.any())
            mask = ~zeros
            todo = distinct_counts(x, mask) > k
            ann = {"format": "shared", "bits": self.bits, "granularity": self.granularity,
                   "group_size": self.group_size, "sparse": sparse,
                   "sparsity": sparsity_of(graph.annotations.get(w.name))}
            if todo.any():
                y = x.clone()
                y[todo] = kmeans_1d(x[todo], mask[todo], k, self.iters)
                graph.set_tensor(w.name, y.reshape(t.shape))
                shared += 1
                groups += int(todo.sum())
            elif _same_sharing(graph.annotations.get(w.name), ann):
                continue  # already shared this way: nothing to do
            annotate(graph, w.name, ann)
            annotated += 1
        # a new annotation alone is a change too: the stored bytes differ
        return PassResult(annotated > 0, {"layers-shared": shared, "groups-clustered": groups,
                                          "layers-skipped": skipped}, preserved=frozenset())


def _same_sharing(prev, ann) -> bool:
    keys = ("format", "bits", "granularity", "group_size", "sparse")
    return bool(prev) and all(prev.get(k) == ann[k] for k in keys)
