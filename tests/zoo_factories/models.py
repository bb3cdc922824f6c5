"""``zoo_factories.models:small_mlp`` and friends (used by tests/test_frontend.py and test_cli.py)."""
import torch
from torch import nn


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def not_a_module():
    return 42


INSTANCE = nn.Linear(3, 3)


class _Attention(nn.Module):
    """4 heads of 8 over a 32-wide input, scale passed explicitly."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, scale=8 ** -0.5)
        return self.o(y.transpose(1, 2).reshape(b, t, 32))


def tiny_attention() -> nn.Module:
    torch.manual_seed(0)
    return _Attention().eval()


def tiny_encoder_layer() -> nn.Module:
    """nn.TransformerEncoderLayer: q/k/v packed in nn.MultiheadAttention's in_proj."""
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
