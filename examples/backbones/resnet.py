"""ResNet trunks built from BasicBlock or Bottleneck residual blocks.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
Differences from the ImageNet models, all common in face recognition (e.g. the ArcFace
"IResNet" family) and suited to the 64-112 px face crops of HW2P2:

- the stem is one 3x3 convolution with stride 2 and no max-pool, so a 112 px input reaches
  the last stage at 7x7 as a 224 px input does in the paper;
- the last BatchNorm of every residual branch starts at zero (Goyal et al., 2017), so each
  block starts as the identity and small or short runs train stably;
- blocks optionally carry a squeeze-and-excitation gate (``se_reduction``).

The trunk returns a feature map; :mod:`embedding` turns it into an embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .se import SqueezeExcitation


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when shapes match, else the paper's projection shortcut (1x1 conv + BN)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Parameters
    ----------
    in_channels : int
        Input channels.
    channels : int
        Width of the block; the output has ``channels * expansion`` (= ``channels``) channels.
    stride : int, default 1
        Stride of the first convolution (2 halves the resolution).
    se_reduction : int or None, default None
        Add a squeeze-and-excitation gate with this reduction ratio before the addition.
    """

    expansion = 1

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, se_reduction: int | None = None
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.bn2.weight)
        self.se = SqueezeExcitation(out_channels, se_reduction) if se_reduction else nn.Identity()
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        residual = self.relu(self.bn1(self.conv1(features)))
        residual = self.se(self.bn2(self.conv2(residual)))
        return self.relu(residual + self.shortcut(features))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50 and deeper).

    The stride sits on the 3x3 convolution ("ResNet v1.5"), which is the more accurate
    placement. Parameters as in :class:`BasicBlock`; the output has ``4 * channels`` channels.
    """

    expansion = 4

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, se_reduction: int | None = None
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.bn3.weight)
        self.se = SqueezeExcitation(out_channels, se_reduction) if se_reduction else nn.Identity()
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        residual = self.relu(self.bn1(self.conv1(features)))
        residual = self.relu(self.bn2(self.conv2(residual)))
        residual = self.se(self.bn3(self.conv3(residual)))
        return self.relu(residual + self.shortcut(features))


class ResNet(nn.Module):
    """A stem and four stages of residual blocks; returns the last feature map.

    Parameters
    ----------
    block : BasicBlock or Bottleneck class
        The residual block every stage uses.
    depths : sequence of int
        Blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for 34/50.
    widths : sequence of int
        Block width per stage (``channels`` of the block), ``(64, 128, 256, 512)`` in the paper.
    stem_width : int or None, default None
        Channels of the stem convolution; ``widths[0]`` when None.
    stem_stride : int, default 2
        Stride of the stem convolution.
    se_reduction : int or None, default None
        Squeeze-and-excitation reduction for every block (None: no SE).

    Shape:
        ``[B, 3, H, W] -> [B, out_channels, H / (8 * stem_stride), W / (8 * stem_stride)]``
        (rounded up): the stages after the first halve the resolution.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        depths: Sequence[int],
        widths: Sequence[int],
        *,
        stem_width: int | None = None,
        stem_stride: int = 2,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        if len(depths) != len(widths) or not depths:
            raise ValueError(f"depths and widths must be non-empty and of equal length, got {depths!r}, {widths!r}")
        stem_width = stem_width or widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_channels = stem_width
        for index, (depth, width) in enumerate(zip(depths, widths)):
            blocks: list[nn.Module] = []
            for position in range(depth):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block(in_channels, width, stride, se_reduction))
                in_channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(images))
