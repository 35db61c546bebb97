"""Triplet loss (FaceNet; Hermans et al. 2017): :func:`triplet_loss` and :class:`TripletLoss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginloss._validation import (
    _check_values,
    check_choice,
    check_embeddings,
    check_float,
    check_labels,
    check_same_device,
)
from marginloss.losses._common import REDUCTIONS, _reduce
from marginloss.miners import (
    DISTANCES,
    _at_least_float32,
    _autocast_disabled,
    _batch_all_mask,
    _batch_hard_selection,
    _scaled_pairwise_distance,
    _semi_hard_selection,
    _unscale,
)

__all__ = ["TripletLoss", "triplet_loss"]

MININGS = ("batch_hard", "batch_all", "semi_hard")

# ---------------------------------------------------------------- triplet loss


def triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices_tuple: Sequence[Tensor] | None = None,
    *,
    margin: float = 0.3,
    mining: str = "batch_hard",
    distance: str = "euclidean",
    soft: bool = False,
    reduction: str = "mean",
) -> Tensor:
    r"""Triplet loss over triplets mined in the batch (or given as indices).

    For a triplet :math:`(a, p, n)` with distances :math:`D` from
    :func:`marginloss.miners.pairwise_distance`,

    .. math::

        \ell_{apn} = \max(0,\; D_{ap} - D_{an} + \text{margin})
        \quad\text{or, with soft=True,}\quad
        \ell_{apn} = \log\bigl(1 + e^{D_{ap} - D_{an}}\bigr)

    Hinge loss from Schroff, Kalenichenko & Philbin, "FaceNet", CVPR 2015; the soft margin
    and the batch-hard / batch-all mining from Hermans, Beyer & Leibe, "In Defense of the
    Triplet Loss for Person Re-Identification", arXiv:1703.07737, 2017.

    What each ``mining`` uses and what ``reduction="mean"`` averages over:

    - ``"batch_hard"`` (:func:`~marginloss.miners.batch_hard`): one triplet per anchor that
      has at least one positive and one negative (farthest positive, closest negative); the
      mean runs over those anchors, zero-loss ones included (Hermans et al.'s "BH").
    - ``"batch_all"`` (:func:`~marginloss.miners.batch_all`): every valid triplet; the mean
      runs over the triplets with a positive loss only (Hermans et al.'s "BA≠0", also
      pytorch-metric-learning's default ``AvgNonZeroReducer``), so easy triplets do not dilute
      the gradient.  With ``soft=True`` every loss is positive and the mean runs over all valid
      triplets.  Memory is :math:`O(B^3)`.
    - ``"semi_hard"`` (:func:`~marginloss.miners.semi_hard`): one triplet per positive pair
      that has a semi-hard (or, as fallback, hard) negative; the mean runs over those, which
      all have a positive hinge loss.
    - ``indices_tuple`` given: exactly those triplets (``mining`` is ignored); the mean runs
      over all of them.

    ``"sum"`` sums over the same triplets; ``"none"`` returns the loss of every selected
    triplet (zero-loss ones included) in the order the miner returns them.  With no triplet
    to score, ``"mean"`` and ``"sum"`` return 0 attached to the graph (zero gradient, never
    NaN) and ``"none"`` an empty tensor.  Without ``indices_tuple`` and with
    ``reduction != "none"`` the loss needs no host synchronisation (the selection is done
    with fixed-shape masks).  Computed in at least ``float32``, also under autocast.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite.
    labels : Tensor
        ``[B]`` integer labels (any values; equal values mean the same class).
    indices_tuple : tuple of Tensor, optional
        ``(anchor, positive, negative)`` 1-D integer index tensors of equal length, e.g. a
        miner's output; when given, these triplets are scored instead of mining.
    margin : float, default 0.3
        Hinge margin in the units of ``distance``, ``>= 0`` (``> 0`` for
        ``mining="semi_hard"``, where it is also the width of the semi-hard window).  Ignored
        by the soft loss except as that window.  0.3 is Hermans et al.'s margin for
        Euclidean distances of unnormalised embeddings.
    mining : str, default "batch_hard"
        ``"batch_hard"``, ``"batch_all"`` or ``"semi_hard"``; batch hard is Hermans et al.'s
        recommendation.
    distance : str, default "euclidean"
        ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"`` (``1 - cos``).
    soft : bool, default False
        Use the soft-margin loss :math:`\log(1 + e^{D_{ap} - D_{an}})` instead of the hinge.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``, as described above.

    Returns
    -------
    Tensor
        Scalar for ``"mean"``/``"sum"``, ``[T]`` for ``"none"``; ``float32`` or ``float64``.

    Raises
    ------
    TypeError
        If a tensor has the wrong type or dtype, ``indices_tuple`` is not a tuple/list,
        ``margin`` is not a real number, or ``soft`` is not a bool.
    ValueError
        If shapes do not match, ``embeddings`` is not finite, an index is outside
        ``[0, B)``, ``margin`` is out of range, or ``mining``, ``distance`` or ``reduction``
        is unknown.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - indices_tuple: three tensors of shape :math:`(T)`
        - output: :math:`()`, or :math:`(T)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss.losses import triplet_loss
    >>> embeddings = torch.tensor([[0.0], [1.0], [3.0], [4.0]], requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> # batch hard: D_ap = 1 for every anchor; the closest negative is at 3 for the outer
    >>> # anchors 0 and 3 (loss 0) and at 2 for the inner ones: max(0, 1 - 2 + 1.5) = 0.5
    >>> triplet_loss(embeddings, labels, margin=1.5, reduction="none")
    tensor([0.0000, 0.5000, 0.5000, 0.0000], grad_fn=<IndexBackward0>)
    >>> # batch all: 8 valid triplets, only (1, 0, 2) and (2, 3, 1) have a positive loss
    >>> loss = triplet_loss(embeddings, labels, margin=1.5, mining="batch_all")
    >>> loss  # mean over those 2, not over all 8
    tensor(0.5000, grad_fn=<DivBackward0>)
    >>> loss.backward()
    >>> embeddings.grad.flatten()  # pulls 1 towards 0 and 2 towards 3, pushes 1 and 2 apart
    tensor([-0.5000,  1.5000, -1.5000,  0.5000])
    """
    margin, mining, distance, soft, reduction = _check_triplet_args(
        margin, mining, distance, soft, reduction
    )
    embeddings, labels, indices = _check_triplet_inputs(embeddings, labels, indices_tuple)
    return _triplet_loss(embeddings, labels, indices, margin, mining, distance, soft, reduction)


def _check_triplet_args(
    margin: object, mining: object, distance: object, soft: object, reduction: object
) -> tuple[float, str, str, bool, str]:
    mining = check_choice("mining", mining, MININGS)
    distance = check_choice("distance", distance, DISTANCES)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    if mining == "semi_hard":
        margin = check_float("margin (with mining='semi_hard')", margin, low=0.0, low_open=True)
    else:
        margin = check_float("margin", margin, low=0.0)
    if not isinstance(soft, bool):
        raise TypeError(f"soft must be a bool, got {type(soft).__name__} {soft!r}")
    return margin, mining, distance, soft, reduction


def _check_triplet_inputs(
    embeddings: object, labels: object, indices_tuple: object
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    checked = check_embeddings(embeddings)
    batch = checked.shape[0]
    checked_labels = check_labels(labels, batch)
    check_same_device(embeddings=checked, labels=checked_labels)
    if indices_tuple is None:
        return checked, checked_labels, None
    if not isinstance(indices_tuple, (tuple, list)):
        raise TypeError(
            "indices_tuple must be a tuple (anchor, positive, negative) of index tensors or "
            f"None, got {type(indices_tuple).__name__}"
        )
    if len(indices_tuple) != 3:
        raise ValueError(
            "indices_tuple must hold 3 index tensors (anchor, positive, negative), "
            f"got {len(indices_tuple)}"
        )
    indices = []
    for role, index in zip(("anchor", "positive", "negative"), indices_tuple):
        name = f"indices_tuple ({role})"
        if not isinstance(index, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(index).__name__}")
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {index.dtype}")
        if index.dim() != 1 or index.shape[0] != indices_tuple[0].shape[0]:
            raise ValueError(
                f"{name} must be 1-D with the anchor's length {tuple(indices_tuple[0].shape)}, "
                f"got shape {tuple(index.shape)}"
            )
        check_same_device(embeddings=checked, **{role: index})
        if _check_values() and index.numel() > 0:
            outside = (index < 0) | (index >= batch)
            if bool(outside.any()):
                raise ValueError(
                    f"{name} must be in [0, {batch}) (the batch size), got "
                    f"{int(outside.sum())} value(s) outside, e.g. {index[outside][:5].tolist()}"
                )
        indices.append(index.long())
    return checked, checked_labels, (indices[0], indices[1], indices[2])


def _triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: tuple[Tensor, Tensor, Tensor] | None,
    margin: float,
    mining: str,
    distance: str,
    soft: bool,
    reduction: str,
) -> Tensor:
    with _autocast_disabled(embeddings.device):
        # dist is D / s (s a power of two near max |x|): the gap D_ap - D_an is formed on
        # these and scaled back, so it is exact or +-inf at any norm, never inf - inf.
        dist, scale = _scaled_pairwise_distance(_at_least_float32(embeddings), distance)

        def score(ap: Tensor, an: Tensor) -> Tensor:
            gap = _unscale(ap - an, scale, distance)
            return F.softplus(gap) if soft else F.relu(gap + margin)

        if indices is not None:
            anchor, positive, negative = indices
            return _reduce(score(dist[anchor, positive], dist[anchor, negative]), reduction)

        if mining == "batch_hard":
            positive_idx, negative_idx, valid = _batch_hard_selection(dist, labels)
            losses = score(
                dist.gather(1, positive_idx[:, None]).squeeze(1),
                dist.gather(1, negative_idx[:, None]).squeeze(1),
            )
        elif mining == "semi_hard":
            window = _unscale(torch.ones_like(scale), scale, distance)
            negative_idx, valid = _semi_hard_selection(dist, labels, margin / window)
            losses = score(dist, dist.gather(1, negative_idx))
        else:
            valid = _batch_all_mask(labels)
            losses = score(dist[:, :, None], dist[:, None, :])

        losses = torch.where(valid, losses, torch.zeros_like(losses))
        if reduction == "none":
            return losses[valid]
        total = losses.sum()
        if reduction == "sum":
            return total
        counted = valid & (losses > 0) if mining == "batch_all" and not soft else valid
        return total / counted.sum().clamp_min(1)


class TripletLoss(nn.Module):
    r"""Triplet loss with in-batch mining (batch hard, batch all or semi-hard).

    .. math::

        \ell_{apn} = \max(0,\; D_{ap} - D_{an} + \text{margin})
        \quad\text{or, with soft=True,}\quad
        \ell_{apn} = \log\bigl(1 + e^{D_{ap} - D_{an}}\bigr)

    From Schroff, Kalenichenko & Philbin, "FaceNet", CVPR 2015 (hinge, semi-hard mining) and
    Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person Re-Identification",
    arXiv:1703.07737, 2017 (batch hard, batch all, soft margin).  See :func:`triplet_loss` for
    the exact triplets each ``mining`` scores and what ``reduction="mean"`` averages over:
    anchors for batch hard, positive-loss triplets for batch all, selected triplets for semi
    hard, all given triplets for ``indices_tuple``.  No parameters; computed in at least
    ``float32``, also under autocast.

    Parameters
    ----------
    margin : float, default 0.3
        Hinge margin, ``>= 0`` (``> 0`` with ``mining="semi_hard"``); Hermans et al.'s value.
    mining : str, default "batch_hard"
        ``"batch_hard"``, ``"batch_all"`` or ``"semi_hard"``.
    distance : str, default "euclidean"
        ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    soft : bool, default False
        Soft-margin loss instead of the hinge.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Raises
    ------
    TypeError
        If ``margin`` is not a real number or ``soft`` not a bool.
    ValueError
        If ``margin`` is out of range or ``mining``, ``distance`` or ``reduction`` is unknown.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - indices_tuple (optional): three tensors of shape :math:`(T)`
        - output: :math:`()`, or :math:`(T)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss import losses, miners
    >>> _ = torch.manual_seed(0)
    >>> criterion = losses.TripletLoss(margin=0.2, mining="batch_all", distance="cosine")
    >>> criterion
    TripletLoss(margin=0.2, mining='batch_all', distance='cosine', soft=False, reduction='mean')
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    >>> loss = criterion(embeddings, labels)
    >>> loss.backward()
    >>> # a miner's output can be scored directly (here: batch hard on cosine distances)
    >>> dist = miners.pairwise_distance(embeddings.detach(), "cosine")
    >>> triplets = miners.batch_hard(dist, labels)
    >>> torch.allclose(criterion(embeddings, labels, triplets),
    ...                losses.triplet_loss(embeddings, labels, margin=0.2, distance="cosine"))
    True
    """

    def __init__(
        self,
        *,
        margin: float = 0.3,
        mining: str = "batch_hard",
        distance: str = "euclidean",
        soft: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.margin, self.mining, self.distance, self.soft, self.reduction = _check_triplet_args(
            margin, mining, distance, soft, reduction
        )

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Triplet loss of the batch (see :func:`triplet_loss`); ``indices_tuple`` overrides
        the mining with given ``(anchor, positive, negative)`` indices."""
        embeddings, labels, indices = _check_triplet_inputs(embeddings, labels, indices_tuple)
        return _triplet_loss(
            embeddings,
            labels,
            indices,
            self.margin,
            self.mining,
            self.distance,
            self.soft,
            self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}, "
            f"soft={self.soft}, reduction={self.reduction!r}"
        )
