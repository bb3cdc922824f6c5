"""The TVM build matches the torch backend: small models, ResNet-18, pruned, sparse, shared weights."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from prunec.errors import UsageError  # noqa: E402
from prunec.target import parse_target  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tvm_helpers import build_and_compare, has_cuda  # noqa: E402

pytestmark = pytest.mark.tvm


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.pw(self.dw(y))) + 0.5
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class TinyEncoder(nn.Module):
    """BERT-style: embedding, two post-norm encoder layers (GELU FFN), pooled head."""

    def __init__(self, vocab=100, d=64, heads=4, ffn=128, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids) + self.pos)[:, 0])


class Tied(nn.Module):
    """One linear used twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))


def test_small_cnn():
    torch.manual_seed(0)
    build_and_compare(SmallCNN(), (torch.randn(2, 3, 20, 18),))


def test_small_cnn_channel_pruned():
    torch.manual_seed(0)
    build_and_compare(SmallCNN(), (torch.randn(1, 3, 16, 16),), passes="fold-bn,prune-channels{ratio=0.5}")


def test_encoder_and_multiple_outputs():
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    build_and_compare(TinyEncoder(), (ids,))


def test_shared_weights_tied_layer():
    torch.manual_seed(0)
    build_and_compare(Tied(), (torch.randn(4, 32),))


@pytest.mark.parametrize("passes", [
    "prune-blocks{block=16x1,ratio=0.8}",
    "prune-nm{n=2,m=4}",
    "prune-weights{ratio=0.9}",
    "prune-weights{ratio=0.8},share-weights{bits=4}",
])
def test_compressed_mlp_sparse_forced(passes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 48), nn.ReLU(), nn.Linear(48, 8))
    res = build_and_compare(model, (torch.randn(5, 64),), passes=passes, sparse={"mode": "sparse"})
    report = res.artifact.sparse_report
    assert report and all(r["choice"] == "sparse" for r in report if r["zeros"] >= 0.5)


def test_compressed_cnn_measured_choice():
    torch.manual_seed(0)
    res = build_and_compare(SmallCNN(), (torch.randn(1, 3, 16, 16),), passes="prune-weights{ratio=0.9}")
    kinds = {r["kind"] for r in res.artifact.sparse_report if "kind" in r}
    assert "conv1x1" in kinds and "linear" in kinds
    assert all(r["reason"] in ("measured", "too few zeros") for r in res.artifact.sparse_report)


def test_resnet18_dense():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    build_and_compare(tv.models.resnet18(), (torch.randn(1, 3, 224, 224),))


def test_resnet18_pruned():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    build_and_compare(tv.models.resnet18(), (torch.randn(1, 3, 224, 224),), passes="fold-bn,prune-channels{ratio=0.5}")


class SiLUSqueezeExcite(nn.Module):
    """EfficientNet's block shape: conv + BN + SiLU (an epilogue that reads its input twice) and a
    squeeze-excite gate (a 1x1 conv on 1x1 pixels whose epilogue broadcasts over the feature map)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.SiLU(), nn.Conv2d(4, 16, 1),
                                nn.Sigmoid())

    def forward(self, x):
        y = self.conv(x)
        return y * self.se(y)


def test_silu_and_squeeze_excite_epilogues():
    # Partly inlined epilogues once produced kernels TVM's FlattenBuffer rejected
    # ("T_add_intermediate is used before its definition") on every EfficientNet.
    torch.manual_seed(0)
    model = SiLUSqueezeExcite().eval()
    with torch.no_grad():
        model.conv[1].running_mean.uniform_(-1, 1)
        model.conv[1].running_var.uniform_(0.5, 2)
    build_and_compare(model, (torch.randn(1, 3, 16, 16),))


# mnasnet (5x5 depthwise) and shufflenet (no activation after the depthwise) cover more of
# FuseExpandDepthwise's blocks than MobileNetV2
_ZOO = ["mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16", "mnasnet0_5", "shufflenet_v2_x0_5"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", _ZOO)
@pytest.mark.parametrize("passes", ["", "fold-bn,prune-channels{ratio=0.5}"])
def test_zoo(name, passes):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    build_and_compare(getattr(tv.models, name)(), (torch.randn(1, 3, 224, 224),), passes=passes)


@pytest.mark.zoo
@pytest.mark.parametrize("passes", ["", "prune-channels{ratio=0.5}", "prune-blocks{block=16x1,ratio=0.9}"])
def test_zoo_bert_style(passes):
    torch.manual_seed(0)
    model = TinyEncoder(vocab=1000, d=256, heads=4, ffn=1024, layers=4)
    build_and_compare(model, (torch.randint(0, 1000, (1, 16)),), passes=passes)


# ---- targets ---------------------------------------------------------------------------

def test_target_forms():
    from prunec.backends.tvm_lower import to_target
    assert to_target(parse_target("llvm -mcpu=znver3")).attrs["mcpu"] == "znver3"
    assert to_target(parse_target("llvm", "skylake")).attrs["mcpu"] == "skylake"
    assert to_target(parse_target('{"kind": "llvm", "mcpu": "x86-64"}')).attrs["mcpu"] == "x86-64"
    assert to_target(parse_target("llvm")).attrs["mcpu"]  # this host's CPU
    assert to_target(parse_target("cuda")).kind.name == "cuda"
    with pytest.raises(UsageError, match="unknown target"):
        parse_target("vulkan")
    with pytest.raises(UsageError, match="TVM rejects"):
        to_target(parse_target('{"kind": "llvm", "no_such_attr": 1}'))
    assert parse_target({"kind": "llvm", "mcpu": "znver3"}).attrs == {"mcpu": "znver3"}
    assert str(parse_target(parse_target("llvm -mcpu=znver3"))) == '{"kind": "llvm", "mcpu": "znver3"}'
    with pytest.raises(UsageError, match="a JSON target needs"):
        parse_target({"kind": "vulkan"})
    with pytest.raises(UsageError, match="not a int"):
        parse_target(3)


def test_compile_takes_a_target_dict():
    """The Python API takes the TVM dict form as the CLI takes its JSON text."""
    import numpy as np

    import prunec
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(1, 3, 32, 32)
    res = prunec.compile(model, (x,), target={"kind": "llvm", "mcpu": "x86-64"}, in_place=False)
    assert res.report["target"] == '{"kind": "llvm", "mcpu": "x86-64"}'
    assert str(res.artifact.target.attrs["mcpu"]) == "x86-64"
    got, ref = res.artifact.load()(x), model(x).detach()
    assert np.abs(np.asarray(got) - ref.numpy()).max() <= 1e-4 * ref.abs().max().item()


@pytest.mark.skipif(not has_cuda(), reason="no CUDA GPU on this machine (tvm.cuda(0).exist is False)")
def test_cuda_build_and_run():
    import numpy as np

    import prunec
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(1, 3, 32, 32)
    res = prunec.compile(model, (x,), target="cuda", in_place=False)
    got = res.artifact.load()(x)
    ref = model(x).detach()
    assert np.abs(got.numpy() - ref.numpy()).max() <= 1e-4 * ref.abs().max().item()


def test_cuda_build_without_gpu_compiles():
    """Building for cuda needs no GPU (only running does)."""
    from prunec.backends import tvm_backend
    from prunec.frontend import trace
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval(), torch.randn(2, 16)
    art = tvm_backend.build(trace(model, (x,)), (x,), "cuda")
    assert art.meta()["device"] == "cuda"


_HF = ["bert", "distilbert", "roberta", "gpt2", "llama-gqa", "t5", "bart", "vit"]


def _hf_build(name: str, passes: str):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    pytest.importorskip("transformers")
    from prune_cases import hf_model
    model, inputs = hf_model(name)
    build_and_compare(model, inputs, passes=passes)


@pytest.mark.parametrize("name", ["llama-gqa", "roberta"])
def test_hf_decoder_and_position_ids(name):
    """LLaMA's causal-mask positions are a cumsum of a bool tensor (int64 in torch, typed bool by TVM's
    frontend); RoBERTa's position ids are a cumsum too, whose TVM kernel is a scan no loop rule tiles."""
    _hf_build(name, "")


@pytest.mark.zoo
@pytest.mark.parametrize("name", _HF)
@pytest.mark.parametrize("passes", ["", "prune-channels{ratio=0.5}"])
def test_zoo_hf(name, passes):
    _hf_build(name, passes)
