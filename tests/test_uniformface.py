"""UniformFace against the float64 per-sample reference: loss, gradients, centre updates, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import marginloss
from marginloss import functional as MF
from marginloss import fused
from tests.reference import assert_close, uniformface_reference

CHUNKS = [None, 1, 7, "auto"]
TOL = {"rtol": 1e-9, "atol": 1e-10}
# lambda fixed (base = min) so every forward uses the same A-Softmax target.
FIXED = {"margin": 4, "lambda_base": 2.0, "lambda_min": 2.0}


def problem(batch: int = 10, classes: int = 9, dim: int = 5, seed: int = 0, ignored: bool = False):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    x = 2.0 * weight[labels] + torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    if ignored:
        labels[::4] = -100
    return x, weight, labels


def make_head(weight: torch.Tensor, **kwargs) -> marginloss.UniformFace:
    options = {**FIXED, **kwargs}
    head = marginloss.UniformFace(weight.shape[1], weight.shape[0], dtype=torch.float64, **options)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def reference(x0, weight, labels, centers, pairs, reduction="mean", uniform_weight=0.7, center_lr=0.5):
    x = x0.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    rows, uniform, new = uniformface_reference(
        x, w, labels, centers, margin=4, lambda_=2.0, uniform_weight=uniform_weight, center_lr=center_lr, pairs=pairs,
    )
    valid = labels != -100
    kept = max(int(valid.sum()), 1)
    if reduction == "mean":
        loss = rows.sum() / kept + uniform
    elif reduction == "sum":
        loss = rows.sum() + uniform
    else:
        loss = torch.where(valid, rows + uniform / kept, torch.zeros_like(rows))
    backprop(loss)
    return loss.detach(), x.grad, w.grad, new.detach()


def backprop(loss: torch.Tensor) -> None:
    if loss.dim():
        loss = (loss * torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)).sum()
    loss.backward()


@pytest.mark.parametrize("pairs", ["all", "batch"])
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("cache", [0, None])
def test_matches_reference(pairs: str, chunk_size, cache) -> None:
    x0, weight, labels = problem(ignored=True)
    previous = fused.set_backward_cache_bytes(cache) if cache is not None else None
    try:
        for reduction in ("mean", "sum", "none"):
            head = make_head(weight, uniform_weight=0.7, uniform_pairs=pairs, chunk_size=chunk_size, reduction=reduction)
            centers = head.centers.clone()
            x = x0.clone().requires_grad_(True)
            loss = head(x, labels)
            backprop(loss)
            ref_loss, gx, gw, new = reference(x0, weight, labels, centers, pairs, reduction)
            assert_close(loss, ref_loss, **TOL, what=f"loss {reduction}")
            assert_close(x.grad, gx, **TOL, what="embedding grad")
            assert_close(head.weight.grad, gw, **TOL, what="weight grad")
            assert_close(head.centers, new, **TOL, what="updated centres")
    finally:
        if previous is not None:
            fused.set_backward_cache_bytes(previous)


def test_centres_after_several_steps_and_eval_keeps_them() -> None:
    head = make_head(problem()[1], uniform_pairs="all", center_lr=0.3, chunk_size=4)
    centers = head.centers.clone()
    for step in range(4):
        x, _, labels = problem(seed=10 + step)
        ref_loss, _, _, centers = reference(x, problem()[1], labels, centers, "all", center_lr=0.3, uniform_weight=1.0)
        loss = head(x, labels)
        loss.backward()
        # Steps after the first use the running pair total: the same loss as the full sum.
        assert_close(loss, ref_loss, **TOL, what=f"loss at step {step}")
        assert_close(head.centers, centers, **TOL, what=f"centres after step {step}")
        assert_close(head.uniform_term() * 9 * 8, head._pair_total, **TOL, what="running pair total")
        if step == 1:
            with torch.no_grad():
                head.centers[0] = -head.centers[0]  # changed by hand: the total is recomputed
                centers = head.centers.clone()
    assert int(head.iteration) == 4
    head.eval()
    before = head.centers.clone()
    x, _, labels = problem(seed=20)
    loss = head(x, labels)
    assert torch.equal(head.centers, before) and int(head.iteration) == 4
    # In eval the uniform loss is that of the stored centres (no update, no gradient).
    rows = marginloss.SphereFace(5, 9, **FIXED, dtype=torch.float64)
    rows.load_state_dict({k: v for k, v in head.state_dict().items() if k != "centers"})
    rows.eval()
    assert_close(loss, rows(x, labels) + head.uniform_weight * head.uniform_term(), **TOL, what="eval loss")


def test_uniform_term_all_pairs_equals_the_dense_formula() -> None:
    head = marginloss.UniformFace(3, 11, chunk_size=4, dtype=torch.float64)
    assert_close(head.uniform_term(), MF.uniform_loss(head.centers), **TOL, what="chunked vs dense")


@pytest.mark.parametrize("tile", [None, 1, 3, 4, 11, 20])
def test_blocked_pair_total_equals_the_dense_sum(tile) -> None:
    """The symmetric square blocks (on and above the diagonal, off-diagonal ones twice) add up
    to the dense sum over all ordered pairs, whether the tile divides C or not."""
    from marginloss.heads import uniformface as module

    unit = torch.nn.functional.normalize(torch.randn(11, 3, dtype=torch.float64), dim=1)
    dense = MF.uniform_loss(unit) * (11 * 10)
    assert_close(module._total_pairs(unit, tile), dense, **TOL, what=f"tile {tile}")


def test_checkpoint_replay_updates_once_and_matches() -> None:
    x0, weight, labels = problem(seed=4)
    plain = make_head(weight, chunk_size=3)
    replayed = make_head(weight, chunk_size=3)
    x1 = x0.clone().requires_grad_(True)
    plain(x1, labels).backward()
    x2 = x0.clone().requires_grad_(True)
    checkpoint(replayed, x2, labels, use_reentrant=False).backward()
    assert_close(x2.grad, x1.grad, **TOL, what="checkpointed grad")
    assert_close(replayed.centers, plain.centers, **TOL, what="centres under checkpointing")
    assert int(replayed.iteration) == 1


@pytest.mark.parametrize("pairs", ["all", "batch"])
def test_gradcheck_functional(pairs: str) -> None:
    x, weight, labels = problem(batch=5, classes=6, dim=3, seed=5)
    labels[0] = -100
    centers = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)

    def f(a, w):
        return MF.uniformface(a, w, labels, centers, lambda_=1.0, uniform_weight=2.0, uniform_pairs=pairs, chunk_size=2)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), weight.requires_grad_(True)))


def test_functional_matches_module() -> None:
    x, weight, labels = problem(seed=6)
    head = make_head(weight, chunk_size=None)
    centers = head.centers.clone()
    expected = head(x, labels)
    got = MF.uniformface(x, weight, labels, centers, margin=4, lambda_=2.0, uniform_weight=1.0)
    assert_close(got, expected, **TOL, what="functional")


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 7),
    classes=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    pairs=st.sampled_from(["all", "batch"]),
    chunk_size=st.sampled_from([None, 1, 3, "auto"]),
    center_lr=st.floats(0.0, 1.0),
    uniform_weight=st.floats(0.0, 3.0),
    ignored=st.booleans(),
)
def test_hypothesis_against_reference(batch, classes, seed, pairs, chunk_size, center_lr, uniform_weight, ignored) -> None:
    x0, weight, labels = problem(batch=batch, classes=classes, dim=3, seed=seed, ignored=ignored)
    head = make_head(weight, uniform_pairs=pairs, chunk_size=chunk_size, center_lr=center_lr, uniform_weight=uniform_weight)
    centers = head.centers.clone()
    x = x0.clone().requires_grad_(True)
    loss = head(x, labels)
    loss.backward()
    ref_loss, gx, gw, new = reference(x0, weight, labels, centers, pairs, uniform_weight=uniform_weight, center_lr=center_lr)
    tol = {"rtol": 1e-7, "atol": 1e-8}
    assert torch.isfinite(loss)
    assert_close(loss, ref_loss, **tol, what="loss")
    assert_close(x.grad, gx if gx is not None else torch.zeros_like(x), **tol, what="embedding grad")
    assert_close(head.weight.grad, gw if gw is not None else torch.zeros_like(weight), **tol, what="weight grad")
    assert_close(head.centers, new, **tol, what="centres")


def test_registry_defaults_state_dict() -> None:
    head = marginloss.create_head("uniformface", 4, 6)
    assert isinstance(head, marginloss.UniformFace) and isinstance(head, marginloss.SphereFace)
    hp = head.hyperparameters()
    assert hp["uniform_weight"] == 1.0 and hp["center_lr"] == 0.5 and hp["uniform_pairs"] == "all"
    assert hp["margin"] == 4 and hp["lambda_base"] == 1000.0
    assert "uniform_pairs='all'" in repr(head)
    head(torch.randn(5, 4), torch.tensor([0, 1, 1, 2, 5]))
    state = head.state_dict()
    assert {"weight", "iteration", "centers"} <= set(state)
    other = marginloss.create_head("uniformface", 4, 6)
    other.load_state_dict(state)
    assert torch.equal(other.centers, head.centers) and int(other.iteration) == 1
    # Every process starts from the same centres (replicated when sharded).
    assert torch.equal(marginloss.UniformFace(4, 6).centers, marginloss.UniformFace(4, 6).centers)


def test_autocast_bf16_finite() -> None:
    head = marginloss.UniformFace(8, 20, chunk_size=6)
    x = torch.randn(6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, torch.randint(0, 20, (6,)))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.centers).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"uniform_weight": -1.0}, "uniform_weight must be in"),
        ({"center_lr": 1.5}, "center_lr must be in"),
        ({"uniform_pairs": "some"}, "uniform_pairs must be one of"),
        ({"margin": 0}, "margin must be a positive int"),
        ({"lambda_min": -1.0}, "lambda_min must be in"),
    ],
)
def test_bad_hyperparameters(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        marginloss.UniformFace(4, 3, **kwargs)


def test_bad_inputs() -> None:
    head = marginloss.UniformFace(4, 3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"embeddings must have shape \[batch, 4\]"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="centers must be a tensor of the weight's shape"):
        MF.uniformface(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), torch.randn(2, 4))
