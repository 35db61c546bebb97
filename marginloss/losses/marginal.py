"""Marginal loss (Deng, Zhou & Zafeiriou, CVPRW 2017): :func:`marginal_loss`, :class:`MarginalLoss`."""

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
from marginloss.miners import _at_least_float32, _autocast_disabled, _pairwise_distance, _unit_rows

__all__ = ["MarginalLoss", "marginal_loss"]


def marginal_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices_tuple: Sequence[Tensor] | None = None,
    *,
    threshold: float = 1.2,
    margin: float = 0.3,
    reduction: str = "mean",
) -> Tensor:
    r"""Marginal loss: squared distances of L2-normalised features kept a margin from a threshold.

    With :math:`\hat x = x / \lVert x \rVert_2` and :math:`y_{ij} = 1` for a positive pair,
    :math:`-1` for a negative one,

    .. math::

        \ell_{ij} = \max\Bigl(0,\; \xi - y_{ij}\bigl(\theta - \lVert \hat x_i - \hat x_j
        \rVert_2^2\bigr)\Bigr), \qquad
        \mathcal{L} = \frac{1}{B^2 - B} \sum_{i \ne j} \ell_{ij}

    From Deng, Zhou & Zafeiriou, "Marginal Loss for Deep Face Recognition", CVPR Workshops
    (Faces "in-the-wild") 2017: positive pairs are pushed below :math:`\theta - \xi`,
    negative pairs above :math:`\theta + \xi` (squared distances of unit vectors lie in
    :math:`[0, 4]`).  The paper uses it jointly with softmax.

    Without ``indices_tuple`` every pair of the batch is scored and ``"mean"`` is the
    paper's average over all :math:`B(B-1)` ordered pairs (equal to the average over the
    :math:`B(B-1)/2` unordered ones, which is how it is computed); with ``indices_tuple``
    (4-tuple of pairs or 3-tuple of triplets, see :func:`contrastive_loss`) the mean runs
    over the given pairs.  ``"sum"`` sums the unordered pair losses (half the paper's sum
    over ordered pairs); ``"none"`` returns them, positives first then negatives; ``B < 2`` gives 0 attached to the graph.  A zero embedding stays the zero
    vector after normalisation.  Normalisation is scaled, so norms from 1e-30 to 1e30 give
    the same loss in ``float32``.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite (normalised inside).
    labels : Tensor
        ``[B]`` integer labels.
    indices_tuple : tuple of Tensor, optional
        Mined pairs or triplets.
    threshold : float, default 1.2
        :math:`\theta`, in ``(0, 4)``; the paper's value.
    margin : float, default 0.3
        :math:`\xi \ge 0`; the paper's value.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Returns
    -------
    Tensor
        Scalar, or ``[P + N]`` for ``"none"``; at least ``float32``.

    Raises
    ------
    TypeError
        If a tensor has the wrong type or dtype, or a hyperparameter is not a real number.
    ValueError
        If shapes do not match, ``embeddings`` is not finite, an index is outside
        ``[0, B)``, ``threshold`` is outside ``(0, 4)``, ``margin < 0``, or ``reduction`` is
        unknown.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(P + N)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss.losses import marginal_loss
    >>> embeddings = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]], requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1])
    >>> # squared distances of the unit vectors: (0,1) 2 (positive), (0,2) 4, (1,2) 2
    >>> marginal_loss(embeddings, labels, reduction="none")  # 0.3 - (1.2 - 2), 0, 0.3 + 1.2 - 2
    tensor([1.1000, 0.0000, 0.0000], grad_fn=<CatBackward0>)
    >>> loss = marginal_loss(embeddings, labels)  # 1.1 / 3
    >>> loss.backward()
    """
    threshold, margin, reduction = _check_marginal_args(threshold, margin, reduction)
    embeddings, labels = _check_embeddings_labels(embeddings, labels)
    pairs = _check_pair_indices(indices_tuple, embeddings)
    return _marginal_loss(embeddings, labels, pairs, threshold, margin, reduction)


def _check_marginal_args(
    threshold: object, margin: object, reduction: object
) -> tuple[float, float, str]:
    threshold = check_float("threshold", threshold, low=0.0, high=4.0, low_open=True, high_open=True)
    margin = check_float("margin", margin, low=0.0)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    return threshold, margin, reduction


def _marginal_loss(
    embeddings: Tensor,
    labels: Tensor,
    pairs: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    threshold: float,
    margin: float,
    reduction: str,
) -> Tensor:
    with _autocast_disabled(embeddings.device):
        unit = _unit_rows(_at_least_float32(embeddings))
        squared = _pairwise_distance(unit, "squared_euclidean")
        positive_loss = F.relu(margin - (threshold - squared))
        negative_loss = F.relu(margin + (threshold - squared))
        if pairs is not None:
            anchor_p, positive, anchor_n, negative = pairs
            losses = torch.cat(
                [positive_loss[anchor_p, positive], negative_loss[anchor_n, negative]]
            )
            return _reduce(losses, reduction)
        positive_mask, negative_mask = _pair_masks(labels)
        positive_mask, negative_mask = _upper(positive_mask), _upper(negative_mask)
        if reduction == "none":
            return torch.cat([positive_loss[positive_mask], negative_loss[negative_mask]])
        total = (
            torch.where(positive_mask, positive_loss, 0.0).sum()
            + torch.where(negative_mask, negative_loss, 0.0).sum()
        )
        if reduction == "sum":
            return total
        batch = embeddings.shape[0]
        return total / max(batch * (batch - 1) // 2, 1)


class MarginalLoss(nn.Module):
    r"""Marginal loss over all pairs of a batch of L2-normalised features.

    .. math::

        \mathcal{L} = \frac{1}{B^2 - B} \sum_{i \ne j}
        \max\Bigl(0,\; \xi - y_{ij}\bigl(\theta - \lVert \hat x_i - \hat x_j \rVert_2^2\bigr)\Bigr)

    From Deng, Zhou & Zafeiriou, CVPRW 2017; see :func:`marginal_loss` (what ``"mean"``
    averages over, mined pairs).  No parameters.

    Parameters
    ----------
    threshold : float, default 1.2
        :math:`\theta` in ``(0, 4)`` (the paper's value).
    margin : float, default 0.3
        :math:`\xi \ge 0` (the paper's value).
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
    >>> criterion = losses.MarginalLoss()
    >>> criterion
    MarginalLoss(threshold=1.2, margin=0.3, reduction='mean')
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> criterion(embeddings, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    """

    def __init__(
        self, *, threshold: float = 1.2, margin: float = 0.3, reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.threshold, self.margin, self.reduction = _check_marginal_args(
            threshold, margin, reduction
        )

    def forward(
        self, embeddings: Tensor, labels: Tensor, indices_tuple: Sequence[Tensor] | None = None
    ) -> Tensor:
        """Marginal loss of the batch (see :func:`marginal_loss`)."""
        embeddings, labels = _check_embeddings_labels(embeddings, labels)
        pairs = _check_pair_indices(indices_tuple, embeddings)
        return _marginal_loss(
            embeddings, labels, pairs, self.threshold, self.margin, self.reduction
        )

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, margin={self.margin}, reduction={self.reduction!r}"
