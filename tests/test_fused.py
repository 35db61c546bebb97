"""The chunked engine against the plain autograd path and the float64 references."""

from __future__ import annotations

import math

import pytest
import torch

import marginloss
from marginloss import functional as MF
from marginloss import fused
from tests.reference import arcface_slope, assert_close, combined_margin_slope, sphereface_slope

HEADS = {
    "arcface": (MF.arcface, {"scale": 64.0, "margin": 0.5}),
    "arcface_easy": (MF.arcface, {"scale": 30.0, "margin": 0.5, "easy_margin": True}),
    "cosface": (MF.cosface, {"scale": 64.0, "margin": 0.35}),
    "combined": (MF.combined_margin, {"scale": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2}),
    "normface": (MF.normface, {"scale": 16.0}),
    "sphereface": (MF.sphereface, {"margin": 4, "lambda_": 5.0}),
    "lsoftmax": (MF.lsoftmax, {"margin": 4, "lambda_": 0.0}),
}


def _problem(batch: int, classes: int, dim: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=dtype)
    w = torch.randn(classes, dim, generator=gen, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    labels[::7] = -100
    return x, w, labels


def _loss_and_grads(fn, hp, x, w, labels, **kwargs):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = fn(x, w, labels, **hp, **kwargs)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("batch", "classes"), [(37, 1013), (64, 256)])
def test_fused_equals_plain_fp32(head, reduction, smoothing, batch, classes) -> None:
    """fp32 engine vs fp32 plain autograd, both judged against the float64 reference.

    The loss agrees to 1e-6 relative.  For gradients at s = 64 the plain fp32 path is itself
    ~2e-6 (relative to the largest entry) away from float64; the engine keeps its row
    statistics in float64 and must be at least as close, up to 1e-6.
    """
    fn, hp = HEADS[head]
    x, w, labels = _problem(batch, classes, 24, torch.float32)
    kwargs = {"reduction": reduction, "label_smoothing": smoothing}
    reference = _loss_and_grads(fn, hp, x.double(), w.double(), labels, chunk_size=None, **kwargs)
    plain = _loss_and_grads(fn, hp, x, w, labels, chunk_size=None, **kwargs)
    for chunk in (97, "auto"):
        chunked = _loss_and_grads(fn, hp, x, w, labels, chunk_size=chunk, **kwargs)
        assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-7, what=f"loss chunk={chunk}")
        for name, got, eager, ref in zip(("embeddings.grad", "weight.grad"), chunked[1:], plain[1:], reference[1:]):
            scale = float(ref.abs().max()) or 1.0
            engine_err = float((got.double() - ref).abs().max()) / scale
            eager_err = float((eager.double() - ref).abs().max()) / scale
            assert engine_err <= eager_err + 1e-6, (name, chunk, engine_err, eager_err)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_fused_gradcheck_float64(head) -> None:
    fn, hp = HEADS[head]
    hp = dict(hp)
    if "scale" in hp:
        hp["scale"] = 3.0
    x, w, labels = _problem(5, 11, 4, torch.float64, seed=2)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: fn(a, b, labels, **hp, reduction="none", label_smoothing=0.05, chunk_size=3), (x, w)
    )


@pytest.mark.parametrize("head", ["arcface", "combined", "sphereface"])
def test_target_derivatives_match_autograd(head) -> None:
    cos = torch.linspace(-0.999, 0.999, 301, dtype=torch.float64, requires_grad=True)
    pairs = {
        "arcface": [
            (
                lambda c, m=m, e=e: MF.arcface_target(c, m, easy_margin=e),
                lambda c, m=m, e=e: arcface_slope(c, m, e),
            )
            for m in (0.1, 0.5, 2.0)
            for e in (False, True)
        ],
        "combined": [
            (lambda c: MF.combined_margin_target(c, 1.3, 0.2, 0.1), lambda c: combined_margin_slope(c, 1.3, 0.2))
        ],
        "sphereface": [
            (
                lambda c, m=m, lam=lam: MF.sphereface_target(c, m, lam),
                lambda c, m=m, lam=lam: sphereface_slope(c, m, lam),
            )
            for m in (1, 2, 3, 4, 5)
            for lam in (0.0, 2.0)
        ],
    }[head]
    for value_fn, slope_fn in pairs:
        (expected,) = torch.autograd.grad(value_fn(cos).sum(), cos)
        assert_close(slope_fn(cos.detach()), expected, rtol=1e-10, atol=1e-10)


def test_target_fn_without_derivative_uses_autograd() -> None:
    x, w, labels = _problem(9, 31, 6, torch.float64)

    def target(cos):
        return torch.cos(torch.acos(cos.clamp(-1 + 1e-9, 1 - 1e-9)) + 0.3)

    plain = _loss_and_grads(fused.margin_softmax_loss, {"target_fn": target, "scale": 8.0}, x, w, labels, chunk_size=None)
    chunked = _loss_and_grads(fused.margin_softmax_loss, {"target_fn": target, "scale": 8.0}, x, w, labels, chunk_size=4)
    for a, b in zip(chunked, plain):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_retain_graph_and_only_weight_or_only_embeddings() -> None:
    x, w, labels = _problem(8, 50, 6, torch.float64)
    w.requires_grad_()
    loss = MF.arcface(x, w, labels, chunk_size=7)  # embeddings need no gradient
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    loss.backward()
    assert_close(w.grad, 2 * first, rtol=1e-12, atol=0)
    x.requires_grad_()
    frozen = w.detach()
    MF.cosface(x, frozen, labels, chunk_size=7).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _saved_by_forward(batch: int, classes: int, dim: int, chunk: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    x, w, labels = _problem(batch, classes, dim, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        MF.arcface(x, w, labels, chunk_size=chunk)
    return saved, x, w


def test_without_cache_saves_only_inputs_and_row_vectors() -> None:
    """Besides the inputs, backward keeps O(B) row statistics and the O(C) 1/‖w‖, no [B, C]."""
    batch, classes, dim = 16, 4096, 8
    previous = fused.set_backward_cache_bytes(0)
    try:
        saved, x, w = _saved_by_forward(batch, classes, dim, 256)
    finally:
        fused.set_backward_cache_bytes(previous)
    largest_other = max((t.numel() for t in saved if t.data_ptr() != w.data_ptr()), default=0)
    assert largest_other <= max(batch * dim, classes), [tuple(t.shape) for t in saved]
    assert all(t.dim() <= 1 for t in saved if t.data_ptr() not in (w.data_ptr(), x.data_ptr()))


@pytest.mark.parametrize("budget_blocks", [1, 3])
def test_cache_is_bounded_by_its_budget_and_flat_in_classes(budget_blocks) -> None:
    """Kept softmax blocks never exceed the byte budget, whatever the number of classes."""
    batch, dim, chunk = 16, 8, 256
    block_bytes = batch * chunk * 4
    previous = fused.set_backward_cache_bytes(budget_blocks * block_bytes + block_bytes // 2)
    try:
        kept_bytes = []
        for classes in (chunk * budget_blocks + 7, 4096, 20_000):
            saved, x, w = _saved_by_forward(batch, classes, dim, chunk)
            big = [t for t in saved if t.dim() == 3]
            assert len(big) <= 1
            other = [t for t in saved if t.dim() < 3 and t.data_ptr() not in (w.data_ptr(), x.data_ptr())]
            assert all(t.numel() <= max(batch * dim, classes, budget_blocks * batch) for t in other)
            kept_bytes.append(sum(t.numel() * t.element_size() for t in big))
    finally:
        fused.set_backward_cache_bytes(previous)
    assert kept_bytes == [budget_blocks * block_bytes] * 3


def test_cache_is_skipped_without_gradients(monkeypatch) -> None:
    seen = []
    original = fused.rest_logsumexp

    def spy(*args, **kwargs):
        seen.append(args[6] if len(args) > 6 else kwargs.get("blocks"))
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "rest_logsumexp", spy)
    x, w, labels = _problem(8, 300, 4, torch.float32)
    MF.arcface(x, w, labels, chunk_size=64)
    with torch.no_grad():
        MF.arcface(x, w.requires_grad_(), labels, chunk_size=64)
    assert seen == [None, None]
    MF.arcface(x, w, labels, chunk_size=64)
    assert seen[-1] is not None and seen[-1].shape == (4, 8, 64)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_kept_blocks_give_the_recomputed_gradients(head, smoothing) -> None:
    """Backward from forward's kept logit blocks equals backward that recomputes every chunk."""
    fn, hp = HEADS[head]
    x, w, labels = _problem(37, 1013, 24, torch.float32, seed=3)
    previous = fused.set_backward_cache_bytes(0)
    try:
        recomputed = _loss_and_grads(fn, hp, x, w, labels, chunk_size=97, label_smoothing=smoothing)
    finally:
        fused.set_backward_cache_bytes(previous)
    fused.set_backward_cache_bytes(37 * 97 * 4 * 5)  # half of the chunks kept
    try:
        kept = _loss_and_grads(fn, hp, x, w, labels, chunk_size=97, label_smoothing=smoothing)
    finally:
        fused.set_backward_cache_bytes(previous)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)  # kept logits are the recomputed ones: bit for bit


def test_set_backward_cache_bytes_validates() -> None:
    with pytest.raises(ValueError, match="max_bytes must be a non-negative int, got -1"):
        fused.set_backward_cache_bytes(-1)
    with pytest.raises(TypeError, match=r"max_bytes must be a non-negative int, got float 1\.5"):
        fused.set_backward_cache_bytes(1.5)  # type: ignore[arg-type]
    assert fused.backward_cache_bytes() == 64 << 20


def test_subnormal_probabilities_are_flushed_not_propagated() -> None:
    # Trained-like L-Softmax features: huge norms make most softmax probabilities underflow.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(512, 16, generator=gen)
    labels = torch.randint(0, 512, (32,), generator=gen)
    x = w[labels] * 8 + 0.5 * torch.randn(32, 16, generator=gen)
    plain = _loss_and_grads(MF.lsoftmax, {"margin": 2}, x, w, labels, chunk_size=None)
    chunked = _loss_and_grads(MF.lsoftmax, {"margin": 2}, x, w, labels, chunk_size=64)
    reference = _loss_and_grads(MF.lsoftmax, {"margin": 2}, x.double(), w.double(), labels, chunk_size=None)
    tiny = torch.finfo(torch.float32).tiny
    for got, ref in zip(chunked, reference):
        assert bool(torch.isfinite(got).all())
        assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    for got in chunked[1:]:
        nonzero = got[got != 0].abs()
        assert bool((nonzero >= tiny).all()) or nonzero.numel() == 0 or float(nonzero.min()) > 0
    assert plain[0].isfinite()


@pytest.mark.parametrize("head", ["arcface", "cosface", "sphereface"])
def test_bf16_autocast_error_is_no_worse_than_eager(head) -> None:
    fn, hp = HEADS[head]
    x, w, labels = _problem(37, 1013, 64, torch.float32, seed=5)
    reference = _loss_and_grads(fn, hp, x.double(), w.double(), labels, chunk_size=None)
    results = {}
    for chunk in (None, 128):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[chunk] = _loss_and_grads(fn, hp, x, w, labels, chunk_size=chunk)
    for i, name in enumerate(("loss", "embeddings.grad", "weight.grad")):
        ref = reference[i]
        eager_err = float((results[None][i].double() - ref).abs().max())
        engine_err = float((results[128][i].double() - ref).abs().max())
        tol = 1e-3 * float(ref.abs().max())
        # Both round the GEMM operands to bf16; the engine's rounding points differ (it folds
        # 1/‖w‖ and s into the operands), so allow up to twice the eager error.
        assert engine_err <= 2 * eager_err + tol, (name, engine_err, eager_err)
        assert results[128][i].dtype in (torch.float32,)


def test_chunk_forward_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 32, generator=gen)
    labels = torch.tensor([0, 31, 40, 5, 7, 33, 1, 2])
    local, inside = fused._chunk_targets(labels, 36, 32)
    compiled = torch.compile(fused._chunk_forward, fullgraph=True, backend="aot_eager")
    eager = fused._chunk_forward(logits.clone(), local[0], inside[0], True)
    got = compiled(logits.clone(), local[0], inside[0], True)
    for a, b in zip(got, eager):
        assert_close(a, b, rtol=1e-6, atol=1e-6)
    # The backward's per-chunk work, from kept logits into a work buffer.
    hi, lo, grad_sum = torch.full((8,), 3.0), torch.full((8,), -0.5), torch.full((8,), 0.01)
    compiled_grad = torch.compile(fused._chunk_grad_logits, fullgraph=True, backend="aot_eager")
    eager_grad = fused._chunk_grad_logits(logits, local[0], inside[0], hi, lo, grad_sum, torch.empty(8, 32))
    got_grad = compiled_grad(logits, local[0], inside[0], hi, lo, grad_sum, torch.empty(8, 32))
    assert_close(got_grad, eager_grad, rtol=1e-6, atol=1e-6)
    assert float(eager_grad[0, 0]) == 0.0 and float(eager_grad[1, 31]) == 0.0  # target columns


def test_default_chunk_size_bounds() -> None:
    assert fused.default_chunk_size(1, 10) == 10
    assert fused.default_chunk_size(4096, 10**6) == 256
    assert fused.default_chunk_size(256, 10**5) == 4096
    assert fused.default_chunk_size(256, 10**5, torch.device("cpu")) == 4096
    # Accelerators: 64 MiB blocks (no device is touched; only its type is read).
    assert fused.default_chunk_size(256, 10**6, "cuda") == 65536
    assert fused.default_chunk_size(256, 10**6, torch.device("cuda", 3)) == 65536
    assert fused.default_chunk_size(2**20, 10**6, "cuda") == 256


def test_ignored_rows_do_not_touch_out_of_range_labels() -> None:
    x, w, labels = _problem(6, 9, 4, torch.float64)
    labels[:] = torch.tensor([0, -100, 8, -100, 3, 3])
    out = MF.arcface(x, w, labels, reduction="none", chunk_size=2)
    assert out[1] == 0 and out[3] == 0
    ref = MF.arcface(x, w, labels, reduction="none", chunk_size=None)
    assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype) -> None:
    x, w, labels = _problem(37, 1013, 64, torch.float32, seed=9)
    cpu = _loss_and_grads(MF.arcface, {"scale": 64.0}, x, w, labels, chunk_size=None)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        gpu = _loss_and_grads(MF.arcface, {"scale": 64.0}, x.cuda(), w.cuda(), labels.cuda(), chunk_size=128)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(gpu, cpu):
        assert_close(a.cpu(), b, rtol=tol, atol=tol * float(b.abs().max()))


def test_margin_softmax_loss_validates_like_heads() -> None:
    x, w, labels = _problem(3, 5, 4, torch.float32)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int, 'auto' or None, got -3"):
        fused.margin_softmax_loss(x, w, labels, lambda c: c, chunk_size=-3)
    with pytest.raises(ValueError, match="labels must be in"):
        fused.margin_softmax_loss(x, w, torch.tensor([0, 5, 1]), lambda c: c)
    assert math.isfinite(float(marginloss.ArcFace(4, 5)(x, labels.clamp_min(0))))


def _near_target_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 embeddings 1e-4 to 1e-3 rad from their class weight (a well-trained model)."""
    gen = torch.Generator().manual_seed(0)
    batch, classes, dim = 16, 50, 32
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    w_hat = w[labels] / w[labels].norm(dim=1, keepdim=True)
    ortho = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    ortho -= (ortho * w_hat).sum(1, keepdim=True) * w_hat
    ortho /= ortho.norm(dim=1, keepdim=True)
    theta = torch.logspace(-4, -3, batch, dtype=torch.float64)[:, None]
    x = 3.0 * (torch.cos(theta) * w_hat + torch.sin(theta) * ortho)
    return x.float(), w.float(), labels


@pytest.mark.parametrize("path", ["plain", "chunked", "chunked-recomputed", "sharded"])
def test_arcface_gradient_near_zero_angle_is_accurate_in_fp32(path) -> None:
    """sin θ from an fp32-rounded cos θ ≈ 1 - 5e-9 is pure rounding; the target path runs in
    float64, so the fp32 gradient matches float64 math on the same fp32 inputs."""
    from marginloss import distributed as MD

    x, w, labels = _near_target_problem()

    def run(x, w, chunk):
        if path == "sharded":
            return _loss_and_grads(
                MD.sharded_margin_softmax_loss,
                {"target_fn": lambda c: MF.arcface_target(c, 0.5), "num_classes": w.shape[0], "scale": 64.0},
                x, w, labels, chunk_size=chunk,
            )
        return _loss_and_grads(MF.arcface, {"scale": 64.0, "margin": 0.5}, x, w, labels, chunk_size=chunk)

    reference = run(x.double(), w.double(), None)
    chunk = None if path == "plain" else 7
    previous = fused.backward_cache_bytes()
    fused.set_backward_cache_bytes(0 if path == "chunked-recomputed" else previous)
    try:
        got = run(x, w, chunk)
    finally:
        fused.set_backward_cache_bytes(previous)
    for name, a, ref in zip(("loss", "embeddings.grad", "weight.grad"), got, reference):
        err = float((a.double() - ref).abs().max()) / float(ref.abs().max())
        assert err < 2e-5, (name, err)  # it was 0.5 (plain) and 1e2 (chunked) with fp32 sin θ


def test_transposed_and_half_precision_weights() -> None:
    """A [D, C] parameter passed as ``P.T`` (non-contiguous rows) and a float16 weight beside
    float32 embeddings take the engine's copy paths; both match plain autograd."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 300, (8,), generator=gen)
    param = torch.randn(16, 300, generator=gen, dtype=torch.float64)
    for weight_of, tol in ((lambda p: p.T, 1e-10), (lambda p: p.T.contiguous().half(), 2e-3)):
        grads = {}
        for chunk in (None, 64):
            p = param.clone().requires_grad_()
            xx = x.clone().to(torch.float32 if weight_of(param).dtype == torch.float16 else torch.float64)
            xx.requires_grad_()
            MF.arcface(xx, weight_of(p), labels, scale=30.0, chunk_size=chunk).backward()
            grads[chunk] = (xx.grad, p.grad)
        for got, ref in zip(grads[64], grads[None]):
            # float16 weight gradients: one float16 rounding apart at most.
            assert_close(got.double(), ref.double(), rtol=tol, atol=tol * float(ref.abs().max()))


def test_two_calls_before_one_backward() -> None:
    """Each call keeps its own blocks: two forwards, then one backward, equal two steps."""
    x, w, labels = _problem(12, 200, 6, torch.float64)
    head = marginloss.ArcFace(6, 200, chunk_size=32, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    first, second = x.clone().requires_grad_(), (x.flip(0) * 0.5).requires_grad_()
    (head(first, labels) + 2.0 * head(second, labels.flip(0))).backward()
    together = (first.grad, second.grad, head.weight.grad.clone())
    head.weight.grad = None
    first2, second2 = x.clone().requires_grad_(), (x.flip(0) * 0.5).requires_grad_()
    head(first2, labels).backward()
    (2.0 * head(second2, labels.flip(0))).backward()
    for a, b in zip(together, (first2.grad, second2.grad, head.weight.grad)):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 3, "auto"])
def test_tensor_captured_by_target_fn_gets_its_gradient(chunk) -> None:
    """0.1's chunked engine differentiated only fresh leaves: a learnable margin captured by
    ``target_fn`` got a gradient with ``chunk_size=None`` and none with the default."""
    x, w, labels = _problem(7, 29, 5, torch.float64, seed=9)
    margin = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    loss = fused.margin_softmax_loss(x, w, labels, lambda cos: cos - margin, scale=10.0, chunk_size=chunk)
    (grad,) = torch.autograd.grad(loss, margin)
    reference = fused.margin_softmax_loss(x, w, labels, lambda cos: cos - margin, scale=10.0, chunk_size=None)
    (expected,) = torch.autograd.grad(reference, margin)
    assert float(grad) != 0.0
    assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_softplus_is_exact_beyond_torchs_threshold() -> None:
    """torch's softplus returns z itself above 20 (an error of e^-20 ~ 2e-9 that float64 sees,
    and a gradient of 1 instead of sigma(z)); the sigmoid-form heads use the exact one."""
    z = torch.tensor([-40.0, -5.0, 0.0, 19.0, 21.0, 25.0, 30.0, 40.0], dtype=torch.float64, requires_grad=True)
    values = fused.softplus(z)
    (grad,) = torch.autograd.grad(values.sum(), z)
    exact = [math.log1p(math.exp(v)) if v < 30 else v + math.log1p(math.exp(-v)) for v in z.tolist()]
    assert_close(values, torch.tensor(exact, dtype=torch.float64), rtol=1e-15, atol=0)
    assert_close(grad, torch.sigmoid(z.detach()), rtol=1e-15, atol=0)
    assert float((torch.nn.functional.softplus(z[4:5]) - values[4:5]).abs()) > 1e-10  # what it fixes


# ---------------------------------------------------------------- the general chunk path


def _general_configs() -> dict[str, dict]:
    """One engine call per feature of the general chunk path (margin_loss keyword arguments)."""

    def hard(cos, context):
        return torch.where(cos > context.cos_target[:, None] - 0.5, cos * (0.2 + cos), cos)

    return {
        "subcenters+smoothing": {"num_subcenters": 3, "scale": 8.0, "label_smoothing": 0.1},
        "closed-form transform": {
            "scale": 6.0, "non_target": lambda cos, context: cos * (0.3 + cos),
            "non_target_grad": lambda cos, context: 0.3 + 2.0 * cos,
        },
        "autograd transform+subcenters": {"scale": 5.0, "non_target": hard, "num_subcenters": 2},
        "sigmoid+bias+transform": {
            "scale": 4.0, "loss_form": "sigmoid", "bias": torch.tensor(-1.5, dtype=torch.float64, requires_grad=True),
            "non_target": lambda cos, context: cos + 0.1, "non_target_grad": lambda cos, context: torch.ones_like(cos),
        },
        "learnable scale+subcenters": {
            "scale": torch.tensor(7.0, dtype=torch.float64, requires_grad=True), "num_subcenters": 2,
        },
        "unnormalised+bias": {
            "scale": 1.0, "normalize_embeddings": False, "normalize_weight": False, "num_subcenters": 2,
            "bias": torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
        },
    }


def _general_step(name: str, chunk) -> list[torch.Tensor]:
    """Loss and every gradient of one general-path configuration at ``chunk_size=chunk``."""
    kwargs = _general_configs()[name]
    x, w, labels = _problem(37, 101 * kwargs.get("num_subcenters", 1), 6, torch.float64, seed=4)
    labels = labels.clamp_max(100).masked_fill(labels == -100, -100)
    x, w = x.requires_grad_(), w.requires_grad_()
    loss = fused.margin_loss(
        x, w, labels, lambda cos, context: marginloss.functional.arcface_target(cos, 0.3),
        chunk_size=chunk, reduction="sum", **kwargs,
    )
    leaves = [x, w] + [kwargs[key] for key in ("scale", "bias") if isinstance(kwargs.get(key), torch.Tensor)]
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("name", sorted(_general_configs()))
@pytest.mark.parametrize("tile_elements", [37 * 5, 1 << 18])
def test_general_path_tiles_match_plain_autograd(name, tile_elements, monkeypatch) -> None:
    """The general path, whole chunks or uneven column tiles (13 = 5 + 5 + 3), with and
    without kept blocks, equals plain autograd over the full logits."""
    reference = _general_step(name, None)
    monkeypatch.setattr(fused, "_TILE_ELEMENTS", tile_elements)
    previous = fused.set_backward_cache_bytes(37 * 13 * 3 * 8 * 4)  # some chunks kept
    try:
        kept = _general_step(name, 13)
        fused.set_backward_cache_bytes(0)
        recomputed = _general_step(name, 13)
    finally:
        fused.set_backward_cache_bytes(previous)
    for got, again, want, what in zip(kept, recomputed, reference, ("loss", "x", "w", "scale or bias", "bias")):
        assert torch.equal(got, again), what  # kept blocks are the recomputed ones, bit for bit
        assert_close(got, want, rtol=1e-10, atol=1e-12, what=f"{name}: {what}")
