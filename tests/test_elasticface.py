"""ElasticFace: float64 reference with the drawn margins, reproducible draws, the plus rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import marginloss
from marginloss import fused
from marginloss.functional import elastic_margins
from tests.reference import assert_close, elastic_plus_assignment, elasticface_loss

CHUNKS = [None, 1, 7, "auto"]
B, C, D = 9, 23, 5
S = 6.0


def _problem(batch=B, classes=C, dim=D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    x = 0.7 * w[y] + torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return x, w, y


def _cos_target(x, w, y):
    safe = torch.where(y >= 0, y, 0)
    return torch.stack([torch.nn.functional.cosine_similarity(x[i], w[int(safe[i])], dim=0) for i in range(x.shape[0])])


def _expected_margins(kind, plus, step, x, w, y, seed=0, sigma=0.1):
    """Step ``step``'s margins: the raw draws of (seed, step) and, for plus, the reference's
    sorting rule applied to them."""
    margin = 0.5 if kind == "arc" else 0.35
    draws = elastic_margins(x.shape[0], margin, sigma, seed=seed, step=step).tolist()
    if not plus:
        return draws
    valid = (y != -100).tolist()
    return elastic_plus_assignment(draws, _cos_target(x, w, y).tolist(), valid, margin)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kept", [0, None])
@pytest.mark.parametrize(("kind", "plus"), [("arc", False), ("cos", True)])
def test_matches_the_reference_at_each_step(chunk, kept, kind, plus) -> None:
    x, w, y = _problem()
    head = marginloss.ElasticFace(D, C, kind=kind, plus=plus, sigma=0.1, scale=S, chunk_size=chunk, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    previous = fused.set_backward_cache_bytes(kept if kept is not None else fused.backward_cache_bytes())
    try:
        for step in range(2):
            xg = x.clone().requires_grad_()
            head.weight.grad = None
            loss = head(xg, y)
            loss.backward()
            assert int(head.step) == step + 1
            margins = _expected_margins(kind, plus, step, x, w, y)
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            ref = elasticface_loss(xr, wr, y, scale=S, margins=margins, kind=kind)
            ref.backward()
            assert_close(loss, ref, rtol=1e-12, atol=1e-12, what=f"loss at step {step}")
            assert_close(xg.grad, xr.grad, rtol=1e-10, atol=1e-12, what="embeddings.grad")
            assert_close(head.weight.grad, wr.grad, rtol=1e-10, atol=1e-12, what="weight.grad")
    finally:
        fused.set_backward_cache_bytes(previous)


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize(("reduction", "smoothing", "plus"), [("none", 0.0, True), ("sum", 0.1, False)])
def test_reduction_smoothing_and_ignore_index(chunk, reduction, smoothing, plus) -> None:
    x, w, y = _problem(seed=1)
    y[[0, 3]] = -100
    head = marginloss.ElasticFace(
        D, C, plus=plus, sigma=0.1, scale=S, chunk_size=chunk, reduction=reduction, label_smoothing=smoothing,
        dtype=torch.float64,
    )
    with torch.no_grad():
        head.weight.copy_(w)
    xg = x.clone().requires_grad_()
    loss = head(xg, y)
    loss.sum().backward()
    margins = _expected_margins("arc", plus, 0, x, w, y)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = elasticface_loss(xr, wr, y, scale=S, margins=margins, kind="arc", reduction=reduction, label_smoothing=smoothing)
    ref.sum().backward()
    assert_close(loss, ref, rtol=1e-12, atol=1e-12, what="loss")
    assert_close(xg.grad, xr.grad, rtol=1e-10, atol=1e-12, what="embeddings.grad")
    assert_close(head.weight.grad, wr.grad, rtol=1e-10, atol=1e-12, what="weight.grad")


def test_draws_are_reproducible_and_normal() -> None:
    a = elastic_margins(4096, 0.5, 0.05, seed=3, step=7)
    assert torch.equal(a, elastic_margins(4096, 0.5, 0.05, seed=3, step=7))
    assert not torch.equal(a, elastic_margins(4096, 0.5, 0.05, seed=3, step=8))
    assert not torch.equal(a, elastic_margins(4096, 0.5, 0.05, seed=4, step=7))
    assert abs(float(a.mean()) - 0.5) < 0.005 and abs(float(a.std()) - 0.05) < 0.005
    assert torch.equal(elastic_margins(5, 0.5, 0.0), torch.full((5,), 0.5, dtype=torch.float64))
    # Same seed, same steps: two heads train identically; another seed does not.
    x, w, y = _problem(seed=2)
    heads = [marginloss.ElasticFace(D, C, scale=S, seed=s, dtype=torch.float64) for s in (0, 0, 1)]
    for head in heads:
        with torch.no_grad():
            head.weight.copy_(w)
    losses = [[float(head(x, y).detach()) for _ in range(3)] for head in heads]
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_plus_gives_the_smallest_margin_to_the_largest_target_cosine() -> None:
    cos = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2], dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, True, True])
    raw = elastic_margins(6, 0.5, 0.1, step=2)
    plus = elastic_margins(6, 0.5, 0.1, step=2, plus=True, cos_target=cos, valid=valid)
    assert plus.tolist() == elastic_plus_assignment(raw.tolist(), cos.tolist(), valid.tolist(), 0.5)
    kept = plus[valid]
    order = torch.argsort(cos[valid], descending=True)
    assert bool((kept[order].diff() >= 0).all()) and float(plus[2]) == 0.5
    assert sorted(kept.tolist()) == sorted(raw[valid].tolist())
    with pytest.raises(ValueError, match="plus=True needs cos_target"):
        elastic_margins(3, 0.5, 0.1, plus=True)


def test_eval_mode_uses_the_mean_margin_and_keeps_the_step() -> None:
    x, w, y = _problem(seed=3)
    head = marginloss.ElasticFace(D, C, kind="cos", scale=S, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    head(x, y)
    head.eval()
    loss = head(x, y)
    assert int(head.step) == 1
    ref = elasticface_loss(x, w, y, scale=S, margins=[0.35] * B, kind="cos")
    assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    cos = head.cosine(x)
    assert_close(head.logits(x), S * cos, rtol=1e-12, atol=1e-12)
    logits = marginloss.functional.elasticface_logits(cos, y, kind="cos", scale=S, sigma=0.0)
    assert_close(head.logits(x, y), logits, rtol=1e-12, atol=1e-12)
    # in training mode, logits with labels use the last training step's draws
    head.train()
    logits = marginloss.functional.elasticface_logits(cos, y, kind="cos", scale=S, step=0)
    assert_close(head.logits(x, y), logits, rtol=1e-12, atol=1e-12)
    want = marginloss.functional.elasticface(x, w, y, kind="cos", scale=S, step=0)
    assert_close(marginloss.functional.margin_cross_entropy(logits, y), want, rtol=1e-12, atol=1e-12)


def test_functional_matches_the_module() -> None:
    x, w, y = _problem(seed=4)
    head = marginloss.ElasticFace(D, C, plus=True, scale=S, seed=5, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    for step in range(2):
        want = marginloss.functional.elasticface(x, w, y, plus=True, scale=S, seed=5, step=step)
        assert_close(head(x, y), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_gradcheck(chunk, kind) -> None:
    x, w, y = _problem(batch=4, classes=5, dim=3, seed=5)
    x, w = x.requires_grad_(), w.requires_grad_()

    def fn(a, b):
        return marginloss.functional.elasticface(a, b, y, kind=kind, scale=3.0, plus=True, step=1, chunk_size=chunk)

    assert torch.autograd.gradcheck(fn, (x, w))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 6), classes=st.integers(1, 8), dim=st.integers(2, 5),
    scale=st.floats(1.0, 30.0), margin=st.floats(0.0, 1.0), sigma=st.floats(0.0, 0.2),
    kind=st.sampled_from(["arc", "cos"]), plus=st.booleans(), step=st.integers(0, 1000),
    chunk=st.sampled_from([None, 1, 3, "auto"]), seed=st.integers(0, 2**16),
)
def test_hypothesis_against_the_reference(batch, classes, dim, scale, margin, sigma, kind, plus, step, chunk, seed) -> None:
    x, w, y = _problem(batch, classes, dim, seed)
    x, w = x.requires_grad_(), w.requires_grad_()
    loss = marginloss.functional.elasticface(
        x, w, y, kind=kind, scale=scale, margin=margin, sigma=sigma, plus=plus, seed=seed, step=step, chunk_size=chunk
    )
    loss.backward()
    draws = elastic_margins(batch, margin, sigma, seed=seed, step=step).tolist()
    if plus:
        draws = elastic_plus_assignment(draws, _cos_target(x.detach(), w.detach(), y).tolist(), [True] * batch, margin)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = elasticface_loss(xr, wr, y, scale=scale, margins=draws, kind=kind)
    ref.backward()
    assert_close(loss, ref, rtol=1e-10, atol=1e-10, what="loss")
    assert_close(x.grad, xr.grad, rtol=1e-7, atol=1e-9, what="embeddings.grad")
    assert_close(w.grad, wr.grad, rtol=1e-7, atol=1e-9, what="weight.grad")


def test_defaults_state_dict_registry_and_bad_hyperparameters() -> None:
    assert marginloss.ElasticFace(4, 6).hyperparameters() == {
        "kind": "arc", "scale": 64.0, "margin": 0.5, "sigma": 0.05, "plus": False, "seed": 0,
    }
    assert (marginloss.ElasticFace(4, 6, kind="cos").margin, marginloss.ElasticFace(4, 6, kind="cos").sigma) == (0.35, 0.05)
    assert marginloss.ElasticFace(4, 6, plus=True).sigma == 0.0175
    assert marginloss.ElasticFace(4, 6, kind="cos", plus=True).sigma == 0.02
    x, _, y = _problem(seed=6)
    head = marginloss.ElasticFace(D, C, dtype=torch.float64)
    head(x, y)
    head(x, y)
    assert set(head.state_dict()) == {"weight", "step"}
    twin = marginloss.ElasticFace(D, C, dtype=torch.float64)
    twin.load_state_dict(head.state_dict())
    assert int(twin.step) == 2
    assert float(twin(x, y).detach()) == float(head(x, y).detach())  # the same draws at step 2
    made = marginloss.create_head("elasticface", 4, 6, kind="cos", plus=True)
    assert isinstance(made, marginloss.ElasticFace) and "kind='cos'" in repr(made) and "plus=True" in repr(made)
    with pytest.raises(ValueError, match=r"kind must be one of \('arc', 'cos'\), got 'mag'"):
        marginloss.ElasticFace(4, 6, kind="mag")
    with pytest.raises(ValueError, match=r"sigma must be in \[0, 1\], got -0.1"):
        marginloss.ElasticFace(4, 6, sigma=-0.1)
    with pytest.raises(ValueError, match=r"margin must be in \[0, 2\), got 2.5"):
        marginloss.ElasticFace(4, 6, kind="cos", margin=2.5)
    with pytest.raises(ValueError, match=r"margin must be in \[0, 3.14159\), got 3.5"):
        marginloss.ElasticFace(4, 6, margin=3.5)
    with pytest.raises(TypeError, match="plus must be a bool"):
        marginloss.ElasticFace(4, 6, plus=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed must fit in int64"):
        marginloss.ElasticFace(4, 6, seed=2**70)


def test_activation_checkpointing_sees_the_same_margins() -> None:
    x, w, y = _problem(seed=7)
    plain = marginloss.ElasticFace(D, C, scale=S, dtype=torch.float64)
    ckpt = marginloss.ElasticFace(D, C, scale=S, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.copy_(w)
        ckpt.weight.copy_(w)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = plain(xa, y)
    la.backward()
    lb = torch.utils.checkpoint.checkpoint(ckpt, xb, y, use_reentrant=False)
    lb.backward()
    assert int(ckpt.step) == int(plain.step) == 1
    assert_close(lb, la, rtol=0, atol=0)
    assert_close(xb.grad, xa.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, "auto"])
@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_autocast_bf16_and_fp16_are_finite(chunk, kind) -> None:
    head = marginloss.ElasticFace(5, 7, kind=kind, plus=True, chunk_size=chunk)
    x = (torch.randn(8, 5) * 30).half().requires_grad_()
    labels = torch.randint(0, 7, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x.float(), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(head.weight.grad).all())
    head16 = marginloss.ElasticFace(5, 7, kind=kind, chunk_size=chunk, dtype=torch.float16)
    loss16 = head16(x, labels)
    loss16.backward()
    assert torch.isfinite(loss16) and bool(torch.isfinite(head16.weight.grad).all())


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
def test_compile_graph_breaks_on_the_host_step_only() -> None:
    """The draws read the step on the host (a data-dependent value): fullgraph compilation
    is not possible; ordinary torch.compile (with a graph break) matches eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = marginloss.ElasticFace(5, 7, scale=8.0)
    twin = marginloss.ElasticFace(5, 7, scale=8.0)
    twin.load_state_dict(head.state_dict())
    x = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 6, 2, 2, 5])
    eager = head(x, labels)
    (gx_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(twin, backend="aot_eager")
    out = compiled(x, labels)
    (gx,) = torch.autograd.grad(out, x)
    assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert_close(gx, gx_eager, rtol=1e-5, atol=1e-6)
    assert int(twin.step) == 1
    assert math.isfinite(float(out.detach()))


def test_partialfc_sampling_is_the_head_on_the_kept_classes() -> None:
    x, w, y = _problem(seed=8)
    head = marginloss.ElasticFace(D, C, sigma=0.1, plus=True, scale=S, sample_rate=0.5, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    kept = marginloss.sharding.sample_classes(y, C, 1, 0, 0.5, seed=0, step=0)
    loss = head(x, y)
    margins = _expected_margins("arc", True, 0, x, w, y)
    ref = elasticface_loss(x, w[kept], torch.searchsorted(kept, y), scale=S, margins=margins, kind="arc")
    assert_close(loss, ref, rtol=1e-12, atol=1e-12)
