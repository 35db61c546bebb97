"""ConvNeXt trunks: depthwise 7x7, LayerNorm, inverted bottleneck, layer scale, stochastic depth.

Liu, Mao, Wu, Feichtenhofer, Darrell and Xie, "A ConvNet for the 2020s", CVPR 2022.
One block type: a 7x7 depthwise convolution mixes space, then a pointwise MLP with a 4x
inverted bottleneck mixes channels, scaled by a learned per-channel ``gamma`` (layer scale,
Touvron et al., 2021) and randomly skipped per sample in training (stochastic depth, Huang
et al., 2016). Stages are joined by LayerNorm + 2x2 stride-2 convolutions.

Differences from the paper, for small face crops: the patchify stem's size is a parameter
(4 in the paper; 2 keeps more resolution at 64 px), and the final LayerNorm is applied to
the feature map before pooling rather than after it, so every trunk here returns a map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of a channels-first ``[B, C, H, W]`` map."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.permute(0, 2, 3, 1)
        features = F.layer_norm(features, self.normalized_shape, self.weight, self.bias, self.eps)
        return features.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability ``drop_prob``.

    Survivors are scaled by ``1 / (1 - drop_prob)`` so the expected output is unchanged;
    in eval mode (or with ``drop_prob == 0``) it is the identity.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob!r}")
        self.drop_prob = drop_prob

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return residual
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (residual.shape[0],) + (1,) * (residual.ndim - 1)
        mask = torch.empty(mask_shape, dtype=residual.dtype, device=residual.device).bernoulli_(keep_prob)
        return residual * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ConvNeXtBlock(nn.Module):
    """``x + drop_path(gamma * pwconv2(gelu(pwconv1(layernorm(dwconv7x7(x))))))``.

    Parameters
    ----------
    dim : int
        Channels in and out.
    drop_path : float, default 0.0
        Stochastic depth probability of this block.
    layer_scale_init : float, default 1e-6
        Initial value of the per-channel scale ``gamma`` (the paper's 1e-6); 0 or less
        disables layer scale.
    expansion : int, default 4
        Width of the inverted bottleneck relative to ``dim`` (4 in the paper).
    """

    def __init__(
        self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6, expansion: int = 4
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # Pointwise convolutions as Linear layers on channels-last tensors, as in the paper.
        self.pwconv1 = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(expansion * dim, dim)
        self.gamma = (
            nn.Parameter(torch.full((dim,), float(layer_scale_init))) if layer_scale_init > 0 else None
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        residual = self.dwconv(features).permute(0, 2, 3, 1)
        residual = self.pwconv2(self.act(self.pwconv1(self.norm(residual))))
        if self.gamma is not None:
            residual = residual * self.gamma
        return features + self.drop_path(residual.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """Patchify stem, four stages of :class:`ConvNeXtBlock`, final LayerNorm; returns a map.

    Parameters
    ----------
    depths : sequence of int
        Blocks per stage; ``(3, 3, 9, 3)`` for ConvNeXt-T.
    dims : sequence of int
        Channels per stage; ``(96, 192, 384, 768)`` for ConvNeXt-T.
    stem_patch : int, default 4
        Kernel size and stride of the patchify stem (4 in the paper).
    drop_path_rate : float, default 0.0
        Stochastic depth of the last block; it grows linearly from 0 over the blocks, as in
        the paper (0.1 for ConvNeXt-T on ImageNet).
    layer_scale_init : float, default 1e-6
        See :class:`ConvNeXtBlock`.

    Shape:
        ``[B, 3, H, W] -> [B, dims[-1], H / (8 * stem_patch), W / (8 * stem_patch)]`` (floored).
    """

    def __init__(
        self,
        depths: Sequence[int],
        dims: Sequence[int],
        *,
        stem_patch: int = 4,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths and dims must be non-empty and of equal length, got {depths!r}, {dims!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0], kernel_size=stem_patch, stride=stem_patch),
            LayerNorm2d(dims[0], eps=1e-6),
        )
        total_blocks = sum(depths)
        rates = [drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
        stages: list[nn.Module] = []
        for index, (depth, dim) in enumerate(zip(depths, dims)):
            layers: list[nn.Module] = []
            if index > 0:
                layers += [
                    LayerNorm2d(dims[index - 1], eps=1e-6),
                    nn.Conv2d(dims[index - 1], dim, kernel_size=2, stride=2),
                ]
            start = sum(depths[:index])
            layers += [ConvNeXtBlock(dim, rates[start + i], layer_scale_init) for i in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(dims[-1], eps=1e-6)
        self.out_channels = dims[-1]
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(images)))
