"""Textual pipelines: ``fold-bn,prune-channels{ratio=0.5,criterion=l1},dce``.

Grammar::

    pipeline := item (',' item)*
    item     := NAME ('{' option (',' option)* '}')?
    option   := KEY '=' VALUE     VALUE may contain [...] with commas inside

``str(parse(text)) == text`` for canonical text.  Preset names expand when the
pipeline is instantiated, so printing keeps what the user wrote.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import PipelineError
from .registry import PASSES, PIPELINES, Pass, load_plugins

_IDENT = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


@dataclass
class PassSpec:
    name: str
    options: dict[str, str] = field(default_factory=dict)  # raw text, in the given order
    col: int = 0

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options.items()) + "}"


@dataclass
class Pipeline:
    items: list[PassSpec]
    text: str = ""

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.items)

    def instantiate(self, _depth: int = 0) -> list[Pass]:
        """Look up every pass and check its options; presets expand in place."""
        out: list[Pass] = []
        for item in self.items:
            if item.name not in PIPELINES and item.name not in PASSES:
                load_plugins()  # a pass from an installed package, or a typo
            if item.name in PIPELINES:
                if item.options:
                    raise PipelineError(f"preset pipeline '{item.name}' takes no options", self.text, item.col)
                if _depth > 8:
                    raise PipelineError(f"preset pipeline '{item.name}' expands into itself")
                out += parse(PIPELINES[item.name][0]).instantiate(_depth + 1)
                continue
            cls = PASSES.get(item.name)
            if cls is None:
                known = ", ".join(sorted(PASSES)) or "none"
                raise PipelineError(f"unknown pass '{item.name}' (registered: {known}; "
                                    f"see `prunec passes`)", self.text, item.col)
            try:
                out.append(cls(**item.options))
            except PipelineError as e:
                raise PipelineError(str(e), self.text, item.col) from None
        return out


def parse(text: str) -> Pipeline:
    text = text.rstrip()
    items: list[PassSpec] = []
    i, n = len(text) - len(text.lstrip()), len(text)  # columns count from the text as given
    if i == n:
        return Pipeline([], text.strip())
    while True:
        m = _IDENT.match(text, i)
        if not m:
            raise PipelineError("expected a pass name (kebab-case)", text, i)
        spec = PassSpec(m.group(0), col=i)
        i = m.end()
        if i < n and text[i] == "{":
            i = _parse_options(text, i + 1, spec)
        items.append(spec)
        if i == n:
            break
        if text[i] != ",":
            raise PipelineError(f"expected ',' or '{{' after '{spec.name}'", text, i)
        i += 1
    return Pipeline(items, text)


def _parse_options(text: str, i: int, spec: PassSpec) -> int:
    n = len(text)
    while True:
        m = re.compile(r"[a-z][a-z0-9_-]*").match(text, i)
        if not m:
            raise PipelineError(f"expected an option name in '{spec.name}{{...}}'", text, i)
        key = m.group(0)
        i = m.end()
        if i >= n or text[i] != "=":
            raise PipelineError(f"expected '=' after option '{key}'", text, i)
        i += 1
        start, depth = i, 0
        while i < n and (depth > 0 or text[i] not in ",}"):
            if text[i] == "[":
                depth += 1
            elif text[i] == "]":
                depth -= 1
            i += 1
        if depth != 0 or i >= n:
            raise PipelineError(f"unterminated option list of '{spec.name}' (missing '}}' or ']')", text, i)
        value = text[start:i]
        if not value:
            raise PipelineError(f"option '{key}' has no value", text, start)
        if key in spec.options:
            raise PipelineError(f"option '{key}' given twice", text, m.start())
        spec.options[key] = value
        if text[i] == "}":
            return i + 1
        i += 1
