r"""ArcFace: additive angular margin, :math:`f(\cos\theta) = \cos(\theta + m)`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from marginloss.fused import ChunkSize, MarginContext, margin_loss
from marginloss.heads._common import (
    check_angular_margin,
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

__all__ = ["ArcFace", "arcface", "arcface_logits", "arcface_target"]


def arcface_target(
    cos_target: Tensor,
    margin: float = 0.5,
    *,
    easy_margin: bool = False,
    straight_through: bool = False,
) -> Tensor:
    r"""ArcFace's additive angular margin on target cosines.

    .. math::
        f(\cos\theta) = \begin{cases}
            \cos(\theta + m) & \theta + m \le \pi \\
            \cos\theta - m \sin m & \theta + m > \pi
        \end{cases}

    computed as :math:`\cos\theta\cos m - \sin\theta\sin m` (no ``acos``).  The second branch
    is the monotonic fallback of the ArcFace paper's release (Deng et al., CVPR 2019), which
    keeps the target logit decreasing in :math:`\theta` over :math:`[0, \pi]`.  With
    ``easy_margin`` the margin is applied only where :math:`\cos\theta > 0` and
    :math:`\cos\theta` is kept elsewhere.

    Parameters
    ----------
    cos_target : Tensor
        Any shape, values in ``[-1, 1]``.
    margin : float, default 0.5
        :math:`m` in radians, in ``[0, π)``; 0.5 is the paper's choice.
    easy_margin : bool, default False
        Apply the margin only where :math:`\cos\theta > 0`.
    straight_through : bool, default False
        Forward value as above, but the gradient with respect to :math:`\cos\theta` is 1
        (as InsightFace's in-place ``arccos``/``cos`` implementation effectively does)
        instead of the exact :math:`\sin(\theta+m)/\sin\theta`.

    Examples
    --------
    >>> import math, torch
    >>> cos = torch.tensor([1.0, 0.0, -1.0])
    >>> arcface_target(cos, 0.5)  # cos(0.5), cos(π/2 + 0.5), fallback -1 - 0.5 sin 0.5
    tensor([ 0.8776, -0.4794, -1.2397])
    """
    sin = safe_sin(cos_target)
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    shifted = cos_target * cos_m - sin * sin_m
    if easy_margin:
        out = torch.where(cos_target > 0, shifted, cos_target)
    else:
        # θ + m > π  <=>  cos θ < cos(π - m)
        out = torch.where(cos_target > math.cos(math.pi - margin), shifted, cos_target - margin * sin_m)
    if straight_through:
        out = cos_target + (out - cos_target).detach()
    return out


def arcface_logits(
    cosine: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    easy_margin: bool = False,
    straight_through: bool = False,
    ignore_index: int = -100,
) -> Tensor:
    r"""ArcFace logits :math:`s\,f(\cos\theta_{iy_i})` on the target, :math:`s\cos\theta_{ij}` elsewhere.

    ``cosine`` is a ``[B, C]`` matrix of cosines you computed (values beyond ±1 by more than
    rounding raise); rows whose label is ``ignore_index`` are only scaled.  Returns a new
    tensor (the input is not modified).

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([[0.8, 0.1], [0.2, 0.6]])
    >>> arcface_logits(cos, torch.tensor([0, 1]), scale=1.0, margin=0.0)
    tensor([[0.8000, 0.1000],
            [0.2000, 0.6000]])
    """
    scale, margin = check_scale(scale), check_angular_margin("margin", margin)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    check_cosine_values(cosine)
    target = arcface_target(
        target_column(cosine, labels), margin, easy_margin=easy_margin, straight_through=straight_through
    )
    return scale * replace_target(cosine, labels, valid, target)


def arcface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    easy_margin: bool = False,
    straight_through: bool = False,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""ArcFace loss from embeddings ``[B, D]`` and class weights ``[C, D]``; see :class:`marginloss.ArcFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    >>> arcface(x, w, torch.randint(0, 100, (8,))).backward()
    """
    scale, margin = check_scale(scale), check_angular_margin("margin", margin)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return arcface_target(cos, margin, easy_margin=easy_margin, straight_through=straight_through)

    return margin_loss(
        embeddings, weight, labels, target, scale=scale, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("arcface")
class ArcFace(MarginHead):
    r"""ArcFace: additive angular margin softmax.

    .. math::
        L_i = -\log\frac{e^{s\,f(\cos\theta_{y_i})}}{e^{s\,f(\cos\theta_{y_i})}
              + \sum_{j\ne y_i} e^{s\cos\theta_j}},\qquad
        f(\cos\theta) = \begin{cases}\cos(\theta+m) & \theta+m\le\pi\\
                        \cos\theta - m\sin m & \text{otherwise}\end{cases}

    with :math:`\cos\theta_j = \hat x^\top \hat w_j` (both L2-normalised).  The fallback branch
    is the one of the paper's release, which keeps the target logit monotonic; see
    :func:`marginloss.functional.arcface_target`.

    Deng, Guo, Xue & Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR 2019.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    scale : float, default 64.0
        :math:`s`, the paper's value for face recognition (for a few classes a smaller
        scale learns faster; see the quickstart).
    margin : float, default 0.5
        :math:`m` in radians, in ``[0, π)``; 0.5 as in the paper.
    easy_margin : bool, default False
        Apply the margin only where :math:`\cos\theta_{y} > 0` (keeping :math:`\cos\theta`
        elsewhere) instead of using the fallback.
    straight_through : bool, default False
        Use gradient 1 for :math:`f` with respect to :math:`\cos\theta` (the effective gradient
        of InsightFace's ``arcface_torch`` implementation) instead of the exact
        :math:`\sin(\theta+m)/\sin\theta`.
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
    >>> head = marginloss.ArcFace(16, 100)
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> loss = head(embeddings, torch.randint(0, 100, (8,)))
    >>> loss.backward()
    >>> head.logits(embeddings).shape  # inference logits s·cos θ
    torch.Size([8, 100])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
        straight_through: bool = False,
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
        margin = check_angular_margin("margin", margin)
        super().__init__(
            embedding_dim, num_classes, scale=check_scale(scale), reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
            device=device, dtype=dtype,
        )
        self.margin = margin
        self.easy_margin = bool(easy_margin)
        self.straight_through = bool(straight_through)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "margin": self.margin,
            "easy_margin": self.easy_margin,
            "straight_through": self.straight_through,
        }

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        return arcface_target(cos, self.margin, easy_margin=self.easy_margin, straight_through=self.straight_through)
