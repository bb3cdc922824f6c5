"""Structured pruning on a few real architectures (the zoo-wide run is test_zoo_prune.py)."""
import pytest
import torch
import torchvision

import prunec

from prune_cases import HF_MODELS, check_pruned, hf_model, randomize_norms


@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf"])
def test_torchvision_oracle(name):
    model = randomize_norms(torchvision.models.get_model(name, weights=None))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    res = check_pruned(model, (x,))
    assert res["exact-plan-tensors"] > 0


@pytest.mark.parametrize("name", ["bert", "llama-gqa"])
def test_transformer_oracle(name):
    model, inputs = hf_model(name)
    check_pruned(randomize_norms(model), inputs)


_HEAD_WIDTH = {"bert": "attention_head_size", "llama-gqa": "head_dim", "gpt2": "head_dim",
               "bert-eager": "attention_head_size", "gpt2-eager": "head_dim"}
_HEADS = {"bert": "num_attention_heads", "gpt2": "num_heads"}


@pytest.mark.parametrize("name", sorted(_HEAD_WIDTH))
def test_head_width_oracle(name):
    """prune-channels{head-dim=true}: the same dims of every head go; head counts stay; the
    module's head-width attributes follow, and the module still matches the program."""
    model, inputs = hf_model(name)
    attn = [m for m in model.modules() if hasattr(m, _HEAD_WIDTH[name]) and hasattr(m, "scaling")]
    heads = _HEADS.get(name.split("-")[0])  # the head-count attribute (llama: none checked)

    def state(m):
        return getattr(m, _HEAD_WIDTH[name]), m.scaling, getattr(m, heads) if heads else None

    before = [state(m) for m in attn]
    res = check_pruned(randomize_norms(model), inputs, options=",head-dim=true")
    after = [state(m) for m in res["module"].modules() if hasattr(m, _HEAD_WIDTH[name]) and hasattr(m, "scaling")]
    assert len(after) == len(before) > 0
    for (w0, s0, h0), (w1, s1, h1) in zip(before, after):
        assert w1 < w0 and s1 == s0  # narrower heads, the original score scale
        assert h1 == h0  # as many heads as before
    if name.endswith("-eager"):  # attention spelled out in matmuls, no SDPA in the program
        ops = {n.op for n in prunec.trace(model, inputs).nodes}
        assert "matmul" in ops and not ops & {"scaled_dot_product_attention"}


@pytest.mark.parametrize("batch", [1, 2])
def test_packed_heads_oracle_torchvision_vit(batch):
    """torchvision's ViT packs q/k/v into nn.MultiheadAttention's in_proj: with packed-heads=true
    whole heads go, and at one ratio for every group the module keeps embed_dim == q/k/v width.
    With batch > 1 the attention views merge batch and heads ([L, B, E] -> [L, B*H, D]): the heads
    are still the unit."""
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10))
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = check_pruned(model, (x,), options=",packed-heads=true")
    attn = res["module"].encoder.layers[0].self_attention
    assert attn.num_heads == 2 and attn.in_proj_weight.shape == (96, 32), (attn.num_heads, attn.in_proj_weight.shape)


class _MHAThenLinear(torch.nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4)
        self.fc = torch.nn.Linear(32, 5)
        self.need_weights = need_weights

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=self.need_weights)[0])


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_heads_merged_with_batch(need_weights):
    """Batch 2: nn.MultiheadAttention folds the batch into the head axis ([L, B, E] -> [L, B*H, D]);
    through SDPA (need_weights=False) or spelled-out bmm + softmax (True), whole heads still go."""
    import copy

    import prunec
    from prune_cases import max_rel_error
    torch.manual_seed(0)
    model = _MHAThenLinear(need_weights).eval()
    x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(1))
    original = copy.deepcopy(model)
    res = prunec.compile(model, (x,), passes="prune-channels{ratio=0.5,packed-heads=true}", in_place=False)
    assert tuple(res.graph.consts["attn.in_proj_weight"].shape) == (48, 32)  # 2 of 4 heads of q, k and v
    assert res.graph.consts["attn.out_proj.weight"].shape[1] == 16  # its columns of the removed heads
    with torch.no_grad():
        assert max_rel_error(res(x), prunec.oracle.masked_copy(original, res.plan)(x)) <= 1e-5
