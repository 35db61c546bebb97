"""The paths ``chunk_size="auto"`` takes on small problems agree with the chunked engine.

``"auto"`` runs a small problem entirely in float64 from one GEMM (``wide``: a closed-form
Function for the plain margin softmax, plain autograd for the other configurations), a
mid-sized one as one closed-form ``[B, C·K]`` block (``block``; plain autograd, ``plain``,
where the block does not apply), and a large one chunked.  Each forced path must give the
chunked engine's loss, gradients and state updates, for every registered head, and be as
differentiable (gradcheck, double backward, ``torch.compile``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import marginloss
from marginloss import fused
from tests.reference import assert_close

PATHS = ("wide", "block", "plain")


@pytest.fixture
def force_path(monkeypatch: pytest.MonkeyPatch):
    """Make ``chunk_size="auto"`` take one small-problem path on the test's shapes."""

    def force(path: str) -> None:
        monkeypatch.setattr(fused, "_WIDE_MACS", 1 << 40 if path == "wide" else 0)
        monkeypatch.setattr(fused, "_PLAIN_ELEMENTS", 1 << 40 if path in ("block", "plain") else 0)
        if path == "plain":
            # The plain path is what "auto" takes for configurations the block does not cover.
            monkeypatch.setattr(fused, "_block_covers", lambda *args: False)

    return force


def _problem(dtype: torch.dtype, seed: int = 0, batch: int = 9, classes: int = 7, dim: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=dtype) * 3.0
    labels = torch.randint(0, classes, (batch,), generator=gen)
    labels[::4] = -100
    return x, labels


def _two_steps(head: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, reduction: str):
    """Loss and gradients of the second of two training steps (state advanced once)."""
    head.train()
    head.reduction = reduction
    head(x, labels)
    xg = x.clone().requires_grad_()
    loss = head(xg, labels)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    params = [p for p in head.parameters() if p.requires_grad]
    grads = torch.autograd.grad((loss * upstream).sum(), [xg, *params], allow_unused=True)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    return loss.detach(), grads, state


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", marginloss.list_heads())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_head_on_each_small_path_equals_the_chunked_engine(force_path, path, name, reduction) -> None:
    x, labels = _problem(torch.float64)
    torch.manual_seed(0)
    chunked = marginloss.create_head(name, 6, 7, dtype=torch.float64, chunk_size=3)
    small = copy.deepcopy(chunked)
    small.chunk_size = "auto"
    expected = _two_steps(chunked, x, labels, reduction)
    force_path(path)
    got = _two_steps(small, x, labels, reduction)
    assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12, what=f"{name} {path} loss")
    for index, (a, b) in enumerate(zip(got[1], expected[1])):
        assert (a is None) == (b is None), (name, path, index)
        if a is not None:
            assert_close(a, b, rtol=1e-9, atol=1e-11, what=f"{name} {path} gradient {index}")
    assert got[2].keys() == expected[2].keys()
    for key in got[2]:
        assert_close(got[2][key].double(), expected[2][key].double(), rtol=1e-10, atol=1e-12, what=f"{name} {path} {key}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface", "lsoftmax", "magface", "normface"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_float32_small_paths_match_the_chunked_engine(force_path, path, name, smoothing) -> None:
    x, labels = _problem(torch.float32, seed=1, batch=33, classes=29, dim=12)
    chunked = marginloss.create_head(name, 12, 29, chunk_size=5, label_smoothing=smoothing)
    chunked.eval()
    small = copy.deepcopy(chunked)
    small.chunk_size = "auto"
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = chunked(xa, labels)
    want.backward()
    force_path(path)
    got = small(xb, labels)
    got.backward()
    assert_close(got, want, rtol=2e-6, atol=1e-6, what=f"{name} {path} loss")
    # float32 rounding at s = 64, relative to the largest entry (as plain eager code has it)
    for what, a, b in (("embeddings", xb.grad, xa.grad), ("weight", small.weight.grad, chunked.weight.grad)):
        assert_close(a, b, rtol=0.0, atol=2e-5 * float(b.abs().max()), what=f"{name} {path} {what}.grad")


@pytest.mark.parametrize("path", ["wide", "block"])
@pytest.mark.parametrize(
    "name", ["arcface", "sphereface", "lsoftmax", "magface", "subcenter_arcface", "uniface", "curricularface"]
)
def test_closed_form_small_paths_pass_gradcheck(force_path, path, name) -> None:
    force_path(path)
    head = marginloss.create_head(name, 5, 4, dtype=torch.float64, label_smoothing=0.1 if name == "arcface" else 0.0)
    head.eval()
    x, labels = _problem(torch.float64, seed=2, batch=5, classes=4, dim=5)
    x.requires_grad_()
    weight = head.weight

    def functional(embeddings: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(head, {"weight": w}, (embeddings, labels))

    assert torch.autograd.gradcheck(functional, (x, weight.detach().clone().requires_grad_()))


@pytest.mark.parametrize("path", ["wide", "block"])
def test_double_backward_on_the_small_paths_equals_plain_autograd(force_path, path) -> None:
    x, labels = _problem(torch.float64, seed=3)
    plain = marginloss.ArcFace(6, 7, chunk_size=None, dtype=torch.float64)
    small = copy.deepcopy(plain)
    small.chunk_size = "auto"

    def penalty(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        xg = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(head(xg, labels), xg, create_graph=True)
        (gw,) = torch.autograd.grad(gx.square().sum(), head.weight)
        return gx.detach(), gw

    expected = penalty(plain)
    force_path(path)
    got = penalty(small)
    assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12, what="first derivative")
    assert_close(got[1], expected[1], rtol=1e-8, atol=1e-10, what="second derivative")


@pytest.mark.parametrize("path", ["wide", "block"])
@pytest.mark.parametrize("name", ["arcface", "sphereface", "cosface"])
def test_compile_fullgraph_matches_eager_on_the_small_paths(force_path, path, name) -> None:
    torch._dynamo.reset()
    force_path(path)
    head = marginloss.create_head(name, 6, 7)
    head.eval()
    x, labels = _problem(torch.float32, seed=4)
    x.requires_grad_()
    eager = head(x, labels)
    (gx_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    with marginloss.validation(False):
        out = compiled(x, labels)
    (gx,) = torch.autograd.grad(out, x)
    assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert_close(gx, gx_eager, rtol=1e-5, atol=1e-6)


def test_auto_picks_the_documented_path_by_size() -> None:
    """float64 from one GEMM up to _WIDE_MACS multiply-adds, one block up to
    plain_path_elements() logits, chunked above (spied on the engines' Functions)."""
    calls: list[str] = []
    originals = {name: getattr(fused, name) for name in ("_DenseEngine", "_BlockEngine", "_MarginEngine")}

    class Spy:
        def __init__(self, name: str) -> None:
            self.name = name

        def apply(self, *args):
            calls.append(self.name)
            return originals[self.name].apply(*args)

    try:
        for name in originals:
            setattr(fused, name, Spy(name))
        for batch, classes, dim, expected in [
            (32, 10, 128, "_DenseEngine"),
            (32, 1000, 128, "_BlockEngine"),
            (256, 2000, 8, "_MarginEngine"),
        ]:
            calls.clear()
            marginloss.ArcFace(dim, classes)(torch.randn(batch, dim), torch.randint(0, classes, (batch,)))
            assert calls == [expected], (batch, classes, dim, calls)
    finally:
        for name, value in originals.items():
            setattr(fused, name, value)


@pytest.mark.parametrize("path", ["wide", "block"])
def test_backward_twice_with_retain_graph_gives_the_same_gradients(force_path, path) -> None:
    force_path(path)
    head = marginloss.ArcFace(6, 7, dtype=torch.float64)
    x, labels = _problem(torch.float64, seed=5)
    x.requires_grad_()
    loss = head(x, labels)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, second)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_empty_batch_gives_a_zero_loss_on_the_default_path(reduction) -> None:
    head = marginloss.ArcFace(6, 7, reduction=reduction)
    x = torch.zeros(0, 6, requires_grad=True)
    loss = head(x, torch.zeros(0, dtype=torch.int64))
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert float(loss) == 0.0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", ["softmax", "sigmoid"])
@pytest.mark.parametrize("subcenters", [1, 2])
def test_learnable_scale_bias_and_transform_on_each_small_path(force_path, path, form, subcenters) -> None:
    """The engine's general configuration (learnable scale and bias, a non-target transform,
    sub-centres, both loss forms) on every small path equals the chunked engine."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(7 * subcenters, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 6, 3, -100, 1, 2, 5, 4])

    def run(chunk_size):
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
        loss = fused.margin_loss(
            xg, wg, labels, lambda cos, ctx: cos - 0.3, non_target=lambda cos, ctx: cos * (0.2 + cos),
            scale=scale, bias=bias, num_subcenters=subcenters, loss_form=form, chunk_size=chunk_size,
            label_smoothing=0.1 if form == "softmax" else 0.0,
        )
        return (loss, *torch.autograd.grad(loss, (xg, wg, scale, bias)))

    expected = run(3)
    force_path(path)
    got = run("auto")
    for what, a, b in zip(("loss", "x", "weight", "scale", "bias"), got, expected):
        assert_close(a, b, rtol=1e-9, atol=1e-11, what=f"{path} {form} K={subcenters} {what}")
