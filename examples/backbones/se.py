"""Squeeze-and-excitation: channel attention that rescales a feature map per channel.

Hu, Shen and Sun, "Squeeze-and-Excitation Networks", CVPR 2018. The block squeezes each
channel to one number (global average pooling), passes the vector through a small
bottleneck MLP and multiplies the feature map by the resulting per-channel gates in (0, 1).
It is placed on the residual branch, before the addition (the paper's "SE-ResNet" layout).
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcitation(nn.Module):
    """Per-channel gating ``x * sigmoid(W2 relu(W1 avgpool(x)))``.

    Parameters
    ----------
    channels : int
        Channels of the feature map it gates.
    reduction : int, default 16
        Bottleneck ratio of the gating MLP (16 in the paper).
    min_hidden : int, default 8
        Lower bound on the bottleneck width, so narrow toy networks keep a usable MLP.

    Shape:
        ``[B, channels, H, W] -> [B, channels, H, W]``
    """

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 8) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels!r}, {reduction!r}")
        hidden = max(min_hidden, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        # 1x1 convolutions on the pooled [B, C, 1, 1] map are the paper's two FC layers.
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1)
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.expand(self.relu(self.reduce(self.pool(features)))))
        return features * gates
