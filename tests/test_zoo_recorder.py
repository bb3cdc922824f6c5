"""The recorder against torch.export over the whole torchvision zoo (``-m zoo``).

For every classification model with at most 100M parameters and every segmentation
model (random init, the zoo's small inputs), the recorder must trace the model itself
(not hand over to torch.export) and give exactly torch.export's program: printed IR,
module stacks and output structure.  tests/test_recorder.py keeps a fast sample."""
from __future__ import annotations

import pytest
import torch

from test_recorder import assert_same_as_export
from test_zoo_roundtrip import make_model, zoo_models

torchvision = pytest.importorskip("torchvision")


@pytest.mark.zoo
@pytest.mark.parametrize("name", zoo_models())
def test_recorder_gives_exports_program(name):
    model, x = make_model(name)
    assert_same_as_export(model, (x,))


@pytest.mark.zoo
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models.segmentation))
def test_recorder_gives_exports_program_segmentation(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    assert_same_as_export(model, (torch.randn(1, 3, 64, 64),))
