"""prunec.PointwiseAsMatmul (backends/tvm_pointwise.py): which 1x1 convolutions become matmuls,
the IR it leaves, and the built model against torch."""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from prunec.backends.tvm_pointwise import PointwiseAsMatmul, op_name  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tvm_helpers import build_and_compare, op_names  # noqa: E402

pytestmark = pytest.mark.tvm

_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})


def _conv_module(ci: int, co: int, hw: int, stride: int = 1, groups: int = 1, k: int = 1):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, ci, hw, hw), "float32"))
    w = relax.const(torch.randn(co, ci // groups, k, k).numpy())
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, w, strides=stride, groups=groups))
        bb.emit_func_output(y)
    return bb.get()


def _rewritten(mod, count: int):
    """``mod`` after the pass and dead-code elimination; the pass rewrote ``count`` convolutions."""
    rewrite = PointwiseAsMatmul(_TARGET, lanes=16)
    after = relax.transform.DeadCodeElimination()(rewrite(mod))
    assert rewrite.count == count
    return after


def _assert_ir(after, expected) -> None:
    tvm.ir.assert_structural_equal(relax.transform.Normalize()(after), relax.transform.Normalize()(expected))


def test_a_7x7_pointwise_convolution_becomes_a_matmul():
    before = _conv_module(64, 128, 7)
    after = _rewritten(before, 1)

    w = before["main"].body.blocks[0].bindings[0].value.args[1].value.numpy().reshape(128, 64)

    @tvm.script.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 64, 7, 7), "float32")) -> R.Tensor((1, 128, 7, 7), "float32"):
            with R.dataflow():
                y = R.reshape(R.matmul(R.const(w), R.reshape(x, R.shape([1, 64, 49]))), R.shape([1, 128, 7, 7]))
                R.output(y)
            return y

    _assert_ir(after, Expected)


@pytest.mark.parametrize("ci,co,hw", [(72, 12, 56), (96, 16, 28), (16, 16, 32), (32, 16, 112)])
def test_planes_of_whole_vectors_up_to_112x112_become_matmuls(ci, co, hw):
    """Their rows are not whole vectors (28, 56), or few weights (16x16 at 32x32; MobileNetV2's 32->16
    at 112x112, whose operand strips are read in place): a matmul either way."""
    rewrite = PointwiseAsMatmul(_TARGET, lanes=16)
    after = rewrite(_conv_module(ci, co, hw))
    assert rewrite.count == 1
    assert "relax.matmul" in op_names(after) and "relax.nn.conv2d" not in op_names(after)


def test_the_epilogue_moves_above_the_reshape():
    """bias, ReLU6 and a residual add on the 4-d output become ops on the matmul's [N, Co, H*W]
    result, so FuseOps fuses them into the matmul's kernel (the reshape back, injective, had
    stopped the fusion and left each epilogue a kernel of its own: 8 in MobileNetV2)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64, 7, 7), "float32"))
    w, b = torch.randn(64, 64, 1, 1).numpy(), torch.randn(1, 64, 1, 1).numpy()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w)))
            y = bb.emit(relax.op.clip(relax.op.add(y, relax.const(b)), 0.0, 6.0))
            y = bb.emit_output(relax.op.add(y, x))
        bb.emit_func_output(y)
    after = _rewritten(bb.get(), 1)

    @tvm.script.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 64, 7, 7), "float32")) -> R.Tensor((1, 64, 7, 7), "float32"):
            with R.dataflow():
                mm = R.matmul(R.const(w.reshape(64, 64)), R.reshape(x, R.shape([1, 64, 49])))
                t = R.clip(R.add(mm, R.const(b.reshape(1, 64, 1))), R.prim_value(T.float64(0)),
                           R.prim_value(T.float64(6)))
                y = R.reshape(R.add(t, R.reshape(x, R.shape([1, 64, 49]))), R.shape([1, 64, 7, 7]))
                R.output(y)
            return y

    _assert_ir(after, Expected)


def test_a_residual_add_of_two_products_moves_above_both_reshapes():
    """MobileNetV2's residual blocks at 56x56 and 28x28 add the projection's matmul to the block
    input, itself the previous projection's matmul: both operands are reshapes back to 4-d.  The
    add takes both [N, Co, H*W] results, so it fuses into the second matmul's kernel (it was a
    ``fused_reshape_add_reshape`` kernel of its own, three in a pruned MobileNetV2), and the
    second product reads the first's [N, Co, H*W] result: the reshape to 4-d and back is gone."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 32, 28, 28), "float32"))
    w1, w2 = torch.randn(16, 32, 1, 1).numpy(), torch.randn(16, 16, 1, 1).numpy()
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(w1)))
            b = bb.emit(relax.op.nn.conv2d(a, relax.const(w2)))
            y = bb.emit_output(relax.op.add(b, a))
        bb.emit_func_output(y)
    after = _rewritten(bb.get(), 2)

    @tvm.script.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 32, 28, 28), "float32")) -> R.Tensor((1, 16, 28, 28), "float32"):
            with R.dataflow():
                a = R.matmul(R.const(w1.reshape(16, 32)), R.reshape(x, R.shape([1, 32, 784])))
                b = R.matmul(R.const(w2.reshape(16, 16)), a)
                y = R.reshape(R.add(b, a), R.shape([1, 16, 28, 28]))
                R.output(y)
            return y

    _assert_ir(after, Expected)


@pytest.mark.parametrize("args,why", [
    ((16, 32, 224), "a 224x224 plane: the convolution schedule"),
    ((16, 16, 14), "a 14x14 plane with few weights on AVX-512: the fused convolution wins"),
    ((64, 128, 14, 2), "strided"),
    ((64, 64, 7, 1, 64), "depthwise"),
    ((64, 128, 7, 1, 1, 3), "a 3x3 window"),
])
def test_other_convolutions_are_left_alone(args, why):
    before = _conv_module(*args)
    rewrite = PointwiseAsMatmul(_TARGET, lanes=16)
    after = rewrite(before)
    assert rewrite.count == 0, why
    assert "relax.matmul" not in op_names(after) and "relax.nn.conv2d" in op_names(after), why


@pytest.mark.parametrize("ci,co", [(192, 48), (32, 192), (16, 16)])
def test_a_14x14_plane_with_few_weights_is_a_matmul_with_8_lanes(ci, co):
    """On AVX2 every 14x14 1x1 of MobileNetV2 ran faster as a matmul (192->48 0.73x); with 16 lanes
    the weight threshold keeps the small ones convolutions (0.8x the other way on a Xeon)."""
    for lanes, count in ((8, 1), (16, 0)):
        rewrite = PointwiseAsMatmul(_TARGET, lanes=lanes)
        after = rewrite(_conv_module(ci, co, 14))
        assert rewrite.count == count, lanes
        assert ("relax.matmul" in op_names(after)) == bool(count), lanes


def test_the_pass_is_a_no_op_for_cuda():
    before = _conv_module(64, 128, 7)
    after = PointwiseAsMatmul(tvm.target.Target("cuda"))(before)
    tvm.ir.assert_structural_equal(after, before)


class SmallPlanes(nn.Module):
    """The tail of a ResNet bottleneck at 7x7: 1x1 down, 3x3, 1x1 up, residual, pooling head."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(96, 32, 1)
        self.bn = nn.BatchNorm2d(32)
        self.mid = nn.Conv2d(32, 32, 3, padding=1)
        self.up = nn.Conv2d(32, 96, 1)
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.down(x)))
        y = self.up(torch.relu(self.mid(y))) + x
        return self.fc(torch.relu(y).mean((2, 3)))


@pytest.mark.parametrize("passes", ["", "fold-bn,prune-channels{ratio=0.5},dce"])
def test_built_model_matches_torch(passes):
    torch.manual_seed(0)
    model = SmallPlanes().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    result = build_and_compare(model, (torch.randn(1, 96, 7, 7),), passes=passes)
    kernels = set(re.findall(r"\b(?:fused_)?[a-z0-9_]*(?:conv2d|matmul|reshape)[a-z0-9_]*", result.artifact.executable.as_text()))
    # with AVX2 (8 lanes) or AVX-512 (16), 49 pixels are ragged: both 1x1s are matmuls, the 3x3 is not
    assert len([k for k in kernels if "conv2d" in k]) == 1, kernels
    # ... and each matmul's epilogue (batch norm or bias, ReLU, the residual add) is in its kernel
    assert all("_add" in k for k in kernels if "matmul" in k) and not any(k.startswith("fused_reshape") for k in kernels), \
        kernels


@pytest.mark.parametrize("hw", [56, 7])
def test_an_activation_moves_above_the_reshape(hw):
    """SiLU after a 1x1 joins the matmul's kernel: the register tiles' write-back runs it in whole
    vectors, on a 7x7 plane too (its last strip overlaps the one before it, tvm_schedule_overlap)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, hw, hw), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(torch.randn(32, 16, 1, 1).numpy())))
            z = bb.emit_output(relax.op.nn.silu(y))
        bb.emit_func_output(z)
    after = _rewritten(bb.get(), 1)
    silu = [b.value for blk in after["main"].body.blocks for b in blk.bindings
            if op_name(b.value) == "relax.nn.silu"]
    assert len(silu) == 1
    assert silu[0].ty.ndim == 3, after  # applied to the [N, Co, H*W] product, before the reshape


@pytest.mark.parametrize("hw", [56, 7])
def test_activations_after_products_match_torch(hw):
    """Batch norm + SiLU and GELU after 1x1s, each in its matmul's kernel, on a plane of whole vectors
    (56x56) and a ragged one (7x7)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 48, 1), nn.BatchNorm2d(48), nn.SiLU(), nn.Conv2d(48, 16, 1), nn.GELU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    result = build_and_compare(model, (torch.randn(1, 8, hw, hw),), passes="fold-bn")
    kernels = set(re.findall(r"\bfused_[a-z0-9_]+", result.artifact.executable.as_text()))
    assert len([k for k in kernels if "matmul" in k and "fast_exp" in k]) == 1, kernels  # SiLU
    assert len([k for k in kernels if "matmul" in k and "fast_erf" in k]) == 1, kernels  # GELU


def test_112x112_pointwise_matches_torch():
    """MobileNetV2's first projection (pruned: 16->8) at 112x112, a matmul reading its operand in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU6()).eval()
    result = build_and_compare(model, (torch.randn(1, 16, 112, 112),))
    assert "matmul" in result.artifact.executable.as_text()


class InvertedResidual14(nn.Module):
    """A pruned MobileNetV2 block at 14x14: 1x1 expand, ReLU6, depthwise 3x3, ReLU6, 1x1 project,
    residual add; both 1x1s have few weights."""

    def __init__(self, c: int = 16, e: int = 96):
        super().__init__()
        self.expand = nn.Conv2d(c, e, 1)
        self.dw = nn.Conv2d(e, e, 3, padding=1, groups=e)
        self.project = nn.Conv2d(e, c, 1)

    def forward(self, x):
        y = nn.functional.relu6(self.dw(nn.functional.relu6(self.expand(x))))
        return self.project(y) + x


def test_14x14_block_matches_torch():
    """Built for this host: with AVX2 (8 lanes) both 1x1s become matmuls whose epilogues (ReLU6;
    bias + residual) fuse into their kernels; with AVX-512 (16) they stay convolutions (few weights)."""
    from prunec.backends.tvm_lower import to_target
    from prunec.backends.tvm_schedule import vector_lanes
    from prunec.target import parse_target
    torch.manual_seed(0)
    result = build_and_compare(InvertedResidual14(), (torch.randn(1, 16, 14, 14),))
    calls = re.findall(r"call +([\w.]+) in:", result.artifact.executable.as_text())
    kernels = [c for c in calls if not c.startswith("vm.")]
    matmuls = 0 if vector_lanes(to_target(parse_target("llvm"))) >= 16 else 2
    assert len([k for k in kernels if "matmul" in k]) == matmuls, kernels
    assert len([k for k in kernels if "conv2d" in k]) == 3 - matmuls, kernels


class ResidualChain(nn.Module):
    """Two residual 1x1 stages at 28x28 (MobileNetV2's projection + residual pattern, without the
    depthwise convolutions): every product's input is the previous product's output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(32, 16, 1)
        self.b = nn.Conv2d(16, 16, 1)
        self.c = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a) + a
        return self.c(b) + b


def test_residual_chain_has_no_reshape_or_add_kernels():
    """Each residual add fuses into a matmul's kernel and every reshape between the products is a
    view: before, a reshape back to 4-d met the next product's reshape to 3-d and the pair was a
    copy kernel (``fused_reshape_reshape``), and an add of two products was a kernel of its own."""
    torch.manual_seed(0)
    result = build_and_compare(ResidualChain(), (torch.randn(1, 32, 28, 28),))
    calls = re.findall(r"call +([\w.]+) in:", result.artifact.executable.as_text())
    kernels = [c for c in calls if not c.startswith("vm.")]
    assert len(kernels) == 3 and all("matmul" in k and "reshape" not in k for k in kernels), kernels


def test_with_a_sparse_layer_in_the_same_module():
    """A zero-initialized head (ViT-B/16's) becomes a sparse call_tir first; the rewrite must leave
    that binding as it is (re-canonicalizing the bindings broke FuseTIR on ViT-B/16)."""
    torch.manual_seed(0)
    model = SmallPlanes().eval()
    with torch.no_grad():
        model.fc.weight.zero_()
    result = build_and_compare(model, (torch.randn(1, 96, 7, 7),), sparse={"mode": "sparse"})
    choices = {layer["layer"]: layer["choice"] for layer in result.artifact.sparse_report}
    assert choices == {"down.weight": "dense", "up.weight": "dense", "fc.weight": "sparse"}, choices
