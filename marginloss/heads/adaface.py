r"""AdaFace: a margin that adapts to image quality, approximated by the feature norm."""

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
    target_column,
)
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "AdaFace",
    "adaface",
    "adaface_batch_statistics",
    "adaface_logits",
    "adaface_margin_scaler",
    "adaface_target",
]

Stat = Union[float, Tensor]

# The release's clamps: eps of its cosine and angle clamps and of the std, and the range the
# feature norms are clipped to before standardisation.
EPS = 1e-3
NORM_MIN, NORM_MAX = 1e-3, 100.0
# The release's initial EMA statistics (its buffers batch_mean = 20, batch_std = 100).
INITIAL_MEAN, INITIAL_STD = 20.0, 100.0


def _clipped_norms(embedding_norms: Tensor) -> Tensor:
    return embedding_norms.detach().clamp(NORM_MIN, NORM_MAX)


def adaface_batch_statistics(embedding_norms: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Mean and (unbiased, as ``torch.std``) standard deviation of the clipped, detached
    feature norms :math:`\operatorname{clip}(\lVert x_i\rVert, 0.001, 100)` of the valid rows.

    Written with masked sums (no boolean indexing), so no shape depends on the data.  The
    std is ``nan`` with fewer than two valid rows, the mean with none.

    Examples
    --------
    >>> import torch
    >>> mean, std = adaface_batch_statistics(torch.tensor([10.0, 20.0, 300.0]))
    >>> float(mean), float(std)  # 300 is clipped to 100
    (43.33333206176758, 49.32883071899414)
    """
    norms = _clipped_norms(embedding_norms)
    if valid is None:
        valid = torch.ones_like(norms, dtype=torch.bool)
    weight = valid.to(norms.dtype)
    count = weight.sum()
    mean = (norms * weight).sum() / count
    spread = torch.where(valid, norms - mean, torch.zeros_like(norms))
    std = ((spread * spread).sum() / (count - 1)).sqrt()
    return mean, std


def adaface_margin_scaler(
    embedding_norms: Tensor, batch_mean: Stat, batch_std: Stat, h: float = 0.333
) -> Tensor:
    r"""AdaFace's image quality :math:`\widehat{\lVert z_i\rVert}`, the normalised feature norm.

    .. math::
        \widehat{\lVert z_i\rVert} = \operatorname{clip}\Big(h\,
            \frac{\operatorname{clip}(\lVert z_i\rVert, 0.001, 100) - \mu_z}{\sigma_z + \epsilon},
            -1, 1\Big), \qquad \epsilon = 10^{-3},

    the norms detached (no gradient flows through the quality), :math:`\mu_z, \sigma_z`
    the (EMA) batch statistics.

    Examples
    --------
    >>> import torch
    >>> adaface_margin_scaler(torch.tensor([20.0, 120.0, 0.0]), 20.0, 100.0, h=1.0)
    tensor([ 0.0000,  0.8000, -0.2000])
    """
    norms = _clipped_norms(embedding_norms)
    scaled = (norms - batch_mean) / (batch_std + EPS) * h
    return scaled.clamp(-1.0, 1.0)


def adaface_target(cos_target: Tensor, margin_scaler: Tensor, margin: float = 0.4) -> Tensor:
    r"""AdaFace's adaptive margin on target cosines (the paper's g_angle and g_add, the release's clamps).

    .. math::
        f(\cos\theta) = \cos\big(\operatorname{clip}(\theta + g_{angle}, \epsilon, \pi - \epsilon)\big)
            - g_{add},\qquad g_{angle} = -m\,\widehat{\lVert z\rVert},\quad
            g_{add} = m\,\widehat{\lVert z\rVert} + m,

    with :math:`\theta = \arccos\operatorname{clip}(\cos\theta, -1 + \epsilon, 1 - \epsilon)`,
    :math:`\epsilon = 10^{-3}` as in the release.  Low quality (:math:`\widehat{\lVert
    z\rVert} = -1`) gives ArcFace's :math:`\cos(\theta + m)`, average quality (0) CosFace's
    :math:`\cos\theta - m`, high quality (1) :math:`\cos(\theta - m) - 2m`.  Gradients are
    those of the clipped formula (zero where a clip is active).

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    >>> adaface_target(cos, torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), 0.4)
    tensor([-0.0022,  0.1000,  0.1233], dtype=torch.float64)
    """
    cos = cos_target.clamp(-1.0 + EPS, 1.0 - EPS)
    scaler = margin_scaler.to(cos.dtype)
    theta = torch.acos(cos)
    theta_m = (theta - margin * scaler).clamp(EPS, math.pi - EPS)
    return torch.cos(theta_m) - (margin * scaler + margin)


def _check(margin: float, h: float) -> tuple[float, float]:
    return check_angular_margin("margin", margin), V.check_float("h", h, low=0.0, low_open=True)


def _statistics(
    context_norms: Tensor, valid: Tensor, batch_mean: Stat | None, batch_std: Stat | None
) -> tuple[Stat, Stat]:
    mean, std = adaface_batch_statistics(context_norms, valid)
    # Fewer than two rows have no std: fall back to the release's initial statistics.
    enough = valid.sum() >= 2
    mean = torch.where(enough, mean, torch.full_like(mean, INITIAL_MEAN))
    std = torch.where(enough, std, torch.full_like(std, INITIAL_STD))
    return (mean if batch_mean is None else batch_mean), (std if batch_std is None else batch_std)


def adaface_logits(
    cosine: Tensor,
    labels: Tensor,
    embedding_norms: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.4,
    h: float = 0.333,
    batch_mean: Stat | None = None,
    batch_std: Stat | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""AdaFace logits :math:`s\,f(\cos\theta_{iy_i})` on the target, :math:`s\cos\theta_{ij}`
    elsewhere; ``embedding_norms`` ``[B]`` are the feature norms :math:`\lVert z_i\rVert`.

    ``batch_mean``/``batch_std`` default to this batch's statistics
    (:func:`adaface_batch_statistics` of the non-ignored rows; the release's initial 20 and
    100 when fewer than two rows count).

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([[0.5, 0.2]])
    >>> adaface_logits(cos, torch.tensor([0]), torch.tensor([20.0]), scale=1.0, batch_mean=20.0, batch_std=100.0)
    tensor([[0.1000, 0.2000]])
    """
    scale = check_scale(scale)
    margin, h = _check(margin, h)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    if embedding_norms.shape != (cosine.shape[0],):
        raise ValueError(f"embedding_norms must have shape [{cosine.shape[0]}], got {tuple(embedding_norms.shape)}")
    check_cosine_values(cosine)
    mean, std = _statistics(embedding_norms, valid, batch_mean, batch_std)
    scaler = adaface_margin_scaler(embedding_norms, mean, std, h)
    target = adaface_target(target_column(cosine, labels), scaler, margin)
    return scale * replace_target(cosine, labels, valid, target)


def adaface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.4,
    h: float = 0.333,
    batch_mean: Stat | None = None,
    batch_std: Stat | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""AdaFace loss from embeddings ``[B, D]`` (not normalised: their norms are the quality)
    and class weights ``[C, D]``; see :class:`marginloss.AdaFace`.

    The functional form holds no state: in place of the head's ``t_alpha`` it takes the
    statistics, ``batch_mean`` and ``batch_std`` (default: this batch's own, as the head with
    ``t_alpha=1``, or the release's initial 20 and 100 when fewer than two rows count); pass
    the head's buffers to reproduce one of its steps.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    >>> adaface(x, w, torch.randint(0, 100, (8,))).backward()
    """
    scale = check_scale(scale)
    margin, h = _check(margin, h)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        mean, std = _statistics(context.embedding_norms, context.valid, batch_mean, batch_std)
        return adaface_target(cos, adaface_margin_scaler(context.embedding_norms, mean, std, h), margin)

    return margin_loss(
        embeddings, weight, labels, target, scale=scale, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("adaface")
class AdaFace(MarginHead):
    r"""AdaFace: quality-adaptive margin, the feature norm as the image quality.

    .. math::
        L_i = -\log\frac{e^{s\,f_i(\cos\theta_{y_i})}}{e^{s\,f_i(\cos\theta_{y_i})}
              + \sum_{j\ne y_i} e^{s\cos\theta_j}},\qquad
        f_i(\cos\theta) = \cos\big(\operatorname{clip}(\theta - m\hat z_i, \epsilon, \pi-\epsilon)\big)
              - (m\hat z_i + m),

    .. math::
        \hat z_i = \operatorname{clip}\Big(h\,\frac{\operatorname{clip}(\lVert x_i\rVert, 0.001, 100)
              - \mu}{\sigma + \epsilon}, -1, 1\Big),\qquad
        \mu \leftarrow \alpha\,\bar\mu_{batch} + (1-\alpha)\,\mu,\quad
        \sigma \leftarrow \alpha\,\bar\sigma_{batch} + (1-\alpha)\,\sigma,

    :math:`\theta = \arccos\operatorname{clip}(\cos\theta, -1+\epsilon, 1-\epsilon)`,
    :math:`\epsilon = 10^{-3}`, :math:`\alpha` = ``t_alpha``.  The norm
    :math:`\lVert x_i\rVert` of the embedding passed in (before normalisation) is the image
    quality; it is detached, so no gradient flows through the margin into the norm.  A
    low-quality sample (:math:`\hat z = -1`) gets ArcFace's angular margin
    :math:`\cos(\theta + m)`, which de-emphasises hard examples, an average one (0)
    CosFace's :math:`\cos\theta - m`, a high-quality one (1) :math:`\cos(\theta - m) - 2m`,
    which emphasises them.

    Kim, Jain & Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022.
    Defaults and clamps are the official release's (``mk-minchul/AdaFace``, ``head.py`` and
    its training scripts): ``m=0.4, h=0.333, s=64, t_alpha=0.01``, initial statistics
    :math:`\mu = 20, \sigma = 100`.

    The statistics are the buffers ``batch_mean`` and ``batch_std`` (in the ``state_dict``).
    In training mode every forward first moves them towards the mean and unbiased std of
    this batch's clipped norms (non-ignored rows only; a batch with fewer than two such
    rows leaves them as they are) and then uses them, as the release does; eval mode and
    activation-checkpointing replays use them without updating.  On a class-sharded head the
    statistics are those of the global batch (every rank holds the same buffers), where the
    release, under data parallelism, uses each GPU's own batch.

    Where this differs from the release: the release clamps *every* cosine of the ``[B, C]``
    matrix into :math:`[-1+\epsilon, 1-\epsilon]`; here only the target cosine is clamped
    (a non-target cosine within :math:`10^{-3}` of :math:`\pm1` keeps its value and its
    gradient), so the non-target classes stay on the engine's fast path.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    scale : float, default 64.0
        :math:`s` (the release's ``s``).
    margin : float, default 0.4
        :math:`m` in radians, in ``[0, π)`` (the release's training scripts; the paper's
        ablation also picks 0.4).
    h : float, default 0.333
        :math:`h > 0`, how far the standardised norm spreads the margin (0.333 puts 68% of
        the samples within :math:`\hat z \in [-1/3, 1/3]`; the release's scripts).
    t_alpha : float, default 0.01
        :math:`\alpha \in (0, 1]`, the EMA momentum of the statistics (the release's
        training default; its class default is 1, the batch's own statistics).
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
        - embeddings: ``[B, embedding_dim]`` (unnormalised: the norm is the quality), labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.AdaFace(16, 100)
    >>> embeddings = (30 * torch.nn.functional.normalize(torch.randn(8, 16))).requires_grad_()
    >>> head(embeddings, torch.randint(0, 100, (8,))).backward()
    >>> round(float(head.batch_mean), 4), round(float(head.batch_std), 4)  # EMA of norms 30, std 0
    (20.1, 99.0)
    """

    batch_mean: Tensor
    batch_std: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
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
        margin, h = _check(margin, h)
        t_alpha = V.check_float("t_alpha", t_alpha, low=0.0, high=1.0, low_open=True)
        super().__init__(
            embedding_dim, num_classes, scale=check_scale(scale), reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
            device=device, dtype=dtype,
        )
        self.margin, self.h, self.t_alpha = margin, h, t_alpha
        state = torch.promote_types(self.weight.dtype, torch.float32)
        where = self.weight.device
        self.register_buffer("batch_mean", torch.full((), INITIAL_MEAN, dtype=state, device=where))
        self.register_buffer("batch_std", torch.full((), INITIAL_STD, dtype=state, device=where))

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale, "margin": self.margin, "h": self.h, "t_alpha": self.t_alpha}

    def margin_scaler(self, embeddings: Tensor) -> Tensor:
        r"""``[B]`` :math:`\hat z_i` of these embeddings at the current statistics (no update)."""
        V.check_embeddings(embeddings, self.embedding_dim)
        norms = torch.linalg.vector_norm(embeddings, dim=1, dtype=torch.float64)
        return adaface_margin_scaler(norms, self.batch_mean, self.batch_std, self.h)

    def _update_statistics(self, context: MarginContext) -> None:
        # The engine sets context.embedding_norms after prepare runs, so the statistics are
        # advanced here, at the start of target (once per forward, when update_state).
        with torch.no_grad():
            mean, std = adaface_batch_statistics(context.embedding_norms, context.valid)
            enough = context.valid.sum() >= 2
            alpha = self.t_alpha
            new_mean = alpha * mean.to(self.batch_mean.dtype) + (1.0 - alpha) * self.batch_mean
            new_std = alpha * std.to(self.batch_std.dtype) + (1.0 - alpha) * self.batch_std
            self.batch_mean.copy_(torch.where(enough, new_mean, self.batch_mean))
            self.batch_std.copy_(torch.where(enough, new_std, self.batch_std))

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        if context.update_state:
            self._update_statistics(context)
        scaler = adaface_margin_scaler(context.embedding_norms, self.batch_mean, self.batch_std, self.h)
        return adaface_target(cos, scaler, self.margin)
