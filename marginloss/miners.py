"""Triplet selection on a pairwise distance matrix: batch-hard, batch-all and semi-hard.

Every miner takes a ``[B, B]`` distance matrix (see :func:`pairwise_distance`) and the
``[B]`` labels of the batch, and returns an ``(anchor, positive, negative)`` tuple of
``int64`` index tensors of equal length, one entry per selected triplet.  The tuple can be
passed to :class:`marginloss.TripletLoss` as ``indices_tuple`` (or to any loss that takes
triplet indices, such as pytorch-metric-learning's).  A *positive* of anchor ``a`` is any
other sample with the same label, a *negative* any sample with a different label.

The selection itself is vectorised over the whole matrix (no Python loop over the batch);
only the final step that keeps the valid rows has a data-dependent output size.
:class:`marginloss.TripletLoss` uses the same selection with static shapes and masks, so the
loss itself needs neither a host synchronisation nor a data-dependent shape.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from marginloss._validation import (
    _check_values,
    check_choice,
    check_embeddings,
    check_float,
    check_labels,
    check_same_device,
)

__all__ = ["batch_all", "batch_hard", "multi_similarity_miner", "pairwise_distance", "semi_hard"]

DISTANCES = ("euclidean", "squared_euclidean", "cosine")


# ---------------------------------------------------------------- distances


def pairwise_distance(embeddings: Tensor, distance: str = "euclidean") -> Tensor:
    r"""Matrix of distances between every pair of embeddings in a batch.

    .. math::

        D_{ij} =
        \begin{cases}
        \lVert x_i - x_j \rVert_2 & \texttt{"euclidean"} \\
        \lVert x_i - x_j \rVert_2^2 & \texttt{"squared_euclidean"} \\
        1 - \dfrac{x_i^\top x_j}{\lVert x_i \rVert_2 \, \lVert x_j \rVert_2} & \texttt{"cosine"}
        \end{cases}

    The Euclidean forms use the Gram expansion
    :math:`\lVert x_i\rVert^2 + \lVert x_j\rVert^2 - 2 x_i^\top x_j` on mean-centred embeddings
    (distances are translation invariant, and centring shrinks the cancellation error),
    clamped at 0, on the embeddings divided by a power of two near their largest entry and
    scaled back (exact in any precision), so float32 norms from 1e-30 to 1e30 give the right
    distances instead of overflowing or underflowing squares; a squared distance beyond
    float32's range is ``inf``.  Cosine distances normalise each row after the same
    scaling.  ``"euclidean"`` takes a safe square root whose gradient at zero distance
    is 0 instead of infinite.  The diagonal is exactly 0 for every distance.  The cosine
    distance is clamped to ``[0, 2]``; a zero embedding has cosine distance 1 to every other
    embedding (it stays the zero vector, with a zero gradient).  Half-precision inputs and inputs
    under autocast are computed in ``float32``.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite.
    distance : str, default "euclidean"
        One of ``"euclidean"``, ``"squared_euclidean"``, ``"cosine"``.  The default follows
        Hermans et al. (2017), who found the non-squared Euclidean distance more stable for
        the triplet loss.

    Returns
    -------
    Tensor
        ``[B, B]`` symmetric, non-negative distances with a zero diagonal, in the input dtype
        (``float32`` for ``float16``/``bfloat16`` input).

    Raises
    ------
    TypeError
        If ``embeddings`` is not a floating-point tensor.
    ValueError
        If ``embeddings`` is not 2-D or not finite, or ``distance`` is not a known name.

    Shape:
        - embeddings: :math:`(B, D)`
        - output: :math:`(B, B)`

    Examples
    --------
    >>> import torch
    >>> from marginloss.miners import pairwise_distance
    >>> embeddings = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    >>> pairwise_distance(embeddings)  # plain Euclidean distances
    tensor([[0.0000, 5.0000, 1.0000],
            [5.0000, 0.0000, 4.2426],
            [1.0000, 4.2426, 0.0000]])
    >>> pairwise_distance(embeddings, "cosine")[1, 2]  # 1 - cos, with cos = 4 / 5
    tensor(0.2000)
    """
    embeddings = check_embeddings(embeddings)
    distance = check_choice("distance", distance, DISTANCES)
    with _autocast_disabled(embeddings.device):
        return _pairwise_distance(_at_least_float32(embeddings), distance)


def _pairwise_distance(embeddings: Tensor, distance: str) -> Tensor:
    batch = embeddings.shape[0]
    diagonal = torch.eye(batch, dtype=torch.bool, device=embeddings.device)
    if distance == "cosine":
        unit = _unit_rows(embeddings)
        dist = (1.0 - unit @ unit.T).clamp(0.0, 2.0)
        return dist.masked_fill(diagonal, 0.0)
    # Distances are homogeneous (D(x / s) = D(x) / s), so dividing by a power of two s near
    # the largest |x| keeps every square in range: without it, norms above ~1e19 overflow
    # and norms below ~1e-19 underflow to 0 in float32 (0.1 gave loss 0 at norm 1e20).
    # s is a constant (no gradient), a power of two so the division is exact.
    scale = _power_of_two_scale(embeddings)
    scaled = embeddings / scale
    centred = scaled - scaled.mean(dim=0, keepdim=True)
    sq_norms = centred.pow(2).sum(dim=1)
    dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (centred @ centred.T)).clamp_min(0.0)
    if distance == "euclidean":
        # d sqrt(s)/ds is infinite at s = 0; taking the root only where s > 0 makes the
        # gradient at coincident points 0 (a valid subgradient) instead of inf * 0 = NaN.
        nonzero = dist > 0
        safe = torch.where(nonzero, dist, torch.ones_like(dist))
        dist = torch.where(nonzero, safe.sqrt(), torch.zeros_like(dist)) * scale
    else:
        # two products, not one by scale**2: 0 * s * s stays 0 where s**2 alone is inf
        dist = dist * scale * scale
    return dist.masked_fill(diagonal, 0.0)


def _scaled_pairwise_distance(embeddings: Tensor, distance: str) -> tuple[Tensor, Tensor]:
    """``(dist_hat, scale)`` with ``D = dist_hat * scale`` (``* scale * scale`` for the
    squared distance; ``scale = 1`` for cosine).  Losses that subtract two distances take
    the difference on ``dist_hat`` and scale it afterwards, so distances that overflow
    float32 (squared distances of norm-1e20 embeddings) give +-inf, never inf - inf = NaN."""
    if distance == "cosine":
        return _pairwise_distance(embeddings, distance), torch.ones(
            (), dtype=embeddings.dtype, device=embeddings.device
        )
    scale = _power_of_two_scale(embeddings)
    return _pairwise_distance(embeddings / scale, distance), scale


def _unscale(value: Tensor, scale: Tensor, distance: str) -> Tensor:
    """Undo :func:`_scaled_pairwise_distance`'s scaling of a distance or distance difference."""
    if distance == "squared_euclidean":
        return value * scale * scale  # 0 * s * s stays 0 where s * s alone overflows
    return value * scale


def _power_of_two_scale(tensor: Tensor, dim: int | None = None) -> Tensor:
    """Detached power of two within a factor 2 of ``max |tensor|`` (over ``dim``, or all);
    1 where that maximum is 0.  No host synchronisation."""
    magnitude = tensor.detach().abs()
    if magnitude.numel() == 0:
        return torch.ones((), dtype=tensor.dtype, device=tensor.device)
    largest = magnitude.amax() if dim is None else magnitude.amax(dim=dim, keepdim=True)
    exponent = torch.frexp(largest).exponent
    power = torch.ldexp(torch.ones_like(largest), exponent)
    return torch.where(largest > 0, power, torch.ones_like(largest))


def _unit_rows(embeddings: Tensor) -> Tensor:
    """Rows divided by their L2 norm; zero rows stay zero.  Each row is first brought near
    unit scale by a power of two, so the norm neither overflows (|x| ~ 1e20) nor underflows
    (|x| ~ 1e-25) in float32; the result and its gradient are those of ``x / ||x||``."""
    scaled = embeddings / _power_of_two_scale(embeddings, dim=1)
    squared = scaled.pow(2).sum(dim=1, keepdim=True)  # in [0.25, D] or exactly 0
    nonzero = squared > 0
    # A zero row stays zero with a zero gradient (F.normalize's eps gave it 1e12 times the
    # upstream gradient); the inner where keeps sqrt away from 0, whose derivative is inf.
    norm = torch.where(nonzero, squared, torch.ones_like(squared)).sqrt()
    return torch.where(nonzero, scaled / norm, 0.0)


def _at_least_float32(tensor: Tensor) -> Tensor:
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def _autocast_disabled(device: torch.device) -> AbstractContextManager[object]:
    """Turn autocast off for ``device`` so matmuls run in the dtype we choose (float32+)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4 takes no device type; switching autocast off is harmless
        enabled = device.type in ("cpu", "cuda")
    except RuntimeError:  # device types autocast does not know (e.g. "meta")
        return nullcontext()
    if enabled:
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


# ---------------------------------------------------------------- static-shape selection
# These helpers return fixed-shape indices plus a validity mask; TripletLoss reduces with the
# mask so it never syncs, the public miners below drop the invalid rows.


def _label_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(positive, negative)`` boolean ``[B, B]`` masks; a sample is not its own positive."""
    same = labels[:, None] == labels[None, :]
    diagonal = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~diagonal, ~same


def _batch_hard_selection(dist: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor: farthest positive, closest negative, and whether both exist (``[B]`` each)."""
    dist = dist.detach()
    positive, negative = _label_masks(labels)
    if dist.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dist.device)
        return empty, empty, positive.any(dim=1)
    positive_idx = dist.masked_fill(~positive, -torch.inf).argmax(dim=1)
    negative_idx = dist.masked_fill(~negative, torch.inf).argmin(dim=1)
    valid = positive.any(dim=1) & negative.any(dim=1)
    return positive_idx, negative_idx, valid


def _batch_all_mask(labels: Tensor) -> Tensor:
    """``[B, B, B]`` mask of valid triplets ``(a, p, n)``."""
    positive, negative = _label_masks(labels)
    return positive[:, :, None] & negative[:, None, :]


def _semi_hard_selection(
    dist: Tensor, labels: Tensor, margin: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Per pair ``(a, p)``: the chosen negative (``[B, B]``) and whether the triplet is kept."""
    dist = dist.detach().contiguous()
    batch = dist.shape[0]
    positive, negative = _label_masks(labels)
    if batch == 0:
        return torch.zeros_like(dist, dtype=torch.long), positive
    # Sorting each anchor's negative distances (non-negatives pushed to +inf at the end)
    # turns "closest negative farther than d(a, p)" into one batched binary search, so
    # the selection needs O(B^2) memory instead of a [B, B, B] comparison tensor.
    sorted_dist, order = dist.masked_fill(~negative, torch.inf).sort(dim=1, stable=True)
    num_negatives = negative.sum(dim=1, keepdim=True)
    first_farther = torch.searchsorted(sorted_dist, dist, right=True)
    candidate = sorted_dist.gather(1, first_farther.clamp_max(batch - 1))
    has_semi_hard = (first_farther < num_negatives) & (candidate < dist + margin)
    # Fallback: the farthest negative that is not farther than the positive (the least hard
    # of the hard negatives), as in the FaceNet reference implementation; every entry
    # before first_farther is a finite distance, i.e. a negative.
    has_hard = first_farther > 0
    position = torch.where(has_semi_hard, first_farther, first_farther - 1).clamp(0, batch - 1)
    negative_idx = order.gather(1, position)
    return negative_idx, positive & (has_semi_hard | has_hard)


# ---------------------------------------------------------------- public miners


def batch_hard(dist: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Batch-hard triplets: for every anchor its farthest positive and closest negative.

    .. math::

        p(a) = \operatorname*{arg\,max}_{p \ne a,\; y_p = y_a} D_{ap}, \qquad
        n(a) = \operatorname*{arg\,min}_{n:\; y_n \ne y_a} D_{an}

    From Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
    Re-Identification", arXiv:1703.07737, 2017.  Anchors with no positive or no negative in
    the batch are dropped.  Ties go to the lowest index.

    Parameters
    ----------
    dist : Tensor
        ``[B, B]`` floating-point distance matrix, finite (smaller = more similar), e.g. from
        :func:`pairwise_distance`.
    labels : Tensor
        ``[B]`` integer class labels.

    Returns
    -------
    tuple of Tensor
        ``(anchor, positive, negative)``, ``int64`` tensors of equal length ``T <= B``, sorted
        by anchor.

    Raises
    ------
    TypeError
        If ``dist`` is not a floating-point tensor or ``labels`` not an integer tensor.
    ValueError
        If ``dist`` is not square or not finite, ``labels`` does not have shape ``[B]``, or
        the two are on different devices.

    Shape:
        - dist: :math:`(B, B)`
        - labels: :math:`(B)`
        - output: three tensors of shape :math:`(T)`, :math:`T \le B`

    Examples
    --------
    >>> import torch
    >>> from marginloss.miners import batch_hard, pairwise_distance
    >>> embeddings = torch.tensor([[0.0], [1.0], [3.0], [4.0], [10.0]])
    >>> labels = torch.tensor([0, 0, 1, 1, 2])
    >>> batch_hard(pairwise_distance(embeddings), labels)  # sample 4 has no positive: dropped
    (tensor([0, 1, 2, 3]), tensor([1, 0, 3, 2]), tensor([2, 2, 1, 1]))
    """
    dist, labels = _check_miner_inputs(dist, labels)
    positive_idx, negative_idx, valid = _batch_hard_selection(dist, labels)
    anchor = valid.nonzero().squeeze(1)
    return anchor, positive_idx[anchor], negative_idx[anchor]


def batch_all(dist: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""All valid triplets of the batch.

    .. math::

        \{(a, p, n) : a \ne p,\; y_p = y_a,\; y_n \ne y_a\}

    The "batch all" selection of Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for
    Person Re-Identification", arXiv:1703.07737, 2017.  ``dist`` only fixes the batch size
    and device: every valid triplet is returned whatever its distances.  The mask has
    :math:`B^3` entries.

    Parameters
    ----------
    dist : Tensor
        ``[B, B]`` floating-point distance matrix, finite.
    labels : Tensor
        ``[B]`` integer class labels.

    Returns
    -------
    tuple of Tensor
        ``(anchor, positive, negative)``, ``int64`` tensors of equal length ``T``, in
        lexicographic ``(a, p, n)`` order.

    Raises
    ------
    TypeError
        If ``dist`` is not a floating-point tensor or ``labels`` not an integer tensor.
    ValueError
        If ``dist`` is not square or not finite, ``labels`` does not have shape ``[B]``, or
        the two are on different devices.

    Shape:
        - dist: :math:`(B, B)`
        - labels: :math:`(B)`
        - output: three tensors of shape :math:`(T)`, :math:`T = \sum_a P_a N_a` with
          :math:`P_a` positives and :math:`N_a` negatives of anchor :math:`a`

    Examples
    --------
    >>> import torch
    >>> from marginloss.miners import batch_all
    >>> labels = torch.tensor([0, 0, 1])
    >>> batch_all(torch.zeros(3, 3), labels)  # (0, 1, 2) and (1, 0, 2)
    (tensor([0, 1]), tensor([1, 0]), tensor([2, 2]))
    """
    dist, labels = _check_miner_inputs(dist, labels)
    anchor, positive, negative = _batch_all_mask(labels).nonzero(as_tuple=True)
    return anchor, positive, negative


def semi_hard(dist: Tensor, labels: Tensor, margin: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Semi-hard triplets: for every positive pair, the closest negative beyond the positive.

    For each pair :math:`(a, p)` with :math:`a \ne p,\ y_a = y_p`, the negative is

    .. math::

        n(a, p) = \operatorname*{arg\,min}_{n:\; y_n \ne y_a} \{\, D_{an} :
        D_{ap} < D_{an} < D_{ap} + \text{margin} \,\}

    From Schroff, Kalenichenko & Philbin, "FaceNet: A Unified Embedding for Face Recognition
    and Clustering", CVPR 2015.  When no negative lies in that window:

    - if some negative has :math:`D_{an} \le D_{ap}` (all candidates are *hard*), the
      farthest of those is used, :math:`\arg\max \{D_{an} : D_{an} \le D_{ap}\}`, the least
      hard of the hard negatives (the fallback of the FaceNet reference implementation); it
      keeps a gradient on a collapsed batch where every distance is equal, which FaceNet
      warns the hardest negatives drive towards;
    - otherwise every negative is at least ``margin`` farther than the positive, the triplet
      would have zero hinge loss, and the pair is dropped.

    Every returned triplet therefore has a positive hinge loss
    :math:`D_{ap} - D_{an} + \text{margin} > 0`.

    Parameters
    ----------
    dist : Tensor
        ``[B, B]`` floating-point distance matrix, finite.
    labels : Tensor
        ``[B]`` integer class labels.
    margin : float
        Width of the semi-hard window, in the units of ``dist``; must be ``> 0``.

    Returns
    -------
    tuple of Tensor
        ``(anchor, positive, negative)``, ``int64`` tensors of equal length ``T``, in
        lexicographic ``(a, p)`` order.

    Raises
    ------
    TypeError
        If ``dist`` is not a floating-point tensor, ``labels`` not an integer tensor, or
        ``margin`` not a real number.
    ValueError
        If ``dist`` is not square or not finite, ``labels`` does not have shape ``[B]``, the
        two are on different devices, or ``margin <= 0``.

    Shape:
        - dist: :math:`(B, B)`
        - labels: :math:`(B)`
        - output: three tensors of shape :math:`(T)`, :math:`T \le \sum_a P_a`

    Examples
    --------
    >>> import torch
    >>> from marginloss.miners import pairwise_distance, semi_hard
    >>> embeddings = torch.tensor([[0.0], [1.0], [1.6], [3.5]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> dist = pairwise_distance(embeddings)
    >>> # (0, 1): D=1.0, negative 2 at 1.6 lies in (1.0, 2.0): semi-hard
    >>> # (1, 0): D=1.0, negatives at 0.6 and 2.5, none in (1.0, 2.0): fallback to 2 (0.6)
    >>> # (2, 3): D=1.9, negatives at 1.6 and 0.6, none in (1.9, 2.9): fallback to 0 (1.6)
    >>> # (3, 2): D=1.9, negative 1 at 2.5 lies in (1.9, 2.9): semi-hard
    >>> semi_hard(dist, labels, margin=1.0)
    (tensor([0, 1, 2, 3]), tensor([1, 0, 3, 2]), tensor([2, 2, 0, 1]))
    """
    dist, labels = _check_miner_inputs(dist, labels)
    margin = check_float("margin", margin, low=0.0, low_open=True)
    negative_idx, valid = _semi_hard_selection(dist, labels, margin)
    anchor, positive = valid.nonzero(as_tuple=True)
    return anchor, positive, negative_idx[anchor, positive]


def _check_miner_inputs(
    dist: object, labels: object, name: str = "dist"
) -> tuple[Tensor, Tensor]:
    kind = "similarity" if name == "similarity" else "distance"
    if not isinstance(dist, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(dist).__name__}")
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(
            f"{name} must be a square [batch, batch] {kind} matrix, got shape {tuple(dist.shape)}"
        )
    if not dist.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {dist.dtype}")
    if _check_values() and dist.numel() > 0 and not bool(torch.isfinite(dist).all()):
        bad = int((~torch.isfinite(dist)).sum())
        raise ValueError(
            f"{name} must be finite, got {bad} NaN/inf value(s) in a tensor of shape "
            f"{tuple(dist.shape)}"
        )
    batch = dist.shape[0]
    if isinstance(labels, Tensor) and tuple(labels.shape) != (batch,):
        raise ValueError(
            f"labels must have shape [{batch}] to match {name} of shape {tuple(dist.shape)}, "
            f"got shape {tuple(labels.shape)}"
        )
    checked = check_labels(labels, batch)
    check_same_device(**{name: dist, "labels": checked})
    return dist, checked


def multi_similarity_miner(
    similarity: Tensor, labels: Tensor, epsilon: float = 0.1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Multi-similarity pair mining: keep the pairs that violate the hardest opposite pair.

    For anchor :math:`i` with similarities :math:`S_{ik}` (larger = more similar),

    .. math::

        \mathcal N_i = \{k : y_k \ne y_i,\; S_{ik} > \min_{y_j = y_i,\, j \ne i} S_{ij} - \epsilon\},
        \qquad
        \mathcal P_i = \{j : y_j = y_i,\, j \ne i,\; S_{ij} < \max_{y_k \ne y_i} S_{ik} + \epsilon\}

    The mining step of Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General
    Pair Weighting for Deep Metric Learning", CVPR 2019 (their Eqs. 12 and 13): a negative
    is kept when it is more similar than the least similar positive minus :math:`\epsilon`,
    a positive when it is less similar than the most similar negative plus :math:`\epsilon`.
    An anchor without positives keeps no negative (the minimum over no positive is
    :math:`+\infty`), one without negatives keeps no positive.  The output is the pair
    tuple :class:`marginloss.MultiSimilarityLoss` (and every pair loss) accepts.

    Parameters
    ----------
    similarity : Tensor
        ``[B, B]`` floating-point similarity matrix, finite, e.g. the cosine similarity
        ``1 - pairwise_distance(embeddings, "cosine")``.
    labels : Tensor
        ``[B]`` integer class labels.
    epsilon : float, default 0.1
        :math:`\epsilon \ge 0` (the paper's value).

    Returns
    -------
    tuple of Tensor
        ``(anchor_positive, positive, anchor_negative, negative)``, ``int64``, the kept
        positive and negative pairs in row-major order.

    Raises
    ------
    TypeError
        If ``similarity`` is not a floating-point tensor, ``labels`` not an integer tensor,
        or ``epsilon`` not a real number.
    ValueError
        If ``similarity`` is not square or not finite, ``labels`` does not have shape
        ``[B]``, the two are on different devices, or ``epsilon < 0``.

    Shape:
        - similarity: :math:`(B, B)`
        - labels: :math:`(B)`
        - output: two tensors of shape :math:`(P)`, two of shape :math:`(N)`

    Examples
    --------
    >>> import torch
    >>> from marginloss.miners import multi_similarity_miner
    >>> similarity = torch.tensor([[1.0, 0.9, 0.2, 0.85],
    ...                            [0.9, 1.0, 0.3, 0.1],
    ...                            [0.2, 0.3, 1.0, 0.5],
    ...                            [0.85, 0.1, 0.5, 1.0]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> # anchor 0: positive 1 (0.9 < 0.85 + 0.1) and negative 3 (0.85 > 0.9 - 0.1) kept;
    >>> # anchors 1 and 2 keep nothing (their negatives are all easy); anchor 3 keeps
    >>> # positive 2 (0.5 < 0.85 + 0.1) and negative 0 (0.85 > 0.5 - 0.1)
    >>> multi_similarity_miner(similarity, labels)
    (tensor([0, 3]), tensor([1, 2]), tensor([0, 3]), tensor([3, 0]))
    """
    similarity, labels = _check_miner_inputs(similarity, labels, name="similarity")
    epsilon = check_float("epsilon", epsilon, low=0.0)
    similarity = similarity.detach()
    positive, negative = _label_masks(labels)
    if similarity.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=similarity.device)
        return empty, empty, empty, empty
    hardest_positive = similarity.masked_fill(~positive, torch.inf).amin(dim=1, keepdim=True)
    hardest_negative = similarity.masked_fill(~negative, -torch.inf).amax(dim=1, keepdim=True)
    kept_negative = negative & (similarity > hardest_positive - epsilon)
    kept_positive = positive & (similarity < hardest_negative + epsilon)
    anchor_p, positive_idx = kept_positive.nonzero(as_tuple=True)
    anchor_n, negative_idx = kept_negative.nonzero(as_tuple=True)
    return anchor_p, positive_idx, anchor_n, negative_idx
