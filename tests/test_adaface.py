"""AdaFace against the float64 per-sample reference: loss, gradients, EMA statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import marginloss
from marginloss import functional as MF
from marginloss import fused
from tests.reference import adaface_loss_reference, adaface_statistics_reference, assert_close

CHUNKS = [None, 1, 7, "auto"]


def _problem(batch=9, classes=13, dim=5, seed=0, low=2.0, high=60.0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) + 0.8 * w[y]
    norms = low + (high - low) * torch.rand(batch, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * norms[:, None]  # feature norms spread over [low, high]
    return x, w, y


def _head(chunk="auto", **kwargs):
    options = {"scale": 16.0, "margin": 0.4, "h": 1.0, "t_alpha": 0.5, **kwargs}
    return marginloss.AdaFace(5, 13, chunk_size=chunk, dtype=torch.float64, **options)


def _step_reference(x, w, y, mean, std, *, t_alpha, ignore_index=-100, **hp):
    norms = [float(x[i].detach().norm()) for i in range(x.shape[0]) if int(y[i]) != ignore_index]
    mean, std = adaface_statistics_reference(norms, t_alpha, mean, std)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = adaface_loss_reference(xr, wr, y, batch_mean=mean, batch_std=std, ignore_index=ignore_index, **hp)
    return loss, xr, wr, mean, std


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kept", [0, None])
def test_matches_reference_over_steps(chunk, kept) -> None:
    """Three training steps: loss, embedding and weight gradients, and the EMA buffers."""
    head = _head(chunk)
    _x0, w, _ = _problem()
    with torch.no_grad():
        head.weight.copy_(w)
    mean, std = 20.0, 100.0
    previous = fused.set_backward_cache_bytes(kept) if kept is not None else None
    try:
        for step in range(3):
            x, _, y = _problem(seed=10 + step)
            if step == 1:
                y[0] = -100
            x = x.requires_grad_()
            head.weight.grad = None
            loss = head(x, y)
            loss.backward()
            ref, xr, wr, mean, std = _step_reference(
                x, head.weight, y, mean, std, t_alpha=0.5, scale=16.0, margin=0.4, h=1.0
            )
            ref.backward()
            assert_close(loss, ref, rtol=1e-11, atol=1e-12, what=f"loss, step {step}")
            assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-11, what=f"embeddings.grad, step {step}")
            assert_close(head.weight.grad, wr.grad, rtol=1e-9, atol=1e-11, what=f"weight.grad, step {step}")
            assert_close(head.batch_mean, torch.tensor(mean, dtype=torch.float64), rtol=1e-13, atol=0, what="batch_mean")
            assert_close(head.batch_std, torch.tensor(std, dtype=torch.float64), rtol=1e-13, atol=0, what="batch_std")
    finally:
        if previous is not None:
            fused.set_backward_cache_bytes(previous)


def test_label_smoothing_sum_and_eval_mode_does_not_update() -> None:
    x, w, y = _problem(seed=3)
    head = _head(None, label_smoothing=0.1, reduction="sum", t_alpha=0.01, h=0.333, scale=64.0)
    with torch.no_grad():
        head.weight.copy_(w)
    head.eval()
    x = x.requires_grad_()
    loss = head(x, y)
    loss.backward()
    xr, wr = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    ref = adaface_loss_reference(
        xr, wr, y, scale=64.0, margin=0.4, h=0.333, batch_mean=20.0, batch_std=100.0,
        reduction="sum", label_smoothing=0.1,
    )
    ref.backward()
    assert_close(loss, ref, rtol=1e-11, atol=1e-11)
    assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    assert float(head.batch_mean) == 20.0 and float(head.batch_std) == 100.0
    # The margin logits of eval mode give the same loss through margin_cross_entropy.
    logits = head.logits(x, y)
    assert_close(MF.margin_cross_entropy(logits, y, reduction="sum", label_smoothing=0.1), loss, rtol=1e-11, atol=1e-11)
    assert_close(head.logits(x), 64.0 * head.cosine(x), rtol=1e-12, atol=1e-12)


def test_functional_forms_match_the_reference() -> None:
    x, w, y = _problem(seed=4)
    x, w = x.requires_grad_(), w.requires_grad_()
    loss = MF.adaface(x, w, y, scale=10.0, margin=0.3, h=2.0, batch_mean=25.0, batch_std=9.0, chunk_size=3)
    ref = adaface_loss_reference(x, w, y, scale=10.0, margin=0.3, h=2.0, batch_mean=25.0, batch_std=9.0)
    assert_close(loss, ref, rtol=1e-11, atol=1e-12)
    # Default statistics: this batch's own (t_alpha = 1 from any start).
    mean, std = adaface_statistics_reference([float(n) for n in x.detach().norm(dim=1)], 1.0, 0.0, 0.0)
    own = adaface_loss_reference(x, w, y, scale=10.0, margin=0.3, h=2.0, batch_mean=mean, batch_std=std)
    assert_close(MF.adaface(x, w, y, scale=10.0, margin=0.3, h=2.0), own, rtol=1e-11, atol=1e-12)
    one = MF.adaface(x[:1], w, y[:1], scale=10.0, margin=0.3, h=2.0)  # no std: the initial 20, 100
    ref_one = adaface_loss_reference(x[:1], w, y[:1], scale=10.0, margin=0.3, h=2.0, batch_mean=20.0, batch_std=100.0)
    assert_close(one, ref_one, rtol=1e-11, atol=1e-12)
    cosine = marginloss.MarginHead(5, 13, dtype=torch.float64)
    with torch.no_grad():
        cosine.weight.copy_(w)
    logits = MF.adaface_logits(cosine.cosine(x), y, x.norm(dim=1), scale=10.0, margin=0.3, h=2.0)
    assert_close(MF.margin_cross_entropy(logits, y), own, rtol=1e-11, atol=1e-12)


def test_gradcheck() -> None:
    x, w, y = _problem(batch=4, classes=5, dim=3, seed=5)
    x, w = x.requires_grad_(), w.requires_grad_()
    norms = x.detach().norm(dim=1, keepdim=True)
    for chunk in (None, 2):
        # The quality is the detached norm: hold the norms fixed so that the finite
        # differences see only what the gradient is defined through (the direction).
        def loss_fn(a, b, chunk=chunk):
            fixed = a / a.norm(dim=1, keepdim=True) * norms
            return MF.adaface(fixed, b, y, scale=4.0, margin=0.4, h=1.0, batch_mean=25.0, batch_std=20.0, chunk_size=chunk)
        assert torch.autograd.gradcheck(loss_fn, (x, w))


@st.composite
def problems(draw: st.DrawFn) -> tuple:
    batch, classes, dim = draw(st.integers(1, 7)), draw(st.integers(1, 9)), draw(st.integers(2, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) + draw(st.sampled_from([0.0, 1.0, 5.0])) * w[y]
    norms = torch.exp(draw(st.floats(-8.0, 5.0)) + torch.randn(batch, generator=gen, dtype=torch.float64))
    x = x / x.norm(dim=1, keepdim=True) * norms[:, None]  # norms from 1e-4 to ~1000: both clips
    if batch > 1 and draw(st.booleans()):
        y[0] = -100
    hp = {
        "scale": draw(st.floats(0.5, 64.0)),
        "margin": draw(st.floats(0.0, 1.0)),
        "h": draw(st.floats(0.05, 3.0)),
        "t_alpha": draw(st.floats(0.01, 1.0)),
    }
    return x, w, y, hp, draw(st.sampled_from(["mean", "sum", "none"])), draw(st.sampled_from([None, 1, 3, "auto"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_hypothesis_matches_reference(problem) -> None:
    x, w, y, hp, reduction, chunk = problem
    head = marginloss.AdaFace(x.shape[1], w.shape[0], chunk_size=chunk, reduction=reduction, dtype=torch.float64, **hp)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    loss = head(x, y)
    loss.sum().backward()
    t_alpha = hp.pop("t_alpha")
    ref, xr, wr, mean, std = _step_reference(x, w, y, 20.0, 100.0, t_alpha=t_alpha, reduction=reduction, **hp)
    ref.sum().backward()
    assert_close(loss, ref, rtol=1e-9, atol=1e-10, what="loss")
    assert_close(x.grad, xr.grad, rtol=1e-7, atol=1e-9, what="embeddings.grad")
    assert_close(head.weight.grad, wr.grad, rtol=1e-7, atol=1e-9, what="weight.grad")
    assert_close(head.batch_mean, torch.tensor(mean, dtype=torch.float64), rtol=1e-12, atol=1e-14, what="batch_mean")
    assert_close(head.batch_std, torch.tensor(std, dtype=torch.float64), rtol=1e-12, atol=1e-14, what="batch_std")


def test_state_dict_round_trip_registry_repr() -> None:
    x, _, y = _problem(seed=6)
    head = _head()
    head(x, y)
    twin = marginloss.create_head("adaface", 5, 13, scale=16.0, h=1.0, t_alpha=0.5, dtype=torch.float64)
    assert isinstance(twin, marginloss.AdaFace)
    assert set(head.state_dict()) == {"weight", "batch_mean", "batch_std"}
    twin.load_state_dict(head.state_dict())
    head.eval(), twin.eval()
    assert_close(twin(x, y), head(x, y), rtol=0, atol=0)
    assert float(twin.batch_mean) == float(head.batch_mean) != 20.0
    text = repr(head)
    assert "margin=0.4" in text and "h=1.0" in text and "t_alpha=0.5" in text
    assert head.hyperparameters() == {"scale": 16.0, "margin": 0.4, "h": 1.0, "t_alpha": 0.5}
    assert head.margin_scaler(x).shape == (9,)


def test_defaults_are_the_release() -> None:
    head = marginloss.AdaFace(4, 6)
    assert head.hyperparameters() == {"scale": 64.0, "margin": 0.4, "h": 0.333, "t_alpha": 0.01}
    assert float(head.batch_mean) == 20.0 and float(head.batch_std) == 100.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"margin": -0.1}, r"margin must be in \[0, 3.14159\), got -0.1"),
        ({"margin": 4.0}, r"margin must be in \[0, 3.14159\)"),
        ({"h": 0.0}, r"h must be in \(0, inf\], got 0.0"),
        ({"t_alpha": 0.0}, r"t_alpha must be in \(0, 1\], got 0.0"),
        ({"t_alpha": 1.5}, r"t_alpha must be in \(0, 1\], got 1.5"),
        ({"scale": 0.0}, r"scale must be in \(0, inf\]"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        marginloss.AdaFace(4, 6, **kwargs)
    if "t_alpha" not in kwargs:
        with pytest.raises(ValueError, match=message):
            MF.adaface(torch.randn(2, 4), torch.randn(6, 4), torch.tensor([0, 1]), **kwargs)


def test_small_batches_keep_the_statistics() -> None:
    head = _head()
    head(torch.randn(1, 5, dtype=torch.float64), torch.tensor([3]))
    head(torch.randn(2, 5, dtype=torch.float64), torch.tensor([3, -100]))
    assert float(head.batch_mean) == 20.0 and float(head.batch_std) == 100.0
    loss = head(torch.randn(3, 5, dtype=torch.float64), torch.tensor([-100, -100, -100]))
    assert float(loss.detach()) == 0.0 and float(head.batch_std) == 100.0


@pytest.mark.parametrize("chunk", [None, 3])
def test_autocast_bf16_and_fp16_inputs_are_finite(chunk) -> None:
    head = marginloss.AdaFace(5, 7, chunk_size=chunk)
    x = (torch.randn(8, 5) * 30).half().requires_grad_()
    labels = torch.randint(0, 7, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x.float(), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(head.weight.grad).all())
    assert bool(torch.isfinite(head.batch_mean)) and bool(torch.isfinite(head.batch_std))
    loss16 = head(x, labels)
    loss16.backward()
    assert torch.isfinite(loss16)
    # fp16 weights (and state promoted to float32), fp16 embeddings.
    half = marginloss.AdaFace(5, 7, chunk_size=chunk, dtype=torch.float16)
    xh = x.detach().clone().requires_grad_()
    loss_half = half(xh, labels)
    loss_half.backward()
    assert loss_half.dtype == torch.float32 and torch.isfinite(loss_half)
    assert bool(torch.isfinite(xh.grad).all()) and bool(torch.isfinite(half.weight.grad).all())
    assert all(bool(torch.isfinite(b).all()) and b.dtype != torch.float16 for b in half.buffers())


@pytest.mark.parametrize("chunk", [None, 3])
def test_compile_fullgraph_matches_eager(chunk) -> None:
    torch._dynamo.reset()
    eager = marginloss.AdaFace(5, 7, chunk_size=chunk, scale=16.0, h=1.0, t_alpha=0.3)
    twin = marginloss.AdaFace(5, 7, chunk_size=chunk, scale=16.0, h=1.0, t_alpha=0.3)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    labels = torch.tensor([0, 1, 6, 2, 2, 5])
    for step in range(2):
        x = (torch.randn(6, 5) * (5.0 + 10 * step)).requires_grad_()
        want = eager(x, labels)
        (gx_want,) = torch.autograd.grad(want, x)
        with marginloss.validation(False):
            got = compiled(x, labels)
        (gx,) = torch.autograd.grad(got, x)
        assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert_close(gx, gx_want, rtol=1e-5, atol=1e-6)
        assert_close(twin.batch_mean, eager.batch_mean, rtol=1e-6, atol=0)
        assert_close(twin.batch_std, eager.batch_std, rtol=1e-6, atol=0)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_updates_once(use_reentrant) -> None:
    x, _w, y = _problem(seed=7)
    plain, ckpt = _head(), _head()
    ckpt.load_state_dict(plain.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa, y).backward()
    torch.utils.checkpoint.checkpoint(ckpt, xb, y, use_reentrant=use_reentrant).backward()
    assert float(ckpt.batch_mean) == float(plain.batch_mean)
    assert float(ckpt.batch_std) == float(plain.batch_std)
    assert_close(xb.grad, xa.grad, rtol=1e-12, atol=1e-13)
    assert math.isfinite(float(plain.batch_mean))
