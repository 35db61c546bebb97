r"""UniFace: the unified cross-entropy, one binary classifier per class with one shared threshold."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from marginloss import _validation as V
from marginloss.fused import ChunkSize, MarginContext, margin_loss, softplus
from marginloss.heads._common import (
    check_cosine_margin,
    check_cosine_values,
    check_logit_inputs,
    check_scale,
    replace_target,
    target_column,
)
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["UniFace", "uniface", "uniface_bias_init", "uniface_logits", "uniface_target"]


def _check_negative_weight(negative_weight: float) -> float:
    return V.check_float("negative_weight", negative_weight, low=0.0, low_open=True)


def uniface_bias_init(num_classes: int, bias_ratio: float = 1.0) -> float:
    r"""The initial value of UniFace's bias: :math:`b_0 = -\log(10\,r\,C)`.

    The release (``CVI-SZU/UniFace``, ``head.py``) starts the paper's threshold
    :math:`\tilde b` at :math:`\log(10 r C)`; the engine adds its bias to every logit, so the
    head's ``bias`` is :math:`-\tilde b`.

    Examples
    --------
    >>> round(uniface_bias_init(1000), 4)  # -log(10 * 1000)
    -9.2103
    """
    num_classes = V.check_positive_int("num_classes", num_classes)
    bias_ratio = V.check_float("bias_ratio", bias_ratio, low=0.0, low_open=True)
    return -math.log(10.0 * bias_ratio * num_classes)


def uniface_target(cos_target: Tensor, margin: float = 0.4) -> Tensor:
    r"""UniFace's (marginal UCE) target transform, an additive cosine margin: :math:`\cos\theta - m`.

    Examples
    --------
    >>> import torch
    >>> uniface_target(torch.tensor([1.0, 0.0]), 0.4)
    tensor([ 0.6000, -0.4000])
    """
    return cos_target - margin


def uniface_logits(
    cosine: Tensor,
    labels: Tensor,
    bias: float | Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.4,
    ignore_index: int = -100,
) -> Tensor:
    r"""UniFace logits :math:`s(\cos\theta_{iy_i} - m) + b` on the target, :math:`s\cos\theta_{ij} + b` elsewhere.

    ``cosine`` is a ``[B, C]`` matrix of cosines; rows labelled ``ignore_index`` get no
    margin.  The loss is the sum over classes of the binary cross entropy of these logits
    (``softplus(-z)`` for the target, ``negative_weight * softplus(z)`` for the rest).

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([[0.8, 0.1]])
    >>> uniface_logits(cos, torch.tensor([0]), -1.0, scale=10.0, margin=0.4)
    tensor([[3., 0.]])
    """
    scale, margin = check_scale(scale), check_cosine_margin("margin", margin)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    check_cosine_values(cosine)
    target = uniface_target(target_column(cosine, labels), margin)
    bias_value = bias.to(cosine.dtype) if isinstance(bias, Tensor) else bias
    return scale * replace_target(cosine, labels, valid, target) + bias_value


def _uniface_row_loss(negative_weight: float) -> Any:
    def row_loss(target_logit: Tensor, rest: Tensor, rest_sum: Tensor, context: MarginContext) -> Tensor:
        return softplus(-target_logit) + negative_weight * rest

    return row_loss


def uniface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.4,
    negative_weight: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""UniFace loss from embeddings ``[B, D]``, class weights ``[C, D]`` and a one-element
    ``bias`` (see :func:`uniface_bias_init`); see :class:`marginloss.UniFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    >>> b = torch.tensor(uniface_bias_init(100), requires_grad=True)
    >>> uniface(x, w, torch.randint(0, 100, (8,)), b).backward()
    >>> b.grad is not None
    True
    """
    scale, margin = check_scale(scale), check_cosine_margin("margin", margin)
    negative_weight = _check_negative_weight(negative_weight)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return uniface_target(cos, margin)

    return margin_loss(
        embeddings, weight, labels, target, row_loss=_uniface_row_loss(negative_weight), scale=scale, bias=bias,
        loss_form="sigmoid", reduction=reduction, ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("uniface")
class UniFace(MarginHead):
    r"""UniFace: the unified cross-entropy (UCE) loss with a cosine margin and a learnable threshold.

    Every class is a binary classifier and all of them share one threshold :math:`\tilde b`,
    so that positive pairs score above it and negative pairs below it for every sample at
    once (the "unified threshold" of the paper):

    .. math::
        L_i = \log\bigl(1 + e^{-(s(\cos\theta_{iy_i} - m) - \tilde b)}\bigr)
              + \lambda \sum_{j\ne y_i} \log\bigl(1 + e^{s\cos\theta_{ij} - \tilde b}\bigr),

    the paper's marginal UCE (:math:`L_\text{uce-m}`, with the negative weight :math:`\lambda`
    of :math:`L_\text{uce-mb-}\lambda`).  The head's learnable ``bias`` is :math:`b = -\tilde b`
    (added to every logit), initialised as the release does: :math:`\tilde b_0 = \log(10 r C)`.

    Zhou, Jia, Li, Shen & Duan, "UniFace: Unified Cross-Entropy Loss for Deep Face
    Recognition", ICCV 2023; defaults from the official release (``CVI-SZU/UniFace``,
    ``head.py``, ``Unified_Cross_Entropy_Loss``: ``m=0.4, s=64, l=1.0, r=1.0``).  The release
    clamps each logit to :math:`[-s, s]` before the softplus; that clamp only changes terms
    beyond :math:`e^{\pm s}` (and stops their gradient), so it is left out: the loss here is the
    exact formula above.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    scale : float, default 64.0
        :math:`s` (the release's ``s``).
    margin : float, default 0.4
        :math:`m`, an additive cosine margin in ``[0, 2)`` (the release's ``m``).
    negative_weight : float, default 1.0
        :math:`\lambda > 0`, the weight of the negative terms (the release's ``l``, the paper's
        :math:`\lambda` of :math:`L_\text{uce-mb-}\lambda`; 1 is plain UCE).
    bias_ratio : float, default 1.0
        :math:`r > 0` of the bias initialisation :math:`\tilde b_0 = \log(10 r C)` (the release's
        ``r``); used only by :meth:`reset_parameters`.
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
        - output: scalar (the mean over rows of each row's sum over classes), or ``[B]`` if
          ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.UniFace(16, 100)
    >>> round(float(head.bias.detach()), 4)  # -log(10 * 100)
    -6.9078
    >>> loss = head(torch.randn(8, 16), torch.randint(0, 100, (8,)))
    >>> loss.backward()
    >>> head.bias.grad.shape
    torch.Size([])
    """

    loss_form = "sigmoid"

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.4,
        negative_weight: float = 1.0,
        bias_ratio: float = 1.0,
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
        margin = check_cosine_margin("margin", margin)
        negative_weight = _check_negative_weight(negative_weight)
        bias_ratio = V.check_float("bias_ratio", bias_ratio, low=0.0, low_open=True)
        super().__init__(
            embedding_dim, num_classes, scale=check_scale(scale), reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed, device=device, dtype=dtype,
        )
        self.margin = margin
        self.negative_weight = negative_weight
        self.bias_ratio = bias_ratio
        init = uniface_bias_init(self.num_classes, bias_ratio)
        self.bias = nn.Parameter(torch.tensor(init, device=self.weight.device, dtype=self.weight.dtype))

    def reset_parameters(self) -> None:
        """Xavier-uniform weight (see :class:`marginloss.MarginHead`) and the release's bias
        :math:`-\\log(10 r C)`."""
        super().reset_parameters()
        if isinstance(self.bias, nn.Parameter):  # not yet while the base class sets up
            with torch.no_grad():
                self.bias.fill_(uniface_bias_init(self.num_classes, self.bias_ratio))

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "margin": self.margin,
            "negative_weight": self.negative_weight,
            "bias_ratio": self.bias_ratio,
        }

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        return uniface_target(cos, self.margin)

    def row_loss(self, target_logit: Tensor, rest: Tensor, rest_sum: Tensor, context: MarginContext) -> Tensor:
        return softplus(-target_logit) + self.negative_weight * rest
