r"""Sub-center ArcFace: ``K`` weight rows per class, the class cosine is the max over them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from marginloss import _validation as V
from marginloss import fused
from marginloss.fused import ChunkSize, MarginContext, margin_loss
from marginloss.heads._common import (
    check_angular_margin,
    check_cosine_values,
    check_logit_inputs,
    check_scale,
    replace_target,
    target_column,
)
from marginloss.heads.arcface import arcface_target
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["SubCenterArcFace", "subcenter_arcface", "subcenter_arcface_logits"]

# The paper's (and its release's drop.py) cleaning threshold: 75 degrees.
DEFAULT_OUTLIER_ANGLE = math.radians(75.0)


def _check_outlier_angle(angle: float) -> float:
    return V.check_float("angle", angle, low=0.0, high=math.pi)


def subcenter_arcface_logits(
    cosine: Tensor,
    labels: Tensor,
    *,
    num_subcenters: int = 3,
    scale: float = 64.0,
    margin: float = 0.5,
    ignore_index: int = -100,
) -> Tensor:
    r"""Sub-center ArcFace logits from the ``[B, C·K]`` cosines to every sub-centre.

    Each class's cosine is the max over its ``K`` consecutive columns (class ``c`` in
    columns ``c*K .. c*K + K - 1``); the target gets ArcFace's margin
    (:func:`marginloss.functional.arcface_target`) and everything is multiplied by the scale.
    Returns ``[B, C]``.

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([[0.1, 0.9, 0.2, 0.3]])  # 2 classes, 2 sub-centres each
    >>> subcenter_arcface_logits(cos, torch.tensor([1]), num_subcenters=2, scale=1.0, margin=0.0)
    tensor([[0.9000, 0.3000]])
    """
    num_subcenters = V.check_positive_int("num_subcenters", num_subcenters)
    scale, margin = check_scale(scale), check_angular_margin("margin", margin)
    if not isinstance(cosine, Tensor) or cosine.dim() != 2 or cosine.shape[1] % num_subcenters != 0:
        got = tuple(cosine.shape) if isinstance(cosine, Tensor) else type(cosine).__name__
        raise ValueError(
            f"cosine must be a [batch, num_classes * num_subcenters] tensor with num_subcenters={num_subcenters}, got {got}"
        )
    pooled = cosine.unflatten(1, (-1, num_subcenters)).amax(dim=2)
    labels, valid = check_logit_inputs(pooled, labels, ignore_index)
    check_cosine_values(pooled)
    target = arcface_target(target_column(pooled, labels), margin)
    return scale * replace_target(pooled, labels, valid, target)


def subcenter_arcface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    num_subcenters: int = 3,
    scale: float = 64.0,
    margin: float = 0.5,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""Sub-center ArcFace loss from embeddings ``[B, D]`` and weights ``[C·K, D]``; see
    :class:`marginloss.SubCenterArcFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16, requires_grad=True), torch.randn(100 * 3, 16, requires_grad=True)
    >>> subcenter_arcface(x, w, torch.randint(0, 100, (8,))).backward()
    """
    num_subcenters = V.check_positive_int("num_subcenters", num_subcenters)
    scale, margin = check_scale(scale), check_angular_margin("margin", margin)
    if isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] % num_subcenters != 0:
        raise ValueError(
            f"weight must have num_classes * num_subcenters rows (num_subcenters={num_subcenters}), "
            f"got {weight.shape[0]} rows"
        )

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return arcface_target(cos, margin)

    return margin_loss(
        embeddings, weight, labels, target, scale=scale, num_subcenters=num_subcenters, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("subcenter_arcface")
class SubCenterArcFace(MarginHead):
    r"""Sub-center ArcFace: ArcFace with ``K`` sub-centres per class, robust to label noise.

    .. math::
        \cos\theta_{ij} = \max_{k} \hat x_i^\top \hat w_{jk},\qquad
        L_i = -\log\frac{e^{s\,f(\cos\theta_{iy_i})}}{e^{s\,f(\cos\theta_{iy_i})}
              + \sum_{j\ne y_i} e^{s\cos\theta_{ij}}},\qquad
        f(\cos\theta) = \begin{cases}\cos(\theta+m) & \theta+m\le\pi\\
                        \cos\theta - m\sin m & \text{otherwise}\end{cases}

    A sample only needs to be close to *one* of its class's sub-centres, so clean faces
    gather around a dominant sub-centre and noisy or hard ones around the others.  After
    training, :meth:`dominant_centers` gives one centre per class (for deployment, or to
    continue with a plain :class:`~marginloss.ArcFace`) and :meth:`find_outliers` the samples
    farther than 75 degrees from their class's dominant sub-centre, which the paper drops
    to clean its web data before retraining.

    Deng, Guo, Liu, Gong & Zafeiriou, "Sub-center ArcFace: Boosting Face Recognition by
    Large-scale Noisy Web Faces", ECCV 2020.  Defaults are those of the release
    (InsightFace ``recognition/SubCenter-ArcFace``: ``sample_config.py`` ``loss_K = 3``,
    ``loss_s = 64``, ``loss_m2 = 0.5``; ``drop.py --threshold 75``), which match the paper.
    The release writes the margin in the combined form :math:`\cos(m_1\theta + m_2) - m_3`
    with :math:`(1, 0.5, 0)`; past :math:`\theta + m > \pi` we use ArcFace's monotonic
    fallback (:func:`marginloss.functional.arcface_target`, as PML's
    ``SubCenterArcFaceLoss`` also does).

    **Weight layout**: ``weight`` is ``[num_classes * K, embedding_dim]`` and class ``c``'s
    sub-centres are rows ``c*K .. c*K + K - 1`` (``weight.view(num_classes, K, D)`` is the
    ``[C, K, D]`` view; PyTorch Metric Learning's ``SubCenterArcFaceLoss.W`` is this
    matrix transposed, and its margin is in degrees).

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    num_subcenters : int, default 3
        :math:`K`, sub-centres per class (the paper's and release's choice).
    scale : float, default 64.0
        :math:`s` (the paper's value).
    margin : float, default 0.5
        :math:`m` in radians, in ``[0, π)`` (the paper's value, 28.6 degrees).
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
        PartialFC: the fraction of each shard's classes kept per training step, in ``(0, 1]``;
        sampling keeps or drops whole classes (all ``K`` rows together).
    sample_seed : int, default 0
        Seeds the PartialFC draw together with the rank and the step.
    device : torch.device or str, optional
        Where the weight is created.
    dtype : torch.dtype, optional
        The weight's dtype (float32 by default).

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``
        - ``weight``: ``[num_classes * K, embedding_dim]``; :meth:`cosine` and :meth:`logits`:
          ``[B, num_classes]`` (max over sub-centres)

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.SubCenterArcFace(16, 100)
    >>> head.weight.shape
    torch.Size([300, 16])
    >>> x, y = torch.randn(8, 16), torch.randint(0, 100, (8,))
    >>> head(x, y).backward()
    >>> head.logits(x).shape, head.dominant_centers().shape
    (torch.Size([8, 100]), torch.Size([100, 16]))
    >>> head.find_outliers(x, y).shape  # True: farther than 75° from the dominant centre
    torch.Size([8])
    """

    subcenter_counts: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        num_subcenters: int = 3,
        scale: float = 64.0,
        margin: float = 0.5,
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
            num_subcenters=num_subcenters, device=device, dtype=dtype,
        )
        self.margin = margin
        # How many training samples each sub-centre won (this rank's batch rows whose class
        # this rank holds): what dominant_centers() uses when given no data.
        self.register_buffer(
            "subcenter_counts",
            torch.zeros(self.shard_size, self.num_subcenters, dtype=torch.int64, device=self.weight.device),
        )

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale, "margin": self.margin}

    def _state_tensors(self) -> Iterator[tuple[str, Tensor]]:
        # The counts are per rank (its classes, its batch rows): not state the ranks of a
        # sharded head must agree on.
        for name, tensor in super()._state_tensors():
            if name != "subcenter_counts":
                yield name, tensor

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        return arcface_target(cos, self.margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of a batch (see :class:`marginloss.MarginHead`); in training mode also
        counts which sub-centre each sample of the batch is closest to."""
        loss = super().forward(embeddings, labels)
        if self.training and not fused.replaying_forward():
            with torch.no_grad():
                local, owned = self._local_labels(labels)
                winner = self._nearest_subcenter(embeddings, local)
                self.subcenter_counts.view(-1).index_add_(
                    0, local * self.num_subcenters + winner, owned.to(torch.int64)
                )
        return loss

    # ------------------------------------------------------------ noisy-label tools

    def _local_labels(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Labels as indices into this rank's classes (0 where not held) and the mask of
        rows whose class this head holds (ignored rows excluded)."""
        labels = labels.to(device=self.weight.device, dtype=torch.int64)
        local = labels - self.shard_start
        owned = (labels != self.ignore_index) & (local >= 0) & (local < self.shard_size)
        return torch.where(owned, local, torch.zeros_like(local)), owned

    def _subcenter_cosines(self, embeddings: Tensor, local: Tensor) -> Tensor:
        """``[B, K]`` cosines of each sample to its class's sub-centres (no gradient)."""
        compute = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        x = embeddings.detach().to(device=self.weight.device, dtype=compute)
        rows = self.weight.detach().to(compute).unflatten(0, (self.shard_size, self.num_subcenters))[local]
        x = x * fused.safe_reciprocal(torch.linalg.vector_norm(x, dim=1)).to(compute)[:, None]
        rows = rows * fused.safe_reciprocal(torch.linalg.vector_norm(rows, dim=2)).to(compute)[:, :, None]
        cosines: Tensor = (rows @ x[:, :, None]).squeeze(2)
        return cosines

    def _nearest_subcenter(self, embeddings: Tensor, local: Tensor) -> Tensor:
        # argmax over a row's sub-centres needs neither the embedding's norm nor the
        # cosines themselves: the dots scaled by 1/‖w‖ rank them alike (one pass fewer).
        compute = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        weight = self.weight.detach().to(compute)
        x = embeddings.detach().to(device=weight.device, dtype=compute)
        k = self.num_subcenters
        if self.shard_size <= embeddings.shape[0]:  # norms of every row: the smaller pass
            inv = fused.safe_reciprocal(torch.linalg.vector_norm(weight, dim=1)).unflatten(0, (self.shard_size, k))[local]
            rows = weight.unflatten(0, (self.shard_size, k))[local]
        else:
            rows = weight.unflatten(0, (self.shard_size, k))[local]
            inv = fused.safe_reciprocal(torch.linalg.vector_norm(rows, dim=2))
        winner: Tensor = ((rows @ x[:, :, None]).squeeze(2) * inv).argmax(dim=1)
        return winner

    def dominant_indices(self, embeddings: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """``[C]`` int64: which sub-centre (``0 .. K-1``) dominates each class.

        The dominant sub-centre is the one the most samples of the class are closest to (the
        rule of the release's ``drop.py``; ties go to the lowest index).  With ``embeddings``
        and ``labels`` the samples given are counted (pass the whole training set, in one
        call, for the paper's cleaning); without them, the counts the head gathered in
        training mode (the buffer ``subcenter_counts``).  A class with no sample counted
        gets sub-centre 0.  On a class-sharded head, this rank's classes only, and the
        training counts cover the rows of this rank's batches (a random share of the data
        when batches are shuffled across ranks).
        """
        counts = self.subcenter_counts
        if embeddings is not None or labels is not None:
            if embeddings is None or labels is None:
                raise ValueError("dominant_indices needs both embeddings and labels, or neither")
            V.check_embeddings(embeddings, self.embedding_dim)
            labels = V.check_labels(labels, embeddings.shape[0], self.num_classes, self.ignore_index)
            local, owned = self._local_labels(labels)
            winner = self._nearest_subcenter(embeddings, local)
            counts = torch.zeros_like(self.subcenter_counts)
            counts.view(-1).index_add_(0, local * self.num_subcenters + winner, owned.to(torch.int64))
        # argmax returns the first maximum: ties (and unseen classes) go to the lowest index.
        return counts.argmax(dim=1)

    def dominant_centers(self, embeddings: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """``[C, D]``: each class's dominant sub-centre (a detached copy of its weight row,
        not normalised), for deployment or to continue training a plain ArcFace head.

        ``embeddings`` and ``labels`` as for :meth:`dominant_indices`.
        """
        index = self.dominant_indices(embeddings, labels)
        rows = self.weight.detach().unflatten(0, (self.shard_size, self.num_subcenters))
        centers: Tensor = rows[torch.arange(self.shard_size, device=rows.device), index].clone()
        return centers

    def find_outliers(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        angle: float = DEFAULT_OUTLIER_ANGLE,
        dominant: Tensor | None = None,
    ) -> Tensor:
        r"""``[B]`` bool: the samples farther than ``angle`` from their class's dominant sub-centre.

        The paper's cleaning of noisy web faces: after training, a sample whose angle to its
        class's dominant sub-centre exceeds 75 degrees (:math:`\cos\theta < \cos 75°`) is
        most likely mislabelled and is dropped.

        Parameters
        ----------
        embeddings : Tensor
            ``[B, D]``.
        labels : Tensor
            ``[B]`` class indices; rows with ``ignore_index`` (and, on a sharded head, rows
            whose class another rank holds) are never outliers.
        angle : float, default ``math.radians(75)``
            The threshold in radians, in ``[0, π]`` (the paper's and ``drop.py``'s 75 degrees).
        dominant : Tensor, optional
            ``[C]`` sub-centre indices from :meth:`dominant_indices`; by default they are
            computed from ``embeddings`` and ``labels`` themselves (the release's rule when
            these are all the class's samples).

        Examples
        --------
        >>> import torch, marginloss
        >>> head = marginloss.SubCenterArcFace(2, 1, num_subcenters=2)
        >>> with torch.no_grad():
        ...     _ = head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.05]])
        >>> head.find_outliers(x, torch.tensor([0, 0, 0]))  # dominant: sub-centre 0
        tensor([False, False,  True])
        """
        angle = _check_outlier_angle(angle)
        V.check_embeddings(embeddings, self.embedding_dim)
        labels = V.check_labels(labels, embeddings.shape[0], self.num_classes, self.ignore_index)
        if dominant is None:
            dominant = self.dominant_indices(embeddings, labels)
        elif dominant.shape != (self.shard_size,):
            raise ValueError(f"dominant must have shape [{self.shard_size}], got {tuple(dominant.shape)}")
        local, owned = self._local_labels(labels)
        cosines = self._subcenter_cosines(embeddings, local)
        chosen = dominant.to(device=cosines.device, dtype=torch.int64)[local]
        cos = cosines.gather(1, chosen[:, None]).squeeze(1)
        return owned & (cos < math.cos(angle))
