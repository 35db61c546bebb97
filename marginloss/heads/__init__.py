"""Margin softmax classification heads: one file per head, all on :class:`marginloss.MarginHead`.

Every head holds ``weight`` ``[num_classes, embedding_dim]`` (the layout of
:class:`torch.nn.Linear`, no bias) and its hyperparameters, and maps
``(embeddings [B, D], labels [B])`` to the loss.  Besides ``forward`` each head offers
``logits(embeddings, labels=None)`` (``[B, C]`` margin logits with labels, margin-free
inference logits without) and ``cosine(embeddings)`` (``[B, C]`` :math:`\\cos\\theta`).
The keyword arguments every head shares are documented on :class:`marginloss.MarginHead`.
"""

from __future__ import annotations

from marginloss.heads.adacos import AdaCos
from marginloss.heads.adaface import AdaFace
from marginloss.heads.arcface import ArcFace
from marginloss.heads.base import MarginContext, MarginHead, create_head, list_heads, register_head
from marginloss.heads.combined_margin import CombinedMargin
from marginloss.heads.cosface import CosFace
from marginloss.heads.curricularface import CurricularFace
from marginloss.heads.elasticface import ElasticFace
from marginloss.heads.lgm import LGM
from marginloss.heads.lsoftmax import LSoftmax
from marginloss.heads.magface import MagFace
from marginloss.heads.normface import NormFace
from marginloss.heads.sphereface import SphereFace
from marginloss.heads.sphereface2 import SphereFace2
from marginloss.heads.subcenter_arcface import SubCenterArcFace
from marginloss.heads.uniface import UniFace
from marginloss.heads.uniformface import UniformFace

__all__ = [
    "LGM",
    "AdaCos",
    "AdaFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticFace",
    "LSoftmax",
    "MagFace",
    "MarginContext",
    "MarginHead",
    "NormFace",
    "SphereFace",
    "SphereFace2",
    "SubCenterArcFace",
    "UniFace",
    "UniformFace",
    "create_head",
    "list_heads",
    "register_head",
]
