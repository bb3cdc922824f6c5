"""Round trip over the torchvision classification zoo (random init, eval mode).

The empty pipeline and ``canonicalize,dce`` must reproduce the original model's
outputs bit for bit through all three products of a compile: the IR interpreter
(``result(x)``), the exported program (``result.program.module()(x)``) and the
user's module updated in place (``result.module``).  ``fold-bn`` changes the
arithmetic, so it only has to match within 1e-5 of the output's magnitude.

The fast tests (default suite) cover four models through ``prunec.compile``;
``-m zoo`` runs every classification model with at most 100M parameters.
"""
from __future__ import annotations

import copy

import pytest
import torch

import prunec
from prunec.driver import compile_graph
from prunec.frontend import trace

torchvision = pytest.importorskip("torchvision")

MAX_PARAMS = 100_000_000
EXACT_PIPELINES = ["", "canonicalize,dce"]
FOLD_RTOL = 1e-5

# Small inputs keep the zoo run within budget on 2 CPU cores: 64x64 where the model
# takes it; otherwise the smallest size it accepts (nothing is skipped).
DEFAULT_INPUT = (1, 3, 64, 64)
INPUT_SIZE: dict[str, tuple[int, ...]] = {
    "inception_v3": (1, 3, 96, 96),   # stride-2 stem + 3x3 valid convs need >= 75
    "maxvit_t": (1, 3, 224, 224),     # window partition needs a multiple of 7 * 32
    "vit_b_16": (1, 3, 224, 224),     # fixed positional embedding for 224x224
    "vit_b_32": (1, 3, 224, 224),
}


def zoo_models() -> list[str]:
    """Every torchvision classification model with <= 100M parameters (counts read
    from the weights' metadata: nothing is built or downloaded)."""
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = list(torchvision.models.get_model_weights(name))
        if weights[0].meta["num_params"] <= MAX_PARAMS:
            out.append(name)
    return out


def make_model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = INPUT_SIZE.get(name, DEFAULT_INPUT)
    x = torch.randn(size, generator=torch.Generator().manual_seed(1))
    return model, x


def _flat(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_same(got, ref, what: str) -> None:
    got, ref = _flat(got), _flat(ref)
    assert len(got) == len(ref), f"{what}: {len(got)} outputs, expected {len(ref)}"
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, f"{what}: output {i} shape {list(a.shape)} != {list(b.shape)}"
        assert torch.equal(a, b), f"{what}: output {i} differs by {(a - b).abs().max().item():.3g}"


def assert_close(got, ref, what: str, rtol: float = FOLD_RTOL) -> None:
    got, ref = _flat(got), _flat(ref)
    assert len(got) == len(ref), f"{what}: {len(got)} outputs, expected {len(ref)}"
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, f"{what}: output {i} shape {list(a.shape)} != {list(b.shape)}"
        err = (a - b).abs().max().item()
        scale = b.abs().max().item()
        assert err <= rtol * scale, f"{what}: output {i} max error {err:.3g} > {rtol} x {scale:.3g}"


def check_result(result, x, ref, exact: bool, label: str) -> None:
    check = assert_same if exact else assert_close
    assert result.module is not None, f"{label}: no in-place module: {result.module_problems}"
    with torch.no_grad():
        check(result(x), ref, f"{label} IR interpreter")
        check(result.program.module()(x), ref, f"{label} exported program")
        check(result.module(x), ref, f"{label} in-place module")


def roundtrip_via_compile(name: str) -> None:
    """Every pipeline through the public ``prunec.compile`` (one trace each)."""
    for passes in EXACT_PIPELINES + ["fold-bn"]:
        model, x = make_model(name)
        with torch.no_grad():
            ref = model(x)
        result = prunec.compile(model, (x,), passes=passes)
        check_result(result, x, ref, exact=passes != "fold-bn", label=f"{name} [{passes or 'empty'}]")


def roundtrip_trace_once(name: str) -> None:
    """Same checks, tracing once and compiling a clone of the IR per pipeline
    (the zoo run's budget goes to models, not to re-tracing)."""
    model, x = make_model(name)
    with torch.no_grad():
        ref = model(x)
    graph = trace(model, (x,))
    for passes in EXACT_PIPELINES + ["fold-bn"]:
        module = copy.deepcopy(model)
        result = compile_graph(graph.clone(), (x,), passes, module=module, source=name)
        check_result(result, x, ref, exact=passes != "fold-bn", label=f"{name} [{passes or 'empty'}]")
        if passes == "fold-bn" and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                       for m in model.modules()):
            assert result.report["passes"][0]["stats"]["batchnorms-folded"] > 0, name


FAST_MODELS = ["resnet18", "mobilenet_v2", "squeezenet1_0", "shufflenet_v2_x0_5"]


def test_roundtrip_fast_via_compile():
    roundtrip_via_compile("resnet18")


@pytest.mark.parametrize("name", FAST_MODELS[1:])
def test_roundtrip_fast(name):
    roundtrip_trace_once(name)


def test_zoo_list_is_complete():
    names = zoo_models()
    assert set(FAST_MODELS) <= set(names)
    assert "vit_b_16" in names and "regnet_y_400mf" in names
    assert "vit_l_16" not in names and "vgg16" not in names  # > 100M parameters
    assert len(names) >= 60


@pytest.mark.zoo
@pytest.mark.parametrize("name", zoo_models())
def test_zoo_roundtrip(name):
    roundtrip_trace_once(name)
