"""Quadruplet loss (Chen, Chen, Zhang & Huang, CVPR 2017): :func:`quadruplet_loss`, :class:`QuadrupletLoss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginloss._validation import check_choice, check_float
from marginloss.losses._common import REDUCTIONS, _check_embeddings_labels, _check_index, _reduce
from marginloss.miners import (
    DISTANCES,
    _at_least_float32,
    _autocast_disabled,
    _batch_hard_selection,
    _scaled_pairwise_distance,
    _unscale,
)

__all__ = ["QuadrupletLoss", "quadruplet_loss"]


def quadruplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices_tuple: Sequence[Tensor] | None = None,
    *,
    margin1: float = 1.0,
    margin2: float = 0.5,
    distance: str = "squared_euclidean",
    reduction: str = "mean",
) -> Tensor:
    r"""Quadruplet loss: the triplet term plus a term on a negative pair not sharing the anchor.

    For a quadruplet :math:`(i, j, k, l)` with :math:`y_i = y_j`, :math:`y_k \ne y_i`,
    :math:`y_l \ne y_i`, :math:`y_l \ne y_k`,

    .. math::

        \ell_{ijkl} = \max(0,\; D_{ij} - D_{ik} + \alpha_1)
                    + \max(0,\; D_{ij} - D_{lk} + \alpha_2)

    From Chen, Chen, Zhang & Huang, "Beyond Triplet Loss: a Deep Quadruplet Network for
    Person Re-identification", CVPR 2017 (their Eq. 4, with :math:`g^2` the squared
    Euclidean distance of the embeddings in place of their learned metric).  The second
    term asks positive pairs to be closer than *any* negative pair, which tightens the
    classes globally; its margin is the smaller one, as the paper requires.

    Mining and what ``reduction="mean"`` averages over:

    - without ``indices_tuple``, the paper's batch-hard mining: for anchor :math:`i`, the
      farthest positive :math:`j`, the closest negative :math:`k`, and for the second term
      the closest pair :math:`(l, k')` of two different classes, both different from
      :math:`y_i` (the hardest negative pair of the batch that does not involve the
      anchor's class; it need not contain :math:`k`).  The first
      term is averaged over the anchors with a positive and a negative, the second over the
      anchors with a positive and such a pair (a batch needs three classes for it), and the
      two means are added.  ``"sum"`` adds the two sums; ``"none"`` returns ``[B]``, each
      anchor's first plus second term with a missing term counted 0.  The second term needs,
      for every class of the batch, the closest pair outside that class: a
      :math:`[P, B, B]` boolean mask for the :math:`P` classes of the batch (not
      :math:`[B, B, B]`);
    - with ``indices_tuple`` ``(i, j, k, l)`` (four index tensors of equal length): exactly
      those quadruplets, second term on :math:`D_{lk}`; the mean is over the quadruplets.

    No valid term gives 0 attached to the graph.  Computed in at least ``float32``.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite.
    labels : Tensor
        ``[B]`` integer labels.
    indices_tuple : tuple of Tensor, optional
        ``(anchor, positive, negative, other_negative)`` quadruplets.
    margin1 : float, default 1.0
        :math:`\alpha_1 \ge 0` of the triplet term.
    margin2 : float, default 0.5
        :math:`\alpha_2 \ge 0` of the negative-pair term; the paper wants it smaller than
        :math:`\alpha_1` (the weaker, auxiliary constraint).
    distance : str, default "squared_euclidean"
        The paper's squared distance :math:`g^2`; also ``"euclidean"`` or ``"cosine"``.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Returns
    -------
    Tensor
        Scalar, or ``[B]`` (``[T]`` with ``indices_tuple``) for ``"none"``.

    Raises
    ------
    TypeError
        If a tensor has the wrong type or dtype, or a margin is not a real number.
    ValueError
        If shapes do not match, ``embeddings`` is not finite, an index is outside
        ``[0, B)``, ``indices_tuple`` does not hold 4 tensors, a margin is negative, or
        ``distance`` or ``reduction`` is unknown.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(B)` / :math:`(T)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss.losses import quadruplet_loss
    >>> embeddings = torch.tensor([[0.0], [1.0], [2.0], [4.0], [4.5]], requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1, 2, 2])
    >>> # anchor 0: D_01 = 1, closest negative 2 (D = 4): term 1 = max(0, 1 - 4 + 1) = 0;
    >>> # closest pair of classes 1 and 2 (not 0): (2, 3), D = 4: term 2 = max(0, 1 - 4 + 0.5) = 0
    >>> quadruplet_loss(embeddings, labels, reduction="none")
    tensor([0.0000, 1.0000, 0.0000, 0.0000, 0.0000], grad_fn=<AddBackward0>)
    >>> quadruplet_loss(embeddings, labels).backward()
    """
    margin1, margin2, distance, reduction = _check_quadruplet_args(
        margin1, margin2, distance, reduction
    )
    embeddings, labels = _check_embeddings_labels(embeddings, labels)
    quadruplets = _check_quadruplets(indices_tuple, embeddings)
    return _quadruplet_loss(
        embeddings, labels, quadruplets, margin1, margin2, distance, reduction
    )


def _check_quadruplet_args(
    margin1: object, margin2: object, distance: object, reduction: object
) -> tuple[float, float, str, str]:
    margin1 = check_float("margin1", margin1, low=0.0)
    margin2 = check_float("margin2", margin2, low=0.0)
    distance = check_choice("distance", distance, DISTANCES)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    return margin1, margin2, distance, reduction


def _check_quadruplets(
    indices_tuple: object, embeddings: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    if indices_tuple is None:
        return None
    if not isinstance(indices_tuple, (tuple, list)):
        raise TypeError(
            "indices_tuple must be a tuple (anchor, positive, negative, other_negative) of "
            f"index tensors or None, got {type(indices_tuple).__name__}"
        )
    if len(indices_tuple) != 4:
        raise ValueError(
            "indices_tuple must hold 4 index tensors (anchor, positive, negative, "
            f"other_negative), got {len(indices_tuple)}"
        )
    first = indices_tuple[0]
    length = first.shape[0] if isinstance(first, Tensor) and first.dim() == 1 else None
    roles = ("anchor", "positive", "negative", "other_negative")
    checked = [
        _check_index(f"indices_tuple ({role})", index, length, embeddings.shape[0], embeddings)
        for role, index in zip(roles, indices_tuple)
    ]
    return checked[0], checked[1], checked[2], checked[3]


def _quadruplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    quadruplets: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    margin1: float,
    margin2: float,
    distance: str,
    reduction: str,
) -> Tensor:
    with _autocast_disabled(embeddings.device):
        # gaps formed on D / s and scaled back: exact or +-inf at any norm, never NaN
        dist, scale = _scaled_pairwise_distance(_at_least_float32(embeddings), distance)

        def hinge(near: Tensor, far: Tensor, margin: float) -> Tensor:
            return F.relu(_unscale(near - far, scale, distance) + margin)

        if quadruplets is not None:
            anchor, positive, negative, other = quadruplets
            d_ap = dist[anchor, positive]
            losses = hinge(d_ap, dist[anchor, negative], margin1) + hinge(
                d_ap, dist[other, negative], margin2
            )
            return _reduce(losses, reduction)
        if dist.shape[0] == 0:
            empty = dist.sum(dim=1)
            return empty if reduction == "none" else empty.sum()
        positive_idx, negative_idx, valid1 = _batch_hard_selection(dist, labels)
        d_ap = dist.gather(1, positive_idx[:, None]).squeeze(1)
        d_an = dist.gather(1, negative_idx[:, None]).squeeze(1)
        d_other, valid2 = _hardest_outside_pair(dist, labels)
        has_positive = (labels[:, None] == labels[None, :]).sum(dim=1) > 1
        valid2 = valid2 & has_positive
        term1 = torch.where(valid1, hinge(d_ap, d_an, margin1), 0.0)
        term2 = torch.where(valid2, hinge(d_ap, d_other, margin2), 0.0)
        if reduction == "none":
            return term1 + term2
        if reduction == "sum":
            return term1.sum() + term2.sum()
        return term1.sum() / valid1.sum().clamp_min(1) + term2.sum() / valid2.sum().clamp_min(1)


def _hardest_outside_pair(dist: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per anchor: distance of the closest pair ``(l, k)``, ``y_l != y_k``, with neither of
    class ``y_anchor`` (``[B]``, gradient flows to the pair) and whether one exists."""
    batch = dist.shape[0]
    if batch == 0:
        return dist.sum(dim=1), torch.zeros(0, dtype=torch.bool, device=dist.device)
    classes, class_of = torch.unique(labels, return_inverse=True)
    member = class_of[None, :] == torch.arange(classes.shape[0], device=dist.device)[:, None]
    negative_pair = labels[:, None] != labels[None, :]
    allowed = negative_pair[None] & ~member[:, :, None] & ~member[:, None, :]  # [P, B, B]
    flat = dist.detach().masked_fill(~negative_pair, torch.inf)[None].expand_as(allowed)
    flat = flat.masked_fill(~allowed, torch.inf).reshape(classes.shape[0], -1)
    best = flat.argmin(dim=1)
    exists = allowed.reshape(classes.shape[0], -1).any(dim=1)
    per_class = dist.reshape(-1)[best]
    return per_class[class_of], exists[class_of]


class QuadrupletLoss(nn.Module):
    r"""Quadruplet loss with the paper's batch-hard mining (or given quadruplets).

    .. math::

        \ell = \max(0,\; D_{ij} - D_{ik} + \alpha_1) + \max(0,\; D_{ij} - D_{lk} + \alpha_2)

    From Chen, Chen, Zhang & Huang, CVPR 2017; see :func:`quadruplet_loss` for the mining
    and what ``"mean"`` averages over.  No parameters.

    Parameters
    ----------
    margin1 : float, default 1.0
        :math:`\alpha_1 \ge 0`.
    margin2 : float, default 0.5
        :math:`\alpha_2 \ge 0`.
    distance : str, default "squared_euclidean"
        ``"squared_euclidean"``, ``"euclidean"`` or ``"cosine"``.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(B)` / :math:`(T)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss import losses
    >>> _ = torch.manual_seed(0)
    >>> criterion = losses.QuadrupletLoss()
    >>> criterion
    QuadrupletLoss(margin1=1.0, margin2=0.5, distance='squared_euclidean', reduction='mean')
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> criterion(embeddings, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    """

    def __init__(
        self,
        *,
        margin1: float = 1.0,
        margin2: float = 0.5,
        distance: str = "squared_euclidean",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.margin1, self.margin2, self.distance, self.reduction = _check_quadruplet_args(
            margin1, margin2, distance, reduction
        )

    def forward(
        self, embeddings: Tensor, labels: Tensor, indices_tuple: Sequence[Tensor] | None = None
    ) -> Tensor:
        """Quadruplet loss of the batch (see :func:`quadruplet_loss`)."""
        embeddings, labels = _check_embeddings_labels(embeddings, labels)
        quadruplets = _check_quadruplets(indices_tuple, embeddings)
        return _quadruplet_loss(
            embeddings, labels, quadruplets, self.margin1, self.margin2, self.distance,
            self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"margin1={self.margin1}, margin2={self.margin2}, distance={self.distance!r}, "
            f"reduction={self.reduction!r}"
        )
