"""The plain PyTorch formulas (tests/reference.py, the benchmark baselines) equal the heads.

Every registered head at its defaults, float64, B=37, D=16, C=13: one training step of the
plain formula and of the head from the same state give the same loss (1e-9 relative), the
same embedding and weight (and bias) gradients (1e-7 relative to the largest entry) and the
same state afterwards; also with ignored rows, and at non-default hyperparameters.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import marginloss
from tests.reference import (
    PLAIN_FORMULAS,
    PLAIN_HEAD_CLASSES,
    assert_close,
    elasticface_draws,
    plain_head_loss,
)

B, D, C = 37, 16, 13
IGNORE = -100


def _inputs(seed: int, ignored: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(B, D, generator=generator, dtype=torch.float64)
    # Row norms from 3 to 120 (log-uniform): both sides of MagFace's [l_a, u_a] = [10, 110]
    # and a spread for AdaFace's norm statistics and the unnormalised SphereFace / L-Softmax.
    log_norms = torch.empty(B, 1, dtype=torch.float64).uniform_(math.log(3.0), math.log(120.0), generator=generator)
    norms = log_norms.exp()
    x = torch.nn.functional.normalize(directions) * norms
    labels = torch.randint(0, C, (B,), generator=generator)
    if ignored:
        labels[torch.tensor([0, 5, 17, 36])] = IGNORE
    return x, labels


def _head(name: str, **kwargs: object) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return marginloss.create_head(name, D, C, **kwargs).double()


def _check_one_step(name: str, head: torch.nn.Module, ignored: bool) -> None:
    """One training step of the head and of its plain formula from the same state agree."""
    plain = copy.deepcopy(head)
    x, labels = _inputs(seed=sum(map(ord, name)), ignored=ignored)
    x_head = x.clone().requires_grad_(True)
    x_plain = x.clone().requires_grad_(True)

    expected = head(x_head, labels)
    actual = plain_head_loss(plain, x_plain, labels)
    assert_close(actual, expected, rtol=1e-9, atol=0.0, what=f"{name} loss")

    params = [n for n, _ in head.named_parameters()]
    grads_head = torch.autograd.grad(expected.sum(), [x_head, *head.parameters()])
    grads_plain = torch.autograd.grad(actual.sum(), [x_plain, *plain.parameters()])
    for what, g_plain, g_head in zip(["embeddings", *params], grads_plain, grads_head):
        largest = float(g_head.abs().max())
        assert_close(g_plain, g_head, rtol=1e-7, atol=1e-7 * largest, what=f"{name} d/d{what}")

    # The state the step leaves (iteration, EMA, scale, step, centres, counts) agrees too.
    for (key, after_head), after_plain in zip(head.state_dict().items(), plain.state_dict().values()):
        if after_head.is_floating_point():
            assert_close(after_plain, after_head, rtol=1e-9, atol=1e-12, what=f"{name} state {key}")
        else:
            assert torch.equal(after_plain, after_head), f"{name} state {key}: {after_plain} != {after_head}"


def _builtin_heads() -> list[str]:
    # Other tests (and the docs' doctests) register their own heads in the same process.
    def exported(name: str) -> bool:
        cls = type(marginloss.create_head(name, D, C))
        return getattr(marginloss, cls.__name__, None) is cls

    return [n for n in marginloss.list_heads() if exported(n)]


def test_every_registered_head_is_covered() -> None:
    assert sorted(PLAIN_FORMULAS) == _builtin_heads()
    for name in _builtin_heads():
        assert PLAIN_HEAD_CLASSES[type(marginloss.create_head(name, D, C)).__name__] == name


@pytest.mark.parametrize("ignored", [False, True], ids=["all-rows", "ignored-rows"])
@pytest.mark.parametrize("name", marginloss.list_heads())
def test_plain_formula_equals_head(name: str, ignored: bool) -> None:
    _check_one_step(name, _head(name), ignored)


VARIANTS = [
    ("arcface", {"easy_margin": True}),
    ("arcface", {"straight_through": True}),
    ("combined_margin", {"m1": 1.0, "m2": 0.3, "m3": 0.2}),
    ("cosface", {"label_smoothing": 0.1}),
    ("curricularface", {"reduction": "sum", "label_smoothing": 0.2}),
    ("magface", {"easy_margin": False}),
    ("magface", {"reduction": "none"}),
    ("elasticface", {"kind": "cos"}),
    ("elasticface", {"plus": True}),
    ("adacos", {"dynamic": False}),
    ("sphereface", {"margin": 3}),
    ("lsoftmax", {"margin": 2}),
    ("uniformface", {"uniform_pairs": "batch"}),
    ("uniformface", {"reduction": "none"}),
    ("subcenter_arcface", {"num_subcenters": 2}),
    ("uniface", {"negative_weight": 0.5, "reduction": "sum"}),
    ("sphereface2", {"variant": "A"}),
    ("sphereface2", {"straight_through": False}),
]


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in VARIANTS])
def test_plain_formula_follows_hyperparameters(name: str, kwargs: dict) -> None:
    _check_one_step(name, _head(name, **kwargs), ignored=True)


def test_elasticface_margins_are_the_heads_draws() -> None:
    head = _head("elasticface")
    x, labels = _inputs(seed=1, ignored=False)
    draws = elasticface_draws(head, B)
    assert head.margins(torch.zeros(B), torch.ones(B, dtype=torch.bool), step=0).equal(draws)
    # Explicit draws give the same loss as the implicit ones; other draws another loss.
    implicit = plain_head_loss(copy.deepcopy(head), x, labels)
    explicit = plain_head_loss(copy.deepcopy(head), x, labels, margins=draws)
    other = plain_head_loss(copy.deepcopy(head), x, labels, margins=draws + 0.1)
    assert_close(explicit, implicit, rtol=0.0, atol=0.0, what="explicit draws")
    assert not torch.allclose(other, implicit)


def test_second_step_follows_the_state() -> None:
    # Two steps in a row: the plain formula reads the state the first step left.
    for name in ("adacos", "adaface", "curricularface", "elasticface", "sphereface", "uniformface"):
        head = _head(name)
        plain = copy.deepcopy(head)
        for seed in (3, 4):
            x, labels = _inputs(seed=seed, ignored=False)
            assert_close(plain_head_loss(plain, x, labels), head(x, labels), rtol=1e-9, atol=0.0,
                         what=f"{name} step {seed - 2}")
