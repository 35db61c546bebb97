"""Multi-class N-pair loss (Sohn, NeurIPS 2016): :func:`npair_loss`, :class:`NPairLoss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginloss._validation import check_choice, check_float
from marginloss.losses._common import REDUCTIONS, _check_embeddings_labels, _reduce
from marginloss.miners import _at_least_float32, _autocast_disabled

__all__ = ["NPairLoss", "npair_loss"]


def npair_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    l2_reg: float = 0.002,
    reduction: str = "mean",
) -> Tensor:
    r"""Multi-class N-pair loss with its embedding L2 regulariser.

    For :math:`N` pairs :math:`(f_i, f_i^+)` of :math:`N` distinct classes,

    .. math::

        \ell_i = \log\Bigl(1 + \sum_{j \ne i} e^{f_i^\top f_j^+ - f_i^\top f_i^+}\Bigr)
               + \frac{\lambda}{2}\bigl(\lVert f_i \rVert_2^2 + \lVert f_i^+ \rVert_2^2\bigr),
        \qquad \mathcal L = \frac1N \sum_{i=1}^{N} \ell_i

    From Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective",
    NeurIPS 2016 (Eq. 6, the softmax over the other pairs' positives, with the paper's L2
    regularisation of the embeddings, which keeps the unnormalised inner products from
    growing without bound).  The first term is the cross-entropy of the row
    :math:`(f_i^\top f_j^+)_j` with target :math:`i`, computed stably.

    Building the pairs from a labelled batch: for every class with at least two samples,
    its first sample in batch order is :math:`f_i` and its second is :math:`f_i^+`; further
    samples and classes with one sample are not used (the paper's batches hold exactly
    one pair per class, e.g. a P x 2 :class:`marginloss.samplers.ClassBalancedBatchSampler`).
    Pairs are ordered by label.  ``"mean"`` averages :math:`\ell_i` over the :math:`N`
    pairs, so the regulariser is :math:`\lambda` times the mean squared norm of the
    :math:`2N` embeddings used; ``"none"`` returns ``[N]``.  No pair (no class with two
    samples) gives 0 attached to the graph.  With a single pair the softmax term is 0.
    The :math:`N \times N` inner products are computed in ``float64`` (they square the
    embedding scale), then cast back: float32 embeddings of any norm give the exact loss, or
    ``inf`` when the loss itself exceeds float32's range, never NaN.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite (not normalised: the loss uses inner
        products).
    labels : Tensor
        ``[B]`` integer labels.
    l2_reg : float, default 0.002
        :math:`\lambda \ge 0`.  0.002 is the regulariser weight of the N-pair
        implementations that follow the paper (TensorFlow's ``npairs_loss``, whose term is
        :math:`\frac{\lambda}{4}(\overline{\lVert f\rVert^2} + \overline{\lVert f^+\rVert^2})`,
        half of the one here).
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Returns
    -------
    Tensor
        Scalar, or ``[N]`` for ``"none"``; at least ``float32``.

    Raises
    ------
    TypeError
        If a tensor has the wrong type or dtype, or ``l2_reg`` is not a real number.
    ValueError
        If shapes do not match, ``embeddings`` is not finite, ``l2_reg < 0``, or
        ``reduction`` is unknown.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(N)` for ``reduction="none"``

    Examples
    --------
    >>> import math, torch
    >>> from marginloss.losses import npair_loss
    >>> embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
    ...                           requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1, 1])  # pairs (0, 1) and (2, 3)
    >>> loss = npair_loss(embeddings, labels, l2_reg=0.0)
    >>> round(loss.item(), 6) == round(math.log(1 + math.exp(-1)), 6)  # f_i.f_j+ = 0, f_i.f_i+ = 1
    True
    >>> loss.backward()
    """
    l2_reg, reduction = _check_npair_args(l2_reg, reduction)
    embeddings, labels = _check_embeddings_labels(embeddings, labels)
    return _npair_loss(embeddings, labels, l2_reg, reduction)


def _check_npair_args(l2_reg: object, reduction: object) -> tuple[float, str]:
    l2_reg = check_float("l2_reg", l2_reg, low=0.0)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    return l2_reg, reduction


def _first_two_per_class(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the first and second sample of every class with two or more, by label."""
    if labels.shape[0] < 2:
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return empty, empty
    order = torch.argsort(labels, stable=True)
    ordered = labels[order]
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    first = starts.nonzero().squeeze(1)
    has_second = first + 1 < labels.shape[0]
    second = (first + 1).clamp_max(labels.shape[0] - 1)
    has_second &= ordered[second] == ordered[first]
    return order[first[has_second]], order[second[has_second]]


def _npair_loss(embeddings: Tensor, labels: Tensor, l2_reg: float, reduction: str) -> Tensor:
    with _autocast_disabled(embeddings.device):
        values = _at_least_float32(embeddings)
        anchor_idx, positive_idx = _first_two_per_class(labels)
        # Unnormalised inner products square the embedding scale: in float32 they overflow
        # above norms ~1e19 (inf - inf = NaN in the softmax).  The N x N products and the
        # N losses are taken in float64 and cast back, so a loss beyond float32's range is
        # inf, never NaN, and its gradient stays exact.
        wide = torch.promote_types(values.dtype, torch.float64)
        anchors, positives = values[anchor_idx].to(wide), values[positive_idx].to(wide)
        logits = anchors @ positives.T
        targets = torch.arange(anchors.shape[0], device=values.device)
        if anchors.shape[0]:
            losses = F.cross_entropy(logits, targets, reduction="none")
        else:
            losses = anchors.sum(dim=1)
        if l2_reg:
            losses = losses + 0.5 * l2_reg * (anchors.pow(2).sum(1) + positives.pow(2).sum(1))
        losses = losses.to(values.dtype)
        if reduction != "none" and losses.numel() == 0:
            return values.sum() * 0
        return _reduce(losses, reduction)


class NPairLoss(nn.Module):
    r"""Multi-class N-pair loss with the embedding L2 regulariser.

    .. math::

        \mathcal L = \frac1N \sum_{i=1}^{N} \Bigl[\log\bigl(1 + \textstyle\sum_{j \ne i}
        e^{f_i^\top f_j^+ - f_i^\top f_i^+}\bigr)
        + \tfrac{\lambda}{2}\bigl(\lVert f_i\rVert^2 + \lVert f_i^+\rVert^2\bigr)\Bigr]

    From Sohn, NeurIPS 2016; see :func:`npair_loss` for how the pairs are taken from the
    batch (first two samples of each class) and what ``"mean"`` averages over.  No
    parameters.

    Parameters
    ----------
    l2_reg : float, default 0.002
        :math:`\lambda \ge 0`.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - output: :math:`()`, or :math:`(N)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss import losses
    >>> _ = torch.manual_seed(0)
    >>> criterion = losses.NPairLoss()
    >>> criterion
    NPairLoss(l2_reg=0.002, reduction='mean')
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> criterion(embeddings, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    """

    def __init__(self, *, l2_reg: float = 0.002, reduction: str = "mean") -> None:
        super().__init__()
        self.l2_reg, self.reduction = _check_npair_args(l2_reg, reduction)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """N-pair loss of the batch (see :func:`npair_loss`)."""
        embeddings, labels = _check_embeddings_labels(embeddings, labels)
        return _npair_loss(embeddings, labels, self.l2_reg, self.reduction)

    def extra_repr(self) -> str:
        return f"l2_reg={self.l2_reg}, reduction={self.reduction!r}"
