"""Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006): :func:`contrastive_loss`, :class:`ContrastiveLoss`."""

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
    _pair_masks,
    _reduce,
    _upper,
)
from marginloss.miners import DISTANCES, _at_least_float32, _autocast_disabled, _pairwise_distance

__all__ = ["ContrastiveLoss", "contrastive_loss"]


def contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices_tuple: Sequence[Tensor] | None = None,
    *,
    margin: float = 1.0,
    distance: str = "euclidean",
    reduction: str = "mean",
) -> Tensor:
    r"""Contrastive loss: positive pairs pulled together, negative pairs pushed past a margin.

    For a pair :math:`(i, j)` at distance :math:`D_{ij}` (:func:`marginloss.miners.pairwise_distance`),

    .. math::

        \ell_{ij} =
        \begin{cases}
        \tfrac12 D_{ij}^2 & y_i = y_j \\
        \tfrac12 \max(0,\; m - D_{ij})^2 & y_i \ne y_j
        \end{cases}

    From Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an Invariant
    Mapping", CVPR 2006 (their Eq. 4 with :math:`L_S = \tfrac12 D^2`,
    :math:`L_D = \tfrac12 \max(0, m - D)^2`).

    What is scored and what ``reduction="mean"`` averages over:

    - without ``indices_tuple``: every unordered pair :math:`i < j` of the batch, positive
      and negative alike (:math:`B(B-1)/2` pairs); the mean is over all of them, zero-loss
      negatives included, as the paper's sum over pairs divided by their number;
    - with ``indices_tuple``: exactly the given pairs, a 4-tuple ``(anchor_positive,
      positive, anchor_negative, negative)`` or a triplet 3-tuple ``(anchor, positive,
      negative)`` whose distinct ``(a, p)`` and ``(a, n)`` pairs are scored; the mean is over
      those pairs.  Pairs are scored by the role the tuple gives them, whatever the labels.

    ``"sum"`` sums the same pair losses; ``"none"`` returns them, positives first (row-major
    order of :math:`(i, j)`, or the given order) then negatives.  A batch with no pair
    (``B < 2``) gives 0 attached to the graph for ``"mean"``/``"sum"``.  Computed in at
    least ``float32``, also under autocast.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite.
    labels : Tensor
        ``[B]`` integer labels (equal values mean the same class).
    indices_tuple : tuple of Tensor, optional
        Mined pairs or triplets, as described above (e.g. a miner's output).
    margin : float, default 1.0
        :math:`m > 0`, in the units of ``distance``.  The paper leaves :math:`m` to the
        application; 1.0 is the usual choice for unit-scale or L2-normalised embeddings
        (and pytorch-metric-learning's ``neg_margin``).
    distance : str, default "euclidean"
        ``"euclidean"`` (the paper's :math:`D_W`), ``"squared_euclidean"`` or ``"cosine"``.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Returns
    -------
    Tensor
        Scalar, or ``[P + N]`` pair losses for ``"none"``; at least ``float32``.

    Raises
    ------
    TypeError
        If a tensor has the wrong type or dtype, ``indices_tuple`` is not a tuple/list, or
        ``margin`` is not a real number.
    ValueError
        If shapes do not match, ``embeddings`` is not finite, an index is outside
        ``[0, B)``, ``margin <= 0``, or ``distance`` or ``reduction`` is unknown.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(P + N)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss.losses import contrastive_loss
    >>> embeddings = torch.tensor([[0.0], [0.5], [2.0]], requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1])
    >>> # pairs (0,1) positive D=0.5, (0,2) negative D=2 (past the margin), (1,2) negative D=1.5
    >>> contrastive_loss(embeddings, labels, margin=2.0, reduction="none")
    tensor([0.1250, 0.0000, 0.1250], grad_fn=<CatBackward0>)
    >>> loss = contrastive_loss(embeddings, labels, margin=2.0)  # (0.125 + 0 + 0.125) / 3
    >>> loss.backward()
    >>> embeddings.grad.flatten()  # pulls 0 and 1 together, pushes 1 away from 2
    tensor([-0.1667,  0.3333, -0.1667])
    """
    margin, distance, reduction = _check_contrastive_args(margin, distance, reduction)
    embeddings, labels = _check_embeddings_labels(embeddings, labels)
    pairs = _check_pair_indices(indices_tuple, embeddings)
    return _contrastive_loss(embeddings, labels, pairs, margin, distance, reduction)


def _check_contrastive_args(
    margin: object, distance: object, reduction: object
) -> tuple[float, str, str]:
    margin = check_float("margin", margin, low=0.0, low_open=True)
    distance = check_choice("distance", distance, DISTANCES)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    return margin, distance, reduction


def _contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    pairs: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    margin: float,
    distance: str,
    reduction: str,
) -> Tensor:
    with _autocast_disabled(embeddings.device):
        dist = _pairwise_distance(_at_least_float32(embeddings), distance)
        pull = 0.5 * dist.pow(2)
        push = 0.5 * F.relu(margin - dist).pow(2)
        if pairs is not None:
            anchor_p, positive, anchor_n, negative = pairs
            losses = torch.cat([pull[anchor_p, positive], push[anchor_n, negative]])
            return _reduce(losses, reduction)
        positive_mask, negative_mask = _pair_masks(labels)
        positive_mask, negative_mask = _upper(positive_mask), _upper(negative_mask)
        if reduction == "none":
            return torch.cat([pull[positive_mask], push[negative_mask]])
        total = torch.where(positive_mask, pull, 0.0).sum() + torch.where(negative_mask, push, 0.0).sum()
        if reduction == "sum":
            return total
        batch = embeddings.shape[0]
        return total / max(batch * (batch - 1) // 2, 1)


class ContrastiveLoss(nn.Module):
    r"""Contrastive loss over the pairs of a batch (or given pairs).

    .. math::

        \ell_{ij} = \tfrac12\,[y_i = y_j]\, D_{ij}^2
                  + \tfrac12\,[y_i \ne y_j]\, \max(0,\; m - D_{ij})^2

    From Hadsell, Chopra & LeCun, CVPR 2006.  See :func:`contrastive_loss` for the pairs
    scored and what ``"mean"`` averages over (all :math:`B(B-1)/2` pairs, or the given
    ones).  No parameters.

    Parameters
    ----------
    margin : float, default 1.0
        :math:`m > 0` (the paper leaves it to the application).
    distance : str, default "euclidean"
        ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(P + N)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss import losses
    >>> _ = torch.manual_seed(0)
    >>> criterion = losses.ContrastiveLoss(margin=0.5, distance="cosine")
    >>> criterion
    ContrastiveLoss(margin=0.5, distance='cosine', reduction='mean')
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    >>> criterion(embeddings, labels).backward()
    """

    def __init__(
        self, *, margin: float = 1.0, distance: str = "euclidean", reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.margin, self.distance, self.reduction = _check_contrastive_args(
            margin, distance, reduction
        )

    def forward(
        self, embeddings: Tensor, labels: Tensor, indices_tuple: Sequence[Tensor] | None = None
    ) -> Tensor:
        """Contrastive loss of the batch (see :func:`contrastive_loss`)."""
        embeddings, labels = _check_embeddings_labels(embeddings, labels)
        pairs = _check_pair_indices(indices_tuple, embeddings)
        return _contrastive_loss(
            embeddings, labels, pairs, self.margin, self.distance, self.reduction
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance!r}, reduction={self.reduction!r}"
