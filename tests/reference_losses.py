"""Plain float64 references for marginloss.losses and marginloss.miners.

Written for obviousness, not speed: Python loops over samples, pairs and triplets, one
scalar at a time.  Nothing here imports marginloss.  Losses are built from differentiable
torch scalar ops so their gradients can be compared with autograd too.
"""

from __future__ import annotations

import torch
from torch import Tensor

Triplet = tuple[int, int, int]


# ---------------------------------------------------------------- distances


def distance(x: Tensor, y: Tensor, kind: str) -> Tensor:
    """Distance between two embedding vectors."""
    if kind == "euclidean":
        return torch.sqrt(((x - y) ** 2).sum())
    if kind == "squared_euclidean":
        return ((x - y) ** 2).sum()
    if kind == "cosine":
        return 1 - (x * y).sum() / (torch.sqrt((x * x).sum()) * torch.sqrt((y * y).sum()))
    raise ValueError(kind)


def distance_matrix(embeddings: Tensor, kind: str) -> Tensor:
    """``[B, B]`` distances; the diagonal is the constant 0."""
    batch = embeddings.shape[0]
    rows = []
    for i in range(batch):
        row = []
        for j in range(batch):
            if i == j:
                row.append(torch.zeros((), dtype=embeddings.dtype))
            else:
                row.append(distance(embeddings[i], embeddings[j], kind))
        rows.append(torch.stack(row) if row else torch.zeros(0, dtype=embeddings.dtype))
    if not rows:
        return torch.zeros(0, 0, dtype=embeddings.dtype)
    return torch.stack(rows)


# ---------------------------------------------------------------- miners


def positives(labels: list[int], anchor: int) -> list[int]:
    return [p for p in range(len(labels)) if p != anchor and labels[p] == labels[anchor]]


def negatives(labels: list[int], anchor: int) -> list[int]:
    return [n for n in range(len(labels)) if labels[n] != labels[anchor]]


def batch_hard_triplets(dist: list[list[float]], labels: list[int]) -> list[Triplet]:
    """Per anchor with a positive and a negative: farthest positive, closest negative."""
    triplets = []
    for a in range(len(labels)):
        pos, neg = positives(labels, a), negatives(labels, a)
        if not pos or not neg:
            continue
        hardest_positive = pos[0]
        for p in pos:
            if dist[a][p] > dist[a][hardest_positive]:
                hardest_positive = p
        hardest_negative = neg[0]
        for n in neg:
            if dist[a][n] < dist[a][hardest_negative]:
                hardest_negative = n
        triplets.append((a, hardest_positive, hardest_negative))
    return triplets


def batch_all_triplets(labels: list[int]) -> list[Triplet]:
    return [
        (a, p, n)
        for a in range(len(labels))
        for p in positives(labels, a)
        for n in negatives(labels, a)
    ]


def semi_hard_triplets(dist: list[list[float]], labels: list[int], margin: float) -> list[Triplet]:
    """Per positive pair: closest negative in (d_ap, d_ap + margin); else the farthest
    negative with d_an <= d_ap; else the pair is dropped."""
    triplets = []
    for a in range(len(labels)):
        for p in positives(labels, a):
            d_ap = dist[a][p]
            window = [n for n in negatives(labels, a) if d_ap < dist[a][n] < d_ap + margin]
            hard = [n for n in negatives(labels, a) if dist[a][n] <= d_ap]
            if window:
                triplets.append((a, p, min(window, key=lambda n: dist[a][n])))
            elif hard:
                triplets.append((a, p, max(hard, key=lambda n: dist[a][n])))
    return triplets


# ---------------------------------------------------------------- losses


def triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float,
    mining: str,
    distance_kind: str,
    soft: bool,
    reduction: str,
    triplets: list[Triplet] | None = None,
) -> Tensor:
    """Triplet loss by loops, with the averaging documented in marginloss.losses."""
    dist = distance_matrix(embeddings, distance_kind)
    plain = dist.detach().tolist()
    label_list = labels.tolist()
    given = triplets is not None
    if triplets is None:
        if mining == "batch_hard":
            triplets = batch_hard_triplets(plain, label_list)
        elif mining == "batch_all":
            triplets = batch_all_triplets(label_list)
        else:
            triplets = semi_hard_triplets(plain, label_list, margin)
    losses = []
    for a, p, n in triplets:
        gap = dist[a, p] - dist[a, n]
        if soft:
            losses.append(torch.log(1 + torch.exp(gap)))
        else:
            losses.append(torch.clamp(gap + margin, min=0))
    zero = (embeddings * 0).sum()
    if reduction == "none":
        return torch.stack(losses) if losses else embeddings.sum(dim=1)[:0] * 0
    total = zero
    for loss in losses:
        total = total + loss
    if reduction == "sum":
        return total
    if mining == "batch_all" and not soft and not given:
        count = sum(1 for loss in losses if loss.item() > 0)
    else:
        count = len(losses)
    return total / max(count, 1)


def center_loss(embeddings: Tensor, labels: Tensor, centers: Tensor, reduction: str) -> Tensor:
    per_sample = []
    for i in range(embeddings.shape[0]):
        center = centers[int(labels[i])]
        squared = torch.zeros((), dtype=embeddings.dtype)
        for d in range(embeddings.shape[1]):
            squared = squared + (embeddings[i, d] - center[d]) ** 2
        per_sample.append(0.5 * squared)
    # "+ 0 * (...).sum()" keeps empty batches attached to the graph, as the library does
    zero = (embeddings * 0).sum() + (centers * 0).sum()
    if reduction == "none":
        return torch.stack(per_sample) if per_sample else embeddings.sum(dim=1)[:0] * 0
    total = zero
    for loss in per_sample:
        total = total + loss
    if reduction == "sum":
        return total
    return total / max(len(per_sample), 1)


def center_update(centers: Tensor, embeddings: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """Wen et al. (ECCV 2016) Eq. 4, one class at a time: returns the new centers."""
    new_centers = centers.detach().clone()
    for j in range(centers.shape[0]):
        members = [i for i in range(embeddings.shape[0]) if int(labels[i]) == j]
        delta = torch.zeros(centers.shape[1], dtype=centers.dtype)
        for i in members:
            delta = delta + (centers[j].detach() - embeddings[i].detach())
        delta = delta / (1 + len(members))
        new_centers[j] = centers[j].detach() - alpha * delta
    return new_centers


# ---------------------------------------------------------------- pair and embedding losses
# Each written from its paper's formula, one pair / anchor / class at a time.  Pairs are
# (i, j) with i < j unless the paper's sum is over ordered pairs (said so where it is).


def _zero(*tensors: Tensor) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for tensor in tensors:
        total = total + (tensor * 0).sum()
    return total


def _finish(losses: list[Tensor], reduction: str, zero: Tensor, count: int | None = None) -> Tensor:
    if reduction == "none":
        return torch.stack(losses) if losses else zero.reshape(1)[:0]
    total = zero
    for loss in losses:
        total = total + loss
    if reduction == "sum":
        return total
    return total / max(len(losses) if count is None else count, 1)


def unit(x: Tensor) -> Tensor:
    norm = torch.sqrt((x * x).sum())
    return x / norm if norm.item() > 0 else x * 0


def pair_lists(labels: list[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Unordered positive and negative pairs i < j, row-major."""
    pos, neg = [], []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            (pos if labels[i] == labels[j] else neg).append((i, j))
    return pos, neg


def contrastive_loss(embeddings: Tensor, labels: Tensor, *, margin: float, distance_kind: str,
                     reduction: str, pairs: tuple[list, list] | None = None) -> Tensor:
    """Hadsell et al. 2006 Eq. 4: (1-Y) 1/2 D^2 + Y 1/2 max(0, m - D)^2."""
    pos, neg = pairs if pairs is not None else pair_lists(labels.tolist())
    losses = []
    for i, j in pos:
        d = distance(embeddings[i], embeddings[j], distance_kind) if i != j else embeddings[i].sum() * 0
        losses.append(0.5 * d**2)
    for i, j in neg:
        d = distance(embeddings[i], embeddings[j], distance_kind) if i != j else embeddings[i].sum() * 0
        losses.append(0.5 * torch.clamp(margin - d, min=0) ** 2)
    return _finish(losses, reduction, _zero(embeddings))


def marginal_loss(embeddings: Tensor, labels: Tensor, *, threshold: float, margin: float,
                  reduction: str) -> Tensor:
    """Deng et al. 2017: 1/(m^2 - m) sum_{i != j} max(0, xi - y_ij (theta - ||u_i - u_j||^2)),
    over ordered pairs."""
    label_list = labels.tolist()
    losses = []
    for i in range(len(label_list)):
        for j in range(len(label_list)):
            if i == j:
                continue
            y = 1.0 if label_list[i] == label_list[j] else -1.0
            squared = ((unit(embeddings[i]) - unit(embeddings[j])) ** 2).sum()
            losses.append(torch.clamp(margin - y * (threshold - squared), min=0))
    if reduction == "none":
        # the library returns each unordered pair once, positives first
        pos, neg = pair_lists(label_list)
        index = {(i, j): k for k, (i, j) in enumerate(
            (i, j) for i in range(len(label_list)) for j in range(len(label_list)) if i != j)}
        return _finish([losses[index[p]] for p in pos + neg], "none", _zero(embeddings))
    total = _finish(losses, "sum", _zero(embeddings))
    if reduction == "sum":
        return total / 2  # each unordered pair once
    return total / max(len(losses), 1)


def lifted_structure_loss(embeddings: Tensor, labels: Tensor, *, margin: float,
                          distance_kind: str, reduction: str) -> Tensor:
    """Song et al. 2016 Eq. 4: J_ij = log(sum_{N_i} e^{a - D_ik} + sum_{N_j} e^{a - D_jl}) + D_ij,
    L = 1/(2|P|) sum max(0, J)^2 over positive pairs i < j."""
    label_list = labels.tolist()
    pos, _ = pair_lists(label_list)
    losses = []
    for i, j in pos:
        terms = [torch.exp(margin - distance(embeddings[i], embeddings[k], distance_kind))
                 for k in negatives(label_list, i)]
        terms += [torch.exp(margin - distance(embeddings[j], embeddings[k], distance_kind))
                  for k in negatives(label_list, j)]
        if not terms:
            losses.append(_zero(embeddings))
            continue
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        J = torch.log(total) + distance(embeddings[i], embeddings[j], distance_kind)
        losses.append(0.5 * torch.clamp(J, min=0) ** 2)
    return _finish(losses, reduction, _zero(embeddings))


def multi_similarity_loss(embeddings: Tensor, labels: Tensor, *, alpha: float, beta: float,
                          base: float, reduction: str,
                          pairs: tuple[list, list] | None = None) -> Tensor:
    """Wang et al. 2019 Eq. 15, mean over the m anchors; pairs: ordered (anchor, other)."""
    label_list = labels.tolist()
    batch = len(label_list)
    if pairs is None:
        pos = [(i, j) for i in range(batch) for j in positives(label_list, i)]
        neg = [(i, j) for i in range(batch) for j in negatives(label_list, i)]
    else:
        pos, neg = pairs
    units = [unit(embeddings[i]) for i in range(batch)]
    losses = []
    for i in range(batch):
        s_pos = torch.zeros((), dtype=torch.float64)
        s_neg = torch.zeros((), dtype=torch.float64)
        for a, k in pos:
            if a == i:
                s_pos = s_pos + torch.exp(-alpha * ((units[i] * units[k]).sum() - base))
        for a, k in neg:
            if a == i:
                s_neg = s_neg + torch.exp(beta * ((units[i] * units[k]).sum() - base))
        losses.append(torch.log(1 + s_pos) / alpha + torch.log(1 + s_neg) / beta
                      + embeddings[i].sum() * 0)
    return _finish(losses, reduction, _zero(embeddings))


def multi_similarity_pairs(similarity: list[list[float]], labels: list[int], epsilon: float
                           ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Wang et al. 2019 Eqs. 12-13, anchor by anchor."""
    pos, neg = [], []
    for i in range(len(labels)):
        p, n = positives(labels, i), negatives(labels, i)
        min_pos = min((similarity[i][j] for j in p), default=float("inf"))
        max_neg = max((similarity[i][k] for k in n), default=float("-inf"))
        pos += [(i, j) for j in p if similarity[i][j] < max_neg + epsilon]
        neg += [(i, k) for k in n if similarity[i][k] > min_pos - epsilon]
    return pos, neg


def npair_loss(embeddings: Tensor, labels: Tensor, *, l2_reg: float, reduction: str) -> Tensor:
    """Sohn 2016 Eq. 6 on (first, second) sample of each class with two, by label, plus
    l2_reg/2 (||f||^2 + ||f+||^2) per pair."""
    label_list = labels.tolist()
    pairs = []
    for label in sorted(set(label_list)):
        members = [i for i, y in enumerate(label_list) if y == label]
        if len(members) >= 2:
            pairs.append((members[0], members[1]))
    losses = []
    for i, (a, p) in enumerate(pairs):
        inside = torch.zeros((), dtype=torch.float64)
        for j, (_, q) in enumerate(pairs):
            if j != i:
                inside = inside + torch.exp((embeddings[a] * embeddings[q]).sum()
                                            - (embeddings[a] * embeddings[p]).sum())
        reg = 0.5 * l2_reg * ((embeddings[a] ** 2).sum() + (embeddings[p] ** 2).sum())
        losses.append(torch.log(1 + inside) + reg)
    return _finish(losses, reduction, _zero(embeddings))


def quadruplet_loss(embeddings: Tensor, labels: Tensor, *, margin1: float, margin2: float,
                    distance_kind: str, reduction: str,
                    quadruplets: list[tuple[int, int, int, int]] | None = None) -> Tensor:
    """Chen et al. 2017 Eq. 4 with batch-hard mining: per anchor the farthest positive j,
    closest negative k, and closest pair (l, k') of two classes both other than the anchor's."""
    dist = distance_matrix(embeddings, distance_kind)
    zero = _zero(embeddings)
    if quadruplets is not None:
        losses = [torch.clamp(dist[i, j] - dist[i, k] + margin1, min=0)
                  + torch.clamp(dist[i, j] - dist[o, k] + margin2, min=0)
                  for i, j, k, o in quadruplets]
        return _finish(losses, reduction, zero)
    label_list = labels.tolist()
    plain = dist.detach().tolist()
    first, second, per_anchor = [], [], []
    for i in range(len(label_list)):
        pos, neg = positives(label_list, i), negatives(label_list, i)
        term1 = term2 = zero
        if pos:
            j = max(pos, key=lambda p: (plain[i][p], -p))
            if neg:
                k = min(neg, key=lambda n: (plain[i][n], n))
                term1 = torch.clamp(dist[i, j] - dist[i, k] + margin1, min=0)
                first.append(term1)
            outside = [(o, m) for o in range(len(label_list)) for m in range(len(label_list))
                       if label_list[o] != label_list[m] and label_list[i] not in
                       (label_list[o], label_list[m])]
            if outside:
                o, m = min(outside, key=lambda pair: plain[pair[0]][pair[1]])
                term2 = torch.clamp(dist[i, j] - dist[o, m] + margin2, min=0)
                second.append(term2)
        per_anchor.append(term1 + term2)
    if reduction == "none":
        return torch.stack(per_anchor) if per_anchor else zero.reshape(1)[:0]
    if reduction == "sum":
        return _finish(first, "sum", zero) + _finish(second, "sum", zero)
    return _finish(first, "mean", zero) + _finish(second, "mean", zero)


def range_loss(embeddings: Tensor, labels: Tensor, *, k: int, margin: float, alpha: float,
               beta: float) -> Tensor:
    """Zhang et al. 2017: alpha * sum_c k_c / sum_t 1/D_ct (k largest squared ranges) +
    beta * max(0, m - min ||mean_c - mean_c'||^2)."""
    label_list = labels.tolist()
    zero = _zero(embeddings)
    intra = zero
    centres = []
    for label in sorted(set(label_list)):
        members = [i for i, y in enumerate(label_list) if y == label]
        centre = embeddings[members[0]] * 0
        for i in members:
            centre = centre + embeddings[i]
        centres.append(centre / len(members))
        ranges = [((embeddings[a] - embeddings[b]) ** 2).sum()
                  for x, a in enumerate(members) for b in members[x + 1:]]
        ranges.sort(key=lambda d: -d.item())
        top = ranges[:k]
        if not top or any(d.item() == 0 for d in top):
            continue
        inverse = zero
        for d in top:
            inverse = inverse + 1 / d
        intra = intra + len(top) / inverse
    inter = zero
    if len(centres) >= 2:
        closest = min((((a - b) ** 2).sum() for x, a in enumerate(centres) for b in centres[x + 1:]),
                      key=lambda d: d.item())
        inter = torch.clamp(margin - closest, min=0)
    return alpha * intra + beta * inter


def soft_triple_loss(embeddings: Tensor, labels: Tensor, weight: Tensor, *, centers_per_class: int,
                     la: float, gamma: float, margin: float, tau: float, reduction: str) -> Tensor:
    """Qian et al. 2019 Eqs. 8-9 and Sec. 3.4's regulariser, sample by sample."""
    num_classes = weight.shape[0] // centers_per_class
    centres = [[unit(weight[c * centers_per_class + t]) for t in range(centers_per_class)]
               for c in range(num_classes)]
    spread = _zero(weight)
    for c in range(num_classes):
        for t in range(centers_per_class):
            for s in range(t + 1, centers_per_class):
                squared = ((centres[c][t] - centres[c][s]) ** 2).sum()
                if squared.item() > 0:
                    spread = spread + torch.sqrt(squared)
    if centers_per_class > 1:
        spread = spread / (num_classes * centers_per_class * (centers_per_class - 1))
    losses = []
    for i in range(embeddings.shape[0]):
        x = unit(embeddings[i])
        scores = []
        for c in range(num_classes):
            sims = [(x * centres[c][t]).sum() for t in range(centers_per_class)]
            weights = [torch.exp(s / gamma) for s in sims]
            total = weights[0] * 0
            for w in weights:
                total = total + w
            s_ic = sims[0] * 0
            for w, s in zip(weights, sims):
                s_ic = s_ic + w / total * s
            scores.append(s_ic)
        y = int(labels[i])
        target = torch.exp(la * (scores[y] - margin))
        others = target * 0
        for c in range(num_classes):
            if c != y:
                others = others + torch.exp(la * scores[c])
        losses.append(-torch.log(target / (target + others)) + tau * spread)
    if reduction == "mean" and not losses:
        return tau * spread + _zero(embeddings)
    return _finish(losses, reduction, _zero(embeddings, weight))
