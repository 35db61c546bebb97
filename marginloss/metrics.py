"""Verification and open-set identification metrics for face recognition.

Two families of metrics, in pure PyTorch, on whatever device the inputs live on:

* **Pair verification** — a 1-D tensor of pair ``scores`` (higher = more similar) and a
  1-D ``is_same`` tensor of 0/1 (or bool) labels: :func:`roc_curve`, :func:`roc_auc`,
  :func:`equal_error_rate`, :func:`tar_at_far`, :func:`best_threshold_accuracy` and the
  LFW protocol :func:`kfold_accuracy`.  Every metric is computed *exactly* over the
  distinct score values (no threshold grid), with ties handled like scikit-learn.
* **Similarity and open-set identification** — ``[N, D]`` embeddings:
  :func:`pairwise_similarity`, the batched :func:`topk_similarity`,
  :func:`open_set_identify`, :func:`open_set_accuracy` and
  :func:`tune_open_set_threshold`.

Scalar metrics are returned as Python ``float``.  Checks on tensor *values* (finite
scores and embeddings, 0/1 ``is_same``, ``gallery_labels`` free of ``unknown_label``)
follow :func:`marginloss.set_validation`; shape, dtype and argument checks always run.
Inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from marginloss._validation import (
    _check_values,
    check_choice,
    check_embeddings,
    check_positive_int,
    check_same_device,
)

__all__ = [
    "best_threshold_accuracy",
    "equal_error_rate",
    "kfold_accuracy",
    "open_set_accuracy",
    "open_set_identify",
    "pairwise_similarity",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "topk_similarity",
    "tune_open_set_threshold",
]

_METRICS = ("cosine", "euclidean")
_TEMPLATES = ("mean", "max")


# ---------------------------------------------------------------- checks


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _rate_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else rates are float64, as in scikit-learn.
    return torch.float32 if device.type == "mps" else torch.float64


def _check_pair_inputs(scores: object, is_same: object) -> tuple[Tensor, Tensor]:
    """Check ``scores``/``is_same`` and return them detached, ``is_same`` as bool."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1:
        raise ValueError(
            f"scores must be a 1-D tensor of shape [num_pairs], got shape {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if not isinstance(is_same, Tensor):
        raise TypeError(f"is_same must be a torch.Tensor, got {type(is_same).__name__}")
    if is_same.dtype != torch.bool and not _is_integer_dtype(is_same.dtype):
        raise TypeError(
            f"is_same must be a bool or integer tensor of 0/1 labels, got dtype {is_same.dtype}"
        )
    if is_same.shape != scores.shape:
        raise ValueError(
            f"is_same must have shape [{scores.shape[0]}] to match scores, "
            f"got shape {tuple(is_same.shape)}"
        )
    check_same_device(scores=scores, is_same=is_same)
    scores, is_same = scores.detach(), is_same.detach()
    if _check_values():
        finite = torch.isfinite(scores)
        if not bool(finite.all()):
            raise ValueError(
                f"scores must be finite, got {int((~finite).sum())} NaN/inf value(s) "
                f"out of {scores.shape[0]}"
            )
        if is_same.dtype != torch.bool:
            binary = (is_same == 0) | (is_same == 1)
            if not bool(binary.all()):
                bad = torch.unique(is_same[~binary])[:5].tolist()
                raise ValueError(f"is_same must be binary (0/1 or bool), got values such as {bad}")
    return scores, is_same != 0


def _check_both_classes(is_same: Tensor, metric: str) -> tuple[int, int]:
    """Return ``(num_positive, num_negative)``; raise if either is zero."""
    num_positive = int(is_same.sum())
    num_negative = is_same.shape[0] - num_positive
    if num_positive == 0 or num_negative == 0:
        raise ValueError(
            f"{metric} is not defined when is_same holds only one class: got {num_positive} "
            f"positive (same) and {num_negative} negative (different) pair(s)"
        )
    return num_positive, num_negative


def _check_int_labels(labels: object, length: int, name: str, match: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of integer labels, got {type(labels).__name__}"
        )
    if not _is_integer_dtype(labels.dtype):
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(
            f"{name} must have shape [{length}] to match {match}, got shape {tuple(labels.shape)}"
        )
    return labels.detach().long()


def _check_unknown_label(unknown_label: object) -> int:
    if isinstance(unknown_label, bool) or not isinstance(unknown_label, int):
        raise TypeError(
            f"unknown_label must be an int, got {type(unknown_label).__name__} {unknown_label!r}"
        )
    return unknown_label


def _check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(
            f"threshold must be a real number, got {type(threshold).__name__} {threshold!r}"
        )
    if math.isnan(threshold):
        raise ValueError(f"threshold must not be NaN, got {threshold!r}")
    return float(threshold)


def _check_query_key(
    queries: object, keys: object, queries_name: str, keys_name: str
) -> tuple[Tensor, Tensor]:
    """Check two ``[*, D]`` float tensors agree on D and device; promote to one dtype."""
    queries = check_embeddings(queries, name=queries_name)
    if not isinstance(keys, Tensor):
        raise TypeError(f"{keys_name} must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dim() != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(
            f"{keys_name} must have shape [num_{keys_name}, {queries.shape[1]}] to match the "
            f"embedding_dim of {queries_name} (shape {tuple(queries.shape)}), "
            f"got shape {tuple(keys.shape)}"
        )
    check_same_device(**{queries_name: queries, keys_name: keys})
    keys = check_embeddings(keys, name=keys_name)
    dtype = torch.promote_types(queries.dtype, keys.dtype)
    return queries.to(dtype), keys.to(dtype)


# ---------------------------------------------------------------- exact threshold sweeps


def _cumulative_counts(scores: Tensor, flags: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sweep a threshold down through the distinct scores.

    Returns ``(distinct, num_accepted, flag_counts)``: the distinct score values in
    decreasing order, how many scores are ``>=`` each, and the column sums of ``flags``
    ([n] or [n, m]) over those scores.  Sorting groups tied scores, so counts are taken
    at the end of each group of ties: all tied scores are accepted or rejected together.
    """
    sorted_scores, order = torch.sort(scores, descending=True)
    is_last_of_group = torch.ones_like(sorted_scores, dtype=torch.bool)
    is_last_of_group[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    ends = torch.nonzero(is_last_of_group).squeeze(1)
    flag_counts = torch.cumsum(flags[order].long(), dim=0)[ends]
    return sorted_scores[ends], ends + 1, flag_counts


def _roc_counts(scores: Tensor, is_same: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(false_positives, true_positives, thresholds)`` at ``+inf`` and each distinct score."""
    distinct, num_accepted, true_positives = _cumulative_counts(scores, is_same)
    zero = torch.zeros(1, dtype=torch.long, device=scores.device)
    inf = torch.full((1,), math.inf, dtype=scores.dtype, device=scores.device)
    false_positives = num_accepted - true_positives
    return (
        torch.cat([zero, false_positives]),
        torch.cat([zero, true_positives]),
        torch.cat([inf, distinct]),
    )


def _best_threshold(
    scores: Tensor, correct_if_accepted: Tensor, correct_if_rejected: Tensor
) -> tuple[int, float]:
    """Maximise the number of correct decisions over ``score >= threshold``, exactly.

    The candidates are ``+inf`` (reject everything) and every distinct score; ties go to
    the first candidate in decreasing order, i.e. the largest threshold.
    Returns ``(num_correct, threshold)``.
    """
    flags = torch.stack([correct_if_accepted, correct_if_rejected], dim=1)
    distinct, _, counts = _cumulative_counts(scores, flags)
    total_if_rejected = int(correct_if_rejected.sum())
    correct = counts[:, 0] + (total_if_rejected - counts[:, 1])
    correct = torch.cat([correct.new_full((1,), total_if_rejected), correct])
    best = int(torch.argmax(correct))
    threshold = math.inf if best == 0 else float(distinct[best - 1])
    return int(correct[best]), threshold


# ---------------------------------------------------------------- pair verification


def roc_curve(scores: Tensor, is_same: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Receiver operating characteristic of pair scores, at every distinct score.

    A pair is accepted as "same" when its score is at least the threshold :math:`t`:

    .. math::

        \mathrm{FPR}(t) = \frac{|\{i : s_i \ge t,\ y_i = 0\}|}{N_-}, \qquad
        \mathrm{TPR}(t) = \frac{|\{i : s_i \ge t,\ y_i = 1\}|}{N_+}

    with :math:`N_\pm` the numbers of positive and negative pairs.  The thresholds are
    ``+inf`` (so the curve starts at (0, 0)) followed by every distinct score in decreasing
    order — the same points as ``sklearn.metrics.roc_curve(is_same, scores,
    drop_intermediate=False)``: tied scores form one point, never a staircase.

    Shape:
        - ``scores``, ``is_same``: :math:`(N,)`.
        - ``fpr``, ``tpr``, ``thresholds``: :math:`(T + 1,)`, :math:`T` the number of
          distinct scores.

    Parameters
    ----------
    scores : Tensor
        Floating-point similarity of each pair; higher means more alike.
    is_same : Tensor
        Bool or 0/1 integer tensor, 1 where the pair shows the same identity.

    Returns
    -------
    fpr, tpr : Tensor
        Non-decreasing rates, float64 (float32 on MPS), on the device of ``scores``.
    thresholds : Tensor
        Strictly decreasing, ``thresholds[0] = +inf``, in the dtype of ``scores``.

    Raises
    ------
    TypeError
        If ``scores`` is not floating point or ``is_same`` not bool/integer.
    ValueError
        If shapes disagree, ``scores`` is not 1-D or finite, ``is_same`` is not 0/1, or
        ``is_same`` holds only one class.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import roc_curve
    >>> scores = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1])
    >>> is_same = torch.tensor([1, 1, 0, 1, 0])
    >>> fpr, tpr, thresholds = roc_curve(scores, is_same)
    >>> fpr  # the tie at 0.8 moves FPR and TPR together
    tensor([0.0000, 0.0000, 0.5000, 0.5000, 1.0000], dtype=torch.float64)
    >>> tpr
    tensor([0.0000, 0.3333, 0.6667, 1.0000, 1.0000], dtype=torch.float64)
    >>> thresholds
    tensor([   inf, 0.9000, 0.8000, 0.3000, 0.1000])
    """
    scores, same = _check_pair_inputs(scores, is_same)
    num_positive, num_negative = _check_both_classes(same, "roc_curve")
    false_positives, true_positives, thresholds = _roc_counts(scores, same)
    dtype = _rate_dtype(scores.device)
    fpr = false_positives.to(dtype) / num_negative
    tpr = true_positives.to(dtype) / num_positive
    return fpr, tpr, thresholds


def roc_auc(scores: Tensor, is_same: Tensor) -> float:
    r"""Area under the ROC curve of pair scores, ties counted as half.

    .. math::

        \mathrm{AUC} = \frac{1}{N_+ N_-} \sum_{i : y_i = 1} \sum_{j : y_j = 0}
            \Big( [s_i > s_j] + \tfrac{1}{2} [s_i = s_j] \Big)

    which is the trapezoidal area under :func:`roc_curve` and equals
    ``sklearn.metrics.roc_auc_score(is_same, scores)``.  It is computed from integer counts,
    so it is exact up to the final division.

    Shape:
        - ``scores``, ``is_same``: :math:`(N,)`.

    Parameters
    ----------
    scores : Tensor
        Floating-point similarity of each pair; higher means more alike.
    is_same : Tensor
        Bool or 0/1 integer tensor, 1 where the pair shows the same identity.

    Returns
    -------
    float
        The AUC in [0, 1].

    Raises
    ------
    TypeError, ValueError
        As :func:`roc_curve`; in particular ``ValueError`` when ``is_same`` holds only one
        class (AUC is undefined, as in scikit-learn).

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import roc_auc
    >>> roc_auc(torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1]), torch.tensor([1, 1, 0, 1, 0]))
    0.75
    """
    scores, same = _check_pair_inputs(scores, is_same)
    num_positive, num_negative = _check_both_classes(same, "roc_auc")
    false_positives, true_positives, _ = _roc_counts(scores, same)
    # Twice the trapezoid area in integer units: no rounding until the division.
    twice_area = int(
        torch.sum(
            (false_positives[1:] - false_positives[:-1])
            * (true_positives[1:] + true_positives[:-1])
        )
    )
    return twice_area / (2 * num_positive * num_negative)


def equal_error_rate(scores: Tensor, is_same: Tensor) -> tuple[float, float]:
    r"""Equal error rate: where the false-positive rate meets the false-negative rate.

    Along :func:`roc_curve` (thresholds decreasing) the gap
    :math:`d = \mathrm{FNR} - \mathrm{FPR} = (1 - \mathrm{TPR}) - \mathrm{FPR}` falls
    strictly from 1 to −1.  Let point :math:`k` be the first with :math:`d_k \le 0`.  If
    :math:`d_k = 0` the EER is :math:`\mathrm{FPR}_k` at threshold :math:`t_k`; otherwise
    the ROC segment between points :math:`k-1` and :math:`k` is interpolated linearly:

    .. math::

        w = \frac{d_{k-1}}{d_{k-1} - d_k}, \qquad
        \mathrm{EER} = \mathrm{FPR}_{k-1} + w\,(\mathrm{FPR}_k - \mathrm{FPR}_{k-1}), \qquad
        t = t_{k-1} + w\,(t_k - t_{k-1})

    (at the crossing FPR and FNR are equal, so the EER is either).  When :math:`t_{k-1}` is
    the ``+inf`` start of the curve the returned threshold is :math:`t_k`, the largest score.
    The sign of :math:`d` is decided in exact integer arithmetic.

    Shape:
        - ``scores``, ``is_same``: :math:`(N,)`.

    Parameters
    ----------
    scores : Tensor
        Floating-point similarity of each pair; higher means more alike.
    is_same : Tensor
        Bool or 0/1 integer tensor, 1 where the pair shows the same identity.

    Returns
    -------
    eer : float
        The equal error rate in [0, 1].
    threshold : float
        The score threshold at the crossing (accept when ``score >= threshold``).

    Raises
    ------
    TypeError, ValueError
        As :func:`roc_curve` (both classes are needed).

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import equal_error_rate
    >>> scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=torch.float64)
    >>> is_same = torch.tensor([1, 1, 1, 0, 0, 1])
    >>> eer, threshold = equal_error_rate(scores, is_same)  # halfway from 0.7 to 0.6
    >>> round(eer, 4), round(threshold, 4)
    (0.25, 0.65)
    """
    scores, same = _check_pair_inputs(scores, is_same)
    num_positive, num_negative = _check_both_classes(same, "equal_error_rate")
    false_positives, true_positives, thresholds = _roc_counts(scores, same)
    # gap = (FNR - FPR) * N+ * N-, an exact integer; strictly decreasing from N+N- to -N+N-.
    gap = (num_positive - true_positives) * num_negative - false_positives * num_positive
    k = int(torch.nonzero(gap <= 0)[0, 0])
    (gap_lo, gap_hi), (fp_lo, fp_hi) = (
        gap[k - 1 : k + 1].tolist(),
        false_positives[k - 1 : k + 1].tolist(),
    )
    t_lo, t_hi = thresholds[k - 1 : k + 1].tolist()
    if gap_hi == 0:
        return fp_hi / num_negative, float(t_hi)
    weight = gap_lo / (gap_lo - gap_hi)
    fpr_lo, fpr_hi = fp_lo / num_negative, fp_hi / num_negative
    eer = fpr_lo + weight * (fpr_hi - fpr_lo)
    threshold = t_hi if math.isinf(t_lo) else t_lo + weight * (t_hi - t_lo)
    return float(eer), float(threshold)


def tar_at_far(
    scores: Tensor,
    is_same: Tensor,
    fars: Iterable[float] | float = (1e-1, 1e-2, 1e-3, 1e-4),
) -> dict[float, float]:
    r"""True-accept rate at fixed false-accept rates (TAR@FAR), read off the exact ROC.

    .. math::

        \mathrm{TAR@FAR}(\alpha) = \max\{\mathrm{TPR}(t) : \mathrm{FPR}(t) \le \alpha\}

    over the points of :func:`roc_curve` — the largest TPR whose FPR does not exceed
    :math:`\alpha` (no interpolation).  With :math:`N_-` negative pairs, FPR moves in steps of
    :math:`1/N_-`; for :math:`\alpha < 1/N_-` the result is the TPR at FPR = 0 (the positives
    scored above every negative), which may be 0.

    Shape:
        - ``scores``, ``is_same``: :math:`(N,)`.

    Parameters
    ----------
    scores : Tensor
        Floating-point similarity of each pair; higher means more alike.
    is_same : Tensor
        Bool or 0/1 integer tensor, 1 where the pair shows the same identity.
    fars : iterable of float or float, default (1e-1, 1e-2, 1e-3, 1e-4)
        The false-accept rates :math:`\alpha \in [0, 1]`; the usual IJB-B/C operating points.

    Returns
    -------
    dict[float, float]
        ``{far: tar}`` in the order of ``fars``.

    Raises
    ------
    TypeError, ValueError
        As :func:`roc_curve` (both classes are needed); also when a ``far`` is not a real
        number in [0, 1].

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import tar_at_far
    >>> scores = torch.tensor([0.9, 0.7, 0.6, 0.4, 0.2, 0.1])
    >>> is_same = torch.tensor([1, 1, 0, 1, 0, 0])
    >>> tar_at_far(scores, is_same, fars=(0.0, 0.5, 1.0))
    {0.0: 0.6666666666666666, 0.5: 1.0, 1.0: 1.0}
    """
    far_list = [fars] if isinstance(fars, (int, float)) else list(fars)
    for far in far_list:
        if isinstance(far, bool) or not isinstance(far, (int, float)):
            raise TypeError(f"fars must hold real numbers, got {type(far).__name__} {far!r}")
        if not 0.0 <= far <= 1.0:
            raise ValueError(f"fars must lie in [0, 1], got {far!r}")
    scores, same = _check_pair_inputs(scores, is_same)
    num_positive, num_negative = _check_both_classes(same, "tar_at_far")
    false_positives, true_positives, _ = _roc_counts(scores, same)
    dtype = _rate_dtype(scores.device)
    fpr = false_positives.to(dtype) / num_negative
    alphas = torch.tensor([float(far) for far in far_list], dtype=dtype, device=scores.device)
    # FPR and TPR both rise along the curve: the last point with FPR <= far has the largest TPR.
    last = torch.searchsorted(fpr, alphas, right=True) - 1
    tars = (true_positives[last].to(dtype) / num_positive).tolist()
    return {float(far): float(tar) for far, tar in zip(far_list, tars)}


def best_threshold_accuracy(scores: Tensor, is_same: Tensor) -> tuple[float, float]:
    r"""Best verification accuracy over all thresholds, and the threshold reaching it.

    .. math::

        \mathrm{acc}(t) = \frac{1}{N} \sum_i \big[ [s_i \ge t] = y_i \big], \qquad
        t^\star = \operatorname*{arg\,max}_t \mathrm{acc}(t)

    searched exactly over ``+inf`` (reject every pair) and every distinct score.  Among
    thresholds with the same accuracy the largest is returned.  One class alone is allowed.

    Shape:
        - ``scores``, ``is_same``: :math:`(N,)`, :math:`N \ge 1`.

    Parameters
    ----------
    scores : Tensor
        Floating-point similarity of each pair; higher means more alike.
    is_same : Tensor
        Bool or 0/1 integer tensor, 1 where the pair shows the same identity.

    Returns
    -------
    accuracy : float
        :math:`\mathrm{acc}(t^\star)`.
    threshold : float
        :math:`t^\star`, one of the scores or ``inf``.

    Raises
    ------
    TypeError, ValueError
        As :func:`roc_curve`, and ``ValueError`` when ``scores`` is empty.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import best_threshold_accuracy
    >>> scores = torch.tensor([0.9, 0.7, 0.6, 0.4, 0.2, 0.1])
    >>> is_same = torch.tensor([1, 1, 0, 1, 0, 0])
    >>> accuracy, threshold = best_threshold_accuracy(scores, is_same)
    >>> round(accuracy, 4), round(threshold, 4)
    (0.8333, 0.7)
    """
    scores, same = _check_pair_inputs(scores, is_same)
    if scores.shape[0] == 0:
        raise ValueError("scores must hold at least one pair, got shape (0,)")
    num_correct, threshold = _best_threshold(scores, same, ~same)
    return num_correct / scores.shape[0], threshold


def kfold_accuracy(
    scores: Tensor,
    is_same: Tensor,
    num_folds: int = 10,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> tuple[float, float, Tensor]:
    r"""Cross-validated verification accuracy: the LFW protocol.

    The pairs are split into ``num_folds`` folds.  For each fold the threshold
    :math:`t_f` of :func:`best_threshold_accuracy` is chosen on the *other* folds and the
    accuracy :math:`a_f` of ``score >= t_f`` is measured on the held-out fold.  Returns the
    mean and the (population, ``ddof=0``, as ``numpy.std``) standard deviation of
    :math:`a_f`.

    Folds are contiguous and sized as ``sklearn.model_selection.KFold(num_folds)``: the
    first ``N % num_folds`` folds hold one extra pair.  LFW's ``pairs.txt`` lists its 10
    folds in order, so ``shuffle=False`` with 6000 pairs is the standard protocol.

    Shape:
        - ``scores``, ``is_same``: :math:`(N,)`.
        - ``thresholds``: :math:`(\text{num\_folds},)`.

    Parameters
    ----------
    scores : Tensor
        Floating-point similarity of each pair; higher means more alike.
    is_same : Tensor
        Bool or 0/1 integer tensor, 1 where the pair shows the same identity.
    num_folds : int, default 10
        Number of folds, in ``[2, N]``; 10 is the LFW protocol.
    shuffle : bool, default False
        Permute the pairs (``torch.randperm`` with a CPU generator seeded by ``seed``)
        before splitting, for pair lists not already arranged in folds.
    seed : int, default 0
        Seed of that permutation; ignored unless ``shuffle``.

    Returns
    -------
    mean_accuracy : float
    std_accuracy : float
    thresholds : Tensor
        The threshold chosen for each fold (``inf`` where rejecting all was best), in the
        dtype and on the device of ``scores``.

    Raises
    ------
    TypeError, ValueError
        As :func:`roc_curve` (one class alone is allowed); ``ValueError`` when
        ``num_folds`` is not an int in ``[2, N]``; ``TypeError`` for a non-bool ``shuffle``
        or non-int ``seed``.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import kfold_accuracy
    >>> scores = torch.tensor([0.9, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4, 0.1])
    >>> is_same = torch.tensor([1, 1, 0, 1, 0, 1, 0, 0])
    >>> mean, std, thresholds = kfold_accuracy(scores, is_same, num_folds=4)
    >>> round(mean, 4), round(std, 4)
    (0.875, 0.2165)
    >>> thresholds  # fold 3's training folds put the threshold at 0.7, above its 0.6 positive
    tensor([0.6000, 0.6000, 0.7000, 0.6000])
    """
    scores, same = _check_pair_inputs(scores, is_same)
    num_pairs = scores.shape[0]
    if isinstance(num_folds, bool) or not isinstance(num_folds, int):
        raise ValueError(f"num_folds must be an int, got {type(num_folds).__name__} {num_folds!r}")
    if not 2 <= num_folds <= num_pairs:
        raise ValueError(f"num_folds must be in [2, num_pairs] = [2, {num_pairs}], got {num_folds}")
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__} {shuffle!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")

    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_pairs, generator=generator).to(scores.device)
    else:
        order = torch.arange(num_pairs, device=scores.device)
    base, extra = divmod(num_pairs, num_folds)
    fold_sizes = [base + 1 if fold < extra else base for fold in range(num_folds)]

    accuracies: list[float] = []
    thresholds: list[float] = []
    start = 0
    for size in fold_sizes:
        test = order[start : start + size]
        train = torch.cat([order[:start], order[start + size :]])
        start += size
        _, threshold = _best_threshold(scores[train], same[train], ~same[train])
        correct = (scores[test] >= threshold) == same[test]
        accuracies.append(int(correct.sum()) / size)
        thresholds.append(threshold)
    mean = sum(accuracies) / num_folds
    std = math.sqrt(sum((accuracy - mean) ** 2 for accuracy in accuracies) / num_folds)
    return mean, std, torch.tensor(thresholds, dtype=scores.dtype, device=scores.device)


# ---------------------------------------------------------------- similarity


def _prepare_keys(keys: Tensor, metric: str) -> Tensor:
    return F.normalize(keys, dim=1) if metric == "cosine" else keys


def _similarity_block(queries: Tensor, prepared_keys: Tensor, metric: str) -> Tensor:
    if metric == "cosine":
        return F.normalize(queries, dim=1) @ prepared_keys.T
    if queries.dtype in (torch.float16, torch.bfloat16):
        # cdist lacks half kernels on CPU, and its |q|^2 + |k|^2 - 2<q, k> expansion would
        # cancel catastrophically in half precision anyway.
        distances = torch.cdist(queries.float(), prepared_keys.float()).to(queries.dtype)
    else:
        distances = torch.cdist(queries, prepared_keys)
    return -distances


def pairwise_similarity(queries: Tensor, keys: Tensor, metric: str = "cosine") -> Tensor:
    r"""Similarity of every query to every key; higher is always more similar.

    .. math::

        S_{qk} = \frac{\langle x_q, y_k \rangle}{\lVert x_q \rVert_2 \lVert y_k \rVert_2}
        \ \ (\text{cosine}), \qquad
        S_{qk} = -\lVert x_q - y_k \rVert_2 \ \ (\text{euclidean})

    The Euclidean metric returns the *negative* distance so that every function here can
    treat a larger value as a better match.  A zero vector has cosine similarity 0 with
    everything (``torch.nn.functional.normalize`` semantics).  Differentiable.

    Shape:
        - ``queries``: :math:`(Q, D)`, ``keys``: :math:`(K, D)`.
        - Output: :math:`(Q, K)`, in the promoted dtype of the inputs.

    Parameters
    ----------
    queries : Tensor
        Floating-point embeddings, one per row.
    keys : Tensor
        Floating-point embeddings with the same ``embedding_dim`` and device.
    metric : {"cosine", "euclidean"}, default "cosine"
        Cosine similarity, or negative Euclidean distance.

    Returns
    -------
    Tensor
        The :math:`Q \times K` similarity matrix.

    Raises
    ------
    TypeError
        If an input is not a floating-point tensor.
    ValueError
        If an input is not 2-D or not finite, ``embedding_dim`` or devices disagree, or
        ``metric`` is unknown.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import pairwise_similarity
    >>> queries = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    >>> keys = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> pairwise_similarity(queries, keys)
    tensor([[1.0000, 0.0000],
            [0.6000, 0.8000]])
    >>> pairwise_similarity(queries, keys, metric="euclidean")
    tensor([[-1.0000, -1.4142],
            [-4.1231, -4.2426]])
    """
    metric = check_choice("metric", metric, _METRICS)
    queries, keys = _check_query_key(queries, keys, "queries", "keys")
    return _similarity_block(queries, _prepare_keys(keys, metric), metric)


def topk_similarity(
    queries: Tensor,
    keys: Tensor,
    k: int = 1,
    metric: str = "cosine",
    batch_size: int = 4096,
) -> tuple[Tensor, Tensor]:
    r"""The ``k`` most similar keys of each query, computed ``batch_size`` queries at a time.

    Same similarity as :func:`pairwise_similarity`, but only a
    :math:`\text{batch\_size} \times K` block exists at any time, so a
    :math:`10^5 \times 10^5` search never builds the full matrix.  Values are sorted in
    decreasing order; the order among exactly tied values is that of ``torch.topk``.

    Shape:
        - ``queries``: :math:`(Q, D)`, ``keys``: :math:`(K, D)`.
        - ``values``, ``indices``: :math:`(Q, k)`.

    Parameters
    ----------
    queries : Tensor
        Floating-point embeddings, one per row.
    keys : Tensor
        Floating-point embeddings with the same ``embedding_dim`` and device.
    k : int, default 1
        Number of neighbours, in ``[1, K]``.
    metric : {"cosine", "euclidean"}, default "cosine"
        Cosine similarity, or negative Euclidean distance.
    batch_size : int, default 4096
        Queries per block; lower it to cap memory at ``batch_size * K`` scores.

    Returns
    -------
    values : Tensor
        Similarities, decreasing along each row.
    indices : Tensor
        int64 row indices into ``keys``.

    Raises
    ------
    TypeError, ValueError
        As :func:`pairwise_similarity`; ``ValueError`` when ``k`` is not in ``[1, K]`` or
        ``batch_size`` is not a positive int.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import topk_similarity
    >>> queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
    >>> keys = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
    >>> values, indices = topk_similarity(queries, keys, k=2, batch_size=2)  # two blocks
    >>> indices
    tensor([[0, 1],
            [1, 0],
            [2, 1]])
    """
    metric = check_choice("metric", metric, _METRICS)
    batch_size = check_positive_int("batch_size", batch_size)
    queries, keys = _check_query_key(queries, keys, "queries", "keys")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k must be an int in [1, num_keys] = [1, {keys.shape[0]}], got {k!r}")
    prepared = _prepare_keys(keys, metric)
    values, indices = [], []
    for start in range(0, queries.shape[0], batch_size):
        block = _similarity_block(queries[start : start + batch_size], prepared, metric)
        block_values, block_indices = torch.topk(block, k, dim=1)
        values.append(block_values)
        indices.append(block_indices)
    if not values:
        empty = queries.new_empty((0, k))
        return empty, empty.new_empty((0, k), dtype=torch.long)
    return torch.cat(values), torch.cat(indices)


# ---------------------------------------------------------------- open-set identification


def _identify(
    probes: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    unknown_label: int,
    metric: str,
    template: str,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Best identity and its score for every probe, before any threshold."""
    identities, identity_of_image = torch.unique(gallery_labels, sorted=True, return_inverse=True)
    if _check_values() and bool((identities == unknown_label).any()):
        raise ValueError(
            f"gallery_labels must not contain unknown_label={unknown_label}: it marks "
            "rejected probes"
        )
    num_identities = identities.shape[0]
    if template == "mean":
        images = F.normalize(gallery, dim=1) if metric == "cosine" else gallery
        sums = images.new_zeros((num_identities, gallery.shape[1]))
        sums.index_add_(0, identity_of_image, images)
        counts = torch.bincount(identity_of_image, minlength=num_identities)
        keys = _prepare_keys(sums / counts.unsqueeze(1).to(sums.dtype), metric)
    else:
        keys = _prepare_keys(gallery, metric)

    best_scores, best_labels = [], []
    for start in range(0, probes.shape[0], batch_size):
        block = _similarity_block(probes[start : start + batch_size], keys, metric)
        if template == "max":
            per_identity = block.new_full((block.shape[0], num_identities), -math.inf)
            index = identity_of_image.expand(block.shape[0], -1)
            block = per_identity.scatter_reduce_(1, index, block, reduce="amax")
        # argmax returns the first maximum: ties go to the smallest label.
        best = torch.argmax(block, dim=1)
        best_scores.append(block.gather(1, best.unsqueeze(1)).squeeze(1))
        best_labels.append(identities[best])
    if not best_scores:
        return gallery_labels.new_empty((0,)), probes.new_empty((0,))
    return torch.cat(best_labels), torch.cat(best_scores)


def _check_open_set_args(
    probes: object,
    gallery: object,
    gallery_labels: object,
    unknown_label: object,
    metric: object,
    template: object,
    batch_size: object,
) -> tuple[Tensor, Tensor, Tensor, int, str, str, int]:
    metric = check_choice("metric", metric, _METRICS)
    template = check_choice("template", template, _TEMPLATES)
    batch_size = check_positive_int("batch_size", batch_size)
    unknown_label = _check_unknown_label(unknown_label)
    probes, gallery = _check_query_key(probes, gallery, "probes", "gallery")
    if gallery.shape[0] == 0:
        raise ValueError(
            f"gallery must hold at least one embedding, got shape {tuple(gallery.shape)}"
        )
    labels = _check_int_labels(gallery_labels, gallery.shape[0], "gallery_labels", "gallery")
    check_same_device(gallery=gallery, gallery_labels=labels)
    return probes.detach(), gallery.detach(), labels, unknown_label, metric, template, batch_size


def open_set_identify(
    probes: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    threshold: float,
    *,
    unknown_label: int = -1,
    metric: str = "cosine",
    template: str = "mean",
    batch_size: int = 4096,
) -> tuple[Tensor, Tensor]:
    r"""Open-set identification: the best-matching gallery identity, or "unknown".

    Each identity :math:`c` with gallery images :math:`G_c` is scored against a probe
    :math:`p` with :func:`pairwise_similarity` ``S``:

    .. math::

        \text{mean:}\ \ s_c(p) = S\Big(p, \frac{1}{|G_c|} \sum_{g \in G_c} \hat g\Big),
        \qquad
        \text{max:}\ \ s_c(p) = \max_{g \in G_c} S(p, g)

    with :math:`\hat g = g / \lVert g \rVert_2` for ``metric="cosine"`` and :math:`\hat g = g`
    for ``"euclidean"``.  The prediction is :math:`c^\star = \arg\max_c s_c(p)` (ties go to
    the smallest label), or ``unknown_label`` when :math:`s_{c^\star}(p) <` ``threshold``.

    Probes are processed ``batch_size`` at a time: the largest similarity block is
    ``batch_size x num_identities`` (mean) or ``batch_size x N_gallery`` (max).  Outputs are
    detached (this is an evaluation metric).

    Shape:
        - ``probes``: :math:`(Q, D)`, ``gallery``: :math:`(N, D)`, ``gallery_labels``:
          :math:`(N,)`.
        - ``predicted``, ``scores``: :math:`(Q,)`.

    Parameters
    ----------
    probes : Tensor
        Floating-point probe embeddings.
    gallery : Tensor
        Floating-point gallery embeddings, several rows per identity allowed.
    gallery_labels : Tensor
        Integer identity of each gallery row; must not contain ``unknown_label``.
    threshold : float
        Minimum best score to accept a match (``score >= threshold``); ``-inf`` makes the
        search closed-set.  See :func:`tune_open_set_threshold`.
    unknown_label : int, default -1
        The label predicted for rejected probes.
    metric : {"cosine", "euclidean"}, default "cosine"
        As :func:`pairwise_similarity` (Euclidean scores are negative distances).
    template : {"mean", "max"}, default "mean"
        One averaged template per identity, or the best image of each identity.
    batch_size : int, default 4096
        Probes per block.

    Returns
    -------
    predicted : Tensor
        int64 predicted identity, or ``unknown_label``.
    scores : Tensor
        The best score :math:`s_{c^\star}(p)` of each probe, whether accepted or not.

    Raises
    ------
    TypeError
        If an input is not a tensor of the expected dtype, or ``threshold`` /
        ``unknown_label`` are not numbers / ints.
    ValueError
        If shapes, ``embedding_dim`` or devices disagree, the gallery is empty, values are
        not finite, ``gallery_labels`` contains ``unknown_label``, ``threshold`` is NaN, or
        ``metric`` / ``template`` / ``batch_size`` are invalid.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import open_set_identify
    >>> gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> gallery_labels = torch.tensor([7, 7, 3])
    >>> probes = torch.tensor([[1.0, 0.05], [0.1, 1.0], [-1.0, -1.0]])
    >>> predicted, scores = open_set_identify(probes, gallery, gallery_labels, threshold=0.5)
    >>> predicted  # the last probe matches nobody well enough
    tensor([ 7,  3, -1])
    """
    threshold = _check_threshold(threshold)
    probes, gallery, labels, unknown_label, metric, template, batch_size = _check_open_set_args(
        probes, gallery, gallery_labels, unknown_label, metric, template, batch_size
    )
    predicted, scores = _identify(
        probes, gallery, labels, unknown_label, metric, template, batch_size
    )
    predicted = torch.where(
        scores < threshold, torch.full_like(predicted, unknown_label), predicted
    )
    return predicted, scores


def open_set_accuracy(predicted: Tensor, target: Tensor) -> float:
    r"""Fraction of probes whose predicted label equals the target label.

    .. math::

        \mathrm{acc} = \frac{1}{Q} \sum_q [\hat c_q = c_q]

    For open-set evaluation the target of a probe whose identity is not in the gallery is
    the ``unknown_label`` given to :func:`open_set_identify`, so a correct rejection counts
    as correct.

    Shape:
        - ``predicted``, ``target``: :math:`(Q,)`, :math:`Q \ge 1`.

    Parameters
    ----------
    predicted : Tensor
        Integer predicted labels, e.g. from :func:`open_set_identify`.
    target : Tensor
        Integer true labels on the same device.

    Returns
    -------
    float
        The accuracy in [0, 1].

    Raises
    ------
    TypeError
        If an input is not an integer tensor.
    ValueError
        If shapes or devices disagree or the tensors are empty.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import open_set_accuracy
    >>> open_set_accuracy(torch.tensor([7, 3, -1, -1]), torch.tensor([7, 3, -1, 5]))
    0.75
    """
    if not isinstance(predicted, Tensor):
        raise TypeError(f"predicted must be a torch.Tensor, got {type(predicted).__name__}")
    if not _is_integer_dtype(predicted.dtype):
        raise TypeError(
            f"predicted must be an integer tensor of labels, got dtype {predicted.dtype}"
        )
    if predicted.dim() != 1 or predicted.shape[0] == 0:
        raise ValueError(
            f"predicted must be a non-empty 1-D tensor of labels, got shape {tuple(predicted.shape)}"
        )
    target = _check_int_labels(target, predicted.shape[0], "target", "predicted")
    check_same_device(predicted=predicted, target=target)
    return int((predicted.detach() == target).sum()) / predicted.shape[0]


def tune_open_set_threshold(
    probes: Tensor,
    probe_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    *,
    unknown_label: int = -1,
    metric: str = "cosine",
    template: str = "mean",
    batch_size: int = 4096,
) -> tuple[float, float]:
    r"""The :func:`open_set_identify` threshold with the best :func:`open_set_accuracy`.

    With :math:`(c^\star_q, s_q)` the best identity and score of probe :math:`q` and
    :math:`c_q` its true label (``unknown_label`` for probes outside the gallery),

    .. math::

        \mathrm{acc}(t) = \frac{1}{Q} \sum_q \Big( [s_q \ge t]\,[c^\star_q = c_q]
            + [s_q < t]\,[c_q = \text{unknown}] \Big)

    changes only at the scores :math:`s_q`, so the search over ``+inf`` (reject every
    probe) and every distinct :math:`s_q` (the smallest one accepts every probe, like
    ``-inf``) is exact — one sort, no grid.  **Ties:** among thresholds with the same
    accuracy the largest is returned, i.e. the one accepting the fewest probes.
    ``open_set_identify(..., threshold=t)`` with the same ``metric``, ``template`` and
    ``batch_size`` reproduces the accuracy.  Tune on data disjoint from the evaluation set.

    Shape:
        - ``probes``: :math:`(Q, D)`, ``probe_labels``: :math:`(Q,)`, :math:`Q \ge 1`.
        - ``gallery``: :math:`(N, D)`, ``gallery_labels``: :math:`(N,)`.

    Parameters
    ----------
    probes, gallery, gallery_labels, unknown_label, metric, template, batch_size
        As :func:`open_set_identify`.
    probe_labels : Tensor
        Integer true identity of each probe, ``unknown_label`` for identities not in the
        gallery.

    Returns
    -------
    threshold : float
        The best threshold: one of the best scores, or ``inf``.
    accuracy : float
        The open-set accuracy at that threshold.

    Raises
    ------
    TypeError, ValueError
        As :func:`open_set_identify`; also when ``probe_labels`` does not match ``probes``
        or there are no probes.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import tune_open_set_threshold
    >>> gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> gallery_labels = torch.tensor([0, 1])
    >>> probes = torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, 0.9], [0.7, 1.0]])
    >>> probe_labels = torch.tensor([0, 1, -1, -1])
    >>> threshold, accuracy = tune_open_set_threshold(probes, probe_labels, gallery, gallery_labels)
    >>> round(threshold, 4), accuracy
    (0.9806, 1.0)
    """
    probes, gallery, labels, unknown_label, metric, template, batch_size = _check_open_set_args(
        probes, gallery, gallery_labels, unknown_label, metric, template, batch_size
    )
    if probes.shape[0] == 0:
        raise ValueError(
            "probes must hold at least one probe to tune a threshold, got shape "
            f"{tuple(probes.shape)}"
        )
    targets = _check_int_labels(probe_labels, probes.shape[0], "probe_labels", "probes")
    check_same_device(probes=probes, probe_labels=targets)
    predicted, scores = _identify(
        probes, gallery, labels, unknown_label, metric, template, batch_size
    )
    num_correct, threshold = _best_threshold(scores, predicted == targets, targets == unknown_label)
    return threshold, num_correct / probes.shape[0]
