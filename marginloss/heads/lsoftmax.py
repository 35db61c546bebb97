r"""L-Softmax: the large-margin softmax, :math:`\psi(\theta)` with nothing normalised."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from marginloss.fused import ChunkSize, MarginContext, margin_loss
from marginloss.heads._common import (
    check_cosine_values,
    check_logit_inputs,
    replace_target,
    target_column,
)
from marginloss.heads.base import register_head
from marginloss.heads.sphereface import (
    Lambda,
    SphereFace,
    check_int_margin,
    check_lambda,
    sphereface_target,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["LSoftmax", "lsoftmax", "lsoftmax_logits", "lsoftmax_target"]

lsoftmax_target = sphereface_target
"""L-Softmax's target transform; the same :math:`f` as :func:`~marginloss.functional.sphereface_target`."""


def lsoftmax_logits(
    cosine: Tensor,
    labels: Tensor,
    embedding_norms: Tensor,
    weight_norms: Tensor,
    *,
    margin: int = 4,
    lambda_: Lambda = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    r"""L-Softmax logits :math:`\lVert w_{y_i}\rVert\lVert x_i\rVert f(\cos\theta_{iy_i})` on the
    target and :math:`w_j^\top x_i = \lVert w_j\rVert\lVert x_i\rVert\cos\theta_{ij}` elsewhere.

    ``embedding_norms`` is ``[B]``, ``weight_norms`` is ``[C]``.

    Examples
    --------
    >>> import torch
    >>> lsoftmax_logits(torch.tensor([[0.0, 0.5]]), torch.tensor([0]), torch.tensor([2.0]),
    ...                 torch.tensor([1.0, 3.0]))
    tensor([[-6.,  3.]])
    """
    margin = check_int_margin(margin)
    check_lambda(lambda_)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    if embedding_norms.shape != (cosine.shape[0],) or weight_norms.shape != (cosine.shape[1],):
        raise ValueError(
            f"embedding_norms must have shape [{cosine.shape[0]}] and weight_norms "
            f"[{cosine.shape[1]}], got {tuple(embedding_norms.shape)} and {tuple(weight_norms.shape)}"
        )
    check_cosine_values(cosine)
    target = sphereface_target(target_column(cosine, labels), margin, lambda_)
    radius = embedding_norms[:, None] * weight_norms[None, :]
    return radius * replace_target(cosine, labels, valid, target)


def lsoftmax(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    margin: int = 4,
    lambda_: Lambda = 0.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""L-Softmax loss at annealing weight ``lambda_``; see :class:`marginloss.LSoftmax`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16), torch.randn(100, 16)
    >>> lsoftmax(x, w, torch.randint(0, 100, (8,)), margin=2).shape
    torch.Size([])
    """
    margin = check_int_margin(margin)
    check_lambda(lambda_)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return sphereface_target(cos, margin, lambda_)

    return margin_loss(
        embeddings, weight, labels, target, scale=1.0, normalize_embeddings=False,
        normalize_weight=False, reduction=reduction, label_smoothing=label_smoothing,
        ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("lsoftmax")
class LSoftmax(SphereFace):
    r"""L-Softmax: large-margin softmax with unnormalised weights and embeddings.

    .. math::
        L_i = -\log\frac{e^{\lVert w_{y_i}\rVert\lVert x_i\rVert f(\theta_{y_i})}}
              {e^{\lVert w_{y_i}\rVert\lVert x_i\rVert f(\theta_{y_i})}
              + \sum_{j\ne y_i} e^{w_j^\top x_i}},\qquad
        f = \frac{\lambda\cos\theta + \psi(\theta)}{1+\lambda}

    with :math:`\psi` as in :class:`SphereFace` and the same annealing of :math:`\lambda`
    (buffer ``iteration``).

    Liu, Wen, Yu & Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks",
    ICML 2016.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    margin : int, default 4
        The angle multiplier :math:`m`, in ``[1, 8]``.
    lambda_base : float, default 1000.0
        :math:`\lambda_{base}` (the L-Softmax release's MNIST ``largemargin_inner_product``
        ``base``).
    lambda_gamma : float, default 2.5e-5
        :math:`\gamma` (the release's ``gamma``).
    lambda_power : float, default 35.0
        :math:`p` (the release's ``power``).
    lambda_min : float, default 0.0
        :math:`\lambda_{\min}` (the release's ``lambda_min``: annealing ends at the pure
        margin).
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
    >>> head = marginloss.LSoftmax(16, 10, margin=2)
    >>> head(torch.randn(8, 16), torch.randint(0, 10, (8,))).shape
    torch.Size([])
    """

    normalize_embeddings = False
    normalize_weight = False

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        margin: int = 4,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 2.5e-5,
        lambda_power: float = 35.0,
        lambda_min: float = 0.0,
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
        super().__init__(
            embedding_dim, num_classes, margin=margin, lambda_base=lambda_base,
            lambda_gamma=lambda_gamma, lambda_power=lambda_power, lambda_min=lambda_min,
            reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index,
            chunk_size=chunk_size, process_group=process_group, sample_rate=sample_rate,
            sample_seed=sample_seed, device=device, dtype=dtype,
        )
