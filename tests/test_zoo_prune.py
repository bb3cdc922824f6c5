"""Zoo-wide structured-pruning oracle (slow: run by .ci/run with -m zoo)."""
import pytest
import torch
import torchvision

from prune_cases import HF_MODELS, check_pruned, hf_model, randomize_norms
from test_zoo_roundtrip import make_model, zoo_models


@pytest.mark.zoo
@pytest.mark.parametrize("name", zoo_models())
def test_classification(name):
    model, x = make_model(name)  # the round-trip test's list and input sizes
    check_pruned(randomize_norms(model), (x,), require_module=False)


SEGMENTATION = torchvision.models.list_models(module=torchvision.models.segmentation)


@pytest.mark.zoo
@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation(name):
    model = randomize_norms(torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=False))
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    check_pruned(model, (x,), require_module=False)


@pytest.mark.zoo
@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face(name):
    model, inputs = hf_model(name)
    check_pruned(randomize_norms(model), inputs)


@pytest.mark.zoo
@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_head_width(name):
    model, inputs = hf_model(name)
    check_pruned(randomize_norms(model), inputs, options=",head-dim=true")
