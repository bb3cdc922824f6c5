"""Rewrite a pruned Hugging Face model's ``config`` so it describes the model.

Widths are read from the modules (attention heads / key-value heads / head
width from the attention projections, the MLP width from the up-projections,
the hidden width from the input embeddings).  A config field is rewritten only
when every layer it covers agrees (``encoder_*`` / ``decoder_*`` fields cover
the layers under ``encoder`` / ``decoder``), and only if the config can express
it: where the model derives the head width as ``hidden_size /
num_attention_heads`` (no ``head_dim`` field), the rewritten pair must give the
modules' head width.  Finally the config is checked by building
``type(model)(config)`` on the meta device and comparing parameter shapes.

``rewrite_config`` returns ``({field: [old, new]}, [one line per field or
shape the config could not be made to express])``; nothing here makes the
module itself wrong, so these are not module problems.
"""
from __future__ import annotations

import copy

import torch

from .attention_attributes import _width, attention_widths

FIELDS = {  # what a config field measures -> the field names (real fields, not attribute_map aliases)
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "heads": ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
              "decoder_attention_heads"),
    "kv": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim", "d_kv"),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", "d_ff", "encoder_ffn_dim",
                     "decoder_ffn_dim"),
}
UP_NAMES = ("c_fc", "fc1", "lin1", "gate_proj", "up_proj", "wi", "wi_0", "wi_1", "dense_h_to_4h", "fc_in")


def _measure(model: torch.nn.Module) -> dict[str, list[tuple[str, int]]]:
    """category -> [(module name, width)]."""
    out = {k: [] for k in FIELDS}
    for name, m in model.named_modules():
        w = attention_widths(m)
        if w is not None:
            out["heads"].append((name, w[0]))
            out["kv"].append((name, w[1]))
            out["head_dim"].append((name, w[2]))
        if (name.rsplit(".", 1)[-1] in UP_NAMES or name.endswith("intermediate.dense")) and _width(m):
            out["intermediate"].append((name, _width(m)))
    try:
        emb = model.get_input_embeddings()
    except Exception:  # not every model implements it
        emb = None
    if isinstance(emb, torch.nn.Embedding):
        out["hidden"].append(("embeddings", emb.weight.shape[1]))
    elif isinstance(getattr(emb, "projection", None), torch.nn.Module) and _width(emb.projection):
        out["hidden"].append(("embeddings", _width(emb.projection)))  # ViT-style patch embedding
    return out


def _in_scope(module_name: str, field: str) -> bool:
    scope = field.split("_", 1)[0] if field.startswith(("encoder_", "decoder_")) else None
    return scope is None or scope in module_name.split(".")


def _shapes(model) -> dict[str, tuple]:
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


def _rebuild(model, cfg) -> dict[str, tuple] | None:
    try:
        with torch.device("meta"):
            return _shapes(type(model)(cfg))
    except Exception:  # not constructible from its config alone
        return None


def _differ(have: dict, built: dict) -> list[str]:
    return sorted(k for k in have.keys() | built.keys() if have.get(k) != built.get(k))


def rewrite_config(model: torch.nn.Module) -> tuple[dict, list[str]]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict") or not hasattr(type(model), "config_class"):
        return {}, []
    fields = vars(cfg)
    measured = _measure(model)
    proposals, notes, head_width = {}, [], {}
    for cat, names in FIELDS.items():
        for f in names:
            if f not in fields or (cat == "head_dim" and fields[f] is None):
                continue
            vals = sorted({v for mod, v in measured[cat] if _in_scope(mod, f)})
            if cat == "heads" and len(set(v for mod, v in measured["head_dim"] if _in_scope(mod, f))) == 1:
                head_width[f] = next(v for mod, v in measured["head_dim"] if _in_scope(mod, f))
            if len(vals) > 1:
                notes.append(f"{f}: layers disagree ({', '.join(map(str, vals))}); left at {fields[f]}")
            elif vals and vals[0] != fields[f]:
                proposals[f] = vals[0]
    # without a head-width field the model derives it as hidden / heads: the pair must give the modules' width
    if not any(fields.get(f) is not None for f in FIELDS["head_dim"]):
        hidden = next((f for f in FIELDS["hidden"] if f in fields), None)
        for f, hd in head_width.items():
            h, n = proposals.get(hidden, fields.get(hidden)), proposals.get(f, fields.get(f))
            if hidden is None or not h or not n or (h % n == 0 and h // n == hd):
                continue
            bad = [x for x in (f, hidden) if x in proposals]
            for x in bad:
                notes.append(f"{x}: not rewritten to {proposals.pop(x)}: the config derives the head width as "
                             f"{hidden} / {f} = {h / n:g}, the modules use {hd}")
            if not bad:
                notes.append(f"{f}: the config derives the head width as {hidden} / {f} = {h / n:g}, "
                             f"the modules use {hd}")
    have = _shapes(model)
    before = _rebuild(model, cfg)
    new_cfg = copy.deepcopy(cfg)
    for f, v in proposals.items():
        setattr(new_cfg, f, v)
    after = _rebuild(model, new_cfg) if proposals else before
    if before is not None and after is not None:
        broken = sorted(set(_differ(have, after)) - set(_differ(have, before)))
        if broken:  # a rewrite would make a parameter wrong that the old config got right
            k = broken[0]
            for f, v in proposals.items():
                notes.append(f"{f}: not rewritten to {v}: type(model)(config) would build {k} as "
                             f"{list(after.get(k, ()))}, the pruned model has {list(have.get(k, ()))}")
            proposals, after = {}, before
        for f in [f for f in proposals if fields[f] is None]:  # e.g. GPT-2's n_inner=None: 4 * n_embd
            rest = {x: v for x, v in proposals.items() if x != f}
            trial = copy.deepcopy(cfg)
            for x, v in rest.items():
                setattr(trial, x, v)
            if _rebuild(model, trial) == after:  # the derived default already gives this width
                proposals = rest
        left = _differ(have, after)
        if left:
            k = left[0]
            notes.append(f"type(model)(config): {len(left)} parameter shape(s) still differ from the pruned "
                         f"model, e.g. {k}: {list(have.get(k, ()))} pruned, {list(after.get(k, ()))} from the config")
    rewritten = {}
    for f, v in proposals.items():
        rewritten[f] = [fields[f], v]
        setattr(cfg, f, v)
    return rewritten, notes
