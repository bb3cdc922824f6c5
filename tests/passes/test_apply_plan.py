"""apply-plan: a plan replayed on a fresh copy of the architecture recreates the pruned model."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import prunec
from prunec.errors import PassFailure


def _resnet(seed):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).eval()


X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_replay_gives_the_same_weights_and_outputs(tmp_path):
    trained = _resnet(0)
    first = prunec.compile(trained, (X,), passes="prune-channels{ratio=0.5}")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(first.plan))
    fresh = _resnet(0)  # same weights, as when re-creating a pruned checkpoint
    again = prunec.compile(fresh, (X,), passes=f"apply-plan{{file={plan}}}")
    assert again.plan == first.plan
    for name, t in first.graph.tensors.items():
        assert torch.equal(again.graph.tensors[name], t), name
    assert torch.equal(again(X), first(X))
    # the plan also shapes a model with other weights: load a pruned state dict into it
    other = prunec.compile(_resnet(1), (X,), passes=f"apply-plan{{file={plan}}}").module
    other.load_state_dict(first.module.state_dict())
    assert torch.allclose(other(X), first(X), atol=1e-6)


def test_plan_for_another_architecture_is_rejected(tmp_path):
    res = prunec.compile(_resnet(0), (X,), passes="prune-channels{ratio=0.5}")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(res.plan))
    mnet = torchvision.models.mobilenet_v2(num_classes=10).eval()
    with pytest.raises(PassFailure, match="apply-plan.*names conv1.weight, which this model does not have"):
        prunec.compile(mnet, (X,), passes=f"apply-plan{{file={bad}}}")
    partial = {"version": 1, "params": {"layer1.0.conv1.weight": {"0": [1, 2]}}}
    bad.write_text(json.dumps(partial))
    with pytest.raises(PassFailure, match="does not match this architecture"):
        prunec.compile(_resnet(0), (X,), passes=f"apply-plan{{file={bad}}}")
    bad.write_text("{not json")
    with pytest.raises(PassFailure, match="not valid JSON"):
        prunec.compile(_resnet(0), (X,), passes=f"apply-plan{{file={bad}}}")
    with pytest.raises(PassFailure, match="does not exist"):
        prunec.compile(_resnet(0), (X,), passes=f"apply-plan{{file={tmp_path / 'missing.json'}}}")


TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_plan_out_then_apply_plan(tmp_path):
    plan = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    model = "zoo_factories.models:small_cnn"
    cmd = [sys.executable, "-m", "prunec.cli", "compile", model, "--input-shape", "1,3,16,16",
           "--passes", "prune-channels{ratio=0.25}", "--plan-out", str(plan), "-o", str(tmp_path / "a"), "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    data = json.loads(plan.read_text())
    assert data["version"] == 1 and data["params"]["0.weight"] == {"0": sorted(data["params"]["0.weight"]["0"])}
    cmd2 = [sys.executable, "-m", "prunec.cli", "compile", model, "--input-shape", "1,3,16,16",
            "--passes", f"apply-plan{{file={plan}}}", "-o", str(tmp_path / "b"), "--quiet"]
    subprocess.run(cmd2, check=True, capture_output=True, text=True, env=env)
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["after"]["params"] == b["after"]["params"] < a["before"]["params"]
    assert os.path.isfile(tmp_path / "b" / "model.pt2")


def test_head_width_plan_replays(tmp_path):
    from prune_cases import hf_model
    torch.manual_seed(0)
    model, ids = hf_model("llama-gqa")  # GQA + rotary embeddings
    first = prunec.compile(model.eval(), ids, passes="prune-channels{ratio=0.5,head-dim=true}")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(first.plan))
    torch.manual_seed(0)
    fresh, _ = hf_model("llama-gqa")  # same seed, same weights
    again = prunec.compile(fresh.eval(), ids, passes=f"apply-plan{{file={plan}}}")
    assert again.plan == first.plan
    assert torch.equal(again(*ids)[0], first(*ids)[0])
    assert again.module is not None and again.module.layers[0].self_attn.head_dim == 8


def test_packed_heads_plan_replays(tmp_path):
    from torch import nn
    x = torch.randn(1, 5, 32)

    def layer():
        torch.manual_seed(0)
        return nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    first = prunec.compile(layer(), (x,), passes="prune-channels{ratio=0.5,packed-heads=true}")
    assert first.plan["params"]["self_attn.in_proj_weight"]["0"], "no head was removed"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(first.plan))
    again = prunec.compile(layer(), (x,), passes=f"apply-plan{{file={plan}}}")
    assert again.plan == first.plan
    assert torch.equal(again(x), first(x))


def test_plan_with_whole_heads_and_head_widths_replays(tmp_path):
    """Whole heads, then head widths: the replay removes whole units first, then the widths."""
    from prune_cases import hf_model
    torch.manual_seed(0)
    model, ids = hf_model("bert")
    passes = "prune-channels{ratio=0.25},prune-channels{ratio=0.25,head-dim=true}"
    first = prunec.compile(model.eval(), ids, passes=passes)
    q = first.plan["params"]["encoder.layer.0.attention.self.query.weight"]["0"]
    original_rows = model.config.hidden_size
    kept = original_rows - len(q)
    assert kept % 2 == 0 and len(q) > original_rows // 4, "expected both whole heads and widths removed"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(first.plan))
    torch.manual_seed(0)
    fresh, _ = hf_model("bert")
    again = prunec.compile(fresh.eval(), ids, passes=f"apply-plan{{file={plan}}}")
    assert again.plan == first.plan
    assert {k: tuple(v.shape) for k, v in again.graph.consts.items()} == \
        {k: tuple(v.shape) for k, v in first.graph.consts.items()}
    assert torch.equal(again(*ids)[0], first(*ids)[0])
