r"""SphereFace2: one binary classifier per class, with the similarity adjustment :math:`g`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from marginloss import _validation as V
from marginloss.fused import ChunkSize, MarginContext, margin_loss, softplus
from marginloss.heads._common import (
    check_angular_margin,
    check_cosine_margin,
    check_cosine_values,
    check_logit_inputs,
    check_scale,
    safe_sin,
    target_column,
)
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "SphereFace2",
    "sphereface2",
    "sphereface2_adjust",
    "sphereface2_bias_init",
    "sphereface2_logits",
    "sphereface2_non_target",
    "sphereface2_target",
]

_VARIANTS = ("C", "A")


def _check(variant: str, margin: float, lambd: float, t: float) -> tuple[str, float, float, float]:
    variant = V.check_choice("variant", variant, _VARIANTS)
    margin = check_cosine_margin("margin", margin) if variant == "C" else check_angular_margin("margin", margin)
    lambd = V.check_float("lambd", lambd, low=0.0, high=1.0, low_open=True, high_open=True)
    t = V.check_float("t", t, low=0.0, low_open=True)
    return variant, margin, lambd, t


def sphereface2_adjust(cos: Tensor, t: float = 3.0) -> Tensor:
    r"""The similarity adjustment :math:`g(c) = 2\left(\frac{c + 1}{2}\right)^t - 1`.

    Maps :math:`[-1, 1]` onto itself, increasing; :math:`t = 1` is the identity.

    Examples
    --------
    >>> import torch
    >>> sphereface2_adjust(torch.tensor([-1.0, 0.0, 1.0]), 3.0)
    tensor([-1.0000, -0.7500,  1.0000])
    """
    if _tracked(cos):
        return 2.0 * ((cos + 1.0) * 0.5).clamp_min(0.0).pow(t) - 1.0
    # Outside autograd (the chunked engine's blocks): the same operations in place on one
    # new tensor.
    return torch.add(cos, 1.0).mul_(0.5).clamp_min_(0.0).pow_(t).mul_(2.0).sub_(1.0)


def _tracked(cos: Tensor) -> bool:
    return torch.is_grad_enabled() and cos.requires_grad


def _adjust_slope(cos: Tensor, t: float) -> Tensor:
    if _tracked(cos):
        return t * ((cos + 1.0) * 0.5).clamp_min(0.0).pow(t - 1.0)
    return torch.add(cos, 1.0).mul_(0.5).clamp_min_(0.0).pow_(t - 1.0).mul_(t)


def _unit_slope(cos: Tensor) -> Tensor:
    """The straight-through derivative, 1, as a broadcast view (no ``[B, n]`` block to fill)."""
    return torch.ones((), dtype=cos.dtype, device=cos.device).expand_as(cos)


def _straight(cos: Tensor, value: Tensor, straight_through: bool) -> Tensor:
    # Without autograd the straight-through form is the value itself (to rounding).
    return cos + (value - cos).detach() if straight_through and _tracked(cos) else value


def sphereface2_target(
    cos_target: Tensor,
    margin: float = 0.4,
    *,
    t: float = 3.0,
    variant: str = "C",
    straight_through: bool = True,
) -> Tensor:
    r"""SphereFace2's adjusted target similarity, in cosine units.

    .. math::
        f_C(\cos\theta) = g(\cos\theta) - m, \qquad
        f_A(\cos\theta) = g\bigl(\cos\min(\theta + m, \pi)\bigr).

    With ``straight_through`` (the release's rule: the adjustment is computed without
    gradient) the derivative with respect to :math:`\cos\theta` is 1; otherwise exact.

    Examples
    --------
    >>> import torch
    >>> sphereface2_target(torch.tensor([1.0, 0.0]), 0.4)
    tensor([ 0.6000, -1.1500])
    """
    if variant == "C":
        value = sphereface2_adjust(cos_target, t) - margin
    elif variant == "A":
        shifted = cos_target * math.cos(margin) - safe_sin(cos_target) * math.sin(margin)
        # θ + m > π  <=>  cos θ < cos(π - m): the angle stops at π
        shifted = torch.where(cos_target < math.cos(math.pi - margin), torch.full_like(shifted, -1.0), shifted)
        value = sphereface2_adjust(shifted, t)
    else:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    return _straight(cos_target, value, straight_through)


def sphereface2_non_target(
    cos: Tensor,
    margin: float = 0.4,
    *,
    t: float = 3.0,
    variant: str = "C",
    straight_through: bool = True,
) -> Tensor:
    r"""SphereFace2's adjusted non-target similarity: :math:`g(\cos\theta) + m` (variant C) or
    :math:`g(\cos\theta)` (variant A).

    Examples
    --------
    >>> import torch
    >>> sphereface2_non_target(torch.tensor([0.0]), 0.4)
    tensor([-0.3500])
    """
    value = sphereface2_adjust(cos, t)
    if variant == "C":
        value = value + margin if _tracked(cos) else value.add_(margin)
    return _straight(cos, value, straight_through)


def sphereface2_bias_init(
    num_classes: int, scale: float = 40.0, margin: float = 0.4, lambd: float = 0.7, t: float = 3.0, variant: str = "C"
) -> float:
    r"""The release's initial bias: the root of the expected loss's derivative at :math:`\cos\theta = 0`.

    With :math:`z = \lambda / ((1 - \lambda)(C - 1))`, :math:`a_y` and :math:`a_i` the target
    and non-target logits (without bias) of a sample orthogonal to every class,

    .. math::
        b_0 = \log 2z - a_i - \log\Bigl(1 - z + \sqrt{(1 - z)^2 + 4z\,e^{a_y - a_i}}\Bigr).

    Examples
    --------
    >>> round(sphereface2_bias_init(10_000), 3)
    5.637
    """
    num_classes = V.check_positive_int("num_classes", num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 for SphereFace2, got {num_classes}")
    scale = check_scale(scale)
    variant, margin, lambd, t = _check(variant, margin, lambd, t)
    z = lambd / ((1.0 - lambd) * (num_classes - 1.0))
    base = 2.0 * 0.5**t - 1.0
    if variant == "C":
        a_y, a_i = scale * (base - margin), scale * (base + margin)
    else:
        theta = min(math.pi, math.pi / 2.0 + margin)
        a_y, a_i = scale * (2.0 * ((math.cos(theta) + 1.0) / 2.0) ** t - 1.0), scale * base
    ratio = 4.0 * z * math.exp(a_y - a_i)
    root = math.sqrt((1.0 - z) ** 2 + ratio)
    # 1 - z + root, without the cancellation when z > 1 and the ratio is tiny (lambda near 1
    # with few classes, or a large scale times margin): then it equals ratio / (root - 1 + z).
    denominator = 1.0 - z + root if z <= 1.0 else ratio / (root - 1.0 + z)
    return float(math.log(2.0 * z) - a_i - math.log(denominator))


def sphereface2_logits(
    cosine: Tensor,
    labels: Tensor,
    bias: float | Tensor,
    *,
    scale: float = 40.0,
    margin: float = 0.4,
    t: float = 3.0,
    variant: str = "C",
    straight_through: bool = True,
    ignore_index: int = -100,
) -> Tensor:
    r"""SphereFace2 logits :math:`r f(\cos\theta_{iy_i}) + b` on the target and
    :math:`r g_n(\cos\theta_{ij}) + b` elsewhere (:func:`sphereface2_target`,
    :func:`sphereface2_non_target`); rows labelled ``ignore_index`` get the non-target form.

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([[1.0, 0.0]])
    >>> sphereface2_logits(cos, torch.tensor([0]), 0.0, scale=1.0, margin=0.4)
    tensor([[ 0.6000, -0.3500]])
    """
    scale = check_scale(scale)
    variant, margin, _, t = _check(variant, margin, 0.5, t)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    check_cosine_values(cosine)
    cosine = cosine.clamp(-1.0, 1.0)
    rest = sphereface2_non_target(cosine, margin, t=t, variant=variant, straight_through=straight_through)
    target = sphereface2_target(
        target_column(cosine, labels), margin, t=t, variant=variant, straight_through=straight_through
    )
    current = rest.gather(1, labels[:, None]).squeeze(1)
    value = torch.where(valid, target.to(rest.dtype), current)
    bias_value = bias.to(cosine.dtype) if isinstance(bias, Tensor) else bias
    return scale * rest.scatter(1, labels[:, None], value[:, None]) + bias_value


def sphereface2(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor,
    *,
    scale: float = 40.0,
    margin: float = 0.4,
    lambd: float = 0.7,
    t: float = 3.0,
    loss_weight: float = 50.0,
    variant: str = "C",
    straight_through: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""SphereFace2 loss from embeddings ``[B, D]``, class weights ``[C, D]`` and a one-element
    ``bias`` (see :func:`~marginloss.functional.sphereface2_bias_init`); see :class:`marginloss.SphereFace2`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    >>> b = torch.tensor(sphereface2_bias_init(100), requires_grad=True)
    >>> sphereface2(x, w, torch.randint(0, 100, (8,)), b).backward()
    """
    scale = check_scale(scale)
    variant, margin, lambd, t = _check(variant, margin, lambd, t)
    loss_weight = V.check_float("loss_weight", loss_weight, low=0.0, low_open=True)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return sphereface2_target(cos, margin, t=t, variant=variant, straight_through=straight_through)

    def non_target(cos: Tensor, context: MarginContext) -> Tensor:
        return sphereface2_non_target(cos, margin, t=t, variant=variant, straight_through=straight_through)

    def non_target_grad(cos: Tensor, context: MarginContext) -> Tensor:
        return _unit_slope(cos) if straight_through else _adjust_slope(cos, t)

    def row_loss(target_logit: Tensor, rest: Tensor, rest_sum: Tensor, context: MarginContext) -> Tensor:
        return (loss_weight / scale) * (lambd * softplus(-target_logit) + (1.0 - lambd) * rest)

    return margin_loss(
        embeddings, weight, labels, target, non_target=non_target, non_target_grad=non_target_grad,
        row_loss=row_loss, scale=scale, bias=bias, loss_form="sigmoid", reduction=reduction,
        ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("sphereface2")
class SphereFace2(MarginHead):
    r"""SphereFace2: binary classification per class, with a similarity adjustment and a learnable bias.

    Each class is a binary classifier of the adjusted cosine; positive and negative terms are
    weighted :math:`\lambda/r` and :math:`(1-\lambda)/r` (the paper's Eq. 5), and the release
    multiplies the loss by ``loss_weight``:

    .. math::
        L_i = w\Bigl[\frac{\lambda}{r}\log\bigl(1 + e^{-(r f(\cos\theta_{iy_i}) + b)}\bigr)
              + \frac{1-\lambda}{r}\sum_{j\ne y_i}\log\bigl(1 + e^{r g_n(\cos\theta_{ij}) + b}\bigr)\Bigr],

    with :math:`g(c) = 2\left(\frac{c+1}{2}\right)^t - 1` (:func:`~marginloss.functional.sphereface2_adjust`) and, for
    the default variant "C" (SphereFace2-C, additive cosine margin), :math:`f(c) = g(c) - m`,
    :math:`g_n(c) = g(c) + m`; variant "A" (additive angular margin) has
    :math:`f(c) = g(\cos\min(\theta + m, \pi))` and :math:`g_n = g`.

    Wen, Liu, Weller, Raj & Singh, "SphereFace2: Binary Classification is All You Need for
    Deep Face Recognition", ICLR 2022.  Defaults are the official release's (OpenSphere,
    ``SphereFace2(magn_type='C', alpha=0.7, r=40., m=0.4, t=3., lw=50.)``), which the paper's
    text shares except for the loss weight ``lw`` (the paper's loss is ``loss_weight=1``).  As
    in the release, the bias starts at :func:`~marginloss.functional.sphereface2_bias_init` and the adjustment's
    gradient is not propagated (``straight_through=True``: the logits' derivative with
    respect to :math:`\cos\theta` is :math:`r`); ``straight_through=False`` gives the exact
    derivative of the formula.  The release renormalises its stored weight in place every
    step; here the weight is normalised in the graph as for every head (the same logits).
    Its multiplicative variant "M" is not offered.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C \ge 2`.
    scale : float, default 40.0
        :math:`r`, the radius (the release's ``r``).
    margin : float, default 0.4
        :math:`m`: in cosine units, in ``[0, 2)``, for variant "C"; in radians, in ``[0, π)``,
        for variant "A" (the release's ``m`` for both).
    lambd : float, default 0.7
        :math:`\lambda \in (0, 1)`, the weight of the positive term (the release's ``alpha``).
    t : float, default 3.0
        :math:`t > 0` of the similarity adjustment (the release's ``t``).
    loss_weight : float, default 50.0
        :math:`w > 0`, a factor on the whole loss (the release's ``lw``).
    variant : {"C", "A"}, default "C"
        The margin type (the release's ``magn_type``; its default is "C").
    straight_through : bool, default True
        The release's gradient rule (see above).
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :class:`torch.nn.CrossEntropyLoss`; ``"mean"`` averages over the rows whose label is
        not ``ignore_index`` (an all-ignored batch gives 0).
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
    label_smoothing : float, default 0.0
        Must be 0: there is no softmax to smooth (a sigmoid-form head); accepted so that code
        building any head with ``label_smoothing=0.0`` works.

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar (the mean over rows), or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.SphereFace2(16, 100)
    >>> loss = head(torch.randn(8, 16), torch.randint(0, 100, (8,)))
    >>> loss.backward()
    >>> head.bias.grad is not None
    True
    """

    loss_form = "sigmoid"

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 40.0,
        margin: float = 0.4,
        lambd: float = 0.7,
        t: float = 3.0,
        loss_weight: float = 50.0,
        variant: str = "C",
        straight_through: bool = True,
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
        scale = check_scale(scale)
        variant, margin, lambd, t = _check(variant, margin, lambd, t)
        loss_weight = V.check_float("loss_weight", loss_weight, low=0.0, low_open=True)
        init = sphereface2_bias_init(num_classes, scale, margin, lambd, t, variant)
        super().__init__(
            embedding_dim, num_classes, scale=scale, reduction=reduction, label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            chunk_size=chunk_size, process_group=process_group, sample_rate=sample_rate,
            sample_seed=sample_seed, device=device, dtype=dtype,
        )
        self.margin = margin
        self.lambd = lambd
        self.t = t
        self.loss_weight = loss_weight
        self.variant = variant
        self.straight_through = bool(straight_through)
        self.bias = nn.Parameter(torch.tensor(init, device=self.weight.device, dtype=self.weight.dtype))

    def reset_parameters(self) -> None:
        """Xavier-uniform weight (see :class:`marginloss.MarginHead`) and the release's bias
        (:func:`~marginloss.functional.sphereface2_bias_init`)."""
        super().reset_parameters()
        if isinstance(self.bias, nn.Parameter):  # not yet while the base class sets up
            init = sphereface2_bias_init(self.num_classes, float(self.scale), self.margin, self.lambd, self.t, self.variant)
            with torch.no_grad():
                self.bias.fill_(init)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "margin": self.margin,
            "lambd": self.lambd,
            "t": self.t,
            "loss_weight": self.loss_weight,
            "variant": self.variant,
            "straight_through": self.straight_through,
        }

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        return sphereface2_target(cos, self.margin, t=self.t, variant=self.variant, straight_through=self.straight_through)

    def non_target(self, cos: Tensor, context: MarginContext) -> Tensor:
        return sphereface2_non_target(
            cos, self.margin, t=self.t, variant=self.variant, straight_through=self.straight_through
        )

    def non_target_grad(self, cos: Tensor, context: MarginContext) -> Tensor:
        return _unit_slope(cos) if self.straight_through else _adjust_slope(cos, self.t)

    def row_loss(self, target_logit: Tensor, rest: Tensor, rest_sum: Tensor, context: MarginContext) -> Tensor:
        weight = self.loss_weight / float(self.scale)
        positive = softplus(-target_logit)
        return weight * (self.lambd * positive + (1.0 - self.lambd) * rest)
