r"""CosFace (AM-Softmax): additive cosine margin, :math:`f(\cos\theta) = \cos\theta - m`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from marginloss.fused import ChunkSize, MarginContext, margin_loss
from marginloss.heads._common import (
    check_cosine_margin,
    check_cosine_values,
    check_logit_inputs,
    check_scale,
    replace_target,
)
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["CosFace", "cosface", "cosface_logits", "cosface_target"]


def cosface_target(cos_target: Tensor, margin: float = 0.35) -> Tensor:
    r"""CosFace's additive cosine margin: :math:`f(\cos\theta) = \cos\theta - m`.

    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.

    Examples
    --------
    >>> import torch
    >>> cosface_target(torch.tensor([0.5]), 0.35)
    tensor([0.1500])
    """
    return cos_target - margin


def cosface_logits(
    cosine: Tensor, labels: Tensor, *, scale: float = 64.0, margin: float = 0.35, ignore_index: int = -100
) -> Tensor:
    r"""CosFace logits :math:`s(\cos\theta_{iy_i} - m)` on the target, :math:`s\cos\theta_{ij}` elsewhere.

    Examples
    --------
    >>> import torch
    >>> cosface_logits(torch.tensor([[0.5, 0.2]]), torch.tensor([0]), scale=2.0, margin=0.25)
    tensor([[0.5000, 0.4000]])
    """
    scale, margin = check_scale(scale), check_cosine_margin("margin", margin)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    check_cosine_values(cosine)
    cos_t = cosine.gather(1, labels[:, None]).squeeze(1)
    return scale * replace_target(cosine, labels, valid, cosface_target(cos_t, margin))


def cosface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.35,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""CosFace loss from embeddings and class weights; see :class:`marginloss.CosFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16), torch.randn(100, 16)
    >>> cosface(x, w, torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """
    scale, margin = check_scale(scale), check_cosine_margin("margin", margin)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return cosface_target(cos, margin)

    return margin_loss(
        embeddings, weight, labels, target, scale=scale, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("cosface")
class CosFace(MarginHead):
    r"""CosFace (large margin cosine loss, AM-Softmax): additive cosine margin.

    .. math::
        L_i = -\log\frac{e^{s(\cos\theta_{y_i} - m)}}{e^{s(\cos\theta_{y_i} - m)}
              + \sum_{j\ne y_i} e^{s\cos\theta_j}}

    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018
    (also Wang, Cheng, Liu & Liu, "Additive Margin Softmax", 2018).

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    scale : float, default 64.0
        :math:`s`, the CosFace paper's value.
    margin : float, default 0.35
        :math:`m` in ``[0, 2)``; 0.35 is the CosFace paper's best setting.
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
    >>> head = marginloss.CosFace(16, 100, scale=30.0, margin=0.4)
    >>> head(torch.randn(8, 16), torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.35,
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
        super().__init__(
            embedding_dim, num_classes, scale=check_scale(scale), reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
            device=device, dtype=dtype,
        )
        self.margin = margin

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale, "margin": self.margin}

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        return cosface_target(cos, self.margin)
