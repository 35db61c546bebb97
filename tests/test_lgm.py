"""L-GM against the float64 per-sample reference, gradcheck, hypothesis, chunked == plain, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import marginloss
from marginloss import functional as MF
from marginloss import fused
from tests.reference import assert_close, lgm_loss

CHUNKS = [None, 1, 7, "auto"]
TOL = {"rtol": 1e-9, "atol": 1e-10}


def problem(batch: int = 9, classes: int = 13, dim: int = 5, seed: int = 0, ignored: bool = False):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    x = means[labels] + 0.8 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    log_variance = 0.4 * torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    if ignored:
        labels[::3] = -100
    return x, means, log_variance, labels


def make_head(covariance: str, means: torch.Tensor, log_variance: torch.Tensor, **kwargs) -> marginloss.LGM:
    head = marginloss.LGM(means.shape[1], means.shape[0], covariance=covariance, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        head.means.copy_(means)
        if head.log_variance is not None:
            head.log_variance.copy_(log_variance)
    return head


def reference(x, means, log_variance, labels, covariance, alpha, lambda_lkd, reduction="mean", smoothing=0.0):
    x = x.clone().requires_grad_(True)
    mu = means.clone().requires_grad_(True)
    u = log_variance.clone().requires_grad_(True) if covariance == "diagonal" else None
    rows = lgm_loss(x, mu, labels, log_variance=u, alpha=alpha, lambda_lkd=lambda_lkd, label_smoothing=smoothing)
    valid = labels != -100
    loss = rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.sum() / max(int(valid.sum()), 1)
    weights = torch.linspace(0.5, 1.5, rows.shape[0], dtype=torch.float64)
    (loss * weights).sum().backward() if reduction == "none" else loss.backward()
    def grad(t):
        return torch.zeros_like(t) if t.grad is None else t.grad

    return loss.detach(), grad(x), grad(mu), None if u is None else grad(u)


@pytest.mark.parametrize("covariance", ["identity", "diagonal"])
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("cache", [0, None])
def test_matches_reference_loss_and_gradients(covariance: str, chunk_size, cache) -> None:
    x0, means, log_variance, labels = problem(ignored=True)
    alpha, lam = 0.3, 0.2
    previous = fused.set_backward_cache_bytes(cache) if cache is not None else None
    try:
        for reduction, smoothing in (("mean", 0.0), ("sum", 0.0), ("none", 0.0), ("mean", 0.2)):
            head = make_head(covariance, means, log_variance, alpha=alpha, lambda_lkd=lam, chunk_size=chunk_size,
                             reduction=reduction, label_smoothing=smoothing)
            x = x0.clone().requires_grad_(True)
            loss = head(x, labels)
            weights = torch.linspace(0.5, 1.5, x.shape[0], dtype=torch.float64)
            (loss * weights).sum().backward() if reduction == "none" else loss.backward()
            ref_loss, gx, gm, gu = reference(x0, means, log_variance, labels, covariance, alpha, lam, reduction, smoothing)
            assert_close(loss, ref_loss, **TOL, what=f"loss {reduction}")
            assert_close(x.grad, gx, **TOL, what="embedding grad")
            assert_close(head.means.grad, gm, **TOL, what="means grad")
            if covariance == "diagonal":
                assert_close(head.log_variance.grad, gu, **TOL, what="log_variance grad")
    finally:
        if previous is not None:
            fused.set_backward_cache_bytes(previous)


def test_paper_defaults_and_repr() -> None:
    head = marginloss.LGM(4, 3)
    assert head.hyperparameters() == {"alpha": 0.1, "lambda_lkd": 0.01, "covariance": "identity"}
    assert head.log_variance is None and "alpha=0.1" in repr(head)
    assert set(head.state_dict()) == {"means"}
    assert set(marginloss.LGM(4, 3, covariance="diagonal").state_dict()) == {"means", "log_variance"}


@pytest.mark.parametrize("covariance", ["identity", "diagonal"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gradcheck(covariance: str, chunk_size) -> None:
    x, means, log_variance, labels = problem(batch=4, classes=7, dim=3, seed=1)
    labels[1] = -100
    inputs = [x.requires_grad_(True), means.requires_grad_(True)]
    if covariance == "diagonal":
        inputs.append(log_variance.requires_grad_(True))

    def f(*args):
        u = args[2] if len(args) > 2 else None
        return MF.lgm(args[0], args[1], labels, log_variance=u, alpha=0.5, lambda_lkd=0.3, label_smoothing=0.1,
                      chunk_size=chunk_size)

    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_chunked_auto_path_equals_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force "auto" onto the chunked engine (small problems take the plain path).
    x, means, log_variance, labels = problem(batch=8, classes=30, dim=4, seed=2)
    results = []
    for threshold in (1 << 30, 0):
        monkeypatch.setattr(fused, "_PLAIN_ELEMENTS", threshold)
        monkeypatch.setattr(fused, "_AUTO_BLOCK_ELEMENTS", 8 * 4)  # 4-class chunks
        monkeypatch.setattr(fused, "_MIN_AUTO_CHUNK", 1)
        xx, mu, u = (t.clone().requires_grad_(True) for t in (x, means, log_variance))
        loss = MF.lgm(xx, mu, labels, log_variance=u, chunk_size="auto")
        loss.backward()
        results.append([loss.detach(), xx.grad, mu.grad, u.grad])
    for a, b in zip(*results):
        assert_close(a, b, **TOL, what="auto chunked vs plain")


@st.composite
def problems(draw: st.DrawFn) -> tuple:
    batch = draw(st.integers(1, 6))
    classes = draw(st.integers(1, 9))
    dim = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    means = draw(st.floats(0.1, 3.0)) * torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.tensor(draw(st.lists(st.integers(-1, classes - 1), min_size=batch, max_size=batch)))
    labels = torch.where(labels < 0, torch.full_like(labels, -100), labels)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64) * draw(st.floats(0.1, 4.0))
    log_variance = torch.randn(classes, dim, generator=gen, dtype=torch.float64) * draw(st.floats(0.0, 1.0))
    return x, means, log_variance, labels


@settings(max_examples=25, deadline=None)
@given(
    data=problems(),
    alpha=st.floats(0.0, 2.0),
    lam=st.floats(0.0, 1.0),
    covariance=st.sampled_from(["identity", "diagonal"]),
    chunk_size=st.sampled_from([None, 1, 2, 5, "auto"]),
    smoothing=st.sampled_from([0.0, 0.3]),
)
def test_hypothesis_against_reference(data, alpha, lam, covariance, chunk_size, smoothing) -> None:
    x0, means, log_variance, labels = data
    head = make_head(covariance, means, log_variance, alpha=alpha, lambda_lkd=lam, chunk_size=chunk_size,
                     label_smoothing=smoothing)
    x = x0.clone().requires_grad_(True)
    loss = head(x, labels)
    loss.backward()
    ref_loss, gx, gm, gu = reference(x0, means, log_variance, labels, covariance, alpha, lam, smoothing=smoothing)
    tol = {"rtol": 1e-7, "atol": 1e-8}
    assert torch.isfinite(loss)
    assert_close(loss, ref_loss, **tol, what="loss")
    assert_close(x.grad, gx, **tol, what="embedding grad")
    assert_close(head.means.grad, gm, **tol, what="means grad")
    if gu is not None:
        assert_close(head.log_variance.grad, gu, **tol, what="log_variance grad")


@pytest.mark.parametrize("covariance", ["identity", "diagonal"])
def test_logits(covariance: str) -> None:
    x, means, log_variance, labels = problem(batch=5, classes=6, dim=3, seed=3)
    head = make_head(covariance, means, log_variance, alpha=0.4)
    u = log_variance if covariance == "diagonal" else torch.zeros_like(means)
    d = (((x[:, None, :] - means[None]) ** 2) / torch.exp(u)[None]).sum(2)  # small test only
    expected = -0.5 * d - 0.5 * u.sum(1)[None]
    assert_close(head.logits(x), expected, **TOL, what="inference logits")
    margin = expected.clone()
    rows = torch.arange(5)
    margin[rows, labels] = -0.5 * 1.4 * d[rows, labels] - 0.5 * u.sum(1)[labels]
    assert_close(head.logits(x, labels), margin, **TOL, what="training logits")
    # The training loss is the cross entropy of the training logits plus the likelihood term.
    ce = torch.nn.functional.cross_entropy(margin, labels, reduction="none")
    lkd = 0.5 * d[rows, labels] + 0.5 * u.sum(1)[labels]
    head.reduction = "none"
    assert_close(head(x, labels), ce + 0.01 * lkd, **TOL, what="loss from the logits")


def test_state_dict_round_trip() -> None:
    head = marginloss.LGM(4, 5, covariance="diagonal")
    with torch.no_grad():
        head.log_variance.normal_()
    other = marginloss.LGM(4, 5, covariance="diagonal")
    other.load_state_dict(head.state_dict())
    x, y = torch.randn(3, 4), torch.tensor([0, 4, 2])
    assert torch.equal(head(x, y), other(x, y))


def test_single_class_and_empty_batch() -> None:
    head = marginloss.LGM(3, 1, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = head(x, torch.zeros(4, dtype=torch.long))
    loss.backward()
    mu = head.means.detach()
    assert_close(loss, 0.01 * 0.5 * ((x - mu) ** 2).sum(1).mean(), **TOL, what="C = 1: only the likelihood")
    empty = head(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    assert float(empty.detach()) == 0.0


def test_autocast_bf16_finite() -> None:
    head = marginloss.LGM(8, 20, covariance="diagonal", chunk_size=6)
    x = torch.randn(6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, torch.randint(0, 20, (6,)))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_compile_fullgraph_matches_eager(chunk_size) -> None:
    torch._dynamo.reset()
    head = marginloss.LGM(4, 9, covariance="diagonal", chunk_size=chunk_size)
    x, y = torch.randn(5, 4), torch.randint(0, 9, (5,))
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, y), head(x, y), rtol=1e-5, atol=1e-6, what="compiled")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": -0.1}, "alpha must be in"),
        ({"lambda_lkd": -1.0}, "lambda_lkd must be in"),
        ({"alpha": float("nan")}, "alpha must be in"),
        ({"covariance": "full"}, "covariance must be one of"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"label_smoothing": 1.5}, "label_smoothing must be in"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
    ],
)
def test_bad_hyperparameters(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        marginloss.LGM(4, 3, **kwargs)


def test_bad_inputs() -> None:
    head = marginloss.LGM(4, 3)
    with pytest.raises(ValueError, match=r"embeddings must have shape \[batch, 4\]"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):
        head(torch.randn(2, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="embeddings must be finite"):
        head(torch.tensor([[float("nan")] * 4]), torch.tensor([0]))
    with pytest.raises(ValueError, match="means must have shape"):
        MF.lgm(torch.randn(2, 4), torch.randn(3, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="log_variance must be None or a tensor"):
        MF.lgm(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), log_variance=torch.zeros(3, 5))


def test_trains_toy_problem() -> None:
    torch.manual_seed(0)
    centres = 4.0 * torch.randn(5, 2)
    labels = torch.randint(0, 5, (60,))
    x = centres[labels] + torch.randn(60, 2)
    head = marginloss.LGM(2, 5, covariance="diagonal", chunk_size=2)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = float(head(x, labels).detach())
    for _ in range(60):
        opt.zero_grad()
        head(x, labels).backward()
        opt.step()
    assert float(head(x, labels).detach()) < 0.5 * first
    assert float((head.logits(x).argmax(1) == labels).float().mean()) > 0.8


@pytest.mark.parametrize("covariance", ["identity", "diagonal"])
def test_chunked_path_holds_one_block_of_at_most_chunk_classes(covariance: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from marginloss.heads import lgm as module

    widths: list[tuple[int, ...]] = []
    original = module._block_logits

    def spy(*args):
        out = original(*args)
        widths.append(tuple(out.shape))
        return out

    monkeypatch.setattr(module, "_block_logits", spy)
    head = marginloss.LGM(4, 23, covariance=covariance, chunk_size=5)
    x = torch.randn(6, 4, requires_grad=True)
    head(x, torch.randint(0, 23, (6,))).backward()
    # Forward and backward each walk the 23 classes in 5 blocks of at most [6, 5].
    assert widths == [(6, 5)] * 4 + [(6, 3)] + [(6, 5)] * 4 + [(6, 3)]
