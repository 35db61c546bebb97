r"""MagFace: a magnitude-aware angular margin and a magnitude regulariser; the feature
magnitude becomes a quality score."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from marginloss import _validation as V
from marginloss.fused import ChunkSize, MarginContext, margin_loss, softmax_row_loss
from marginloss.heads._common import (
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

__all__ = [
    "MagFace",
    "magface",
    "magface_logits",
    "magface_margin",
    "magface_regularizer",
    "magface_target",
]


def _check(l_a: float, u_a: float, l_m: float, u_m: float) -> tuple[float, float, float, float]:
    l_a = V.check_float("l_a", l_a, low=0.0, low_open=True)
    u_a = V.check_float("u_a", u_a, low=0.0, low_open=True)
    if not u_a > l_a:
        raise ValueError(f"u_a must be > l_a = {l_a!r}, got {u_a!r}")
    l_m = V.check_float("l_m", l_m, low=0.0, high=math.pi, high_open=True)
    u_m = V.check_float("u_m", u_m, low=0.0, high=math.pi, high_open=True)
    if not u_m >= l_m:
        raise ValueError(f"u_m must be >= l_m = {l_m!r}, got {u_m!r}")
    return l_a, u_a, l_m, u_m


def _check_lambda_g(lambda_g: float) -> float:
    return V.check_float("lambda_g", lambda_g, low=0.0)


def magface_margin(
    magnitude: Tensor, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8
) -> Tensor:
    r"""MagFace's margin :math:`m(a)`, linear in the magnitude clamped to :math:`[l_a, u_a]`.

    .. math::
        m(a) = \frac{u_m - l_m}{u_a - l_a}\,\big(\operatorname{clamp}(a, l_a, u_a) - l_a\big) + l_m

    Differentiable in :math:`a` inside :math:`[l_a, u_a]` (zero gradient outside, as the
    release's clamp).

    Examples
    --------
    >>> import torch
    >>> magface_margin(torch.tensor([5.0, 10.0, 60.0, 110.0, 200.0]))
    tensor([0.4500, 0.4500, 0.6250, 0.8000, 0.8000])
    """
    a = magnitude.clamp(l_a, u_a)
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_regularizer(magnitude: Tensor, l_a: float = 10.0, u_a: float = 110.0) -> Tensor:
    r"""MagFace's magnitude regulariser :math:`g(a) = 1/a + a/u_a^2` at
    :math:`a = \operatorname{clamp}(\lVert x\rVert, l_a, u_a)`, elementwise.

    Convex, decreasing on :math:`[l_a, u_a]` (its minimum is at :math:`u_a`): it rewards
    large magnitudes, which the margin penalises for hard samples.

    Examples
    --------
    >>> import torch
    >>> magface_regularizer(torch.tensor([10.0, 110.0]), 10.0, 110.0)
    tensor([0.1008, 0.0182])
    """
    a = magnitude.clamp(l_a, u_a)
    return 1.0 / a + a / (u_a * u_a)


def magface_target(cos_target: Tensor, margin: Tensor, *, easy_margin: bool = True) -> Tensor:
    r"""ArcFace's margin with a per-row margin :math:`m_i` (MagFace's :math:`m(a_i)`).

    .. math::
        f(\cos\theta) = \begin{cases}
            \cos(\theta + m) & \cos\theta > 0 \text{ (easy margin)},\ \text{or } \theta + m \le \pi\\
            \cos\theta & \text{otherwise, easy margin (the release's default)} \\
            \cos\theta - m \sin m & \text{otherwise, without easy margin}
        \end{cases}

    computed as :math:`\cos\theta\cos m - \sin\theta\sin m`; the gradient flows into both
    :math:`\cos\theta` and :math:`m`.

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([1.0, 0.0, -0.5])
    >>> magface_target(cos, torch.tensor([0.5, 0.5, 0.5]))  # easy margin keeps cos <= 0
    tensor([ 0.8776,  0.0000, -0.5000])
    """
    m = margin.to(cos_target.dtype)
    sin = safe_sin(cos_target)
    shifted = cos_target * torch.cos(m) - sin * torch.sin(m)
    if easy_margin:
        return torch.where(cos_target > 0, shifted, cos_target)
    return torch.where(cos_target > torch.cos(math.pi - m), shifted, cos_target - m * torch.sin(m))


def magface_logits(
    cosine: Tensor,
    labels: Tensor,
    embedding_norms: Tensor,
    *,
    scale: float = 64.0,
    l_a: float = 10.0,
    u_a: float = 110.0,
    l_m: float = 0.45,
    u_m: float = 0.8,
    easy_margin: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    r"""MagFace logits :math:`s\,f(\cos\theta_{iy_i}; m(a_i))` on the target, :math:`s\cos\theta_{ij}`
    elsewhere, with :math:`a_i` = ``embedding_norms`` ``[B]`` (differentiable).

    The regulariser is not a logit: add ``lambda_g * magface_regularizer(a)`` to the loss.

    Examples
    --------
    >>> import torch
    >>> magface_logits(torch.tensor([[1.0, 0.2]]), torch.tensor([0]), torch.tensor([10.0]), scale=1.0)
    tensor([[0.9004, 0.2000]])
    """
    scale = check_scale(scale)
    l_a, u_a, l_m, u_m = _check(l_a, u_a, l_m, u_m)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    if embedding_norms.shape != (cosine.shape[0],):
        raise ValueError(f"embedding_norms must have shape [{cosine.shape[0]}], got {tuple(embedding_norms.shape)}")
    check_cosine_values(cosine)
    margin = magface_margin(embedding_norms, l_a, u_a, l_m, u_m)
    target = magface_target(target_column(cosine, labels), margin, easy_margin=bool(easy_margin))
    return scale * replace_target(cosine, labels, valid, target)


def magface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    l_a: float = 10.0,
    u_a: float = 110.0,
    l_m: float = 0.45,
    u_m: float = 0.8,
    lambda_g: float = 35.0,
    easy_margin: bool = True,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""MagFace loss (cross entropy plus ``lambda_g`` times the regulariser) from embeddings
    ``[B, D]`` (not normalised: their norms are the magnitudes) and class weights ``[C, D]``;
    see :class:`marginloss.MagFace`.

    Examples
    --------
    >>> import torch
    >>> x = (20 * torch.randn(8, 16) / 4).requires_grad_()
    >>> w = torch.randn(100, 16, requires_grad=True)
    >>> magface(x, w, torch.randint(0, 100, (8,))).backward()
    """
    scale = check_scale(scale)
    l_a, u_a, l_m, u_m = _check(l_a, u_a, l_m, u_m)
    lambda_g = _check_lambda_g(lambda_g)
    easy = bool(easy_margin)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return magface_target(cos, magface_margin(context.embedding_norms, l_a, u_a, l_m, u_m), easy_margin=easy)

    def row_loss(target_logit: Tensor, rest: Tensor, rest_sum: Tensor, context: MarginContext) -> Tensor:
        loss = softmax_row_loss(target_logit, rest, rest_sum, context.num_classes, float(label_smoothing))
        return loss + lambda_g * magface_regularizer(context.embedding_norms, l_a, u_a).to(loss.dtype)

    return margin_loss(
        embeddings, weight, labels, target, row_loss=row_loss, scale=scale, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("magface")
class MagFace(MarginHead):
    r"""MagFace: an angular margin that grows with the feature magnitude, plus a regulariser
    that rewards magnitude; the magnitude ends up a measure of the sample's quality.

    .. math::
        L_i = -\log\frac{e^{s\,f(\cos\theta_{y_i}; m(a_i))}}{e^{s\,f(\cos\theta_{y_i}; m(a_i))}
              + \sum_{j\ne y_i} e^{s\cos\theta_j}} + \lambda_g\, g(a_i),

    .. math::
        a_i = \operatorname{clamp}(\lVert x_i\rVert, l_a, u_a),\quad
        m(a) = \frac{u_m - l_m}{u_a - l_a}(a - l_a) + l_m,\quad
        g(a) = \frac1a + \frac{a}{u_a^2},

    :math:`f` ArcFace's :math:`\cos(\theta + m)` with the release's easy margin
    (:math:`\cos\theta` kept where :math:`\cos\theta \le 0`; see
    :func:`marginloss.functional.magface_target`).  The gradient flows through :math:`a_i`
    into the margin and the regulariser (that is the method: it pulls easy samples to large
    magnitudes and hard ones to small); none flows outside :math:`[l_a, u_a]`, where the
    release's clamp is flat.  ``forward`` returns the total loss; with ``reduction="none"``
    each row holds its cross entropy plus :math:`\lambda_g g(a_i)`.  The magnitude is the
    quality score: :meth:`quality`.

    Meng, Zhao, Huang, Zhao & Zhang, "MagFace: A Universal Representation for Face Recognition
    and Quality Assessment", CVPR 2021.  Defaults are the official release's
    (``IrvingMeng/MagFace``, ``run/run.sh`` and ``models/magface.py``): ``l_a=10, u_a=110,
    l_m=0.45, u_m=0.8, lambda_g=35, s=64`` and ``easy_margin=True`` (its ``MagLinear``
    default; the trainer's argparse default for ``lambda_g`` is 20, its scripts pass 35).
    The paper's convergence condition asks for :math:`\lambda_g \ge s\,k\,u_a^2 l_a^2 /
    (u_a^2 - l_a^2)` with :math:`k = (u_m - l_m)/(u_a - l_a)` (about 22.6 at the defaults);
    it is not enforced.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    scale : float, default 64.0
        :math:`s` (the release's ``--arc-scale``).
    l_a : float, default 10.0
        The lower end of the magnitude range, :math:`0 < l_a < u_a` (the release's ``--l_a``).
    u_a : float, default 110.0
        The upper end of the magnitude range (the release's ``--u_a``).
    l_m : float, default 0.45
        The margin at :math:`l_a`, radians, :math:`0 \le l_m \le u_m < \pi` (the release's
        ``--l_margin``).
    u_m : float, default 0.8
        The margin at :math:`u_a`, radians (the release's ``--u_margin``).
    lambda_g : float, default 35.0
        :math:`\lambda_g \ge 0`, the regulariser's weight (the release's scripts).
    easy_margin : bool, default True
        Keep :math:`\cos\theta` where :math:`\cos\theta \le 0` (the release); ``False`` uses
        ArcFace's monotonic fallback :math:`\cos\theta - m\sin m` past :math:`\theta + m > \pi`.
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
        - embeddings: ``[B, embedding_dim]`` (unnormalised: the norm is the magnitude), labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.MagFace(16, 100)
    >>> embeddings = (8 * torch.randn(8, 16)).requires_grad_()
    >>> head(embeddings, torch.randint(0, 100, (8,))).backward()
    >>> head.quality(embeddings).shape  # the magnitude, higher is better
    torch.Size([8])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
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
        l_a, u_a, l_m, u_m = _check(l_a, u_a, l_m, u_m)
        lambda_g = _check_lambda_g(lambda_g)
        super().__init__(
            embedding_dim, num_classes, scale=check_scale(scale), reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
            device=device, dtype=dtype,
        )
        self.l_a, self.u_a, self.l_m, self.u_m = l_a, u_a, l_m, u_m
        self.lambda_g = lambda_g
        self.easy_margin = bool(easy_margin)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "scale": self.scale, "l_a": self.l_a, "u_a": self.u_a, "l_m": self.l_m, "u_m": self.u_m,
            "lambda_g": self.lambda_g, "easy_margin": self.easy_margin,
        }

    def quality(self, embeddings: Tensor) -> Tensor:
        r"""``[B]`` quality scores: the magnitudes :math:`\lVert x_i\rVert` (unclamped; higher
        is better), in the embeddings' dtype (at least float32), differentiable."""
        V.check_embeddings(embeddings, self.embedding_dim)
        out = torch.promote_types(embeddings.dtype, torch.float32)
        norms: Tensor = torch.linalg.vector_norm(embeddings, dim=1, dtype=torch.float64)
        return norms.to(out)

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        margin = magface_margin(context.embedding_norms, self.l_a, self.u_a, self.l_m, self.u_m)
        return magface_target(cos, margin, easy_margin=self.easy_margin)

    def row_loss(self, target_logit: Tensor, rest: Tensor, rest_sum: Tensor, context: MarginContext) -> Tensor:
        loss = super().row_loss(target_logit, rest, rest_sum, context)
        regularizer = magface_regularizer(context.embedding_norms, self.l_a, self.u_a)
        return loss + self.lambda_g * regularizer.to(loss.dtype)
