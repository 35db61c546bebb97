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


# ---------------------------------------------------------------- L-GM and UniformFace (issue 14)


def lgm_loss(
    x: Tensor,
    means: Tensor,
    labels: Tensor,
    *,
    log_variance: Tensor | None = None,
    alpha: float,
    lambda_lkd: float,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Row losses of L-GM (Wan et al., CVPR 2018), one sample and one class at a time.

    d_k = (x - mu_k)^T diag(sigma_k^2)^{-1} (x - mu_k);  z_k = -(1 + alpha [k = y]) d_k / 2
    - log|Lambda_k| / 2;  row = -log softmax(z)_y + lambda (d_y / 2 + log|Lambda_y| / 2).
    Ignored rows are 0.
    """
    rows = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y == ignore_index:
            rows.append(x.sum() * 0.0)
            continue
        z = []
        d_y = logdet_y = None
        for k in range(means.shape[0]):
            variance = torch.ones_like(means[k]) if log_variance is None else torch.exp(log_variance[k])
            d = sum((x[i, c] - means[k, c]) ** 2 / variance[c] for c in range(x.shape[1]))
            logdet = torch.log(variance).sum()
            margin = 1.0 + alpha if k == y else 1.0
            z.append(-0.5 * margin * d - 0.5 * logdet)
            if k == y:
                d_y, logdet_y = d, logdet
        log_p = torch.stack(z) - torch.logsumexp(torch.stack(z), dim=0)
        smoothed = -(1 - label_smoothing) * log_p[y] - label_smoothing / means.shape[0] * log_p.sum()
        rows.append(smoothed + lambda_lkd * (0.5 * d_y + 0.5 * logdet_y))
    return torch.stack(rows)


def uniformface_reference(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    centers: Tensor,
    *,
    margin: int,
    lambda_: float,
    uniform_weight: float,
    center_lr: float,
    pairs: str,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    """UniformFace (Duan et al., CVPR 2019): A-Softmax row losses, the uniform loss at the
    centres after this batch's update, and those centres; loops over samples and pairs.

    Update: c_j <- c_j - a * sum_{i: y_i = j} (c_j - x_i/|x_i|) / (1 + n_j).
    L_u = 1 / (n (n-1)) sum_{j != k} 1 / (|c_j/|c_j| - c_k/|c_k|| + 1) over all classes
    (``pairs="all"``) or the batch's classes (``"batch"``).
    """
    rows = head_loss("sphereface", x, weight, labels, {"margin": margin, "lambda_": lambda_}, reduction="none",
                     ignore_index=ignore_index)
    new = [centers[j] for j in range(centers.shape[0])]
    seen = sorted({int(v) for v in labels if int(v) != ignore_index})
    for j in seen:
        members = [i for i in range(x.shape[0]) if int(labels[i]) == j]
        delta = sum(centers[j] - x[i] / x[i].norm() for i in members) / (1 + len(members))
        new[j] = centers[j] - center_lr * delta
    chosen = list(range(centers.shape[0])) if pairs == "all" else seen
    total = x.sum() * 0.0
    for j in chosen:
        for k in chosen:
            if j != k:
                cj, ck = new[j] / new[j].norm(), new[k] / new[k].norm()
                total = total + 1.0 / ((cj - ck).norm() + 1.0)
    n = len(chosen)
    uniform = total / (n * (n - 1)) if n >= 2 else total
    return rows, uniform_weight * uniform, torch.stack(new)
# ---------------------------------------------------------------- issue 13: SubCenterArcFace, CurricularFace, ElasticFace
# Written from the papers, one sample and one class at a time, with acos/cos on the angles.


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a, b) / (a.norm() * b.norm())


def _softmax_row(logits: list[Tensor], label: int, label_smoothing: float) -> Tensor:
    z = torch.stack(logits)
    log_p = z - torch.logsumexp(z, dim=0)
    return -(1 - label_smoothing) * log_p[label] - label_smoothing / z.shape[0] * log_p.sum()
# ---------------------------------------------------------------- AdaFace, MagFace, AdaCos
# From the papers (and, where the papers leave it open, the releases' documented clamps),
# one sample and one class at a time.


def _cosine(x: Tensor, w: Tensor) -> Tensor:
    return torch.dot(x, w) / (x.norm() * w.norm())


def _smoothed_ce(logits: Tensor, label: int, label_smoothing: float) -> Tensor:
    log_p = logits - torch.logsumexp(logits, dim=0)
    num_classes = logits.shape[0]
    return -(1 - label_smoothing) * log_p[label] - label_smoothing / num_classes * log_p.sum()


def _reduce(rows: list[Tensor], kept: int, reduction: str) -> Tensor:
    stacked = torch.stack(rows)
    if reduction == "none":
        return stacked
    if reduction == "sum":
        return stacked.sum()
    return stacked.sum() / max(kept, 1)


def subcenter_arcface_loss(
    x: Tensor, weight: Tensor, labels: Tensor, *, num_subcenters: int, scale: float, margin: float,
    reduction: str = "mean", label_smoothing: float = 0.0, ignore_index: int = -100,
) -> Tensor:
    """Deng et al. 2020, eq. (2): class cosine = max over the K sub-centres (rows c*K+k),
    ArcFace's cos(θ+m) on the target (with the release's monotonic fallback)."""
    classes = weight.shape[0] // num_subcenters
    rows, kept = [], 0
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y == ignore_index:
            rows.append(x.sum() * 0.0 + weight.sum() * 0.0)
            continue
        kept += 1
        logits = []
        for j in range(classes):
            cos = torch.stack([_cosine(x[i], weight[j * num_subcenters + k]) for k in range(num_subcenters)]).max()
            if j == y:
                theta = torch.acos(cos.clamp(-1.0, 1.0))
                logits.append(scale * arcface_margin(theta, margin))
            else:
                logits.append(scale * cos)
        rows.append(_softmax_row(logits, y, label_smoothing))
    return _reduce(rows, kept, reduction)


def subcenter_outliers(x: Tensor, weight: Tensor, labels: Tensor, num_subcenters: int, angle: float) -> list[bool]:
    """drop.py's rule: the dominant sub-centre of a class is the one most of its samples are
    nearest to (ties: the first); a sample farther than ``angle`` from it is an outlier."""
    classes = weight.shape[0] // num_subcenters
    votes = [[0] * num_subcenters for _ in range(classes)]
    for i in range(x.shape[0]):
        y = int(labels[i])
        sims = [float(_cosine(x[i], weight[y * num_subcenters + k])) for k in range(num_subcenters)]
        votes[y][sims.index(max(sims))] += 1
    dominant = [v.index(max(v)) for v in votes]
    out = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        theta = math.acos(max(-1.0, min(1.0, float(_cosine(x[i], weight[y * num_subcenters + dominant[y]])))))
        out.append(theta > angle)
    return out


def curricularface_loss(
    x: Tensor, weight: Tensor, labels: Tensor, *, scale: float, margin: float, t: float,
    reduction: str = "mean", label_smoothing: float = 0.0, ignore_index: int = -100,
) -> Tensor:
    """Huang et al. 2020, eqs. (7)-(8): target cos(θ_y+m) (ArcFace's fallback past π); a
    non-target cosine above cos(θ_y+m) becomes cos θ_j (t + cos θ_j)."""
    rows, kept = [], 0
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y == ignore_index:
            rows.append(x.sum() * 0.0 + weight.sum() * 0.0)
            continue
        kept += 1
        theta_y = torch.acos(_cosine(x[i], weight[y]).clamp(-1.0, 1.0))
        threshold = float(torch.cos(theta_y.detach() + margin))
        logits = []
        for j in range(weight.shape[0]):
            cos = _cosine(x[i], weight[j])
            if j == y:
                logits.append(scale * arcface_margin(theta_y, margin))
            elif float(cos.detach()) > threshold:
                logits.append(scale * cos * (t + cos))
            else:
                logits.append(scale * cos)
        rows.append(_softmax_row(logits, y, label_smoothing))
    return _reduce(rows, kept, reduction)


def elasticface_loss(
    x: Tensor, weight: Tensor, labels: Tensor, *, scale: float, margins: list[float], kind: str,
    reduction: str = "mean", label_smoothing: float = 0.0, ignore_index: int = -100,
) -> Tensor:
    """Boutros et al. 2022, eqs. (4)-(5): row i's target is cos(θ_y + m_i) (arc, no fallback)
    or cos θ_y - m_i (cos) with its own margin m_i."""
    rows, kept = [], 0
    for i in range(x.shape[0]):
        y = int(labels[i])
        if y == ignore_index:
            rows.append(x.sum() * 0.0 + weight.sum() * 0.0)
            continue
        kept += 1
        logits = []
        for j in range(weight.shape[0]):
            cos = _cosine(x[i], weight[j])
            if j == y:
                theta = torch.acos(cos.clamp(-1.0, 1.0))
                value = torch.cos(theta + margins[i]) if kind == "arc" else torch.cos(theta) - margins[i]
                logits.append(scale * value)
            else:
                logits.append(scale * cos)
        rows.append(_softmax_row(logits, y, label_smoothing))
    return _reduce(rows, kept, reduction)


def elastic_plus_assignment(draws: list[float], cos_target: list[float], valid: list[bool], mean: float) -> list[float]:
    """ElasticFace+: the valid rows' draws, sorted ascending, go to the valid rows in order
    of decreasing target cosine (ties: earlier row first); other rows get the mean."""
    rows = [i for i in range(len(draws)) if valid[i]]
    by_cos = sorted(rows, key=lambda i: (-cos_target[i], i))
    values = sorted(draws[i] for i in rows)
    out = [mean] * len(draws)
    for i, v in zip(by_cos, values):
        out[i] = v
    return out
def adaface_statistics_reference(norms: list[float], t_alpha: float, mean: float, std: float) -> tuple[float, float]:
    """One EMA step of AdaFace's norm statistics: clip to [0.001, 100], batch mean and
    Bessel-corrected std, then mean <- a*batch + (1-a)*mean (a batch of < 2 rows: no step)."""
    clipped = [min(max(n, 0.001), 100.0) for n in norms]
    if len(clipped) < 2:
        return mean, std
    mu = sum(clipped) / len(clipped)
    sigma = math.sqrt(sum((c - mu) ** 2 for c in clipped) / (len(clipped) - 1))
    return t_alpha * mu + (1 - t_alpha) * mean, t_alpha * sigma + (1 - t_alpha) * std


def adaface_loss_reference(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float,
    margin: float,
    h: float,
    batch_mean: float,
    batch_std: float,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """AdaFace (Kim et al., CVPR 2022) at the given statistics: per sample the
    quality z = clip(h (clip(|x|, 0.001, 100) - mean) / (std + 1e-3), -1, 1) (no gradient),
    target logit s (cos(clip(acos(clip(cos, -1+eps, 1-eps)) - m z, eps, pi-eps)) - m z - m)."""
    eps = 1e-3
    rows, kept = [], 0
    for i in range(x.shape[0]):
        label = int(labels[i])
        if label == ignore_index:
            rows.append(x.sum() * 0.0)
            continue
        kept += 1
        norm = float(x[i].detach().norm())
        z = max(-1.0, min(1.0, h * (min(max(norm, 0.001), 100.0) - batch_mean) / (batch_std + eps)))
        logits = []
        for j in range(weight.shape[0]):
            cos = _cosine(x[i], weight[j])
            if j == label:
                theta = torch.acos(cos.clamp(-1 + eps, 1 - eps))
                theta_m = (theta - margin * z).clamp(eps, math.pi - eps)
                logits.append(scale * (torch.cos(theta_m) - margin * z - margin))
            else:
                logits.append(scale * cos)
        rows.append(_smoothed_ce(torch.stack(logits), label, label_smoothing))
    return _reduce(rows, kept, reduction)


def magface_loss_reference(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float,
    l_a: float,
    u_a: float,
    l_m: float,
    u_m: float,
    lambda_g: float,
    easy_margin: bool = True,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """MagFace (Meng et al., CVPR 2021): a = clamp(|x|, l_a, u_a) (differentiable),
    m(a) linear from l_m at l_a to u_m at u_a, ArcFace cos(theta + m(a)) on the target (easy
    margin: only where cos > 0; else the fallback cos - m sin m past theta + m > pi), plus
    lambda_g (1/a + a/u_a^2) per sample."""
    rows, kept = [], 0
    for i in range(x.shape[0]):
        label = int(labels[i])
        if label == ignore_index:
            rows.append(x.sum() * 0.0)
            continue
        kept += 1
        a = x[i].norm().clamp(l_a, u_a)
        m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
        logits = []
        for j in range(weight.shape[0]):
            cos = _cosine(x[i], weight[j])
            if j == label:
                theta = torch.acos(cos)
                if easy_margin:
                    f = torch.cos(theta + m) if cos > 0 else cos
                else:
                    f = torch.cos(theta + m) if theta + m <= math.pi else cos - m * torch.sin(m)
                logits.append(scale * f)
            else:
                logits.append(scale * cos)
        g = 1.0 / a + a / u_a**2
        rows.append(_smoothed_ce(torch.stack(logits), label, label_smoothing) + lambda_g * g)
    return _reduce(rows, kept, reduction)


def adacos_loss_reference(
    x: Tensor, weight: Tensor, labels: Tensor, *, scale: float, reduction: str = "mean", ignore_index: int = -100
) -> Tensor:
    """AdaCos's loss at scale s: the cross entropy of s cos(theta_j), no margin."""
    rows, kept = [], 0
    for i in range(x.shape[0]):
        label = int(labels[i])
        if label == ignore_index:
            rows.append(x.sum() * 0.0)
            continue
        kept += 1
        logits = torch.stack([scale * _cosine(x[i], weight[j]) for j in range(weight.shape[0])])
        rows.append(_smoothed_ce(logits, label, 0.0))
    return _reduce(rows, kept, reduction)


def adacos_scale_reference(x: Tensor, weight: Tensor, labels: Tensor, scale: float, ignore_index: int = -100) -> float:
    """AdaCos's dynamic scale update (Zhang et al., CVPR 2019, Algorithm 1):
    B_avg = mean over samples of sum_{k != y} exp(s cos theta_k); theta_med the (lower)
    median of the target angles; s <- log(B_avg) / cos(min(pi/4, theta_med))."""
    sums, angles = [], []
    for i in range(x.shape[0]):
        label = int(labels[i])
        if label == ignore_index:
            continue
        total = 0.0
        for j in range(weight.shape[0]):
            cos = float(_cosine(x[i], weight[j]))
            if j == label:
                angles.append(math.acos(max(-1.0, min(1.0, cos))))
            else:
                total += math.exp(scale * cos)
        sums.append(total)
    if not sums:
        return scale
    b_avg = sum(sums) / len(sums)
    theta_med = sorted(angles)[(len(angles) - 1) // 2]
    new = math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))
    return new if math.isfinite(new) and new > 0 else scale



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


# ---------------------------------------------------------------- plain PyTorch formulas of every head
# The baselines of the benchmark "Small problems as fast as plain PyTorch": each head's loss as a
# practitioner writes it from the paper or the official release, vectorised over the batch in
# the inputs' dtype (F.normalize, F.linear, gather the target column, the margin on it,
# scatter, F.cross_entropy; the sigmoid-form heads through binary_cross_entropy_with_logits),
# materialising the [B, C] logits.  ``plain_head_loss`` reads a head's hyperparameters, weight
# and buffers and returns the loss of ONE training-mode step at the head's current state,
# advancing that state as the head's training forward does (``update_state=False`` leaves it).
# Torch calls only: nothing here calls marginloss.  Not covered (NotImplementedError): class
# sharding and PartialFC sampling; an all-ignored batch gives NaN under "mean" (torch's rule)
# where the heads give 0.


def _plain_labels(head: torch.nn.Module, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(valid, safe)``: the non-ignored rows and labels safe to gather with (ignored -> 0)."""
    valid = labels != head.ignore_index
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


def _plain_ce(head: torch.nn.Module, logits: Tensor, labels: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(
        logits, labels, ignore_index=head.ignore_index, reduction=head.reduction,
        label_smoothing=head.label_smoothing,
    )


def _plain_reduce(rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Per-row losses reduced as torch's losses do (ignored rows 0 and out of the mean)."""
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / valid.sum()


def _plain_add_batch_term(loss: Tensor, term: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """A batch-level term (UniformFace's uniform loss): added to the scalar, or spread evenly over
    the valid rows with ``reduction="none"``."""
    if reduction != "none":
        return loss + term
    return loss + torch.where(valid, term / valid.sum(), torch.zeros_like(loss))


def _plain_cosine(embeddings: Tensor, weight: Tensor) -> Tensor:
    F = torch.nn.functional
    return F.linear(F.normalize(embeddings), F.normalize(weight))


def _plain_arc(cos_t: Tensor, margin: float | Tensor, easy_margin: bool = False) -> Tensor:
    """ArcFace's cos(θ + m) on target cosines; past θ + m > π the release's cos θ - m sin m
    (or, with ``easy_margin``, cos θ where cos θ <= 0)."""
    theta = torch.acos(cos_t.clamp(-1 + 1e-7, 1 - 1e-7))
    shifted = torch.cos(theta + margin)
    if easy_margin:
        return torch.where(cos_t > 0, shifted, cos_t)
    sin_m = torch.sin(margin) if isinstance(margin, Tensor) else math.sin(margin)
    return torch.where(theta + margin <= math.pi, shifted, cos_t - margin * sin_m)


def _plain_check(head: torch.nn.Module) -> None:
    if getattr(head, "process_group", None) is not None or getattr(head, "sample_rate", 1.0) < 1.0:
        raise NotImplementedError("plain_head_loss covers a single-process head without PartialFC sampling")


def _plain_arcface(head, x, labels, update_state):
    _, safe = _plain_labels(head, labels)
    cosine = _plain_cosine(x, head.weight)
    cos_t = cosine.gather(1, safe[:, None])
    target = _plain_arc(cos_t, head.margin, head.easy_margin)
    if head.straight_through:
        target = cos_t + (target - cos_t).detach()
    return _plain_ce(head, cosine.scatter(1, safe[:, None], target) * head.scale, labels)


def _plain_cosface(head, x, labels, update_state):
    _, safe = _plain_labels(head, labels)
    cosine = _plain_cosine(x, head.weight)
    cos_t = cosine.gather(1, safe[:, None])
    return _plain_ce(head, cosine.scatter(1, safe[:, None], cos_t - head.margin) * head.scale, labels)


def _plain_normface(head, x, labels, update_state):
    return _plain_ce(head, _plain_cosine(x, head.weight) * head.scale, labels)


def _plain_combined_margin(head, x, labels, update_state):
    _, safe = _plain_labels(head, labels)
    cosine = _plain_cosine(x, head.weight)
    theta = torch.acos(cosine.gather(1, safe[:, None]).clamp(-1 + 1e-7, 1 - 1e-7))
    target = torch.cos(head.m1 * theta + head.m2) - head.m3
    return _plain_ce(head, cosine.scatter(1, safe[:, None], target) * head.scale, labels)


def _plain_lambda(head) -> float:
    """SphereFace / L-Softmax annealing at the head's iteration: max(λ_min, base (1 + γ t)^-p)."""
    t = int(head.iteration)
    return max(head.lambda_min, head.lambda_base * (1.0 + head.lambda_gamma * t) ** -head.lambda_power)


def _plain_sphereface_rows(head, x, labels, normalize_weight: bool) -> Tensor:
    """A-Softmax (weights normalised) or L-Softmax (neither) logits, as the Caffe releases'
    PyTorch ports write them: x·w / (|x||w|) for cos θ, ψ(θ) = (-1)^k cos(mθ) - 2k."""
    _, safe = _plain_labels(head, labels)
    weight = torch.nn.functional.normalize(head.weight) if normalize_weight else head.weight
    x_norm = x.norm(dim=1, keepdim=True)
    w_norm = weight.norm(dim=1)
    logits = torch.nn.functional.linear(x, weight)
    cosine = logits / (x_norm * w_norm)
    cos_t = cosine.gather(1, safe[:, None])
    theta = torch.acos(cos_t.clamp(-1 + 1e-7, 1 - 1e-7))
    m = head.margin
    k = torch.floor(m * theta.detach() / math.pi).clamp_max(m - 1)
    psi = (1.0 - 2.0 * torch.remainder(k, 2.0)) * torch.cos(m * theta) - 2.0 * k
    lam = _plain_lambda(head)
    target = (lam * cos_t + psi) / (1.0 + lam) * x_norm * w_norm[safe][:, None]
    return logits.scatter(1, safe[:, None], target)


def _plain_sphereface(head, x, labels, update_state):
    loss = _plain_ce(head, _plain_sphereface_rows(head, x, labels, normalize_weight=True), labels)
    if update_state:
        head.iteration.add_(1)
    return loss


def _plain_lsoftmax(head, x, labels, update_state):
    loss = _plain_ce(head, _plain_sphereface_rows(head, x, labels, normalize_weight=False), labels)
    if update_state:
        head.iteration.add_(1)
    return loss


def _plain_uniformface(head, x, labels, update_state):
    """A-Softmax plus the uniform loss of the class centres after this batch's update
    c_j <- c_j - α Σ_{i: y_i = j} (c_j - x̂_i) / (1 + n_j): the mean over pairs j ≠ k of
    1 / (|ĉ_j - ĉ_k| + 1), over all classes (or the batch's classes)."""
    F = torch.nn.functional
    loss = _plain_ce(head, _plain_sphereface_rows(head, x, labels, normalize_weight=True), labels)
    valid, safe = _plain_labels(head, labels)
    centers = head.centers.to(x.dtype)
    counts = torch.zeros(centers.shape[0], dtype=x.dtype, device=x.device).index_add(0, safe, valid.to(x.dtype))
    sums = torch.zeros_like(centers).index_add(0, safe, F.normalize(x) * valid[:, None])
    new = centers - head.center_lr * (counts[:, None] * centers - sums) / (1.0 + counts[:, None])
    chosen = new if head.uniform_pairs == "all" else new[torch.unique(safe[valid])]
    n = chosen.shape[0]
    unit = F.normalize(chosen)
    # sqrt(2 - 2 cos) is |ĉ_j - ĉ_k| without a [C, C, D] tensor; the clamp keeps the (masked)
    # diagonal's sqrt differentiable.
    distance = (2.0 - 2.0 * unit @ unit.T).clamp_min(1e-24).sqrt()
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    uniform = torch.where(off, 1.0 / (distance + 1.0), torch.zeros_like(distance)).sum() / max(n * (n - 1), 1)
    if update_state:
        with torch.no_grad():
            head.iteration.add_(1)
            head.centers.copy_(new.detach().to(head.centers.dtype))
    return _plain_add_batch_term(loss, head.uniform_weight * uniform, valid, head.reduction)


def _plain_subcenter_arcface(head, x, labels, update_state):
    """Sub-center ArcFace: each class's cosine is the max over its K rows (c*K .. c*K + K - 1)."""
    valid, safe = _plain_labels(head, labels)
    k = head.num_subcenters
    cosine = _plain_cosine(x, head.weight).unflatten(1, (-1, k))
    pooled = cosine.amax(dim=2)
    target = _plain_arc(pooled.gather(1, safe[:, None]), head.margin)
    loss = _plain_ce(head, pooled.scatter(1, safe[:, None], target) * head.scale, labels)
    if update_state:
        with torch.no_grad():
            winner = cosine[torch.arange(x.shape[0], device=x.device), safe].argmax(dim=1)
            head.subcenter_counts.view(-1).index_add_(0, safe * k + winner, valid.long())
    return loss


def _plain_curricularface(head, x, labels, update_state):
    """The release's forward: t <- 0.01 mean(cos θ_y) + 0.99 t first, then the hard negatives
    (cos θ_j > cos(θ_y + m)) become cos θ_j (t + cos θ_j) and the target ArcFace's margin."""
    valid, safe = _plain_labels(head, labels)
    cosine = _plain_cosine(x, head.weight)
    cos_t = cosine.gather(1, safe[:, None])
    with torch.no_grad():
        t = head.t.to(x.dtype)
        if valid.any():
            t = head.momentum * cos_t[valid].mean() + (1.0 - head.momentum) * t
        sin_t = (1.0 - cos_t * cos_t).sqrt()
        threshold = cos_t * math.cos(head.margin) - sin_t * math.sin(head.margin)
    modulated = torch.where(cosine > threshold, cosine * (t + cosine), cosine)
    logits = modulated.scatter(1, safe[:, None], _plain_arc(cos_t, head.margin)) * head.scale
    if update_state:
        head.t.copy_(t)
    return _plain_ce(head, logits, labels)


def elasticface_draws(head: torch.nn.Module, batch_size: int, step: int | None = None) -> Tensor:
    """The ElasticFace head's margin draws for a step (default: the step its next training
    forward takes), one per row: N(m, σ²) from a CPU ``torch.Generator`` seeded by
    blake2b("elasticface:{seed}:{step}") (the head's rule, so the two see the same draws)."""
    import hashlib

    step = int(head.step) if step is None else step
    digest = hashlib.blake2b(f"elasticface:{head.seed}:{step}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    return torch.randn(batch_size, generator=generator, dtype=torch.float64) * head.sigma + head.margin


def _plain_elasticface(head, x, labels, update_state, margins=None):
    """Row i's target is cos(θ_y + m_i) (arc, no fallback, as the release) or cos θ_y - m_i
    (cos); ElasticFace+ gives the sorted draws to the rows by decreasing target cosine."""
    valid, safe = _plain_labels(head, labels)
    cosine = _plain_cosine(x, head.weight)
    cos_t = cosine.gather(1, safe[:, None])
    if margins is None:
        margins = elasticface_draws(head, x.shape[0])
    m = margins.to(device=x.device, dtype=x.dtype)[:, None]
    if head.plus:
        with torch.no_grad():
            order = torch.sort(torch.where(valid, cos_t.squeeze(1), -math.inf), descending=True, stable=True).indices
            ascending = torch.sort(torch.where(valid, m.squeeze(1), math.inf), stable=True).values
            m = torch.empty_like(ascending).scatter(0, order, ascending)
            m = torch.where(valid, m, torch.full_like(m, head.margin))[:, None]
    if head.kind == "arc":
        target = torch.cos(torch.acos(cos_t.clamp(-1 + 1e-7, 1 - 1e-7)) + m)
    else:
        target = cos_t - m
    if update_state:
        head.step.add_(1)
    return _plain_ce(head, cosine.scatter(1, safe[:, None], target) * head.scale, labels)


def _plain_magface(head, x, labels, update_state):
    """The release: a = clamp(|x|, l_a, u_a), m(a) linear from l_m to u_m, ArcFace's easy
    margin, plus λ_g (1/a + a/u_a²) per sample."""
    valid, safe = _plain_labels(head, labels)
    cosine = _plain_cosine(x, head.weight)
    cos_t = cosine.gather(1, safe[:, None])
    a = x.norm(dim=1, keepdim=True).clamp(head.l_a, head.u_a)
    m = (head.u_m - head.l_m) / (head.u_a - head.l_a) * (a - head.l_a) + head.l_m
    target = _plain_arc(cos_t, m, head.easy_margin)
    loss = _plain_ce(head, cosine.scatter(1, safe[:, None], target) * head.scale, labels)
    g = (1.0 / a + a / head.u_a**2).squeeze(1)
    regularizer = _plain_reduce(g, valid, head.reduction)
    return loss + head.lambda_g * regularizer


def _plain_adaface(head, x, labels, update_state):
    """The release: norms clipped to [0.001, 100] (no gradient), their batch mean and std into
    the EMA first, margin scaler ẑ = clip(h (|x| - μ) / (σ + eps), -1, 1), target
    cos(clip(θ - m ẑ, eps, π - eps)) - (m + m ẑ)."""
    eps = 1e-3
    valid, safe = _plain_labels(head, labels)
    cosine = _plain_cosine(x, head.weight)
    with torch.no_grad():
        norms = x.norm(dim=1, keepdim=True).clamp(0.001, 100)
        mean, std = head.batch_mean.to(x.dtype), head.batch_std.to(x.dtype)
        if int(valid.sum()) >= 2:
            mean = head.t_alpha * norms[valid].mean() + (1 - head.t_alpha) * mean
            std = head.t_alpha * norms[valid].std() + (1 - head.t_alpha) * std
        scaler = ((norms - mean) / (std + eps) * head.h).clamp(-1, 1)
    theta = torch.acos(cosine.gather(1, safe[:, None]).clamp(-1 + eps, 1 - eps))
    theta_m = (theta - head.margin * scaler).clamp(eps, math.pi - eps)
    target = torch.cos(theta_m) - (head.margin + head.margin * scaler)
    if update_state:
        head.batch_mean.copy_(mean)
        head.batch_std.copy_(std)
    return _plain_ce(head, cosine.scatter(1, safe[:, None], target) * head.scale, labels)


def _plain_adacos(head, x, labels, update_state):
    """Cosine softmax at the head's scale; then (dynamic) the paper's update from this batch,
    s <- log(B_avg) / cos(min(π/4, θ_med)), which applies from the next step (the head's rule)."""
    valid, safe = _plain_labels(head, labels)
    cosine = _plain_cosine(x, head.weight)
    scale = head.scale.detach().to(x.dtype).clone()  # the step keeps the scale it used
    loss = _plain_ce(head, cosine * scale, labels)
    if update_state and head.dynamic and bool(valid.any()):
        with torch.no_grad():
            one_hot = torch.zeros_like(cosine, dtype=torch.bool).scatter(1, safe[:, None], True)
            b_avg = torch.where(one_hot, 0.0, torch.exp(scale * cosine))[valid].sum(dim=1).mean()
            theta_med = torch.median(torch.acos(cosine.gather(1, safe[:, None]).clamp(-1, 1))[valid])
            new = torch.log(b_avg) / torch.cos(theta_med.clamp_max(math.pi / 4))
            if bool(torch.isfinite(new)) and float(new) > 0:
                head.scale.copy_(new)
    return loss


def _plain_uniface(head, x, labels, update_state):
    """The release's unified cross entropy: softplus(-(s(cos θ_y - m) + b)) + λ Σ_{j≠y}
    softplus(s cos θ_j + b), as per-class binary cross entropy with logits (without the
    release's clamp of each logit to [-s, s], which changes only terms beyond e^±s)."""
    valid, safe = _plain_labels(head, labels)
    cosine = _plain_cosine(x, head.weight)
    cos_t = cosine.gather(1, safe[:, None])
    logits = cosine.scatter(1, safe[:, None], cos_t - head.margin) * head.scale + head.bias
    one_hot = torch.zeros_like(cosine).scatter(1, safe[:, None], 1.0)
    weight = torch.where(one_hot > 0, 1.0, head.negative_weight).to(x.dtype)
    rows = torch.nn.functional.binary_cross_entropy_with_logits(logits, one_hot, weight=weight, reduction="none").sum(1)
    return _plain_reduce(rows, valid, head.reduction)


def _plain_sphereface2(head, x, labels, update_state):
    """The OpenSphere release: g(c) = 2((c + 1)/2)^t - 1 and the margin computed without
    gradient (cos + d), logits s (cos θ + d) + b, class-weighted binary cross entropy times
    lw / s (λ on the target, 1 - λ on the others)."""
    valid, safe = _plain_labels(head, labels)
    cosine = _plain_cosine(x, head.weight).clamp(-1, 1)
    one_hot = torch.zeros_like(cosine).scatter(1, safe[:, None], 1.0)
    m, t, s = head.margin, head.t, float(head.scale)

    def adjusted(cos: Tensor) -> Tensor:
        if head.variant == "C":
            return 2.0 * ((cos + 1.0) / 2.0) ** t - 1.0 - m * (2.0 * one_hot - 1.0)
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        shifted = torch.where(one_hot > 0, torch.cos((theta + m).clamp_max(math.pi)), cos)
        return 2.0 * ((shifted + 1.0) / 2.0) ** t - 1.0

    if head.straight_through:
        with torch.no_grad():
            delta = adjusted(cosine) - cosine
        logits = s * (cosine + delta) + head.bias
    else:
        logits = s * adjusted(cosine) + head.bias
    weight = (head.lambd * one_hot + (1.0 - head.lambd) * (1.0 - one_hot)) * (head.loss_weight / s)
    rows = torch.nn.functional.binary_cross_entropy_with_logits(logits, one_hot, weight=weight, reduction="none").sum(1)
    return _plain_reduce(rows, valid, head.reduction)


PLAIN_FORMULAS = {
    "adacos": _plain_adacos,
    "adaface": _plain_adaface,
    "arcface": _plain_arcface,
    "combined_margin": _plain_combined_margin,
    "cosface": _plain_cosface,
    "curricularface": _plain_curricularface,
    "elasticface": _plain_elasticface,
    "lsoftmax": _plain_lsoftmax,
    "magface": _plain_magface,
    "normface": _plain_normface,
    "sphereface": _plain_sphereface,
    "sphereface2": _plain_sphereface2,
    "subcenter_arcface": _plain_subcenter_arcface,
    "uniface": _plain_uniface,
    "uniformface": _plain_uniformface,
}
"""The registered head names ``plain_head_loss`` covers, each with its plain formula."""

PLAIN_HEAD_CLASSES = {
    "AdaCos": "adacos", "AdaFace": "adaface", "ArcFace": "arcface", "CombinedMargin": "combined_margin",
    "CosFace": "cosface", "CurricularFace": "curricularface", "ElasticFace": "elasticface",
    "LSoftmax": "lsoftmax", "MagFace": "magface", "NormFace": "normface", "SphereFace": "sphereface",
    "SphereFace2": "sphereface2", "SubCenterArcFace": "subcenter_arcface", "UniFace": "uniface",
    "UniformFace": "uniformface",
}
"""Head class name -> registered name (exact classes: a subclass may change the math)."""


def plain_head_loss(
    head: torch.nn.Module, embeddings: Tensor, labels: Tensor, *, update_state: bool = True,
    margins: Tensor | None = None,
) -> Tensor:
    """The plain PyTorch loss of ``head`` for one training-mode step at its current state.

    Dispatches on the head's class (:data:`PLAIN_HEAD_CLASSES`) to its formula in
    :data:`PLAIN_FORMULAS`, reading the hyperparameters, ``weight``, ``bias`` and buffers
    as they are now; stateful heads (SphereFace / L-Softmax / UniformFace iteration and
    centres, CurricularFace ``t``, AdaFace's EMA, AdaCos's scale, ElasticFace's step,
    SubCenterArcFace's counts) are advanced as the head's training forward advances them
    unless ``update_state=False``.  ``margins`` (ElasticFace only, ``[B]``) replaces the draws
    :func:`elasticface_draws` gives for the head's current step.
    """
    name = PLAIN_HEAD_CLASSES.get(type(head).__name__)
    if name is None:
        raise NotImplementedError(f"no plain formula for {type(head).__qualname__}; covered: {sorted(PLAIN_HEAD_CLASSES)}")
    _plain_check(head)
    if name == "elasticface":
        return _plain_elasticface(head, embeddings, labels, update_state, margins)
    if margins is not None:
        raise ValueError(f"margins is for ElasticFace only, got a {type(head).__name__}")
    return PLAIN_FORMULAS[name](head, embeddings, labels, update_state)
