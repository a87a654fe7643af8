"""Helpers shared by the tests."""

import torch
from torch import nn

from tsm_surgery.integrations.models.norms import randomize_norms

__all__ = ["randomize_norms", "TinyNet"]


class TinyNet(nn.Module):
    """A stem and two residual blocks; ``norm`` picks BatchNorm or GroupNorm (per-sample, for DDP)."""

    def __init__(self, width=16, classes=5, norm="batch"):
        super().__init__()

        def make_norm():
            return nn.BatchNorm2d(width) if norm == "batch" else nn.GroupNorm(4, width)

        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), make_norm(), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1), make_norm())
            for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))
