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
