"""AdaCos against the float64 reference: the loss at the current scale, the scale's updates."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import marginloss
from marginloss import functional as MF
from marginloss import fused
from tests.reference import adacos_loss_reference, adacos_scale_reference, assert_close

CHUNKS = [None, 1, 7, "auto"]


def _problem(batch=9, classes=13, dim=5, seed=0, pull=0.8):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    x = 3.0 * torch.randn(batch, dim, generator=gen, dtype=torch.float64) + pull * w[y]
    return x, w, y


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kept", [0, None])
def test_matches_reference_over_steps(chunk, kept) -> None:
    """Each step's loss uses the scale the previous steps left; the update uses this step's
    statistics at that scale (B_avg from the engine's own log-sum-exp)."""
    head = marginloss.AdaCos(5, 13, chunk_size=chunk, dtype=torch.float64)
    _, w, _ = _problem()
    with torch.no_grad():
        head.weight.copy_(w)
    scale = math.sqrt(2.0) * math.log(12.0)
    assert_close(head.scale, torch.tensor(scale, dtype=torch.float64), rtol=1e-15, atol=0)
    previous = fused.set_backward_cache_bytes(kept) if kept is not None else None
    try:
        for step in range(4):
            x, _, y = _problem(seed=10 + step, pull=1.0 + step)
            if step == 2:
                y[3] = -100
            x = x.requires_grad_()
            head.weight.grad = None
            loss = head(x, y)
            loss.backward()
            xr, wr = x.detach().clone().requires_grad_(), head.weight.detach().clone().requires_grad_()
            ref = adacos_loss_reference(xr, wr, y, scale=scale)
            ref.backward()
            assert_close(loss, ref, rtol=1e-11, atol=1e-12, what=f"loss, step {step}")
            assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-11, what=f"embeddings.grad, step {step}")
            assert_close(head.weight.grad, wr.grad, rtol=1e-9, atol=1e-11, what=f"weight.grad, step {step}")
            scale = adacos_scale_reference(x.detach(), head.weight.detach(), y, scale)
            assert_close(head.scale, torch.tensor(scale, dtype=torch.float64), rtol=1e-11, atol=0, what="scale")
    finally:
        if previous is not None:
            fused.set_backward_cache_bytes(previous)
    assert head.scale.shape == () and "scale" in head.state_dict()


def test_fixed_scale_eval_mode_and_functional() -> None:
    x, w, y = _problem(seed=1)
    fixed = marginloss.AdaCos(5, 13, dynamic=False, dtype=torch.float64)
    with torch.no_grad():
        fixed.weight.copy_(w)
    for _ in range(2):
        loss = fixed(x, y)
    s = math.sqrt(2.0) * math.log(12.0)
    assert float(fixed.scale) == s
    assert_close(loss, adacos_loss_reference(x, w, y, scale=s), rtol=1e-12, atol=1e-12)
    assert_close(MF.adacos(x, w, y), loss, rtol=1e-12, atol=1e-12)
    assert_close(MF.adacos(x, w, y, scale=3.0, chunk_size=4), adacos_loss_reference(x, w, y, scale=3.0), rtol=1e-12, atol=1e-12)
    dynamic = marginloss.AdaCos(5, 13, dtype=torch.float64)
    dynamic.load_state_dict(fixed.state_dict())
    dynamic.eval()
    dynamic(x, y)
    assert float(dynamic.scale) == s  # no update in eval mode
    assert_close(dynamic.logits(x), s * dynamic.cosine(x), rtol=1e-12, atol=1e-12)
    assert_close(MF.margin_cross_entropy(dynamic.logits(x, y), y), loss, rtol=1e-12, atol=1e-12)


def test_dynamic_scale_function() -> None:
    x, w, y = _problem(seed=2)
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    target = cos.gather(1, y[:, None]).squeeze(1)
    rest = (5.0 * cos).scatter(1, y[:, None], -math.inf).logsumexp(dim=1)
    valid = torch.ones(9, dtype=torch.bool)
    valid[4] = False
    y_ignored = y.clone()
    y_ignored[4] = -100
    got = MF.adacos_dynamic_scale(target, rest, valid)
    assert_close(got, torch.tensor(adacos_scale_reference(x, w, y_ignored, 5.0), dtype=torch.float64), rtol=1e-12, atol=0)
    assert math.isnan(float(MF.adacos_dynamic_scale(target, rest, torch.zeros(9, dtype=torch.bool))))
    assert_close(MF.adacos_dynamic_scale(target[:4], rest[:4]),  # an even count: the lower median
                 torch.tensor(adacos_scale_reference(x[:4], w, y[:4], 5.0), dtype=torch.float64), rtol=1e-12, atol=0)


def test_gradcheck() -> None:
    x, w, y = _problem(batch=4, classes=5, dim=3, seed=3)
    x, w = x.requires_grad_(), w.requires_grad_()
    for chunk in (None, 2):
        head = marginloss.AdaCos(3, 5, chunk_size=chunk, dtype=torch.float64).eval()

        def loss_fn(a, b, head=head):
            return torch.func.functional_call(head, {"weight": b}, (a, y))
        assert torch.autograd.gradcheck(loss_fn, (x, w))


@st.composite
def problems(draw: st.DrawFn) -> tuple:
    batch, classes, dim = draw(st.integers(1, 7)), draw(st.integers(3, 12)), draw(st.integers(2, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) + draw(st.sampled_from([0.0, 1.0, 5.0])) * w[y]
    if batch > 1 and draw(st.booleans()):
        y[0] = -100
    scale = draw(st.one_of(st.none(), st.floats(0.5, 40.0)))
    return x, w, y, scale, draw(st.sampled_from(["mean", "sum", "none"])), draw(st.sampled_from([None, 1, 3, "auto"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_hypothesis_matches_reference(problem) -> None:
    x, w, y, scale, reduction, chunk = problem
    head = marginloss.AdaCos(x.shape[1], w.shape[0], scale=scale, chunk_size=chunk, reduction=reduction, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    s = math.sqrt(2.0) * math.log(w.shape[0] - 1) if scale is None else scale
    for _ in range(2):
        xs = x.clone().requires_grad_()
        head.weight.grad = None
        loss = head(xs, y)
        loss.sum().backward()
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = adacos_loss_reference(xr, wr, y, scale=s, reduction=reduction)
        ref.sum().backward()
        assert_close(loss, ref, rtol=1e-9, atol=1e-10, what="loss")
        assert_close(xs.grad, xr.grad, rtol=1e-7, atol=1e-9, what="embeddings.grad")
        assert_close(head.weight.grad, wr.grad, rtol=1e-7, atol=1e-9, what="weight.grad")
        s = adacos_scale_reference(x, w, y, s)
        assert_close(head.scale, torch.tensor(s, dtype=torch.float64), rtol=1e-10, atol=0, what="scale")


def test_state_dict_registry_repr_and_accumulation() -> None:
    x, _w, y = _problem(seed=4)
    head = marginloss.create_head("adacos", 5, 13, dtype=torch.float64)
    assert isinstance(head, marginloss.AdaCos)
    assert head.hyperparameters() == {"dynamic": True, "initial_scale": math.sqrt(2.0) * math.log(12.0)}
    # Two forwards, one backward (gradient accumulation): the first graph keeps its scale.
    buffer = head.scale
    xa = x.clone().requires_grad_()
    (head(xa, y) + head(xa, y)).backward()
    assert torch.isfinite(xa.grad).all()
    # Updated in place: the buffer keeps its identity (DDP broadcasts the tensors it saw).
    assert head.scale is buffer and head._buffers["scale"] is buffer
    twin = marginloss.AdaCos(5, 13, dtype=torch.float64)
    twin.load_state_dict(head.state_dict())
    assert float(twin.scale) == float(head.scale) != head.initial_scale
    head.eval(), twin.eval()
    assert_close(twin(x, y), head(x, y), rtol=0, atol=0)
    assert "dynamic=True" in repr(head) and "initial_scale=" in repr(head)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_updates_once(use_reentrant) -> None:
    x, _w, y = _problem(seed=5)
    plain = marginloss.AdaCos(5, 13, dtype=torch.float64)
    ckpt = marginloss.AdaCos(5, 13, dtype=torch.float64)
    ckpt.load_state_dict(plain.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa, y).backward()
    torch.utils.checkpoint.checkpoint(ckpt, xb, y, use_reentrant=use_reentrant).backward()
    assert float(ckpt.scale) == float(plain.scale) != plain.initial_scale
    assert_close(xb.grad, xa.grad, rtol=1e-12, atol=1e-13)


def test_bad_hyperparameters_raise() -> None:
    with pytest.raises(ValueError, match=r"num_classes must be >= 3 for AdaCos's scale sqrt\(2\)\*log\(C-1\), got 2"):
        marginloss.AdaCos(4, 2)
    marginloss.AdaCos(4, 2, scale=8.0)  # a given scale needs no C - 1 > 1
    with pytest.raises(ValueError, match=r"scale must be in \(0, inf\], got -1.0"):
        marginloss.AdaCos(4, 6, scale=-1.0)
    with pytest.raises(TypeError, match="dynamic must be a bool, got str 'yes'"):
        marginloss.AdaCos(4, 6, dynamic="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scale must be in \(0, inf\]"):
        MF.adacos(torch.randn(2, 4), torch.randn(6, 4), torch.tensor([0, 1]), scale=0.0)
    with pytest.raises(ValueError, match="num_classes must be >= 3"):
        MF.adacos(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]))


def test_scale_is_kept_when_no_row_counts() -> None:
    head = marginloss.AdaCos(4, 6)
    loss = head(torch.randn(3, 4), torch.full((3,), -100))
    assert float(loss.detach()) == 0.0 and float(head.scale) == pytest.approx(head.initial_scale)


@pytest.mark.parametrize("chunk", [None, 3])
def test_autocast_bf16_and_fp16_inputs_are_finite(chunk) -> None:
    head = marginloss.AdaCos(5, 7, chunk_size=chunk)
    x = (torch.randn(8, 5) * 30).half().requires_grad_()
    labels = torch.randint(0, 7, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x.float(), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(head.scale)
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(head.weight.grad).all())
    loss16 = head(x, labels)
    loss16.backward()
    assert torch.isfinite(loss16) and head.scale.dtype == torch.float32
    # fp16 weights (and state promoted to float32), fp16 embeddings.
    half = marginloss.AdaCos(5, 7, chunk_size=chunk, dtype=torch.float16)
    xh = x.detach().clone().requires_grad_()
    loss_half = half(xh, labels)
    loss_half.backward()
    assert loss_half.dtype == torch.float32 and torch.isfinite(loss_half)
    assert bool(torch.isfinite(xh.grad).all()) and bool(torch.isfinite(half.weight.grad).all())
    assert all(bool(torch.isfinite(b).all()) and b.dtype != torch.float16 for b in half.buffers())


@pytest.mark.parametrize("chunk", [None, 3])
def test_compile_fullgraph_matches_eager(chunk) -> None:
    """The median is a sort and a gather: no data-dependent shape, one graph."""
    torch._dynamo.reset()
    eager = marginloss.AdaCos(5, 7, chunk_size=chunk)
    twin = marginloss.AdaCos(5, 7, chunk_size=chunk)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    labels = torch.tensor([0, 1, 6, 2, 2, -100])
    for _ in range(3):
        x = torch.randn(6, 5, requires_grad=True)
        want = eager(x, labels)
        (gx_want,) = torch.autograd.grad(want, x)
        with marginloss.validation(False):
            got = compiled(x, labels)
        (gx,) = torch.autograd.grad(got, x)
        assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert_close(gx, gx_want, rtol=1e-5, atol=1e-6)
        assert_close(twin.scale, eager.scale, rtol=1e-6, atol=0)
