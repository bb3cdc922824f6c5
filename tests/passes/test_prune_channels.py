"""prune-channels: before/expected IR on a tiny model, options, plan, errors."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunec
from prunec.errors import PipelineError
from prunec.oracle import masked_copy, max_rel_error


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():  # channel c has L1 norm growing with c: l1 removes 0 and 1
            self.conv.weight.copy_(torch.arange(4.0).add(1).view(4, 1, 1, 1).expand(4, 3, 3, 3) / 10)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


BEFORE = """\
graph(%x: f32[1,3,5,5]) {
  parameter @conv.weight: f32[4,3,3,3]
  parameter @bn.weight: f32[4]
  parameter @bn.bias: f32[4]
  parameter @fc.weight: f32[2,4]
  parameter @fc.bias: f32[2]
  buffer @bn.running_mean: f32[4]
  buffer @bn.running_var: f32[4]
  buffer @bn.num_batches_tracked: i64[]
  %conv2d = aten.conv2d.default(%x, @conv.weight) : f32[1,4,3,3]
  %batch_norm = aten.batch_norm.default(%conv2d, @bn.weight, @bn.bias, @bn.running_mean, @bn.running_var, False, 0.1, 1e-05, False) : f32[1,4,3,3]
  %relu = aten.relu.default(%batch_norm) : f32[1,4,3,3]
  %mean = aten.mean.dim(%relu, [2, 3]) : f32[1,4]
  %linear = aten.linear.default(%mean, @fc.weight, @fc.bias) : f32[1,2]
  return %linear
}
"""

EXPECTED = BEFORE.replace("f32[4,3,3,3]", "f32[2,3,3,3]").replace("f32[2,4]", "f32[2,2]") \
    .replace("f32[4]", "f32[2]").replace("f32[1,4,3,3]", "f32[1,2,3,3]").replace("f32[1,4]", "f32[1,2]")


def test_before_and_expected_ir():
    x = torch.randn(1, 3, 5, 5)
    res = prunec.compile(Tiny(), (x,), passes="prune-channels{ratio=0.5}")
    assert prunec.print_graph(prunec.trace(Tiny(), (x,))) == BEFORE
    assert prunec.print_graph(res.graph) == EXPECTED
    assert res.plan == {"version": 1, "params": {
        "conv.weight": {"0": [0, 1]}, "bn.weight": {"0": [0, 1]}, "bn.bias": {"0": [0, 1]},
        "bn.running_mean": {"0": [0, 1]}, "bn.running_var": {"0": [0, 1]}, "fc.weight": {"1": [0, 1]}}}
    stats = res.report["passes"][0]["stats"]
    assert stats["units-removed"] == 2 and stats["groups-pruned"] == 1
    assert res.module.conv.out_channels == 2 and res.module.bn.num_features == 2 and res.module.fc.in_features == 2


def _chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.Conv2d(32, 8, 1), nn.Flatten(), nn.LazyLinear(3) if False else nn.Identity())


def _kept(res, name):
    return res.graph.consts[name].shape[0]


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn-scale", "taylor", "random"])
def test_every_criterion_is_exact(criterion):
    m, x = _chain().eval(), torch.randn(2, 3, 9, 9)
    original = copy.deepcopy(m)
    res = prunec.compile(m, (x,), passes=f"prune-channels{{ratio=0.5,criterion={criterion}}}")
    assert _kept(res, "0.weight") == 8 and _kept(res, "3.weight") == 16
    with torch.no_grad():
        assert max_rel_error(res(x), masked_copy(original, res.plan)(x)) <= 1e-5



@pytest.mark.parametrize("shape", [(6,), (8, 5, 3, 3), (1 << 11, 1 << 11)], ids=["vector", "conv", "large"])
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_slice_scores_are_the_norms_along_every_dimension(shape, kind):
    """Both reductions (one pass for the rows of a large weight, abs/square then sum elsewhere)
    give each slice's L1 norm or squared L2 norm."""
    from prunec.passes.prune_channels import _slice_scores
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for d in range(t.dim()):
        want = [(t.select(d, i).abs().sum() if kind == "l1" else t.select(d, i).square().sum()).item()
                for i in range(t.shape[d])]
        assert _slice_scores(t, d, kind) == pytest.approx(want, rel=1e-4)

def test_bn_scale_removes_the_smallest_gammas():
    m = _chain().eval()
    with torch.no_grad():
        m[1].weight.copy_(torch.arange(16.0) + 1)
        m[1].weight[5] = 0.01
    res = prunec.compile(m, (torch.randn(1, 3, 9, 9),), passes="prune-channels{ratio=0.25,criterion=bn-scale}")
    assert res.plan["params"]["1.weight"]["0"] == [0, 1, 2, 5]


def test_round_to_min_channels_and_per_layer_ratio():
    x = torch.randn(1, 3, 9, 9)
    res = prunec.compile(_chain().eval(), (x,), passes="prune-channels{ratio=0.7,round-to=4}")
    assert _kept(res, "0.weight") % 4 == 0 and _kept(res, "3.weight") % 4 == 0
    assert _kept(res, "0.weight") == 8  # 16 * 0.3 = 4.8 rounds up to 8
    res = prunec.compile(_chain().eval(), (x,), passes="prune-channels{ratio=0.99,min-channels=5}")
    assert _kept(res, "0.weight") == 5 and _kept(res, "3.weight") == 5
    res = prunec.compile(_chain().eval(), (x,), passes="prune-channels{ratio=[3.*:0.5,*:0.0]}")
    assert _kept(res, "0.weight") == 16 and _kept(res, "3.weight") == 16


def test_ignore_pins_matching_layers():
    res = prunec.compile(_chain().eval(), (torch.randn(1, 3, 9, 9),), passes="prune-channels{ratio=0.5,ignore=[3.*]}")
    assert _kept(res, "0.weight") == 8 and _kept(res, "3.weight") == 32


def test_global_scope_prunes_the_same_total_but_not_uniformly():
    m = _chain().eval()
    with torch.no_grad():
        m[0].weight.mul_(100)  # layer 0's channels all matter more than layer 3's
        m[0].weight[:, :, :, :][0:8].div_(1000)
    res = prunec.compile(m, (torch.randn(1, 3, 9, 9),), passes="prune-channels{ratio=0.5,scope=global}")
    kept = _kept(res, "0.weight") + _kept(res, "3.weight")
    assert kept == 48 - 24
    assert _kept(res, "0.weight") != 8  # not the local 50 % per group



def test_bad_options_name_the_pass_and_option():
    with pytest.raises(PipelineError, match=r"prune-channels.*'ratio=1.5'.*<= 1.0"):
        prunec.parse_pipeline("prune-channels{ratio=1.5}").instantiate()
    with pytest.raises(PipelineError, match="criterion.*one of l1, l2, bn-scale, taylor, random"):
        prunec.parse_pipeline("prune-channels{criterion=l3}").instantiate()
    with pytest.raises(PipelineError, match="has no option 'ratios'"):
        prunec.parse_pipeline("prune-channels{ratios=0.5}").instantiate()


def test_no_op_setting_changes_nothing_bit_exactly():
    m, x = _chain().eval(), torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        ref = m(x)
    res = prunec.compile(m, (x,), passes="prune-channels{ratio=0.0}")
    assert res.report["passes"][0]["changed"] is False
    assert torch.equal(res(x), ref)
    assert res.plan is None


def test_plan_is_json_with_original_indices_across_two_passes():
    m, x = _chain().eval(), torch.randn(1, 3, 9, 9)
    res = prunec.compile(m, (x,), passes="prune-channels{ratio=0.5},prune-channels{ratio=0.5}")
    assert _kept(res, "0.weight") == 4
    removed = res.plan["params"]["0.weight"]["0"]
    assert len(removed) == 12 and max(removed) < 16 and removed == sorted(set(removed))
    json.dumps(res.plan)
