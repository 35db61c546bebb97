"""Tests for the ranking metrics of marginloss.metrics (issue #16) and the extreme-norm and
``unknown_label`` fixes of issue #12.

Every metric is checked against a brute-force loop reference written from its definition
(sorted Python lists, ties by index or label as documented), against outside oracles where
they exist (pytorch-metric-learning's AccuracyCalculator, TorchMetrics retrieval,
scikit-learn's roc/det curves), and for independence from the block sizes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import det_curve as sk_det_curve
from sklearn.metrics import roc_curve as sk_roc_curve

import marginloss
from marginloss import metrics
from marginloss.metrics import (
    cmc_curve,
    det_curve,
    fnmr_at_fmr,
    map_at_k,
    map_at_r,
    open_set_identify,
    pairwise_similarity,
    precision_at_k,
    r_precision,
    recall_at_k,
    retrieval_metrics,
    roc_curve,
    tar_at_far,
    topk_similarity,
    tpir_at_fpir,
    tpir_fpir_curve,
    tune_open_set_threshold,
)

REPO = Path(__file__).resolve().parents[1]
HYPOTHESIS = settings(max_examples=40, deadline=None)
BLOCKS = {"batch_size": 3, "gallery_batch_size": 4}


# ---------------------------------------------------------------- brute-force references


def ref_similarity(a: torch.Tensor, b: torch.Tensor, metric: str) -> float:
    a, b = a.double(), b.double()
    if metric == "cosine":
        return float(torch.dot(a, b) / (a.norm() * b.norm()))
    return -float((a - b).norm())


def ref_identity_scores(
    probe: torch.Tensor, gallery: torch.Tensor, labels: list[int], metric: str, template: str
) -> dict[int, float]:
    scores = {}
    for identity in sorted(set(labels)):
        images = [g.double() for g, label in zip(gallery, labels) if label == identity]
        if template == "mean":
            if metric == "cosine":
                images = [g / g.norm() for g in images]
            scores[identity] = ref_similarity(probe, sum(images) / len(images), metric)
        else:
            scores[identity] = max(ref_similarity(probe, g, metric) for g in images)
    return scores


def ref_ranked(scores: dict[int, float]) -> list[tuple[int, float]]:
    """Identities by decreasing score, ties by increasing label."""
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def ref_cmc(data: dict[str, torch.Tensor], max_rank: int, metric: str, template: str) -> list[float]:
    labels = data["gallery_labels"].tolist()
    ranks = []
    for probe, target in zip(data["probes"], data["probe_labels"].tolist()):
        ranked = [c for c, _ in ref_ranked(ref_identity_scores(probe, data["gallery"], labels, metric, template))]
        ranks.append(ranked.index(target) + 1)
    return [sum(rank <= r for rank in ranks) / len(ranks) for r in range(1, max_rank + 1)]


def ref_open_set_points(
    data: dict[str, torch.Tensor], rank: int, metric: str, template: str
) -> list[tuple[float, float, float]]:
    """(threshold, fpir, tpir) at +inf and every distinct relevant score, by definition."""
    labels = data["gallery_labels"].tolist()
    enrolled = set(labels)
    non_mated, mated = [], []  # best score of non-mated probes; (hit, score of mate) of mated ones
    for probe, target in zip(data["probes"], data["probe_labels"].tolist()):
        ranked = ref_ranked(ref_identity_scores(probe, data["gallery"], labels, metric, template))
        if target in enrolled:
            position = [c for c, _ in ranked].index(target)
            mated.append((position < rank, ranked[position][1]))
        else:
            non_mated.append(ranked[0][1])
    candidates = {*non_mated, *(score for hit, score in mated if hit)}
    points = []
    for t in [math.inf, *sorted(candidates, reverse=True)]:
        fpir = sum(s >= t for s in non_mated) / len(non_mated)
        tpir = sum(hit and s >= t for hit, s in mated) / len(mated)
        points.append((t, fpir, tpir))
    return points


def ref_retrieval(
    queries: torch.Tensor,
    query_labels: list[int],
    references: torch.Tensor | None,
    reference_labels: list[int] | None,
    ks: list[int],
    metric: str,
) -> dict[str, float]:
    """Every retrieval metric by its definition, one query at a time."""
    self_search = references is None
    if references is None or reference_labels is None:
        references, reference_labels = queries, query_labels
    totals: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        totals[name] = totals.get(name, 0.0) + value

    for q, (query, label) in enumerate(zip(queries, query_labels)):
        neighbours = [
            (ref_similarity(query, reference, metric), index)
            for index, reference in enumerate(references)
            if not (self_search and index == q)
        ]
        neighbours.sort(key=lambda item: (-item[0], item[1]))
        relevant = [reference_labels[index] == label for _, index in neighbours]
        r = sum(relevant)
        precision_at = [sum(relevant[: i + 1]) / (i + 1) for i in range(len(relevant))]
        for k in ks:
            add(f"precision@{k}", sum(relevant[:k]) / k)
            add(f"recall@{k}", float(any(relevant[:k])))
            add(f"map@{k}", sum(p for p, rel in zip(precision_at[:k], relevant[:k]) if rel) / min(k, r))
        add("r_precision", sum(relevant[:r]) / r)
        add("map@r", sum(p for p, rel in zip(precision_at[:r], relevant[:r]) if rel) / r)
    return {name: value / len(query_labels) for name, value in totals.items()}


# ---------------------------------------------------------------- data


def identification_data(seed: int, dim: int = 5, ties: bool = False) -> dict[str, torch.Tensor]:
    """6 identities with uneven image counts, unsorted labels; mated and non-mated probes.

    With ``ties`` the embeddings are small integers and identities 3 and 9 share images, so
    many scores tie exactly (Euclidean distances of integer vectors are exact in float64).
    """
    generator = torch.Generator().manual_seed(seed)
    identities = torch.tensor([9, 3, 41, 8, 100, 5])
    image_identity = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 1, 0, 5, 5])
    if ties:
        centers = torch.randint(-2, 3, (8, dim), generator=generator).double()
        centers[1] = centers[0]
        gallery = centers[image_identity] + torch.randint(-1, 2, (15, dim), generator=generator)
        probe_center = torch.randint(0, 8, (21,), generator=generator)
        probes = centers[probe_center] + torch.randint(-1, 2, (21, dim), generator=generator)
    else:
        centers = torch.randn(8, dim, generator=generator, dtype=torch.float64)
        gallery = centers[image_identity] + 0.7 * torch.randn(15, dim, generator=generator, dtype=torch.float64)
        probe_center = torch.randint(0, 8, (21,), generator=generator)
        probes = centers[probe_center] + 0.7 * torch.randn(21, dim, generator=generator, dtype=torch.float64)
    probe_labels = torch.where(probe_center < 6, identities[probe_center.clamp(max=5)], 1000 + probe_center)
    probe_labels[:2] = identities[:2]  # at least two mated probes
    probe_labels[2] = 77  # and a non-mated one
    return {
        "probes": probes,
        "probe_labels": probe_labels,
        "gallery": gallery.double(),
        "gallery_labels": identities[image_identity],
    }


def mated_only(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    enrolled = torch.isin(data["probe_labels"], data["gallery_labels"])
    return {**data, "probes": data["probes"][enrolled], "probe_labels": data["probe_labels"][enrolled]}


def retrieval_data(seed: int, n: int = 24, dim: int = 6, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 5
    labels = labels[torch.randperm(n, generator=generator)]
    if ties:
        embeddings = torch.randint(-1, 2, (n, dim), generator=generator).double()
        embeddings[1] = embeddings[0]
    else:
        centers = torch.randn(5, dim, generator=generator, dtype=torch.float64)
        embeddings = centers[labels] + 0.9 * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return embeddings, labels


# ---------------------------------------------------------------- blocked search


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize(("batch_size", "key_batch_size"), [(1, 1), (3, 4), (4096, 16384)])
def test_topk_similarity_blocks_and_ties_by_index(metric: str, batch_size: int, key_batch_size: int) -> None:
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(17, 3, generator=generator, dtype=torch.float64)
    keys[[4, 9, 15]] = keys[2].clone()  # exact ties
    keys[7] = 0.0  # cosine 0 with everything
    queries = torch.randn(9, 3, generator=generator, dtype=torch.float64)
    values, indices = topk_similarity(
        queries, keys, k=7, metric=metric, batch_size=batch_size, key_batch_size=key_batch_size
    )
    for q, query in enumerate(queries):
        ranked = sorted(
            ((ref_similarity(query, key, metric) if key.any() or metric == "euclidean" else 0.0, i)
             for i, key in enumerate(keys)),
            key=lambda item: (-item[0], item[1]),
        )
        assert indices[q].tolist() == [i for _, i in ranked[:7]], q
        np.testing.assert_allclose(values[q].numpy(), [s for s, _ in ranked[:7]], atol=1e-12)


def test_block_topk_boundary_ties_keep_smallest_indices() -> None:
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0], [3.0, 2.0, 1.0, 1.0, 0.0, 1.0, 2.0]])
    values, indices = metrics._block_topk(scores, 3)
    assert indices.tolist() == [[1, 2, 3], [0, 1, 6]]
    assert values.tolist() == [[1.0, 1.0, 1.0], [3.0, 2.0, 2.0]]


# ---------------------------------------------------------------- closed-set identification


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("template", ["mean", "max"])
@pytest.mark.parametrize(("metric", "ties"), [("cosine", False), ("euclidean", False), ("euclidean", True)])
def test_cmc_curve_matches_reference(seed: int, metric: str, template: str, ties: bool) -> None:
    # Exact ties are constructed for the Euclidean metric (integer vectors, exact distances).
    data = mated_only(identification_data(seed, ties=ties))
    expected = ref_cmc(data, 8, metric, template)
    args = (data["probes"], data["probe_labels"], data["gallery"], data["gallery_labels"])
    cmc = cmc_curve(*args, max_rank=8, metric=metric, template=template)
    assert cmc.dtype == torch.float64 and cmc.shape == (8,)
    assert cmc.tolist() == pytest.approx(expected, abs=1e-15)
    assert cmc[-1] == 1.0 and cmc[5:].tolist() == [1.0] * 3  # 6 identities
    blocked = cmc_curve(*args, max_rank=8, metric=metric, template=template, **BLOCKS)
    assert torch.equal(blocked, cmc)


def test_max_template_when_one_identity_floods_the_top_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-identity maxima fallback: the top 4k images hold fewer than k identities."""
    generator = torch.Generator().manual_seed(5)
    probes = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    flood = probes[0] + 0.01 * torch.randn(20, 4, generator=generator, dtype=torch.float64)
    gallery = torch.cat([flood, torch.randn(12, 4, generator=generator, dtype=torch.float64)])
    gallery_labels = torch.cat([torch.full((20,), 50), torch.arange(12) % 6])
    probe_labels = torch.tensor([50, 0, 1, 2, 3, 50])
    calls = []
    original = metrics._item_maxima

    def recording(scores: torch.Tensor, items: metrics._Items, block: tuple[int, int, int, int]) -> torch.Tensor:
        calls.append(scores.shape[0])
        return original(scores, items, block)

    monkeypatch.setattr(metrics, "_item_maxima", recording)
    data = {"probes": probes, "probe_labels": probe_labels, "gallery": gallery, "gallery_labels": gallery_labels}
    for metric in ("cosine", "euclidean"):
        expected = ref_cmc(data, 5, metric, "max")
        cmc = cmc_curve(probes, probe_labels, gallery, gallery_labels, max_rank=5, metric=metric, template="max")
        assert cmc.tolist() == pytest.approx(expected, abs=1e-15), metric
    assert calls and all(rows >= 1 for rows in calls)


def test_cmc_curve_rank1_is_closed_set_identification_accuracy() -> None:
    data = mated_only(identification_data(3))
    args = (data["probes"], data["probe_labels"], data["gallery"], data["gallery_labels"])
    for template in ("mean", "max"):
        predicted, _ = open_set_identify(data["probes"], data["gallery"], data["gallery_labels"],
                                         -math.inf, template=template)
        accuracy = float((predicted == data["probe_labels"]).double().mean())
        assert float(cmc_curve(*args, max_rank=1, template=template)[0]) == accuracy


# ---------------------------------------------------------------- open-set identification


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("template", ["mean", "max"])
@pytest.mark.parametrize("rank", [1, 3])
def test_tpir_fpir_matches_reference(seed: int, metric: str, template: str, rank: int) -> None:
    data = identification_data(seed, ties=metric == "euclidean" and seed == 2)
    points = ref_open_set_points(data, rank, metric, template)
    args = (data["probes"], data["probe_labels"], data["gallery"], data["gallery_labels"])
    kwargs = {"rank": rank, "metric": metric, "template": template}
    fpir, tpir, thresholds = tpir_fpir_curve(*args, **kwargs)
    assert thresholds[0] == math.inf and fpir.dtype == tpir.dtype == torch.float64
    np.testing.assert_allclose(thresholds[1:].numpy(), [t for t, _, _ in points[1:]], atol=1e-12)
    assert fpir.tolist() == pytest.approx([f for _, f, _ in points], abs=1e-15)
    assert tpir.tolist() == pytest.approx([p for _, _, p in points], abs=1e-15)
    num_non_mated = int((~torch.isin(data["probe_labels"], data["gallery_labels"])).sum())
    alphas = [0.0, 1.0, 0.1, 0.01, *(j / num_non_mated for j in range(num_non_mated + 1))]
    result = tpir_at_fpir(*args, fpirs=alphas, **kwargs, **BLOCKS)
    for alpha in alphas:
        assert result[alpha] == max(p for _, f, p in points if f <= alpha), alpha
    # TPIR at FPIR = 1 with rank = number of identities is 1: every mate is found.
    assert tpir_at_fpir(*args, fpirs=1.0, rank=6, metric=metric, template=template) == {1.0: 1.0}


# ---------------------------------------------------------------- DET, FNMR@FMR, TAR@FAR at 1e-6


@st.composite
def pair_data(draw: st.DrawFn) -> tuple[list[float], list[int]]:
    n = draw(st.integers(2, 40))
    if draw(st.booleans()):
        scores = [k / 10 for k in draw(st.lists(st.integers(-10, 10), min_size=n, max_size=n))]
    else:
        scores = draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=n, max_size=n))
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    labels[0], labels[-1] = 1, 0
    return scores, labels


@HYPOTHESIS
@given(pair_data())
def test_det_curve_matches_sklearn_and_roc(data: tuple[list[float], list[int]]) -> None:
    scores, labels = torch.tensor(data[0], dtype=torch.float64), torch.tensor(data[1])
    fmr, fnmr, thresholds = det_curve(scores, labels)
    fpr, tpr, roc_thresholds = roc_curve(scores, labels)
    assert torch.equal(thresholds, roc_thresholds) and torch.equal(fmr, fpr)
    assert torch.allclose(fnmr, 1 - tpr, atol=1e-15, rtol=0)
    sk_fmr, sk_fnmr, sk_thresholds = sk_det_curve(labels.numpy(), scores.numpy())
    # scikit-learn returns a contiguous run of the same points, in reverse order.
    start = int(np.nonzero(thresholds.numpy() == sk_thresholds[-1])[0][0])
    run = slice(start, start + len(sk_thresholds))
    np.testing.assert_array_equal(thresholds[run].numpy()[::-1], sk_thresholds)
    np.testing.assert_allclose(fmr[run].numpy()[::-1], sk_fmr, atol=1e-15)
    np.testing.assert_allclose(fnmr[run].numpy()[::-1], sk_fnmr, atol=1e-15)


@HYPOTHESIS
@given(pair_data())
def test_fnmr_at_fmr_is_one_minus_tar_at_far(data: tuple[list[float], list[int]]) -> None:
    scores, labels = torch.tensor(data[0], dtype=torch.float64), torch.tensor(data[1])
    num_negative = int((labels == 0).sum())
    alphas = [0.0, 1e-6, 1.0, *(j / num_negative for j in range(num_negative + 1))]
    fnmr = fnmr_at_fmr(scores, labels, fmrs=alphas)
    tar = tar_at_far(scores, labels, fars=alphas)
    fmr, det_fnmr, _ = det_curve(scores, labels)
    for alpha in alphas:
        assert fnmr[alpha] == pytest.approx(1 - tar[alpha], abs=1e-15)
        assert fnmr[alpha] == pytest.approx(float(det_fnmr[fmr <= alpha].min()), abs=1e-15)


def test_tar_at_far_down_to_1e6_exact_with_ties() -> None:
    """10^6 + 3 negatives; the rule of the docstring (order statistic) and scikit-learn agree."""
    generator = torch.Generator().manual_seed(0)
    num_negative = 1_000_003
    negatives = torch.randn(num_negative, generator=generator, dtype=torch.float64)
    positives = 2.5 + torch.randn(20_000, generator=generator, dtype=torch.float64)
    scores = torch.cat([negatives, positives])
    # Round to a grid: heavy ties, including ties between positives and negatives.
    scores = torch.round(scores * 200) / 200
    labels = torch.cat([torch.zeros(num_negative, dtype=torch.long), torch.ones(20_000, dtype=torch.long)])
    fars = [1e-6, 3e-6, 1e-5, 1e-4, 1e-3]
    result = tar_at_far(scores, labels, fars=fars)
    fnmr = fnmr_at_fmr(scores, labels, fmrs=fars)
    sorted_negatives = torch.sort(scores[:num_negative], descending=True).values
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels.numpy(), scores.numpy(), drop_intermediate=False)
    for far in fars:
        allowed = max(j for j in range(num_negative + 1) if j / num_negative <= far) if far < 1e-2 else None
        assert allowed is not None
        cut = float(sorted_negatives[allowed])  # the (allowed + 1)-th largest negative
        expected = float((scores[num_negative:] > cut).double().mean())
        assert result[far] == expected, far
        assert result[far] == float(sk_tpr[sk_fpr <= far].max()), far
        assert fnmr[far] == pytest.approx(1 - expected, abs=1e-15)
    assert result[1e-6] < result[1e-3]


# ---------------------------------------------------------------- retrieval


def _pml_accuracies(
    queries: torch.Tensor, query_labels: torch.Tensor, references: torch.Tensor | None,
    reference_labels: torch.Tensor | None, metric: str,
) -> dict[str, float]:
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    distance = CosineSimilarity() if metric == "cosine" else LpDistance(normalize_embeddings=False)
    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(distance),
    )
    if references is None:
        return calculator.get_accuracy(queries, query_labels, ref_includes_query=True)
    return calculator.get_accuracy(queries, query_labels, references, reference_labels)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("self_search", [True, False])
def test_retrieval_matches_pytorch_metric_learning(seed: int, metric: str, self_search: bool) -> None:
    embeddings, labels = retrieval_data(seed, n=40)
    if self_search:
        args: tuple[torch.Tensor, ...] = (embeddings.float(), labels)
        pml = _pml_accuracies(embeddings.float(), labels, None, None, metric)
    else:
        args = (embeddings[:15].float(), labels[:15], embeddings[15:].float(), labels[15:])
        pml = _pml_accuracies(*args, metric=metric)  # type: ignore[misc]
    ours = retrieval_metrics(*args, ks=(1,), metric=metric)
    assert ours["precision@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_retrieval_matches_torchmetrics(seed: int, metric: str) -> None:
    from torchmetrics.functional.retrieval import (
        retrieval_average_precision,
        retrieval_hit_rate,
        retrieval_precision,
        retrieval_r_precision,
    )

    queries, query_labels = retrieval_data(seed, n=12)
    references, reference_labels = retrieval_data(seed + 10, n=30)
    similarity = pairwise_similarity(queries, references, metric=metric)
    # TorchMetrics counts a target only where its pred is > 0: shift (ranking unchanged).
    preds = similarity - similarity.min() + 1.0
    targets = query_labels.unsqueeze(1) == reference_labels.unsqueeze(0)
    kwargs = {"metric": metric, "batch_size": 5, "reference_batch_size": 7}
    args = (queries, query_labels, references, reference_labels)
    for k in (1, 3, 8):
        expected = torch.stack([retrieval_precision(p, t, top_k=k) for p, t in zip(preds, targets)]).mean()
        assert precision_at_k(*args, k=k, **kwargs) == pytest.approx(float(expected), abs=1e-6)
        expected = torch.stack([retrieval_hit_rate(p, t, top_k=k) for p, t in zip(preds, targets)]).mean()
        assert recall_at_k(*args, k=k, **kwargs) == pytest.approx(float(expected), abs=1e-6)
    expected = torch.stack([retrieval_r_precision(p, t) for p, t in zip(preds, targets)]).mean()
    assert r_precision(*args, **kwargs) == pytest.approx(float(expected), abs=1e-6)
    # Over the whole list mAP@k (divided by min(k, R)) is TorchMetrics' average precision.
    expected = torch.stack([retrieval_average_precision(p, t) for p, t in zip(preds, targets)]).mean()
    assert map_at_k(*args, k=30, **kwargs) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("self_search", [True, False])
def test_retrieval_matches_reference_with_ties_and_blocks(seed: int, metric: str, self_search: bool) -> None:
    ties = metric == "euclidean"
    embeddings, labels = retrieval_data(seed, ties=ties)
    if self_search:
        args: tuple[torch.Tensor | None, ...] = (embeddings, labels, None, None)
    else:
        args = (embeddings[:9], labels[:9], embeddings[9:], labels[9:])
    queries, query_labels, references, reference_labels = args
    assert queries is not None and query_labels is not None
    expected = ref_retrieval(
        queries, query_labels.tolist(), references,
        None if reference_labels is None else reference_labels.tolist(), [1, 2, 5], metric,
    )
    for kwargs in ({}, {"batch_size": 2, "reference_batch_size": 3}, {"batch_size": 1, "reference_batch_size": 1}):
        ours = retrieval_metrics(*args, ks=(1, 2, 5), metric=metric, **kwargs)  # type: ignore[arg-type]
        assert ours.keys() == expected.keys()
        for name, value in expected.items():
            assert ours[name] == pytest.approx(value, abs=1e-12), (name, kwargs)
    single = {
        "precision@2": precision_at_k(*args, k=2, metric=metric),  # type: ignore[arg-type]
        "recall@2": recall_at_k(*args, k=2, metric=metric),  # type: ignore[arg-type]
        "map@5": map_at_k(*args, k=5, metric=metric),  # type: ignore[arg-type]
        "r_precision": r_precision(*args, metric=metric),  # type: ignore[arg-type]
        "map@r": map_at_r(*args, metric=metric),  # type: ignore[arg-type]
    }
    for name, value in single.items():
        assert value == pytest.approx(expected[name], abs=1e-12), name


def test_self_search_excludes_self_by_index_only() -> None:
    # Rows 0 and 1 are identical with different labels: each one's nearest other is the
    # other copy (a wrong class), never itself.
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 0, 1, 1])
    assert precision_at_k(embeddings, labels, k=1) == pytest.approx(3 / 5)
    _, indices = topk_similarity(embeddings, embeddings, k=1)
    assert indices[:2, 0].tolist() == [0, 0]  # without exclusion, ties go to the smaller index


# ---------------------------------------------------------------- issue #12: extreme norms


@pytest.mark.parametrize("scale", [1e20, 1e-25, 1e30, 1e-30])
def test_pairwise_similarity_extreme_norms_float32(scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(30, 8, generator=generator, dtype=torch.float64)
    keys = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    cosine = pairwise_similarity((queries * scale).float(), (keys * scale).float())
    expected = pairwise_similarity(queries, keys)
    torch.testing.assert_close(cosine.double(), expected, atol=1e-5, rtol=0)
    distance = pairwise_similarity((queries * scale).float(), (keys * scale).float(), metric="euclidean")
    assert bool(torch.isfinite(distance).all()) and bool((distance < 0).all())
    expected = pairwise_similarity(queries, keys, metric="euclidean") * scale
    torch.testing.assert_close(distance.double() / scale, expected / scale, atol=1e-4, rtol=1e-5)


def test_pairwise_similarity_mixed_norms_cosine_and_gradient() -> None:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    row_scales = torch.tensor([1e20, 1e-25, 1.0, 1e35, 1e-38, 3.0], dtype=torch.float64)
    queries = (base * row_scales.unsqueeze(1)).float()
    cosine = pairwise_similarity(queries, base.float())
    torch.testing.assert_close(cosine.double(), pairwise_similarity(base, base), atol=1e-5, rtol=0)
    # The gradient is that of the cosine, whatever the scale (here 1 for scale 1).
    unit = base[2:3].clone().requires_grad_(True)
    pairwise_similarity(unit, base).sum().backward()
    expected_grad = unit.grad
    assert expected_grad is not None
    big = (base[2:3] * 1e20).float().requires_grad_(True)
    pairwise_similarity(big, base.float()).sum().backward()
    assert big.grad is not None
    torch.testing.assert_close(big.grad.double() * 1e20, expected_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_blocked_search_extreme_norms(scale: float) -> None:
    data = identification_data(4)
    data32 = {k: (v * scale).float() if v.is_floating_point() else v for k, v in data.items()}
    for metric in ("cosine", "euclidean"):
        _, expected = topk_similarity(data["probes"], data["gallery"], k=4, metric=metric)
        _, indices = topk_similarity(data32["probes"], data32["gallery"], k=4, metric=metric)
        assert torch.equal(indices, expected), metric
        for template in ("mean", "max"):
            kwargs = {"metric": metric, "template": template}
            args = [data[k] for k in ("probes", "probe_labels", "gallery", "gallery_labels")]
            args32 = [data32[k] for k in ("probes", "probe_labels", "gallery", "gallery_labels")]
            assert tpir_fpir_curve(*args32, **kwargs)[1].tolist() == tpir_fpir_curve(*args, **kwargs)[1].tolist()


# ---------------------------------------------------------------- issue #12: unknown_label range


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("unknown_label", [2**63, 2**70, -(2**63) - 1])
def test_unknown_label_beyond_int64_names_the_argument(validate: bool, unknown_label: int) -> None:
    data = identification_data(0)
    match = rf"unknown_label must fit in int64, i.e. lie in \[-9223372036854775808, 9223372036854775807\], got {unknown_label}"
    with marginloss.validation(validate):
        with pytest.raises(ValueError, match=match):
            open_set_identify(data["probes"], data["gallery"], data["gallery_labels"], 0.5,
                              unknown_label=unknown_label)
        with pytest.raises(ValueError, match=match):
            tune_open_set_threshold(data["probes"], data["probe_labels"], data["gallery"],
                                    data["gallery_labels"], unknown_label=unknown_label)
    # The int64 extremes themselves are fine.
    predicted, _ = open_set_identify(data["probes"], data["gallery"], data["gallery_labels"], 2.0,
                                     unknown_label=2**63 - 1)
    assert set(predicted.tolist()) == {2**63 - 1}


# ---------------------------------------------------------------- errors


IDENT = identification_data(0)
IDENT_ARGS = (IDENT["probes"], IDENT["probe_labels"], IDENT["gallery"], IDENT["gallery_labels"])
MATED = mated_only(IDENT)
MATED_ARGS = (MATED["probes"], MATED["probe_labels"], MATED["gallery"], MATED["gallery_labels"])


def test_identification_errors() -> None:
    with pytest.raises(ValueError, match=r"probe_labels must all occur in gallery_labels for closed-set identification, got \d+ probe\(s\) of \d+ identities not in the gallery, e.g. \[77"):
        cmc_curve(*IDENT_ARGS)
    with marginloss.validation(False):  # then a non-mated probe is simply never found
        assert float(cmc_curve(*IDENT_ARGS, max_rank=6)[-1]) < 1.0
    with pytest.raises(ValueError, match=r"cmc_curve needs at least two identities in gallery_labels \(with one, every probe is trivially at rank 1\), got 1"):
        cmc_curve(MATED["probes"][:1], MATED["probe_labels"][:1], MATED["gallery"][:1], MATED["gallery_labels"][:1])
    with pytest.raises(ValueError, match=r"max_rank must be a positive int, got 0"):
        cmc_curve(*MATED_ARGS, max_rank=0)
    with pytest.raises(ValueError, match=r"probes must hold at least one probe for cmc_curve, got shape \(0, 5\)"):
        cmc_curve(MATED["probes"][:0], MATED["probe_labels"][:0], MATED["gallery"], MATED["gallery_labels"])
    with pytest.raises(ValueError, match=r"probe_labels must have shape \[\d+\] to match probes, got shape \(2,\)"):
        cmc_curve(MATED["probes"], MATED["probe_labels"][:2], MATED["gallery"], MATED["gallery_labels"])
    with pytest.raises(ValueError, match=r"gallery_batch_size must be a positive int, got 0"):
        cmc_curve(*MATED_ARGS, gallery_batch_size=0)
    with pytest.raises(ValueError, match=r"tpir_at_fpir needs both mated probes \(probe_labels in gallery_labels\) and non-mated probes \(probe_labels not in gallery_labels\), got \d+ mated and 0 non-mated"):
        tpir_at_fpir(*MATED_ARGS)
    with pytest.raises(ValueError, match=r"rank must be a positive int, got 0"):
        tpir_fpir_curve(*IDENT_ARGS, rank=0)
    with pytest.raises(ValueError, match=r"fpirs must lie in \[0, 1\], got 2"):
        tpir_at_fpir(*IDENT_ARGS, fpirs=(0.1, 2))
    with pytest.raises(ValueError, match=r"probes must be finite, got 1 NaN/inf value\(s\)"):
        bad = IDENT["probes"].clone()
        bad[0, 0] = math.nan
        tpir_at_fpir(bad, *IDENT_ARGS[1:])


def test_pair_rate_errors() -> None:
    scores, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"fmrs must lie in \[0, 1\], got -1e-06"):
        fnmr_at_fmr(scores, labels, fmrs=-1e-6)
    with pytest.raises(TypeError, match=r"fmrs must hold real numbers, got str '0.1'"):
        fnmr_at_fmr(scores, labels, fmrs=["0.1"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"fars must be a real number or an iterable of them, got str '0.1'"):
        tar_at_far(scores, labels, fars="0.1")  # type: ignore[arg-type]
    for fn in (det_curve, fnmr_at_fmr):
        with pytest.raises(ValueError, match=rf"{fn.__name__} is not defined when is_same holds only one class"):
            fn(scores, torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"scores must be finite, got 1 NaN/inf value\(s\) out of 4"):
        det_curve(torch.tensor([0.1, math.nan, 0.3, 0.2]), labels)


def test_retrieval_errors() -> None:
    embeddings, labels = retrieval_data(0, n=10)
    with pytest.raises(ValueError, match=r"query_labels must each have at least one relevant reference \(other queries with the same label\) for map_at_r, got 2 query\(ies\) without, e.g. labels \[\d, 7\]"):
        map_at_r(embeddings, torch.cat([labels[:-1], torch.tensor([7])]))
    with pytest.raises(ValueError, match=r"query_labels must each have at least one relevant reference \(references with the same label\) for precision_at_k"):
        precision_at_k(embeddings[:3], torch.tensor([0, 1, 9]), embeddings[3:], labels[3:])
    with pytest.raises(ValueError, match=r"r_precision needs at least two classes in query_labels \(with one, every reference is relevant\), got 1"):
        r_precision(embeddings, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"recall_at_k needs at least two classes in reference_labels"):
        recall_at_k(embeddings[:3], torch.zeros(3, dtype=torch.long), embeddings[3:], torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"references and reference_labels must be given together"):
        precision_at_k(embeddings, labels, embeddings)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, num_queries - 1\] = \[1, 9\], got 10"):
        precision_at_k(embeddings, labels, k=10)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, num_references\] = \[1, 7\], got 0"):
        map_at_k(embeddings[:3], labels[:3], embeddings[3:], labels[3:], k=0)
    with pytest.raises(ValueError, match=r"ks must be an int in \[1, num_queries - 1\] = \[1, 9\], got 12"):
        retrieval_metrics(embeddings, labels, ks=(1, 12))
    with pytest.raises(ValueError, match=r"ks must hold at least one cutoff, got an empty iterable"):
        retrieval_metrics(embeddings, labels, ks=())
    with pytest.raises(TypeError, match=r"ks must be an iterable of ints, got int 5"):
        retrieval_metrics(embeddings, labels, ks=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"queries must hold at least one query for map_at_r, got shape \(0, 6\)"):
        map_at_r(embeddings[:0], labels[:0], embeddings, labels)
    with pytest.raises(ValueError, match=r"query_labels must have shape \[10\] to match queries, got shape \(9,\)"):
        map_at_r(embeddings, labels[:9])
    with pytest.raises(ValueError, match=r"references must have shape \[num_references, 6\] to match the embedding_dim of queries"):
        map_at_r(embeddings, labels, embeddings[:, :3], labels)
    with pytest.raises(ValueError, match=r"metric must be one of \('cosine', 'euclidean'\), got 'dot'"):
        map_at_r(embeddings, labels, metric="dot")
    with pytest.raises(ValueError, match=r"reference_batch_size must be a positive int, got 0"):
        map_at_r(embeddings, labels, reference_batch_size=0)
    with pytest.raises(ValueError, match=r"queries must be finite"):
        map_at_r(torch.full((10, 6), math.inf), labels)
    with pytest.raises(ValueError, match=r"key_batch_size must be a positive int, got -1"):
        topk_similarity(embeddings, embeddings, key_batch_size=-1)


# ---------------------------------------------------------------- inputs, devices, dtypes


def test_inputs_not_modified_and_output_types() -> None:
    data = identification_data(1)
    embeddings, labels = retrieval_data(1)
    inputs = [*data.values(), embeddings, labels]
    before = [t.clone() for t in inputs]
    args = (data["probes"], data["probe_labels"], data["gallery"], data["gallery_labels"])
    tpir_fpir_curve(*args, template="max", **BLOCKS)
    assert list(tpir_at_fpir(*args)) == [0.1, 0.01]
    mated = mated_only(data)
    cmc_curve(mated["probes"], mated["probe_labels"], mated["gallery"], mated["gallery_labels"], **BLOCKS)
    result = retrieval_metrics(embeddings, labels, ks=(1, 3))
    assert all(type(value) is float for value in result.values())
    assert type(map_at_r(embeddings, labels)) is float
    for tensor, original in zip(inputs, before):
        assert torch.equal(tensor, original)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_runs(dtype: torch.dtype) -> None:
    embeddings, labels = retrieval_data(0)
    assert 0.0 <= map_at_r(embeddings.to(dtype), labels) <= 1.0
    data = mated_only(identification_data(0))
    for template in ("mean", "max"):
        cmc = cmc_curve(data["probes"].to(dtype), data["probe_labels"], data["gallery"].to(dtype),
                        data["gallery_labels"], template=template)
        assert cmc.dtype == torch.float64 and cmc[-1] == 1.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ranking_metrics_cuda_match_cpu() -> None:
    cuda = torch.device("cuda")
    data = identification_data(0)
    args = [data[k] for k in ("probes", "probe_labels", "gallery", "gallery_labels")]
    args_cuda = [t.to(cuda) for t in args]
    assert tpir_at_fpir(*args_cuda) == pytest.approx(tpir_at_fpir(*args))
    mated = mated_only(data)
    margs = [mated[k] for k in ("probes", "probe_labels", "gallery", "gallery_labels")]
    cmc = cmc_curve(*[t.to(cuda) for t in margs], template="max")
    assert cmc.device.type == "cuda"
    assert cmc.cpu().tolist() == pytest.approx(cmc_curve(*margs, template="max").tolist())
    embeddings, labels = retrieval_data(0)
    expected = retrieval_metrics(embeddings, labels)
    assert retrieval_metrics(embeddings.to(cuda), labels.to(cuda)) == pytest.approx(expected)


# ---------------------------------------------------------------- benchmark script


@pytest.mark.slow
def test_benchmark_smoke_writes_results(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "benchmarks" / "metrics.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "metrics-smoke.json").read_text())
    assert report["smoke"] is True and report["device"] == "cpu"
    methods = {result["method"] for result in report["results"]}
    assert methods == {"blocked_topk", "full_matrix_topk", "cmc_blocked"}
    for result in report["results"]:
        assert result["error"] is None, result
        assert result["time_ms"] > 0 and result["peak_mib"] >= 0
    blocked = next(r for r in report["results"] if r["method"] == "blocked_topk")
    assert blocked["agrees_with_full_matrix"] is True
    markdown = (tmp_path / "metrics-smoke.md").read_text()
    assert "| method |" in markdown and "What ran" in markdown
