"""SubCenterArcFace: float64 reference, every engine path, outliers, dominant centres, PML oracle."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import marginloss
from marginloss import fused
from tests.reference import assert_close, subcenter_arcface_loss, subcenter_outliers

CHUNKS = [None, 1, 7, "auto"]
B, C, D, K = 9, 13, 5, 3


def _problem(batch=B, classes=C, dim=D, k=K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(classes * k, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    # Samples near one of their class's sub-centres, so that some targets win on each.
    pick = torch.randint(0, k, (batch,), generator=gen)
    x = w[y * k + pick] + 0.8 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return x, w, y


def _head(chunk="auto", **kwargs):
    kwargs = {"num_subcenters": K, "scale": 8.0, "margin": 0.4, **kwargs}
    return marginloss.SubCenterArcFace(D, C, chunk_size=chunk, dtype=torch.float64, **kwargs)


@functools.cache
def _reference(reduction: str = "mean", label_smoothing: float = 0.0, ignore: bool = False):
    x, w, y = _problem()
    if ignore:
        y = y.clone()
        y[[1, 4]] = -100
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = subcenter_arcface_loss(
        xr, wr, y, num_subcenters=K, scale=8.0, margin=0.4, reduction=reduction, label_smoothing=label_smoothing
    )
    loss.sum().backward()
    return loss.detach(), xr.grad, wr.grad, y


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kept", [0, None])
def test_matches_the_reference_on_every_path(chunk, kept) -> None:
    ref_loss, ref_gx, ref_gw, y = _reference()
    x, w, _ = _problem()
    head = _head(chunk)
    assert head.weight.shape == (C * K, D)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    previous = fused.set_backward_cache_bytes(kept if kept is not None else fused.backward_cache_bytes())
    try:
        loss = head(x, y)
        loss.backward()
    finally:
        fused.set_backward_cache_bytes(previous)
    assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12, what="loss")
    assert_close(x.grad, ref_gx, rtol=1e-10, atol=1e-12, what="embeddings.grad")
    assert_close(head.weight.grad, ref_gw, rtol=1e-10, atol=1e-12, what="weight.grad")


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize(("reduction", "smoothing"), [("none", 0.0), ("sum", 0.1)])
def test_reduction_smoothing_and_ignore_index(chunk, reduction, smoothing) -> None:
    ref_loss, ref_gx, ref_gw, y = _reference(reduction, smoothing, ignore=True)
    x, w, _ = _problem()
    head = _head(chunk, reduction=reduction, label_smoothing=smoothing)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    loss = head(x, y)
    loss.sum().backward()
    assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12, what="loss")
    assert_close(x.grad, ref_gx, rtol=1e-10, atol=1e-12, what="embeddings.grad")
    assert_close(head.weight.grad, ref_gw, rtol=1e-10, atol=1e-12, what="weight.grad")


def test_functional_and_logits_agree_with_the_module() -> None:
    x, w, y = _problem(seed=1)
    head = _head()
    with torch.no_grad():
        head.weight.copy_(w)
    loss = head(x, y)
    functional = marginloss.functional.subcenter_arcface(x, w, y, num_subcenters=K, scale=8.0, margin=0.4)
    assert_close(functional, loss, rtol=1e-12, atol=1e-12)
    sub_cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    logits = marginloss.functional.subcenter_arcface_logits(sub_cos, y, num_subcenters=K, scale=8.0, margin=0.4)
    assert_close(marginloss.functional.margin_cross_entropy(logits, y), loss, rtol=1e-12, atol=1e-12)
    assert_close(head.logits(x, y), logits, rtol=1e-12, atol=1e-12)
    assert_close(head.logits(x), 8.0 * sub_cos.unflatten(1, (C, K)).amax(2), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="num_classes \\* num_subcenters"):
        marginloss.functional.subcenter_arcface_logits(sub_cos[:, :-1], y, num_subcenters=K)
    with pytest.raises(ValueError, match="weight must have num_classes \\* num_subcenters rows"):
        marginloss.functional.subcenter_arcface(x, w[:-1], y, num_subcenters=K)


@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck(chunk) -> None:
    x, w, y = _problem(batch=4, classes=3, dim=3, k=2, seed=2)
    x, w = x.requires_grad_(), w.requires_grad_()

    def fn(a, b):
        return marginloss.functional.subcenter_arcface(a, b, y, num_subcenters=2, scale=3.0, margin=0.3, chunk_size=chunk)

    assert torch.autograd.gradcheck(fn, (x, w))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 6), classes=st.integers(1, 6), k=st.integers(1, 3), dim=st.integers(2, 5),
    scale=st.floats(1.0, 30.0), margin=st.floats(0.0, 1.2), chunk=st.sampled_from([None, 1, 3, "auto"]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_against_the_reference(batch, classes, k, dim, scale, margin, chunk, seed) -> None:
    x, w, y = _problem(batch, classes, dim, k, seed)
    x, w = x.requires_grad_(), w.requires_grad_()
    loss = marginloss.functional.subcenter_arcface(x, w, y, num_subcenters=k, scale=scale, margin=margin, chunk_size=chunk)
    loss.backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = subcenter_arcface_loss(xr, wr, y, num_subcenters=k, scale=scale, margin=margin)
    ref.backward()
    assert_close(loss, ref, rtol=1e-10, atol=1e-10, what="loss")
    assert_close(x.grad, xr.grad, rtol=1e-7, atol=1e-9, what="embeddings.grad")
    assert_close(w.grad, wr.grad, rtol=1e-7, atol=1e-9, what="weight.grad")


def test_outliers_and_dominant_centres_follow_the_release_rule() -> None:
    gen = torch.Generator().manual_seed(3)
    x, w, y = _problem(batch=12, classes=3, k=3, seed=3)
    x = torch.where(torch.rand(12, 1, generator=gen) < 0.3, -x, x)  # some flipped "noisy" samples
    head = marginloss.SubCenterArcFace(D, 3, num_subcenters=3, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    for angle in (math.radians(75), 1.0, 2.0):
        got = head.find_outliers(x, y, angle=angle)
        assert got.tolist() == subcenter_outliers(x, w, y, 3, angle)
    assert head.find_outliers(x, y).tolist() == subcenter_outliers(x, w, y, 3, math.radians(75))
    dominant = head.dominant_indices(x, y)
    centres = head.dominant_centers(x, y)
    assert centres.shape == (3, D) and not centres.requires_grad
    for c in range(3):
        assert torch.equal(centres[c], w[c * 3 + int(dominant[c])])
    ignored = y.clone()
    ignored[0] = -100
    assert not bool(head.find_outliers(x, ignored)[0])
    with pytest.raises(ValueError, match=r"angle must be in \[0, 3.14159\], got 4.0"):
        head.find_outliers(x, y, angle=4.0)
    with pytest.raises(ValueError, match="needs both embeddings and labels"):
        head.dominant_indices(x)
    with pytest.raises(ValueError, match=r"dominant must have shape \[3\]"):
        head.find_outliers(x, y, dominant=torch.zeros(2, dtype=torch.long))


def test_training_counts_which_subcentre_each_sample_wins() -> None:
    x, w, y = _problem(seed=4)
    head = _head(None)
    with torch.no_grad():
        head.weight.copy_(w)
    assert head.dominant_indices().tolist() == [0] * C  # nothing counted yet
    for _ in range(3):
        head(x, y)
    head.eval()
    head(x, y)  # eval mode counts nothing
    expected = torch.zeros(C, K, dtype=torch.int64)
    for i in range(B):
        sims = [float(torch.nn.functional.cosine_similarity(x[i], w[int(y[i]) * K + k], dim=0)) for k in range(K)]
        expected[int(y[i]), sims.index(max(sims))] += 3
    assert torch.equal(head.subcenter_counts, expected)
    assert torch.equal(head.dominant_indices(), expected.argmax(1))
    twin = _head()
    twin.load_state_dict(head.state_dict())
    assert torch.equal(twin.subcenter_counts, expected)
    assert set(head.state_dict()) == {"weight", "subcenter_counts"}
    # activation checkpointing counts once
    head.train()
    before = head.subcenter_counts.sum()
    xg = x.clone().requires_grad_()
    torch.utils.checkpoint.checkpoint(head, xg, y, use_reentrant=False).backward()
    assert int(head.subcenter_counts.sum() - before) == B


def test_registry_repr_and_bad_hyperparameters() -> None:
    head = marginloss.create_head("subcenter_arcface", 4, 6)
    assert isinstance(head, marginloss.SubCenterArcFace)
    assert head.num_subcenters == 3 and head.scale == 64.0 and head.margin == 0.5
    assert head.hyperparameters() == {"scale": 64.0, "margin": 0.5}
    assert "num_subcenters=3" in repr(head) and "margin=0.5" in repr(head)
    with pytest.raises(ValueError, match="num_subcenters must be a positive int"):
        marginloss.SubCenterArcFace(4, 6, num_subcenters=0)
    with pytest.raises(ValueError, match=r"margin must be in \[0, 3.14159\), got -0.1"):
        marginloss.SubCenterArcFace(4, 6, margin=-0.1)
    with pytest.raises(ValueError, match=r"scale must be in \(0, inf\], got 0.0"):
        marginloss.SubCenterArcFace(4, 6, scale=0.0)


def test_partialfc_sampling_keeps_whole_classes() -> None:
    """Under sampling the loss is the reference on the kept classes, all K rows of each."""
    x, w, y = _problem(batch=6, classes=20, seed=6)
    head = marginloss.SubCenterArcFace(D, 20, sample_rate=0.5, scale=8.0, margin=0.4, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    kept = marginloss.sharding.sample_classes(y, 20, 1, 0, 0.5, seed=0, step=0)
    loss = head(x, y)
    assert int(head.sample_step) == 1
    rows = (kept[:, None] * K + torch.arange(K)).flatten()
    remapped = torch.searchsorted(kept, y)
    ref = subcenter_arcface_loss(x, w[rows], remapped, num_subcenters=K, scale=8.0, margin=0.4)
    assert_close(loss, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, "auto"])
def test_autocast_bf16_and_fp16_are_finite(chunk) -> None:
    head = marginloss.SubCenterArcFace(5, 7, chunk_size=chunk)
    x = (torch.randn(8, 5) * 30).half().requires_grad_()
    labels = torch.randint(0, 7, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x.float(), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(head.weight.grad).all())
    head16 = marginloss.SubCenterArcFace(5, 7, chunk_size=chunk, dtype=torch.float16)
    loss16 = head16(x, labels)
    loss16.backward()
    assert torch.isfinite(loss16) and bool(torch.isfinite(head16.weight.grad).all())


@pytest.mark.parametrize("chunk", [None, 3])
def test_compile_fullgraph_matches_eager(chunk) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = marginloss.SubCenterArcFace(5, 7, scale=8.0, chunk_size=chunk)
    twin = marginloss.SubCenterArcFace(5, 7, scale=8.0, chunk_size=chunk)
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
    assert torch.equal(twin.subcenter_counts, head.subcenter_counts)


# ---------------------------------------------------------------- outside oracle

pml = pytest.importorskip("pytorch_metric_learning.losses")


@pytest.mark.parametrize("margin", [0.2, 0.5])
def test_matches_pytorch_metric_learning(margin) -> None:
    """PML's SubCenterArcFaceLoss: margin in degrees, W is [D, C*K] (our weight transposed)."""
    x, w, y = _problem(batch=10, classes=6, dim=4, k=3, seed=5)
    oracle = pml.SubCenterArcFaceLoss(
        num_classes=6, embedding_size=4, margin=math.degrees(margin), scale=16.0, sub_centers=3
    ).double()
    with torch.no_grad():
        oracle.W.copy_(w.T)
    head = marginloss.SubCenterArcFace(4, 6, num_subcenters=3, scale=16.0, margin=margin, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = oracle(xa, y)
    want.backward()
    got = head(xb, y)
    got.backward()
    assert_close(got, want, rtol=1e-6, atol=1e-8, what="loss")
    assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-8, what="embeddings.grad")
    assert_close(head.weight.grad, oracle.W.grad.T, rtol=1e-5, atol=1e-8, what="weight.grad")
    outliers, centres = oracle.get_outliers(x, y, threshold=60)
    mask = head.find_outliers(x, y, angle=math.radians(60))
    assert sorted(outliers.tolist()) == torch.nonzero(mask).flatten().tolist()
    present = sorted(set(y.tolist()))
    assert_close(head.dominant_centers(x, y)[present], centres.T[present], rtol=0, atol=0)
