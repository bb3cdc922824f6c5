"""What the compression passes share: picking layers by type and name pattern,
per-layer option overrides, and option checks that fail at parse time."""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Iterator

from .errors import PipelineError
from .registry import Option, Pass

LAYER_OPS = {
    "linear": ("linear",),
    "conv": ("conv1d", "conv2d", "conv3d"),
    "embedding": ("embedding",),
}


def layers_option(default=("linear", "conv")) -> Option:
    return Option(list, list(default), "layer types to compress: linear, conv, embedding")


def skip_option() -> Option:
    return Option(list, [], "layer-name patterns to leave alone (fnmatch), e.g. [conv1,fc]")


class CompressionPass(Pass):
    """A Pass whose options are cross-checked when the pipeline is parsed, so a
    bad combination fails before tracing with one line naming pass and option."""

    def __init__(self, **opts: Any):
        super().__init__(**opts)
        if "layers" in self.options:
            bad = [t for t in self.layers if t not in LAYER_OPS]
            if bad:
                self.fail("layers", f"unknown layer type {bad[0]!r}; use {', '.join(LAYER_OPS)}")
        self.check()

    def check(self) -> None:
        """Override: raise with ``self.fail(option, why)``."""

    def fail(self, option: str, why: str) -> None:
        value = self.given.get(option, self.options[option].default)
        raise PipelineError(f"pass '{self.name}': option '{option}={self.options[option].format(value)}': {why}")


def layer_name(weight_name: str) -> str:
    """``fc.weight`` -> ``fc``; the root module's own ``weight`` -> ``""``."""
    if weight_name == "weight":
        return ""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def weight_layers(graph, kinds, skip=()) -> Iterator[tuple]:
    """(node, weight Value, layer name, kind) for every selected layer whose
    weight is a parameter; a weight read by several layers is visited once."""
    seen = set()
    ops = {op: kind for kind in kinds for op in LAYER_OPS[kind]}
    for n in graph.nodes:
        kind = ops.get(n.op)
        if kind is None:
            continue
        w = n.args[0] if kind == "embedding" else n.args[1]
        if not getattr(w, "is_const", False) or w.kind != "parameter" or w.name in seen:
            continue
        seen.add(w.name)
        layer = layer_name(w.name)
        if any(fnmatchcase(layer, p) or fnmatchcase(w.name, p) for p in skip):
            continue
        yield n, w, layer, kind


def per_layer(value, layer: str):
    """Resolve a float-map option: a plain number applies everywhere; with
    ``[pattern:value,...]`` the last matching pattern wins and unmatched layers
    get None (left alone)."""
    if not isinstance(value, dict):
        return value
    found = None
    for pat, v in value.items():
        if fnmatchcase(layer, pat):
            found = v
    return found
