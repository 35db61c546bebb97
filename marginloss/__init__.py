"""marginloss: exact, fused, memory-frugal margin softmax heads and metric-learning losses."""

from __future__ import annotations

from marginloss import distributed, functional, fused, metrics, miners
from marginloss._validation import set_validation, validation, validation_enabled
from marginloss.heads import ArcFace, CombinedMargin, CosFace, LSoftmax, NormFace, SphereFace
from marginloss.losses import (
    CenterLoss,
    ContrastiveLoss,
    LiftedStructureLoss,
    MarginalLoss,
    MultiSimilarityLoss,
    NPairLoss,
    QuadrupletLoss,
    RangeLoss,
    SoftTripleLoss,
    TripletLoss,
    center_loss,
    contrastive_loss,
    lifted_structure_loss,
    marginal_loss,
    multi_similarity_loss,
    npair_loss,
    quadruplet_loss,
    range_loss,
    soft_triple_loss,
    triplet_loss,
)

__version__ = "0.1.0"

__all__ = [
    "ArcFace",
    "CenterLoss",
    "CombinedMargin",
    "ContrastiveLoss",
    "CosFace",
    "LSoftmax",
    "LiftedStructureLoss",
    "MarginalLoss",
    "MultiSimilarityLoss",
    "NPairLoss",
    "NormFace",
    "QuadrupletLoss",
    "RangeLoss",
    "SoftTripleLoss",
    "SphereFace",
    "TripletLoss",
    "__version__",
    "center_loss",
    "contrastive_loss",
    "distributed",
    "functional",
    "fused",
    "lifted_structure_loss",
    "marginal_loss",
    "metrics",
    "miners",
    "multi_similarity_loss",
    "npair_loss",
    "quadruplet_loss",
    "range_loss",
    "set_validation",
    "soft_triple_loss",
    "triplet_loss",
    "validation",
    "validation_enabled",
]
