"""Backbones for the face examples, written from the papers: ResNet (+SE), ConvNeXt, MobileNetV2.

Import it with the ``examples/`` directory on ``sys.path`` (the face scripts do this when
run as files): ``from backbones import build``.
"""

from __future__ import annotations

from .convnext import ConvNeXt, ConvNeXtBlock, DropPath, LayerNorm2d
from .embedding import EmbeddingNeck, EmbeddingNet
from .factory import CONFIGS, PARAMETER_LIMIT, available, build, count_parameters, describe
from .mobilenetv2 import InvertedResidual, MobileNetV2
from .resnet import BasicBlock, Bottleneck, ResNet
from .se import SqueezeExcitation

__all__ = [
    "CONFIGS",
    "PARAMETER_LIMIT",
    "BasicBlock",
    "Bottleneck",
    "ConvNeXt",
    "ConvNeXtBlock",
    "DropPath",
    "EmbeddingNeck",
    "EmbeddingNet",
    "InvertedResidual",
    "LayerNorm2d",
    "MobileNetV2",
    "ResNet",
    "SqueezeExcitation",
    "available",
    "build",
    "count_parameters",
    "describe",
]
