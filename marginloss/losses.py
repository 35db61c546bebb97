"""Metric-learning losses on embeddings: center loss and triplet loss.

Each loss is a pure function (:func:`center_loss`, :func:`triplet_loss`) plus a thin module
(:class:`CenterLoss`, :class:`TripletLoss`) holding hyperparameters and, for the center loss,
the class centers.  Both compute in at least ``float32``, also under autocast.
"""

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
    check_positive_int,
    check_same_device,
)
from marginloss.miners import (
    DISTANCES,
    _at_least_float32,
    _autocast_disabled,
    _batch_all_mask,
    _batch_hard_selection,
    _pairwise_distance,
    _semi_hard_selection,
)

__all__ = ["CenterLoss", "TripletLoss", "center_loss", "triplet_loss"]

REDUCTIONS = ("mean", "sum", "none")
MININGS = ("batch_hard", "batch_all", "semi_hard")


# ---------------------------------------------------------------- center loss


def center_loss(
    embeddings: Tensor, labels: Tensor, centers: Tensor, *, reduction: str = "mean"
) -> Tensor:
    r"""Center loss: half the squared distance of each embedding to its class center.

    .. math::

        \ell_i = \tfrac12 \lVert x_i - c_{y_i} \rVert_2^2, \qquad
        \mathcal{L}_\text{mean} = \frac{1}{B} \sum_{i=1}^{B} \ell_i

    From Wen, Zhang, Li & Qiao, "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016.  ``reduction="mean"`` is the mean over the samples of the half
    squared distance (the paper's sum divided by the batch size); ``"sum"`` is the paper's
    :math:`\tfrac12 \sum_i \lVert x_i - c_{y_i} \rVert^2`; ``"none"`` returns every
    :math:`\ell_i`.  An empty batch gives 0 for ``"mean"`` and ``"sum"``.  The gradient flows
    into ``embeddings`` and, if it requires grad, into ``centers`` (Wen et al.'s alternative
    center update lives in :class:`CenterLoss`).  Computed in at least ``float32``, also under
    autocast.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite.
    labels : Tensor
        ``[B]`` integer class indices in ``[0, C)``.
    centers : Tensor
        ``[C, D]`` floating-point class centers.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``, as in :func:`torch.nn.functional.mse_loss`.

    Returns
    -------
    Tensor
        Scalar for ``"mean"``/``"sum"``, ``[B]`` for ``"none"``; dtype is the promoted dtype of
        ``embeddings`` and ``centers``, at least ``float32``.

    Raises
    ------
    TypeError
        If ``embeddings`` or ``centers`` is not a floating-point tensor or ``labels`` not an
        integer tensor.
    ValueError
        If shapes do not match, ``embeddings`` is not finite, a label is outside ``[0, C)``,
        the tensors are on different devices, or ``reduction`` is unknown.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - centers: :math:`(C, D)`
        - output: :math:`()`, or :math:`(B)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss.losses import center_loss
    >>> centers = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    >>> embeddings = torch.tensor([[3.0, 4.0], [1.0, 2.0]], requires_grad=True)
    >>> labels = torch.tensor([0, 1])
    >>> center_loss(embeddings, labels, centers, reduction="none")  # 25 / 2 and 1 / 2
    tensor([12.5000,  0.5000], grad_fn=<MulBackward0>)
    >>> loss = center_loss(embeddings, labels, centers)  # (12.5 + 0.5) / 2
    >>> loss.backward()
    >>> embeddings.grad  # (x_i - c_{y_i}) / B
    tensor([[1.5000, 2.0000],
            [0.0000, 0.5000]])
    """
    centers = _check_centers(centers)
    embeddings, labels = _check_center_inputs(embeddings, labels, centers)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    return _center_loss(embeddings, labels, centers, reduction)


def _check_centers(centers: object) -> Tensor:
    if not isinstance(centers, Tensor):
        raise TypeError(f"centers must be a torch.Tensor, got {type(centers).__name__}")
    if centers.dim() != 2:
        raise ValueError(
            f"centers must have shape [num_classes, embedding_dim], got shape {tuple(centers.shape)}"
        )
    if not centers.is_floating_point():
        raise TypeError(f"centers must be a floating-point tensor, got dtype {centers.dtype}")
    return centers


def _check_center_inputs(
    embeddings: object, labels: object, centers: Tensor
) -> tuple[Tensor, Tensor]:
    num_classes, embedding_dim = centers.shape
    checked = check_embeddings(embeddings, embedding_dim=embedding_dim)
    checked_labels = check_labels(labels, checked.shape[0], num_classes=num_classes)
    check_same_device(embeddings=checked, labels=checked_labels, centers=centers)
    return checked, checked_labels


def _center_loss(embeddings: Tensor, labels: Tensor, centers: Tensor, reduction: str) -> Tensor:
    dtype = torch.promote_types(_at_least_float32(embeddings).dtype, centers.dtype)
    with _autocast_disabled(embeddings.device):
        diff = embeddings.to(dtype) - centers[labels].to(dtype)
        per_sample = 0.5 * diff.pow(2).sum(dim=1)
        return _reduce(per_sample, reduction)


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / max(losses.shape[0], 1)


@torch.no_grad()
def _update_centers_(centers: Tensor, embeddings: Tensor, labels: Tensor, alpha: float) -> None:
    """Wen et al.'s center step, in place: c_j -= alpha * sum_{y_i=j}(c_j - x_i) / (1 + n_j).

    Spread over samples: sample i adds -alpha (c_j - x_i) / (1 + n_j) to row j, so one
    index_add_ does every class at once (no loop over classes, no host sync; bincount would
    sync on CUDA to size its output).
    """
    num_classes = centers.shape[0]
    samples = embeddings.detach().to(centers.dtype)
    counts = torch.zeros(num_classes, dtype=centers.dtype, device=centers.device)
    counts.index_add_(0, labels, torch.ones_like(labels, dtype=centers.dtype))
    step = (centers[labels] - samples) / (1.0 + counts[labels]).unsqueeze(1)
    centers.index_add_(0, labels, step, alpha=-alpha)


class CenterLoss(nn.Module):
    r"""Center loss with learned or moving-average class centers.

    .. math::

        \mathcal{L} = \frac{1}{B} \sum_{i=1}^{B} \tfrac12 \lVert x_i - c_{y_i} \rVert_2^2

    From Wen, Zhang, Li & Qiao, "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016; see :func:`center_loss` for the loss and its reductions.  The
    centers are held ``[num_classes, embedding_dim]`` and updated in one of two ways:

    - ``alpha=None``: ``centers`` is an :class:`~torch.nn.Parameter` learned by the optimizer
      from the gradient of the loss.
    - ``alpha`` in ``(0, 1]``: ``centers`` is a buffer that gets no gradient and, after the
      loss is computed and only in training mode, takes the paper's step (their Eq. 4)

      .. math::

          \Delta c_j = \frac{\sum_{i:\, y_i = j} (c_j - x_i)}{1 + n_j}, \qquad
          c_j \leftarrow c_j - \alpha\, \Delta c_j

      where :math:`n_j` is the number of samples of class :math:`j` in the batch (classes
      absent from the batch do not move).  The step is vectorised (``index_add_``, no host
      synchronisation); on CUDA its float atomics make it non-deterministic in the last bits.

    The embeddings always receive the gradient of the loss and are never modified.

    Parameters
    ----------
    embedding_dim : int
        Size :math:`D` of each embedding.
    num_classes : int
        Number of classes :math:`C`.
    alpha : float or None, default None
        Center learning rate of the paper's update, in ``(0, 1]`` (the paper uses 0.5);
        ``None`` learns the centers by gradient instead.
    reduction : str, default "mean"
        ``"mean"`` (mean over samples of the half squared distance), ``"sum"`` or ``"none"``.
    device, dtype : optional
        Factory arguments for ``centers``, as in :class:`torch.nn.Linear`.

    Attributes
    ----------
    centers : Tensor
        ``[num_classes, embedding_dim]``, initialised from the standard normal
        :math:`\mathcal{N}(0, 1)` (see :meth:`reset_parameters`); a parameter or a buffer as
        described above, saved in the ``state_dict`` either way.

    Raises
    ------
    ValueError
        If ``embedding_dim`` or ``num_classes`` is not a positive int, ``alpha`` is outside
        ``(0, 1]``, or ``reduction`` is unknown.
    TypeError
        If ``alpha`` is not a real number or ``None``, or ``dtype`` is not floating point.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`, integers in :math:`[0, C)`
        - output: :math:`()`, or :math:`(B)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss import losses
    >>> _ = torch.manual_seed(0)
    >>> criterion = losses.CenterLoss(embedding_dim=4, num_classes=3, alpha=0.5)
    >>> criterion
    CenterLoss(embedding_dim=4, num_classes=3, alpha=0.5, reduction='mean')
    >>> embeddings = torch.randn(6, 4, requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
    >>> before = criterion.centers.clone()
    >>> loss = criterion(embeddings, labels)  # also moves the centers towards the batch
    >>> loss.backward()
    >>> bool((criterion.centers != before).all()), embeddings.grad.shape
    (True, torch.Size([6, 4]))
    >>> learned = losses.CenterLoss(4, 3)  # alpha=None: centers are a Parameter
    >>> [name for name, _ in learned.named_parameters()]
    ['centers']
    """

    centers: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        alpha: float | None = None,
        reduction: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.alpha = (
            None if alpha is None else check_float("alpha", alpha, low=0.0, high=1.0, low_open=True)
        )
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        centers = torch.empty(num_classes, embedding_dim, device=device, dtype=dtype)
        if self.alpha is None:
            self.centers = nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the centers again from the standard normal :math:`\\mathcal{N}(0, 1)`."""
        with torch.no_grad():
            self.centers.normal_()

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Loss of ``embeddings`` against their class centers (see :func:`center_loss`).

        With ``alpha`` set and in training mode, the centers take one update step after the
        loss is computed; the returned loss uses the centers from before the step.
        """
        embeddings, labels = _check_center_inputs(embeddings, labels, self.centers)
        loss = _center_loss(embeddings, labels, self.centers, self.reduction)
        if self.alpha is not None and self.training:
            _update_centers_(self.centers, embeddings, labels, self.alpha)
        return loss

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"alpha={self.alpha}, reduction={self.reduction!r}"
        )


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
        dist = _pairwise_distance(_at_least_float32(embeddings), distance)

        def score(ap: Tensor, an: Tensor) -> Tensor:
            return F.softplus(ap - an) if soft else F.relu(ap - an + margin)

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
            negative_idx, valid = _semi_hard_selection(dist, labels, margin)
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
