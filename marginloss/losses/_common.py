"""Helpers shared by the losses: reductions, pair masks, mined-index checks, similarities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from marginloss._validation import _check_values, check_embeddings, check_labels, check_same_device

__all__: list[str] = []

REDUCTIONS = ("mean", "sum", "none")


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    """``"none"``: as is; ``"sum"``; ``"mean"``: sum over the entries, 0 for none."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / max(losses.shape[0], 1)


def _check_embeddings_labels(embeddings: object, labels: object) -> tuple[Tensor, Tensor]:
    checked = check_embeddings(embeddings)
    checked_labels = check_labels(labels, checked.shape[0])
    check_same_device(embeddings=checked, labels=checked_labels)
    return checked, checked_labels


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (attached to the graph) where nothing is kept.
    Fixed shapes, no host synchronisation."""
    kept = torch.where(mask, values, torch.zeros_like(values))
    return kept.sum() / mask.sum().clamp_min(1)


def _pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(positive, negative)`` ``[B, B]`` masks; a sample is not its own positive."""
    same = labels[:, None] == labels[None, :]
    diagonal = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~diagonal, ~same


def _upper(mask: Tensor) -> Tensor:
    """Keep ``(i, j)`` with ``i < j`` only: each unordered pair once."""
    return torch.triu(mask, diagonal=1)


def _check_index(
    name: str, index: object, length: int | None, batch: int, embeddings: Tensor
) -> Tensor:
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {index.dtype}")
    if index.dim() != 1 or (length is not None and index.shape[0] != length):
        expected = "1-D" if length is None else f"1-D of length {length}"
        raise ValueError(f"{name} must be {expected}, got shape {tuple(index.shape)}")
    check_same_device(**{"embeddings": embeddings, name: index})
    if _check_values() and index.numel() > 0:
        outside = (index < 0) | (index >= batch)
        if bool(outside.any()):
            raise ValueError(
                f"{name} must be in [0, {batch}) (the batch size), got "
                f"{int(outside.sum())} value(s) outside, e.g. {index[outside][:5].tolist()}"
            )
    return index.long()


def _check_pair_indices(
    indices_tuple: object, embeddings: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Accept ``(anchor, positive, negative)`` triplets or ``(anchor_p, positive, anchor_n,
    negative)`` pairs (the two tuple forms miners return) and return the four pair tensors.

    Triplets become their positive pairs ``(a, p)`` and negative pairs ``(a, n)``, each kept
    once (duplicates from several triplets sharing a pair are removed), as pair losses
    score pairs, not triplets.
    """
    if indices_tuple is None:
        return None
    if not isinstance(indices_tuple, (tuple, list)):
        raise TypeError(
            "indices_tuple must be a tuple (anchor, positive, negative) or (anchor_positive, "
            f"positive, anchor_negative, negative) of index tensors or None, got "
            f"{type(indices_tuple).__name__}"
        )
    batch = embeddings.shape[0]
    if len(indices_tuple) == 3:
        roles = ("anchor", "positive", "negative")
        anchor, positive, negative = (
            _check_index(f"indices_tuple ({role})", index, _length(indices_tuple), batch, embeddings)
            for role, index in zip(roles, indices_tuple)
        )
        pos_pairs = torch.unique(torch.stack([anchor, positive]), dim=1)
        neg_pairs = torch.unique(torch.stack([anchor, negative]), dim=1)
        return pos_pairs[0], pos_pairs[1], neg_pairs[0], neg_pairs[1]
    if len(indices_tuple) == 4:
        anchor_p = _check_index(
            "indices_tuple (anchor_positive)", indices_tuple[0], None, batch, embeddings
        )
        positive = _check_index(
            "indices_tuple (positive)", indices_tuple[1], anchor_p.shape[0], batch, embeddings
        )
        anchor_n = _check_index(
            "indices_tuple (anchor_negative)", indices_tuple[2], None, batch, embeddings
        )
        negative = _check_index(
            "indices_tuple (negative)", indices_tuple[3], anchor_n.shape[0], batch, embeddings
        )
        return anchor_p, positive, anchor_n, negative
    raise ValueError(
        "indices_tuple must hold 3 (anchor, positive, negative) or 4 (anchor_positive, "
        f"positive, anchor_negative, negative) index tensors, got {len(indices_tuple)}"
    )


def _length(indices: Sequence[object]) -> int | None:
    first = indices[0]
    return first.shape[0] if isinstance(first, Tensor) and first.dim() == 1 else None


def _pair_index_masks(
    pairs: tuple[Tensor, Tensor, Tensor, Tensor], batch: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``[B, B]`` boolean masks of the given positive and negative pairs (ordered)."""
    anchor_p, positive, anchor_n, negative = pairs
    pos = torch.zeros(batch, batch, dtype=torch.bool, device=device)
    neg = torch.zeros(batch, batch, dtype=torch.bool, device=device)
    pos[anchor_p, positive] = True
    neg[anchor_n, negative] = True
    return pos, neg
