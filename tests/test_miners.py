"""Tests for marginloss.miners: distances and triplet selection."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marginloss import validation
from marginloss.miners import batch_all, batch_hard, pairwise_distance, semi_hard
from tests import reference_losses as ref

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
FAST = settings(max_examples=40, deadline=None)


def make_batch(
    seed: int, batch: int, dim: int, num_labels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_labels, (batch,), generator=generator)
    return embeddings, labels


def as_triplets(
    indices: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> list[tuple[int, int, int]]:
    anchor, positive, negative = indices
    assert anchor.dtype == positive.dtype == negative.dtype == torch.int64
    assert anchor.shape == positive.shape == negative.shape
    return list(zip(anchor.tolist(), positive.tolist(), negative.tolist()))


batches = st.builds(
    make_batch,
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(0, 12),
    dim=st.integers(3, 5),
    num_labels=st.integers(1, 4),
)


# ---------------------------------------------------------------- pairwise_distance


@FAST
@given(batch=batches, distance=st.sampled_from(DISTANCES))
def test_pairwise_distance_matches_reference(batch, distance):
    embeddings, _ = batch
    embeddings.requires_grad_(True)
    dist = pairwise_distance(embeddings, distance)
    expected_embeddings = embeddings.detach().clone().requires_grad_(True)
    expected = ref.distance_matrix(expected_embeddings, distance)
    torch.testing.assert_close(dist, expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(dist.diagonal(), torch.zeros(len(dist), dtype=dist.dtype))
    torch.testing.assert_close(dist, dist.T, rtol=0, atol=1e-12)
    if len(dist) > 1:
        weights = torch.rand(
            dist.shape, dtype=dist.dtype, generator=torch.Generator().manual_seed(0)
        )
        (grad,) = torch.autograd.grad((dist * weights).sum(), embeddings)
        (expected_grad,) = torch.autograd.grad((expected * weights).sum(), expected_embeddings)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("distance", DISTANCES)
def test_pairwise_distance_gradcheck(distance):
    embeddings, _ = make_batch(0, 5, 3, 2)
    embeddings.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: pairwise_distance(e, distance), (embeddings,))


@pytest.mark.parametrize("distance", DISTANCES)
def test_pairwise_distance_coincident_points_have_finite_gradient(distance):
    embeddings = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    embeddings.requires_grad_(True)
    dist = pairwise_distance(embeddings, distance)
    assert abs(dist[0, 1].item()) < 1e-12 and abs(dist[1, 0].item()) < 1e-12
    dist.sum().backward()
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()


def test_pairwise_distance_euclidean_known_values():
    embeddings = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert pairwise_distance(embeddings)[0, 1].item() == pytest.approx(5.0)
    assert pairwise_distance(embeddings, "squared_euclidean")[0, 1].item() == pytest.approx(25.0)
    assert pairwise_distance(embeddings, "cosine")[0, 1].item() == pytest.approx(1.0)


def test_pairwise_distance_large_offset_stays_accurate():
    # The Gram expansion would lose every digit at offset 1e4 in float32 without centring.
    embeddings = torch.tensor([[0.0, 0.0], [0.001, 0.0], [0.0, 0.002]]) + 1e4
    dist = pairwise_distance(embeddings)
    expected = ref.distance_matrix(embeddings.double(), "euclidean").float()
    torch.testing.assert_close(dist, expected, rtol=1e-3, atol=1e-6)


def test_pairwise_distance_under_autocast_is_float32():
    embeddings, _ = make_batch(1, 7, 5, 2)
    embeddings = embeddings.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist = pairwise_distance(embeddings.bfloat16())
    assert dist.dtype == torch.float32
    expected = pairwise_distance(embeddings.bfloat16().float())
    torch.testing.assert_close(dist, expected)


def test_pairwise_distance_does_not_modify_input():
    embeddings, _ = make_batch(2, 6, 3, 2)
    before = embeddings.clone()
    pairwise_distance(embeddings, "cosine")
    pairwise_distance(embeddings)
    assert torch.equal(embeddings, before)


def test_pairwise_distance_errors():
    with pytest.raises(ValueError, match=r"distance must be one of .*got 'l2'"):
        pairwise_distance(torch.zeros(2, 2), "l2")
    with pytest.raises(ValueError, match=r"embeddings must have shape \[batch, embedding_dim\]"):
        pairwise_distance(torch.zeros(2, 2, 2))
    with pytest.raises(TypeError, match=r"embeddings must be a floating-point tensor"):
        pairwise_distance(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"embeddings must be finite, got 1 NaN/inf"):
        pairwise_distance(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]))


# ---------------------------------------------------------------- miners vs reference


@FAST
@given(batch=batches, distance=st.sampled_from(DISTANCES))
def test_batch_hard_matches_reference(batch, distance):
    embeddings, labels = batch
    dist = pairwise_distance(embeddings, distance)
    expected = ref.batch_hard_triplets(dist.tolist(), labels.tolist())
    assert as_triplets(batch_hard(dist, labels)) == expected


@FAST
@given(batch=batches)
def test_batch_all_matches_reference(batch):
    embeddings, labels = batch
    dist = pairwise_distance(embeddings)
    assert as_triplets(batch_all(dist, labels)) == ref.batch_all_triplets(labels.tolist())


@FAST
@given(
    batch=batches,
    distance=st.sampled_from(DISTANCES),
    margin=st.floats(0.01, 3.0),
)
def test_semi_hard_matches_reference(batch, distance, margin):
    embeddings, labels = batch
    dist = pairwise_distance(embeddings, distance)
    expected = ref.semi_hard_triplets(dist.tolist(), labels.tolist(), margin)
    mined = as_triplets(semi_hard(dist, labels, margin))
    assert mined == expected
    for a, p, n in mined:  # every kept triplet has a positive hinge loss
        assert dist[a, p] - dist[a, n] + margin > 0


def test_semi_hard_prefers_the_closest_negative_in_the_window():
    # anchor 0, positive 1 at 1.0; negatives at 1.2, 1.5 (window (1, 2)) and 0.5 (hard)
    dist = symmetric({(0, 1): 1.0, (0, 2): 1.5, (0, 3): 1.2, (0, 4): 0.5}, size=5, fill=9.0)
    labels = torch.tensor([0, 0, 1, 2, 3])
    anchor, positive, negative = semi_hard(dist, labels, margin=1.0)
    assert (anchor[0].item(), positive[0].item(), negative[0].item()) == (0, 1, 3)


def test_semi_hard_fallback_uses_the_farthest_hard_negative():
    # no negative in (1, 2); hard negatives at 0.3 and 0.8 -> the one at 0.8
    dist = symmetric({(0, 1): 1.0, (0, 2): 0.3, (0, 3): 0.8, (0, 4): 5.0}, size=5, fill=9.0)
    labels = torch.tensor([0, 0, 1, 2, 3])
    anchor, positive, negative = semi_hard(dist, labels, margin=1.0)
    assert (anchor[0].item(), positive[0].item(), negative[0].item()) == (0, 1, 3)


def test_semi_hard_fallback_on_a_collapsed_batch():
    # all distances 0: no negative is farther than the positive, the tie counts as hard
    labels = torch.tensor([0, 0, 1, 1])
    triplets = as_triplets(semi_hard(torch.zeros(4, 4), labels, margin=0.5))
    assert [(a, p) for a, p, _ in triplets] == [(0, 1), (1, 0), (2, 3), (3, 2)]
    assert all(labels[n] != labels[a] for a, _, n in triplets)


def test_semi_hard_drops_pairs_whose_negatives_are_all_easy():
    # the only negative is at 3.0 >= 1.0 + margin: zero hinge loss, the pair is dropped
    dist = symmetric({(0, 1): 1.0, (0, 2): 3.0, (1, 2): 3.0}, size=3, fill=0.0)
    labels = torch.tensor([0, 0, 1])
    anchor, _, _ = semi_hard(dist, labels, margin=1.0)
    assert anchor.numel() == 0
    # a negative exactly at d_ap + margin is outside the open window too
    dist = symmetric({(0, 1): 1.0, (0, 2): 2.0, (1, 2): 2.0}, size=3, fill=0.0)
    assert semi_hard(dist, labels, margin=1.0)[0].numel() == 0


def symmetric(entries: dict[tuple[int, int], float], size: int, fill: float) -> torch.Tensor:
    dist = torch.full((size, size), fill, dtype=torch.float64)
    for (i, j), value in entries.items():
        dist[i, j] = dist[j, i] = value
    return dist.fill_diagonal_(0.0)


@pytest.mark.parametrize("miner", ["batch_hard", "batch_all", "semi_hard"])
@pytest.mark.parametrize(
    "labels",
    [[0, 0, 0, 0], [0, 1, 2, 3], [5], []],
    ids=["one-class", "all-distinct", "single", "empty"],
)
def test_miners_without_valid_triplets_return_empty(miner, labels):
    labels_tensor = torch.tensor(labels, dtype=torch.long)
    dist = pairwise_distance(torch.randn(len(labels), 3))
    mined = mine(miner, dist, labels_tensor)
    assert all(index.shape == (0,) and index.dtype == torch.int64 for index in mined)


def mine(miner: str, dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if miner == "batch_hard":
        return batch_hard(dist, labels)
    if miner == "batch_all":
        return batch_all(dist, labels)
    return semi_hard(dist, labels, 0.3)


@pytest.mark.parametrize("miner", ["batch_hard", "batch_all", "semi_hard"])
def test_miners_accept_non_contiguous_dist_and_int32_labels(miner):
    embeddings, labels = make_batch(3, 9, 4, 3)
    dist = pairwise_distance(embeddings)
    expected = mine(miner, dist, labels)
    transposed = dist.T.contiguous().T  # same values, column-major strides
    assert not transposed.is_contiguous()
    mined = mine(miner, transposed, labels.int())
    assert all(torch.equal(x, y) for x, y in zip(mined, expected))


@pytest.mark.parametrize("miner", ["batch_hard", "batch_all", "semi_hard"])
def test_miners_do_not_modify_inputs(miner):
    embeddings, labels = make_batch(4, 8, 3, 3)
    dist = pairwise_distance(embeddings)
    dist_before, labels_before = dist.clone(), labels.clone()
    mine(miner, dist, labels)
    assert torch.equal(dist, dist_before) and torch.equal(labels, labels_before)


# ---------------------------------------------------------------- pytorch-metric-learning oracle

pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_utils = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")


def pml_distance(distance: str):  # type: ignore[no-untyped-def]
    if distance == "cosine":
        return pml_distances.CosineSimilarity()  # similarity; PML inverts its comparisons
    power = 2 if distance == "squared_euclidean" else 1
    return pml_distances.LpDistance(normalize_embeddings=False, power=power)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", range(4))
def test_batch_hard_matches_pml(distance, seed):
    embeddings, labels = make_batch(seed, 16, 4, 5)
    ours = sorted(as_triplets(batch_hard(pairwise_distance(embeddings, distance), labels)))
    miner = pml_miners.BatchHardMiner(distance=pml_distance(distance))
    theirs = sorted(as_triplets(tuple(t.long() for t in miner(embeddings, labels))))
    assert ours == theirs


@pytest.mark.parametrize("seed", range(3))
def test_batch_all_matches_pml(seed):
    _, labels = make_batch(seed, 13, 2, 4)
    ours = sorted(as_triplets(batch_all(torch.zeros(13, 13), labels)))
    theirs = sorted(
        as_triplets(tuple(t.long() for t in pml_utils.get_all_triplets_indices(labels)))
    )
    assert ours == theirs


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", range(4))
def test_semi_hard_window_matches_pml(distance, seed):
    # PML's "semihard" miner returns *every* triplet in the window; ours keeps, per positive
    # pair, the closest of them (and falls back to a hard negative for pairs without one).
    margin = 0.4 if distance == "cosine" else 1.0
    embeddings, labels = make_batch(seed, 16, 4, 4)
    dist = pairwise_distance(embeddings, distance)
    miner = pml_miners.TripletMarginMiner(
        margin=margin, type_of_triplets="semihard", distance=pml_distance(distance)
    )
    window: dict[tuple[int, int], list[int]] = {}
    for a, p, n in as_triplets(tuple(t.long() for t in miner(embeddings, labels))):
        window.setdefault((a, p), []).append(n)
    assert window, "the test batch should contain semi-hard triplets"
    mined = as_triplets(semi_hard(dist, labels, margin))
    in_window = {(a, p): n for a, p, n in mined if dist[a, n] > dist[a, p]}
    assert set(in_window) == set(window)
    for (a, p), candidates in window.items():
        assert in_window[(a, p)] == min(candidates, key=lambda n: dist[a, n].item())


# ---------------------------------------------------------------- errors


def test_miner_errors():
    dist = torch.zeros(3, 3)
    labels = torch.tensor([0, 0, 1])
    with pytest.raises(TypeError, match=r"dist must be a torch.Tensor, got list"):
        batch_hard([[0.0]], labels)
    with pytest.raises(
        ValueError,
        match=r"dist must be a square \[batch, batch\] distance matrix, got shape \(3, 2\)",
    ):
        batch_all(torch.zeros(3, 2), labels)
    with pytest.raises(ValueError, match=r"dist must be a square .* got shape \(3,\)"):
        batch_all(torch.zeros(3), labels)
    with pytest.raises(
        TypeError, match=r"dist must be a floating-point tensor, got dtype torch.int64"
    ):
        batch_hard(torch.zeros(3, 3, dtype=torch.long), labels)
    with pytest.raises(ValueError, match=r"dist must be finite, got 1 NaN/inf value\(s\)"):
        semi_hard(torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]), labels[:2], 0.3)
    with pytest.raises(
        ValueError,
        match=r"labels must have shape \[3\] to match dist of shape \(3, 3\), got shape \(2,\)",
    ):
        batch_hard(dist, labels[:2])
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        batch_hard(dist, labels.float())
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor"):
        batch_hard(dist, [0, 0, 1])
    with pytest.raises(ValueError, match=r"margin must be in \(0, inf\], got 0.0"):
        semi_hard(dist, labels, 0.0)
    with pytest.raises(ValueError, match=r"margin must be in \(0, inf\], got -1.0"):
        semi_hard(dist, labels, -1.0)
    with pytest.raises(TypeError, match=r"margin must be a real number, got str"):
        semi_hard(dist, labels, "0.3")  # type: ignore[arg-type]


def test_miner_value_checks_follow_the_validation_switch():
    dist = torch.tensor([[0.0, float("nan")], [float("nan"), 0.0]])
    with validation(False):
        batch_hard(dist, torch.tensor([0, 1]))  # no check, no error
