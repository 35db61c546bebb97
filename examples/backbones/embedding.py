"""From a trunk's feature map to a face embedding: pool, linear projection, BatchNorm.

The neck follows the "BN-after-FC" embedding of face-recognition models (the ArcFace
paper's option E without the spatial flatten): global average pooling keeps it
independent of the input resolution, and the final BatchNorm1d centres the embedding,
which both the plain softmax head and the cosine (normalised) margin heads benefit from.
"""

from __future__ import annotations

import torch
from torch import nn


class EmbeddingNeck(nn.Module):
    """Global average pool, optional dropout, linear ``in_channels -> embedding_dim``, BatchNorm1d.

    Shape:
        ``[B, in_channels, H, W] -> [B, embedding_dim]``
    """

    def __init__(self, in_channels: int, embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim!r}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_channels, embedding_dim, bias=False)
        self.norm = nn.BatchNorm1d(embedding_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(features).flatten(1)
        return self.norm(self.linear(self.dropout(pooled)))


class EmbeddingNet(nn.Module):
    """A trunk (any module with ``out_channels`` returning a map) followed by an :class:`EmbeddingNeck`.

    Shape:
        ``[B, 3, H, W] -> [B, embedding_dim]``
    """

    def __init__(self, trunk: nn.Module, embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.trunk = trunk
        self.neck = EmbeddingNeck(int(trunk.out_channels), embedding_dim, dropout)
        self.embedding_dim = embedding_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.trunk(images))
