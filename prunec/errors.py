"""Error types.  Every user-facing error is one line that names the file, node
or option at fault and says what to do; the CLI maps them to exit codes."""


class PrunecError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(PrunecError):
    """Bad input from the user (file, option, pipeline, shape): exit code 2."""

    exit_code = 2


class PipelineError(UsageError):
    """A malformed pipeline string or an unknown pass/option."""

    def __init__(self, msg: str, text: str | None = None, col: int | None = None):
        if text is not None and col is not None:
            msg = f"{msg} at column {col + 1}: {text[:col]}>>>{text[col:]}"
        super().__init__(msg)
        self.col = col


class IRError(PrunecError):
    """The IR is inconsistent (raised by the verifier and shape propagation)."""

    def __init__(self, msg: str, node: str | None = None):
        super().__init__(msg)
        self.node = node


class PassFailure(PrunecError):
    """A pass raised: names the pass, the pipeline so far and the node involved."""
