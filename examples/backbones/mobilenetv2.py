"""MobileNetV2 trunks: inverted residual blocks with linear bottlenecks.

Sandler, Howard, Zhu, Zhmoginov and Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018. Each block expands channels with a 1x1 convolution (feature
mixing), filters with a 3x3 depthwise convolution (spatial mixing) and projects back with a
1x1 convolution that has no activation (the "linear bottleneck"); the residual connection
joins the narrow ends when shapes match.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# (expansion t, channels c, repeats n, first stride s) per stage: Table 2 of the paper.
PAPER_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(channels: float, divisor: int = 8) -> int:
    """Round ``channels`` to a multiple of ``divisor``, never more than 10% below it (paper code)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def conv_bn_relu6(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Convolution, BatchNorm, ReLU6: the unit every MobileNetV2 layer but the projection uses."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (x ``expansion``), 3x3 depthwise, 1x1 linear projection; residual if shapes match.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels in and out (the narrow ends).
    stride : int
        Stride of the depthwise convolution (1 or 2).
    expansion : int
        Expansion ratio ``t`` (6 in the paper, 1 for the first stage).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return features + self.block(features)
        return self.block(features)


class MobileNetV2(nn.Module):
    """3x3 stem, inverted-residual stages, a final 1x1 convolution; returns a feature map.

    Parameters
    ----------
    width_mult : float, default 1.0
        Multiplies every width (the paper's width multiplier).
    settings : sequence of (t, c, n, s), default :data:`PAPER_SETTINGS`
        Expansion, channels, repeats and first stride of each stage.
    stem_stride : int, default 2
        Stride of the stem convolution (2 in the paper; 1 keeps more resolution for small
        inputs).
    last_channels : int, default 1280
        Channels of the final 1x1 convolution (the paper's 1280, scaled up when ``width_mult > 1``).

    Shape:
        ``[B, 3, H, W] -> [B, out_channels, H / (16 * stem_stride), W / (16 * stem_stride)]``
        (rounded up) with the paper's settings.
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        settings: Sequence[tuple[int, int, int, int]] = PAPER_SETTINGS,
        *,
        stem_stride: int = 2,
        last_channels: int = 1280,
    ) -> None:
        super().__init__()
        in_channels = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [conv_bn_relu6(3, in_channels, 3, stem_stride)]
        for expansion, channels, repeats, first_stride in settings:
            out_channels = make_divisible(channels * width_mult)
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(InvertedResidual(in_channels, out_channels, stride, expansion))
                in_channels = out_channels
        self.out_channels = make_divisible(last_channels * max(1.0, width_mult))
        layers.append(conv_bn_relu6(in_channels, self.out_channels, 1))
        self.features = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)
