"""Tests for the pair and embedding losses: contrastive, marginal, lifted structure,
multi-similarity (+ miner), n-pair, quadruplet, range and SoftTriple.

Each is checked against the float64 loop references in ``tests/reference_losses.py`` (loss
and gradient, hypothesis over batch compositions including classes with one sample and
one-class batches), with ``gradcheck``, at extreme norms in float32, for its documented
errors, and against pytorch-metric-learning where PML has the loss.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marginloss import losses, validation
from marginloss.miners import multi_similarity_miner, pairwise_distance
from tests import reference_losses as ref

FAST = settings(max_examples=25, deadline=None)
REDUCTIONS = ("mean", "sum", "none")
DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def make_batch(seed: int, batch: int, dim: int, num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_labels, (batch,), generator=generator)
    return embeddings, labels


batches = st.builds(
    make_batch,
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(0, 9),
    dim=st.integers(2, 4),
    num_labels=st.integers(1, 4),
)


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss.sum(), inputs, allow_unused=True, materialize_grads=True)


def assert_matches(ours: torch.Tensor, expected: torch.Tensor, *inputs: torch.Tensor) -> None:
    """Values and gradients equal to float64 precision; never NaN."""
    assert torch.isfinite(ours).all(), ours
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=1e-9, atol=1e-11)
    if ours.requires_grad and expected.requires_grad:
        got, want = grads(ours, *inputs), grads(expected, *inputs)
        for g, w in zip(got, want):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


# ================================================================ float64 references


@FAST
@given(batch=batches, margin=st.floats(0.1, 3.0), distance=st.sampled_from(DISTANCES),
       reduction=st.sampled_from(REDUCTIONS))
def test_contrastive_matches_reference(batch, margin, distance, reduction):
    embeddings, labels = batch
    embeddings.requires_grad_(True)
    ours = losses.contrastive_loss(embeddings, labels, margin=margin, distance=distance,
                                   reduction=reduction)
    expected = ref.contrastive_loss(embeddings, labels, margin=margin, distance_kind=distance,
                                    reduction=reduction)
    assert_matches(ours, expected, embeddings)


@FAST
@given(batch=batches, threshold=st.floats(0.5, 2.0), margin=st.floats(0.0, 0.5),
       reduction=st.sampled_from(REDUCTIONS))
def test_marginal_matches_reference(batch, threshold, margin, reduction):
    embeddings, labels = batch
    embeddings.requires_grad_(True)
    ours = losses.marginal_loss(embeddings, labels, threshold=threshold, margin=margin,
                                reduction=reduction)
    expected = ref.marginal_loss(embeddings, labels, threshold=threshold, margin=margin,
                                 reduction=reduction)
    assert_matches(ours, expected, embeddings)


@FAST
@given(batch=batches, margin=st.floats(0.0, 2.0), distance=st.sampled_from(DISTANCES),
       reduction=st.sampled_from(REDUCTIONS))
def test_lifted_structure_matches_reference(batch, margin, distance, reduction):
    embeddings, labels = batch
    embeddings.requires_grad_(True)
    ours = losses.lifted_structure_loss(embeddings, labels, margin=margin, distance=distance,
                                        reduction=reduction)
    expected = ref.lifted_structure_loss(embeddings, labels, margin=margin,
                                         distance_kind=distance, reduction=reduction)
    assert_matches(ours, expected, embeddings)


@FAST
@given(batch=batches, alpha=st.floats(0.5, 4.0), beta=st.floats(1.0, 60.0),
       base=st.floats(0.0, 1.0), reduction=st.sampled_from(REDUCTIONS), mined=st.booleans())
def test_multi_similarity_matches_reference(batch, alpha, beta, base, reduction, mined):
    embeddings, labels = batch
    embeddings.requires_grad_(True)
    pairs = None
    expected_pairs = None
    if mined:
        similarity = 1 - ref.distance_matrix(embeddings.detach(), "cosine")
        pairs = multi_similarity_miner(similarity.clone(), labels, 0.1)
        expected_pairs = ref.multi_similarity_pairs(similarity.tolist(), labels.tolist(), 0.1)
        assert sorted(zip(pairs[0].tolist(), pairs[1].tolist())) == sorted(expected_pairs[0])
        assert sorted(zip(pairs[2].tolist(), pairs[3].tolist())) == sorted(expected_pairs[1])
    ours = losses.multi_similarity_loss(embeddings, labels, pairs, alpha=alpha, beta=beta,
                                        base=base, reduction=reduction)
    expected = ref.multi_similarity_loss(embeddings, labels, alpha=alpha, beta=beta, base=base,
                                         reduction=reduction, pairs=expected_pairs)
    assert_matches(ours, expected, embeddings)


@FAST
@given(batch=batches, l2_reg=st.sampled_from([0.0, 0.002, 0.5]),
       reduction=st.sampled_from(REDUCTIONS))
def test_npair_matches_reference(batch, l2_reg, reduction):
    embeddings, labels = batch
    embeddings.requires_grad_(True)
    ours = losses.npair_loss(embeddings, labels, l2_reg=l2_reg, reduction=reduction)
    expected = ref.npair_loss(embeddings, labels, l2_reg=l2_reg, reduction=reduction)
    assert_matches(ours, expected, embeddings)


@FAST
@given(batch=batches, margin1=st.floats(0.0, 2.0), margin2=st.floats(0.0, 1.0),
       distance=st.sampled_from(DISTANCES), reduction=st.sampled_from(REDUCTIONS))
def test_quadruplet_matches_reference(batch, margin1, margin2, distance, reduction):
    embeddings, labels = batch
    embeddings.requires_grad_(True)
    ours = losses.quadruplet_loss(embeddings, labels, margin1=margin1, margin2=margin2,
                                  distance=distance, reduction=reduction)
    expected = ref.quadruplet_loss(embeddings, labels, margin1=margin1, margin2=margin2,
                                   distance_kind=distance, reduction=reduction)
    assert_matches(ours, expected, embeddings)


@FAST
@given(batch=batches, k=st.integers(1, 4), margin=st.floats(0.0, 20.0),
       alpha=st.floats(0.0, 2.0), beta=st.floats(0.0, 2.0))
def test_range_matches_reference(batch, k, margin, alpha, beta):
    embeddings, labels = batch
    embeddings.requires_grad_(True)
    ours = losses.range_loss(embeddings, labels, k=k, margin=margin, alpha=alpha, beta=beta)
    expected = ref.range_loss(embeddings, labels, k=k, margin=margin, alpha=alpha, beta=beta)
    assert_matches(ours, expected, embeddings)


@FAST
@given(batch=batches, centers_per_class=st.integers(1, 3), la=st.floats(1.0, 30.0),
       gamma=st.floats(0.05, 1.0), margin=st.floats(0.0, 0.2), tau=st.floats(0.0, 0.5),
       reduction=st.sampled_from(REDUCTIONS), seed=st.integers(0, 1000))
def test_soft_triple_matches_reference(batch, centers_per_class, la, gamma, margin, tau,
                                       reduction, seed):
    embeddings, labels = batch
    num_classes = 4
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes * centers_per_class, embeddings.shape[1],
                         generator=generator, dtype=torch.float64, requires_grad=True)
    embeddings.requires_grad_(True)
    kwargs = dict(centers_per_class=centers_per_class, la=la, gamma=gamma, margin=margin,
                  tau=tau, reduction=reduction)
    ours = losses.soft_triple_loss(embeddings, labels, weight, **kwargs)
    expected = ref.soft_triple_loss(embeddings, labels, weight, **kwargs)
    assert_matches(ours, expected, embeddings, weight)


# ================================================================ mined indices


def test_pair_losses_score_given_pairs_and_triplets():
    embeddings, labels = make_batch(5, 9, 3, 3)
    embeddings.requires_grad_(True)
    positive = ref.positives(labels.tolist(), 0)[:1] or [0]
    pairs = (torch.tensor([0, 1]), torch.tensor([positive[0], 1]),
             torch.tensor([0, 2]), torch.tensor([3, 4]))
    expected_pairs = ([(0, positive[0]), (1, 1)], [(0, 3), (2, 4)])
    ours = losses.contrastive_loss(embeddings, labels, pairs, margin=2.0, reduction="none")
    expected = ref.contrastive_loss(embeddings, labels, margin=2.0, distance_kind="euclidean",
                                    reduction="none", pairs=expected_pairs)
    assert_matches(ours, expected, embeddings)
    # a triplet tuple is turned into its distinct (a, p) and (a, n) pairs
    triplets = (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([2, 3]))
    from_triplets = losses.contrastive_loss(embeddings, labels, triplets, reduction="sum")
    as_pairs = losses.contrastive_loss(
        embeddings, labels,
        (torch.tensor([0]), torch.tensor([1]), torch.tensor([0, 0]), torch.tensor([2, 3])),
        reduction="sum",
    )
    torch.testing.assert_close(from_triplets, as_pairs)
    for fn in (losses.marginal_loss, losses.lifted_structure_loss, losses.multi_similarity_loss):
        value = fn(embeddings, labels, pairs)
        assert torch.isfinite(value)
        value.backward()


def test_multi_similarity_with_given_pairs_matches_reference():
    embeddings, labels = make_batch(6, 8, 3, 3)
    embeddings.requires_grad_(True)
    pairs = (torch.tensor([0, 0, 5]), torch.tensor([1, 2, 6]), torch.tensor([1]), torch.tensor([7]))
    expected = ref.multi_similarity_loss(
        embeddings, labels, alpha=2.0, beta=50.0, base=0.5, reduction="none",
        pairs=([(0, 1), (0, 2), (5, 6)], [(1, 7)]),
    )
    assert_matches(losses.multi_similarity_loss(embeddings, labels, pairs, reduction="none"),
                   expected, embeddings)


def test_quadruplet_with_given_quadruplets_matches_reference():
    embeddings, labels = make_batch(7, 8, 3, 3)
    embeddings.requires_grad_(True)
    quads = [(0, 1, 2, 3), (4, 5, 6, 7), (1, 0, 7, 2)]
    tensors = tuple(torch.tensor(column) for column in zip(*quads))
    for reduction in REDUCTIONS:
        ours = losses.quadruplet_loss(embeddings, labels, tensors, reduction=reduction)
        expected = ref.quadruplet_loss(embeddings, labels, margin1=1.0, margin2=0.5,
                                       distance_kind="squared_euclidean", reduction=reduction,
                                       quadruplets=quads)
        assert_matches(ours, expected, embeddings)


# ================================================================ gradcheck


def _gradcheck_cases() -> list[tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]:
    weight = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return [
        ("contrastive", lambda e, y: losses.contrastive_loss(e, y, margin=3.0)),
        ("marginal", lambda e, y: losses.marginal_loss(e, y, threshold=1.0, margin=0.8)),
        ("lifted", lambda e, y: losses.lifted_structure_loss(e, y)),
        ("multi_similarity", lambda e, y: losses.multi_similarity_loss(e, y, beta=10.0)),
        ("npair", lambda e, y: losses.npair_loss(e, y, l2_reg=0.1)),
        ("quadruplet", lambda e, y: losses.quadruplet_loss(e, y, margin1=5.0, margin2=4.0)),
        ("range", lambda e, y: losses.range_loss(e, y, k=2, margin=50.0, alpha=1.0, beta=1.0)),
        ("soft_triple", lambda e, y: losses.soft_triple_loss(e, y, weight, centers_per_class=2)),
    ]


@pytest.mark.parametrize("name, fn", _gradcheck_cases(), ids=[c[0] for c in _gradcheck_cases()])
def test_gradcheck(name, fn):
    embeddings, _ = make_batch(2, 7, 4, 1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    embeddings.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: fn(e, labels), (embeddings,))


def test_soft_triple_gradcheck_weight():
    embeddings, _ = make_batch(3, 5, 4, 1)
    labels = torch.tensor([0, 1, 2, 2, 0])
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w: losses.soft_triple_loss(embeddings, labels, w, centers_per_class=2), (weight,)
    )


# ================================================================ degenerate batches


def _all_losses() -> list[tuple[str, Callable[..., torch.Tensor]]]:
    return [
        ("contrastive", lambda e, y: losses.contrastive_loss(e, y)),
        ("marginal", lambda e, y: losses.marginal_loss(e, y)),
        ("lifted", lambda e, y: losses.lifted_structure_loss(e, y)),
        ("multi_similarity", lambda e, y: losses.multi_similarity_loss(e, y)),
        ("npair", lambda e, y: losses.npair_loss(e, y)),
        ("quadruplet", lambda e, y: losses.quadruplet_loss(e, y)),
        ("range", lambda e, y: losses.range_loss(e, y, margin=1.0, alpha=1.0, beta=1.0)),
        ("soft_triple", lambda e, y: losses.soft_triple_loss(
            e, y.clamp_max(2), _fixed_weight(6, e), centers_per_class=2)),
    ]


def _fixed_weight(rows: int, embeddings: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, embeddings.shape[1], generator=generator).to(embeddings.dtype)


@pytest.mark.parametrize("name, fn", _all_losses(), ids=[c[0] for c in _all_losses()])
@pytest.mark.parametrize(
    "labels",
    [[], [0], [0, 0, 0, 0], [0, 1, 2, 3], [5, 5, 7]],
    ids=["empty", "single", "one_class", "no_positive", "two_classes"],
)
def test_degenerate_batches_give_finite_loss_and_gradient(name, fn, labels):
    embeddings = torch.randn(len(labels), 3, dtype=torch.float64, requires_grad=True)
    loss = fn(embeddings, torch.tensor(labels, dtype=torch.long))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("name, fn", _all_losses(), ids=[c[0] for c in _all_losses()])
def test_coincident_and_zero_embeddings_have_finite_gradient(name, fn):
    embeddings = torch.zeros(6, 3, dtype=torch.float64)
    embeddings[3:] = 1.0
    embeddings.requires_grad_(True)
    loss = fn(embeddings, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()


# ================================================================ extreme norms (issue 12)

SCALE_INVARIANT = [
    ("marginal", lambda e, y: losses.marginal_loss(e, y)),
    ("multi_similarity", lambda e, y: losses.multi_similarity_loss(e, y)),
    ("contrastive_cosine", lambda e, y: losses.contrastive_loss(e, y, distance="cosine")),
    ("lifted_cosine", lambda e, y: losses.lifted_structure_loss(e, y, distance="cosine")),
    ("soft_triple", lambda e, y: losses.soft_triple_loss(
        e, y, torch.randn(12, e.shape[1], generator=torch.Generator().manual_seed(0)).to(e.dtype),
        centers_per_class=3)),
]


@pytest.mark.parametrize("name, fn", SCALE_INVARIANT, ids=[c[0] for c in SCALE_INVARIANT])
@pytest.mark.parametrize("scale", [1e20, 1e-25, 1e30, 1e-30])
def test_normalised_losses_do_not_depend_on_the_scale_in_float32(name, fn, scale):
    embeddings, _ = make_batch(8, 8, 4, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expected = fn(embeddings, labels)
    low = (embeddings * scale).float().requires_grad_(True)
    got = fn(low, labels)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    got.backward()
    assert torch.isfinite(low.grad).all()


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_euclidean_losses_scale_exactly_in_float32(scale):
    # homogeneous losses: contrastive with margin * scale is scale * (loss at scale 1) ** ...
    embeddings, _ = make_batch(9, 8, 4, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expected = ref.contrastive_loss(embeddings * scale, labels, margin=2.0 * scale,
                                    distance_kind="euclidean", reduction="mean")
    got = losses.contrastive_loss((embeddings * scale).float(), labels, margin=2.0 * scale)
    if scale > 1:
        assert not torch.isfinite(got) or got.double().item() == pytest.approx(
            expected.item(), rel=1e-4)
    else:
        # D^2 ~ 1e-50 underflows in float32 (the loss value itself is below float32's range)
        assert torch.isfinite(got)
    expected_q = ref.quadruplet_loss(embeddings * scale, labels, margin1=scale, margin2=scale / 2,
                                     distance_kind="euclidean", reduction="mean")
    got_q = losses.quadruplet_loss((embeddings * scale).float(), labels, margin1=scale,
                                   margin2=scale / 2, distance="euclidean")
    assert got_q.double().item() == pytest.approx(expected_q.item(), rel=1e-4)


# ================================================================ modules


MODULES: list[tuple[type, Callable[..., torch.Tensor], dict[str, Any], str]] = [
    (losses.ContrastiveLoss, losses.contrastive_loss, {"margin": 0.7, "distance": "cosine"},
     "ContrastiveLoss(margin=0.7, distance='cosine', reduction='mean')"),
    (losses.MarginalLoss, losses.marginal_loss, {"threshold": 1.0, "margin": 0.2},
     "MarginalLoss(threshold=1.0, margin=0.2, reduction='mean')"),
    (losses.LiftedStructureLoss, losses.lifted_structure_loss, {"margin": 0.5},
     "LiftedStructureLoss(margin=0.5, distance='euclidean', reduction='mean')"),
    (losses.MultiSimilarityLoss, losses.multi_similarity_loss, {"alpha": 1.0, "beta": 20.0},
     "MultiSimilarityLoss(alpha=1.0, beta=20.0, base=0.5, reduction='mean')"),
    (losses.NPairLoss, losses.npair_loss, {"l2_reg": 0.01},
     "NPairLoss(l2_reg=0.01, reduction='mean')"),
    (losses.QuadrupletLoss, losses.quadruplet_loss, {"margin1": 2.0, "margin2": 1.0},
     "QuadrupletLoss(margin1=2.0, margin2=1.0, distance='squared_euclidean', reduction='mean')"),
    (losses.RangeLoss, losses.range_loss, {"k": 3, "margin": 5.0, "alpha": 0.1, "beta": 0.2},
     "RangeLoss(k=3, margin=5.0, alpha=0.1, beta=0.2)"),
]


@pytest.mark.parametrize("module, function, kwargs, text", MODULES, ids=[m[0].__name__ for m in MODULES])
def test_module_matches_functional_repr_and_signature(module, function, kwargs, text):
    embeddings, labels = make_batch(11, 10, 4, 3)
    criterion = module(**kwargs)
    assert repr(criterion) == text
    assert list(criterion.state_dict()) == []
    torch.testing.assert_close(criterion(embeddings, labels), function(embeddings, labels, **kwargs))
    functional = inspect.signature(function).parameters
    forward = [p for n, p in inspect.signature(module.forward).parameters.items() if n != "self"]
    init = [p for n, p in inspect.signature(module.__init__).parameters.items() if n != "self"]
    assert [(p.name, p.default) for p in forward + init] == [
        (p.name, p.default) for p in functional.values()
    ]


def test_soft_triple_module():
    torch.manual_seed(0)
    criterion = losses.SoftTripleLoss(4, 3, centers_per_class=2, dtype=torch.float64)
    assert repr(criterion) == (
        "SoftTripleLoss(embedding_dim=4, num_classes=3, centers_per_class=2, la=20.0, "
        "gamma=0.1, margin=0.01, tau=0.2, reduction='mean')"
    )
    assert criterion.weight.shape == (6, 4) and list(criterion.state_dict()) == ["weight"]
    embeddings, labels = make_batch(12, 6, 4, 3)
    torch.testing.assert_close(
        criterion(embeddings, labels),
        losses.soft_triple_loss(embeddings, labels, criterion.weight, centers_per_class=2),
    )
    functional = inspect.signature(losses.soft_triple_loss).parameters
    init = inspect.signature(losses.SoftTripleLoss.__init__).parameters
    for name in ("centers_per_class", "la", "gamma", "margin", "tau", "reduction"):
        assert functional[name].default == init[name].default
    with torch.no_grad():
        criterion.weight[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"weight must be finite, got 1 of 6 centre row\(s\) "
                                         r"with NaN/inf values \(e.g. rows \[4\]\)"):
        criterion(embeddings, labels)


@pytest.mark.parametrize("name, fn", _all_losses(), ids=[c[0] for c in _all_losses()])
def test_under_autocast_computes_in_float32_and_leaves_inputs_alone(name, fn):
    embeddings, _ = make_batch(13, 8, 4, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 1])
    low = embeddings.bfloat16().requires_grad_(True)
    snapshot = low.detach().clone(), labels.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(low, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16
    assert torch.equal(low.detach(), snapshot[0]) and torch.equal(labels, snapshot[1])


# ================================================================ errors


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match=r"margin must be in \(0, inf\], got 0.0"):
        losses.ContrastiveLoss(margin=0.0)
    with pytest.raises(TypeError, match=r"margin must be a real number, got str '1'"):
        losses.contrastive_loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), margin="1")
    with pytest.raises(ValueError, match=r"distance must be one of .*got 'l1'"):
        losses.LiftedStructureLoss(distance="l1")
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 4\), got 4.0"):
        losses.MarginalLoss(threshold=4.0)
    with pytest.raises(ValueError, match=r"margin must be in \[0, inf\], got -0.1"):
        losses.MarginalLoss(margin=-0.1)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, inf\], got 0.0"):
        losses.MultiSimilarityLoss(alpha=0.0)
    with pytest.raises(ValueError, match=r"beta must be in \(0, inf\], got -1.0"):
        losses.MultiSimilarityLoss(beta=-1.0)
    with pytest.raises(ValueError, match=r"base must be in \[-inf, inf\], got nan"):
        losses.MultiSimilarityLoss(base=float("nan"))
    with pytest.raises(ValueError, match=r"l2_reg must be in \[0, inf\], got -0.5"):
        losses.NPairLoss(l2_reg=-0.5)
    with pytest.raises(ValueError, match=r"margin2 must be in \[0, inf\], got -1.0"):
        losses.QuadrupletLoss(margin2=-1.0)
    with pytest.raises(ValueError, match=r"k must be a positive int, got 0"):
        losses.RangeLoss(k=0, margin=1.0, alpha=1.0, beta=1.0)
    with pytest.raises(TypeError, match=r"missing 1 required keyword-only argument: 'margin'"):
        losses.RangeLoss(alpha=1.0, beta=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"centers_per_class must be a positive int, got 0"):
        losses.SoftTripleLoss(4, 3, centers_per_class=0)
    with pytest.raises(ValueError, match=r"gamma must be in \(0, inf\], got 0.0"):
        losses.SoftTripleLoss(4, 3, gamma=0.0)
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'avg'"):
        losses.NPairLoss(reduction="avg")
    with pytest.raises(TypeError, match=r"dtype must be a floating-point dtype, got torch.int64"):
        losses.SoftTripleLoss(4, 3, dtype=torch.long)


def test_input_errors():
    embeddings, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"embeddings must be finite, got 1 NaN/inf value\(s\)"):
        losses.marginal_loss(torch.tensor([[float("nan"), 0.0], [1.0, 0.0]]), labels[:2])
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        losses.npair_loss(embeddings, labels[:3])
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        losses.range_loss(embeddings, labels.float(), margin=1.0, alpha=1.0, beta=1.0)
    with pytest.raises(TypeError, match=r"indices_tuple must be a tuple .* got dict"):
        losses.contrastive_loss(embeddings, labels, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"indices_tuple must hold 3 .* or 4 .* got 2"):
        losses.multi_similarity_loss(embeddings, labels, (labels, labels))
    with pytest.raises(ValueError, match=r"indices_tuple \(negative\) must be in \[0, 4\) "
                                         r"\(the batch size\), got 1 value\(s\) outside, e.g. \[9\]"):
        losses.lifted_structure_loss(embeddings, labels, (labels, labels, labels[:1], torch.tensor([9])))
    with pytest.raises(ValueError, match=r"indices_tuple \(positive\) must be 1-D of length 2"):
        losses.contrastive_loss(embeddings, labels, (labels[:2], labels, labels[:1], labels[:1]))
    with pytest.raises(TypeError, match=r"indices_tuple \(anchor\) must be an integer tensor"):
        losses.marginal_loss(embeddings, labels, (labels.float(), labels, labels))
    with pytest.raises(ValueError, match=r"indices_tuple must hold 4 index tensors \(anchor, "
                                         r"positive, negative, other_negative\), got 3"):
        losses.quadruplet_loss(embeddings, labels, (labels, labels, labels))
    weight = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \[num_classes \* centers_per_class, "
                                         r"embedding_dim\] \(centers_per_class=2\), got shape \(5, 3\)"):
        losses.soft_triple_loss(embeddings, labels, weight, centers_per_class=2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\) \(num_classes=2\)"):
        losses.soft_triple_loss(embeddings, torch.tensor([0, 1, 2, 0]), torch.randn(4, 3),
                                centers_per_class=2)
    with validation(False):  # value checks off: no raise, and no sync
        losses.lifted_structure_loss(embeddings, labels, (labels, labels, labels, labels))


def test_multi_similarity_miner_errors():
    labels = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=r"similarity must be a square \[batch, batch\] "
                                         r"similarity matrix, got shape \(3, 2\)"):
        multi_similarity_miner(torch.zeros(3, 2), labels)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, inf\], got -0.1"):
        multi_similarity_miner(torch.zeros(3, 3), labels, epsilon=-0.1)
    with pytest.raises(ValueError, match=r"similarity must be finite, got 1 NaN/inf"):
        multi_similarity_miner(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), labels[:2])
    empty = multi_similarity_miner(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
    assert all(t.shape == (0,) for t in empty)


# ================================================================ pytorch-metric-learning oracle
# PML's conventions and how we convert:
# - its distances L2-normalise the embeddings by default (LpDistance(normalize_embeddings=True)):
#   we feed our losses the unit embeddings where PML normalises (lifted structure, n-pair);
# - ContrastiveLoss: PML's per-pair losses are relu(d - pos_margin), relu(neg_margin - d)
#   (no square, no 1/2) over ordered pairs, averaged over the non-zero ones per kind; ours
#   are 1/2 d^2 and 1/2 relu(m - d)^2 over unordered pairs: compared pair by pair;
# - NPairsLoss has no L2 regulariser: l2_reg=0;
# - SoftTripleLoss stores its centres [D, C*K] (ours [C*K, D], same column order) and has
#   no centre regulariser: tau=0 and the transposed weight;
# - MultiSimilarityLoss / MultiSimilarityMiner: same conventions; the miner returns the
#   same pairs in another order (compared as sets).

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _compare(ours_fn: Callable[[torch.Tensor], torch.Tensor],
             theirs_fn: Callable[[torch.Tensor], torch.Tensor], embeddings: torch.Tensor) -> None:
    a = embeddings.clone().requires_grad_(True)
    b = embeddings.clone().requires_grad_(True)
    ours, theirs = ours_fn(a), theirs_fn(b)
    assert ours.item() > 0
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-9, atol=1e-11)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_contrastive_matches_pml_pair_by_pair(seed):
    embeddings, labels = make_batch(seed, 12, 5, 4)
    margin = 1.5
    pml = pml_losses.ContrastiveLoss(
        pos_margin=0.0, neg_margin=margin, reducer=pml_reducers.DoNothingReducer(),
        distance=pml_distances.LpDistance(normalize_embeddings=False),
    )
    out = pml(embeddings, labels)
    ours = losses.contrastive_loss(embeddings, labels, margin=margin, reduction="none")
    pos, neg = ref.pair_lists(labels.tolist())
    for kind, pairs, offset in (("pos_loss", pos, 0), ("neg_loss", neg, len(pos))):
        first, second = out[kind]["indices"]
        theirs = {(int(i), int(j)): float(v) for i, j, v in zip(first, second, out[kind]["losses"])}
        for k, pair in enumerate(pairs):
            assert ours[offset + k].item() == pytest.approx(0.5 * theirs[pair] ** 2, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_lifted_structure_matches_pml(seed):
    embeddings, labels = make_batch(seed, 12, 5, 4)
    pml = pml_losses.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0)
    _compare(lambda e: losses.lifted_structure_loss(_unit(e), labels), lambda e: pml(e, labels),
             embeddings)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mined", [False, True])
def test_multi_similarity_loss_and_miner_match_pml(seed, mined):
    embeddings, labels = make_batch(seed, 14, 5, 4)
    pml = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    if not mined:
        _compare(lambda e: losses.multi_similarity_loss(e, labels), lambda e: pml(e, labels),
                 embeddings)
        return
    theirs_pairs = pml_miners.MultiSimilarityMiner(epsilon=0.1)(embeddings, labels)
    ours_pairs = multi_similarity_miner(1 - pairwise_distance(embeddings, "cosine"), labels, 0.1)
    for ours_part, theirs_part in ((ours_pairs[:2], theirs_pairs[:2]), (ours_pairs[2:], theirs_pairs[2:])):
        assert sorted(zip(*(t.tolist() for t in ours_part))) == sorted(
            zip(*(t.tolist() for t in theirs_part)))
    _compare(lambda e: losses.multi_similarity_loss(e, labels, ours_pairs),
             lambda e: pml(e, labels, theirs_pairs), embeddings)


@pytest.mark.parametrize("seed", range(3))
def test_npair_matches_pml(seed):
    embeddings, labels = make_batch(seed, 12, 5, 4)
    pml = pml_losses.NPairsLoss()
    _compare(lambda e: losses.npair_loss(_unit(e), labels, l2_reg=0.0), lambda e: pml(e, labels),
             embeddings)


@pytest.mark.parametrize("seed", range(3))
def test_soft_triple_matches_pml_without_the_regulariser(seed):
    embeddings, labels = make_batch(seed, 10, 5, 4)
    torch.manual_seed(seed)
    pml = pml_losses.SoftTripleLoss(num_classes=4, embedding_size=5, centers_per_class=3,
                                    la=20.0, gamma=0.1, margin=0.01).double()
    weight = pml.fc.detach().T.contiguous()
    _compare(lambda e: losses.soft_triple_loss(e, labels, weight, centers_per_class=3, tau=0.0),
             lambda e: pml(e, labels), embeddings)


@pytest.mark.parametrize("name, fn", _all_losses(), ids=[c[0] for c in _all_losses()])
@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_extreme_norms_in_float32_are_exact_or_overflow_never_nan(name, fn, scale):
    # Where the loss is within float32's range it equals the float64 loss; where the loss
    # itself is beyond it (squared distances of norm-1e20 embeddings) it is +inf, never NaN
    # and never a finite wrong value (0.1's triplet loss gave 0 there).
    embeddings, _ = make_batch(14, 8, 4, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 1])
    torch.manual_seed(0)
    expected = fn(embeddings * scale, labels)
    torch.manual_seed(0)
    got = fn((embeddings * scale).float(), labels).double()
    assert not torch.isnan(got)
    if abs(expected.item()) < 3e38:
        assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-30)
    else:
        assert got.item() == float("inf")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: losses.LiftedStructureLoss(margin=-1.0), r"margin must be in \[0, inf\], got -1.0"),
        (lambda: losses.QuadrupletLoss(margin1=-0.5), r"margin1 must be in \[0, inf\], got -0.5"),
        (lambda: losses.QuadrupletLoss(distance="l2"), r"distance must be one of .*got 'l2'"),
        (lambda: losses.MarginalLoss(reduction="mean_all"), r"reduction must be one of .*got 'mean_all'"),
        (lambda: losses.RangeLoss(margin=-1.0, alpha=1.0, beta=1.0), r"margin must be in \[0, inf\], got -1.0"),
        (lambda: losses.RangeLoss(margin=1.0, alpha=-1.0, beta=1.0), r"alpha must be in \[0, inf\], got -1.0"),
        (lambda: losses.RangeLoss(margin=1.0, alpha=1.0, beta=-2.0), r"beta must be in \[0, inf\], got -2.0"),
        (lambda: losses.SoftTripleLoss(4, 3, la=0.0), r"la must be in \(0, inf\], got 0.0"),
        (lambda: losses.SoftTripleLoss(4, 3, tau=-0.1), r"tau must be in \[0, inf\], got -0.1"),
        (lambda: losses.SoftTripleLoss(4, 3, margin=-0.1), r"margin must be in \[0, inf\], got -0.1"),
        (lambda: losses.SoftTripleLoss(0, 3), r"embedding_dim must be a positive int, got 0"),
        (lambda: losses.SoftTripleLoss(4, -3), r"num_classes must be a positive int, got -3"),
    ],
)
def test_more_hyperparameter_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_soft_triple_input_errors():
    criterion = losses.SoftTripleLoss(4, 3, centers_per_class=2)
    with pytest.raises(ValueError, match=r"embeddings must have shape \[batch, 4\] \(embedding_dim=4\), got shape \(2, 5\)"):
        criterion(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor, got list"):
        losses.soft_triple_loss(torch.randn(2, 4), torch.tensor([0, 1]), [[0.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"weight must be a floating-point tensor, got dtype torch.int64"):
        losses.soft_triple_loss(torch.randn(2, 4), torch.tensor([0, 1]), torch.zeros(4, 4, dtype=torch.long),
                                centers_per_class=2)


@pytest.mark.parametrize("name, fn", SCALE_INVARIANT, ids=[c[0] for c in SCALE_INVARIANT])
def test_a_zero_embedding_gets_a_zero_gradient_in_the_normalised_losses(name, fn):
    # F.normalize's eps gave a zero row 1e12 times the upstream gradient (issue 12, item 5)
    embeddings, _ = make_batch(15, 8, 4, 1)
    embeddings[2] = 0.0
    embeddings.requires_grad_(True)
    fn(embeddings, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    assert torch.equal(embeddings.grad[2], torch.zeros(4, dtype=torch.float64))
    assert embeddings.grad.abs().max() < 100
