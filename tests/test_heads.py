"""Heads against the per-sample float64 references, gradcheck, an outside oracle and bad input."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import marginloss
from marginloss import functional as MF
from marginloss import fused
from tests.reference import assert_close, head_loss

HEADS = ["arcface", "cosface", "combined", "normface", "sphereface", "lsoftmax"]

CLASSES = {
    "arcface": marginloss.ArcFace,
    "cosface": marginloss.CosFace,
    "combined": marginloss.CombinedMargin,
    "normface": marginloss.NormFace,
    "sphereface": marginloss.SphereFace,
    "lsoftmax": marginloss.LSoftmax,
}
FUNCTIONS = {
    "arcface": MF.arcface,
    "cosface": MF.cosface,
    "combined": MF.combined_margin,
    "normface": MF.normface,
    "sphereface": MF.sphereface,
    "lsoftmax": MF.lsoftmax,
}


def hyperparameters(draw: st.DrawFn, head: str) -> dict:
    scale = draw(st.floats(0.5, 64.0))
    if head == "arcface":
        return {"scale": scale, "margin": draw(st.floats(0.0, 3.0)), "easy_margin": draw(st.booleans())}
    if head == "cosface":
        return {"scale": scale, "margin": draw(st.floats(0.0, 1.0))}
    if head == "combined":
        return {
            "scale": scale,
            "m1": draw(st.floats(0.5, 2.0)),
            "m2": draw(st.floats(0.0, 1.0)),
            "m3": draw(st.floats(0.0, 0.5)),
        }
    if head == "normface":
        return {"scale": scale}
    return {"margin": draw(st.integers(1, 5)), "lambda_": draw(st.sampled_from([0.0, 0.5, 5.0]))}


@st.composite
def problems(draw: st.DrawFn, head: str) -> tuple:
    batch = draw(st.integers(1, 6))
    dim = draw(st.integers(2, 6))
    classes = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    regime = draw(st.sampled_from(["random", "near", "opposite"]))
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    embeddings = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    if regime != "random":
        # θ near 0 (or near π): the embedding is (minus) its class weight plus a small kick.
        sign = 1.0 if regime == "near" else -1.0
        kick = draw(st.sampled_from([1e-3, 1e-2, 0.2]))
        embeddings = sign * weight[labels] * draw(st.floats(0.5, 3.0)) + kick * embeddings
    if draw(st.booleans()) and batch > 1:
        labels[0] = -100
    hp = hyperparameters(draw, head)
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    smoothing = draw(st.sampled_from([0.0, 0.1]))
    chunk = draw(st.sampled_from([None, 1, 2, 5, "auto"]))
    # How many of the chunked engine's logit blocks forward keeps for backward: none, one, all.
    kept_blocks = draw(st.sampled_from([0, 1, classes]))
    return embeddings, weight, labels, hp, reduction, smoothing, chunk, kept_blocks


def _call(head: str, embeddings, weight, labels, hp, **kwargs):
    return FUNCTIONS[head](embeddings, weight, labels, **hp, **kwargs)


@pytest.mark.parametrize("head", HEADS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_loss_and_gradients_match_reference(head: str, data: st.DataObject) -> None:
    embeddings, weight, labels, hp, reduction, smoothing, chunk, kept_blocks = data.draw(problems(head))
    # Near θ = 0 and π the margins' gradients are ill-conditioned (d acos/dcos ~ 1/sin θ):
    # two exact float64 codes that round in a different order differ by ~1e-16/sin²θ there.
    rows = labels >= 0
    if bool(rows.any()):
        target = weight[labels[rows]]
        cos = torch.nn.functional.cosine_similarity(embeddings[rows], target, dim=1)
        assume(float((1.0 - cos.square()).min()) > 2e-8)
    x1 = embeddings.clone().requires_grad_()
    w1 = weight.clone().requires_grad_()
    width = chunk if isinstance(chunk, int) else weight.shape[0]
    previous = fused.set_backward_cache_bytes(kept_blocks * embeddings.shape[0] * width * 8)
    try:
        loss = _call(head, x1, w1, labels, hp, reduction=reduction, label_smoothing=smoothing, chunk_size=chunk)
    finally:
        fused.set_backward_cache_bytes(previous)
    x2 = embeddings.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    expected = head_loss(head, x2, w2, labels, hp, reduction, smoothing)
    assert_close(loss, expected, rtol=1e-9, atol=1e-9, what="loss")
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss * upstream).sum().backward()
    (expected * upstream).sum().backward()
    # Gradients near θ = 0 are ill-conditioned (d acos/dcos ~ 1/sin θ), in both codes alike.
    assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-7, what="embeddings.grad")
    assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-7, what="weight.grad")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck(head: str, chunk) -> None:
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 3, 6, 3])
    hp = {
        "arcface": {"scale": 4.0, "margin": 0.4},
        "cosface": {"scale": 4.0, "margin": 0.3},
        "combined": {"scale": 4.0, "m1": 1.1, "m2": 0.2, "m3": 0.1},
        "normface": {"scale": 4.0},
        "sphereface": {"margin": 3, "lambda_": 1.5},
        "lsoftmax": {"margin": 2, "lambda_": 0.5},
    }[head]

    def fn(x, w):
        return _call(head, x, w, labels, hp, reduction="none", label_smoothing=0.1, chunk_size=chunk)

    assert torch.autograd.gradcheck(fn, (embeddings, weight))


def test_arcface_fallback_region_and_easy_margin() -> None:
    # θ = 0.9π with m = 0.5 is past π - m: the fallback cos θ - m sin m applies.
    theta = torch.tensor([0.1, 0.5, 0.9 * math.pi], dtype=torch.float64)
    cos = torch.cos(theta)
    out = MF.arcface_target(cos, 0.5)
    expected = torch.stack([torch.cos(theta[0] + 0.5), torch.cos(theta[1] + 0.5), cos[2] - 0.5 * math.sin(0.5)])
    assert_close(out, expected, rtol=1e-12, atol=1e-12)
    easy = MF.arcface_target(cos, 0.5, easy_margin=True)
    assert_close(easy[2], cos[2], rtol=0, atol=0)


def test_straight_through_gradient_is_one() -> None:
    cos = torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64, requires_grad=True)
    out = MF.arcface_target(cos, 0.5, straight_through=True)
    out.sum().backward()
    assert torch.equal(cos.grad, torch.ones(3, dtype=torch.float64))
    assert_close(out, MF.arcface_target(cos.detach(), 0.5), rtol=0, atol=0)


def test_psi_is_continuous_and_monotonic() -> None:
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    for m in range(1, 6):
        values = MF.angular_psi(torch.cos(theta), m)
        assert bool((values[1:] <= values[:-1] + 1e-12).all()), m
        assert float(values[0]) == pytest.approx(1.0)
        assert float(values[-1]) == pytest.approx(-(2 * m - 1))


# ---------------------------------------------------------------- the modules


def _make(head: str, **kwargs):
    if head in ("sphereface", "lsoftmax"):
        kwargs.setdefault("lambda_base", 0.0)
        kwargs.setdefault("lambda_min", 0.0)
    return CLASSES[head](5, 7, **kwargs)


@pytest.mark.parametrize("head", HEADS)
def test_module_matches_functional_and_logits(head: str) -> None:
    module = _make(head, dtype=torch.float64, label_smoothing=0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    labels = torch.tensor([0, 1, 6, -100, 2, 2])
    loss = module(x, labels)
    from_logits = MF.margin_cross_entropy(module.logits(x, labels), labels, label_smoothing=0.1)
    assert_close(loss, from_logits, rtol=1e-10, atol=1e-12, what="forward vs logits")
    cos = module.cosine(x)
    assert cos.shape == (6, 7)
    assert bool((cos.abs() <= 1 + 1e-12).all())
    plain = module.logits(x)
    ref_radius = {
        "sphereface": x.norm(dim=1)[:, None],
        "lsoftmax": x.norm(dim=1)[:, None] * module.weight.detach().norm(dim=1)[None, :],
    }.get(head, getattr(module, "scale", 1.0))
    assert_close(plain, ref_radius * cos, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head", HEADS)
def test_module_and_functional_signatures_agree(head: str) -> None:
    module_params = inspect.signature(CLASSES[head].__init__).parameters
    function_params = inspect.signature(FUNCTIONS[head]).parameters
    # Placement and class sharding belong to the module only (see marginloss.distributed).
    module_only = ("process_group", "sample_rate", "sample_seed", "device", "dtype")
    module_kw = [n for n, p in module_params.items() if p.kind is p.KEYWORD_ONLY and n not in module_only]
    function_kw = [n for n, p in function_params.items() if p.kind is p.KEYWORD_ONLY]
    if head in ("sphereface", "lsoftmax"):
        # The module holds the annealing schedule; the function takes its current value.
        schedule = ["lambda_base", "lambda_gamma", "lambda_power", "lambda_min"]
        assert module_kw[1:5] == schedule
        module_kw = [n for n in module_kw if n not in schedule]
        function_kw = [n for n in function_kw if n != "lambda_"]
    assert module_kw == function_kw
    for name in module_kw:
        assert module_params[name].default == function_params[name].default, name


def test_annealing_counter_and_switch() -> None:
    head = marginloss.SphereFace(4, 3)
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    assert float(head.current_lambda()) == 1000.0
    head(x, y)
    head(x, y)
    assert int(head.iteration) == 2
    assert float(head.current_lambda()) == pytest.approx(max(5.0, 1000.0 / (1 + 0.12 * 2)))
    head.eval()
    head(x, y)
    assert int(head.iteration) == 2
    state = head.state_dict()
    assert "iteration" in state
    other = marginloss.SphereFace(4, 3)
    other.load_state_dict(state)
    assert int(other.iteration) == 2
    off = marginloss.LSoftmax(4, 3, lambda_base=0.0, lambda_min=0.0)
    assert float(off.current_lambda()) == 0.0


@pytest.mark.parametrize("head", HEADS)
def test_state_dict_to_dtype_and_repr(head: str) -> None:
    module = _make(head)
    clone = _make(head)
    clone.load_state_dict(module.state_dict())
    assert torch.equal(clone.weight, module.weight)
    module64 = module.to(torch.float64)
    assert module64.weight.dtype == torch.float64
    loss = module64(torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2]))
    assert loss.dtype == torch.float64
    text = repr(module)
    for field in ("embedding_dim=5", "num_classes=7", "reduction=", "label_smoothing=", "ignore_index=", "chunk_size="):
        assert field in text


@pytest.mark.parametrize("head", HEADS)
def test_inputs_not_modified(head: str) -> None:
    module = _make(head, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, -100, 3])
    x_before, labels_before, w_before = x.detach().clone(), labels.clone(), module.weight.detach().clone()
    module(x, labels).backward()
    module.logits(x, labels)
    assert torch.equal(x.detach(), x_before)
    assert torch.equal(labels, labels_before)
    assert torch.equal(module.weight.detach(), w_before)


def test_all_ignored_batch_is_zero_not_nan() -> None:
    head = marginloss.ArcFace(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    loss = head(x, torch.tensor([-100, -100]))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("chunk", [None, "auto"])
def test_autocast_bf16_and_fp16_inputs_are_finite(head: str, chunk) -> None:
    module = _make(head, chunk_size=chunk) if head not in ("arcface", "cosface") else _make(head, chunk_size=chunk, scale=64.0)
    x = (torch.randn(8, 5) * 30).half().requires_grad_()
    labels = torch.randint(0, 7, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(x.float(), labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert bool(torch.isfinite(x.grad).all())
    assert bool(torch.isfinite(module.weight.grad).all())
    module.weight.grad = None
    loss16 = module(x, labels)  # half-precision embeddings straight in
    loss16.backward()
    assert torch.isfinite(loss16) and bool(torch.isfinite(module.weight.grad).all())


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("chunk", [None, 3, "auto"])
def test_compile_fullgraph_matches_eager(head: str, chunk) -> None:
    torch._dynamo.reset()
    module = _make(head, chunk_size=chunk)
    x = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 6, 2, 2, 5])
    eager = module(x, labels)
    (gx_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with marginloss.validation(False):
        out = compiled(x, labels)
    (gx,) = torch.autograd.grad(out, x)
    assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert_close(gx, gx_eager, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- outside oracle


pml = pytest.importorskip("pytorch_metric_learning.losses")


@pytest.mark.parametrize("margin", [0.2, 0.5])
def test_arcface_matches_pytorch_metric_learning(margin: float) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 11, (16,), generator=gen)
    ours = marginloss.ArcFace(8, 11, scale=30.0, margin=margin, dtype=torch.float64)
    theirs = pml.ArcFaceLoss(11, 8, margin=math.degrees(margin), scale=30.0).to(torch.float64)
    theirs.W.data = ours.weight.detach().T.clone()  # PML stores W as [D, C]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa, labels), theirs(xb, labels)
    assert_close(a, b, rtol=1e-6, atol=1e-8, what="loss")
    a.backward()
    b.backward()
    assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-7, what="embeddings.grad")
    assert_close(ours.weight.grad, theirs.W.grad.T, rtol=1e-5, atol=1e-7, what="weight.grad")


def test_cosface_matches_pytorch_metric_learning() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 8, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 11, (16,), generator=gen)
    ours = marginloss.CosFace(8, 11, scale=30.0, margin=0.35, dtype=torch.float64)
    theirs = pml.CosFaceLoss(11, 8, margin=0.35, scale=30.0).to(torch.float64)
    theirs.W.data = ours.weight.detach().T.clone()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa, labels), theirs(xb, labels)
    assert_close(a, b, rtol=1e-9, atol=1e-10, what="loss")
    a.backward()
    b.backward()
    assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-10, what="embeddings.grad")
    assert_close(ours.weight.grad, theirs.W.grad.T, rtol=1e-8, atol=1e-10, what="weight.grad")


@pytest.mark.parametrize("head", ["sphereface", "lsoftmax"])
def test_multiplicative_margins_match_pytorch_metric_learning(head: str) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 8, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 11, (16,), generator=gen)
    ours = CLASSES[head](8, 11, margin=3, lambda_base=0.0, lambda_min=0.0, dtype=torch.float64)
    oracle = pml.SphereFaceLoss if head == "sphereface" else pml.LargeMarginSoftmaxLoss
    theirs = oracle(11, 8, margin=3, scale=1).to(torch.float64)
    theirs.W.data = ours.weight.detach().T.clone()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa, labels), theirs(xb, labels)
    assert_close(a, b, rtol=1e-8, atol=1e-10, what="loss")
    a.backward()
    b.backward()
    assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-8, what="embeddings.grad")
    assert_close(ours.weight.grad, theirs.W.grad.T, rtol=1e-6, atol=1e-8, what="weight.grad")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"margin": -0.1}, ValueError, r"margin must be in \[0, 3.14159"),
        ({"margin": math.pi}, ValueError, "margin must be in"),
        ({"scale": 0.0}, ValueError, r"scale must be in \(0, inf\]"),
        ({"scale": "64"}, TypeError, "scale must be a real number, got str"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size must be a positive int, 'auto' or None, got float"),
        ({"chunk_size": "big"}, TypeError, "chunk_size must be"),
        ({"ignore_index": 1.0}, TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        marginloss.ArcFace(4, 3, **kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (marginloss.SphereFace, {"margin": 2.5}, "margin must be a positive int"),
        (marginloss.SphereFace, {"margin": 0}, "margin must be a positive int"),
        (marginloss.LSoftmax, {"lambda_min": -1.0}, "lambda_min must be in"),
        (marginloss.CosFace, {"margin": -0.2}, "margin must be in"),
        (marginloss.CombinedMargin, {"m1": 0.0}, "m1 must be in"),
        (marginloss.CombinedMargin, {"m2": 4.0}, "m2 must be in"),
        (marginloss.NormFace, {"scale": -1.0}, "scale must be in"),
    ],
)
def test_bad_head_specific_hyperparameters(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(4, 3, **kwargs)


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="embedding_dim must be a positive int, got 0"):
        marginloss.ArcFace(0, 3)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got -2"):
        marginloss.ArcFace(4, -2)


@pytest.mark.parametrize("chunk", [None, "auto"])
@pytest.mark.parametrize(
    ("embeddings", "labels", "error", "match"),
    [
        (torch.randn(4), torch.tensor([0]), ValueError, r"embeddings must have shape \[batch, embedding_dim\], got shape \(4,\)"),
        (torch.randn(2, 5), torch.tensor([0, 1]), ValueError, r"embeddings must have shape \[batch, 4\].*got shape \(2, 5\)"),
        (torch.randint(0, 3, (2, 4)), torch.tensor([0, 1]), TypeError, "embeddings must be a floating-point tensor, got dtype torch.int64"),
        (torch.randn(2, 4), torch.tensor([0.0, 1.0]), TypeError, "labels must be an integer tensor.*got dtype torch.float32"),
        (torch.randn(2, 4), torch.tensor([0, 1, 2]), ValueError, r"labels must have shape \[2\].*got shape \(3,\)"),
        (torch.randn(2, 4), torch.tensor([0, 3]), ValueError, r"labels must be in \[0, 3\).*ignore_index=-100.*\[3\]"),
        (torch.randn(2, 4), torch.tensor([-1, 0]), ValueError, r"labels must be in \[0, 3\).*\[-1\]"),
        (torch.tensor([[0.0, float("nan"), 0, 0], [1, 1, 1, 1]]), torch.tensor([0, 1]), ValueError, "embeddings must be finite, got 1 NaN/inf"),
        ([[0.0] * 4], torch.tensor([0]), TypeError, "embeddings must be a torch.Tensor, got list"),
    ],
)
def test_bad_tensors(chunk, embeddings, labels, error, match) -> None:
    head = marginloss.ArcFace(4, 3, chunk_size=chunk)
    with pytest.raises(error, match=match):
        head(embeddings, labels)


def test_validation_switch_skips_value_checks_only() -> None:
    head = marginloss.CosFace(4, 3)
    x = torch.tensor([[float("inf"), 0.0, 0.0, 0.0]])
    with marginloss.validation(False):
        head(x, torch.tensor([0]))  # value check skipped: no error raised
        with pytest.raises(ValueError, match="embeddings must have shape"):
            head(torch.randn(1, 5), torch.tensor([0]))
    assert marginloss.validation_enabled()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        marginloss.set_validation("yes")  # type: ignore[arg-type]


def test_functional_logit_errors() -> None:
    with pytest.raises(ValueError, match=r"cosine must be a floating \[batch, num_classes\] tensor, got shape \(3,\)"):
        MF.arcface_logits(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="embedding_norms must have shape"):
        MF.sphereface_logits(torch.randn(2, 3), torch.tensor([0, 1]), torch.ones(3))
    with pytest.raises(ValueError, match="weight must be a floating"):
        MF.arcface(torch.randn(2, 3), torch.randn(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"embeddings must have shape \[batch, 4\] to match weight"):
        MF.arcface(torch.randn(2, 3), torch.randn(5, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lambda_ must be in"):
        MF.sphereface(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1]), lambda_=-1.0)
