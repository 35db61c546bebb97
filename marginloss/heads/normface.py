r"""NormFace: the normalised softmax, no margin: :math:`f(\cos\theta) = \cos\theta`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from marginloss.fused import ChunkSize, MarginContext, margin_loss
from marginloss.heads._common import check_scale
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["NormFace", "normface"]


def normface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 16.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""NormFace (normalised softmax) loss; see :class:`marginloss.NormFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16), torch.randn(100, 16)
    >>> normface(x, w, torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """
    scale = check_scale(scale)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return cos

    return margin_loss(
        embeddings, weight, labels, target, scale=scale, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("normface")
class NormFace(MarginHead):
    r"""NormFace: normalised softmax, no margin.

    .. math::
        L_i = -\log\frac{e^{s\cos\theta_{y_i}}}{\sum_j e^{s\cos\theta_j}}

    Wang, Xiang, Cheng & Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification",
    ACM MM 2017.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    scale : float, default 16.0
        :math:`s`.  NormFace shows that with normalised features the loss has a lower bound
        that only a large enough :math:`s` can approach; :math:`s = 16` satisfies the paper's
        bound :math:`s \ge \frac{C-1}{C}\log\frac{(C-1)P}{1-P}` for :math:`P = 0.9` up to
        about :math:`10^6` classes.
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
    >>> head = marginloss.NormFace(16, 100)
    >>> head(torch.randn(8, 16), torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 16.0,
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
            embedding_dim, num_classes, scale=check_scale(scale), reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
            device=device, dtype=dtype,
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale}
