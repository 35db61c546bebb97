"""marginloss: exact, fused, memory-frugal margin softmax heads and metric-learning losses."""

from marginloss import distributed, functional, fused, metrics, miners, sharding
from marginloss._validation import set_validation, validation, validation_enabled
from marginloss.heads import (
    ArcFace,
    CombinedMargin,
    CosFace,
    LSoftmax,
    MarginContext,
    MarginHead,
    NormFace,
    SphereFace,
    create_head,
    list_heads,
    register_head,
)
from marginloss.losses import CenterLoss, TripletLoss, center_loss, triplet_loss

__version__ = "0.2.0.dev0"

__all__ = [
    "ArcFace",
    "CenterLoss",
    "CombinedMargin",
    "CosFace",
    "LSoftmax",
    "MarginContext",
    "MarginHead",
    "NormFace",
    "SphereFace",
    "TripletLoss",
    "__version__",
    "center_loss",
    "create_head",
    "distributed",
    "functional",
    "fused",
    "list_heads",
    "metrics",
    "miners",
    "register_head",
    "set_validation",
    "sharding",
    "triplet_loss",
    "validation",
    "validation_enabled",
]
