"""Shared helpers for the structured-pruning tests: model builders and the oracle check."""
from __future__ import annotations

import copy
import os
import tempfile

import torch

import prunec
from prunec.driver import compile_graph
from prunec.oracle import masked_copy, max_rel_error

TOL = 1e-4


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random-init norms are identities; give them real statistics so pruned
    channels carry non-zero shifts and the oracle has something to catch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def hf_model(name: str) -> tuple[torch.nn.Module, tuple]:
    """``NAME-eager``: the same model with attention spelled out in matmuls (``attn_implementation="eager"``)."""
    import transformers as T
    if name.endswith("-eager"):
        model, inputs = hf_model(name[:-len("-eager")])
        model.config._attn_implementation = "eager"
        return model, inputs
    V = 100
    ids = (torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(0)),)
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=V)
    if name == "bert":
        return T.BertModel(T.BertConfig(hidden_size=64, **small)), ids
    if name == "distilbert":
        return T.DistilBertModel(T.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=V)), ids
    if name == "roberta":
        return T.RobertaModel(T.RobertaConfig(hidden_size=64, **small)), ids
    if name == "gpt2":
        return T.GPT2Model(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64,
                                        bos_token_id=0, eos_token_id=0)), ids
    if name == "llama-gqa":
        return T.LlamaModel(T.LlamaConfig(hidden_size=64, num_key_value_heads=2, **small)), ids
    if name == "t5":
        return T.T5EncoderModel(T.T5Config(d_model=64, num_layers=2, num_heads=4, d_ff=128, d_kv=16,
                                           vocab_size=V)), ids
    if name == "bart":
        return T.BartModel(T.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                        vocab_size=V, max_position_embeddings=64)), ids
    if name == "vit":
        cfg = T.ViTConfig(hidden_size=64, image_size=32, patch_size=8, **{k: v for k, v in small.items() if k != "vocab_size"})
        return T.ViTModel(cfg), (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    raise KeyError(name)


HF_MODELS = ["bert", "distilbert", "roberta", "gpt2", "llama-gqa", "t5", "bart", "vit"]


def check_pruned(model: torch.nn.Module, inputs: tuple, ratio: float = 0.5, criterion: str = "l1",
                 require_module: bool = True, options: str = "") -> dict:
    """Prune at ``ratio`` and check everything the issue promises; returns numbers for reporting.

    1. the pruned model is smaller (params and FLOPs), runs and keeps its output shape;
    2. with ``exact=true`` (groups that feed no channel statistic) it equals the masked model;
    3. the program saves and loads again with the same outputs;
    4. ``ratio=0`` is bit-exact.

    ``options``: more prune-channels options, e.g. ``",head-dim=true"``.
    """
    model.eval()
    original = copy.deepcopy(model)
    with torch.no_grad():
        dense_out = original(*inputs)

    traced = prunec.trace(original, inputs)  # trace once; each pipeline runs on a clone

    def run(passes, module=True):
        return compile_graph(traced.clone(), inputs, passes, module=copy.deepcopy(original) if module else None)

    full = run(f"prune-channels{{ratio={ratio},criterion={criterion}{options}}}")
    if require_module:  # otherwise the problems are reported and the program is still exact
        assert full.module is not None, full.module_problems
    rep = full.report
    assert rep["after"]["params"] < rep["before"]["params"], "no parameters were removed"
    assert rep["after"]["flops"] < rep["before"]["flops"] or rep["before"]["flops"] == 0
    with torch.no_grad():
        out = full(*inputs)
    assert [t.shape for t in prunec.oracle.tensors(out)] == [t.shape for t in prunec.oracle.tensors(dense_out)]
    if rep["passes"][0]["stats"].get("groups-inexact", 0) == 0:
        assert max_rel_error(out, _run(masked_copy(original, full.plan), inputs)) <= TOL

    exact = run(f"prune-channels{{ratio={ratio},criterion={criterion},exact=true{options}}}", module=False)
    err = max_rel_error(exact(*inputs), _run(masked_copy(original, exact.plan), inputs)) if exact.plan["params"] else 0.0
    assert err <= TOL, f"compacted model differs from the masked model: {err:.2e}"

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.pt2")
        torch.export.save(full.program, path)
        again = torch.export.load(path).module()
        assert max_rel_error(_run(again, inputs), out) <= 1e-6

    zero = run(f"prune-channels{{ratio=0.0{options}}}", module=False)
    for a, b in zip(prunec.oracle.tensors(zero(*inputs)), prunec.oracle.tensors(dense_out)):
        assert torch.equal(a, b), "ratio=0 is not bit-exact"
    return {"params": (rep["before"]["params"], rep["after"]["params"]),
            "flops": (rep["before"]["flops"], rep["after"]["flops"]), "exact-error": err,
            "exact-plan-tensors": len(exact.plan["params"]), "module-problems": full.module_problems,
            "module": full.module}


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs)
