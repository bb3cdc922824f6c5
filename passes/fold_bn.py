"""fold-bn: fold inference-mode batch norm into the preceding conv or linear.

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta
      = (s * W) x + (s * (b - mean) + beta),   s = gamma / sqrt(var + eps)

Only folds where the conv/linear result feeds nothing but the batch norm and
its weight is read by that op alone; otherwise folding would change other uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunec.registry import PassResult, register_pass

_CONVS = {"conv1d", "conv2d", "conv3d"}


def _bn_args(n):
    """(input, weight, bias, mean, var, eps) of an inference batch norm node, else None."""
    if n.op == "_native_batch_norm_legit_no_training":
        x, w, b, mean, var = n.args[:5]
        return x, w, b, mean, var, n.arg(6, "eps", 1e-5)
    if n.op == "batch_norm" and not n.arg(5, "training", False):
        x, w, b, mean, var = n.args[:5]
        return x, w, b, mean, var, n.arg(7, "eps", 1e-5)
    return None


def _prefix(name: str) -> str:
    return name.rpartition(".")[0]


@dataclass
class FoldBNEdit:
    """Replays the fold on the user's module: the conv gains a bias, the BN becomes Identity."""

    conv: str
    bn: str
    bias_shape: tuple

    def apply(self, module: torch.nn.Module) -> None:
        conv = module.get_submodule(self.conv)
        if getattr(conv, "bias", None) is None:
            conv.bias = torch.nn.Parameter(torch.zeros(self.bias_shape))
        parent_name, _, leaf = self.bn.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if not isinstance(getattr(parent, leaf), torch.nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"{self.bn} is not a BatchNorm module")
        setattr(parent, leaf, torch.nn.Identity())

    def describe(self) -> str:
        return f"fold {self.bn} into {self.conv}"


@register_pass("fold-bn", summary="Fold inference batch norm into the preceding conv/linear.", options={})
def fold_bn(graph, am):
    users = graph.users()
    folded = 0
    drop = set()
    for n in graph.nodes:
        got = _bn_args(n)
        if got is None:
            continue
        x, gamma, beta, mean, var, eps = got
        prod = x.producer
        if prod is None or (prod.op not in _CONVS and prod.op != "linear"):
            continue
        if prod.op == "linear" and len(x.shape) != 2:
            continue  # BN1d normalises dim 1, a linear's features are the last dim
        w = prod.args[1]
        if not w.is_const or len(users[x]) != 1 or len(users[w]) != 1:
            continue
        if any(o in users and users[o] for o in n.outputs[1:]):
            continue  # saved mean/invstd are read: not an inference-only use
        b = prod.arg(2, "bias", None)
        if b is not None and (not b.is_const or len(users[b]) != 1):
            continue
        t = graph.tensors
        W = t[w.name]
        scale = torch.rsqrt(t[var.name] + eps)
        if gamma is not None:
            scale = scale * t[gamma.name]
        shift = -t[mean.name] * scale + (t[beta.name] if beta is not None else 0)
        bias0 = t[b.name] if b is not None else torch.zeros(W.shape[0], dtype=W.dtype)
        newW = W * scale.reshape(-1, *([1] * (W.dim() - 1)))
        newb = bias0 * scale + shift
        graph.set_tensor(w.name, newW.to(W.dtype))
        if b is None:
            bname = _prefix(w.name) + ".bias"
            if bname in graph.consts:
                continue
            b = graph.add_const(bname, newb.to(W.dtype))
            prod.set_arg(2, "bias", b)
        else:
            graph.set_tensor(b.name, newb.to(W.dtype))
        graph.replace_uses(n.outputs[0], x)
        drop.add(n)
        bn_name = (gamma or mean).name
        graph.module_edits.append(FoldBNEdit(_prefix(w.name), _prefix(bn_name), tuple(newb.shape)))
        folded += 1
    graph.nodes = [n for n in graph.nodes if n not in drop]
    removed = graph.remove_unused_consts()
    return PassResult(folded > 0, {"batchnorms-folded": folded, "constants-removed": len(removed)})
