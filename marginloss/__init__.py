"""marginloss: exact, fused, memory-frugal margin softmax heads and metric-learning losses."""

from __future__ import annotations

from marginloss import distributed, functional, fused, metrics, miners
from marginloss._validation import set_validation, validation, validation_enabled
from marginloss.heads import ArcFace, CombinedMargin, CosFace, LSoftmax, NormFace, SphereFace
from marginloss.losses import CenterLoss, TripletLoss, center_loss, triplet_loss

__version__ = "0.1.0"

__all__ = [
    "ArcFace",
    "CenterLoss",
    "CombinedMargin",
    "CosFace",
    "LSoftmax",
    "NormFace",
    "SphereFace",
    "TripletLoss",
    "__version__",
    "center_loss",
    "distributed",
    "functional",
    "fused",
    "metrics",
    "miners",
    "set_validation",
    "triplet_loss",
    "validation",
    "validation_enabled",
]
