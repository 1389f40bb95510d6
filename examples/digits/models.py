"""Teacher and student CNNs for scikit-learn's 8x8 digits."""

from __future__ import annotations

import torch
from torch import nn


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DebugBranch(nn.Module):
    """MODEL plus a leftover debugging branch: LAYERS rounds of a 512x512 matmul whose result is
    multiplied by zero. Same predictions, tens of times the compute: a regression no build-time
    accuracy check sees and a device's health window must catch."""

    def __init__(self, model: nn.Module, layers: int = 150, width: int = 512) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self.proj = nn.Linear(64, width)
        self.mix = nn.Linear(width, width)
        self.gate = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.flatten(1))
        for _ in range(self.layers):
            h = torch.tanh(self.mix(h))
        return self.model(x) + self.gate * h.mean(dim=1, keepdim=True)
