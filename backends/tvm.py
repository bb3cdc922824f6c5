"""``prunec.backends.tvm``: the public entry points of the TVM backend.

``load(OUT)`` runs a compiled output directory; ``build`` compiles a graph;
``relax_passes`` are prunec's Relax passes for use in your own TVM pipeline.
"""
from .tvm_backend import TVMArtifact, build, lower  # noqa: F401
from .tvm_lower import fast_activations  # noqa: F401
from .tvm_lower import prunec_relax_passes as relax_passes  # noqa: F401
from .tvm_runner import ArtifactError, TVMModel, load  # noqa: F401
from .tvm_fuse_expand import FuseExpandDepthwise  # noqa: F401
from .tvm_pointwise import PointwiseAsMatmul  # noqa: F401
from .tvm_softmax import RowSoftmax  # noqa: F401
from .tvm_sparse import SparseDenseRewrite  # noqa: F401
