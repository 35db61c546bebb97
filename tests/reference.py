"""Plain, obviously-correct float64 references for the classification heads.

Written straight from the papers' formulas, one sample at a time, with ``acos``/``cos`` where
the papers use angles.  Nothing here calls marginloss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def arcface_margin(theta: Tensor, margin: float, easy_margin: bool = False) -> Tensor:
    if easy_margin:
        return torch.cos(theta + margin) if torch.cos(theta) > 0 else torch.cos(theta)
    if theta + margin <= math.pi:
        return torch.cos(theta + margin)
    return torch.cos(theta) - margin * math.sin(margin)


def psi(theta: Tensor, m: int) -> Tensor:
    k = min(math.floor(float(theta.detach()) * m / math.pi), m - 1)
    return (-1) ** k * torch.cos(m * theta) - 2 * k


def target_cosine(head: str, theta: Tensor, hp: dict) -> Tensor:
    """f(θ) of each head, from the angle."""
    if head == "arcface":
        return arcface_margin(theta, hp["margin"], hp.get("easy_margin", False))
    if head == "cosface":
        return torch.cos(theta) - hp["margin"]
    if head == "combined":
        return torch.cos(hp["m1"] * theta + hp["m2"]) - hp["m3"]
    if head == "normface":
        return torch.cos(theta)
    if head in ("sphereface", "lsoftmax"):
        lam = hp.get("lambda_", 0.0)
        return (lam * torch.cos(theta) + psi(theta, hp["margin"])) / (1 + lam)
    raise ValueError(head)


def head_logits_row(head: str, x: Tensor, weight: Tensor, label: int, hp: dict) -> Tensor:
    """Logits of one sample: radius_j * cos θ_j, with the target column through f."""
    logits = []
    for j in range(weight.shape[0]):
        w = weight[j]
        cos = torch.dot(x, w) / (x.norm() * w.norm())
        if head in ("arcface", "cosface", "combined", "normface"):
            radius = hp["scale"]
        elif head == "sphereface":
            radius = x.norm()
        else:  # lsoftmax
            radius = x.norm() * w.norm()
        if j == label:
            theta = torch.acos(cos.clamp(-1.0, 1.0))
            logits.append(radius * target_cosine(head, theta, hp))
        else:
            logits.append(radius * cos)
    return torch.stack(logits)


def head_loss(
    head: str,
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    hp: dict,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Cross entropy of the head's logits, one sample at a time (torch's smoothing rule)."""
    losses = []
    kept = 0
    for i in range(embeddings.shape[0]):
        label = int(labels[i])
        if label == ignore_index:
            losses.append(embeddings.sum() * 0.0)
            continue
        kept += 1
        logits = head_logits_row(head, embeddings[i], weight, label, hp)
        log_p = logits - torch.logsumexp(logits, dim=0)
        num_classes = weight.shape[0]
        loss = -(1 - label_smoothing) * log_p[label] - label_smoothing / num_classes * log_p.sum()
        losses.append(loss)
    stacked = torch.stack(losses)
    if reduction == "none":
        return stacked
    if reduction == "sum":
        return stacked.sum()
    return stacked.sum() / max(kept, 1)


def plain_arcface_loss(
    embeddings: Tensor, weight: Tensor, labels: Tensor, scale: float = 64.0, margin: float = 0.5
) -> Tensor:
    """The usual vectorised PyTorch ArcFace (normalize, linear, acos/cos on the target, CE).

    The baseline the benchmarks compare with: what a user would write by hand.
    """
    cosine = torch.nn.functional.linear(
        torch.nn.functional.normalize(embeddings), torch.nn.functional.normalize(weight)
    )
    target = cosine.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(target)
    shifted = torch.where(
        theta + margin <= math.pi, torch.cos(theta + margin), target - margin * math.sin(margin)
    )
    logits = cosine.scatter(1, labels[:, None], shifted) * scale
    return torch.nn.functional.cross_entropy(logits, labels)


def describe_difference(actual: Tensor, expected: Tensor) -> str:
    """Where two tensors differ: max abs/rel error, its index, NaN/inf counts."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    if diff.numel() == 0:
        return "empty"
    flat = int(torch.nan_to_num(diff, nan=math.inf).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    rel = diff / expected.abs().clamp_min(1e-300)
    return (
        f"max abs err {float(diff.max()):.3e} at {index} (actual {float(actual.flatten()[flat]):.10g}, "
        f"expected {float(expected.flatten()[flat]):.10g}), max rel err {float(rel.max()):.3e}, "
        f"NaN {int(actual.isnan().sum())}/{int(expected.isnan().sum())}, "
        f"inf {int(actual.isinf().sum())}/{int(expected.isinf().sum())}"
    )


def assert_close(actual: Tensor, expected: Tensor, *, rtol: float, atol: float, what: str = "") -> None:
    ok = torch.allclose(actual.detach().double(), expected.detach().double(), rtol=rtol, atol=atol)
    assert ok, f"{what}: {describe_difference(actual, expected)}"


# ---------------------------------------------------------------- derivatives d f / d cos θ
# Written from the angle form: d/dcos h(θ) = -h'(θ) / sin θ with θ = acos(cos).


def arcface_slope(cos: Tensor, margin: float, easy_margin: bool) -> Tensor:
    theta = torch.acos(cos)
    shifted = torch.sin(theta + margin) / torch.sin(theta)
    keep = cos > 0 if easy_margin else theta + margin <= math.pi
    return torch.where(keep, shifted, torch.ones_like(cos))


def combined_margin_slope(cos: Tensor, m1: float, m2: float) -> Tensor:
    theta = torch.acos(cos)
    return m1 * torch.sin(m1 * theta + m2) / torch.sin(theta)


def sphereface_slope(cos: Tensor, m: int, lambda_: float) -> Tensor:
    theta = torch.acos(cos)
    k = torch.clamp(torch.floor(theta * m / math.pi), max=m - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    psi_slope = sign * m * torch.sin(m * theta) / torch.sin(theta)
    return (lambda_ + psi_slope) / (1.0 + lambda_)


# ---------------------------------------------------------------- heads written on MarginHead


def generic_head_loss(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float | Tensor,
    target,
    non_target=None,
    num_subcenters: int = 1,
    form: str = "softmax",
    bias: float | Tensor = 0.0,
) -> Tensor:
    """Row losses of a normalised head, one sample and one class at a time.

    ``target(cos, i)`` and ``non_target(cos, i)`` see the (scalar) class cosine and the row;
    a class's cosine is the max over its ``num_subcenters`` rows.
    """
    rows = []
    classes = weight.shape[0] // num_subcenters
    for i in range(x.shape[0]):
        y = int(labels[i])
        logits = []
        for j in range(classes):
            cosines = [
                torch.dot(x[i], weight[j * num_subcenters + k]) / (x[i].norm() * weight[j * num_subcenters + k].norm())
                for k in range(num_subcenters)
            ]
            cos = torch.stack(cosines).max()
            if j == y:
                logits.append(scale * target(cos, i) + bias)
            else:
                logits.append(scale * (non_target(cos, i) if non_target is not None else cos) + bias)
        z = torch.stack(logits)
        if form == "softmax":
            rows.append(torch.logsumexp(z, dim=0) - z[y])
        else:
            rest = sum(torch.nn.functional.softplus(z[j]) for j in range(classes) if j != y)
            rows.append(torch.nn.functional.softplus(-z[y]) + rest)
    return torch.stack(rows)


# ---------------------------------------------------------------- UniFace and SphereFace2 (sigmoid form)


def uniface_rows(
    x: Tensor, weight: Tensor, labels: Tensor, bias: Tensor, *, scale: float, margin: float,
    negative_weight: float = 1.0, ignore_index: int = -100,
) -> Tensor:
    """Zhou et al. (ICCV 2023), marginal UCE, one sample and one class at a time:
    log(1 + exp(-(s(cos θ_y - m) - b̃))) + λ Σ_j log(1 + exp(s cos θ_j - b̃)), with b̃ = -bias."""
    threshold = -bias
    rows = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y == ignore_index:
            rows.append(x.sum() * 0.0)
            continue
        total = x.new_zeros(())
        for j in range(weight.shape[0]):
            cos = torch.dot(x[i], weight[j]) / (x[i].norm() * weight[j].norm())
            if j == y:
                total = total + torch.log1p(torch.exp(-(scale * (cos - margin) - threshold)))
            else:
                total = total + negative_weight * torch.log1p(torch.exp(scale * cos - threshold))
        rows.append(total)
    return torch.stack(rows)


def sphereface2_rows(
    x: Tensor, weight: Tensor, labels: Tensor, bias: Tensor, *, scale: float = 40.0, margin: float = 0.4,
    lambd: float = 0.7, t: float = 3.0, loss_weight: float = 50.0, variant: str = "C",
    straight_through: bool = True, ignore_index: int = -100,
) -> Tensor:
    """Wen et al. (ICLR 2022), Eq. 5 with g(c) = 2((c+1)/2)^t - 1, times the release's loss weight.

    Variant C: target g(cos θ) - m, others g(cos θ) + m; variant A: target g(cos(min(θ + m, π))),
    others g(cos θ).  ``straight_through``: the adjustment carries no gradient (the release
    computes it under no_grad), so d logit / d cos = r.
    """

    def g(c: Tensor) -> Tensor:
        return 2.0 * ((c + 1.0) / 2.0) ** t - 1.0

    rows = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y == ignore_index:
            rows.append(x.sum() * 0.0)
            continue
        total = x.new_zeros(())
        for j in range(weight.shape[0]):
            cos = torch.dot(x[i], weight[j]) / (x[i].norm() * weight[j].norm())
            if j == y:
                if variant == "C":
                    adjusted = g(cos) - margin
                else:
                    theta = torch.acos(cos.clamp(-1.0, 1.0))
                    adjusted = g(torch.cos(torch.clamp(theta + margin, max=math.pi)))
            else:
                adjusted = g(cos) + (margin if variant == "C" else 0.0)
            if straight_through:
                adjusted = cos + (adjusted - cos).detach()
            logit = scale * adjusted + bias
            if j == y:
                total = total + lambd / scale * torch.log1p(torch.exp(-logit))
            else:
                total = total + (1.0 - lambd) / scale * torch.log1p(torch.exp(logit))
        rows.append(loss_weight * total)
    return torch.stack(rows)
