"""Range loss (Zhang, Fang, Wen, Li & Qiao, ICCV 2017): :func:`range_loss`, :class:`RangeLoss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginloss._validation import check_float, check_positive_int
from marginloss.losses._common import _check_embeddings_labels
from marginloss.miners import _at_least_float32, _autocast_disabled, _pairwise_distance

__all__ = ["RangeLoss", "range_loss"]


def range_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    k: int = 2,
    margin: float,
    alpha: float,
    beta: float,
) -> Tensor:
    r"""Range loss: the k largest intra-class ranges plus a margin on the closest class centres.

    For each class :math:`c` of the batch with :math:`D_{c,1} \ge D_{c,2} \ge \dots` its
    pairwise squared distances, and :math:`\bar x_c` its mean embedding in the batch,

    .. math::

        \mathcal L_\text{intra} = \sum_{c} \frac{k_c}{\sum_{t=1}^{k_c} 1 / D_{c,t}},
        \qquad
        \mathcal L_\text{inter} = \max\Bigl(0,\; m - \min_{c \ne c'}
        \lVert \bar x_c - \bar x_{c'} \rVert_2^2\Bigr),
        \qquad
        \mathcal L = \alpha\, \mathcal L_\text{intra} + \beta\, \mathcal L_\text{inter}

    From Zhang, Fang, Wen, Li & Qiao, "Range Loss for Deep Face Recognition with
    Long-Tailed Training Data", ICCV 2017: the intra-class term is the harmonic mean of the
    :math:`k` largest ranges (distances between two samples of a class), summed over the
    classes of the batch; the inter-class term pushes the two closest class centres of the
    batch at least :math:`m` apart.  Distances are squared Euclidean, as in the paper.  The
    paper uses it jointly with softmax.

    Exactly what is computed: :math:`k_c = \min(k, n_c(n_c - 1)/2)` for a class with
    :math:`n_c` samples in the batch (all its pairs when it has fewer than :math:`k`);
    classes with one sample add nothing to :math:`\mathcal L_\text{intra}` but their
    centres count in :math:`\mathcal L_\text{inter}`; a batch of fewer than two classes has
    :math:`\mathcal L_\text{inter} = 0`.  A class whose chosen ranges include a zero
    (coincident samples) contributes 0 (the limit of the harmonic mean), with gradient 0.
    The result is the batch's scalar loss, the paper's sum over classes (no reduction
    argument).  The ranges come from the :math:`[B, B]` distance matrix through a per-row
    top-:math:`k` (:math:`O(Bk)` candidates per class, never a :math:`[P, B, B]` tensor).
    Computed in at least ``float32``.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite.
    labels : Tensor
        ``[B]`` integer labels.
    k : int, default 2
        Number of largest ranges per class (the paper's :math:`k = 2`).
    margin : float
        :math:`m \ge 0`, in squared embedding units; no default, as the paper's value is
        tied to the scale of its features.
    alpha : float
        Weight :math:`\alpha \ge 0` of the intra-class term (no default, as ``margin``).
    beta : float
        Weight :math:`\beta \ge 0` of the inter-class term.

    Returns
    -------
    Tensor
        Scalar, at least ``float32``.

    Raises
    ------
    TypeError
        If a tensor has the wrong type or dtype, or a hyperparameter is not a real number.
    ValueError
        If shapes do not match, ``embeddings`` is not finite, ``k`` is not a positive int,
        or ``margin``, ``alpha`` or ``beta`` is negative.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`

    Examples
    --------
    >>> import torch
    >>> from marginloss.losses import range_loss
    >>> embeddings = torch.tensor([[0.0], [1.0], [3.0], [10.0], [12.0]], requires_grad=True)
    >>> labels = torch.tensor([0, 0, 0, 1, 1])
    >>> # class 0 ranges 9, 4, 1: harmonic mean of the two largest 2 / (1/9 + 1/4) = 72/13;
    >>> # class 1: its one range, 4; centres 4/3 and 11: inter = max(0, 100 - 93.44) = 6.56
    >>> loss = range_loss(embeddings, labels, margin=100.0, alpha=1.0, beta=1.0)
    >>> round(loss.item(), 3) == round(72 / 13 + 4 + 100 - (11 - 4 / 3) ** 2, 3)
    True
    >>> loss.backward()
    """
    k, margin, alpha, beta = _check_range_args(k, margin, alpha, beta)
    embeddings, labels = _check_embeddings_labels(embeddings, labels)
    return _range_loss(embeddings, labels, k, margin, alpha, beta)


def _check_range_args(
    k: object, margin: object, alpha: object, beta: object
) -> tuple[int, float, float, float]:
    k = check_positive_int("k", k)
    margin = check_float("margin", margin, low=0.0)
    alpha = check_float("alpha", alpha, low=0.0)
    beta = check_float("beta", beta, low=0.0)
    return k, margin, alpha, beta


def _range_loss(
    embeddings: Tensor, labels: Tensor, k: int, margin: float, alpha: float, beta: float
) -> Tensor:
    batch = embeddings.shape[0]
    with _autocast_disabled(embeddings.device):
        values = _at_least_float32(embeddings)
        zero = values.sum() * 0
        if batch == 0:
            return zero
        dist = _pairwise_distance(values, "squared_euclidean")
        classes, class_of = torch.unique(labels, return_inverse=True)
        num_classes = classes.shape[0]
        same = labels[:, None] == labels[None, :]
        upper = torch.triu(same, diagonal=1)
        # The k largest ranges of a class are among the k largest of its rows (each pair
        # (a, b), a < b, sits in row a), so a per-row top-k then a per-class top-k over
        # those B*k candidates finds them without a [P, B, B] tensor.
        width = min(k, batch)
        row_values = dist.masked_fill(~upper, -torch.inf).topk(width, dim=1).values  # [B, k]
        member = class_of[None, :] == torch.arange(num_classes, device=values.device)[:, None]
        candidates = torch.where(member[:, :, None], row_values[None], -torch.inf)
        ranges = candidates.reshape(num_classes, -1).topk(min(width, batch * width), dim=1).values
        present = ranges > -torch.inf  # [P, k]; +inf (an overflowed range) is present
        positive = present & (ranges > 0)
        has_zero = (present & (ranges == 0)).any(dim=1)
        inverse = torch.where(positive, 1.0 / torch.where(positive, ranges, 1.0), 0.0)
        count = present.sum(dim=1)
        usable = (count > 0) & ~has_zero
        harmonic = count / torch.where(usable, inverse.sum(dim=1), 1.0)
        intra = torch.where(usable, harmonic, 0.0).sum()

        counts = member.sum(dim=1, keepdim=True).to(values.dtype)
        centres = (member.to(values.dtype) @ values) / counts
        if num_classes < 2:
            inter = zero
        else:
            centre_dist = _pairwise_distance(centres, "squared_euclidean")
            eye = torch.eye(num_classes, dtype=torch.bool, device=values.device)
            closest = centre_dist.masked_fill(eye, torch.inf).amin()
            inter = F.relu(margin - closest)
        return alpha * intra + beta * inter + zero


class RangeLoss(nn.Module):
    r"""Range loss over the classes of a batch.

    .. math::

        \mathcal L = \alpha \sum_c \frac{k_c}{\sum_{t=1}^{k_c} 1/D_{c,t}}
                   + \beta \max\Bigl(0,\; m - \min_{c \ne c'} \lVert \bar x_c - \bar x_{c'}\rVert_2^2\Bigr)

    From Zhang, Fang, Wen, Li & Qiao, ICCV 2017; see :func:`range_loss` for exactly what is
    summed.  No parameters.

    Parameters
    ----------
    k : int, default 2
        Largest ranges per class (the paper's value).
    margin : float
        :math:`m \ge 0` (required).
    alpha : float
        Intra-class weight (required).
    beta : float
        Inter-class weight (required).

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`

    Examples
    --------
    >>> import torch
    >>> from marginloss import losses
    >>> _ = torch.manual_seed(0)
    >>> criterion = losses.RangeLoss(margin=2.0, alpha=0.5, beta=0.5)
    >>> criterion
    RangeLoss(k=2, margin=2.0, alpha=0.5, beta=0.5)
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> criterion(embeddings, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    """

    def __init__(self, *, k: int = 2, margin: float, alpha: float, beta: float) -> None:
        super().__init__()
        self.k, self.margin, self.alpha, self.beta = _check_range_args(k, margin, alpha, beta)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Range loss of the batch (see :func:`range_loss`)."""
        embeddings, labels = _check_embeddings_labels(embeddings, labels)
        return _range_loss(embeddings, labels, self.k, self.margin, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"k={self.k}, margin={self.margin}, alpha={self.alpha}, beta={self.beta}"
