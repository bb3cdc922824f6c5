"""prunec: a pruning compiler for PyTorch models."""
from .analysis import Analysis, AnalysisManager
from .artifact import load_compressed, save_compressed
from .driver import CompileResult, compile
from .errors import IRError, PassFailure, PipelineError, PrunecError, UsageError
from .frontend import load_model, make_inputs, trace
from .ir import Graph, Node, Value, interpret
from .pipeline import parse as parse_pipeline
from .printer import print_graph
from .registry import Option, Pass, PassResult, register_pass, register_pipeline
from .verifier import verify

__version__ = "0.1.0"

__all__ = [
    "Analysis", "AnalysisManager", "CompileResult", "compile", "IRError", "PassFailure", "PipelineError",
    "PrunecError", "UsageError", "load_model", "make_inputs", "trace", "Graph", "Node", "Value", "interpret",
    "parse_pipeline", "print_graph", "Option", "Pass", "PassResult", "register_pass", "register_pipeline",
    "verify", "__version__", "load_compressed", "save_compressed",
]
