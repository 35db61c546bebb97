"""No silent wrong answers: extreme norms, zero embeddings, non-finite weights, unchecked labels,
and "cosines" that are not cosines, on every head and every single-process path."""

from __future__ import annotations

import pytest
import torch

import marginloss
from marginloss import functional as MF
from tests.reference import assert_close, head_loss

HEADS = {
    "arcface": (MF.arcface, {"scale": 16.0, "margin": 0.4}),
    "cosface": (MF.cosface, {"scale": 16.0, "margin": 0.3}),
    "combined": (MF.combined_margin, {"scale": 16.0, "m1": 1.0, "m2": 0.3, "m3": 0.2}),
    "normface": (MF.normface, {"scale": 16.0}),
    "sphereface": (MF.sphereface, {"margin": 4, "lambda_": 5.0}),
    "lsoftmax": (MF.lsoftmax, {"margin": 2, "lambda_": 1.0}),
}
NORMALISED = ("arcface", "cosface", "combined", "normface")
CHUNKS = [None, 5, "auto"]


def _problem(seed: int = 0, batch: int = 6, classes: int = 11, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    x = torch.randn(batch, dim, generator=gen) + 0.5 * w[y]
    return x, w, y


@pytest.mark.parametrize("head", NORMALISED)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("norm", [1e-30, 1e-25, 1e-12, 1e19, 1e20, 1e30])
def test_normalised_heads_are_scale_invariant_over_float32(head, chunk, norm) -> None:
    """0.1: NormFace at ‖x‖ = 1e20 gave 3.91 where 12.72 is right (float32 norms overflowed)."""
    fn, hp = HEADS[head]
    x, w, y = _problem()
    unit = x / x.norm(dim=1, keepdim=True)
    expected = head_loss(head, unit.double(), w.double(), y, hp)
    scaled = (unit.double() * norm).float()
    assert bool(torch.isfinite(scaled).all())
    got = fn(scaled, w, y, **hp, chunk_size=chunk)
    assert_close(got.double(), expected, rtol=1e-5, atol=1e-5, what=f"loss at norm {norm:g}")


@pytest.mark.parametrize("head", ["sphereface", "lsoftmax"])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("norm", [1e-20, 1e-13])
def test_unnormalised_heads_at_tiny_norms_match_float64(head, chunk, norm) -> None:
    """0.1 clamped ‖x‖ at 1e-12 inside cos θ: wrong SphereFace/L-Softmax gradients below it."""
    fn, hp = HEADS[head]
    x, w, y = _problem(seed=1)
    x = (x / x.norm(dim=1, keepdim=True) * norm).double().requires_grad_()
    w = w.double().requires_grad_()
    got = fn(x, w, y, **hp, chunk_size=chunk)
    got.backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = head_loss(head, xr, wr, y, hp)
    expected.backward()
    assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-9 * float(xr.grad.abs().max()))
    assert_close(w.grad, wr.grad, rtol=1e-6, atol=1e-9 * float(wr.grad.abs().max()))


@pytest.mark.parametrize("head", sorted(HEADS))
def test_zero_embedding_gets_a_bounded_gradient_the_same_on_every_path(head) -> None:
    """0.1 gave an all-zero embedding a ~1e13 gradient (a 1/eps artefact).

    A zero embedding has cosine 0 with every class.  Normalised heads give it an exactly zero
    gradient; SphereFace and L-Softmax, whose non-target logits are linear in x, give it the
    gradient of those linear logits (the target's angular term contributes nothing).
    """
    fn, hp = HEADS[head]
    x, w, y = _problem(seed=2)
    x[2] = 0.0
    results = []
    for chunk in CHUNKS:
        xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xc, wc, y, **hp, reduction="none", chunk_size=chunk)
        loss.sum().backward()
        assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(wc.grad).all())
        assert float(xc.grad[2].abs().max()) <= 10 * float(w.norm(dim=1).max())
        if head in NORMALISED:
            assert torch.equal(xc.grad[2], torch.zeros_like(xc.grad[2]))
        results.append((loss.detach(), xc.grad, wc.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_non_finite_weight_rows_are_named(chunk) -> None:
    x, w, y = _problem(seed=3)
    w[4, 1] = float("nan")
    w[7] = float("inf")
    with pytest.raises(ValueError, match=r"weight must be finite, got 2 of 11 row\(s\) with a NaN/inf entry"):
        MF.arcface(x, w, y, chunk_size=chunk)
    head = marginloss.ArcFace(8, 11, chunk_size=chunk)
    with torch.no_grad():
        head.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"weight must be finite, got 1 of 11 row"):
        head(x, y)
    overflow = torch.full((11, 8), 1e30)
    with pytest.raises(ValueError, match="norm that overflows"):
        MF.cosface(x, overflow, y, chunk_size=chunk)
    with marginloss.validation(False):
        assert not torch.isfinite(MF.arcface(x, w, y, chunk_size=chunk))  # unchecked: NaN, loudly


@pytest.mark.parametrize("chunk", CHUNKS)
def test_labels_are_checked_on_the_cpu_even_without_validation(chunk) -> None:
    """0.1 scored label -1 as class C-1 on the chunked engine with validation off."""
    x, w, _ = _problem(seed=4)
    bad = torch.tensor([0, 1, -1, 3, 4, 5])
    with marginloss.validation(False):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 11\).*\[-1\]"):
            MF.arcface(x, w, bad, chunk_size=chunk)
        with pytest.raises(ValueError, match=r"labels must be in \[0, 11\).*\[11\]"):
            marginloss.CosFace(8, 11, chunk_size=chunk)(x, torch.tensor([0, 1, 11, 3, 4, 5]))


def test_unchecked_bad_labels_give_nan_rows_never_another_class() -> None:
    """Where no check can run (a compiled graph), a label outside [0, C) makes its row NaN."""
    x, w, _ = _problem(seed=5)
    bad = torch.tensor([0, 1, -1, 3, 4, 11])
    compiled = torch.compile(
        lambda a, b, c: MF.cosface(a, b, c, reduction="none", chunk_size=4), backend="aot_eager", fullgraph=True
    )
    with marginloss.validation(False):
        rows = compiled(x, w, bad)
    assert torch.isnan(rows[2]) and torch.isnan(rows[5])
    good = MF.cosface(x, w, bad.clamp(0, 10), reduction="none", chunk_size=4)
    assert_close(rows[[0, 1, 3, 4]], good[[0, 1, 3, 4]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("fn", "extra"),
    [
        (MF.arcface_logits, ()),
        (MF.cosface_logits, ()),
        (MF.combined_margin_logits, ()),
        (MF.sphereface_logits, (torch.ones(3),)),
        (MF.lsoftmax_logits, (torch.ones(3), torch.ones(4))),
    ],
)
def test_logits_functions_reject_values_that_are_not_cosines(fn, extra) -> None:
    """0.1 clamped "cosines" outside [-1, 1] silently (logits passed by mistake)."""
    labels = torch.tensor([0, 1, 3])
    logits = torch.tensor([[12.0, -3.0, 0.5, 1.0], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.9]])
    with pytest.raises(ValueError, match=r"cosine must hold cosines in \[-1, 1\], got values up to 12"):
        fn(logits, labels, *extra)
    rounding = logits.clamp(-1, 1) * (1 + 1e-6)
    assert torch.isfinite(fn(rounding, labels, *extra)).all()
    with marginloss.validation(False):
        fn(logits, labels, *extra)  # the value check follows the switch


# ---------------------------------------------------------------- every registered head

# Heads whose loss depends on the embedding norm by design (the margin follows ‖x‖).
NORM_DEPENDENT = {"sphereface", "lsoftmax", "uniformface", "adaface", "magface"}


def _registered(name: str, **kwargs):
    head = marginloss.create_head(name, 8, 11, dtype=torch.float64, **kwargs)
    head.eval()  # no state advances between the calls compared
    return head


@pytest.mark.parametrize("name", marginloss.list_heads())
@pytest.mark.parametrize("chunk", [None, 4, "auto"])
def test_every_head_names_non_finite_weight_rows(name, chunk) -> None:
    head = _registered(name, chunk_size=chunk)
    x, _, y = _problem(seed=7)
    with torch.no_grad():
        head.weight[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"weight must be finite, got 1 of \d+ row"):
        head(x.double(), y)


@pytest.mark.parametrize("name", marginloss.list_heads())
@pytest.mark.parametrize("chunk", [None, 4, "auto"])
def test_every_head_gives_a_zero_embedding_a_finite_bounded_gradient(name, chunk) -> None:
    head = _registered(name, chunk_size=chunk)
    x, _, y = _problem(seed=8)
    x = x.double()
    x[1] = 0.0
    x.requires_grad_()
    loss = head(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(head.weight.grad).all())
    assert float(x.grad[1].abs().max()) <= 100.0


@pytest.mark.parametrize("name", sorted(set(marginloss.list_heads()) - NORM_DEPENDENT))
@pytest.mark.parametrize("chunk", [None, 4, "auto"])
@pytest.mark.parametrize("norm", [1e-25, 1e20])
def test_every_norm_free_head_is_scale_invariant_in_float32(name, chunk, norm) -> None:
    head = marginloss.create_head(name, 8, 11, chunk_size=chunk)
    head.eval()
    x, _, y = _problem(seed=9)
    unit = x / x.norm(dim=1, keepdim=True)
    expected = head(unit, y)
    got = head((unit.double() * norm).float(), y)
    assert_close(got, expected, rtol=1e-4, atol=1e-4, what=f"{name} at norm {norm:g}")
