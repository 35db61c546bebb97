"""CurricularFace: float64 reference on every path, the EMA buffer t, checkpoint replays."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import marginloss
from marginloss import fused
from tests.reference import assert_close, curricularface_loss

CHUNKS = [None, 1, 7, "auto"]
B, C, D = 9, 23, 5
S, M, MOMENTUM = 6.0, 0.4, 0.2


def _problem(batch=B, classes=C, dim=D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    # Near their class, but with hard negatives above cos(θ_y + m) in most rows.
    x = 0.5 * w[y] + torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return x, w, y


def _target_cosines(x, w, y):
    return torch.stack([torch.nn.functional.cosine_similarity(x[i], w[int(y[i])], dim=0) for i in range(x.shape[0])])


def _head(chunk="auto", **kwargs):
    kwargs = {"scale": S, "margin": M, "momentum": MOMENTUM, **kwargs}
    return marginloss.CurricularFace(D, C, chunk_size=chunk, dtype=torch.float64, **kwargs)


@functools.cache
def _reference(steps: int = 3, reduction: str = "mean", label_smoothing: float = 0.0, ignore: bool = False):
    """Loss and gradients of the last of ``steps`` training steps on the same batch, with t
    advanced before each step's logits (the release's order)."""
    x, w, y = _problem()
    if ignore:
        y = y.clone()
        y[[2, 5]] = -100
    valid = y != -100
    cos_y = _target_cosines(x, w, torch.where(valid, y, 0))
    t = 0.0
    for _ in range(steps):
        t = MOMENTUM * float(cos_y[valid].mean()) + (1 - MOMENTUM) * t
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = curricularface_loss(xr, wr, y, scale=S, margin=M, t=t, reduction=reduction, label_smoothing=label_smoothing)
    loss.sum().backward()
    return loss.detach(), xr.grad, wr.grad, y, t


def _hard_negatives(x, w, y):
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    cos_y = cos.gather(1, y[:, None])
    threshold = torch.cos(torch.acos(cos_y) + M)
    hard = cos > threshold
    hard.scatter_(1, y[:, None], False)
    return int(hard.sum())


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kept", [0, None])
def test_matches_the_reference_after_several_steps(chunk, kept) -> None:
    ref_loss, ref_gx, ref_gw, y, t = _reference()
    x, w, _ = _problem()
    assert _hard_negatives(x, w, y) > 5  # the modulation is exercised
    head = _head(chunk)
    with torch.no_grad():
        head.weight.copy_(w)
    previous = fused.set_backward_cache_bytes(kept if kept is not None else fused.backward_cache_bytes())
    try:
        for _ in range(2):
            head(x, y)
        xg = x.clone().requires_grad_()
        head.weight.grad = None
        loss = head(xg, y)
        loss.backward()
    finally:
        fused.set_backward_cache_bytes(previous)
    assert_close(head.t, torch.tensor(t, dtype=torch.float64), rtol=1e-12, atol=1e-14, what="t")
    assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12, what="loss")
    assert_close(xg.grad, ref_gx, rtol=1e-10, atol=1e-12, what="embeddings.grad")
    assert_close(head.weight.grad, ref_gw, rtol=1e-10, atol=1e-12, what="weight.grad")


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize(("reduction", "smoothing"), [("none", 0.0), ("sum", 0.1)])
def test_reduction_smoothing_and_ignore_index(chunk, reduction, smoothing) -> None:
    ref_loss, ref_gx, ref_gw, y, t = _reference(1, reduction, smoothing, ignore=True)
    x, w, _ = _problem()
    head = _head(chunk, reduction=reduction, label_smoothing=smoothing)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    loss = head(x, y)
    loss.sum().backward()
    assert_close(head.t, torch.tensor(t, dtype=torch.float64), rtol=1e-12, atol=1e-14, what="t over the valid rows")
    assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12, what="loss")
    assert_close(x.grad, ref_gx, rtol=1e-10, atol=1e-12, what="embeddings.grad")
    assert_close(head.weight.grad, ref_gw, rtol=1e-10, atol=1e-12, what="weight.grad")


def test_eval_mode_and_all_ignored_batches_leave_t_alone() -> None:
    x, _, y = _problem(seed=1)
    head = _head()
    head(x, y)
    t = head.t.clone()
    head.eval()
    head(x, y)
    assert torch.equal(head.t, t)
    head.train()
    head(x, torch.full_like(y, -100))
    assert torch.equal(head.t, t)


def test_functional_and_logits_agree_with_the_module() -> None:
    x, w, y = _problem(seed=2)
    head = _head()
    with torch.no_grad():
        head.weight.copy_(w)
        head.t.fill_(0.3)
    head.eval()
    loss = head(x, y)
    assert_close(marginloss.functional.curricularface(x, w, y, scale=S, margin=M, t=0.3), loss, rtol=1e-12, atol=1e-12)
    ref = curricularface_loss(x, w, y, scale=S, margin=M, t=0.3)
    assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    cos = head.cosine(x)
    logits = marginloss.functional.curricularface_logits(cos, y, scale=S, margin=M, t=0.3)
    assert_close(marginloss.functional.margin_cross_entropy(logits, y), loss, rtol=1e-12, atol=1e-12)
    assert_close(head.logits(x, y), logits, rtol=1e-12, atol=1e-12)
    assert_close(head.logits(x), S * cos, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck(chunk) -> None:
    x, w, y = _problem(batch=4, classes=5, dim=3, seed=3)
    x, w = x.requires_grad_(), w.requires_grad_()

    def fn(a, b):
        return marginloss.functional.curricularface(a, b, y, scale=3.0, margin=0.3, t=0.4, chunk_size=chunk)

    assert torch.autograd.gradcheck(fn, (x, w))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 6), classes=st.integers(1, 8), dim=st.integers(2, 5),
    scale=st.floats(1.0, 30.0), margin=st.floats(0.0, 1.2), t=st.floats(0.0, 1.0),
    chunk=st.sampled_from([None, 1, 3, "auto"]), seed=st.integers(0, 2**16),
)
def test_hypothesis_against_the_reference(batch, classes, dim, scale, margin, t, chunk, seed) -> None:
    x, w, y = _problem(batch, classes, dim, seed)
    x, w = x.requires_grad_(), w.requires_grad_()
    loss = marginloss.functional.curricularface(x, w, y, scale=scale, margin=margin, t=t, chunk_size=chunk)
    loss.backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = curricularface_loss(xr, wr, y, scale=scale, margin=margin, t=t)
    ref.backward()
    assert_close(loss, ref, rtol=1e-10, atol=1e-10, what="loss")
    assert_close(x.grad, xr.grad, rtol=1e-7, atol=1e-9, what="embeddings.grad")
    assert_close(w.grad, wr.grad, rtol=1e-7, atol=1e-9, what="weight.grad")


def test_state_dict_registry_and_bad_hyperparameters() -> None:
    x, w, y = _problem(seed=4)
    head = _head()
    head(x, y)
    assert set(head.state_dict()) == {"weight", "t"}
    twin = _head()
    twin.load_state_dict(head.state_dict())
    assert torch.equal(twin.t, head.t)
    head.eval(), twin.eval()
    assert_close(twin(x, y), head(x, y), rtol=0, atol=0)
    made = marginloss.create_head("curricularface", 4, 6)
    assert isinstance(made, marginloss.CurricularFace)
    assert made.hyperparameters() == {"scale": 64.0, "margin": 0.5, "momentum": 0.01}
    assert "momentum=0.01" in repr(made) and made.t.dtype == torch.float32
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        marginloss.CurricularFace(4, 6, momentum=1.5)
    with pytest.raises(ValueError, match=r"margin must be in \[0, 3.14159\), got 4.0"):
        marginloss.CurricularFace(4, 6, margin=4.0)
    with pytest.raises(ValueError, match=r"t must be a scalar"):
        marginloss.functional.curricularface(x, w, y, t=torch.zeros(2))


def test_activation_checkpointing_advances_t_once() -> None:
    x, w, y = _problem(seed=5)
    plain, ckpt = _head(), _head()
    with torch.no_grad():
        plain.weight.copy_(w)
        ckpt.weight.copy_(w)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa, y).backward()
    torch.utils.checkpoint.checkpoint(ckpt, xb, y, use_reentrant=False).backward()
    assert torch.equal(ckpt.t, plain.t)
    assert_close(xb.grad, xa.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, "auto"])
def test_autocast_bf16_and_fp16_are_finite(chunk) -> None:
    head = marginloss.CurricularFace(5, 7, chunk_size=chunk)
    x = (torch.randn(8, 5) * 30).half().requires_grad_()
    labels = torch.randint(0, 7, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x.float(), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(head.t)
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(head.weight.grad).all())
    head16 = marginloss.CurricularFace(5, 7, chunk_size=chunk, dtype=torch.float16)
    assert head16.t.dtype == torch.float32
    loss16 = head16(x, labels)
    loss16.backward()
    assert torch.isfinite(loss16) and bool(torch.isfinite(head16.weight.grad).all())


@pytest.mark.parametrize(
    "chunk",
    [
        None,
        3,
    ],
)
def test_compile_fullgraph_matches_eager(chunk) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = marginloss.CurricularFace(5, 7, scale=8.0, chunk_size=chunk)
    twin = marginloss.CurricularFace(5, 7, scale=8.0, chunk_size=chunk)
    twin.load_state_dict(head.state_dict())
    x = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 6, 2, 2, 5])
    eager = head(x, labels)
    (gx_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    with marginloss.validation(False):
        out = compiled(x, labels)
    (gx,) = torch.autograd.grad(out, x)
    assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert_close(gx, gx_eager, rtol=1e-5, atol=1e-6)
    assert_close(twin.t, head.t, rtol=1e-6, atol=1e-7)


def test_partialfc_sampling_is_the_head_on_the_kept_classes() -> None:
    x, w, y = _problem(seed=6)
    head = _head(None, sample_rate=0.5)
    with torch.no_grad():
        head.weight.copy_(w)
    kept = marginloss.sharding.sample_classes(y, C, 1, 0, 0.5, seed=0, step=0)
    loss = head(x, y)
    t = MOMENTUM * float(_target_cosines(x, w, y).mean())
    assert_close(head.t, torch.tensor(t, dtype=torch.float64), rtol=1e-12, atol=1e-14, what="t")
    ref = curricularface_loss(x, w[kept], torch.searchsorted(kept, y), scale=S, margin=M, t=t)
    assert_close(loss, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 2])
def test_double_backward_through_the_non_target_transform(chunk) -> None:
    x, w, y = _problem(batch=4, classes=5, dim=3, seed=3)
    x, w = x.requires_grad_(), w.requires_grad_()

    def fn(a, b):
        return marginloss.functional.curricularface(a, b, y, scale=3.0, margin=0.3, t=0.4, chunk_size=chunk)

    assert torch.autograd.gradgradcheck(fn, (x, w))
