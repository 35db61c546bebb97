"""Tests for marginloss.metrics: scikit-learn oracles and brute-force loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold

import marginloss
from marginloss import metrics
from marginloss.metrics import (
    best_threshold_accuracy,
    equal_error_rate,
    kfold_accuracy,
    open_set_accuracy,
    open_set_identify,
    pairwise_similarity,
    roc_auc,
    roc_curve,
    tar_at_far,
    topk_similarity,
    tune_open_set_threshold,
)

HYPOTHESIS = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------- brute-force references
# Written for obviousness: Python lists and loops over thresholds and pairs.


def ref_candidates(scores: list[float]) -> list[float]:
    """+inf, then every distinct score, decreasing."""
    return [math.inf, *sorted(set(scores), reverse=True)]


def ref_rates(scores: list[float], labels: list[int], threshold: float) -> tuple[float, float]:
    """(fpr, tpr) of accepting score >= threshold."""
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    fp = sum(1 for s in negatives if s >= threshold)
    tp = sum(1 for s in positives if s >= threshold)
    return fp / len(negatives), tp / len(positives)


def ref_eer(scores: list[float], labels: list[int]) -> tuple[float, float]:
    """Walk the ROC segments; interpolate linearly where FNR - FPR changes sign."""
    thresholds = ref_candidates(scores)
    points = [ref_rates(scores, labels, t) for t in thresholds]
    for k in range(1, len(points)):
        (fpr0, tpr0), (fpr1, tpr1) = points[k - 1], points[k]
        gap0, gap1 = (1 - tpr0) - fpr0, (1 - tpr1) - fpr1
        if gap1 == 0 or abs(gap1) < 1e-15:
            return fpr1, thresholds[k]
        if gap1 < 0:
            w = gap0 / (gap0 - gap1)
            t0, t1 = thresholds[k - 1], thresholds[k]
            threshold = t1 if math.isinf(t0) else t0 + w * (t1 - t0)
            return fpr0 + w * (fpr1 - fpr0), threshold
    raise AssertionError("FNR - FPR never crossed zero")


def ref_tar_at_far(scores: list[float], labels: list[int], far: float) -> float:
    best = 0.0
    for t in ref_candidates(scores):
        fpr, tpr = ref_rates(scores, labels, t)
        if fpr <= far:
            best = max(best, tpr)
    return best


def ref_accuracy(scores: list[float], labels: list[int], threshold: float) -> float:
    return sum(1 for s, y in zip(scores, labels) if (s >= threshold) == (y == 1)) / len(scores)


def ref_best_threshold(scores: list[float], labels: list[int]) -> tuple[float, float]:
    """Highest accuracy; on ties the first candidate, i.e. the largest threshold."""
    best_accuracy, best_threshold = -1.0, math.nan
    for t in ref_candidates(scores):
        accuracy = ref_accuracy(scores, labels, t)
        if accuracy > best_accuracy:
            best_accuracy, best_threshold = accuracy, t
    return best_accuracy, best_threshold


def ref_kfold(
    scores: list[float], labels: list[int], splits: list[tuple[list[int], list[int]]]
) -> tuple[float, float, list[float]]:
    accuracies, thresholds = [], []
    for train, test in splits:
        _, threshold = ref_best_threshold([scores[i] for i in train], [labels[i] for i in train])
        accuracies.append(
            ref_accuracy([scores[i] for i in test], [labels[i] for i in test], threshold)
        )
        thresholds.append(threshold)
    return float(np.mean(accuracies)), float(np.std(accuracies)), thresholds


def ref_similarity(a: torch.Tensor, b: torch.Tensor, metric: str) -> float:
    if metric == "cosine":
        return float(torch.dot(a, b) / (a.norm() * b.norm()))
    return -float((a - b).norm())


def ref_identify(
    probes: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    threshold: float,
    unknown_label: int,
    metric: str,
    template: str,
) -> tuple[list[int], list[float]]:
    identities = sorted(set(gallery_labels.tolist()))
    predicted, best_scores = [], []
    for probe in probes:
        best_label, best_score = None, -math.inf
        for identity in identities:  # increasing: strict > keeps the smallest label on ties
            images = [g for g, label in zip(gallery, gallery_labels.tolist()) if label == identity]
            if template == "mean":
                if metric == "cosine":
                    images = [g / g.norm() for g in images]
                score = ref_similarity(probe, sum(images) / len(images), metric)
            else:
                score = max(ref_similarity(probe, g, metric) for g in images)
            if score > best_score:
                best_label, best_score = identity, score
        predicted.append(best_label if best_score >= threshold else unknown_label)
        best_scores.append(best_score)
    return predicted, best_scores


def describe_difference(actual: torch.Tensor, expected: torch.Tensor) -> str:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs()
    index = int(error.flatten().argmax()) if error.numel() else -1
    return (
        f"max abs err {float(error.max()) if error.numel() else 0.0:.3g} at flat index {index}: "
        f"{actual.flatten()[index].item() if index >= 0 else None} vs "
        f"{expected.flatten()[index].item() if index >= 0 else None}"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-10) -> None:
    close = actual.shape == expected.shape and torch.allclose(
        actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=0
    )
    assert close, describe_difference(actual, expected)


# ---------------------------------------------------------------- data


@st.composite
def pair_data(
    draw: st.DrawFn, min_size: int = 2, both_classes: bool = True
) -> tuple[list[float], list[int]]:
    """Scores with many ties (1 decimal) or continuous, and labels."""
    n = draw(st.integers(min_size, 40))
    if draw(st.booleans()):
        scores = [k / 10 for k in draw(st.lists(st.integers(-10, 10), min_size=n, max_size=n))]
    else:
        scores = draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=n, max_size=n))
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    if both_classes:
        labels[0], labels[-1] = 1, 0
    return scores, labels


def as_tensors(
    scores: list[float], labels: list[int], dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(scores, dtype=dtype), torch.tensor(labels)


def open_set_data(seed: int, dim: int = 6) -> dict[str, torch.Tensor]:
    """A gallery of 5 identities with uneven image counts; probes known, unknown, confusable."""
    generator = torch.Generator().manual_seed(seed)
    identities = torch.tensor([42, 3, 17, 8, 100])
    centers = torch.randn(8, dim, generator=generator, dtype=torch.float64)
    image_identity = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 1, 0])
    gallery = centers[image_identity] + 0.6 * torch.randn(
        13, dim, generator=generator, dtype=torch.float64
    )
    probe_center = torch.randint(0, 8, (23,), generator=generator)
    probes = centers[probe_center] + 0.6 * torch.randn(
        23, dim, generator=generator, dtype=torch.float64
    )
    probe_labels = torch.where(probe_center < 5, identities[probe_center.clamp(max=4)], -1)
    return {
        "probes": probes,
        "probe_labels": probe_labels,
        "gallery": gallery,
        "gallery_labels": identities[image_identity],
    }


# ---------------------------------------------------------------- roc_curve / roc_auc


@HYPOTHESIS
@given(pair_data(), st.sampled_from([torch.float64, torch.float32]))
def test_roc_curve_matches_sklearn(data: tuple[list[float], list[int]], dtype: torch.dtype) -> None:
    scores, labels = as_tensors(*data, dtype=dtype)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(
        labels.numpy(), scores.numpy(), drop_intermediate=False
    )
    assert fpr.dtype == tpr.dtype == torch.float64 and thresholds.dtype == dtype
    assert_close(fpr, torch.from_numpy(sk_fpr), atol=1e-15)
    assert_close(tpr, torch.from_numpy(sk_tpr), atol=1e-15)
    assert thresholds[0] == math.inf
    np.testing.assert_array_equal(thresholds.double().numpy(), sk_thresholds)


@HYPOTHESIS
@given(pair_data(), st.sampled_from([torch.float64, torch.float32]))
def test_roc_auc_matches_sklearn(data: tuple[list[float], list[int]], dtype: torch.dtype) -> None:
    scores, labels = as_tensors(*data, dtype=dtype)
    result = roc_auc(scores, labels)
    assert isinstance(result, float)
    assert result == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


def test_roc_auc_all_ties_and_perfect_separation() -> None:
    labels = torch.tensor([1, 0, 1, 0])
    assert roc_auc(torch.zeros(4), labels) == 0.5
    assert roc_auc(torch.tensor([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    assert roc_auc(torch.tensor([0.1, 0.9, 0.2, 0.8]), labels) == 0.0
    fpr, tpr, thresholds = roc_curve(torch.zeros(4), labels.bool())
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]
    assert thresholds.tolist() == [math.inf, 0.0]


# ---------------------------------------------------------------- EER, TAR@FAR


@HYPOTHESIS
@given(pair_data(), st.sampled_from([torch.float64, torch.float32]))
def test_equal_error_rate_matches_reference(
    data: tuple[list[float], list[int]], dtype: torch.dtype
) -> None:
    scores, labels = as_tensors(*data, dtype=dtype)
    eer, threshold = equal_error_rate(scores, labels)
    ref_eer_value, ref_threshold = ref_eer(scores.double().tolist(), labels.tolist())
    assert eer == pytest.approx(ref_eer_value, abs=1e-12)
    assert threshold == pytest.approx(ref_threshold, abs=1e-9)
    assert 0.0 <= eer <= 1.0 and math.isfinite(threshold)


def test_equal_error_rate_known_values() -> None:
    labels = torch.tensor([1, 1, 0, 0])
    assert equal_error_rate(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == (0.0, pytest.approx(0.8))
    # Fully reversed scores: every threshold errs, the crossing is at 1.
    eer, _ = equal_error_rate(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels)
    assert eer == 1.0


@HYPOTHESIS
@given(pair_data(), st.sampled_from([torch.float64, torch.float32]))
def test_tar_at_far_matches_reference(
    data: tuple[list[float], list[int]], dtype: torch.dtype
) -> None:
    scores, labels = as_tensors(*data, dtype=dtype)
    num_negative = int((labels == 0).sum())
    # Exactly on FPR steps, just off them, below 1/N-, and the defaults.
    fars = [0.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4]
    fars += [k / num_negative for k in range(num_negative + 1)]
    fars += [min(1.0, k / num_negative + 1e-9) for k in range(num_negative)]
    result = tar_at_far(scores, labels, fars=fars)
    assert list(result) == [float(far) for far in dict.fromkeys(fars)]
    for far in fars:
        expected = ref_tar_at_far(scores.double().tolist(), labels.tolist(), far)
        assert result[far] == pytest.approx(expected, abs=1e-15), far


def test_tar_at_far_defaults_and_below_one_over_negatives() -> None:
    scores = torch.tensor([0.9, 0.7, 0.6, 0.4, 0.2, 0.1])
    labels = torch.tensor([1, 1, 0, 1, 0, 0])
    result = tar_at_far(scores, labels)
    assert list(result) == [1e-1, 1e-2, 1e-3, 1e-4]
    # 3 negatives: every far < 1/3 reads the TPR at FPR = 0.
    assert set(result.values()) == {2 / 3}
    assert tar_at_far(scores, labels, fars=0.5) == {0.5: 1.0}


# ---------------------------------------------------------------- best threshold, k-fold


@HYPOTHESIS
@given(pair_data(min_size=1, both_classes=False), st.sampled_from([torch.float64, torch.float32]))
def test_best_threshold_accuracy_matches_reference(
    data: tuple[list[float], list[int]], dtype: torch.dtype
) -> None:
    scores, labels = as_tensors(*data, dtype=dtype)
    accuracy, threshold = best_threshold_accuracy(scores, labels)
    ref_accuracy_value, ref_threshold = ref_best_threshold(
        scores.double().tolist(), labels.tolist()
    )
    assert accuracy == ref_accuracy_value
    assert threshold == ref_threshold
    assert accuracy == ref_accuracy(scores.double().tolist(), labels.tolist(), threshold)


@HYPOTHESIS
@given(pair_data(min_size=2, both_classes=False), st.integers(2, 12), st.booleans())
def test_kfold_accuracy_matches_reference(
    data: tuple[list[float], list[int]], num_folds: int, shuffle: bool
) -> None:
    scores, labels = as_tensors(*data)
    num_folds = min(num_folds, len(scores))
    # The folds are those of sklearn's KFold, applied to the documented permutation.
    if shuffle:
        order = torch.randperm(len(scores), generator=torch.Generator().manual_seed(7)).tolist()
    else:
        order = list(range(len(scores)))
    splits = [
        ([order[i] for i in train], [order[i] for i in test])
        for train, test in KFold(num_folds).split(np.zeros(len(scores)))
    ]
    mean, std, thresholds = kfold_accuracy(scores, labels, num_folds, shuffle=shuffle, seed=7)
    ref_mean, ref_std, ref_thresholds = ref_kfold(scores.tolist(), labels.tolist(), splits)
    assert mean == pytest.approx(ref_mean, abs=1e-12)
    assert std == pytest.approx(ref_std, abs=1e-12)
    assert thresholds.dtype == scores.dtype and thresholds.shape == (num_folds,)
    assert thresholds.tolist() == ref_thresholds


def test_kfold_accuracy_lfw_protocol_shape() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 2 == 0
    scores = labels.float() + 0.8 * torch.randn(600, generator=generator)
    mean, std, thresholds = kfold_accuracy(scores, labels)
    assert thresholds.shape == (10,) and 0.5 < mean < 1.0 and std >= 0.0
    shuffled = kfold_accuracy(scores, labels, shuffle=True, seed=1)
    assert shuffled[0] == kfold_accuracy(scores, labels, shuffle=True, seed=1)[0]


# ---------------------------------------------------------------- similarity


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_pairwise_similarity_matches_reference(metric: str) -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    keys = torch.randn(11, 5, generator=generator, dtype=torch.float64)
    expected = torch.tensor(
        [[ref_similarity(q, k, metric) for k in keys] for q in queries], dtype=torch.float64
    )
    assert_close(pairwise_similarity(queries, keys, metric=metric), expected, atol=1e-9)


def test_pairwise_similarity_promotes_dtype_and_is_differentiable() -> None:
    queries = torch.randn(3, 4, requires_grad=True)
    keys = torch.randn(5, 4, dtype=torch.float64)
    similarity = pairwise_similarity(queries, keys)
    assert similarity.dtype == torch.float64 and similarity.shape == (3, 5)
    similarity.sum().backward()
    assert queries.grad is not None and queries.grad.shape == (3, 4)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("batch_size", [1, 4, 4096])
@pytest.mark.parametrize("k", [1, 3, 13])
def test_topk_similarity_matches_full_matrix(
    metric: str, batch_size: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    keys = torch.randn(13, 6, generator=generator, dtype=torch.float64)
    block_rows = []
    original = metrics._similarity_block

    def recording_block(q: torch.Tensor, prepared: torch.Tensor, m: str) -> torch.Tensor:
        block_rows.append(q.shape[0])
        return original(q, prepared, m)

    monkeypatch.setattr(metrics, "_similarity_block", recording_block)
    values, indices = topk_similarity(queries, keys, k=k, metric=metric, batch_size=batch_size)
    full = torch.tensor(
        [[ref_similarity(q, key, metric) for key in keys] for q in queries], dtype=torch.float64
    )
    expected_values, expected_indices = torch.sort(full, dim=1, descending=True)
    assert max(block_rows) <= batch_size and sum(block_rows) == 10
    assert indices.dtype == torch.long and indices.shape == (10, k)
    assert_close(values, expected_values[:, :k], atol=1e-9)
    assert torch.equal(indices, expected_indices[:, :k])


def test_topk_similarity_no_queries() -> None:
    values, indices = topk_similarity(torch.empty(0, 3), torch.randn(4, 3), k=2)
    assert values.shape == indices.shape == (0, 2) and indices.dtype == torch.long


# ---------------------------------------------------------------- open-set identification


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("template", ["mean", "max"])
@pytest.mark.parametrize("batch_size", [1, 5, 4096])
def test_open_set_identify_matches_reference(
    seed: int, metric: str, template: str, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = open_set_data(seed)
    _, closed_scores = ref_identify(
        data["probes"], data["gallery"], data["gallery_labels"], -math.inf, -1, metric, template
    )
    # Halfway between the two middle scores: some probes accepted, some rejected, none on the edge.
    middle = sorted(closed_scores)[len(closed_scores) // 2 - 1 : len(closed_scores) // 2 + 1]
    threshold = sum(middle) / 2
    expected_labels, expected_scores = ref_identify(
        data["probes"], data["gallery"], data["gallery_labels"], threshold, -1, metric, template
    )
    block_shapes = []
    original = metrics._similarity_block

    def recording_block(q: torch.Tensor, prepared: torch.Tensor, m: str) -> torch.Tensor:
        block = original(q, prepared, m)
        block_shapes.append(tuple(block.shape))
        return block

    monkeypatch.setattr(metrics, "_similarity_block", recording_block)
    predicted, scores = open_set_identify(
        data["probes"],
        data["gallery"],
        data["gallery_labels"],
        threshold,
        metric=metric,
        template=template,
        batch_size=batch_size,
    )
    assert predicted.dtype == torch.long and predicted.tolist() == expected_labels
    assert_close(scores, torch.tensor(expected_scores, dtype=torch.float64), atol=1e-9)
    assert all(rows <= batch_size and cols <= 13 for rows, cols in block_shapes)
    assert -1 in expected_labels and any(label != -1 for label in expected_labels)


def test_open_set_identify_ties_smallest_label_and_custom_unknown() -> None:
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gallery_labels = torch.tensor([9, 4, 6])
    probes = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    for template in ("mean", "max"):
        predicted, scores = open_set_identify(
            probes, gallery, gallery_labels, 0.5, unknown_label=-7, template=template
        )
        assert predicted.tolist() == [4, 6, -7]
        assert scores.tolist() == pytest.approx([1.0, 1.0, 0.0])
    closed, _ = open_set_identify(probes, gallery, gallery_labels, -math.inf)
    assert closed.tolist() == [4, 6, 6]  # [-1, 0] is closest to label 6 (cosine 0)
    empty, empty_scores = open_set_identify(torch.empty(0, 2), gallery, gallery_labels, 0.5)
    assert empty.shape == empty_scores.shape == (0,)


def test_open_set_accuracy() -> None:
    assert open_set_accuracy(torch.tensor([1, 2, -1]), torch.tensor([1, 3, -1])) == 2 / 3
    assert open_set_accuracy(torch.tensor([5], dtype=torch.int32), torch.tensor([5])) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("template", ["mean", "max"])
def test_tune_open_set_threshold_matches_brute_force(seed: int, metric: str, template: str) -> None:
    data = open_set_data(seed)
    targets = data["probe_labels"].tolist()
    closed_labels, closed_scores = ref_identify(
        data["probes"], data["gallery"], data["gallery_labels"], -math.inf, -1, metric, template
    )

    def ref_accuracy_at(threshold: float) -> float:
        correct = 0
        for label, score, target in zip(closed_labels, closed_scores, targets):
            predicted = label if score >= threshold else -1
            correct += predicted == target
        return correct / len(targets)

    ref_best, ref_threshold = -1.0, math.nan
    for threshold in ref_candidates(closed_scores):
        accuracy = ref_accuracy_at(threshold)
        if accuracy > ref_best:
            ref_best, ref_threshold = accuracy, threshold
    assert ref_best >= ref_accuracy_at(-math.inf)

    kwargs = {"metric": metric, "template": template, "batch_size": 4}
    threshold, accuracy = tune_open_set_threshold(
        data["probes"], data["probe_labels"], data["gallery"], data["gallery_labels"], **kwargs
    )
    assert accuracy == ref_best
    assert threshold == pytest.approx(ref_threshold, abs=1e-9)

    # The grid of every candidate, evaluated through the public API, agrees.
    _, scores = open_set_identify(
        data["probes"], data["gallery"], data["gallery_labels"], -math.inf, **kwargs
    )
    grid = [math.inf, -math.inf, *scores.tolist()]
    accuracies = []
    for candidate in grid:
        predicted, _ = open_set_identify(
            data["probes"], data["gallery"], data["gallery_labels"], candidate, **kwargs
        )
        accuracies.append(open_set_accuracy(predicted, data["probe_labels"]))
    assert max(accuracies) == accuracy
    predicted, _ = open_set_identify(
        data["probes"], data["gallery"], data["gallery_labels"], threshold, **kwargs
    )
    assert open_set_accuracy(predicted, data["probe_labels"]) == accuracy
    # Ties go to the largest threshold.
    assert threshold == max(t for t, a in zip(grid, accuracies) if a == accuracy)


def test_tune_open_set_threshold_all_unknown_rejects_everything() -> None:
    gallery = torch.eye(3)
    threshold, accuracy = tune_open_set_threshold(
        torch.randn(4, 3), torch.full((4,), -1), gallery, torch.arange(3)
    )
    assert (threshold, accuracy) == (math.inf, 1.0)


# ---------------------------------------------------------------- inputs untouched, devices


def test_inputs_not_modified() -> None:
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(20, generator=generator)
    labels = torch.arange(20) % 2
    data = open_set_data(0)
    inputs = [scores, labels, *data.values()]
    before = [t.clone() for t in inputs]
    roc_curve(scores, labels)
    roc_auc(scores, labels)
    equal_error_rate(scores, labels)
    tar_at_far(scores, labels)
    best_threshold_accuracy(scores, labels)
    kfold_accuracy(scores, labels, 4, shuffle=True)
    pairwise_similarity(data["probes"], data["gallery"])
    topk_similarity(data["probes"], data["gallery"], k=2, batch_size=3)
    for template in ("mean", "max"):
        for metric in ("cosine", "euclidean"):
            open_set_identify(
                data["probes"],
                data["gallery"],
                data["gallery_labels"],
                0.1,
                metric=metric,
                template=template,
                batch_size=3,
            )
            tune_open_set_threshold(
                data["probes"],
                data["probe_labels"],
                data["gallery"],
                data["gallery_labels"],
                metric=metric,
                template=template,
                batch_size=3,
            )
    open_set_accuracy(data["probe_labels"], data["probe_labels"])
    for tensor, original in zip(inputs, before):
        assert torch.equal(tensor, original)


def test_outputs_follow_input_device_and_types() -> None:
    scores = torch.tensor([0.3, 0.1, 0.2, 0.5], dtype=torch.float16)
    labels = torch.tensor([True, False, False, True])
    fpr, tpr, thresholds = roc_curve(scores, labels)
    assert thresholds.dtype == torch.float16 and fpr.device == tpr.device == scores.device
    for value in (
        roc_auc(scores, labels),
        *equal_error_rate(scores, labels),
        *best_threshold_accuracy(scores, labels),
    ):
        assert type(value) is float


# ---------------------------------------------------------------- errors

SCORES = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.5])
LABELS = torch.tensor([0, 0, 1, 1, 1])
PAIR_METRICS = [
    roc_curve,
    roc_auc,
    equal_error_rate,
    tar_at_far,
    best_threshold_accuracy,
    kfold_accuracy,
]


@pytest.mark.parametrize("fn", PAIR_METRICS)
@pytest.mark.parametrize(
    ("scores", "is_same", "error", "match"),
    [
        ([0.1, 0.2], LABELS[:2], TypeError, r"scores must be a torch.Tensor, got list"),
        (
            SCORES[None],
            LABELS,
            ValueError,
            r"scores must be a 1-D tensor of shape \[num_pairs\], got shape \(1, 5\)",
        ),
        (
            torch.arange(5),
            LABELS,
            TypeError,
            r"scores must be a floating-point tensor, got dtype torch.int64",
        ),
        (SCORES, [0, 1, 1, 0, 1], TypeError, r"is_same must be a torch.Tensor, got list"),
        (
            SCORES,
            LABELS.float(),
            TypeError,
            r"is_same must be a bool or integer tensor of 0/1 labels, got dtype torch.float32",
        ),
        (
            SCORES,
            LABELS[:4],
            ValueError,
            r"is_same must have shape \[5\] to match scores, got shape \(4,\)",
        ),
        (
            SCORES,
            LABELS[None],
            ValueError,
            r"is_same must have shape \[5\] to match scores, got shape \(1, 5\)",
        ),
        (
            torch.tensor([0.1, math.nan, 0.3, math.inf, 0.5]),
            LABELS,
            ValueError,
            r"scores must be finite, got 2 NaN/inf value\(s\) out of 5",
        ),
        (
            SCORES,
            torch.tensor([0, 2, 1, 1, 0]),
            ValueError,
            r"is_same must be binary \(0/1 or bool\), got values such as \[2\]",
        ),
        (
            SCORES,
            LABELS.to("meta"),
            ValueError,
            r"all tensors must be on the same device, got scores on cpu, is_same on meta",
        ),
    ],
)
def test_pair_input_errors(fn, scores, is_same, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        fn(scores, is_same)


@pytest.mark.parametrize("fn", [roc_curve, roc_auc, equal_error_rate, tar_at_far])
@pytest.mark.parametrize(
    "labels", [torch.ones(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool)]
)
def test_one_class_errors(fn, labels: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    num_positive = int(labels.sum())
    with pytest.raises(
        ValueError,
        match=rf"{fn.__name__} is not defined when is_same holds only one class: got "
        rf"{num_positive} positive \(same\) and {5 - num_positive} negative",
    ):
        fn(SCORES, labels)


def test_metric_specific_errors() -> None:
    with pytest.raises(ValueError, match=r"fars must lie in \[0, 1\], got 1.5"):
        tar_at_far(SCORES, LABELS, fars=(0.1, 1.5))
    with pytest.raises(ValueError, match=r"fars must lie in \[0, 1\], got -0.1"):
        tar_at_far(SCORES, LABELS, fars=-0.1)
    with pytest.raises(TypeError, match=r"fars must hold real numbers, got str '0.1'"):
        tar_at_far(SCORES, LABELS, fars=["0.1"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"scores must hold at least one pair, got shape \(0,\)"):
        best_threshold_accuracy(torch.empty(0), torch.empty(0, dtype=torch.long))
    for num_folds in (1, 6):
        with pytest.raises(
            ValueError, match=rf"num_folds must be in \[2, num_pairs\] = \[2, 5\], got {num_folds}"
        ):
            kfold_accuracy(SCORES, LABELS, num_folds)
    with pytest.raises(ValueError, match=r"num_folds must be an int, got float 2.0"):
        kfold_accuracy(SCORES, LABELS, 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"shuffle must be a bool, got int 1"):
        kfold_accuracy(SCORES, LABELS, 2, shuffle=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"seed must be an int, got float 0.5"):
        kfold_accuracy(SCORES, LABELS, 2, seed=0.5)  # type: ignore[arg-type]


QUERIES = torch.randn(4, 3)
KEYS = torch.randn(6, 3)


def test_similarity_errors() -> None:
    with pytest.raises(
        ValueError, match=r"metric must be one of \('cosine', 'euclidean'\), got 'dot'"
    ):
        pairwise_similarity(QUERIES, KEYS, metric="dot")
    with pytest.raises(
        ValueError,
        match=r"keys must have shape \[num_keys, 3\] to match the embedding_dim of queries \(shape \(4, 3\)\), got shape \(6, 2\)",
    ):
        pairwise_similarity(QUERIES, KEYS[:, :2])
    with pytest.raises(
        ValueError, match=r"queries must have shape \[batch, embedding_dim\], got shape \(3,\)"
    ):
        pairwise_similarity(QUERIES[0], KEYS)
    with pytest.raises(
        TypeError, match=r"keys must be a floating-point tensor, got dtype torch.int64"
    ):
        pairwise_similarity(QUERIES, KEYS.long())
    with pytest.raises(TypeError, match=r"keys must be a torch.Tensor, got ndarray"):
        pairwise_similarity(QUERIES, KEYS.numpy())
    with pytest.raises(ValueError, match=r"queries must be finite, got 1 NaN/inf value\(s\)"):
        pairwise_similarity(torch.tensor([[0.0, math.nan, 1.0]]), KEYS)
    with pytest.raises(
        ValueError,
        match=r"all tensors must be on the same device, got queries on cpu, keys on meta",
    ):
        pairwise_similarity(QUERIES, KEYS.to("meta"))
    for k in (0, 7, True):
        with pytest.raises(
            ValueError, match=rf"k must be an int in \[1, num_keys\] = \[1, 6\], got {k!r}"
        ):
            topk_similarity(QUERIES, KEYS, k=k)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int, got 0"):
        topk_similarity(QUERIES, KEYS, batch_size=0)


GALLERY = torch.randn(5, 3)
GALLERY_LABELS = torch.tensor([0, 0, 1, 2, 2])


@pytest.mark.parametrize("tune", [False, True])
@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (
            {"metric": "l1"},
            ValueError,
            r"metric must be one of \('cosine', 'euclidean'\), got 'l1'",
        ),
        (
            {"template": "median"},
            ValueError,
            r"template must be one of \('mean', 'max'\), got 'median'",
        ),
        ({"batch_size": -1}, ValueError, r"batch_size must be a positive int, got -1"),
        ({"unknown_label": 1.0}, TypeError, r"unknown_label must be an int, got float 1.0"),
        ({"unknown_label": 2}, ValueError, r"gallery_labels must not contain unknown_label=2"),
        (
            {"gallery": GALLERY[:, :2]},
            ValueError,
            r"gallery must have shape \[num_gallery, 3\] to match the embedding_dim of probes \(shape \(4, 3\)\), got shape \(5, 2\)",
        ),
        (
            {"gallery": GALLERY[:0]},
            ValueError,
            r"gallery must hold at least one embedding, got shape \(0, 3\)",
        ),
        (
            {"gallery_labels": GALLERY_LABELS[:4]},
            ValueError,
            r"gallery_labels must have shape \[5\] to match gallery, got shape \(4,\)",
        ),
        (
            {"gallery_labels": GALLERY_LABELS.float()},
            TypeError,
            r"gallery_labels must be an integer tensor, got dtype torch.float32",
        ),
        (
            {"gallery_labels": [0, 0, 1, 2, 2]},
            TypeError,
            r"gallery_labels must be a torch.Tensor of integer labels, got list",
        ),
        (
            {"probes": torch.full((4, 3), math.inf)},
            ValueError,
            r"probes must be finite, got 12 NaN/inf value\(s\)",
        ),
    ],
)
def test_open_set_errors(
    tune: bool, overrides: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {
        "probes": QUERIES,
        "gallery": GALLERY,
        "gallery_labels": GALLERY_LABELS,
        **overrides,
    }
    with pytest.raises(error, match=match):
        if tune:
            tune_open_set_threshold(probe_labels=torch.zeros(4, dtype=torch.long), **args)  # type: ignore[arg-type]
        else:
            open_set_identify(threshold=0.5, **args)  # type: ignore[arg-type]


def test_open_set_specific_errors() -> None:
    with pytest.raises(ValueError, match=r"threshold must not be NaN, got nan"):
        open_set_identify(QUERIES, GALLERY, GALLERY_LABELS, math.nan)
    with pytest.raises(TypeError, match=r"threshold must be a real number, got str '0.5'"):
        open_set_identify(QUERIES, GALLERY, GALLERY_LABELS, "0.5")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"probe_labels must have shape \[4\] to match probes, got shape \(3,\)"
    ):
        tune_open_set_threshold(QUERIES, torch.zeros(3, dtype=torch.long), GALLERY, GALLERY_LABELS)
    with pytest.raises(
        ValueError,
        match=r"probes must hold at least one probe to tune a threshold, got shape \(0, 3\)",
    ):
        tune_open_set_threshold(
            QUERIES[:0], torch.zeros(0, dtype=torch.long), GALLERY, GALLERY_LABELS
        )
    with pytest.raises(
        ValueError, match=r"target must have shape \[3\] to match predicted, got shape \(2,\)"
    ):
        open_set_accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 2]))
    with pytest.raises(
        TypeError, match=r"predicted must be an integer tensor of labels, got dtype torch.float32"
    ):
        open_set_accuracy(torch.tensor([1.0]), torch.tensor([1]))
    with pytest.raises(TypeError, match=r"target must be an integer tensor, got dtype torch.bool"):
        open_set_accuracy(torch.tensor([1]), torch.tensor([True]))
    with pytest.raises(
        ValueError, match=r"predicted must be a non-empty 1-D tensor of labels, got shape \(0,\)"
    ):
        open_set_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


def test_value_checks_follow_validation_switch() -> None:
    nan_scores = torch.tensor([0.1, math.nan, 0.3, 0.4, 0.5])
    with marginloss.validation(False):
        roc_curve(nan_scores, LABELS)  # garbage in, garbage out, but no device sync to check
        open_set_identify(QUERIES, GALLERY, GALLERY_LABELS, 0.5, unknown_label=2)
    with pytest.raises(ValueError, match="scores must be finite"):
        roc_curve(nan_scores, LABELS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("template", ["mean", "max"])
def test_open_set_identify_half_precision(dtype: torch.dtype, metric: str, template: str) -> None:
    gallery = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    predicted, scores = open_set_identify(
        gallery.to(dtype),
        gallery.to(dtype),
        torch.arange(10),
        -1.0,
        metric=metric,
        template=template,
    )
    assert predicted.tolist() == list(range(10)) and scores.dtype == dtype


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = (torch.randn(500, generator=generator) * 10).round() / 10
    labels = torch.rand(500, generator=generator) < 0.4
    cuda = torch.device("cuda")
    for fn in (roc_auc, equal_error_rate, tar_at_far, best_threshold_accuracy):
        assert fn(scores.to(cuda), labels.to(cuda)) == pytest.approx(fn(scores, labels))
    fpr, _, thresholds = roc_curve(scores.to(cuda), labels.to(cuda))
    assert fpr.device.type == thresholds.device.type == "cuda"
    mean, _, fold_thresholds = kfold_accuracy(scores.to(cuda), labels.to(cuda), shuffle=True)
    assert mean == pytest.approx(kfold_accuracy(scores, labels, shuffle=True)[0])
    assert fold_thresholds.device.type == "cuda"
    data = {name: t.to(cuda) for name, t in open_set_data(0).items()}
    predicted, _ = open_set_identify(data["probes"], data["gallery"], data["gallery_labels"], 0.3)
    assert predicted.device.type == "cuda"
    tune_open_set_threshold(
        data["probes"], data["probe_labels"], data["gallery"], data["gallery_labels"]
    )
