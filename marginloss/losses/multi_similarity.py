"""Multi-similarity loss (Wang, Han, Huang, Dong & Scott, CVPR 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from marginloss._validation import check_choice, check_float
from marginloss.losses._common import (
    REDUCTIONS,
    _check_embeddings_labels,
    _check_pair_indices,
    _pair_index_masks,
    _pair_masks,
    _reduce,
)
from marginloss.miners import _at_least_float32, _autocast_disabled, _unit_rows

__all__ = ["MultiSimilarityLoss", "multi_similarity_loss"]


def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices_tuple: Sequence[Tensor] | None = None,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    r"""Multi-similarity loss: soft weighting of every positive and negative pair of an anchor.

    With cosine similarities :math:`S_{ik}` of the L2-normalised embeddings,

    .. math::

        \ell_i = \frac{1}{\alpha} \log\Bigl(1 + \sum_{k \in \mathcal P_i}
                 e^{-\alpha (S_{ik} - \lambda)}\Bigr)
               + \frac{1}{\beta} \log\Bigl(1 + \sum_{k \in \mathcal N_i}
                 e^{\beta (S_{ik} - \lambda)}\Bigr), \qquad
        \mathcal L = \frac1B \sum_{i=1}^{B} \ell_i

    From Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General Pair Weighting
    for Deep Metric Learning", CVPR 2019 (their Eq. 15).  The paper's method is this loss on
    the pairs kept by its mining step, :func:`marginloss.miners.multi_similarity_miner`:
    pass the miner's output as ``indices_tuple`` (see the example).

    What :math:`\mathcal P_i` and :math:`\mathcal N_i` are and what ``"mean"`` averages over:

    - without ``indices_tuple``: every other sample of the anchor's class, every sample of
      another class;
    - with ``indices_tuple`` (pairs or triplets, as in :func:`contrastive_loss`): the given
      pairs ``(i, k)`` with :math:`i` as the anchor.

    The mean is over all :math:`B` anchors (the paper's :math:`\frac1m`); an anchor with
    no pair in a set gets 0 for that term (:math:`\log 1`), never NaN.  ``"none"`` returns
    :math:`\ell_i` for every anchor, ``[B]``.  The log-sum-exp is computed stably, with
    the :math:`1` as an extra term.  Computed in at least ``float32``.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite (normalised inside).
    labels : Tensor
        ``[B]`` integer labels.
    indices_tuple : tuple of Tensor, optional
        Mined pairs or triplets (e.g. from :func:`~marginloss.miners.multi_similarity_miner`).
    alpha : float, default 2.0
        Positive-pair scale :math:`\alpha > 0` (the paper's value).
    beta : float, default 50.0
        Negative-pair scale :math:`\beta > 0` (the paper's value).
    base : float, default 0.5
        Similarity offset :math:`\lambda` (``thresh = 0.5`` in the authors' release,
        also pytorch-metric-learning's default).
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Returns
    -------
    Tensor
        Scalar, or ``[B]`` for ``"none"``; at least ``float32``.

    Raises
    ------
    TypeError
        If a tensor has the wrong type or dtype, or a hyperparameter is not a real number.
    ValueError
        If shapes do not match, ``embeddings`` is not finite, an index is outside
        ``[0, B)``, ``alpha`` or ``beta`` is not positive, ``base`` is not finite, or
        ``reduction`` is unknown.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(B)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss.losses import multi_similarity_loss
    >>> from marginloss.miners import multi_similarity_miner, pairwise_distance
    >>> _ = torch.manual_seed(0)
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    >>> similarity = 1 - pairwise_distance(embeddings.detach(), "cosine")
    >>> pairs = multi_similarity_miner(similarity, labels, epsilon=0.1)  # the paper's mining
    >>> loss = multi_similarity_loss(embeddings, labels, pairs)  # ... and weighting
    >>> loss.backward()
    >>> # one anchor, one positive at S = 1: (1/2) log(1 + e^{-2 (1 - 0.5)})
    >>> single = multi_similarity_loss(torch.tensor([[1.0, 0], [2.0, 0]]), torch.tensor([0, 0]))
    >>> round(single.item(), 4)
    0.1566
    """
    alpha, beta, base, reduction = _check_ms_args(alpha, beta, base, reduction)
    embeddings, labels = _check_embeddings_labels(embeddings, labels)
    pairs = _check_pair_indices(indices_tuple, embeddings)
    return _multi_similarity_loss(embeddings, labels, pairs, alpha, beta, base, reduction)


def _check_ms_args(
    alpha: object, beta: object, base: object, reduction: object
) -> tuple[float, float, float, str]:
    alpha = check_float("alpha", alpha, low=0.0, low_open=True)
    beta = check_float("beta", beta, low=0.0, low_open=True)
    base = check_float("base", base)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    return alpha, beta, base, reduction


def _log1p_sum_exp(exponent: Tensor, mask: Tensor) -> Tensor:
    """``log(1 + sum_{k in mask} exp(exponent_k))`` per row, stable, 0 for an empty row."""
    kept = torch.where(mask, exponent, -torch.inf)
    one = torch.zeros(kept.shape[0], 1, dtype=kept.dtype, device=kept.device)
    return torch.logsumexp(torch.cat([one, kept], dim=1), dim=1)


def _multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    pairs: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    alpha: float,
    beta: float,
    base: float,
    reduction: str,
) -> Tensor:
    batch = embeddings.shape[0]
    with _autocast_disabled(embeddings.device):
        unit = _unit_rows(_at_least_float32(embeddings))
        similarity = unit @ unit.T
        if pairs is None:
            positive_mask, negative_mask = _pair_masks(labels)
        else:
            positive_mask, negative_mask = _pair_index_masks(pairs, batch, similarity.device)
        positive_term = _log1p_sum_exp(-alpha * (similarity - base), positive_mask) / alpha
        negative_term = _log1p_sum_exp(beta * (similarity - base), negative_mask) / beta
        return _reduce(positive_term + negative_term, reduction)


class MultiSimilarityLoss(nn.Module):
    r"""Multi-similarity loss over the pairs of a batch (or mined pairs).

    .. math::

        \mathcal L = \frac1B \sum_{i=1}^{B} \Bigl[
        \frac{1}{\alpha} \log\bigl(1 + \textstyle\sum_{k \in \mathcal P_i}
        e^{-\alpha (S_{ik} - \lambda)}\bigr)
        + \frac{1}{\beta} \log\bigl(1 + \textstyle\sum_{k \in \mathcal N_i}
        e^{\beta (S_{ik} - \lambda)}\bigr) \Bigr]

    From Wang et al., CVPR 2019; see :func:`multi_similarity_loss`.  Pair it with
    :func:`marginloss.miners.multi_similarity_miner` for the paper's full method.  No
    parameters.

    Parameters
    ----------
    alpha : float, default 2.0
        :math:`\alpha > 0` (the paper's value).
    beta : float, default 50.0
        :math:`\beta > 0` (the paper's value).
    base : float, default 0.5
        :math:`\lambda` (the authors' release).
    reduction : str, default "mean"
        ``"mean"`` (over the :math:`B` anchors), ``"sum"`` or ``"none"``.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(B)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss import losses
    >>> _ = torch.manual_seed(0)
    >>> criterion = losses.MultiSimilarityLoss()
    >>> criterion
    MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5, reduction='mean')
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> criterion(embeddings, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    """

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.base, self.reduction = _check_ms_args(
            alpha, beta, base, reduction
        )

    def forward(
        self, embeddings: Tensor, labels: Tensor, indices_tuple: Sequence[Tensor] | None = None
    ) -> Tensor:
        """Multi-similarity loss of the batch (see :func:`multi_similarity_loss`)."""
        embeddings, labels = _check_embeddings_labels(embeddings, labels)
        pairs = _check_pair_indices(indices_tuple, embeddings)
        return _multi_similarity_loss(
            embeddings, labels, pairs, self.alpha, self.beta, self.base, self.reduction
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, base={self.base}, "
            f"reduction={self.reduction!r}"
        )
