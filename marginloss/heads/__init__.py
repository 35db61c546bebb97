"""Margin softmax classification heads: one file per head, all on :class:`MarginHead`.

Every head holds ``weight`` ``[num_classes, embedding_dim]`` (the layout of
:class:`torch.nn.Linear`, no bias) and its hyperparameters, and maps
``(embeddings [B, D], labels [B])`` to the loss.  Besides ``forward`` each head offers
``logits(embeddings, labels=None)`` (``[B, C]`` margin logits with labels, margin-free
inference logits without) and ``cosine(embeddings)`` (``[B, C]`` :math:`\\cos\\theta`).
The keyword arguments every head shares are documented on :class:`MarginHead`.
"""

from __future__ import annotations

from marginloss.heads.arcface import ArcFace
from marginloss.heads.base import MarginContext, MarginHead, create_head, list_heads, register_head
from marginloss.heads.combined_margin import CombinedMargin
from marginloss.heads.cosface import CosFace
from marginloss.heads.lsoftmax import LSoftmax
from marginloss.heads.normface import NormFace
from marginloss.heads.sphereface import SphereFace
from marginloss.heads.sphereface2 import SphereFace2
from marginloss.heads.uniface import UniFace

__all__ = [
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "LSoftmax",
    "MarginContext",
    "MarginHead",
    "NormFace",
    "SphereFace",
    "SphereFace2",
    "UniFace",
    "create_head",
    "list_heads",
    "register_head",
]
