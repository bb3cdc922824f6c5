"""The pass registry: kebab-case names, typed options with defaults, one-line
summaries (after LLVM's PassRegistry and MLIR's pass definitions).  Named preset
pipelines register the same way."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import PipelineError

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


# ---- option types ----------------------------------------------------------------

def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "[" + ",".join(f"{k}:{_fmt(v)}" for k, v in value.items()) + "]"
    return str(value)


@dataclass
class Option:
    """A typed pass option.  ``type`` is bool, int, float, str, ``list`` (a
    bracketed, comma-separated list of strings) or ``"float-map"`` (a global
    float or ``[pattern:float,...]`` overrides by name pattern)."""

    type: Any
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, text: str) -> Any:
        t = self.type
        if t is bool:
            value = _parse_bool(text)
        elif t is int:
            value = int(text)
        elif t is float:
            value = float(text)
        elif t is list:
            value = _split_list(text)
        elif t == "float-map":
            if text.startswith("["):
                value = {}
                for item in _split_list(text):
                    pat, sep, num = item.rpartition(":")
                    if not sep:
                        raise ValueError(f"expected pattern:value, got {item!r}")
                    value[pat] = float(num)
            else:
                value = float(text)
        else:
            value = text
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"expected one of {', '.join(map(str, self.choices))}")
        nums = value.values() if isinstance(value, dict) else [value]
        for v in nums:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.minimum is not None and v < self.minimum:
                    raise ValueError(f"must be >= {self.minimum}")
                if self.maximum is not None and v > self.maximum:
                    raise ValueError(f"must be <= {self.maximum}")

    def format(self, value: Any) -> str:
        return _fmt(value)

    def type_name(self) -> str:
        return self.type if isinstance(self.type, str) else self.type.__name__


def _split_list(text: str) -> list[str]:
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError("expected a bracketed list such as [a,b]")
    inner = text[1:-1].strip()
    return [p.strip() for p in inner.split(",")] if inner else []


# ---- passes ----------------------------------------------------------------------

@dataclass
class PassResult:
    """What a pass returns: whether it changed the IR, its statistics, and the
    analyses it preserved (everything else is invalidated)."""

    changed: bool
    stats: dict = field(default_factory=dict)
    preserved: Any = frozenset()


class Pass:
    """Base class.  Subclasses set ``name``, ``summary``, ``options`` and implement
    ``run(graph, am) -> PassResult``; options arrive as attributes (kebab-case
    names become snake_case: ``round-to`` -> ``self.round_to``)."""

    name: str = ""
    summary: str = ""
    options: dict[str, Option] = {}

    def __init__(self, **opts: Any):
        given = {k.replace("_", "-"): v for k, v in opts.items()}
        for key in given:
            if key not in self.options:
                raise PipelineError(f"pass '{self.name}' has no option '{key}'; "
                                    f"options: {', '.join(self.options) or 'none'}")
        self.given = {}
        for key, opt in self.options.items():
            value = given.get(key, opt.default)
            if key in given:
                try:
                    if isinstance(value, str) and opt.type is not str:
                        value = opt.parse(value)
                    else:
                        opt.check(value)
                except ValueError as e:
                    raise PipelineError(f"pass '{self.name}': option '{key}={opt.format(given[key])}': {e}") from None
                self.given[key] = value
            setattr(self, key.replace("-", "_"), value)

    def run(self, graph, am) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def text(self) -> str:
        if not self.given:
            return self.name
        opts = ",".join(f"{k}={self.options[k].format(v)}" for k, v in self.given.items())
        return f"{self.name}{{{opts}}}"


PASSES: dict[str, type[Pass]] = {}
PIPELINES: dict[str, tuple[str, str]] = {}  # name -> (pipeline text, summary)


def register_pass(name: str, summary: str | None = None, options: dict | None = None) -> Callable:
    """Register a pass class, or a function ``fn(graph, am, **options) -> PassResult``."""
    if not _NAME.match(name):
        raise ValueError(f"pass name {name!r} must be kebab-case, e.g. 'fold-bn'")

    def deco(obj):
        if isinstance(obj, type) and issubclass(obj, Pass):
            cls = obj
        else:
            fn = obj

            def run(self, graph, am, _fn=fn):
                kw = {k.replace("-", "_"): getattr(self, k.replace("-", "_")) for k in self.options}
                return _fn(graph, am, **kw)

            cls = type(_camel(name), (Pass,), {"run": run, "__doc__": fn.__doc__,
                                               "__module__": fn.__module__})
        cls.name = name
        doc = (cls.__doc__ or "").strip()
        cls.summary = summary or cls.summary or (doc.splitlines()[0] if doc else "")
        if options is not None:
            cls.options = options
        if name in PASSES and PASSES[name] is not cls:
            raise ValueError(f"pass {name!r} is already registered by {PASSES[name].__module__}")
        PASSES[name] = cls
        return obj

    return deco


def register_pipeline(name: str, text: str, summary: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"pipeline name {name!r} must be kebab-case")
    PIPELINES[name] = (text, summary)


def _camel(name: str) -> str:
    return "".join(p.title() for p in name.split("-")) + "Pass"


_plugins_loaded = False


def load_builtin_passes(plugins: bool = True) -> None:
    """Register prunec's own passes and, with ``plugins``, those of installed packages
    (the ``prunec.passes`` entry-point group).  A pipeline loads plugins only when it names a
    pass prunec does not have: reading every installed package's entry points costs 15-20 ms."""
    import importlib
    import pkgutil
    import prunec.passes as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"prunec.passes.{info.name}")
    if plugins:
        load_plugins()


def load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _load_entry_points()
        _plugins_loaded = True


def _load_entry_points() -> None:
    from importlib.metadata import entry_points
    for ep in entry_points(group="prunec.passes"):
        ep.load()


def load_pass_file(path: str) -> None:
    """Import a user's Python file so its ``@register_pass`` decorators run."""
    import importlib.util
    import os
    from .errors import UsageError
    if not os.path.isfile(path):
        raise UsageError(f"--load-passes {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"prunec_user_passes_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise UsageError(f"--load-passes {path}: importing it failed: {type(e).__name__}: {e}") from None
