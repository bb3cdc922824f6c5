"""lowrank: factorize layers by truncated SVD.

A linear ``y = W x + b`` becomes ``y = B (A x) + b`` (two linears, ``A: [r, in]``,
``B: [out, r]``); a k x k conv becomes a k x k conv with ``r`` output channels
followed by a 1x1 conv.  The rank comes from ``rank``, ``energy`` (fraction of
squared singular values kept) or ``params-ratio``; a layer is factorized only
where that lowers both its parameters and FLOPs.

``mode=activation`` whitens by the layer's calibration inputs X (SVD-LLM):
with ``X^T X = L L^T`` it truncates ``W L`` instead of ``W``, which minimises
the output error ``||(W - W') X||`` rather than the weight error, the
difference that keeps large models usable.

The new parameters are named ``<layer>.0.weight``, ``<layer>.1.weight`` and
``<layer>.1.bias``: the names of an ``nn.Sequential`` of the two factors, which
is what the in-place module edit puts where the layer was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunec.artifact import annotate
from prunec.errors import UsageError
from prunec.ir import Node, Value, bind_results, call_node
from prunec.registry import Option, PassResult, register_pass
from prunec.selection import CompressionPass, layers_option, skip_option, weight_layers


@dataclass
class LowRankEdit:
    """Replays the factorization on the user's module: the layer becomes
    ``nn.Sequential(first, second)``."""

    layer: str
    rank: int

    def apply(self, module: torch.nn.Module) -> None:
        old = module.get_submodule(self.layer)
        bias = getattr(old, "bias", None) is not None
        if isinstance(old, torch.nn.Linear):
            seq = torch.nn.Sequential(torch.nn.Linear(old.in_features, self.rank, bias=False),
                                      torch.nn.Linear(self.rank, old.out_features, bias=bias))
        elif isinstance(old, torch.nn.modules.conv._ConvNd) and not old.transposed and old.groups == 1:
            cls = type(old)
            first = cls(old.in_channels, self.rank, old.kernel_size, stride=old.stride, padding=old.padding,
                        dilation=old.dilation, bias=False, padding_mode=old.padding_mode)
            seq = torch.nn.Sequential(first, cls(self.rank, old.out_channels, 1, bias=bias))
        else:
            raise TypeError(f"{self.layer} is a {type(old).__name__}, not a Linear or ungrouped Conv")
        parent_name, _, leaf = self.layer.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, seq)

    def describe(self) -> str:
        return f"factorize {self.layer} at rank {self.rank}"


def capture(graph, values, inputs) -> dict:
    """Run the graph on ``inputs`` and return the runtime tensors of ``values``."""
    env = dict(zip(graph.inputs, inputs))
    for name, v in graph.consts.items():
        env[v] = graph.tensors[name]
    want = set(values)
    out = {}
    with torch.no_grad():
        for n in graph.nodes:
            bind_results(n, call_node(n, env), env)
            for o in n.outputs:
                if o in want:
                    out[o] = env[o]
    for v in want:
        if v not in out and v in env:
            out[v] = env[v]
    return out


def layer_inputs_matrix(node, x: torch.Tensor, kernel) -> torch.Tensor | None:
    """The rows the weight multiplies: tokens for a linear, unfolded patches for a conv2d."""
    if node.op == "linear":
        return x.reshape(-1, x.shape[-1])
    padding = node.arg(4, "padding", [0])
    if node.op != "conv2d" or isinstance(padding, str):
        return None
    pair = lambda v: tuple(v) * (2 // len(v)) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
    cols = F.unfold(x, tuple(kernel), dilation=pair(node.arg(5, "dilation", [1])), padding=pair(padding),
                    stride=pair(node.arg(3, "stride", [1])))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def svd(M: torch.Tensor):
    """Thin SVD in float64 via the eigendecomposition of the smaller Gram matrix:
    LAPACK's SVD of a wide 512 x 4608 matrix takes ~15 s on two cores, this well
    under one; the leading singular triplets, the only ones kept, stay accurate."""
    wide = M.shape[0] <= M.shape[1]
    A = M if wide else M.T
    lam, U = torch.linalg.eigh(A @ A.T)
    lam, U = lam.flip(0).clamp(min=0), U.flip(1)
    S = lam.sqrt()
    inv = torch.where(S > S[:1] * 1e-12, 1 / S.clamp(min=1e-300), torch.zeros_like(S))
    Vt = inv[:, None] * (U.T @ A)
    return (U, S, Vt) if wide else (Vt.T, S, U.T)


def factorize(W: torch.Tensor, X: torch.Tensor | None):
    """-> (U_s, S, Vt_s) with W ~= U_s[:, :r] @ Vt_s[:r] for every r, in float64;
    with calibration rows X the truncation minimises the output error."""
    M = W.double()
    if X is None:
        U, S, Vt = svd(M)
        root = S.sqrt()
        return U * root, S, root[:, None] * Vt
    C = X.double().T @ X.double()
    C += (1e-3 * C.diagonal().mean() + 1e-8) * torch.eye(C.shape[0], dtype=C.dtype)
    L = torch.linalg.cholesky(C)
    U, S, Vt = svd(M @ L)
    root = S.sqrt()
    Vt = torch.linalg.solve_triangular(L, Vt, upper=False, left=False)  # Vt @ L^-1
    return U * root, S, root[:, None] * Vt


@register_pass("lowrank", summary="Factorize linear/conv layers by truncated (optionally activation-aware) SVD.",
               options={
                   "rank": Option(int, 0, "keep this many singular values", minimum=1),
                   "energy": Option(float, 0.9, "keep the fewest singular values whose squares sum to this "
                                    "fraction of the total (the default criterion)", minimum=0, maximum=1),
                   "params-ratio": Option(float, 0.5, "factor parameters as a fraction of the layer's",
                                          minimum=0, maximum=1),
                   "mode": Option(str, "svd", "svd: plain SVD; activation: whiten by calibration inputs "
                                  "(SVD-LLM)", choices=("svd", "activation")),
                   "layers": layers_option(),
                   "skip": skip_option(),
               })
class LowRank(CompressionPass):
    def check(self):
        given = [k for k in ("rank", "energy", "params-ratio") if k in self.given]
        if len(given) > 1:
            self.fail(given[1], f"give one of rank, energy, params-ratio (also got {given[0]})")
        self.criterion = given[0] if given else "energy"
        if "embedding" in self.layers:
            self.fail("layers", "only linear and conv layers can be factorized")

    def run(self, graph, am):
        users = graph.users()
        todo = []
        for node, w, layer, kind in weight_layers(graph, self.layers, self.skip):
            bias = node.arg(2, "bias", None)
            groups = node.arg(6, "groups", 1) if kind == "conv" else 1
            if not layer or groups != 1 or len(users[w]) != 1 or (bias is not None and len(users[bias]) != 1):
                continue
            # the root module itself cannot become a Sequential; shared weights stay whole
            if any(f"{layer}.{s}" in graph.consts for s in ("0.weight", "1.weight", "1.bias")):
                continue
            todo.append((node, w, layer, kind, bias))
        acts = {}
        if self.mode == "activation" and todo:
            ctx = getattr(am, "context", None)
            if ctx is None or not getattr(ctx, "example_inputs", None):
                raise UsageError("lowrank{mode=activation} needs calibration inputs; compile with example inputs")
            acts = capture(graph, [n.args[0] for n, *_ in todo], ctx.example_inputs)
        done, before, after, ranks = 0, 0, 0, {}
        for node, w, layer, kind, bias in todo:
            W = graph.tensors[w.name]
            out, K = W.shape[0], W[0].numel()
            X = layer_inputs_matrix(node, acts[node.args[0]], W.shape[2:]) if acts else None
            r = self._rank(out, K)
            if r < 1 or r * (out + K) >= out * K:
                continue  # not cheaper in parameters (and so in FLOPs)
            Us, S, Vs = factorize(W.reshape(out, K), X)
            if self.criterion == "energy":
                e = (S ** 2).cumsum(0) / (S ** 2).sum().clamp(min=1e-30)
                r = int((e < self.energy - 1e-12).sum()) + 1
                if r * (out + K) >= out * K:
                    continue
            A = Vs[:r].reshape(r, *W.shape[1:]).to(W.dtype).contiguous()
            B = Us[:, :r].reshape(out, r, *([1] * (W.dim() - 2))).to(W.dtype).contiguous()
            self._rewrite(graph, node, w, layer, bias, A, B)
            before += W.numel()
            after += A.numel() + B.numel()
            ranks[layer] = r
            done += 1
        if done:
            for name in graph.remove_unused_consts():
                graph.annotations.pop(name, None)
        return PassResult(done > 0, {"layers-factorized": done, "weights-before": before,
                                     "weights-after": after, "ranks": ranks},
                          preserved="all" if not done else frozenset())

    def _rank(self, out: int, K: int) -> int:
        """The rank, or for ``energy`` an upper bound (refined once S is known)."""
        if self.criterion == "rank":
            return min(self.rank, out, K)
        if self.criterion == "params-ratio":
            return int(self.params_ratio * out * K / (out + K))
        return 1

    def _rewrite(self, graph, node, w, layer, bias, A, B) -> None:
        a = graph.add_const(f"{layer}.0.weight", A)
        b = graph.add_const(f"{layer}.1.weight", B)
        c = graph.add_const(f"{layer}.1.bias", graph.tensors[bias.name]) if bias is not None else None
        x = node.args[0]
        r = A.shape[0]
        if node.op == "linear":
            mid_shape = (*x.shape[:-1], r)
            first_args = (x, a)
            second_args = (None, b, c)
        else:
            d = A.dim() - 2
            mid_shape = (node.out.shape[0], r, *node.out.shape[2:])
            rest = tuple(node.arg(i, k, dflt) for i, k, dflt in
                         ((3, "stride", [1] * d), (4, "padding", [0] * d), (5, "dilation", [1] * d)))
            first_args = (x, a, None, *rest, 1)
            second_args = (None, b, c, [1] * d, [0] * d, [1] * d, 1)
        name = graph.fresh_name(f"{node.name}_lowrank")
        first = Node(name, node.target, first_args, {}, [Value(name, mid_shape, x.dtype)], False, dict(node.meta))
        node.args = (first.out, *second_args[1:])
        node.kwargs = {}
        graph.nodes.insert(graph.nodes.index(node), first)
        for i, name in enumerate((a.name, b.name)):
            annotate(graph, name, {"format": "lowrank", "rank": r, "layer": layer, "factor": i})
        graph.module_edits.append(LowRankEdit(layer, r))
