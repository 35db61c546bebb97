"""Lifted structured loss (Song, Xiang, Jegelka & Savarese, CVPR 2016), smooth form."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginloss._validation import check_choice, check_float
from marginloss.losses._common import (
    REDUCTIONS,
    _check_embeddings_labels,
    _check_pair_indices,
    _pair_index_masks,
    _pair_masks,
    _upper,
)
from marginloss.miners import (
    DISTANCES,
    _at_least_float32,
    _autocast_disabled,
    _scaled_pairwise_distance,
    _unscale,
)

__all__ = ["LiftedStructureLoss", "lifted_structure_loss"]


def lifted_structure_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices_tuple: Sequence[Tensor] | None = None,
    *,
    margin: float = 1.0,
    distance: str = "euclidean",
    reduction: str = "mean",
) -> Tensor:
    r"""Lifted structured loss: each positive pair against all negatives of both its ends.

    For a positive pair :math:`(i, j)` with :math:`\mathcal N_i` the negatives of :math:`i`,

    .. math::

        J_{ij} = \log\Bigl(\sum_{k \in \mathcal N_i} e^{\alpha - D_{ik}}
                 + \sum_{l \in \mathcal N_j} e^{\alpha - D_{jl}}\Bigr) + D_{ij}, \qquad
        \mathcal L = \frac{1}{2|\hat{\mathcal P}|} \sum_{(i,j) \in \hat{\mathcal P}}
                     \max(0, J_{ij})^2

    The smooth upper bound (their Eq. 4) of Song, Xiang, Jegelka & Savarese, "Deep Metric
    Learning via Lifted Structured Feature Embedding", CVPR 2016, with the log-sum-exp
    computed stably.  The per-pair loss is :math:`\ell_{ij} = \tfrac12 \max(0, J_{ij})^2`.

    What is scored and what ``"mean"`` averages over:

    - without ``indices_tuple``: :math:`\hat{\mathcal P}` is every unordered positive pair
      :math:`i < j` of the batch and :math:`\mathcal N_i` every sample of another class; the
      mean is over :math:`|\hat{\mathcal P}|` (the paper's :math:`\frac{1}{2|\hat P|}` with
      the :math:`\tfrac12` in :math:`\ell`).  A class with no negative in the batch (one-class
      batch) gives its pairs loss 0 (the sum over no negatives is 0, so :math:`J = -\infty`);
    - with ``indices_tuple`` (pairs or triplets as in :func:`contrastive_loss`): the given
      positive pairs are :math:`\hat{\mathcal P}` and :math:`\mathcal N_i` is the set of
      :math:`n` with ``(i, n)`` among the given negative pairs; the mean runs over the given
      positive pairs.

    ``"sum"`` sums :math:`\ell_{ij}`; ``"none"`` returns them (row-major order, or the given
    order).  No positive pair gives 0 attached to the graph.  The :math:`[B, B]` distance
    matrix is the only quadratic tensor.  Computed in at least ``float32``.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite.
    labels : Tensor
        ``[B]`` integer labels.
    indices_tuple : tuple of Tensor, optional
        Mined pairs or triplets.
    margin : float, default 1.0
        :math:`\alpha \ge 0`, the paper's margin (its experiments use 1.0).
    distance : str, default "euclidean"
        ``"euclidean"`` (the paper's), ``"squared_euclidean"`` or ``"cosine"``.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Returns
    -------
    Tensor
        Scalar, or ``[P]`` for ``"none"``; at least ``float32``.

    Raises
    ------
    TypeError
        If a tensor has the wrong type or dtype, or ``margin`` is not a real number.
    ValueError
        If shapes do not match, ``embeddings`` is not finite, an index is outside
        ``[0, B)``, ``margin < 0``, or ``distance`` or ``reduction`` is unknown.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(P)` for ``reduction="none"``

    Examples
    --------
    >>> import math, torch
    >>> from marginloss.losses import lifted_structure_loss
    >>> embeddings = torch.tensor([[0.0], [1.0], [3.0]], requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1])
    >>> # one positive pair (0, 1), D = 1; negatives: D_02 = 3, D_12 = 2
    >>> J = math.log(math.exp(1 - 3) + math.exp(1 - 2)) + 1
    >>> loss = lifted_structure_loss(embeddings, labels)
    >>> round(loss.item(), 6) == round(0.5 * J ** 2, 6)
    True
    >>> loss.backward()
    """
    margin, distance, reduction = _check_lifted_args(margin, distance, reduction)
    embeddings, labels = _check_embeddings_labels(embeddings, labels)
    pairs = _check_pair_indices(indices_tuple, embeddings)
    return _lifted_structure_loss(embeddings, labels, pairs, margin, distance, reduction)


def _check_lifted_args(
    margin: object, distance: object, reduction: object
) -> tuple[float, str, str]:
    margin = check_float("margin", margin, low=0.0)
    distance = check_choice("distance", distance, DISTANCES)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    return margin, distance, reduction


def _lifted_structure_loss(
    embeddings: Tensor,
    labels: Tensor,
    pairs: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    margin: float,
    distance: str,
    reduction: str,
) -> Tensor:
    batch = embeddings.shape[0]
    if batch == 0:
        empty = _at_least_float32(embeddings).sum(dim=1)
        return empty if reduction == "none" else empty.sum()
    with _autocast_disabled(embeddings.device):
        # D = u(dist) with dist = D / s (u multiplies by s, or s * s for the squared
        # distance).  Every exponent is shifted by the closest negative m_i first and only
        # differences of dist are scaled back, so J is exact or +-inf at any norm, never
        # inf - inf: J_ij = alpha + u(d_ij - m) + log(sum_i e^{r_i - u(m_i - m)} + ...).
        dist, scale = _scaled_pairwise_distance(_at_least_float32(embeddings), distance)
        if pairs is None:
            positive_mask, negative_mask = _pair_masks(labels)
            positive_mask = _upper(positive_mask)
        else:
            positive_mask, negative_mask = _pair_index_masks(pairs, batch, dist.device)
        has_negative = negative_mask.any(dim=1)
        closest = dist.masked_fill(~negative_mask, torch.inf).amin(dim=1)
        closest = torch.where(has_negative, closest, torch.zeros_like(closest))
        shifted = _unscale(dist - closest[:, None], scale, distance)
        exponent = torch.where(negative_mask, -shifted, -torch.inf)
        # rows without negatives get a finite stand-in; their pairs are masked out below
        exponent = torch.where(has_negative[:, None], exponent, torch.zeros_like(exponent))
        row_lse = torch.logsumexp(exponent, dim=1)  # in [0, log B]
        pair_min = torch.minimum(closest[:, None], closest[None, :])
        pair_min = torch.where(
            has_negative[:, None] & has_negative[None, :],
            pair_min,
            torch.where(has_negative[:, None], closest[:, None], closest[None, :]),
        )
        from_i = row_lse[:, None] - _unscale(closest[:, None] - pair_min, scale, distance)
        from_j = row_lse[None, :] - _unscale(closest[None, :] - pair_min, scale, distance)
        from_i = torch.where(has_negative[:, None], from_i, -torch.inf)
        from_j = torch.where(has_negative[None, :], from_j, -torch.inf)
        usable = has_negative[:, None] | has_negative[None, :]
        both = torch.logaddexp(
            torch.where(usable, from_i, 0.0), torch.where(usable, from_j, 0.0)
        )
        J = margin + _unscale(dist - pair_min, scale, distance) + both
        pair_loss = 0.5 * F.relu(J).pow(2)
        pair_loss = torch.where(usable, pair_loss, torch.zeros_like(pair_loss))
        if pairs is not None:
            anchor_p, positive, _, _ = pairs
            losses = pair_loss[anchor_p, positive]
        elif reduction == "none":
            return pair_loss[positive_mask]
        else:
            total = torch.where(positive_mask, pair_loss, 0.0).sum()
            if reduction == "sum":
                return total
            return total / positive_mask.sum().clamp_min(1)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total if reduction == "sum" else total / max(losses.shape[0], 1)


class LiftedStructureLoss(nn.Module):
    r"""Lifted structured loss (smooth form) over the positive pairs of a batch.

    .. math::

        \mathcal L = \frac{1}{2|\hat{\mathcal P}|} \sum_{(i,j) \in \hat{\mathcal P}}
        \max\Bigl(0,\; \log\bigl(\textstyle\sum_{k \in \mathcal N_i} e^{\alpha - D_{ik}}
        + \sum_{l \in \mathcal N_j} e^{\alpha - D_{jl}}\bigr) + D_{ij}\Bigr)^2

    From Song, Xiang, Jegelka & Savarese, CVPR 2016; see :func:`lifted_structure_loss` for
    the pairs and what ``"mean"`` averages over.  No parameters.

    Parameters
    ----------
    margin : float, default 1.0
        :math:`\alpha \ge 0` (the paper's value).
    distance : str, default "euclidean"
        ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(P)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss import losses
    >>> _ = torch.manual_seed(0)
    >>> criterion = losses.LiftedStructureLoss()
    >>> criterion
    LiftedStructureLoss(margin=1.0, distance='euclidean', reduction='mean')
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> criterion(embeddings, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    """

    def __init__(
        self, *, margin: float = 1.0, distance: str = "euclidean", reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.margin, self.distance, self.reduction = _check_lifted_args(
            margin, distance, reduction
        )

    def forward(
        self, embeddings: Tensor, labels: Tensor, indices_tuple: Sequence[Tensor] | None = None
    ) -> Tensor:
        """Lifted structured loss of the batch (see :func:`lifted_structure_loss`)."""
        embeddings, labels = _check_embeddings_labels(embeddings, labels)
        pairs = _check_pair_indices(indices_tuple, embeddings)
        return _lifted_structure_loss(
            embeddings, labels, pairs, self.margin, self.distance, self.reduction
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance!r}, reduction={self.reduction!r}"
