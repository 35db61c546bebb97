"""Verification, identification and retrieval metrics, exact and at gallery scale.

Four families, in pure PyTorch, on whatever device the inputs live on:

* **Pair verification** (1:1) — a 1-D tensor of pair ``scores`` (higher = more similar)
  and a 1-D ``is_same`` tensor of 0/1 (or bool) labels: :func:`roc_curve`, :func:`roc_auc`,
  :func:`equal_error_rate`, :func:`tar_at_far`, the ISO/IEC 19795-1 :func:`det_curve` and
  :func:`fnmr_at_fmr`, :func:`best_threshold_accuracy` and the LFW protocol
  :func:`kfold_accuracy`.  Every metric is computed *exactly* over the distinct score values
  (no threshold grid); tied scores are accepted or rejected together, as in scikit-learn.
* **Closed-set identification** (1:N) — probes against a gallery of identities (one
  averaged template or the best image per identity): :func:`cmc_curve` (rank-1, rank-5).
* **Open-set identification** (1:N with strangers, IJB-C) — :func:`tpir_fpir_curve`,
  :func:`tpir_at_fpir`, and with a tuned threshold :func:`open_set_identify`,
  :func:`open_set_accuracy`, :func:`tune_open_set_threshold`.
* **Retrieval** (metric learning) — :func:`precision_at_k`, :func:`recall_at_k`,
  :func:`map_at_k`, :func:`r_precision`, :func:`map_at_r` and all of them at once,
  :func:`retrieval_metrics`.

Similarities come from :func:`pairwise_similarity` (cosine or negative Euclidean, norms
computed safely over the whole float range).  Every search — :func:`topk_similarity` and
the identification and retrieval metrics — runs in blocks with a **running top-k**: at
most about ``batch_size x gallery_batch_size`` scores exist at once, never the full
``[probes, gallery]`` matrix, and the result does not depend on the block sizes.  Ranking
ties are broken by index (retrieval) or by label (identification), so every number is
defined exactly.  Rates and sums of many per-query terms are taken in float64 (float32 on
MPS).

Scalar metrics are returned as Python ``float``.  Checks on tensor *values* (finite
scores and embeddings, 0/1 ``is_same``, ``gallery_labels`` free of ``unknown_label``,
probes of :func:`cmc_curve` enrolled in the gallery) follow
:func:`marginloss.set_validation`; shape, dtype and argument checks always run, and so do
the checks the metric needs anyway (classes present, relevant references).  Inputs are
never modified.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from marginloss._validation import (
    _check_values,
    check_choice,
    check_positive_int,
    check_same_device,
)

__all__ = [
    "best_threshold_accuracy",
    "cmc_curve",
    "det_curve",
    "equal_error_rate",
    "fnmr_at_fmr",
    "kfold_accuracy",
    "map_at_k",
    "map_at_r",
    "open_set_accuracy",
    "open_set_identify",
    "pairwise_similarity",
    "precision_at_k",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "topk_similarity",
    "tpir_at_fpir",
    "tpir_fpir_curve",
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


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_unknown_label(unknown_label: object) -> int:
    if isinstance(unknown_label, bool) or not isinstance(unknown_label, int):
        raise TypeError(
            f"unknown_label must be an int, got {type(unknown_label).__name__} {unknown_label!r}"
        )
    if not _INT64_MIN <= unknown_label <= _INT64_MAX:
        # Labels are int64 tensors: a larger int cannot be compared with them or stored.
        raise ValueError(
            f"unknown_label must fit in int64, i.e. lie in [{_INT64_MIN}, {_INT64_MAX}], "
            f"got {unknown_label!r}"
        )
    return unknown_label


def _check_rates(name: str, rates: object) -> list[float]:
    """An operating point or an iterable of them, each a real number in [0, 1]."""
    if isinstance(rates, (int, float)) and not isinstance(rates, bool):
        rate_list: list[object] = [rates]
    elif isinstance(rates, Iterable) and not isinstance(rates, (str, bytes)):
        rate_list = list(rates)
    else:
        raise TypeError(
            f"{name} must be a real number or an iterable of them, got "
            f"{type(rates).__name__} {rates!r}"
        )
    checked = []
    for rate in rate_list:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise TypeError(f"{name} must hold real numbers, got {type(rate).__name__} {rate!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {rate!r}")
        checked.append(float(rate))
    return list(dict.fromkeys(checked))


def _check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(
            f"threshold must be a real number, got {type(threshold).__name__} {threshold!r}"
        )
    if math.isnan(threshold):
        raise ValueError(f"threshold must not be NaN, got {threshold!r}")
    return float(threshold)


_FINITE_CHECK_ROWS = 8192


def _check_embeddings(embeddings: object, name: str) -> Tensor:
    """A ``[N, D]`` floating-point tensor, finite when values are checked.

    The finite check reads the minimum and maximum of blocks of rows (one device sync):
    ``isfinite`` of a whole ``10^6 x 512`` gallery would allocate about twice the gallery in
    temporaries and cost as much time as a block of the search.
    """
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(
            f"{name} must have shape [batch, embedding_dim], got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {embeddings.dtype}")
    if _check_values() and embeddings.numel() > 0:
        # min and max propagate NaN and show +-inf: one pass, no temporaries, one sync.
        extremes = torch.stack(
            [
                torch.stack(torch.aminmax(embeddings[start : start + _FINITE_CHECK_ROWS].detach()))
                for start in range(0, embeddings.shape[0], _FINITE_CHECK_ROWS)
            ]
        )
        if not bool(torch.isfinite(extremes).all()):
            bad = sum(
                int((~torch.isfinite(embeddings[start : start + _FINITE_CHECK_ROWS].detach())).sum())
                for start in range(0, embeddings.shape[0], _FINITE_CHECK_ROWS)
            )
            raise ValueError(
                f"{name} must be finite, got {int(bad)} NaN/inf value(s) in a tensor of shape "
                f"{tuple(embeddings.shape)}"
            )
    return embeddings


def _check_query_key(
    queries: object, keys: object, queries_name: str, keys_name: str
) -> tuple[Tensor, Tensor]:
    """Check two ``[*, D]`` float tensors agree on D and device; promote to one dtype."""
    queries = _check_embeddings(queries, name=queries_name)
    if not isinstance(keys, Tensor):
        raise TypeError(f"{keys_name} must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dim() != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(
            f"{keys_name} must have shape [num_{keys_name}, {queries.shape[1]}] to match the "
            f"embedding_dim of {queries_name} (shape {tuple(queries.shape)}), "
            f"got shape {tuple(keys.shape)}"
        )
    check_same_device(**{queries_name: queries, keys_name: keys})
    keys = _check_embeddings(keys, name=keys_name)
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


def _true_count_at(
    false_counts: Tensor, true_counts: Tensor, num_negative: int, alphas: list[float]
) -> list[int]:
    """True counts at the smallest threshold whose false rate does not exceed each alpha.

    Both counts rise along the sweep (thresholds decreasing), so the last point with
    ``false / num_negative <= alpha`` (the rate compared in float64, as returned by the
    curves) has the most true accepts: exact, no interpolation.
    """
    dtype = _rate_dtype(false_counts.device)
    rates = false_counts.to(dtype) / num_negative
    targets = torch.tensor(alphas, dtype=dtype, device=false_counts.device)
    last = torch.searchsorted(rates, targets, right=True) - 1
    return [int(count) for count in true_counts[last].tolist()]


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
    :math:`\alpha` (no interpolation).  **How the threshold is chosen:** it is the smallest
    distinct score :math:`t` with :math:`\mathrm{FPR}(t) \le \alpha` (FPR compared exactly as
    the float64 ratio of integer counts); a pair is accepted when its score is
    :math:`\ge t`.  Equivalently, with :math:`m = \max\{j : j / N_- \le \alpha\}` and
    :math:`n_{(m+1)}` the :math:`(m+1)`-th largest negative score, TAR is the share of
    positives scoring *strictly* above :math:`n_{(m+1)}`.  **Ties:** tied scores are
    accepted or rejected together, so when a tie of negatives straddles :math:`\alpha` the
    whole tie is rejected and the achieved FPR lies below :math:`\alpha`; a positive tied
    with :math:`n_{(m+1)}` is rejected.  With :math:`N_-` negative pairs, FPR moves in steps
    of :math:`1/N_-`: TAR@FAR at :math:`10^{-6}` needs at least :math:`10^6` negatives to
    mean anything, and for :math:`\alpha < 1/N_-` the result is the TPR at FPR = 0 (the
    positives scored above every negative), which may be 0.

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
    alphas = _check_rates("fars", fars)
    scores, same = _check_pair_inputs(scores, is_same)
    num_positive, num_negative = _check_both_classes(same, "tar_at_far")
    false_positives, true_positives, _ = _roc_counts(scores, same)
    accepted = _true_count_at(false_positives, true_positives, num_negative, alphas)
    return {alpha: count / num_positive for alpha, count in zip(alphas, accepted)}


def det_curve(scores: Tensor, is_same: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Detection error tradeoff: false non-match rate against false match rate.

    In the vocabulary of ISO/IEC 19795-1 (biometric performance testing), a pair is a
    *genuine* attempt when ``is_same`` and an *impostor* attempt otherwise; it is declared a
    match when its score is at least the threshold :math:`t`:

    .. math::

        \mathrm{FMR}(t) = \frac{|\{i : s_i \ge t,\ y_i = 0\}|}{N_-}, \qquad
        \mathrm{FNMR}(t) = \frac{|\{i : s_i < t,\ y_i = 1\}|}{N_+}

    i.e. FMR = FPR and FNMR = 1 − TPR of :func:`roc_curve`, at the same points (``+inf``
    then every distinct score, decreasing; ties form one point).  Every failure to acquire
    is taken as zero, so FMR and FNMR coincide with the standard's FAR and FRR.
    ``sklearn.metrics.det_curve`` returns a contiguous run of these points in reverse
    order (it drops the leading points with FNMR = 1 before the last one and the trailing
    ones after FNMR first reaches 0).  Plot on normal-deviate axes (Martin et al., "The DET
    curve in assessment of detection task performance", Eurospeech 1997).

    Shape:
        - ``scores``, ``is_same``: :math:`(N,)`.
        - ``fmr``, ``fnmr``, ``thresholds``: :math:`(T + 1,)`.

    Parameters
    ----------
    scores : Tensor
        Floating-point similarity of each pair; higher means more alike.
    is_same : Tensor
        Bool or 0/1 integer tensor, 1 where the pair shows the same identity.

    Returns
    -------
    fmr : Tensor
        Non-decreasing, float64 (float32 on MPS).
    fnmr : Tensor
        Non-increasing, computed from integer counts (exact up to one division).
    thresholds : Tensor
        Strictly decreasing, ``thresholds[0] = +inf``.

    Raises
    ------
    TypeError, ValueError
        As :func:`roc_curve` (both classes are needed).

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import det_curve
    >>> fmr, fnmr, thresholds = det_curve(torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1]),
    ...                                   torch.tensor([1, 1, 0, 1, 0]))
    >>> fmr
    tensor([0.0000, 0.0000, 0.5000, 0.5000, 1.0000], dtype=torch.float64)
    >>> fnmr
    tensor([1.0000, 0.6667, 0.3333, 0.0000, 0.0000], dtype=torch.float64)
    """
    scores, same = _check_pair_inputs(scores, is_same)
    num_positive, num_negative = _check_both_classes(same, "det_curve")
    false_matches, true_matches, thresholds = _roc_counts(scores, same)
    dtype = _rate_dtype(scores.device)
    fmr = false_matches.to(dtype) / num_negative
    fnmr = (num_positive - true_matches).to(dtype) / num_positive
    return fmr, fnmr, thresholds


def fnmr_at_fmr(
    scores: Tensor,
    is_same: Tensor,
    fmrs: Iterable[float] | float = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
) -> dict[float, float]:
    r"""False non-match rate at fixed false match rates (FNMR@FMR, ISO/IEC 19795-1).

    .. math::

        \mathrm{FNMR@FMR}(\alpha) = \min\{\mathrm{FNMR}(t) : \mathrm{FMR}(t) \le \alpha\}
            = 1 - \mathrm{TAR@FAR}(\alpha)

    at exactly the threshold :func:`tar_at_far` chooses (the smallest distinct score whose
    FMR does not exceed :math:`\alpha`; tied scores accepted together, no interpolation),
    computed from the integer count of rejected genuine pairs.  NIST FRVT 1:1 reports FNMR at
    FMR = :math:`10^{-6}` and above; below :math:`1/N_-` the FMR = 0 point is read.

    Shape:
        - ``scores``, ``is_same``: :math:`(N,)`.

    Parameters
    ----------
    scores : Tensor
        Floating-point similarity of each pair; higher means more alike.
    is_same : Tensor
        Bool or 0/1 integer tensor, 1 where the pair shows the same identity.
    fmrs : iterable of float or float, default (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
        The false match rates :math:`\alpha \in [0, 1]`.

    Returns
    -------
    dict[float, float]
        ``{fmr: fnmr}`` in the order of ``fmrs``.

    Raises
    ------
    TypeError, ValueError
        As :func:`tar_at_far`.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import fnmr_at_fmr
    >>> scores = torch.tensor([0.9, 0.7, 0.6, 0.4, 0.2, 0.1])
    >>> is_same = torch.tensor([1, 1, 0, 1, 0, 0])
    >>> fnmr_at_fmr(scores, is_same, fmrs=(0.0, 0.5))
    {0.0: 0.3333333333333333, 0.5: 0.0}
    """
    alphas = _check_rates("fmrs", fmrs)
    scores, same = _check_pair_inputs(scores, is_same)
    num_positive, num_negative = _check_both_classes(same, "fnmr_at_fmr")
    false_matches, true_matches, _ = _roc_counts(scores, same)
    accepted = _true_count_at(false_matches, true_matches, num_negative, alphas)
    return {alpha: (num_positive - count) / num_positive for alpha, count in zip(alphas, accepted)}


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


def _unit_rows(rows: Tensor) -> Tensor:
    """L2-normalise rows without overflow or underflow of the squared norm.

    Each row is first divided by its largest absolute entry (a scale the cosine does not
    depend on), so the sum of squares lies in ``[1, D]`` for every finite row: norms from
    the smallest subnormal to the largest float of the dtype come out right.  The scale is
    detached: the cosine is invariant to it, so the gradient is unchanged.  Zero rows stay
    zero (``torch.nn.functional.normalize`` semantics).
    """
    if rows.shape[-1] == 0:
        return rows
    low, high = torch.aminmax(rows.detach(), dim=1, keepdim=True)
    scale = torch.maximum(high, -low)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return F.normalize(rows / scale, dim=1)


def _euclidean_block(queries: Tensor, keys: Tensor) -> Tensor:
    r"""Negative Euclidean distances, computed on inputs scaled by one power of two.

    Both blocks are multiplied by :math:`2^{-e}` with :math:`2^{e-1} \le \max |x| < 2^e`
    (exact: a power of two) so that squared norms neither overflow above ~1e19 nor underflow
    below ~1e-19 in float32; the distances are scaled back in float64 and cast to the dtype
    (``inf`` only where the distance itself exceeds the dtype's range).
    """
    dtype = queries.dtype
    if queries.numel() == 0 or keys.numel() == 0:
        return queries.new_zeros((queries.shape[0], keys.shape[0]))
    wide = _rate_dtype(queries.device)
    largest = torch.maximum(queries.detach().abs().amax(), keys.detach().abs().amax()).to(wide)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))
    exponent = torch.frexp(largest).exponent.clamp(-1000, 1000).to(wide)
    down, up = torch.exp2(-exponent), torch.exp2(exponent)
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    # cdist lacks half kernels on CPU, and its |q|^2 + |k|^2 - 2<q, k> expansion would
    # cancel catastrophically in half precision anyway: half inputs are measured in float32.
    scaled_queries = (queries.to(wide) * down).to(compute)
    scaled_keys = (keys.to(wide) * down).to(compute)
    distances = torch.cdist(scaled_queries, scaled_keys)
    return -(distances.to(wide) * up).to(dtype)


def _similarity_block(queries: Tensor, keys: Tensor, metric: str) -> Tensor:
    """``[len(queries), len(keys)]`` similarities of one block (higher = more similar)."""
    if metric == "cosine":
        return _unit_rows(queries) @ _unit_rows(keys).T
    return _euclidean_block(queries, keys)


# ---------------------------------------------------------------- blocked search


class _Items(NamedTuple):
    """What a search ranks: items scored from rows of ``keys``, in blocks.

    With ``item_of_row is None`` every row of ``keys`` is one item.  Otherwise the rows
    ``keys[order]`` are grouped by item (contiguous, items in increasing order) and an
    item's score is the largest score of its rows (the "max" template).  ``blocks`` lists
    ``(item_start, item_stop, row_start, row_stop)``; a block never splits an item.
    """

    keys: Tensor
    order: Tensor | None
    item_of_row: Tensor | None
    blocks: list[tuple[int, int, int, int]]
    num_items: int


def _row_items(keys: Tensor, block_rows: int) -> _Items:
    n = keys.shape[0]
    blocks = [(start, min(start + block_rows, n), start, min(start + block_rows, n))
              for start in range(0, n, block_rows)]
    return _Items(keys, None, None, blocks, n)


def _grouped_items(keys: Tensor, item_of_key: Tensor, num_items: int, block_rows: int) -> _Items:
    """Items made of several key rows each; blocks hold whole items, about ``block_rows`` rows."""
    item_of_row, order = torch.sort(item_of_key, stable=True)
    counts = torch.bincount(item_of_key, minlength=num_items).cpu()
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    # A block starts at the first item whose rows start at or after each multiple of block_rows.
    cuts = torch.searchsorted(offsets[:-1], torch.arange(0, int(offsets[-1]), block_rows))
    starts = torch.unique(cuts).tolist()
    stops = [*starts[1:], num_items]
    row_offsets = offsets.tolist()
    blocks = [(a, b, row_offsets[a], row_offsets[b]) for a, b in zip(starts, stops)]
    return _Items(keys, order, item_of_row, blocks, num_items)


def _block_rows(items: _Items, block: tuple[int, int, int, int]) -> Tensor:
    _, _, row_start, row_stop = block
    if items.order is None:
        return items.keys[row_start:row_stop]
    return items.keys.index_select(0, items.order[row_start:row_stop])


def _item_maxima(scores: Tensor, items: _Items, block: tuple[int, int, int, int]) -> Tensor:
    """Per-item maxima ``[rows of scores, items of the block]`` of image scores."""
    item_start, item_stop, row_start, row_stop = block
    local = (items.item_of_row[row_start:row_stop] - item_start).expand(scores.shape[0], -1)  # type: ignore[index]
    per_item = scores.new_full((scores.shape[0], item_stop - item_start), -math.inf)
    return per_item.scatter_reduce_(1, local, scores, reduce="amax")


def _grouped_topk(
    scores: Tensor, items: _Items, block: tuple[int, int, int, int], k: int
) -> tuple[Tensor, Tensor]:
    """Top ``k`` items by their best row, ordered by score then item index.

    An item's score is its best row's score, so ordering rows by (score, row index) and
    keeping the first row of each item orders the items by (score, item index): rows are
    sorted by item.  The first ``k`` distinct items among the top ``4k`` rows are therefore
    the exact answer; a query row whose top ``4k`` rows hold fewer than ``k`` distinct items
    falls back to the per-item maxima (a scatter, about twice the cost of ``topk``).
    """
    item_start, item_stop, row_start, row_stop = block
    k = min(k, item_stop - item_start)
    depth = min(row_stop - row_start, 4 * k)
    values, rows = _block_topk(scores, depth)
    item_of_row = items.item_of_row[row_start:row_stop] - item_start  # type: ignore[index]
    found = item_of_row[rows]
    earlier = torch.ones(depth, depth, dtype=torch.bool, device=scores.device).tril(-1)
    repeated = ((found.unsqueeze(2) == found.unsqueeze(1)) & earlier).any(dim=2)
    first = ~repeated
    # Stable: the first occurrences keep their order and come before the repeats.
    order = torch.sort(repeated.to(torch.uint8), dim=1, stable=True).indices[:, :k]
    top_values, top_items = values.gather(1, order), found.gather(1, order)
    short = first.sum(dim=1) < k
    if bool(short.any()):
        lacking = torch.nonzero(short).squeeze(1)
        maxima = _item_maxima(scores[lacking], items, block)
        top_values[lacking], top_items[lacking] = _block_topk(maxima, k)
    return top_values, top_items


def _block_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` of each row, ordered by decreasing score and, among equal scores, by index.

    ``torch.topk`` leaves the order of ties open; here ties inside the top k are reordered
    by index, and a row whose k-th and (k+1)-th scores tie (so that ``topk`` may have picked
    either) is redone with a stable sort.  Ties are rare, so this costs ``topk`` plus a sort
    of ``k`` columns.
    """
    n = scores.shape[1]
    if k >= n:
        values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
        return values[:, :k], indices[:, :k]
    values, indices = torch.topk(scores, k + 1, dim=1, sorted=True)
    boundary_tie = values[:, k - 1] == values[:, k]
    values, indices = values[:, :k], indices[:, :k]
    indices, order = torch.sort(indices, dim=1)
    values, order = torch.sort(values.gather(1, order), dim=1, descending=True, stable=True)
    indices = indices.gather(1, order)
    if bool(boundary_tie.any()):
        rows = torch.nonzero(boundary_tie).squeeze(1)
        tied_values, tied_indices = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values[rows], indices[rows] = tied_values[:, :k], tied_indices[:, :k]
    return values, indices


def _search(
    queries: Tensor,
    items: _Items,
    k: int,
    metric: str,
    batch_size: int,
    exclude_self: bool = False,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(start, values, indices)``: the top ``k`` items of each block of queries.

    A running top-k over the item blocks: at most ``batch_size x block`` scores exist at
    once, plus ``batch_size x 2k`` for the merge.  Order: decreasing score, ties by smaller
    item index (blocks run in increasing item order and the merge sort is stable).  With
    ``exclude_self`` query ``i`` never retrieves item ``i`` (the queries are the items).
    """
    for start in range(0, queries.shape[0], batch_size):
        block_queries = queries[start : start + batch_size]
        rows = torch.arange(block_queries.shape[0], device=queries.device)
        best_values: Tensor | None = None
        best_indices: Tensor | None = None
        for block in items.blocks:
            scores = _similarity_block(block_queries, _block_rows(items, block), metric)
            if items.item_of_row is not None:
                values, indices = _grouped_topk(scores, items, block, k)
            else:
                if exclude_self:
                    columns = rows + (start - block[0])
                    inside = (columns >= 0) & (columns < scores.shape[1])
                    scores[rows[inside], columns[inside]] = -math.inf
                values, indices = _block_topk(scores, min(k, scores.shape[1]))
            indices = indices + block[0]
            if best_values is not None and best_indices is not None:
                values = torch.cat([best_values, values], dim=1)
                indices = torch.cat([best_indices, indices], dim=1)
                values, order = torch.sort(values, dim=1, descending=True, stable=True)
                values, indices = values[:, :k], indices.gather(1, order[:, :k])
            best_values, best_indices = values, indices
        if best_values is not None and best_indices is not None:
            yield start, best_values, best_indices


def pairwise_similarity(queries: Tensor, keys: Tensor, metric: str = "cosine") -> Tensor:
    r"""Similarity of every query to every key; higher is always more similar.

    .. math::

        S_{qk} = \frac{\langle x_q, y_k \rangle}{\lVert x_q \rVert_2 \lVert y_k \rVert_2}
        \ \ (\text{cosine}), \qquad
        S_{qk} = -\lVert x_q - y_k \rVert_2 \ \ (\text{euclidean})

    The Euclidean metric returns the *negative* distance so that every function here can
    treat a larger value as a better match.  A zero vector has cosine similarity 0 with
    everything (``torch.nn.functional.normalize`` semantics).  Differentiable.

    **Extreme norms.**  Norms are computed safely over the whole range of the dtype: for
    the cosine each row is divided by its largest absolute entry before it is normalised,
    and for the distance both inputs are scaled by one power of two (exact) and the distance
    scaled back, so rows of norm ``1e20`` or ``1e-25`` in float32 give the cosines and
    distances float64 gives, where a plain ``x / x.norm()`` overflows or underflows the
    squared norm.  (The distance shares one scale per block: between two rows far smaller
    than the largest row of the block it keeps float32's precision relative to that row.)

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
    return _similarity_block(queries, keys, metric)


def topk_similarity(
    queries: Tensor,
    keys: Tensor,
    k: int = 1,
    metric: str = "cosine",
    batch_size: int = 4096,
    *,
    key_batch_size: int = 16384,
) -> tuple[Tensor, Tensor]:
    r"""The ``k`` most similar keys of each query, in blocks with a running top-k.

    Same similarity as :func:`pairwise_similarity`, but only a
    :math:`\text{batch\_size} \times \text{key\_batch\_size}` block of scores (plus the
    :math:`\text{batch\_size} \times 2k` running top-k) exists at any time, so a
    :math:`10^5 \times 10^6` search never builds the full matrix.  The result does not depend
    on the block sizes.  **Order:** decreasing similarity; exactly tied values are ordered
    by increasing key index (a total order, so which of several tied keys makes the top
    ``k`` is defined: the ones with the smaller indices).

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
        Queries per block.
    key_batch_size : int, default 16384
        Keys per block: the block holds ``batch_size * key_batch_size`` scores (256 MiB in
        float32 with the defaults; ``torch.topk``'s work copy about doubles it).

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
        ``batch_size`` / ``key_batch_size`` is not a positive int.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import topk_similarity
    >>> queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
    >>> keys = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
    >>> values, indices = topk_similarity(queries, keys, k=2, batch_size=2, key_batch_size=2)
    >>> indices  # 2 x 2 blocks of scores, never the 3 x 3 matrix
    tensor([[0, 1],
            [1, 0],
            [2, 1]])
    """
    metric = check_choice("metric", metric, _METRICS)
    batch_size = check_positive_int("batch_size", batch_size)
    key_batch_size = check_positive_int("key_batch_size", key_batch_size)
    queries, keys = _check_query_key(queries, keys, "queries", "keys")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k must be an int in [1, num_keys] = [1, {keys.shape[0]}], got {k!r}")
    values, indices = [], []
    for _, block_values, block_indices in _search(
        queries, _row_items(keys, key_batch_size), k, metric, batch_size
    ):
        values.append(block_values)
        indices.append(block_indices)
    if not values:
        empty = queries.new_empty((0, k))
        return empty, empty.new_empty((0, k), dtype=torch.long)
    return torch.cat(values), torch.cat(indices)


# ---------------------------------------------------------------- open-set identification


class _Gallery(NamedTuple):
    """A checked gallery, ready to be searched by identity."""

    probes: Tensor
    items: _Items
    identities: Tensor  # sorted distinct labels; item i is identity identities[i]
    metric: str
    batch_size: int


def _identity_items(
    gallery: Tensor, labels: Tensor, metric: str, template: str, gallery_batch_size: int
) -> tuple[_Items, Tensor]:
    """One item per identity: its mean template, or its images scored by their maximum."""
    identities, identity_of_image = torch.unique(labels, sorted=True, return_inverse=True)
    num_identities = identities.shape[0]
    if template == "max":
        items = _grouped_items(gallery, identity_of_image, num_identities, gallery_batch_size)
        return items, identities
    sums = gallery.new_zeros((num_identities, gallery.shape[1]))
    for start in range(0, gallery.shape[0], gallery_batch_size):
        images = gallery[start : start + gallery_batch_size]
        sums.index_add_(
            0,
            identity_of_image[start : start + gallery_batch_size],
            _unit_rows(images) if metric == "cosine" else images,
        )
    counts = torch.bincount(identity_of_image, minlength=num_identities)
    templates = sums / counts.unsqueeze(1).to(sums.dtype)
    return _row_items(templates, gallery_batch_size), identities


def _check_gallery(
    probes: object,
    gallery: object,
    gallery_labels: object,
    metric: object,
    template: object,
    batch_size: object,
    gallery_batch_size: object,
) -> _Gallery:
    metric = check_choice("metric", metric, _METRICS)
    template = check_choice("template", template, _TEMPLATES)
    batch_size = check_positive_int("batch_size", batch_size)
    gallery_batch_size = check_positive_int("gallery_batch_size", gallery_batch_size)
    probes, gallery = _check_query_key(probes, gallery, "probes", "gallery")
    if gallery.shape[0] == 0:
        raise ValueError(
            f"gallery must hold at least one embedding, got shape {tuple(gallery.shape)}"
        )
    labels = _check_int_labels(gallery_labels, gallery.shape[0], "gallery_labels", "gallery")
    check_same_device(gallery=gallery, gallery_labels=labels)
    items, identities = _identity_items(
        gallery.detach(), labels, metric, template, gallery_batch_size
    )
    return _Gallery(probes.detach(), items, identities, metric, batch_size)


def _identify(searched: _Gallery, unknown_label: int) -> tuple[Tensor, Tensor]:
    """Best identity and its score for every probe, before any threshold."""
    identities = searched.identities
    if _check_values() and bool((identities == unknown_label).any()):
        raise ValueError(
            f"gallery_labels must not contain unknown_label={unknown_label}: it marks "
            "rejected probes"
        )
    best_scores, best_labels = [], []
    # Ties go to the smaller item index, i.e. the smaller label (identities are sorted).
    for _, values, indices in _search(
        searched.probes, searched.items, 1, searched.metric, searched.batch_size
    ):
        best_scores.append(values[:, 0])
        best_labels.append(identities[indices[:, 0]])
    if not best_scores:
        return identities.new_empty((0,)), searched.probes.new_empty((0,))
    return torch.cat(best_labels), torch.cat(best_scores)


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
    gallery_batch_size: int = 16384,
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

    Probes are processed ``batch_size`` at a time against ``gallery_batch_size`` templates
    (mean) or gallery images (max, whole identities per block) at a time, so the largest
    similarity block is about ``batch_size x gallery_batch_size``.  Outputs are detached
    (this is an evaluation metric).

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
    gallery_batch_size : int, default 16384
        Templates (mean) or gallery images (max) per block.

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
        not finite, ``gallery_labels`` contains ``unknown_label``, ``unknown_label`` is
        outside the int64 range, ``threshold`` is NaN, or ``metric`` / ``template`` /
        ``batch_size`` / ``gallery_batch_size`` are invalid.

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
    unknown_label = _check_unknown_label(unknown_label)
    searched = _check_gallery(
        probes, gallery, gallery_labels, metric, template, batch_size, gallery_batch_size
    )
    predicted, scores = _identify(searched, unknown_label)
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
    gallery_batch_size: int = 16384,
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
    ``open_set_identify(..., threshold=t)`` with the same ``metric`` and ``template``
    reproduces the accuracy.  Tune on data disjoint from the evaluation set.

    Shape:
        - ``probes``: :math:`(Q, D)`, ``probe_labels``: :math:`(Q,)`, :math:`Q \ge 1`.
        - ``gallery``: :math:`(N, D)`, ``gallery_labels``: :math:`(N,)`.

    Parameters
    ----------
    probes, gallery, gallery_labels, unknown_label, metric, template, batch_size, gallery_batch_size
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
    unknown_label = _check_unknown_label(unknown_label)
    searched = _check_gallery(
        probes, gallery, gallery_labels, metric, template, batch_size, gallery_batch_size
    )
    probes = searched.probes
    if probes.shape[0] == 0:
        raise ValueError(
            "probes must hold at least one probe to tune a threshold, got shape "
            f"{tuple(probes.shape)}"
        )
    targets = _check_int_labels(probe_labels, probes.shape[0], "probe_labels", "probes")
    check_same_device(probes=probes, probe_labels=targets)
    predicted, scores = _identify(searched, unknown_label)
    num_correct, threshold = _best_threshold(scores, predicted == targets, targets == unknown_label)
    return threshold, num_correct / probes.shape[0]


# ---------------------------------------------------------------- closed- and open-set ranks


def _probe_ranks(
    searched: _Gallery, probe_labels: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per probe: mated, 0-based position of its identity in the top ``k`` (``k`` if absent),
    the score there (``-inf`` if absent) and the best score of any identity."""
    identities = searched.identities
    index = torch.searchsorted(identities, probe_labels).clamp(max=identities.shape[0] - 1)
    mated = identities[index] == probe_labels
    target = torch.where(mated, index, torch.full_like(index, -1))
    positions, hit_scores, top_scores = [], [], []
    for start, values, indices in _search(
        searched.probes, searched.items, k, searched.metric, searched.batch_size
    ):
        found = indices == target[start : start + indices.shape[0]].unsqueeze(1)
        anywhere = found.any(dim=1)
        first = torch.argmax(found.to(torch.uint8), dim=1)
        positions.append(torch.where(anywhere, first, torch.full_like(first, k)))
        hit = values.gather(1, first.unsqueeze(1)).squeeze(1)
        hit_scores.append(torch.where(anywhere, hit, torch.full_like(hit, -math.inf)))
        top_scores.append(values[:, 0])
    return mated, torch.cat(positions), torch.cat(hit_scores), torch.cat(top_scores)


def _check_probe_labels(searched: _Gallery, probe_labels: object, fn: str) -> Tensor:
    probes = searched.probes
    if probes.shape[0] == 0:
        raise ValueError(f"probes must hold at least one probe for {fn}, got shape {tuple(probes.shape)}")
    labels = _check_int_labels(probe_labels, probes.shape[0], "probe_labels", "probes")
    check_same_device(probes=probes, probe_labels=labels)
    return labels


def cmc_curve(
    probes: Tensor,
    probe_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    max_rank: int = 10,
    *,
    metric: str = "cosine",
    template: str = "mean",
    batch_size: int = 4096,
    gallery_batch_size: int = 16384,
) -> Tensor:
    r"""Cumulative match characteristic: the rank-:math:`r` identification rate, :math:`r \le` ``max_rank``.

    Closed-set identification (ISO/IEC 19795-1; the CMC of Grother & Phillips, "Models of
    large population recognition performance", CVPR 2004): every probe's identity is in the
    gallery; the identities are ranked by the score :math:`s_c(p)` of
    :func:`open_set_identify` (``template="mean"`` or ``"max"``) and

    .. math::

        \mathrm{CMC}(r) = \frac{1}{Q} \sum_{q} \big[\operatorname{rank}_q \le r\big],
        \qquad \operatorname{rank}_q = 1 + \big|\{c \prec c_q\}\big|

    where :math:`c \prec c_q` orders the identities by decreasing score and, **on ties, by
    increasing label** (so a tie with a smaller impostor label costs a rank, a tie with a
    larger one does not).  ``cmc[0]`` is the rank-1 accuracy, ``cmc[4]`` rank-5.  Ranks
    beyond the number of identities repeat the last value (1.0).

    Computed in blocks with a running top-``max_rank``: at most about
    ``batch_size x gallery_batch_size`` scores exist at once.

    Shape:
        - ``probes``: :math:`(Q, D)`, ``probe_labels``: :math:`(Q,)`, :math:`Q \ge 1`.
        - ``gallery``: :math:`(N, D)`, ``gallery_labels``: :math:`(N,)`.
        - Output: :math:`(\text{max\_rank},)`.

    Parameters
    ----------
    probes, gallery, gallery_labels, metric, template, batch_size, gallery_batch_size
        As :func:`open_set_identify` (defaults ``"cosine"``, ``"mean"``, 4096, 16384).
    probe_labels : Tensor
        Integer identity of each probe; every one must occur in ``gallery_labels``
        (non-mated probes belong to :func:`tpir_at_fpir`).
    max_rank : int, default 10
        Length of the curve.

    Returns
    -------
    Tensor
        Non-decreasing rates in [0, 1], float64 (float32 on MPS), on the probes' device.

    Raises
    ------
    TypeError, ValueError
        As :func:`open_set_identify`; ``ValueError`` when there are no probes, a probe's
        label is not in the gallery, the gallery holds a single identity, or ``max_rank``
        is not a positive int.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import cmc_curve
    >>> gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    >>> gallery_labels = torch.tensor([10, 20, 30])
    >>> probes = torch.tensor([[0.9, 0.1], [0.6, 0.5], [-0.2, -1.0]])
    >>> cmc_curve(probes, torch.tensor([10, 20, 30]), gallery, gallery_labels, max_rank=3)
    tensor([0.6667, 1.0000, 1.0000], dtype=torch.float64)
    """
    max_rank = check_positive_int("max_rank", max_rank)
    searched = _check_gallery(
        probes, gallery, gallery_labels, metric, template, batch_size, gallery_batch_size
    )
    labels = _check_probe_labels(searched, probe_labels, "cmc_curve")
    num_identities = searched.identities.shape[0]
    if num_identities < 2:
        raise ValueError(
            "cmc_curve needs at least two identities in gallery_labels (with one, every "
            f"probe is trivially at rank 1), got {num_identities}"
        )
    k = min(max_rank, num_identities)
    mated, positions, _, _ = _probe_ranks(searched, labels, k)
    if _check_values() and not bool(mated.all()):
        missing = torch.unique(labels[~mated])
        raise ValueError(
            "probe_labels must all occur in gallery_labels for closed-set identification, got "
            f"{int((~mated).sum())} probe(s) of {missing.numel()} identities not in the gallery, "
            f"e.g. {missing[:5].tolist()} (score non-mated probes with tpir_at_fpir)"
        )
    counts = torch.bincount(positions, minlength=k + 1)[:k]
    dtype = _rate_dtype(positions.device)
    cmc = torch.cumsum(counts, 0).to(dtype) / labels.shape[0]
    if max_rank > k:
        cmc = torch.cat([cmc, cmc[-1:].expand(max_rank - k)])
    return cmc


def _open_set_counts(
    probes: object,
    probe_labels: object,
    gallery: object,
    gallery_labels: object,
    rank: object,
    metric: object,
    template: object,
    batch_size: object,
    gallery_batch_size: object,
    fn: str,
) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """``(false, true, thresholds, num_non_mated, num_mated)`` of the TPIR/FPIR sweep."""
    rank = check_positive_int("rank", rank)
    searched = _check_gallery(
        probes, gallery, gallery_labels, metric, template, batch_size, gallery_batch_size
    )
    labels = _check_probe_labels(searched, probe_labels, fn)
    mated, positions, hit_scores, top_scores = _probe_ranks(
        searched, labels, min(rank, searched.identities.shape[0])
    )
    num_mated = int(mated.sum())
    num_non_mated = labels.shape[0] - num_mated
    if num_mated == 0 or num_non_mated == 0:
        raise ValueError(
            f"{fn} needs both mated probes (probe_labels in gallery_labels) and non-mated "
            f"probes (probe_labels not in gallery_labels), got {num_mated} mated and "
            f"{num_non_mated} non-mated"
        )
    hits = mated & (positions < rank)
    # A non-mated probe is a false alarm at t when its best candidate scores >= t; a mated
    # probe is identified when its own identity is within `rank` and scores >= t.
    scores = torch.cat([top_scores[~mated], hit_scores[hits]])
    is_mated = torch.cat(
        [torch.zeros(num_non_mated, dtype=torch.bool, device=scores.device),
         torch.ones(int(hits.sum()), dtype=torch.bool, device=scores.device)]
    )
    false, true, thresholds = _roc_counts(scores, is_mated)
    return false, true, thresholds, num_non_mated, num_mated


def tpir_fpir_curve(
    probes: Tensor,
    probe_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    *,
    rank: int = 1,
    metric: str = "cosine",
    template: str = "mean",
    batch_size: int = 4096,
    gallery_batch_size: int = 16384,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Open-set identification curve: TPIR against FPIR at every distinct score.

    The IJB-C 1:N protocol (Maze et al., "IARPA Janus Benchmark – C", ICB 2018) in the
    vocabulary of ISO/IEC 19795-1 and NIST FRVT 1:N (Grother et al., NISTIR 8271): a probe is
    *mated* when its label occurs in ``gallery_labels`` and *non-mated* otherwise (so one
    probe set serves both IJB-C galleries G1 and G2).  At threshold :math:`t`,

    .. math::

        \mathrm{FPIR}(t) = \frac{|\{q \text{ non-mated} : s^{(1)}_q \ge t\}|}{N_{nm}},
        \qquad
        \mathrm{TPIR}_R(t) = \frac{|\{q \text{ mated} : \operatorname{rank}_q \le R,\
            s_{c_q}(q) \ge t\}|}{N_m}

    with :math:`s^{(1)}_q` the best identity score of a probe, :math:`s_{c_q}(q)` the score
    of its true identity, ranks as in :func:`cmc_curve` (ties by label) and
    :math:`R` = ``rank``.  FNIR = 1 − TPIR; "DIR@FAR" is the same number.  The thresholds are
    ``+inf`` and every distinct score, decreasing; tied scores are accepted together.

    Shape:
        - ``probes``: :math:`(Q, D)`, ``probe_labels``: :math:`(Q,)`.
        - ``fpir``, ``tpir``, ``thresholds``: :math:`(T + 1,)`.

    Parameters
    ----------
    probes, gallery, gallery_labels, metric, template, batch_size, gallery_batch_size
        As :func:`open_set_identify`.
    probe_labels : Tensor
        Integer identity of each probe; labels absent from the gallery mark non-mated probes.
    rank : int, default 1
        A mated probe counts only if its identity is within the top ``rank`` (1 in IJB-C).

    Returns
    -------
    fpir, tpir : Tensor
        Non-decreasing rates, float64 (float32 on MPS).
    thresholds : Tensor
        Strictly decreasing, ``thresholds[0] = +inf``.

    Raises
    ------
    TypeError, ValueError
        As :func:`open_set_identify`; ``ValueError`` when there are no mated or no
        non-mated probes, or ``rank`` is not a positive int.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import tpir_fpir_curve
    >>> gallery, gallery_labels = torch.eye(2), torch.tensor([0, 1])
    >>> probes = torch.tensor([[1.0, 0.2], [0.3, 1.0], [1.0, 1.0], [-1.0, 0.1]])
    >>> fpir, tpir, thresholds = tpir_fpir_curve(probes, torch.tensor([0, 1, 7, 8]),
    ...                                          gallery, gallery_labels)
    >>> fpir, tpir
    (tensor([0.0000, 0.0000, 0.0000, 0.5000, 1.0000], dtype=torch.float64), tensor([0.0000, 0.5000, 1.0000, 1.0000, 1.0000], dtype=torch.float64))
    """
    false, true, thresholds, num_non_mated, num_mated = _open_set_counts(
        probes, probe_labels, gallery, gallery_labels, rank, metric, template, batch_size,
        gallery_batch_size, "tpir_fpir_curve",
    )
    dtype = _rate_dtype(false.device)
    return false.to(dtype) / num_non_mated, true.to(dtype) / num_mated, thresholds


def tpir_at_fpir(
    probes: Tensor,
    probe_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    fpirs: Iterable[float] | float = (1e-1, 1e-2),
    *,
    rank: int = 1,
    metric: str = "cosine",
    template: str = "mean",
    batch_size: int = 4096,
    gallery_batch_size: int = 16384,
) -> dict[float, float]:
    r"""True-positive identification rate at fixed false-positive identification rates.

    .. math::

        \mathrm{TPIR@FPIR}(\alpha) = \max\{\mathrm{TPIR}_R(t) : \mathrm{FPIR}(t) \le \alpha\}

    over the points of :func:`tpir_fpir_curve`, chosen exactly as :func:`tar_at_far`
    chooses its threshold: the smallest distinct score :math:`t` with
    :math:`\mathrm{FPIR}(t) \le \alpha`, no interpolation; tied scores are accepted
    together, so a tie that straddles :math:`\alpha` is rejected whole.  IJB-C reports
    :math:`\alpha` = 0.1 and 0.01 at rank 1; for :math:`\alpha < 1/N_{nm}` the result is
    the TPIR at FPIR = 0.

    Shape:
        - As :func:`tpir_fpir_curve`.

    Parameters
    ----------
    probes, probe_labels, gallery, gallery_labels, rank, metric, template, batch_size, gallery_batch_size
        As :func:`tpir_fpir_curve`.
    fpirs : iterable of float or float, default (1e-1, 1e-2)
        The operating points :math:`\alpha \in [0, 1]`.

    Returns
    -------
    dict[float, float]
        ``{fpir: tpir}`` in the order of ``fpirs``.

    Raises
    ------
    TypeError, ValueError
        As :func:`tpir_fpir_curve`; also when a ``fpir`` is not a real number in [0, 1].

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import tpir_at_fpir
    >>> gallery, gallery_labels = torch.eye(2), torch.tensor([0, 1])
    >>> probes = torch.tensor([[1.0, 0.2], [0.3, 1.0], [1.0, 1.0], [-1.0, 0.1]])
    >>> tpir_at_fpir(probes, torch.tensor([0, 1, 7, 8]), gallery, gallery_labels, fpirs=(0.0, 0.5))
    {0.0: 1.0, 0.5: 1.0}
    """
    alphas = _check_rates("fpirs", fpirs)
    false, true, _, num_non_mated, num_mated = _open_set_counts(
        probes, probe_labels, gallery, gallery_labels, rank, metric, template, batch_size,
        gallery_batch_size, "tpir_at_fpir",
    )
    reached = _true_count_at(false, true, num_non_mated, alphas)
    return {alpha: count / num_mated for alpha, count in zip(alphas, reached)}


# ---------------------------------------------------------------- retrieval


class _Retrieval(NamedTuple):
    queries: Tensor
    query_labels: Tensor
    items: _Items
    reference_labels: Tensor
    relevant: Tensor  # R_q: references sharing the query's label (itself excluded)
    exclude_self: bool
    metric: str
    batch_size: int


def _check_retrieval(
    queries: object,
    query_labels: object,
    references: object,
    reference_labels: object,
    metric: object,
    batch_size: object,
    reference_batch_size: object,
    fn: str,
) -> _Retrieval:
    metric = check_choice("metric", metric, _METRICS)
    batch_size = check_positive_int("batch_size", batch_size)
    reference_batch_size = check_positive_int("reference_batch_size", reference_batch_size)
    if (references is None) != (reference_labels is None):
        raise ValueError(
            "references and reference_labels must be given together (or both None to "
            f"search the queries themselves), got references={type(references).__name__}, "
            f"reference_labels={type(reference_labels).__name__}"
        )
    exclude_self = references is None
    if exclude_self:
        query_tensor = _check_embeddings(queries, name="queries")
        reference_tensor = query_tensor
    else:
        query_tensor, reference_tensor = _check_query_key(queries, references, "queries", "references")
    if query_tensor.shape[0] == 0:
        raise ValueError(f"queries must hold at least one query for {fn}, got shape {tuple(query_tensor.shape)}")
    labels = _check_int_labels(query_labels, query_tensor.shape[0], "query_labels", "queries")
    check_same_device(queries=query_tensor, query_labels=labels)
    if exclude_self:
        ref_labels = labels
    else:
        ref_labels = _check_int_labels(
            reference_labels, reference_tensor.shape[0], "reference_labels", "references"
        )
        check_same_device(references=reference_tensor, reference_labels=ref_labels)
    classes, counts = torch.unique(ref_labels, sorted=True, return_counts=True)
    ref_name = "query_labels" if exclude_self else "reference_labels"
    if classes.shape[0] < 2:
        raise ValueError(
            f"{fn} needs at least two classes in {ref_name} (with one, every reference is "
            f"relevant), got {classes.shape[0]}"
        )
    index = torch.searchsorted(classes, labels).clamp(max=classes.shape[0] - 1)
    relevant = torch.where(classes[index] == labels, counts[index], torch.zeros_like(index))
    relevant = relevant - int(exclude_self)
    lone = relevant == 0
    if bool(lone.any()):
        examples = torch.unique(labels[lone])[:5].tolist()
        where = "other queries" if exclude_self else "references"
        raise ValueError(
            f"query_labels must each have at least one relevant reference ({where} with the "
            f"same label) for {fn}, got {int(lone.sum())} query(ies) without, e.g. labels "
            f"{examples}; drop them (pytorch-metric-learning skips such queries silently)"
        )
    return _Retrieval(
        query_tensor.detach(),
        labels,
        _row_items(reference_tensor.detach(), reference_batch_size),
        ref_labels,
        relevant,
        exclude_self,
        metric,
        batch_size,
    )


def _check_k(name: str, k: object, retrieval: _Retrieval) -> int:
    available = retrieval.items.num_items - int(retrieval.exclude_self)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        which = "num_queries - 1" if retrieval.exclude_self else "num_references"
        raise ValueError(f"{name} must be an int in [1, {which}] = [1, {available}], got {k!r}")
    return k


def _retrieval_scores(retrieval: _Retrieval, ks: list[int], with_r: bool) -> dict[str, float]:
    """One blocked search; every metric summed per query in float64, then averaged."""
    depth = max([*ks, int(retrieval.relevant.max()) if with_r else 1])
    device = retrieval.queries.device
    dtype = _rate_dtype(device)
    totals: dict[str, Tensor] = {}

    def add(name: str, per_query: Tensor) -> None:
        total = per_query.to(dtype).sum()
        totals[name] = totals[name] + total if name in totals else total

    positions = torch.arange(1, depth + 1, device=device)
    for start, _, indices in _search(
        retrieval.queries, retrieval.items, depth, retrieval.metric, retrieval.batch_size,
        exclude_self=retrieval.exclude_self,
    ):
        labels = retrieval.query_labels[start : start + indices.shape[0]]
        relevant = retrieval.relevant[start : start + indices.shape[0]]
        hit = retrieval.reference_labels[indices] == labels.unsqueeze(1)
        precision = torch.cumsum(hit, dim=1).to(dtype) / positions.to(dtype)
        for k in ks:
            hits_k = hit[:, :k]
            add(f"precision@{k}", hits_k.sum(dim=1).to(dtype) / k)
            add(f"recall@{k}", hits_k.any(dim=1))
            ap_terms = (precision[:, :k] * hits_k).sum(dim=1)
            add(f"map@{k}", ap_terms / torch.clamp(relevant, max=k).to(dtype))
        if with_r:
            within = hit & (positions <= relevant.unsqueeze(1))
            add("r_precision", within.sum(dim=1).to(dtype) / relevant.to(dtype))
            add("map@r", (precision * within).sum(dim=1) / relevant.to(dtype))
    num_queries = retrieval.queries.shape[0]
    return {name: float(total) / num_queries for name, total in totals.items()}


def precision_at_k(
    queries: Tensor,
    query_labels: Tensor,
    references: Tensor | None = None,
    reference_labels: Tensor | None = None,
    k: int = 1,
    *,
    metric: str = "cosine",
    batch_size: int = 4096,
    reference_batch_size: int = 16384,
) -> float:
    r"""Precision@k: the share of relevant references among each query's ``k`` nearest.

    A reference is *relevant* to a query when it has the query's label.  With
    :math:`\mathrm{rel}_q(i) \in \{0, 1\}` the relevance of the query's :math:`i`-th
    neighbour (similarities decreasing, **ties by smaller reference index**),

    .. math::

        \mathrm{P@k} = \frac{1}{Q} \sum_q \frac{1}{k} \sum_{i=1}^{k} \mathrm{rel}_q(i)

    (precision@1 is the accuracy of a 1-nearest-neighbour classifier; P@k is below 1 when
    a class has fewer than ``k`` relevant references, as in TorchMetrics'
    ``retrieval_precision`` without ``adaptive_k``).  Musgrave, Belongie & Lim, "A Metric
    Learning Reality Check", ECCV 2020, report precision@1 beside :func:`map_at_r`.

    The search runs in blocks with a running top-k: about
    ``batch_size x reference_batch_size`` scores exist at once.

    Shape:
        - ``queries``: :math:`(Q, D)`, ``query_labels``: :math:`(Q,)`, :math:`Q \ge 1`.
        - ``references``: :math:`(N, D)`, ``reference_labels``: :math:`(N,)`.

    Parameters
    ----------
    queries : Tensor
        Floating-point query embeddings, one per row.
    query_labels : Tensor
        Integer class of each query.
    references : Tensor or None, default None
        Embeddings searched; ``None`` searches the queries themselves, leaving each query's
        own row out (the usual "query set = reference set" evaluation; the self match is
        removed by index, duplicates of it elsewhere still count).
    reference_labels : Tensor or None, default None
        Integer class of each reference; given exactly when ``references`` is.
    k : int, default 1
        Neighbours per query, in ``[1, N]`` (``[1, Q - 1]`` without references).
    metric : {"cosine", "euclidean"}, default "cosine"
        As :func:`pairwise_similarity`.
    batch_size : int, default 4096
        Queries per block.
    reference_batch_size : int, default 16384
        References per block.

    Returns
    -------
    float
        Precision@k in [0, 1].

    Raises
    ------
    TypeError, ValueError
        As :func:`pairwise_similarity` for the embeddings; ``ValueError`` when there are no
        queries, the labels have the wrong shape or a single class, a query has no relevant
        reference (pytorch-metric-learning would skip it silently: drop it yourself), or
        ``k`` / the block sizes are out of range.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import precision_at_k
    >>> embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.5, 0.6]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> precision_at_k(embeddings, labels)  # the last one's nearest other is of class 0
    0.75
    """
    retrieval = _check_retrieval(
        queries, query_labels, references, reference_labels, metric, batch_size,
        reference_batch_size, "precision_at_k",
    )
    k = _check_k("k", k, retrieval)
    return _retrieval_scores(retrieval, [k], with_r=False)[f"precision@{k}"]


def recall_at_k(
    queries: Tensor,
    query_labels: Tensor,
    references: Tensor | None = None,
    reference_labels: Tensor | None = None,
    k: int = 1,
    *,
    metric: str = "cosine",
    batch_size: int = 4096,
    reference_batch_size: int = 16384,
) -> float:
    r"""Recall@k as metric-learning papers report it: the share of queries with a relevant
    reference among their ``k`` nearest.

    .. math::

        \mathrm{R@k} = \frac{1}{Q} \sum_q \Big[\sum_{i=1}^{k} \mathrm{rel}_q(i) \ge 1\Big]

    (the "Recall@K" of CUB-200, Cars-196 and SOP tables since Oh Song et al., "Deep Metric
    Learning via Lifted Structured Feature Embedding", CVPR 2016; TorchMetrics calls it
    ``retrieval_hit_rate``).  Neighbours and relevance as in :func:`precision_at_k`;
    R@1 = P@1.

    Shape:
        - As :func:`precision_at_k`.

    Parameters
    ----------
    queries, query_labels, references, reference_labels, k, metric, batch_size, reference_batch_size
        As :func:`precision_at_k` (defaults None, None, 1, ``"cosine"``, 4096, 16384).

    Returns
    -------
    float
        Recall@k in [0, 1].

    Raises
    ------
    TypeError, ValueError
        As :func:`precision_at_k`.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import recall_at_k
    >>> embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.5, 0.6]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> recall_at_k(embeddings, labels, k=2)
    1.0
    """
    retrieval = _check_retrieval(
        queries, query_labels, references, reference_labels, metric, batch_size,
        reference_batch_size, "recall_at_k",
    )
    k = _check_k("k", k, retrieval)
    return _retrieval_scores(retrieval, [k], with_r=False)[f"recall@{k}"]


def map_at_k(
    queries: Tensor,
    query_labels: Tensor,
    references: Tensor | None = None,
    reference_labels: Tensor | None = None,
    k: int = 10,
    *,
    metric: str = "cosine",
    batch_size: int = 4096,
    reference_batch_size: int = 16384,
) -> float:
    r"""Mean average precision over each query's ``k`` nearest references (mAP@k).

    .. math::

        \mathrm{mAP@k} = \frac{1}{Q} \sum_q \frac{1}{\min(k, R_q)}
            \sum_{i=1}^{k} \mathrm{P@i}_q\, \mathrm{rel}_q(i)

    with :math:`R_q` the number of references relevant to query :math:`q` and
    :math:`\mathrm{P@i}_q` its precision at :math:`i`; neighbours and relevance as in
    :func:`precision_at_k`.  Dividing by :math:`\min(k, R_q)` makes a perfect top-k score 1
    (the definition of OpenMetricLearning's ``calc_map``).  TorchMetrics'
    ``RetrievalMAP(top_k=k)`` divides by the number of relevant references *found* in the
    top k instead; the two agree when ``k`` covers every relevant reference.

    Shape:
        - As :func:`precision_at_k`.

    Parameters
    ----------
    queries, query_labels, references, reference_labels, metric, batch_size, reference_batch_size
        As :func:`precision_at_k`.
    k : int, default 10
        Depth of the ranked list.

    Returns
    -------
    float
        mAP@k in [0, 1].

    Raises
    ------
    TypeError, ValueError
        As :func:`precision_at_k`.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import map_at_k
    >>> embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.5, 0.6]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> map_at_k(embeddings, labels, k=2)  # last query: its match comes second, AP 1/2
    0.875
    """
    retrieval = _check_retrieval(
        queries, query_labels, references, reference_labels, metric, batch_size,
        reference_batch_size, "map_at_k",
    )
    k = _check_k("k", k, retrieval)
    return _retrieval_scores(retrieval, [k], with_r=False)[f"map@{k}"]


def r_precision(
    queries: Tensor,
    query_labels: Tensor,
    references: Tensor | None = None,
    reference_labels: Tensor | None = None,
    *,
    metric: str = "cosine",
    batch_size: int = 4096,
    reference_batch_size: int = 16384,
) -> float:
    r"""R-precision: precision at :math:`R_q`, the number of references relevant to each query.

    .. math::

        \text{R-precision} = \frac{1}{Q} \sum_q \frac{1}{R_q} \sum_{i=1}^{R_q} \mathrm{rel}_q(i)

    (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020, §3.2; equal to
    pytorch-metric-learning's ``r_precision`` and TorchMetrics' ``retrieval_r_precision``).
    Without ``references`` the query itself is not counted in :math:`R_q`.  The running
    top-k is :math:`\max_q R_q` deep: lower ``batch_size`` for classes with very many
    references.

    Shape:
        - As :func:`precision_at_k`.

    Parameters
    ----------
    queries, query_labels, references, reference_labels, metric, batch_size, reference_batch_size
        As :func:`precision_at_k`.

    Returns
    -------
    float
        R-precision in [0, 1].

    Raises
    ------
    TypeError, ValueError
        As :func:`precision_at_k`.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import r_precision
    >>> embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.5, 0.6]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> r_precision(embeddings, labels)
    0.75
    """
    retrieval = _check_retrieval(
        queries, query_labels, references, reference_labels, metric, batch_size,
        reference_batch_size, "r_precision",
    )
    return _retrieval_scores(retrieval, [], with_r=True)["r_precision"]


def map_at_r(
    queries: Tensor,
    query_labels: Tensor,
    references: Tensor | None = None,
    reference_labels: Tensor | None = None,
    *,
    metric: str = "cosine",
    batch_size: int = 4096,
    reference_batch_size: int = 16384,
) -> float:
    r"""MAP@R: mean average precision over the first :math:`R_q` neighbours of each query.

    .. math::

        \mathrm{MAP@R} = \frac{1}{Q} \sum_q \frac{1}{R_q} \sum_{i=1}^{R_q}
            \mathrm{P@i}_q\, \mathrm{rel}_q(i)

    Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020, eq. (1): like
    R-precision it rewards ranking the relevant references *first*, and unlike mAP it needs
    no cutoff.  Equal to pytorch-metric-learning's ``mean_average_precision_at_r``.
    Neighbours, relevance and :math:`R_q` as in :func:`r_precision`.

    Shape:
        - As :func:`precision_at_k`.

    Parameters
    ----------
    queries, query_labels, references, reference_labels, metric, batch_size, reference_batch_size
        As :func:`precision_at_k`.

    Returns
    -------
    float
        MAP@R in [0, 1].

    Raises
    ------
    TypeError, ValueError
        As :func:`precision_at_k`.

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import map_at_r
    >>> embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.5, 0.6]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> map_at_r(embeddings, labels)
    0.75
    """
    retrieval = _check_retrieval(
        queries, query_labels, references, reference_labels, metric, batch_size,
        reference_batch_size, "map_at_r",
    )
    return _retrieval_scores(retrieval, [], with_r=True)["map@r"]


def retrieval_metrics(
    queries: Tensor,
    query_labels: Tensor,
    references: Tensor | None = None,
    reference_labels: Tensor | None = None,
    *,
    ks: Iterable[int] = (1, 5),
    metric: str = "cosine",
    batch_size: int = 4096,
    reference_batch_size: int = 16384,
) -> dict[str, float]:
    r"""Every retrieval metric here from one blocked search.

    Returns ``precision@k``, ``recall@k`` and ``map@k`` for each ``k`` in ``ks``
    (:func:`precision_at_k`, :func:`recall_at_k`, :func:`map_at_k`) and ``r_precision``
    and ``map@r`` (:func:`r_precision`, :func:`map_at_r`), each equal to what its function
    returns; the search costs one pass over the references, :math:`\max(\max k, \max_q R_q)`
    deep.

    Shape:
        - As :func:`precision_at_k`.

    Parameters
    ----------
    queries, query_labels, references, reference_labels, metric, batch_size, reference_batch_size
        As :func:`precision_at_k`.
    ks : iterable of int, default (1, 5)
        The cutoffs; each in the range of :func:`precision_at_k`'s ``k``.

    Returns
    -------
    dict[str, float]
        ``{"precision@1": ..., "recall@1": ..., "map@1": ..., ..., "r_precision": ...,
        "map@r": ...}``.

    Raises
    ------
    TypeError, ValueError
        As :func:`precision_at_k`, for each ``k`` (``ks`` must not be empty).

    Examples
    --------
    >>> import torch
    >>> from marginloss.metrics import retrieval_metrics
    >>> embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.5, 0.6]])
    >>> labels = torch.tensor([0, 0, 1, 1])
    >>> retrieval_metrics(embeddings, labels, ks=(1,))
    {'precision@1': 0.75, 'recall@1': 0.75, 'map@1': 0.75, 'r_precision': 0.75, 'map@r': 0.75}
    """
    retrieval = _check_retrieval(
        queries, query_labels, references, reference_labels, metric, batch_size,
        reference_batch_size, "retrieval_metrics",
    )
    if isinstance(ks, int):
        raise TypeError(f"ks must be an iterable of ints, got int {ks!r}")
    k_list = [_check_k("ks", k, retrieval) for k in dict.fromkeys(ks)]
    if not k_list:
        raise ValueError("ks must hold at least one cutoff, got an empty iterable")
    return _retrieval_scores(retrieval, k_list, with_r=True)

