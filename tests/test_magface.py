"""MagFace against the float64 per-sample reference: loss and gradients through the magnitude."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import marginloss
from marginloss import functional as MF
from marginloss import fused
from tests.reference import assert_close, magface_loss_reference

CHUNKS = [None, 1, 7, "auto"]
HP = {"scale": 16.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0}


def _problem(batch=9, classes=13, dim=5, seed=0, low=3.0, high=130.0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) + 0.8 * w[y]
    norms = low + (high - low) * torch.rand(batch, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * norms[:, None]  # some below l_a, some above u_a
    return x, w, y


def _reference(x, w, y, **kwargs):
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    return magface_loss_reference(xr, wr, y, **{**HP, **kwargs}), xr, wr


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kept", [0, None])
@pytest.mark.parametrize("easy_margin", [True, False])
def test_matches_reference_on_every_path(chunk, kept, easy_margin) -> None:
    x, w, y = _problem(seed=1 if easy_margin else 2)
    x[1] = -x[1]  # a target cosine below 0: the easy margin's (and the fallback's) branch
    y[2] = -100
    head = marginloss.MagFace(5, 13, chunk_size=chunk, easy_margin=easy_margin, dtype=torch.float64, **HP)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    previous = fused.set_backward_cache_bytes(kept) if kept is not None else None
    try:
        loss = head(x, y)
        loss.backward()
    finally:
        if previous is not None:
            fused.set_backward_cache_bytes(previous)
    ref, xr, wr = _reference(x, w, y, easy_margin=easy_margin)
    ref.backward()
    assert_close(loss, ref, rtol=1e-11, atol=1e-12, what="loss")
    assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-11, what="embeddings.grad")
    assert_close(head.weight.grad, wr.grad, rtol=1e-9, atol=1e-11, what="weight.grad")
    # The magnitude's own gradient: the radial part of dL/dx, from the margin and g.
    radial = (x.grad * x.detach()).sum(dim=1) / x.detach().norm(dim=1)
    radial_ref = (xr.grad * xr.detach()).sum(dim=1) / xr.detach().norm(dim=1)
    assert_close(radial, radial_ref, rtol=1e-9, atol=1e-11, what="d loss / d |x|")
    inside = (x.detach().norm(dim=1) > 10.0) & (x.detach().norm(dim=1) < 110.0) & (y != -100)
    assert bool((radial[inside].abs() > 1e-6).all()) and bool((radial[~inside].abs() < 1e-15).all())


def test_regulariser_and_margin_gradients_in_closed_form() -> None:
    """One sample, one class: d/da of lambda_g g(a) + CE is known in closed form."""
    a = torch.tensor(40.0, dtype=torch.float64, requires_grad=True)
    g = MF.magface_regularizer(a, 10.0, 110.0)
    (slope,) = torch.autograd.grad(g, a)
    assert_close(slope, torch.tensor(-1 / 40.0**2 + 1 / 110.0**2, dtype=torch.float64), rtol=1e-14, atol=0)
    margin = MF.magface_margin(a, 10.0, 110.0, 0.45, 0.8)
    (dm,) = torch.autograd.grad(margin, a)
    assert_close(dm, torch.tensor(0.35 / 100.0, dtype=torch.float64), rtol=1e-14, atol=0)
    for outside in (5.0, 200.0):
        b = torch.tensor(outside, dtype=torch.float64, requires_grad=True)
        (zero,) = torch.autograd.grad(MF.magface_regularizer(b) + MF.magface_margin(b), b)
        assert float(zero) == 0.0


def test_reduction_none_label_smoothing_and_logits() -> None:
    x, w, y = _problem(seed=3, low=12.0, high=100.0)
    head = marginloss.MagFace(5, 13, reduction="none", label_smoothing=0.1, dtype=torch.float64, **HP)
    with torch.no_grad():
        head.weight.copy_(w)
    rows = head(x, y)
    ref, _, _ = _reference(x, w, y, reduction="none", label_smoothing=0.1)
    assert rows.shape == (9,)
    assert_close(rows, ref, rtol=1e-11, atol=1e-12)
    logits = head.logits(x, y)  # margin logits: the cross entropy without the regulariser
    ce = MF.margin_cross_entropy(logits, y, reduction="none", label_smoothing=0.1)
    g = 35.0 * MF.magface_regularizer(x.norm(dim=1))
    assert_close(ce + g, rows, rtol=1e-11, atol=1e-12)
    assert_close(MF.magface_logits(head.cosine(x), y, x.norm(dim=1), **{k: v for k, v in HP.items() if k != "lambda_g"}),
                 logits, rtol=1e-12, atol=1e-12)
    assert_close(head.logits(x), 16.0 * head.cosine(x), rtol=1e-12, atol=1e-12)
    assert_close(head.quality(x), x.norm(dim=1), rtol=1e-15, atol=0)


def test_functional_matches_module() -> None:
    x, w, y = _problem(seed=4)
    head = marginloss.MagFace(5, 13, chunk_size=3, dtype=torch.float64, **HP)
    with torch.no_grad():
        head.weight.copy_(w)
    assert_close(MF.magface(x, w, y, chunk_size=3, **HP), head(x, y), rtol=1e-13, atol=1e-13)


def test_gradcheck() -> None:
    x, w, y = _problem(batch=4, classes=5, dim=3, seed=5, low=15.0, high=100.0)
    x, w = x.requires_grad_(), w.requires_grad_()
    for chunk in (None, 2):
        for easy in (True, False):
            def loss_fn(a, b, chunk=chunk, easy=easy):
                return MF.magface(a, b, y, scale=4.0, lambda_g=3.0, easy_margin=easy, chunk_size=chunk)
            assert torch.autograd.gradcheck(loss_fn, (x, w))


@st.composite
def problems(draw: st.DrawFn) -> tuple:
    batch, classes, dim = draw(st.integers(1, 7)), draw(st.integers(1, 9)), draw(st.integers(2, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) + draw(st.sampled_from([0.0, 1.0, -1.0])) * w[y]
    l_a = draw(st.floats(0.5, 20.0))
    u_a = l_a + draw(st.floats(1.0, 100.0))
    norms = l_a * 0.5 + (u_a * 1.5 - l_a * 0.5) * torch.rand(batch, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * norms[:, None]
    if batch > 1 and draw(st.booleans()):
        y[0] = -100
    l_m = draw(st.floats(0.0, 1.0))
    hp = {
        "scale": draw(st.floats(0.5, 64.0)), "l_a": l_a, "u_a": u_a, "l_m": l_m,
        "u_m": l_m + draw(st.floats(0.0, 1.0)), "lambda_g": draw(st.floats(0.0, 50.0)),
        "easy_margin": draw(st.booleans()),
    }
    return x, w, y, hp, draw(st.sampled_from(["mean", "sum", "none"])), draw(st.sampled_from([None, 1, 3, "auto"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_hypothesis_matches_reference(problem) -> None:
    x, w, y, hp, reduction, chunk = problem
    head = marginloss.MagFace(x.shape[1], w.shape[0], chunk_size=chunk, reduction=reduction, dtype=torch.float64, **hp)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    loss = head(x, y)
    loss.sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    ref = magface_loss_reference(xr, wr, y, reduction=reduction, **hp)
    ref.sum().backward()
    assert_close(loss, ref, rtol=1e-9, atol=1e-10, what="loss")
    assert_close(x.grad, xr.grad, rtol=1e-7, atol=1e-9, what="embeddings.grad")
    assert_close(head.weight.grad, wr.grad, rtol=1e-7, atol=1e-9, what="weight.grad")


def test_state_dict_registry_repr_defaults() -> None:
    head = marginloss.create_head("magface", 5, 13)
    assert isinstance(head, marginloss.MagFace)
    assert head.hyperparameters() == {
        "scale": 64.0, "l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0, "easy_margin": True,
    }
    assert set(head.state_dict()) == {"weight"}
    twin = marginloss.MagFace(5, 13)
    twin.load_state_dict(head.state_dict())
    x, _, y = _problem(seed=6)
    assert_close(twin(x.float(), y), head(x.float(), y), rtol=0, atol=0)
    assert "lambda_g=35.0" in repr(head) and "easy_margin=True" in repr(head)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"l_a": 0.0}, r"l_a must be in \(0, inf\], got 0.0"),
        ({"u_a": 5.0}, r"u_a must be > l_a = 10.0, got 5.0"),
        ({"l_m": -0.1}, r"l_m must be in \[0, 3.14159\), got -0.1"),
        ({"u_m": 0.3}, r"u_m must be >= l_m = 0.45, got 0.3"),
        ({"u_m": 3.5}, r"u_m must be in \[0, 3.14159\), got 3.5"),
        ({"lambda_g": -1.0}, r"lambda_g must be in \[0, inf\], got -1.0"),
        ({"scale": -1.0}, r"scale must be in \(0, inf\]"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        marginloss.MagFace(4, 6, **kwargs)
    with pytest.raises(ValueError, match=message):
        MF.magface(torch.randn(2, 4), torch.randn(6, 4), torch.tensor([0, 1]), **kwargs)


@pytest.mark.parametrize("chunk", [None, 3])
def test_autocast_bf16_and_fp16_inputs_are_finite(chunk) -> None:
    head = marginloss.MagFace(5, 7, chunk_size=chunk)
    x = (torch.randn(8, 5) * 30).half().requires_grad_()
    labels = torch.randint(0, 7, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x.float(), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(head.weight.grad).all())
    loss16 = head(x, labels)
    loss16.backward()
    assert torch.isfinite(loss16)
    # fp16 weights (and state promoted to float32), fp16 embeddings.
    half = marginloss.MagFace(5, 7, chunk_size=chunk, dtype=torch.float16)
    xh = x.detach().clone().requires_grad_()
    loss_half = half(xh, labels)
    loss_half.backward()
    assert loss_half.dtype == torch.float32 and torch.isfinite(loss_half)
    assert bool(torch.isfinite(xh.grad).all()) and bool(torch.isfinite(half.weight.grad).all())
    assert all(bool(torch.isfinite(b).all()) and b.dtype != torch.float16 for b in half.buffers())


@pytest.mark.parametrize("chunk", [None, 3])
def test_compile_fullgraph_matches_eager(chunk) -> None:
    torch._dynamo.reset()
    module = marginloss.MagFace(5, 7, chunk_size=chunk, scale=16.0)
    x = (torch.randn(6, 5) * 20).requires_grad_()
    labels = torch.tensor([0, 1, 6, 2, 2, 5])
    eager = module(x, labels)
    (gx_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with marginloss.validation(False):
        out = compiled(x, labels)
    (gx,) = torch.autograd.grad(out, x)
    assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert_close(gx, gx_eager, rtol=1e-5, atol=1e-6)
