"""Structured pruning on a few real architectures (the zoo-wide run is test_zoo_prune.py)."""
import pytest
import torch
import torchvision

from prune_cases import HF_MODELS, check_pruned, hf_model, randomize_norms


@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf"])
def test_torchvision_oracle(name):
    model = randomize_norms(torchvision.models.get_model(name, weights=None))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    res = check_pruned(model, (x,))
    assert res["exact-plan-tensors"] > 0


@pytest.mark.parametrize("name", ["bert", "llama-gqa"])
def test_transformer_oracle(name):
    model, inputs = hf_model(name)
    check_pruned(randomize_norms(model), inputs)
