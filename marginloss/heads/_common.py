"""Checks and small tensor helpers the head files share (not public API)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginloss import _validation as V

# How far a "cosine" may stray past ±1 by rounding before *_logits call it an error.
COSINE_TOLERANCE = 1e-3


def safe_sin(cos: Tensor) -> Tensor:
    # sin θ = sqrt(1 - cos²θ), kept >= machine epsilon so d/dcos stays finite at θ = 0 and
    # π; the value moves by at most eps·sin(m), below the rounding of cos θ itself.
    return (1.0 - cos * cos).clamp_min(torch.finfo(cos.dtype).eps ** 2).sqrt()


def check_scale(scale: float) -> float:
    return V.check_float("scale", scale, low=0.0, low_open=True)


def check_angular_margin(name: str, margin: float) -> float:
    return V.check_float(name, margin, low=0.0, high=math.pi, high_open=True)


def check_cosine_margin(name: str, margin: float) -> float:
    return V.check_float(name, margin, low=0.0, high=2.0, high_open=True)


def check_logit_inputs(cosine: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Labels made safe to index with (ignored rows -> 0) and the valid-row mask.

    ``cosine`` must be a floating ``[B, C]`` matrix; its values are checked by
    :func:`check_cosine_values`.
    """
    if not isinstance(cosine, Tensor) or cosine.dim() != 2 or not cosine.is_floating_point():
        got = f"shape {tuple(cosine.shape)}, dtype {cosine.dtype}" if isinstance(cosine, Tensor) else type(cosine).__name__
        raise ValueError(f"cosine must be a floating [batch, num_classes] tensor, got {got}")
    labels = V.check_labels(labels, cosine.shape[0], cosine.shape[1], ignore_index)
    valid = labels != ignore_index
    return torch.where(valid, labels, torch.zeros_like(labels)), valid


def check_cosine_values(cosine: Tensor) -> None:
    """Raise when ``cosine`` holds values beyond ±1 by more than rounding (logits passed by
    mistake), under the validation switch; run after the shape checks."""
    if V.values_checked(cosine) and cosine.numel() > 0:
        largest = float(cosine.detach().abs().max())
        if not largest <= 1.0 + COSINE_TOLERANCE:
            raise ValueError(
                f"cosine must hold cosines in [-1, 1], got values up to {largest:g} in magnitude "
                f"(logits instead of cosines? divide by the scale, or use head.cosine)"
            )


def target_column(cosine: Tensor, labels: Tensor) -> Tensor:
    """Each row's target cosine, clamped into [-1, 1]."""
    return cosine.gather(1, labels[:, None]).squeeze(1).clamp(-1.0, 1.0)


def replace_target(matrix: Tensor, labels: Tensor, valid: Tensor, target: Tensor) -> Tensor:
    """``matrix`` with each valid row's target column replaced (a new tensor)."""
    current = matrix.gather(1, labels[:, None]).squeeze(1)
    value = torch.where(valid, target.to(matrix.dtype), current)
    return matrix.scatter(1, labels[:, None], value[:, None])
