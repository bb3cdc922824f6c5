"""`prunec inspect` shows the coupled channel groups and the barriers."""
import json
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def _inspect(*args):
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "prunec.cli", "inspect", *args], capture_output=True, text=True,
                          env=env)


def test_inspect_json_lists_groups_with_members():
    p = _inspect("zoo_factories.models:small_cnn", "--input-shape", "1,3,8,8", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    group = next(g for g in data["groups"] if "@0.weight[0]" in g["members"])
    assert set(group["members"]) == {"@0.weight[0]", "@0.bias[0]", "@1.weight[0]", "@1.bias[0]", "@5.weight[1]"}
    assert group["channels"] == 8 and group["prunable"] == 8
    pinned = next(g for g in data["groups"] if "@0.weight[1]" in g["members"])
    assert pinned["prunable"] == 0 and "graph input" in pinned["pinned"][0]
    assert data["barriers"] == []


def test_inspect_text_names_groups():
    p = _inspect("zoo_factories.models:small_cnn", "--input-shape", "1,3,8,8")
    assert p.returncode == 0, p.stderr
    assert "channel groups:" in p.stdout and "@5.weight[1]" in p.stdout


def test_inspect_head_dim_shows_head_width_groups():
    args = ("zoo_factories.models:tiny_attention", "--input-shape", "1,5,32", "--json")
    heads, widths = (json.loads(p.stdout)["groups"] for p in (_inspect(*args), _inspect(*args, "--head-dim")))

    def q_group(groups):
        return next(g for g in groups if "@q.weight[0]" in g["members"])
    assert q_group(heads)["prunable"] == 4 and "@k.weight[0]" in q_group(heads)["members"]  # whole heads
    assert q_group(widths)["prunable"] == 8 and "@k.weight[0]" in q_group(widths)["members"]  # head widths


def test_inspect_packed_heads_shows_the_in_proj_split_into_heads():
    args = ("zoo_factories.models:tiny_encoder_layer", "--input-shape", "1,5,32", "--json")
    plain, packed = (json.loads(p.stdout)["groups"] for p in (_inspect(*args), _inspect(*args, "--packed-heads")))

    def in_proj(groups):
        return [g for g in groups if "@self_attn.in_proj_weight[0]" in g["members"]]
    assert all(g["prunable"] == 0 for g in in_proj(plain))  # packed: left whole by default
    assert any(g["prunable"] == 4 and "@self_attn.out_proj.weight[1]" in g["members"] for g in in_proj(packed))
