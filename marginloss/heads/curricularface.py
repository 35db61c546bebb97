r"""CurricularFace: ArcFace target, hard negatives re-weighted by an EMA of the target cosine."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from marginloss import _validation as V
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
from marginloss.heads.arcface import arcface_target
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "CurricularFace",
    "curricularface",
    "curricularface_logits",
    "curricularface_non_target",
]

Modulation = Union[float, Tensor]


def _check_t(t: Modulation) -> None:
    if isinstance(t, Tensor):
        if t.numel() != 1:
            raise ValueError(f"t must be a scalar, got a tensor of shape {tuple(t.shape)}")
        return
    V.check_float("t", t)


def _hard_threshold(cos_target: Tensor, margin: float) -> Tensor:
    # cos(θ_y + m) itself (no fallback): the release compares the non-target cosines with
    # its cos_theta_m, computed before ArcFace's fallback branch is applied.  A constant:
    # the comparison carries no gradient.
    with torch.no_grad():
        return cos_target * math.cos(margin) - safe_sin(cos_target) * math.sin(margin)


def curricularface_non_target(cos: Tensor, cos_target: Tensor, margin: float = 0.5, t: Modulation = 0.0) -> Tensor:
    r"""CurricularFace's modulation of non-target cosines.

    .. math::
        g(\cos\theta_j) = \begin{cases}
            \cos\theta_j\,(t + \cos\theta_j) & \cos\theta_j > \cos(\theta_y + m) \\
            \cos\theta_j & \text{otherwise}
        \end{cases}

    ``cos`` is ``[B, n]`` (or ``[B]``) non-target cosines, ``cos_target`` ``[B]`` the rows'
    target cosines (the threshold :math:`\cos(\theta_y + m)` carries no gradient), ``t`` the
    curriculum parameter.

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([[0.9, 0.1]])
    >>> curricularface_non_target(cos, torch.tensor([0.8]), 0.5, t=0.5)  # 0.9 > cos(acos 0.8 + 0.5)
    tensor([[1.2600, 0.1000]])
    """
    threshold = _hard_threshold(cos_target, margin).to(cos.dtype)
    if cos.dim() == threshold.dim() + 1:
        threshold = threshold[:, None]
    t_value = t.to(cos.dtype) if isinstance(t, Tensor) else t
    if torch.is_grad_enabled() and cos.requires_grad:
        return torch.where(cos > threshold, cos * (t_value + cos), cos)
    # Outside autograd (the chunked engine's blocks): c + [c > threshold]·c·(c + t - 1), the
    # same values to rounding in four passes, with the mask as 0/1 floats (a boolean select
    # costs several arithmetic passes).
    modulation = torch.add(cos, t_value - 1.0).mul_(cos)
    return torch.addcmul(cos, _hard_mask(cos, threshold), modulation, out=modulation)


def _hard_mask(cos: Tensor, threshold: Tensor) -> Tensor:
    """``[cos > threshold]`` as 0.0/1.0 in the dtype of ``cos`` (a new tensor, no gradient)."""
    return torch.gt(cos, threshold, out=torch.empty_like(cos, memory_format=torch.contiguous_format))


def curricularface_logits(
    cosine: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    t: Modulation = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    r"""CurricularFace logits: :math:`s\,f(\cos\theta_{iy_i})` on the target (ArcFace),
    :math:`s\,g(\cos\theta_{ij})` elsewhere (:func:`~marginloss.functional.curricularface_non_target`), at a given
    ``t``.  Rows whose label is ``ignore_index`` are only scaled.

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([[0.8, 0.1], [0.2, 0.6]])
    >>> curricularface_logits(cos, torch.tensor([0, 1]), scale=1.0, margin=0.0, t=0.0)
    tensor([[0.8000, 0.1000],
            [0.2000, 0.6000]])
    """
    scale, margin = check_scale(scale), check_angular_margin("margin", margin)
    _check_t(t)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    check_cosine_values(cosine)
    cos_target = target_column(cosine, labels)
    rest = curricularface_non_target(cosine, cos_target, margin, t)
    rest = torch.where(valid[:, None], rest, cosine)
    return scale * replace_target(rest, labels, valid, arcface_target(cos_target, margin))


def curricularface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    t: Modulation = 0.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""CurricularFace loss at a fixed curriculum parameter ``t`` (the module keeps ``t`` as an
    EMA); see :class:`marginloss.CurricularFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    >>> curricularface(x, w, torch.randint(0, 100, (8,)), t=0.3).backward()
    """
    scale, margin = check_scale(scale), check_angular_margin("margin", margin)
    _check_t(t)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return arcface_target(cos, margin)

    def non_target(cos: Tensor, context: MarginContext) -> Tensor:
        assert context.cos_target is not None
        return curricularface_non_target(cos, context.cos_target, margin, t)

    def non_target_grad(cos: Tensor, context: MarginContext) -> Tensor:
        assert context.cos_target is not None
        return _non_target_slope(cos, context.cos_target, margin, t)

    return margin_loss(
        embeddings, weight, labels, target, non_target=non_target, non_target_grad=non_target_grad,
        scale=scale, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index,
        chunk_size=chunk_size,
    )


def _non_target_slope(cos: Tensor, cos_target: Tensor, margin: float, t: Modulation) -> Tensor:
    r"""The derivative of :func:`curricularface_non_target` in ``cos``: :math:`t + 2\cos\theta_j`
    on the hard negatives, 1 elsewhere, as ``1 + [c > threshold]·(2c + t - 1)``."""
    threshold = _hard_threshold(cos_target, margin).to(cos.dtype)[:, None]
    t_value = t.to(cos.dtype) if isinstance(t, Tensor) else t
    if isinstance(t_value, Tensor):
        rise = torch.add(t_value - 1.0, cos, alpha=2.0)
    else:
        rise = torch.mul(cos, 2.0).add_(t_value - 1.0)
    one = torch.ones((), dtype=cos.dtype, device=cos.device)
    return torch.addcmul(one, _hard_mask(cos, threshold), rise, out=rise)


@register_head("curricularface")
class CurricularFace(MarginHead):
    r"""CurricularFace: adaptive curriculum learning loss.

    .. math::
        L_i = -\log\frac{e^{s\,f(\cos\theta_{y_i})}}{e^{s\,f(\cos\theta_{y_i})}
              + \sum_{j\ne y_i} e^{s\,g(\cos\theta_j)}},\qquad
        g(\cos\theta_j) = \begin{cases}\cos\theta_j\,(t + \cos\theta_j) & \cos\theta_j > \cos(\theta_{y_i} + m)\\
                          \cos\theta_j & \text{otherwise}\end{cases}

    with :math:`f` ArcFace's margin (:func:`marginloss.functional.arcface_target`) and
    :math:`t \leftarrow \alpha\,\overline{\cos\theta_{y}} + (1-\alpha)\,t`, an exponential
    moving average of the batch-mean target cosine (the buffer ``t``, starting at 0).  Early
    in training :math:`t` is small and hard negatives (those above the target's margin
    cosine) are down-weighted (easy samples first); as :math:`t` grows towards 1 they are
    emphasised.  The loss is computed chunk by chunk like every head (no ``[B, C]`` tensor).

    ``t`` advances once per forward in training mode, before the logits (as in the release,
    whose forward updates ``t`` first and then uses it), over the valid rows of the global
    batch on a class-sharded head; not in eval mode, nor during an activation-checkpointing
    replay.  The hard-negative threshold is :math:`\cos(\theta_y + m)` itself, not the
    fallback value the target takes when :math:`\theta_y + m > \pi` (the release's rule).

    Huang, Wang, Tai, Liu, Shen, Li, Li & Huang, "CurricularFace: Adaptive Curriculum
    Learning Loss for Deep Face Recognition", CVPR 2020.  Defaults from the release
    (``HuangYG123/CurricularFace``, ``head/metrics.py``): :math:`s=64`, :math:`m=0.5`,
    new-batch weight 0.01, :math:`t_0 = 0` (the paper's :math:`s`, :math:`m`, :math:`t_0`).

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    scale : float, default 64.0
        :math:`s` (the paper's and release's value).
    margin : float, default 0.5
        :math:`m` in radians, in ``[0, π)`` (the paper's and release's value).
    momentum : float, default 0.01
        :math:`\alpha` in ``[0, 1]``, the EMA weight of the new batch mean.  The release's
        code updates ``t = 0.01 * mean + 0.99 * t``, which we take; the paper quotes its
        momentum parameter as 0.99.
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
    >>> head = marginloss.CurricularFace(16, 100)
    >>> float(head.t)
    0.0
    >>> head(torch.randn(8, 16), torch.randint(0, 100, (8,))).backward()
    >>> bool(head.t != 0)  # moved towards the batch's mean target cosine
    True
    """

    t: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        momentum: float = 0.01,
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
        momentum = V.check_float("momentum", momentum, low=0.0, high=1.0)
        super().__init__(
            embedding_dim, num_classes, scale=check_scale(scale), reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
            device=device, dtype=dtype,
        )
        self.margin = margin
        self.momentum = momentum
        state_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        self.register_buffer("t", torch.zeros((), dtype=state_dtype, device=self.weight.device))

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale, "margin": self.margin, "momentum": self.momentum}

    def prepare(self, context: MarginContext) -> None:
        if not context.update_state:
            return
        assert context.cos_target is not None
        valid = context.valid.to(context.cos_target.dtype)
        count = valid.sum()
        mean = (context.cos_target * valid).sum() / count.clamp_min(1.0)
        updated = self.momentum * mean + (1.0 - self.momentum) * self.t.to(mean.dtype)
        # An all-ignored batch leaves t as it is.
        self.t.copy_(torch.where(count > 0, updated, self.t.to(mean.dtype)))

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        return arcface_target(cos, self.margin)

    def non_target(self, cos: Tensor, context: MarginContext) -> Tensor:
        assert context.cos_target is not None
        return curricularface_non_target(cos, context.cos_target, self.margin, self.t)

    def non_target_grad(self, cos: Tensor, context: MarginContext) -> Tensor:
        assert context.cos_target is not None
        return _non_target_slope(cos, context.cos_target, self.margin, self.t)
