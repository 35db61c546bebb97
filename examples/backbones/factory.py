"""Named backbone configurations and :func:`build`, the one entry point the face examples use.

Every configuration maps ``[B, 3, H, W]`` images (any H, W >= 32) to ``[B, embedding_dim]``
embeddings and stays within the HW2P2 limit of 21M parameters *including* a 512-d
embedding and a 7001-class linear classifier (7001 x 512 = 3.6M), i.e. its embedding model
has at most ``21M - 3.6M`` parameters at ``embedding_dim=512``. Where the paper's model is
larger, the widths are reduced and the description says so. ``python -m backbones`` (from
``examples/``) prints the table.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .convnext import ConvNeXt
from .embedding import EmbeddingNet
from .mobilenetv2 import MobileNetV2
from .resnet import BasicBlock, Bottleneck, ResNet

PARAMETER_LIMIT = 21_000_000
"""HW2P2's limit on the parameters of the whole model (trunk, embedding and classifier)."""

HW2P2_NUM_CLASSES = 7001

# name -> (description, trunk constructor). Plain data on purpose: one table to read.
CONFIGS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "resnet18": (
        "ResNet-18: BasicBlock x (2, 2, 2, 2), widths 64-128-256-512 (as in the paper)",
        lambda: ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512)),
    ),
    "resnet34": (
        "ResNet-34: BasicBlock x (3, 4, 6, 3), widths 64-128-256-384 (last stage narrowed from 512)",
        lambda: ResNet(BasicBlock, (3, 4, 6, 3), (64, 128, 256, 384)),
    ),
    "resnet50": (
        "ResNet-50: Bottleneck x (3, 4, 6, 3), widths 56-112-224-384 (paper: 64-128-256-512)",
        lambda: ResNet(Bottleneck, (3, 4, 6, 3), (56, 112, 224, 384)),
    ),
    "se_resnet18": (
        "SE-ResNet-18: ResNet-18 with a squeeze-excitation gate (reduction 16) in every block",
        lambda: ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), se_reduction=16),
    ),
    "se_resnet34": (
        "SE-ResNet-34: resnet34 above with squeeze-excitation (reduction 16) in every block",
        lambda: ResNet(BasicBlock, (3, 4, 6, 3), (64, 128, 256, 384), se_reduction=16),
    ),
    "convnext_t": (
        "ConvNeXt-T depths (3, 3, 9, 3), dims 72-144-288-576 (paper: 96-...-768), patch-2 stem, stochastic depth 0.1",
        lambda: ConvNeXt((3, 3, 9, 3), (72, 144, 288, 576), stem_patch=2, drop_path_rate=0.1),
    ),
    "mobilenetv2": (
        "MobileNetV2 (width 1.0, paper settings), stride-1 stem for small face crops",
        lambda: MobileNetV2(1.0, stem_stride=1),
    ),
    "resnet_toy": (
        "toy ResNet: BasicBlock x (1, 1, 1, 1), widths 16-32-64-128 (demo, tests)",
        lambda: ResNet(BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128)),
    ),
    "se_resnet_toy": (
        "toy SE-ResNet: resnet_toy with squeeze-excitation (reduction 4) in every block",
        lambda: ResNet(BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), se_reduction=4),
    ),
    "convnext_toy": (
        "toy ConvNeXt: depths (1, 1, 2, 1), dims 16-32-64-128, patch-2 stem, layer scale 0.1",
        lambda: ConvNeXt((1, 1, 2, 1), (16, 32, 64, 128), stem_patch=2, layer_scale_init=0.1),
    ),
    "mobilenetv2_toy": (
        "toy MobileNetV2: width 0.25, last conv 256 channels",
        lambda: MobileNetV2(0.25, last_channels=256),
    ),
}


def available() -> list[str]:
    """Names :func:`build` accepts."""
    return list(CONFIGS)


def describe(name: str) -> str:
    """One line saying what the configuration ``name`` is."""
    return CONFIGS[_check_name(name)][0]


def build(name: str, embedding_dim: int, *, dropout: float = 0.0) -> EmbeddingNet:
    """Build the named backbone as an embedding model.

    Parameters
    ----------
    name : str
        One of :func:`available`, e.g. ``"resnet18"``, ``"convnext_t"``, ``"resnet_toy"``.
    embedding_dim : int
        Size of the embedding the model outputs.
    dropout : float, default 0.0
        Dropout before the embedding projection.

    Shape:
        ``[B, 3, H, W] -> [B, embedding_dim]``

    Examples
    --------
    >>> import torch
    >>> model = build("resnet_toy", 32).eval()
    >>> model(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 32])
    """
    trunk = CONFIGS[_check_name(name)][1]()
    return EmbeddingNet(trunk, embedding_dim, dropout)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_name(name: str) -> str:
    if name not in CONFIGS:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(CONFIGS)}")
    return name
