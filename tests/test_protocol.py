"""The public head protocol: user-defined heads on MarginHead, the engine's hooks, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import marginloss
from marginloss import fused
from tests.reference import assert_close, generic_head_loss

# ---------------------------------------------------------------- user-defined heads


class LearnedCosFace(marginloss.MarginHead):
    """The guide's example: CosFace with a learnable margin."""

    def __init__(self, embedding_dim: int, num_classes: int, **kwargs) -> None:
        super().__init__(embedding_dim, num_classes, scale=kwargs.pop("scale", 8.0), **kwargs)
        self.margin = nn.Parameter(torch.tensor(0.3, dtype=kwargs.get("dtype")))

    def target(self, cos, context):
        return cos - self.margin


class SubCenterHead(marginloss.MarginHead):
    def __init__(self, embedding_dim: int, num_classes: int, **kwargs) -> None:
        super().__init__(embedding_dim, num_classes, scale=6.0, num_subcenters=3, **kwargs)

    def target(self, cos, context):
        return marginloss.functional.arcface_target(cos, 0.4)


class HardNegativeHead(marginloss.MarginHead):
    """CurricularFace-shaped: non-target cosines above the target's margin cosine are
    modulated by t (a buffer advanced in prepare)."""

    def __init__(self, embedding_dim: int, num_classes: int, **kwargs) -> None:
        super().__init__(embedding_dim, num_classes, scale=5.0, **kwargs)
        self.register_buffer("t", torch.tensor(0.2, dtype=torch.float64))

    def prepare(self, context):
        if context.update_state:
            self.t.mul_(0.9).add_(0.1 * context.cos_target.mean())

    def target(self, cos, context):
        return marginloss.functional.arcface_target(cos, 0.3)

    def non_target(self, cos, context):
        threshold = marginloss.functional.arcface_target(context.cos_target, 0.3)[:, None]
        return torch.where(cos > threshold, cos * (self.t.to(cos.dtype) + cos), cos)


class SigmoidHead(marginloss.MarginHead):
    loss_form = "sigmoid"

    def __init__(self, embedding_dim: int, num_classes: int, **kwargs) -> None:
        super().__init__(embedding_dim, num_classes, scale=4.0, **kwargs)
        self.bias = nn.Parameter(torch.tensor(-1.5, dtype=kwargs.get("dtype")))

    def target(self, cos, context):
        return cos - 0.2


def _problem(batch=9, classes=23, dim=5, seed=0, rows_per_class=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(classes * rows_per_class, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return x, w, y


CHUNKS = [None, 1, 7, "auto"]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kept", [0, 1 << 20])
def test_learnable_margin_gets_its_gradient_on_every_path(chunk, kept) -> None:
    """The 0.1 chunked engine differentiated only fresh leaves: a tensor the target captured
    got no gradient with the default chunk_size (this test fails on 0.1)."""
    x, w, y = _problem()
    head = LearnedCosFace(5, 23, chunk_size=chunk, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    previous = fused.set_backward_cache_bytes(kept)
    try:
        loss = head(x, y)
        loss.backward()
    finally:
        fused.set_backward_cache_bytes(previous)
    xr, wr = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    mr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    ref = generic_head_loss(xr, wr, y, scale=8.0, target=lambda c, i: c - mr).mean()
    ref.backward()
    assert_close(loss, ref, rtol=1e-12, atol=1e-12, what="loss")
    assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12, what="embeddings.grad")
    assert_close(head.weight.grad, wr.grad, rtol=1e-10, atol=1e-12, what="weight.grad")
    assert head.margin.grad is not None
    assert_close(head.margin.grad, mr.grad, rtol=1e-10, atol=1e-12, what="margin.grad")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_subcenters_take_the_max_over_each_class(chunk) -> None:
    x, w, y = _problem(rows_per_class=3, seed=1)
    head = SubCenterHead(5, 23, chunk_size=chunk, dtype=torch.float64)
    assert head.weight.shape == (69, 5)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    loss = head(x, y)
    loss.backward()
    xr, wr = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    target = lambda c, i: marginloss.functional.arcface_target(c, 0.4)  # noqa: E731
    ref = generic_head_loss(xr, wr, y, scale=6.0, target=target, num_subcenters=3).mean()
    ref.backward()
    assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    assert_close(head.weight.grad, wr.grad, rtol=1e-10, atol=1e-12)
    assert head.cosine(x).shape == (9, 23) and head.logits(x).shape == (9, 23)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_non_target_transform_with_state_advanced_in_prepare(chunk) -> None:
    x, w, y = _problem(seed=2)
    x = x + 1.5 * w[y]  # some hard negatives above the target's margin cosine
    head = HardNegativeHead(5, 23, chunk_size=chunk, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    loss = head(x, y)
    loss.backward()
    cos_y = torch.stack([torch.dot(x[i], w[y[i]]) / (x[i].norm() * w[y[i]].norm()) for i in range(9)]).detach()
    t = 0.9 * 0.2 + 0.1 * cos_y.mean()
    assert_close(head.t, t, rtol=1e-12, atol=1e-14, what="t advanced once")
    threshold = marginloss.functional.arcface_target(cos_y, 0.3)

    def non_target(c, i):
        return torch.where(c > threshold[i], c * (t + c), c)

    xr, wr = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    target = lambda c, i: marginloss.functional.arcface_target(c, 0.3)  # noqa: E731
    ref = generic_head_loss(xr, wr, y, scale=5.0, target=target, non_target=non_target).mean()
    ref.backward()
    assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    assert_close(head.weight.grad, wr.grad, rtol=1e-10, atol=1e-12)
    head.eval()
    head(x, y)
    assert_close(head.t, t, rtol=1e-12, atol=1e-14, what="no advance in eval mode")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_sigmoid_form_with_learnable_bias(chunk) -> None:
    x, w, y = _problem(seed=3)
    head = SigmoidHead(5, 23, chunk_size=chunk, reduction="sum", dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    x = x.requires_grad_()
    loss = head(x, y)
    loss.backward()
    xr, wr = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    ref = generic_head_loss(xr, wr, y, scale=4.0, target=lambda c, i: c - 0.2, form="sigmoid", bias=b).sum()
    ref.backward()
    assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    assert_close(head.weight.grad, wr.grad, rtol=1e-10, atol=1e-12)
    assert_close(head.bias.grad, b.grad, rtol=1e-10, atol=1e-12, what="bias.grad")
    with pytest.raises(ValueError, match="label_smoothing must be 0 for a sigmoid-form head"):
        SigmoidHead(5, 23, label_smoothing=0.1)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_learnable_scale_tensor(chunk) -> None:
    x, w, y = _problem(seed=4)
    x, w = x.requires_grad_(), w.requires_grad_()
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    loss = fused.margin_loss(x, w, y, lambda c, ctx: c - 0.25, scale=s, chunk_size=chunk)
    loss.backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    sr = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    ref = generic_head_loss(xr, wr, y, scale=sr, target=lambda c, i: c - 0.25).mean()
    ref.backward()
    for got, want in ((loss, ref), (x.grad, xr.grad), (w.grad, wr.grad), (s.grad, sr.grad)):
        assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head", ["arcface", "sphereface", "subcenter"])
@pytest.mark.parametrize("chunk", [3, "auto", None])
def test_double_backward_is_exact(head, chunk) -> None:
    """A gradient penalty through the default engine (0.1 returned a gradient without grad_fn)."""
    x, w, y = _problem(batch=4, classes=7, dim=3, seed=5, rows_per_class=3 if head == "subcenter" else 1)
    x, w = x.requires_grad_(), w.requires_grad_()
    if head == "subcenter":
        module = SubCenterHead(3, 7, chunk_size=chunk, dtype=torch.float64)
        module.eval()

        def loss_fn(a, b):
            return torch.func.functional_call(module, {"weight": b}, (a, y))
    elif head == "sphereface":
        def loss_fn(a, b):
            return marginloss.functional.sphereface(a, b, y, margin=2, lambda_=1.0, chunk_size=chunk)
    else:
        def loss_fn(a, b):
            return marginloss.functional.arcface(a, b, y, scale=4.0, margin=0.3, chunk_size=chunk)
    (gx,) = torch.autograd.grad(loss_fn(x, w), x, create_graph=True)
    assert gx.grad_fn is not None
    assert torch.autograd.gradgradcheck(loss_fn, (x, w))


# ---------------------------------------------------------------- registry and contract


def test_registry_builds_every_head() -> None:
    names = marginloss.list_heads()
    assert {"arcface", "cosface", "combined_margin", "normface", "sphereface", "lsoftmax"} <= set(names)
    for name in names:
        head = marginloss.create_head(name, 4, 6)
        assert isinstance(head, marginloss.MarginHead)
        loss = head(torch.randn(3, 4), torch.tensor([0, 5, 2]))
        assert loss.shape == () and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"name must be one of \[.*'arcface'.*\], got 'arc'"):
        marginloss.create_head("arc", 4, 6)
    with pytest.raises(ValueError, match="name must be a non-empty lower-case str"):
        marginloss.register_head("ArcFace")
    with pytest.raises(ValueError, match="a head is already registered as 'arcface'"):
        marginloss.register_head("arcface")(LearnedCosFace)
    with pytest.raises(TypeError, match="decorates MarginHead subclasses"):
        marginloss.register_head("not_a_head")(nn.Linear)  # type: ignore[type-var]


def test_user_head_state_dict_repr_and_logits() -> None:
    head = LearnedCosFace(4, 6, dtype=torch.float64)
    assert set(head.state_dict()) == {"weight", "margin"}
    twin = LearnedCosFace(4, 6, dtype=torch.float64)
    twin.load_state_dict(head.state_dict())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 5])
    assert_close(twin(x, y), head(x, y), rtol=0, atol=0)
    assert "scale=8.0" in repr(head) and "embedding_dim=4" in repr(head)
    logits = head.logits(x, y)
    loss = marginloss.functional.margin_cross_entropy(logits, y)
    assert_close(loss, head(x, y), rtol=1e-12, atol=1e-12)
    assert_close(head.logits(x), 8.0 * head.cosine(x), rtol=1e-12, atol=1e-12)


def test_base_head_is_normface() -> None:
    x, w, y = _problem(seed=6)
    base = marginloss.MarginHead(5, 23, scale=16.0, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(w)
    assert_close(base(x, y), marginloss.functional.normface(x, w, y), rtol=1e-12, atol=1e-12)


def test_target_of_the_wrong_shape_is_a_clear_error() -> None:
    class Broken(marginloss.MarginHead):
        def target(self, cos, context):
            return cos[:1]

    with pytest.raises(ValueError, match=r"target must return a tensor of shape \(3,\)"):
        Broken(4, 6)(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_auto_picks_plain_for_small_problems_with_the_same_results() -> None:
    assert fused.plain_path_elements() == 1 << 18
    x, w, y = _problem(batch=16, classes=50, dim=8, seed=7)
    results = {}
    for chunk in ("auto", None, 16):
        xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = marginloss.functional.arcface(xc, wc, y, scale=16.0, chunk_size=chunk)
        loss.backward()
        results[chunk] = (loss, xc.grad, wc.grad)
    for other in (None, 16):
        for a, b in zip(results["auto"], results[other]):
            assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_activation_checkpointing_advances_state_once() -> None:
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    plain_head, ckpt_head = marginloss.SphereFace(4, 3), marginloss.SphereFace(4, 3)
    ckpt_head.load_state_dict(plain_head.state_dict())
    sampled = marginloss.ArcFace(4, 3, sample_rate=0.5)
    base = torch.randn(6, 4)
    for use_reentrant in (False, True):
        x_ref = base.clone().requires_grad_()
        reference = plain_head(x_ref, y)
        reference.backward()
        x = base.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(ckpt_head, x, y, use_reentrant=use_reentrant)
        out.backward()
        assert int(ckpt_head.iteration) == int(plain_head.iteration)
        assert_close(out, reference, rtol=1e-6, atol=1e-6)
        assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
        before = int(sampled.sample_step)
        torch.utils.checkpoint.checkpoint(sampled, base.clone().requires_grad_(), y, use_reentrant=use_reentrant).backward()
        assert int(sampled.sample_step) == before + 1
    assert int(plain_head.iteration) == 2


def test_meta_device_head_infers_shapes() -> None:
    head = marginloss.ArcFace(16, 1000, device="meta")
    loss = head(torch.randn(8, 16, device="meta"), torch.zeros(8, dtype=torch.long, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    assert head.logits(torch.randn(8, 16, device="meta")).shape == (8, 1000)


def test_ignore_index_beyond_int64_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64"):
        marginloss.ArcFace(4, 3, ignore_index=2**70)
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64"):
        marginloss.functional.arcface(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), ignore_index=2**70)


def test_sphereface_margin_is_bounded() -> None:
    with pytest.raises(ValueError, match=r"margin must be a positive int .* of at most 8, got 100000"):
        marginloss.SphereFace(4, 3, margin=10**5)
    with pytest.raises(ValueError, match="of at most 8"):
        marginloss.functional.lsoftmax(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), margin=10**9)
