"""The identity baseline."""

from __future__ import annotations

import torch
from torch import nn

from vsbench.models._registry import register


@register("identity", config=lambda settings: {})
class IdentityModel(nn.Module):
    """The baseline: the normalized input phase *is* the prediction (nothing to learn)."""

    divisibility = (1, 1, 1)
    out_channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
