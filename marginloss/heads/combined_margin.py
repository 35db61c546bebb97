r"""The combined margin of InsightFace: :math:`f(\cos\theta) = \cos(m_1\theta + m_2) - m_3`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from marginloss import _validation as V
from marginloss.fused import ChunkSize, MarginContext, margin_loss
from marginloss.heads._common import (
    check_angular_margin,
    check_cosine_margin,
    check_cosine_values,
    check_logit_inputs,
    check_scale,
    replace_target,
    safe_sin,
    target_column,
)
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["CombinedMargin", "combined_margin", "combined_margin_logits", "combined_margin_target"]


def _check_margins(m1: float, m2: float, m3: float) -> tuple[float, float, float]:
    return (
        V.check_float("m1", m1, low=0.0, low_open=True),
        check_angular_margin("m2", m2),
        check_cosine_margin("m3", m3),
    )


def combined_margin_target(
    cos_target: Tensor, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0
) -> Tensor:
    r"""InsightFace's combined margin: :math:`f(\cos\theta) = \cos(m_1\theta + m_2) - m_3`.

    ``(m1, m2, m3) = (1, 0.5, 0)`` is ArcFace without its fallback, ``(1, 0, 0.35)`` is
    CosFace, an integer ``m1`` is SphereFace's angle multiplier without its :math:`\psi`
    extension.  The formula is used as is: it is not monotonic once
    :math:`m_1\theta + m_2 > \pi`.  :math:`\theta` is computed from the clamped cosine as
    ``atan2(sin θ, cos θ)`` so the gradient stays finite at :math:`\theta \in \{0, \pi\}`.

    Examples
    --------
    >>> import math, torch
    >>> combined_margin_target(torch.tensor([0.0]), 1.0, 0.5, 0.2)  # cos(π/2 + .5) - .2
    tensor([-0.6794])
    """
    theta = torch.atan2(safe_sin(cos_target), cos_target)
    return torch.cos(m1 * theta + m2) - m3


def combined_margin_logits(
    cosine: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    r"""Combined-margin logits :math:`s(\cos(m_1\theta_{iy_i} + m_2) - m_3)` on the target.

    Examples
    --------
    >>> import torch
    >>> combined_margin_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), scale=1.0, m3=0.5)
    tensor([[0.5000, 0.0000]])
    """
    scale = check_scale(scale)
    m1, m2, m3 = _check_margins(m1, m2, m3)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    check_cosine_values(cosine)
    target = combined_margin_target(target_column(cosine, labels), m1, m2, m3)
    return scale * replace_target(cosine, labels, valid, target)


def combined_margin(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""Combined-margin loss; see :class:`marginloss.CombinedMargin`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16), torch.randn(100, 16)
    >>> combined_margin(x, w, torch.randint(0, 100, (8,)), m1=1.0, m2=0.3, m3=0.2).shape
    torch.Size([])
    """
    scale = check_scale(scale)
    m1, m2, m3 = _check_margins(m1, m2, m3)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return combined_margin_target(cos, m1, m2, m3)

    return margin_loss(
        embeddings, weight, labels, target, scale=scale, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("combined_margin")
class CombinedMargin(MarginHead):
    r"""Combined margin softmax of InsightFace: multiplicative, additive angular and additive
    cosine margins at once.

    .. math::
        L_i = -\log\frac{e^{s(\cos(m_1\theta_{y_i} + m_2) - m_3)}}{e^{s(\cos(m_1\theta_{y_i} + m_2) - m_3)}
              + \sum_{j\ne y_i} e^{s\cos\theta_j}}

    ``m1`` is SphereFace's multiplicative angular margin, ``m2`` ArcFace's additive angular
    margin and ``m3`` CosFace's additive cosine margin (Deng et al., CVPR 2019, Sec. 2.2).
    The formula is used as is, without ArcFace's fallback.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    scale : float, default 64.0
        :math:`s`.
    m1 : float, default 1.0
        Multiplicative angular margin, > 0.
    m2 : float, default 0.0
        Additive angular margin in radians, in ``[0, π)``.
    m3 : float, default 0.0
        Additive cosine margin, in ``[0, 2)``.  The defaults are the identity (NormFace);
        InsightFace's combined setting is ``(1.0, 0.3, 0.2)``.
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :class:`torch.nn.CrossEntropyLoss`; ``"mean"`` averages over the rows whose label is
        not ``ignore_index`` (an all-ignored batch gives 0).
    label_smoothing : float, default 0.0
        As in :class:`torch.nn.CrossEntropyLoss`, in ``[0, 1]``.
    ignore_index : int, default -100
        Rows with this label contribute nothing (PyTorch's convention).
    chunk_size : int, "auto" or None, default "auto"
        Classes per chunk of the engine; ``"auto"`` picks plain autograd for small problems and the
        chunked engine otherwise, ``None`` is plain autograd (see :mod:`marginloss.fused`).
    process_group : ProcessGroup, optional
        Shard the classes over this group (see :mod:`marginloss.distributed`).
    sample_rate : float, default 1.0
        PartialFC: the fraction of each shard's classes kept per training step, in ``(0, 1]``.
    sample_seed : int, default 0
        Seeds the PartialFC draw together with the rank and the step.
    device : torch.device or str, optional
        Where the weight is created.
    dtype : torch.dtype, optional
        The weight's dtype (float32 by default).

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.CombinedMargin(16, 100, m1=1.0, m2=0.3, m3=0.2)
    >>> head(torch.randn(8, 16), torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        chunk_size: ChunkSize = "auto",
        process_group: ProcessGroup | None = None,
        sample_rate: float = 1.0,
        sample_seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        m1, m2, m3 = _check_margins(m1, m2, m3)
        super().__init__(
            embedding_dim, num_classes, scale=check_scale(scale), reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
            device=device, dtype=dtype,
        )
        self.m1, self.m2, self.m3 = m1, m2, m3

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale, "m1": self.m1, "m2": self.m2, "m3": self.m3}

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        return combined_margin_target(cos, self.m1, self.m2, self.m3)
