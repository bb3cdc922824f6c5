"""In-place module update after prune-channels: layer attributes that forward code
reshapes with (torchvision ViT / nn.MultiheadAttention / Swin, Hugging Face
attention) follow the pruned widths, widths a module's code cannot express are
named in ``module_problems``, and a Hugging Face ``model.config`` is rewritten
where it can describe the pruned model (the rest listed in the report)."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

import prunec
from prunec.driver import compile_graph
from prunec.oracle import max_rel_error

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prune_cases import hf_model  # noqa: E402

TOL = 1e-4


def _run(model, *inputs):
    with torch.no_grad():
        return model(*inputs)


# ---- torchvision ViT-B/16 -------------------------------------------------------------

@pytest.fixture(scope="module")
def vit():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return model, x, prunec.trace(model, (x,))


def test_vit_b_16_module_matches_when_hidden_width_kept(vit):
    # nn.MultiheadAttention can only follow a hidden-width change together with its q/k/v width
    # (see the next test), so pin the residual stream: every encoder MLP is pruned.
    model, x, traced = vit
    model = copy.deepcopy(model)
    res = compile_graph(traced.clone(), (x,), "prune-channels{ratio=0.5,ignore=[conv_proj.*]}", module=model)
    assert res.module_problems == [] and res.module is model
    assert res.report["module-update"] == {"ok": True, "problems": []}
    assert res.report["hf-config"] == {"rewritten": {}, "not-rewritten": []}
    assert model.encoder.layers.encoder_layer_0.mlp[0].out_features == 1536 and model.hidden_dim == 768
    out = _run(model, x)
    assert max_rel_error(out, res(x)) <= TOL
    assert max_rel_error(out, _run(res.program.module(), x)) <= TOL


def test_vit_b_16_hidden_width_pruned_names_each_attention(vit):
    model, x, traced = vit
    model = copy.deepcopy(model)
    res = compile_graph(traced.clone(), (x,), "prune-channels{ratio=0.5}", module=model)
    # VisionTransformer.hidden_dim follows the residual width: _process_input reshapes with it
    assert model.conv_proj.out_channels == 384 and model.hidden_dim == 384
    assert _run(model._process_input, x).shape == (1, 196, 384)
    # ... but the packed in_proj keeps its 12 heads x 64 (only the hidden dim is pruned), which
    # MultiheadAttention's code cannot run: one line per module, no raw reshape error
    assert model.encoder.layers.encoder_layer_0.self_attention.in_proj_weight.shape == (2304, 384)
    assert res.module is None and not res.report["module-update"]["ok"]
    assert len(res.module_problems) == 12
    for i, line in enumerate(res.module_problems):
        assert line.startswith(f"encoder.layers.encoder_layer_{i}.self_attention: nn.MultiheadAttention takes")
        assert "pruned: query 384, q/k/v 768/768/768, out_proj input 768" in line and "\n" not in line
    assert max_rel_error(_run(res.program.module(), x), res(x)) <= TOL  # the program is still exact


# ---- nn.MultiheadAttention alone ------------------------------------------------------

class CrossAttention(nn.Module):
    """The query is the (pinned) input; keys and values come from a prunable memory."""

    def __init__(self):
        super().__init__()
        self.mem = nn.Linear(6, 24)
        self.mha = nn.MultiheadAttention(16, 4, kdim=24, vdim=24, batch_first=True)

    def forward(self, x, y):
        m = torch.relu(self.mem(y))
        return self.mha(x, m, m, need_weights=False)[0]


class ResidualAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.mha(h, h, h, need_weights=False)[0])


def test_multihead_attention_kdim_vdim_follow():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = CrossAttention().eval()
    x, y = torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 6, generator=g)
    res = prunec.compile(model, (x, y), passes="prune-channels{ratio=0.5}")
    mha = model.mha
    assert res.module_problems == [] and res.module is model
    assert mha.k_proj_weight.shape == (16, 12) and mha.v_proj_weight.shape == (16, 12)
    assert (mha.embed_dim, mha.kdim, mha.vdim, mha.num_heads, mha.head_dim) == (16, 12, 12, 4, 4)
    assert not mha._qkv_same_embed_dim
    assert max_rel_error(_run(model, x, y), res(x, y)) <= TOL


def test_multihead_attention_unequal_widths_reported():
    torch.manual_seed(0)
    model = ResidualAttention().eval()
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    res = prunec.compile(model, (x,), passes="prune-channels{ratio=0.5}")
    assert model.mha.in_proj_weight.shape == (48, 8)  # query width pruned, q/k/v width (pinned heads) not
    assert res.module is None
    assert res.module_problems == [
        "mha: nn.MultiheadAttention takes its head width as embed_dim // num_heads from the query width, so "
        "the query, q/k/v and out_proj input widths must be equal; pruned: query 8, q/k/v 16/16/16, "
        "out_proj input 16"]
    assert res(x).shape == (2, 5, 3)


# ---- torchvision Swin (a small one; swin_t behaves the same) ----------------------------

@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_hard_coded_head_width_reported(v2):
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    kw = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    model = swin.SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], num_classes=10, **kw).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cls = "ShiftedWindowAttentionV2" if v2 else "ShiftedWindowAttention"
    attn = [n for n, m in model.named_modules() if type(m).__name__ == cls]
    pinned = copy.deepcopy(model)
    res = prunec.compile(model, (x,), passes="prune-channels{ratio=0.5}")
    assert res.module is None and len(res.module_problems) == len(attn) == 4
    for name, line in zip(attn, res.module_problems):
        assert line.startswith(f"{name}: {cls} takes its head width as C // num_heads from its input width C")
        assert "is invalid" not in line
    # with the residual widths pinned (only the MLPs pruned) the module follows
    pin = "ignore=[features.0.0.*,features.*.reduction.*]"
    res = prunec.compile(pinned, (x,), passes=f"prune-channels{{ratio=0.5,{pin}}}")
    assert res.module_problems == [] and max_rel_error(_run(pinned, x), res(x)) <= TOL


# ---- Hugging Face config fields --------------------------------------------------------

def _compile_hf(model, inputs, passes="prune-channels{ratio=0.5,heads=true}"):
    model.eval()
    res = prunec.compile(model, inputs, passes=passes)
    assert res.module_problems == [] and res.module is model
    assert max_rel_error(_run(model, *inputs), res(*inputs)) <= TOL
    return res, res.report["hf-config"]


def _rebuilt_shapes(model):
    with torch.device("meta"):
        again = type(model)(model.config)
    return {k: tuple(p.shape) for k, p in again.named_parameters()}


def _shapes(model):
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


def test_hf_llama_gqa_config_rewritten():
    model, ids = hf_model("llama-gqa")
    res, hc = _compile_hf(model, ids)
    cfg, attn = model.config, model.layers[0].self_attn
    assert cfg.num_attention_heads == attn.q_proj.out_features // attn.head_dim == 2
    assert cfg.num_key_value_heads == attn.k_proj.out_features // attn.head_dim == 1
    assert cfg.head_dim == attn.head_dim == 16
    assert cfg.intermediate_size == model.layers[1].mlp.up_proj.out_features == 64
    assert hc["rewritten"] == {"num_attention_heads": [4, 2], "num_key_value_heads": [2, 1],
                                      "intermediate_size": [128, 64]}
    assert hc["not-rewritten"] == []
    assert _rebuilt_shapes(model) == _shapes(model)


def test_hf_bert_classifier_config_rewritten():
    import transformers as T
    model = T.BertForSequenceClassification(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=128, vocab_size=100))
    ids = (torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0)),)
    res, hc = _compile_hf(model, ids)  # the hidden width is prunable here (only logits are an output)
    cfg, attn = model.config, model.bert.encoder.layer[0].attention.self
    assert cfg.hidden_size == model.bert.embeddings.word_embeddings.embedding_dim == 32
    assert cfg.num_attention_heads == attn.num_attention_heads == 2
    assert cfg.intermediate_size == model.bert.encoder.layer[0].intermediate.dense.out_features == 64
    assert hc["not-rewritten"] == []
    assert _rebuilt_shapes(model) == _shapes(model)


def test_hf_bert_heads_not_expressible_in_config():
    # BertModel's output pins the hidden width; 2 heads of 16 in a 64-wide model is something
    # BertConfig cannot say (it derives the head width as hidden_size / num_attention_heads)
    model, ids = hf_model("bert")
    res, hc = _compile_hf(model, ids)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 2
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 64
    assert hc["rewritten"] == {"intermediate_size": [128, 64]}
    assert hc["not-rewritten"][0] == ("num_attention_heads: not rewritten to 2: the config derives the head "
                                             "width as hidden_size / num_attention_heads = 32, the modules use 16")
    assert hc["not-rewritten"][1].startswith("type(model)(config): ")
    assert len(hc["not-rewritten"]) == 2


def test_hf_gpt2_fields():
    model, ids = hf_model("gpt2")
    res, hc = _compile_hf(model, ids)
    assert model.h[0].mlp.c_fc.nf == 128 and model.h[0].attn.num_heads == 2
    assert model.config.n_head == 4 and model.config.n_inner == 128  # was None: 4 * n_embd = 256
    assert hc["rewritten"] == {"n_inner": [None, 128]}
    assert hc["not-rewritten"][0].startswith("n_head: not rewritten to 2")
    # heads only: n_inner=None still gives the MLP width, so it is left alone
    model, ids = hf_model("gpt2")
    res, hc = _compile_hf(model, ids, "prune-channels{ratio=[h.*.attn.*:0.5]}")
    assert model.h[0].mlp.c_fc.nf == 256 and model.config.n_inner is None and hc["rewritten"] == {}


def test_hf_layers_disagree_field_left():
    model, ids = hf_model("llama-gqa")
    res, hc = _compile_hf(model, ids, "prune-channels{ratio=[layers.0.mlp.*:0.5]}")
    assert model.layers[0].mlp.up_proj.out_features == 64 and model.layers[1].mlp.up_proj.out_features == 128
    assert model.config.intermediate_size == 128 and hc["rewritten"] == {}
    assert hc["not-rewritten"][0] == "intermediate_size: layers disagree (64, 128); left at 128"
