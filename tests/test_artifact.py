"""The compressed artifact: exact encodings, the CLI writing weights.safetensors,
load_compressed's bit-exact round trip, and stored bytes that match the file."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

import prunec
from prunec.artifact import (EncodeError, decode, encode, load_weights, nbytes, pack_bits, save_compressed,
                             unpack_bits)


def bits_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def safetensors_data_bytes(path):
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return os.path.getsize(path) - 8 - header


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (1001,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


def _patterns():
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3)
    sparse = torch.where(w.abs() < 1, 0.0, w)
    sparse[0, 0, 0, 0] = -0.0  # a signed zero is a value, not a stored zero
    nm = w.permute(0, 2, 3, 1).reshape(-1, 4).clone()
    nm.scatter_(1, nm.abs().argsort(dim=1)[:, :2], 0.0)
    nm = nm.reshape(8, 3, 3, 16).permute(0, 3, 1, 2).contiguous()
    block = w.reshape(8, -1).clone()
    block[:4, 16:32] = 0
    shared = (w * 2).round() / 2
    return [(sparse, {"format": "sparse"}), (nm, {"format": "nm", "n": 2, "m": 4}),
            (block.reshape(w.shape), {"format": "block", "block": [4, 16]}),
            (shared, {"format": "shared", "bits": 4, "granularity": "per-tensor", "group_size": 0, "sparse": False}),
            (torch.where(sparse == 0, 0.0, shared), {"format": "shared", "bits": 4, "granularity": "per-channel",
                                                     "group_size": 48, "sparse": True}),
            (w, None)]


@pytest.mark.parametrize("i", range(6))
def test_encodings_are_bit_exact_and_small(i):
    t, ann = _patterns()[i]
    parts, layout = encode(t, ann)
    assert bits_equal(decode(parts, layout), t)
    if ann is not None:
        assert nbytes(parts) < t.numel() * 4


def test_encoding_refuses_a_broken_pattern():
    w = torch.randn(4, 8)
    with pytest.raises(EncodeError, match="more than 2 non-zeros"):
        encode(w, {"format": "nm", "n": 2, "m": 4})
    with pytest.raises(EncodeError, match="distinct values"):
        encode(w, {"format": "shared", "bits": 2, "granularity": "per-tensor", "sparse": False})


def test_save_and_load_weights(tmp_path):
    from _helpers_artifact import small_cnn
    model, x = small_cnn()
    r = prunec.compile(model, (x,), passes="prune-nm{layers=[conv]},prune-blocks{block=1x8,layers=[linear]},"
                                          "share-weights{bits=3,granularity=per-channel}")
    layout = save_compressed(r.graph, str(tmp_path))
    decoded, layout2 = load_weights(str(tmp_path))
    assert layout == layout2 and set(decoded) == set(r.graph.tensors)
    for k, t in r.graph.tensors.items():
        assert torch.equal(decoded[k], t), k
    assert layout["conv2.weight"]["format"] == "shared"
    assert safetensors_data_bytes(tmp_path / "weights.safetensors") == r.report["after"]["bytes"]


def test_cli_writes_the_artifact_and_it_round_trips(tmp_path, tests_on_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "prunec.cli", "compile", "_helpers_artifact:small_cnn_module",
           "--input-shape", "2,3,16,16", "--passes",
           "lowrank{rank=8,layers=[linear]},prune-weights{ratio=0.8},share-weights{bits=4}", "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "compression ratio" in p.stdout
    report = json.loads((out / "report.json").read_text())
    ratio = report["ratios"]["bytes"]
    assert f"{ratio:.2f}x" in p.stdout and ratio > 5
    # the report counts what the file holds: equal up to the safetensors header
    assert safetensors_data_bytes(out / "weights.safetensors") == report["after"]["bytes"]
    assert os.path.getsize(out / "weights.safetensors") < report["before"]["bytes"] / 5
    assert os.path.getsize(out / "structure.pt2") < os.path.getsize(out / "model.pt2")
    layers = report["layers"]
    assert layers["fc"]["formats"] == ["shared", "dense"]  # both factors shared, the bias dense
    assert layers["conv1"]["bytes-after"] < layers["conv1"]["bytes-before"]
    assert sum(v["bytes-after"] for v in layers.values()) <= report["after"]["bytes"]
    # load_compressed: the structure plus decoded weights is the compiled program, bit for bit
    x = torch.randn(2, 3, 16, 16)
    loaded = prunec.load_compressed(str(out))
    program = torch.export.load(str(out / "model.pt2")).module()
    assert torch.equal(loaded(x), program(x))
    with open(out / "weights.safetensors", "rb") as f:  # a safetensors file (JSON header), not a pickle
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert "prunec.layout" in header["__metadata__"] and "fc.0.weight::codes" in header


def test_load_compressed_rejects_other_dirs(tmp_path):
    with pytest.raises(prunec.UsageError, match="weights.safetensors"):
        prunec.load_compressed(str(tmp_path))
