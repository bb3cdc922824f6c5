"""Zoo-wide structured-pruning oracle (slow: run by .ci/run with -m zoo)."""
import pytest
import torch
import torchvision

from prune_cases import HF_MODELS, check_pruned, hf_model, randomize_norms


def classification_models(limit=100e6):
    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:  # meta tensors make this instant; a few builders copy data at init and need real ones
            with torch.device("meta"):
                n = sum(p.numel() for p in torchvision.models.get_model(name, weights=None).parameters())
        except (NotImplementedError, RuntimeError):
            n = sum(p.numel() for p in torchvision.models.get_model(name, weights=None).parameters())
        if n <= limit:
            names.append(name)
    return names


def _input(name):
    size = 299 if name == "inception_v3" else 224
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.zoo
@pytest.mark.parametrize("name", classification_models())
def test_classification(name):
    model = randomize_norms(torchvision.models.get_model(name, weights=None))
    check_pruned(model, (_input(name),), require_module=False)


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
