"""UniFace and SphereFace2: the sigmoid-form heads with a learnable bias, against float64 loops."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import marginloss
from marginloss import functional as MF
from marginloss import fused
from tests.reference import assert_close, sphereface2_rows, uniface_rows

CHUNKS = [None, 1, 7, "auto"]

# name -> (class, functional, reference, hyperparameter sets exercised)
CASES = {
    "uniface": [dict(scale=8.0, margin=0.3), dict(scale=5.0, margin=0.0, negative_weight=0.4, bias_ratio=2.0)],
    "sphereface2": [
        dict(scale=6.0, margin=0.3),
        dict(scale=6.0, margin=0.2, lambd=0.6, t=2.0, loss_weight=1.0, straight_through=False),
        dict(scale=5.0, margin=0.5, variant="A"),
        dict(scale=5.0, margin=0.5, variant="A", t=1.5, straight_through=False),
    ],
}
PARAMS = [(name, i) for name, sets in CASES.items() for i in range(len(sets))]
CLASSES = {"uniface": marginloss.UniFace, "sphereface2": marginloss.SphereFace2}
FUNCTIONS = {"uniface": MF.uniface, "sphereface2": MF.sphereface2}
INIT_ONLY = {"uniface": ("bias_ratio",), "sphereface2": ()}


def _problem(seed: int, batch: int = 9, classes: int = 23, dim: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    y[2] = -100
    return x, w, y


def _reference(name: str, x, w, y, bias, hp: dict):
    kwargs = {k: v for k, v in hp.items() if k not in INIT_ONLY[name]}
    if name == "uniface":
        return uniface_rows(x, w, y, bias, **kwargs)
    return sphereface2_rows(x, w, y, bias, **kwargs)


def _make(name: str, classes: int = 23, dim: int = 5, **kwargs):
    return CLASSES[name](dim, classes, dtype=torch.float64, **kwargs)


@pytest.mark.parametrize(("name", "index"), PARAMS)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("keep", [True, False])
def test_loss_and_gradients_match_reference(name: str, index: int, chunk, keep: bool) -> None:
    hp = CASES[name][index]
    x, w, y = _problem(seed=index)
    head = _make(name, chunk_size=chunk, reduction="sum", **hp)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.add_(0.25)  # away from the initial value
    x = x.requires_grad_()
    previous = fused.backward_cache_bytes()
    try:
        fused.set_backward_cache_bytes(previous if keep else 0)
        loss = head(x, y)
        loss.backward()
    finally:
        fused.set_backward_cache_bytes(previous)
    xr, wr = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    br = head.bias.detach().clone().requires_grad_()
    ref = _reference(name, xr, wr, y, br, hp).sum()
    ref.backward()
    assert_close(loss, ref, rtol=1e-11, atol=1e-11, what="loss")
    assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-11, what="embeddings.grad")
    assert_close(head.weight.grad, wr.grad, rtol=1e-9, atol=1e-11, what="weight.grad")
    assert_close(head.bias.grad, br.grad, rtol=1e-9, atol=1e-11, what="bias.grad")


@pytest.mark.parametrize(("name", "index"), PARAMS)
def test_reductions_and_functional(name: str, index: int) -> None:
    hp = CASES[name][index]
    x, w, y = _problem(seed=10 + index)
    head = _make(name, reduction="none", **hp)
    with torch.no_grad():
        head.weight.copy_(w)
    rows = head(x, y)
    ref = _reference(name, x, w, y, head.bias.detach(), hp)
    assert rows.shape == (9,)
    assert_close(rows, ref, rtol=1e-11, atol=1e-11, what="rows")
    assert float(rows[2].detach()) == 0.0  # the ignored row
    head.reduction = "mean"
    assert_close(head(x, y), ref.sum() / 8, rtol=1e-11, atol=1e-12, what="mean over kept rows")
    kwargs = {k: v for k, v in hp.items() if k not in INIT_ONLY[name]}
    functional = FUNCTIONS[name](x, w, y, head.bias.detach(), **kwargs)
    assert_close(functional, ref.sum() / 8, rtol=1e-11, atol=1e-12, what="functional")


@pytest.mark.parametrize(("name", "index"), PARAMS)
def test_margin_logits_match_functional_logits(name: str, index: int) -> None:
    hp = CASES[name][index]
    x, w, y = _problem(seed=20 + index)
    head = _make(name, **hp)
    with torch.no_grad():
        head.weight.copy_(w)
    cosine = head.cosine(x)
    kwargs = {k: v for k, v in hp.items() if k not in INIT_ONLY[name] and k not in ("negative_weight", "lambd", "loss_weight")}
    logits_fn = MF.uniface_logits if name == "uniface" else MF.sphereface2_logits
    expected = logits_fn(cosine, y, head.bias.detach(), **kwargs)
    assert_close(head.logits(x, y), expected, rtol=1e-12, atol=1e-12, what="margin logits")
    plain = head.logits(x)
    assert_close(plain, hp["scale"] * cosine + head.bias.detach(), rtol=1e-12, atol=1e-12, what="inference logits")


# The straight-through rule (SphereFace2's default) is by design not the derivative of the
# loss, so gradcheck runs on the exact variants; the reference tests cover the rule.
EXACT = [(name, i) for name, i in PARAMS if not (name == "sphereface2" and CASES[name][i].get("straight_through", True))]


@pytest.mark.parametrize(("name", "index"), EXACT)
@pytest.mark.parametrize("chunk", [None, 3])
def test_gradcheck(name: str, index: int, chunk) -> None:
    hp = CASES[name][index]
    x, w, y = _problem(seed=30 + index, batch=4, classes=6, dim=3)
    y[2] = 1
    kwargs = {k: v for k, v in hp.items() if k not in INIT_ONLY[name]}
    b = torch.tensor(-0.7, dtype=torch.float64)

    def loss(x, w, b):
        return FUNCTIONS[name](x, w, y, b, chunk_size=chunk, **kwargs)

    inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_matches_reference(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(CASES)))
    batch = data.draw(st.integers(1, 6))
    classes = data.draw(st.integers(2, 12))
    dim = data.draw(st.integers(2, 5))
    chunk = data.draw(st.sampled_from([None, 1, 4, "auto"]))
    hp: dict = {"scale": data.draw(st.floats(1.0, 40.0))}
    if name == "uniface":
        hp.update(margin=data.draw(st.floats(0.0, 0.8)), negative_weight=data.draw(st.floats(0.1, 2.0)))
    else:
        variant = data.draw(st.sampled_from(["C", "A"]))
        hp.update(
            variant=variant, margin=data.draw(st.floats(0.0, 0.8)), lambd=data.draw(st.floats(0.05, 0.95)),
            t=data.draw(st.floats(1.0, 4.0)), loss_weight=data.draw(st.floats(0.5, 50.0)),
            straight_through=data.draw(st.booleans()),
        )
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    head = _make(name, classes=classes, dim=dim, chunk_size=chunk, reduction="sum", **hp)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    loss = head(x, y)
    loss.backward()
    xr, wr = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    br = head.bias.detach().clone().requires_grad_()
    ref = _reference(name, xr, wr, y, br, hp).sum()
    ref.backward()
    tol = dict(rtol=1e-8, atol=1e-9)
    assert_close(loss, ref, **tol, what="loss")
    assert_close(x.grad, xr.grad, **tol, what="embeddings.grad")
    assert_close(head.weight.grad, wr.grad, **tol, what="weight.grad")
    assert_close(head.bias.grad, br.grad, **tol, what="bias.grad")


def _sphereface2_bias_by_bisection(num_classes: int, variant: str, margin: float) -> float:
    """The zero of d/db [λ softplus(-(a_y + b)) + (1 - λ)(C - 1) softplus(a_i + b)], the expected
    loss of a sample orthogonal to every class (release defaults λ=0.7, r=40, t=3)."""
    lam, r, t = 0.7, 40.0, 3.0

    def g(cos: float) -> float:
        return 2.0 * ((cos + 1.0) / 2.0) ** t - 1.0

    a_y = r * (g(0.0) - margin) if variant == "C" else r * g(math.cos(math.pi / 2 + margin))
    a_i = r * (g(0.0) + margin) if variant == "C" else r * g(0.0)
    lo, hi = -200.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        slope = -lam / (1 + math.exp(a_y + mid)) + (1 - lam) * (num_classes - 1) / (1 + math.exp(-(a_i + mid)))
        lo, hi = (mid, hi) if slope < 0 else (lo, mid)
    return lo


def test_bias_initialisation_is_the_releases() -> None:
    # UniFace (CVI-SZU/UniFace head.py): b̃ = log(C * r * 10); our bias is -b̃.
    head = marginloss.UniFace(4, 1000, bias_ratio=2.0)
    assert math.isclose(float(head.bias.detach()), -math.log(1000 * 2.0 * 10), rel_tol=1e-6)
    # SphereFace2 (OpenSphere): solved here numerically instead of with the closed form.
    for variant, margin in (("C", 0.4), ("A", 0.5)):
        sphere = marginloss.SphereFace2(4, 500, variant=variant, margin=margin)
        expected = _sphereface2_bias_by_bisection(500, variant, margin)
        assert math.isclose(float(sphere.bias.detach()), expected, rel_tol=1e-5, abs_tol=1e-5), variant
        with torch.no_grad():
            sphere.bias.fill_(3.0)
        sphere.reset_parameters()
        assert math.isclose(float(sphere.bias.detach()), expected, rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_create_head_and_repr(name: str) -> None:
    head = marginloss.create_head(name, 5, 11, margin=0.3)
    assert type(head) is CLASSES[name]
    with torch.no_grad():
        head.bias.fill_(1.25)
    state = head.state_dict()
    assert set(state) == {"weight", "bias"}
    other = CLASSES[name](5, 11, margin=0.3)
    other.load_state_dict(state)
    x, y = torch.randn(4, 5), torch.tensor([0, 3, 10, 5])
    assert torch.equal(other(x, y), head(x, y))
    text = repr(head)
    for key, value in head.hyperparameters().items():
        assert f"{key}={value!r}" in text
    assert name in marginloss.list_heads()


@pytest.mark.parametrize("name", sorted(CASES))
def test_module_and_functional_signatures_agree(name: str) -> None:
    module_params = inspect.signature(CLASSES[name].__init__).parameters
    function_params = inspect.signature(FUNCTIONS[name]).parameters
    module_only = ("process_group", "sample_rate", "sample_seed", "device", "dtype", "label_smoothing", *INIT_ONLY[name])
    module_kw = [n for n, p in module_params.items() if p.kind is p.KEYWORD_ONLY and n not in module_only]
    function_kw = [n for n, p in function_params.items() if p.kind is p.KEYWORD_ONLY]
    assert module_kw == function_kw
    for key in module_kw:
        assert module_params[key].default == function_params[key].default, key


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("uniface", dict(margin=-0.1), "margin"),
        ("uniface", dict(margin=2.5), "margin"),
        ("uniface", dict(negative_weight=0.0), "negative_weight"),
        ("uniface", dict(bias_ratio=-1.0), "bias_ratio"),
        ("uniface", dict(scale=0.0), "scale"),
        ("uniface", dict(label_smoothing=0.1), "label_smoothing must be 0 for a sigmoid-form head"),
        ("sphereface2", dict(label_smoothing=0.1), "label_smoothing must be 0 for a sigmoid-form head"),
        ("sphereface2", dict(lambd=1.0), "lambd"),
        ("sphereface2", dict(lambd=0.0), "lambd"),
        ("sphereface2", dict(t=0.0), "t must"),
        ("sphereface2", dict(loss_weight=-1.0), "loss_weight"),
        ("sphereface2", dict(variant="M"), "variant"),
        ("sphereface2", dict(margin=2.5), "margin"),
        ("sphereface2", dict(variant="A", margin=3.5), "margin"),
        ("sphereface2", dict(scale=-1.0), "scale"),
    ],
)
def test_bad_hyperparameters(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        CLASSES[name](5, 11, **kwargs)


def test_sphereface2_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        marginloss.SphereFace2(5, 1)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk", [None, 3])
def test_autocast_bf16_and_fp16_inputs_are_finite(name: str, chunk) -> None:
    head = CLASSES[name](5, 7, chunk_size=chunk)
    x = (torch.randn(8, 5) * 30).half().requires_grad_()
    labels = torch.randint(0, 7, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x.float(), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for tensor in (x.grad, head.weight.grad, head.bias.grad):
        assert bool(torch.isfinite(tensor).all())
    head.weight.grad = None
    loss16 = head(x, labels)
    loss16.backward()
    assert torch.isfinite(loss16) and bool(torch.isfinite(head.weight.grad).all())


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk", [None, 3])
def test_compile_fullgraph_matches_eager(name: str, chunk) -> None:
    torch._dynamo.reset()
    head = CLASSES[name](5, 7, chunk_size=chunk, scale=8.0)
    x = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 6, 2, 2, 5])
    eager = head(x, labels)
    gx_eager, gb_eager = torch.autograd.grad(eager, (x, head.bias))
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    with marginloss.validation(False):
        out = compiled(x, labels)
    gx, gb = torch.autograd.grad(out, (x, head.bias))
    assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert_close(gx, gx_eager, rtol=1e-5, atol=1e-6)
    assert_close(gb, gb_eager, rtol=1e-5, atol=1e-6)


def test_sphereface2_straight_through_slope_and_adjustment() -> None:
    cos = torch.linspace(-0.9, 0.9, 7, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(MF.sphereface2_target(cos, 0.4).sum(), cos)
    assert torch.equal(slope, torch.ones_like(cos))
    (slope,) = torch.autograd.grad(MF.sphereface2_non_target(cos, 0.4, straight_through=False).sum(), cos)
    assert_close(slope, 3.0 * ((cos.detach() + 1) / 2) ** 2, rtol=1e-12, atol=1e-14, what="g'")
    assert_close(MF.sphereface2_adjust(cos.detach(), 1.0), cos.detach(), rtol=0, atol=1e-15, what="t=1 identity")


def test_learnable_bias_trains_and_uniface_margin_warmup() -> None:
    torch.manual_seed(0)
    head = marginloss.UniFace(4, 6, scale=8.0)
    warmup = marginloss.MarginWarmup(head, steps=4)
    assert head.margin == 0.0
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    start = float(head.bias.detach())
    for _ in range(5):
        loss = head(torch.randn(8, 4), torch.randint(0, 6, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
    assert float(head.bias.detach()) != start
    assert head.margin == 0.4


@pytest.mark.parametrize("name", sorted(CASES))
def test_half_precision_weights_are_finite(name: str) -> None:
    head = CLASSES[name](5, 9, chunk_size=4, dtype=torch.float16)
    x = torch.randn(6, 5, requires_grad=True)
    loss = head(x, torch.randint(0, 9, (6,)))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for tensor in (x.grad, head.weight.grad, head.bias.grad):
        assert bool(torch.isfinite(tensor).all())


@pytest.mark.parametrize(("name", "index"), [("uniface", 1), ("sphereface2", 1)])
def test_several_optimizer_steps_agree_across_paths(name: str, index: int) -> None:
    """Training moves the bias; plain and chunked (recomputed blocks) paths stay together."""
    hp = CASES[name][index]
    x, w, y = _problem(seed=40 + index)
    heads = [_make(name, chunk_size=chunk, **hp) for chunk in (None, 2)]
    optimizers = []
    for head in heads:
        with torch.no_grad():
            head.weight.copy_(w)
        optimizers.append(torch.optim.SGD(head.parameters(), lr=0.5))
    previous = fused.backward_cache_bytes()
    try:
        fused.set_backward_cache_bytes(0)
        for _ in range(4):
            for head, optimizer in zip(heads, optimizers):
                optimizer.zero_grad()
                head(x, y).backward()
                optimizer.step()
    finally:
        fused.set_backward_cache_bytes(previous)
    assert float(heads[0].bias.detach()) != float(_make(name, **hp).bias.detach())
    assert_close(heads[1].bias, heads[0].bias, rtol=1e-10, atol=1e-12, what="bias after 4 steps")
    assert_close(heads[1].weight, heads[0].weight, rtol=1e-10, atol=1e-12, what="weight after 4 steps")
