"""marginloss: exact, fused, memory-frugal margin softmax heads and metric-learning losses."""

from __future__ import annotations

from marginloss import functional, fused
from marginloss._validation import set_validation, validation, validation_enabled
from marginloss.heads import ArcFace, CombinedMargin, CosFace, LSoftmax, NormFace, SphereFace

__version__ = "0.1.0"

__all__ = [
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "LSoftmax",
    "NormFace",
    "SphereFace",
    "__version__",
    "functional",
    "fused",
    "set_validation",
    "validation",
    "validation_enabled",
]
