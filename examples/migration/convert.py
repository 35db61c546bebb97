"""Turn a pytorch-metric-learning loss or an InsightFace (arcface_torch) checkpoint into the
marginloss head that computes the same loss, class weights included.

Used by ``docs/guide/migration.rst`` and tested by ``tests/test_examples_migration.py``:

* :func:`from_pytorch_metric_learning` — ``ArcFaceLoss`` (margin in degrees), ``CosFaceLoss``,
  ``NormalizedSoftmaxLoss`` (a temperature, not a scale), ``SphereFaceLoss`` and
  ``LargeMarginSoftmaxLoss`` (no annealing in pytorch-metric-learning); their weight ``W`` is
  stored ``[embedding_dim, num_classes]`` and becomes ``weight`` ``[num_classes, embedding_dim]``.
* :func:`from_insightface` — ``CombinedMarginLoss(s, m1, m2, m3)`` with the class weights of
  ``PartialFC_V2``: every rank saves its own block of classes, ``weight`` of shape
  ``[num_local, embedding_dim]`` (in ``checkpoint_gpu_<rank>.pt`` under
  ``"state_dict_softmax_fc"``), and :func:`insightface_weight` puts the blocks back together.

Example::

    head = from_insightface([f"run/checkpoint_gpu_{rank}.pt" for rank in range(8)],
                            scale=64.0, margins=(1.0, 0.5, 0.0))
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

import marginloss

Checkpoint = Union[str, Path, Mapping[str, Any]]


def _copy_weight(head: torch.nn.Module, weight: Tensor) -> torch.nn.Module:
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def from_pytorch_metric_learning(loss: torch.nn.Module) -> torch.nn.Module:
    """The marginloss head equal to a pytorch-metric-learning classification loss.

    The loss value and the gradients match for the default reducer (the mean over the
    batch); the returned head holds a copy of ``loss.W``, transposed to ``[C, D]``.
    """
    name = type(loss).__name__
    weight = loss.W.detach().T.contiguous()  # PML: [D, C]; marginloss and nn.Linear: [C, D]
    num_classes, embedding_dim = weight.shape
    options: dict[str, Any] = {"dtype": weight.dtype, "device": weight.device}
    if name == "ArcFaceLoss":
        # PML takes the margin in degrees and keeps it in radians after construction.
        head = marginloss.ArcFace(embedding_dim, num_classes, scale=float(loss.scale), margin=float(loss.margin), **options)
    elif name == "CosFaceLoss":
        head = marginloss.CosFace(embedding_dim, num_classes, scale=float(loss.scale), margin=float(loss.margin), **options)
    elif name == "NormalizedSoftmaxLoss":
        head = marginloss.NormFace(embedding_dim, num_classes, scale=1.0 / float(loss.temperature), **options)
    elif name in ("SphereFaceLoss", "LargeMarginSoftmaxLoss"):
        if float(loss.scale) != 1.0:
            raise ValueError(f"{name} with scale={loss.scale} has no marginloss equivalent (only scale=1)")
        cls = marginloss.SphereFace if name == "SphereFaceLoss" else marginloss.LSoftmax
        # PML applies the full multiplicative margin from the first step: no lambda annealing.
        head = cls(embedding_dim, num_classes, margin=int(loss.margin), lambda_base=0.0, lambda_min=0.0, **options)
    else:
        raise ValueError(f"no marginloss head for pytorch-metric-learning's {name}")
    return _copy_weight(head, weight)


def partial_fc_rows(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(class_start, num_local)`` of one rank in PartialFC_V2: the first
    ``num_classes % world_size`` ranks hold one class more.

    >>> [partial_fc_rows(10, 4, rank) for rank in range(4)]
    [(0, 3), (3, 3), (6, 2), (8, 2)]
    """
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def _rank_of(path: Path) -> int | None:
    match = re.search(r"(\d+)\D*$", path.stem)
    return int(match.group(1)) if match else None


def _fc_state(checkpoint: Checkpoint) -> Mapping[str, Any]:
    if isinstance(checkpoint, Mapping):
        state = checkpoint
    else:
        state = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    if "state_dict_softmax_fc" in state:  # a whole training checkpoint of arcface_torch
        state = state["state_dict_softmax_fc"]
    if "weight" not in state:
        raise ValueError(f"no PartialFC 'weight' in the checkpoint (keys: {sorted(state)[:8]})")
    return state


def insightface_weight(checkpoints: Sequence[Checkpoint]) -> Tensor:
    """The full ``[num_classes, embedding_dim]`` weight from the per-rank PartialFC_V2 blocks.

    ``checkpoints`` are one per rank: ``checkpoint_gpu_<rank>.pt`` files (put in rank order
    by the number in their names), or their loaded dictionaries in rank order.  The block
    sizes are checked against PartialFC_V2's split, so a missing or misordered rank fails.
    """
    if not checkpoints:
        raise ValueError("no checkpoints given (expected one per rank)")
    items = list(checkpoints)
    paths = [Path(item) for item in items if not isinstance(item, Mapping)]
    ranks = [rank for rank in map(_rank_of, paths) if rank is not None]
    if len(paths) == len(items) and len(ranks) == len(paths):  # files named by rank: sort them
        if sorted(ranks) != list(range(len(paths))):
            raise ValueError(f"checkpoint ranks {sorted(ranks)} are not 0..{len(paths) - 1}")
        items = [path for _, path in sorted(zip(ranks, paths))]
    blocks = [_fc_state(item)["weight"] for item in items]
    num_classes = sum(block.shape[0] for block in blocks)
    for rank, block in enumerate(blocks):
        _, rows = partial_fc_rows(num_classes, len(blocks), rank)
        if block.ndim != 2 or block.shape[0] != rows:
            raise ValueError(f"rank {rank}'s weight has shape {tuple(block.shape)}; PartialFC_V2 gives rank {rank} "
                             f"of {len(blocks)} {rows} of the {num_classes} classes")
    return torch.cat(blocks)


def from_insightface(checkpoints: Sequence[Checkpoint], *, scale: float, margins: tuple[float, float, float],
                     straight_through: bool = False, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The marginloss head equal to InsightFace's ``CombinedMarginLoss(scale, *margins)`` on
    the class weights of its ``PartialFC_V2`` checkpoints.

    InsightFace's margin loss has two branches: ``m1 == 1, m3 == 0`` is ArcFace with margin
    ``m2`` (with the same fallback past :math:`\\pi - m_2`), and ``m3 > 0`` is CosFace with
    margin ``m3``, where ``m2`` plays no part; anything else is refused here rather than guessed.
    ``straight_through=True`` gives ArcFace the gradient of InsightFace versions that apply
    the margin with an in-place ``arccos``/``cos`` under ``torch.no_grad`` (gradient 1 with
    respect to the cosine); the default is the exact gradient of the closed form.
    """
    m1, m2, m3 = (float(m) for m in margins)
    weight = insightface_weight(checkpoints)
    if dtype is not None:
        weight = weight.to(dtype)
    num_classes, embedding_dim = weight.shape
    if m1 == 1.0 and m3 == 0.0:
        head = marginloss.ArcFace(embedding_dim, num_classes, scale=scale, margin=m2,
                                  straight_through=straight_through, dtype=weight.dtype)
    elif m3 > 0.0 and m1 == 1.0 and m2 == 0.0:
        head = marginloss.CosFace(embedding_dim, num_classes, scale=scale, margin=m3, dtype=weight.dtype)
    else:
        raise ValueError(f"margins {margins}: InsightFace's CombinedMarginLoss computes (1, m2, 0) (ArcFace) and "
                         "(1, 0, m3) (CosFace); for other combinations use marginloss.CombinedMargin and check "
                         "against your InsightFace version")
    return _copy_weight(head, weight)
