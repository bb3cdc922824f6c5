"""Target parsing.  TVM 0.27 takes targets as dicts and rejects the old
``llvm -mcpu=...`` strings, so the short forms users know are converted here."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

from .errors import UsageError

_KINDS = ("torch", "llvm", "cuda")


@dataclass
class TargetSpec:
    kind: str
    attrs: dict = field(default_factory=dict)

    def tvm_dict(self) -> dict:
        return {"kind": self.kind, **self.attrs}

    def __str__(self) -> str:
        return self.kind if not self.attrs else json.dumps(self.tvm_dict(), sort_keys=True)


def parse_target(text, mcpu: str | None = None) -> TargetSpec:
    """``text``: a name (``llvm``), ``'llvm -mcpu=NAME'``, a TVM target as JSON text, a
    dict of the same, or a ``TargetSpec``."""
    if isinstance(text, TargetSpec):
        text = text.tvm_dict()
    if isinstance(text, dict):
        text = json.dumps(text)
    if text is not None and not isinstance(text, str):
        raise UsageError(f"--target {text!r}: give a name, a JSON dict or a dict, "
                         f"not a {type(text).__name__}")
    text = (text or "").strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--target {text!r}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(d, dict) or d.get("kind") not in ("llvm", "cuda"):
            raise UsageError(f"--target {text!r}: a JSON target needs \"kind\": \"llvm\" or \"cuda\"")
        attrs = {k: v for k, v in d.items() if k != "kind"}
        spec = TargetSpec(d["kind"], attrs)
    else:
        parts = shlex.split(text) if text else []
        if not parts or parts[0] not in _KINDS:
            raise UsageError(f"--target {text!r}: unknown target; use torch, llvm, cuda, "
                             f"'llvm -mcpu=NAME' or a TVM target JSON dict")
        spec = TargetSpec(parts[0])
        for p in parts[1:]:
            key, sep, val = p.lstrip("-").partition("=")
            if not sep or spec.kind == "torch":
                raise UsageError(f"--target {text!r}: cannot read {p!r}; use -key=value (e.g. -mcpu=znver4)")
            spec.attrs[key] = val.split(",") if key == "mattr" else val
    if mcpu:
        if spec.kind != "llvm":
            raise UsageError(f"--mcpu {mcpu}: only llvm targets take a CPU name")
        spec.attrs["mcpu"] = mcpu
    if spec.attrs.get("mcpu") == "native":
        raise UsageError("--mcpu native: TVM refuses 'native'; name the CPU (e.g. znver4, skylake-avx512)")
    return spec
