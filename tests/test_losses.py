"""Tests for marginloss.losses: CenterLoss / center_loss and TripletLoss / triplet_loss."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marginloss import validation
from marginloss.losses import CenterLoss, TripletLoss, center_loss, triplet_loss
from marginloss.miners import batch_all, batch_hard, pairwise_distance, semi_hard
from tests import reference_losses as ref

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
MININGS = ("batch_hard", "batch_all", "semi_hard")
REDUCTIONS = ("mean", "sum", "none")
FAST = settings(max_examples=40, deadline=None)


def make_batch(
    seed: int, batch: int, dim: int, num_labels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_labels, (batch,), generator=generator)
    return embeddings, labels


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradient of ``loss`` (summed if not scalar), zeros where an input is unused."""
    return torch.autograd.grad(loss.sum(), inputs, allow_unused=True, materialize_grads=True)


batches = st.builds(
    make_batch,
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(0, 10),
    dim=st.integers(3, 5),
    num_labels=st.integers(1, 4),
)


# ================================================================ center loss


@FAST
@given(
    batch=batches,
    num_classes=st.integers(1, 5),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 1000),
)
def test_center_loss_matches_reference(batch, num_classes, reduction, seed):
    embeddings, _ = batch
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (len(embeddings),), generator=generator)
    centers = torch.randn(
        num_classes, embeddings.shape[1], generator=generator, dtype=torch.float64
    )
    embeddings.requires_grad_(True)
    centers.requires_grad_(True)
    loss = center_loss(embeddings, labels, centers, reduction=reduction)
    expected = ref.center_loss(embeddings, labels, centers, reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        grads(loss, embeddings, centers),
        grads(expected, embeddings, centers),
        rtol=1e-10,
        atol=1e-12,
    )


def test_center_loss_mean_is_half_mean_squared_distance():
    centers = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    embeddings = torch.tensor([[3.0, 4.0], [1.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    assert center_loss(embeddings, labels, centers).item() == pytest.approx((25 + 1 + 0) / 2 / 3)
    assert center_loss(embeddings, labels, centers, reduction="sum").item() == pytest.approx(13.0)


def test_center_loss_empty_batch_is_zero():
    centers = torch.randn(3, 2, requires_grad=True)
    embeddings = torch.zeros(0, 2, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    for reduction in ("mean", "sum"):
        loss = center_loss(embeddings, labels, centers, reduction=reduction)
        assert loss.item() == 0.0
        loss.backward()
    assert center_loss(embeddings, labels, centers, reduction="none").shape == (0,)


def test_center_loss_gradcheck():
    embeddings, labels = make_batch(0, 7, 3, 4)
    centers = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    embeddings.requires_grad_(True)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda e, c, r=reduction: center_loss(e, labels, c, reduction=r), (embeddings, centers)
        )


def test_center_loss_module_matches_functional():
    torch.manual_seed(0)
    module = CenterLoss(3, 4, reduction="sum").double()
    embeddings, labels = make_batch(1, 9, 3, 4)
    torch.testing.assert_close(
        module(embeddings, labels), center_loss(embeddings, labels, module.centers, reduction="sum")
    )


def test_center_loss_learned_centers_get_the_reference_gradient():
    module = CenterLoss(3, 4).double()
    assert isinstance(module.centers, torch.nn.Parameter)
    assert [name for name, _ in module.named_parameters()] == ["centers"]
    assert [name for name, _ in module.named_buffers()] == []
    embeddings, labels = make_batch(2, 9, 3, 4)
    before = module.centers.detach().clone()
    module(embeddings, labels).backward()
    reference_centers = before.clone().requires_grad_(True)
    ref.center_loss(embeddings, labels, reference_centers, "mean").backward()
    torch.testing.assert_close(module.centers.grad, reference_centers.grad)
    assert torch.equal(module.centers.detach(), before)  # only the optimizer moves them


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.05])
def test_center_update_matches_reference_over_two_steps(alpha):
    module = CenterLoss(3, 5, alpha=alpha, dtype=torch.float64)
    assert [name for name, _ in module.named_parameters()] == []
    assert [name for name, _ in module.named_buffers()] == ["centers"]
    expected_centers = module.centers.clone()
    for step in range(2):
        # class 4 never appears, class 1 only in the second step
        embeddings, _ = make_batch(10 + step, 8, 3, 1)
        labels = (
            torch.tensor([0, 0, 2, 3, 3, 3, 0, 2])
            if step == 0
            else torch.tensor([1, 0, 1, 2, 2, 3, 1, 1])
        )
        embeddings.requires_grad_(True)
        loss = module(embeddings, labels)
        # the loss uses the centers from before this step's update
        torch.testing.assert_close(
            loss, ref.center_loss(embeddings, labels, expected_centers, "mean")
        )
        (embedding_grad,) = torch.autograd.grad(loss, embeddings)
        torch.testing.assert_close(
            embedding_grad, (embeddings - expected_centers[labels]).detach() / len(labels)
        )
        expected_centers = ref.center_update(expected_centers, embeddings, labels, alpha)
        torch.testing.assert_close(module.centers, expected_centers, rtol=1e-12, atol=1e-12)
        assert not module.centers.requires_grad and module.centers.grad is None


def test_center_update_only_in_training_mode():
    module = CenterLoss(3, 2, alpha=0.5)
    embeddings = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 0, 1])
    before = module.centers.clone()
    module.eval()
    module(embeddings, labels)
    assert torch.equal(module.centers, before)
    module.train()
    module(embeddings, labels)
    assert not torch.equal(module.centers, before)


def test_center_update_moves_centers_towards_class_means():
    module = CenterLoss(2, 1, alpha=1.0)
    embeddings = torch.tensor([[1.0, 1.0], [3.0, 3.0], [2.0, 5.0]])
    labels = torch.zeros(3, dtype=torch.long)
    for _ in range(60):
        module(embeddings, labels)
    # the fixed point of c <- c - (n c - sum x) / (1 + n) is the class mean
    torch.testing.assert_close(module.centers[0], embeddings.mean(0))


def test_center_loss_backward_after_update_works_and_grad_does_not_reach_buffer():
    module = CenterLoss(4, 3, alpha=0.5)
    embeddings = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = module(embeddings, labels)
    loss.backward()  # the in-place update must not break the graph
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()
    assert module.centers.grad is None


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_center_loss_does_not_modify_inputs(alpha):
    module = CenterLoss(3, 3, alpha=alpha)
    embeddings, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    embeddings_before, labels_before = embeddings.clone(), labels.clone()
    module(embeddings, labels)
    center_loss(embeddings, labels, torch.randn(3, 3))
    assert torch.equal(embeddings, embeddings_before) and torch.equal(labels, labels_before)


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_center_loss_state_dict_round_trip(alpha):
    module = CenterLoss(3, 4, alpha=alpha)
    module(torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1]))
    state = module.state_dict()
    assert list(state) == ["centers"]
    restored = CenterLoss(3, 4, alpha=alpha)
    restored.load_state_dict(state)
    assert torch.equal(restored.centers, module.centers)
    # a checkpoint moves between the two modes too: the key is "centers" either way
    other = CenterLoss(3, 4, alpha=None if alpha else 0.5)
    other.load_state_dict(state)
    assert torch.equal(other.centers, module.centers)


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_center_loss_to_float64(alpha):
    module = CenterLoss(3, 2, alpha=alpha).to(torch.float64)
    assert module.centers.dtype == torch.float64
    embeddings = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = module(embeddings, torch.tensor([0, 1, 1, 0]))
    assert loss.dtype == torch.float64
    loss.backward()
    assert module.centers.dtype == torch.float64


def test_center_loss_factory_kwargs_and_init():
    torch.manual_seed(0)
    module = CenterLoss(64, 500, dtype=torch.float64, device="cpu")
    assert module.centers.shape == (500, 64) and module.centers.dtype == torch.float64
    # standard normal initialisation
    assert abs(module.centers.mean().item()) < 0.02
    assert abs(module.centers.std().item() - 1.0) < 0.02


def test_center_loss_under_autocast_computes_in_float32():
    module = CenterLoss(8, 3)
    embeddings = torch.randn(5, 8).bfloat16().requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(embeddings, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, module(embeddings.float(), labels))
    loss.backward()
    assert embeddings.grad is not None and embeddings.grad.dtype == torch.bfloat16


def test_center_loss_extra_repr():
    assert (
        repr(CenterLoss(4, 3))
        == "CenterLoss(embedding_dim=4, num_classes=3, alpha=None, reduction='mean')"
    )
    assert "alpha=0.5, reduction='none'" in repr(CenterLoss(4, 3, alpha=0.5, reduction="none"))


def test_center_loss_constructor_errors():
    with pytest.raises(ValueError, match=r"embedding_dim must be a positive int, got 0"):
        CenterLoss(0, 3)
    with pytest.raises(ValueError, match=r"num_classes must be a positive int, got '3'"):
        CenterLoss(4, "3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got 0.0"):
        CenterLoss(4, 3, alpha=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got 1.5"):
        CenterLoss(4, 3, alpha=1.5)
    with pytest.raises(TypeError, match=r"alpha must be a real number, got str"):
        CenterLoss(4, 3, alpha="0.5")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"
    ):
        CenterLoss(4, 3, reduction="avg")
    with pytest.raises(TypeError, match=r"dtype must be a floating-point dtype, got torch.int64"):
        CenterLoss(4, 3, dtype=torch.int64)


def test_center_loss_forward_errors():
    module = CenterLoss(4, 3)
    labels = torch.tensor([0, 1])
    with pytest.raises(
        ValueError,
        match=r"embeddings must have shape \[batch, 4\] \(embedding_dim=4\), got shape \(2, 5\)",
    ):
        module(torch.randn(2, 5), labels)
    with pytest.raises(
        ValueError,
        match=r"labels must be in \[0, 3\) \(num_classes=3\), got 1 value\(s\) outside, e.g. \[3\]",
    ):
        module(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):
        module(torch.randn(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        module(torch.randn(2, 4), labels.float())
    with pytest.raises(ValueError, match=r"embeddings must be finite"):
        module(torch.tensor([[0.0, 1.0, float("inf"), 0.0], [0.0] * 4]), labels)
    with pytest.raises(TypeError, match=r"embeddings must be a torch.Tensor"):
        module([[0.0] * 4], labels)
    with validation(False):  # value checks are skipped, shape checks are not
        module(torch.tensor([[0.0, 1.0, float("inf"), 0.0], [0.0] * 4]), labels)
        with pytest.raises(ValueError, match=r"embeddings must have shape"):
            module(torch.randn(2, 5), labels)


def test_center_loss_functional_errors():
    embeddings, labels = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"centers must be a torch.Tensor, got list"):
        center_loss(embeddings, labels, [[0.0] * 4])  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"centers must have shape \[num_classes, embedding_dim\], got shape \(4,\)",
    ):
        center_loss(embeddings, labels, torch.zeros(4))
    with pytest.raises(
        TypeError, match=r"centers must be a floating-point tensor, got dtype torch.int64"
    ):
        center_loss(embeddings, labels, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"embeddings must have shape \[batch, 3\]"):
        center_loss(embeddings, labels, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'max'"):
        center_loss(embeddings, labels, torch.zeros(2, 4), reduction="max")


# ================================================================ triplet loss


@FAST
@given(
    batch=batches,
    margin=st.floats(0.05, 2.0),
    mining=st.sampled_from(MININGS),
    distance=st.sampled_from(DISTANCES),
    soft=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_triplet_loss_matches_reference(batch, margin, mining, distance, soft, reduction):
    embeddings, labels = batch
    embeddings.requires_grad_(True)
    options = {"margin": margin, "mining": mining, "soft": soft, "reduction": reduction}
    loss = triplet_loss(embeddings, labels, distance=distance, **options)
    expected = ref.triplet_loss(embeddings, labels, distance_kind=distance, **options)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        grads(loss, embeddings), grads(expected, embeddings), rtol=1e-7, atol=1e-10
    )


@FAST
@given(batch=batches, distance=st.sampled_from(DISTANCES), reduction=st.sampled_from(REDUCTIONS))
def test_triplet_loss_with_indices_tuple_matches_reference(batch, distance, reduction):
    embeddings, labels = batch
    embeddings.requires_grad_(True)
    mined = batch_all(pairwise_distance(embeddings.detach()), labels)
    keep = torch.arange(len(mined[0])) % 3 != 1  # an arbitrary subset of valid triplets
    indices = tuple(index[keep] for index in mined)
    triplets = list(zip(*(index.tolist() for index in indices)))
    loss = triplet_loss(
        embeddings, labels, indices, margin=0.5, distance=distance, reduction=reduction
    )
    expected = ref.triplet_loss(
        embeddings,
        labels,
        margin=0.5,
        mining="batch_all",
        distance_kind=distance,
        soft=False,
        reduction=reduction,
        triplets=triplets,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        grads(loss, embeddings), grads(expected, embeddings), rtol=1e-7, atol=1e-10
    )


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_loss_gradcheck(mining, distance, soft):
    # well-separated random points: no tie in the mined selection, no triplet at the hinge
    embeddings, _ = make_batch(3, 8, 4, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    embeddings.requires_grad_(True)
    margin = 0.3 if distance == "cosine" else 1.0
    assert torch.autograd.gradcheck(
        lambda e: triplet_loss(
            e, labels, margin=margin, mining=mining, distance=distance, soft=soft
        ),
        (embeddings,),
    )


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_reductions_are_consistent(mining, soft):
    embeddings, labels = make_batch(5, 12, 4, 3)
    options = {"margin": 1.0, "mining": mining, "soft": soft}
    per_triplet = triplet_loss(embeddings, labels, reduction="none", **options)
    total = triplet_loss(embeddings, labels, reduction="sum", **options)
    mean = triplet_loss(embeddings, labels, **options)
    torch.testing.assert_close(total, per_triplet.sum())
    if mining == "batch_all" and not soft:
        assert (per_triplet == 0).any(), "the batch should contain easy triplets"
        torch.testing.assert_close(mean, per_triplet[per_triplet > 0].mean())
    else:
        torch.testing.assert_close(mean, per_triplet.mean())


@pytest.mark.parametrize("mining", MININGS)
def test_none_reduction_follows_the_miner_order(mining):
    embeddings, labels = make_batch(6, 10, 3, 3)
    dist = pairwise_distance(embeddings)
    mined = {
        "batch_hard": batch_hard(dist, labels),
        "batch_all": batch_all(dist, labels),
        "semi_hard": semi_hard(dist, labels, 0.8),
    }[mining]
    anchor, positive, negative = mined
    expected = torch.relu(dist[anchor, positive] - dist[anchor, negative] + 0.8)
    per_triplet = triplet_loss(embeddings, labels, margin=0.8, mining=mining, reduction="none")
    torch.testing.assert_close(per_triplet, expected)
    torch.testing.assert_close(
        triplet_loss(embeddings, labels, mined, margin=0.8, reduction="none"), expected
    )


def test_mined_indices_give_the_same_mean_except_batch_all():
    embeddings, labels = make_batch(7, 12, 4, 3)
    dist = pairwise_distance(embeddings)
    for mining, mined in [
        ("batch_hard", batch_hard(dist, labels)),
        ("semi_hard", semi_hard(dist, labels, 1.0)),
    ]:
        torch.testing.assert_close(
            triplet_loss(embeddings, labels, mined, margin=1.0),
            triplet_loss(embeddings, labels, margin=1.0, mining=mining),
        )
    # given indices average over every given triplet; mining="batch_all" over positive ones
    mined = batch_all(dist, labels)
    given_mean = triplet_loss(embeddings, labels, mined, margin=1.0)
    mined_mean = triplet_loss(embeddings, labels, margin=1.0, mining="batch_all")
    per_triplet = triplet_loss(embeddings, labels, mined, margin=1.0, reduction="none")
    torch.testing.assert_close(given_mean, per_triplet.mean())
    torch.testing.assert_close(mined_mean, per_triplet[per_triplet > 0].mean())


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(
    "labels",
    [[0, 0, 0, 0], [0, 1, 2, 3], [7], []],
    ids=["one-class", "all-distinct", "single", "empty"],
)
def test_no_valid_triplet_gives_zero_with_a_graph(mining, soft, labels):
    embeddings = torch.randn(len(labels), 3, requires_grad=True)
    labels_tensor = torch.tensor(labels, dtype=torch.long)
    for reduction in ("mean", "sum"):
        loss = triplet_loss(
            embeddings, labels_tensor, mining=mining, soft=soft, reduction=reduction
        )
        assert loss.shape == () and loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, embeddings)
        assert torch.equal(grad, torch.zeros_like(embeddings))
    assert triplet_loss(
        embeddings, labels_tensor, mining=mining, soft=soft, reduction="none"
    ).shape == (0,)
    empty = torch.zeros(0, dtype=torch.long)
    loss = triplet_loss(embeddings, labels_tensor, (empty, empty, empty))
    assert loss.item() == 0.0 and loss.requires_grad


def test_batch_all_with_only_easy_triplets_is_zero_not_nan():
    embeddings = torch.tensor([[0.0], [0.1], [10.0], [10.1]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = triplet_loss(embeddings, labels, mining="batch_all")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_triplet_loss_collapsed_batch_has_finite_gradient():
    # all embeddings equal: every distance is 0, the safe sqrt keeps gradients finite
    embeddings = torch.ones(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for mining in MININGS:
        loss = triplet_loss(embeddings, labels, margin=0.3, mining=mining)
        assert loss.item() == pytest.approx(0.3)
        (grad,) = torch.autograd.grad(loss, embeddings)
        assert torch.isfinite(grad).all()


def test_triplet_module_matches_functional_and_repr():
    embeddings, labels = make_batch(8, 10, 4, 3)
    for mining in MININGS:
        module = TripletLoss(margin=0.7, mining=mining, distance="squared_euclidean", soft=False)
        torch.testing.assert_close(
            module(embeddings, labels),
            triplet_loss(
                embeddings, labels, margin=0.7, mining=mining, distance="squared_euclidean"
            ),
        )
    assert repr(TripletLoss()) == (
        "TripletLoss(margin=0.3, mining='batch_hard', distance='euclidean', soft=False, reduction='mean')"
    )
    assert list(TripletLoss().state_dict()) == []


def test_module_and_functional_signatures_agree():
    functional = inspect.signature(triplet_loss).parameters
    forward = inspect.signature(TripletLoss.forward).parameters
    init = inspect.signature(TripletLoss.__init__).parameters
    module_params = [p for name, p in forward.items() if name != "self"]
    module_params += [p for name, p in init.items() if name != "self"]
    assert [(p.name, p.default) for p in module_params] == [
        (p.name, p.default) for p in functional.values()
    ]
    center_functional = inspect.signature(center_loss).parameters
    center_forward = [n for n in inspect.signature(CenterLoss.forward).parameters if n != "self"]
    assert list(center_functional)[: len(center_forward)] == center_forward
    center_init = inspect.signature(CenterLoss.__init__).parameters
    assert center_functional["reduction"].default == center_init["reduction"].default


def test_triplet_loss_under_autocast_computes_in_float32():
    embeddings, labels = make_batch(9, 10, 8, 3)
    low = embeddings.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = TripletLoss(mining="batch_all")(low, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, triplet_loss(low.float(), labels, mining="batch_all"))
    loss.backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("mining", MININGS)
def test_triplet_loss_does_not_modify_inputs(mining):
    embeddings, labels = make_batch(10, 9, 3, 3)
    mined = batch_hard(pairwise_distance(embeddings), labels)
    snapshot = [embeddings.clone(), labels.clone(), *(index.clone() for index in mined)]
    triplet_loss(embeddings, labels, mining=mining)
    triplet_loss(embeddings, labels, mined)
    after = [embeddings, labels, *mined]
    assert all(torch.equal(x, y) for x, y in zip(snapshot, after))


def test_triplet_hyperparameter_errors():
    with pytest.raises(ValueError, match=r"margin must be in \[0, inf\], got -0.1"):
        TripletLoss(margin=-0.1)
    with pytest.raises(
        ValueError, match=r"margin \(with mining='semi_hard'\) must be in \(0, inf\], got 0.0"
    ):
        TripletLoss(margin=0.0, mining="semi_hard")
    with pytest.raises(TypeError, match=r"margin must be a real number, got NoneType"):
        TripletLoss(margin=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"margin must be in \[0, inf\], got nan"):
        TripletLoss(margin=float("nan"))
    with pytest.raises(
        ValueError,
        match=r"mining must be one of \('batch_hard', 'batch_all', 'semi_hard'\), got 'hard'",
    ):
        TripletLoss(mining="hard")
    with pytest.raises(ValueError, match=r"distance must be one of .*got 'l2'"):
        TripletLoss(distance="l2")
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'avg'"):
        TripletLoss(reduction="avg")
    with pytest.raises(TypeError, match=r"soft must be a bool, got int 1"):
        TripletLoss(soft=1)  # type: ignore[arg-type]
    embeddings, labels = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"mining must be one of"):
        triplet_loss(embeddings, labels, mining="all")
    TripletLoss(margin=0.0)  # a zero margin is fine without semi-hard mining


def test_triplet_input_errors():
    embeddings, labels = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
    index = torch.tensor([0, 1])
    with pytest.raises(
        ValueError, match=r"embeddings must have shape \[batch, embedding_dim\], got shape \(4,\)"
    ):
        triplet_loss(torch.randn(4), labels)
    with pytest.raises(
        ValueError,
        match=r"labels must have shape \[4\] to match embeddings' batch size, got shape \(3,\)",
    ):
        triplet_loss(embeddings, labels[:3])
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        triplet_loss(embeddings, labels.float())
    with pytest.raises(ValueError, match=r"embeddings must be finite"):
        triplet_loss(torch.tensor([[float("nan"), 0.0]] * 4), labels)
    with pytest.raises(TypeError, match=r"indices_tuple must be a tuple .* got Tensor"):
        triplet_loss(embeddings, labels, index)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"indices_tuple must hold 3 index tensors .* got 4"):
        triplet_loss(embeddings, labels, (index, index, index, index))
    with pytest.raises(
        TypeError, match=r"indices_tuple \(positive\) must be a torch.Tensor, got list"
    ):
        triplet_loss(embeddings, labels, (index, [0, 1], index))  # type: ignore[list-item]
    with pytest.raises(
        TypeError,
        match=r"indices_tuple \(negative\) must be an integer tensor, got dtype torch.float32",
    ):
        triplet_loss(embeddings, labels, (index, index, index.float()))
    with pytest.raises(
        ValueError,
        match=r"indices_tuple \(negative\) must be 1-D with the anchor's length \(2,\), got shape \(3,\)",
    ):
        triplet_loss(embeddings, labels, (index, index, torch.tensor([0, 1, 2])))
    with pytest.raises(
        ValueError,
        match=r"indices_tuple \(anchor\) must be in \[0, 4\) \(the batch size\), got 1 value\(s\) outside, e.g. \[4\]",
    ):
        triplet_loss(embeddings, labels, (torch.tensor([0, 4]), index, index))
    with pytest.raises(ValueError, match=r"indices_tuple \(positive\) must be in \[0, 4\)"):
        TripletLoss()(embeddings, labels, [index, torch.tensor([-1, 0]), index])


# ---------------------------------------------------------------- pytorch-metric-learning oracle

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")


def pml_distance(distance: str):  # type: ignore[no-untyped-def]
    if distance == "cosine":
        return pml_distances.CosineSimilarity()  # similarity: PML flips the margin sign itself
    power = 2 if distance == "squared_euclidean" else 1
    return pml_distances.LpDistance(normalize_embeddings=False, power=power)


def assert_loss_and_grad_match(ours_fn, theirs_fn, embeddings):  # type: ignore[no-untyped-def]
    ours_input = embeddings.clone().requires_grad_(True)
    theirs_input = embeddings.clone().requires_grad_(True)
    ours, theirs = ours_fn(ours_input), theirs_fn(theirs_input)
    assert ours.item() > 0, "the test batch should have a positive loss"
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-7, atol=1e-9)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_input.grad, theirs_input.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", range(3))
def test_batch_hard_loss_matches_pml(distance, seed):
    embeddings, labels = make_batch(seed, 16, 5, 5)
    margin = 0.1 if distance == "cosine" else 0.5
    # Hermans et al. average over anchors: PML's MeanReducer, not its AvgNonZeroReducer default
    loss = pml_losses.TripletMarginLoss(
        margin=margin, distance=pml_distance(distance), reducer=pml_reducers.MeanReducer()
    )
    miner = pml_miners.BatchHardMiner(distance=pml_distance(distance))
    assert_loss_and_grad_match(
        lambda e: triplet_loss(e, labels, margin=margin, distance=distance),
        lambda e: loss(e, labels, miner(e, labels)),
        embeddings,
    )


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_batch_all_loss_matches_pml(distance, soft, seed):
    embeddings, labels = make_batch(seed, 14, 5, 4)
    margin = 0.1 if distance == "cosine" else 0.5
    # PML's default reducer (AvgNonZeroReducer) averages over positive-loss triplets, as we
    # do for batch_all; its smooth loss is softplus(d_ap - d_an + margin), so margin=0
    loss = pml_losses.TripletMarginLoss(
        margin=0.0 if soft else margin, smooth_loss=soft, distance=pml_distance(distance)
    )
    assert_loss_and_grad_match(
        lambda e: triplet_loss(
            e, labels, margin=margin, mining="batch_all", distance=distance, soft=soft
        ),
        lambda e: loss(e, labels),
        embeddings,
    )


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", range(3))
def test_indices_tuple_loss_matches_pml(distance, seed):
    embeddings, labels = make_batch(seed, 14, 5, 4)
    margin = 0.2 if distance == "cosine" else 1.0
    mined = semi_hard(pairwise_distance(embeddings, distance), labels, margin)
    loss = pml_losses.TripletMarginLoss(
        margin=margin, distance=pml_distance(distance), reducer=pml_reducers.MeanReducer()
    )
    assert_loss_and_grad_match(
        lambda e: triplet_loss(e, labels, mined, margin=margin, distance=distance),
        lambda e: loss(e, labels, mined),
        embeddings,
    )


@pytest.mark.slow
def test_losses_trace_without_graph_breaks():
    # the mined mean/sum paths use fixed shapes and masks: no data-dependent shape, no sync
    embeddings, labels = make_batch(11, 12, 4, 3)
    embeddings.requires_grad_(True)
    for mining in MININGS:
        compiled = torch.compile(
            lambda e, y, m=mining: triplet_loss(e, y, mining=m), backend="eager", fullgraph=True
        )
        torch.testing.assert_close(
            compiled(embeddings, labels), triplet_loss(embeddings, labels, mining=mining)
        )
    module = CenterLoss(4, 3, alpha=0.5, dtype=torch.float64)
    reference = CenterLoss(4, 3, alpha=0.5, dtype=torch.float64)
    reference.load_state_dict(module.state_dict())
    compiled_module = torch.compile(module, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled_module(embeddings, labels), reference(embeddings, labels))
    torch.testing.assert_close(module.centers, reference.centers)


# ---------------------------------------------------------------- issue 12: no silent wrong answers


@pytest.mark.parametrize("alpha", [None, 0.5])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_center_loss_non_finite_centers_raise_naming_the_rows(alpha, bad):
    criterion = CenterLoss(4, 5, alpha=alpha)
    with torch.no_grad():
        criterion.centers[1, 2] = bad
        criterion.centers[3] = bad
    embeddings, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    message = r"centers must be finite, got 2 of 5 row\(s\) with NaN/inf values \(e.g. classes \[1, 3\]\)"
    with pytest.raises(ValueError, match=message):
        criterion(embeddings, labels)
    with pytest.raises(ValueError, match=message):
        center_loss(embeddings, labels, criterion.centers.detach())
    # switched off, the check (and its device sync) is skipped: the loss is then NaN/inf
    with validation(False):
        assert not torch.isfinite(criterion(embeddings, labels))


@pytest.mark.parametrize("scale", [1e20, 1e-25, 1e30, 1e-30])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_triplet_loss_is_right_at_extreme_norms_in_float32(scale, distance, mining):
    # 0.1 gave loss 0 at norm 1e20 (squares overflow) and at 1e-25 (squares underflow)
    embeddings, labels = make_batch(3, 10, 4, 3)
    margin = 0.1 if distance == "cosine" else 0.3 * scale
    expected = ref.triplet_loss(
        embeddings * scale, labels, margin=margin, mining=mining, distance_kind=distance,
        soft=False, reduction="mean",
    )
    low = (embeddings * scale).float().requires_grad_(True)
    loss = triplet_loss(low, labels, margin=margin, mining=mining, distance=distance)
    assert expected.item() > 0
    assert not torch.isnan(loss)
    if expected.item() > 3e38:  # squared distances of norm-1e20 embeddings: beyond float32
        assert loss.item() == float("inf")
        return
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0.0)
    loss.backward()
    assert torch.isfinite(low.grad).all()


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_pairwise_distance_extreme_norms_in_float32(scale):
    embeddings, _ = make_batch(4, 6, 3, 1)
    for distance in ("euclidean", "cosine"):
        expected = ref.distance_matrix(embeddings * scale, distance)
        got = pairwise_distance((embeddings * scale).float(), distance).double()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 if distance == "cosine" else 0.0)
