r"""Class sharding over :mod:`torch.distributed`: model-parallel heads and PartialFC sampling.

With millions of identities one device cannot hold the classifier (10M × 512 float32 is
20 GB before its gradient and optimizer state).  A head built with ``process_group=group``
keeps only its rank's contiguous block of class rows (see :func:`shard_range`) and computes
the **same loss as a single-process head on the concatenated global batch**, exactly:

1. every rank exchanges a small fixed-size record of named facts (batch size, dims, dtypes,
   settings, a digest of the head's hyperparameters and of its buffers and non-weight
   parameters, and any local input error), so bad input or ranks that disagree raise the
   same :class:`ValueError` on every rank instead of leaving the others waiting in a
   collective or silently mixing margins;
2. the embeddings are all-gathered (padded to the largest local batch, which gloo needs) by
   an autograd function whose backward sums the embedding gradient over ranks and hands each
   rank its own rows (a reduce-scatter; an all-reduce and slice on backends without one);
   the labels are all-gathered too;
3. each rank runs the engine of :mod:`marginloss.fused` on its shard only, giving per row
   the log-sum-exp of its non-target logits, their sum (label smoothing only) and the
   target cosine if it holds the target class;
4. all-reduces of O(B) floats (the target cosines and norms, the per-row max, then the sum
   of shifted exponentials and sums) assemble the global row statistics, identical on every
   rank, so the head's margin (:meth:`marginloss.MarginHead.target`) runs on the whole
   global batch on every rank alike.

Backward recomputes each chunk of the local shard (but the ones kept within the engine's
cache budget, :func:`~marginloss.fused.set_backward_cache_bytes`) against the *global*
log-sum-exp, so the weight gradient is exact and stays local: no collective ever carries
a ``[C, D]`` tensor.
Per step: five collectives in forward (one fixed-size record, the embeddings, the labels,
two ``[B]``-sized all-reduces) and two in backward (the ``[B]`` loss gradient, averaged over
ranks so that every shard sees the same upstream gradient, and the embedding gradient).

Beside DDP
----------
Wrap the **backbone** in :class:`~torch.nn.parallel.DistributedDataParallel`; do **not**
wrap the head (or any module containing it): its weight is a different block of classes on
every rank and must not be averaged, and DDP would also broadcast its buffers.  Every rank
returns the same global loss :math:`L` (the mean over the global batch), so the gradient
each rank's backbone computes is :math:`\partial L/\partial\theta` through its own samples
only, and the exact gradient is the *sum* over ranks.  DDP *averages*, which leaves the
backbone with :math:`\nabla_\theta L / W`, while the head shard gets the exact
:math:`\nabla_{W_r} L`.  To train exactly like one process on the global batch, multiply the
backbone's gradients by the world size after ``backward()`` (what
``examples/distributed/train.py`` does); leaving them is the same as a backbone learning rate
divided by :math:`W` for SGD (Adam is nearly invariant to it).

PartialFC sampling
------------------
With ``sample_rate < 1`` (and in training mode for the heads), each rank keeps every class
of its shard that is a label somewhere in the global batch plus uniformly drawn other
classes, ``max(ceil(sample_rate * shard_size), positives)`` rows in all (An et al., "Partial
FC: Training 10 Million Identities on a Single Machine", ICCVW 2021).  The loss is then the
softmax cross entropy over the **union of the sampled classes** (label smoothing spreads
over that union), not an estimate of the full softmax.  The draw comes from a generator of
its own seeded from ``(sample_seed, rank, step)`` (:func:`sample_classes`), so a run is
reproducible and the heads keep ``step`` in their ``sample_step`` buffer (saved in the
``state_dict``).  Rows that were not drawn get an exact zero gradient: plain SGD leaves
them unchanged, but momentum, weight decay and Adam-style optimizers still move them with
their decayed state, as any zero gradient does.

Faults
------
When one rank raises *before* it reaches a collective (an exception in your own code, an
out-of-memory error) and stays alive, the other ranks wait in the head's next collective
until the process group's timeout (``timeout=`` of
:func:`torch.distributed.init_process_group`: 30 minutes by default with gloo, 10 with
NCCL).  Set a shorter timeout for jobs that should fail fast, and let ``torchrun``'s failure
handling (``--max-restarts``, the elastic agent tearing the group down when a worker exits)
end the others.  Errors inside the head's own checks never strand a rank: they travel in
the exchanged record and every rank raises them.

Checkpoints and bad input
-------------------------
:func:`gather_weight` assembles the full ``[C, D]`` weight (on every rank or one) for export,
:func:`load_full_weight` loads one into a head of any world size, and
:func:`load_sharded_state_dict` loads a per-rank ``state_dict`` after checking on every rank
that it was saved with the same shard layout.  All ranks must call the same functions in the
same order (forward and backward included, with a possibly empty local batch for uneven
last batches); within that contract an error is raised on every rank, never a hang.
Errors in a head's constructor arguments are raised locally, before any collective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from marginloss import sharding
from marginloss.fused import ChunkSize, MarginContext, TargetFn, margin_loss
from marginloss.heads.base import MarginHead
from marginloss.sharding import sample_classes, shard_range

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "gather_weight",
    "load_full_weight",
    "load_sharded_state_dict",
    "sample_classes",
    "shard_range",
    "sharded_margin_softmax_loss",
]


def sharded_margin_softmax_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    target_fn: TargetFn,
    *,
    num_classes: int,
    process_group: ProcessGroup | None = None,
    scale: float = 1.0,
    normalize_embeddings: bool = True,
    normalize_weight: bool = True,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
    sample_rate: float = 1.0,
    sample_seed: int = 0,
    sample_step: int = 0,
) -> Tensor:
    r"""Margin softmax cross entropy of the global batch with the classes sharded over ranks.

    The functional form of a head built with ``process_group``: the same logits and loss as
    :func:`marginloss.fused.margin_softmax_loss` on the concatenation (in rank order) of every
    rank's ``embeddings`` and ``labels`` against the full ``[num_classes, D]`` weight, of
    which this rank passes only its rows ``shard_range(num_classes, world_size, rank)``.
    Every rank of the group must call it, with any local batch size (zero included).

    Parameters
    ----------
    embeddings : Tensor
        ``[b, D]`` this rank's embeddings (``b`` may differ between ranks).
    weight : Tensor
        ``[shard_size, D]`` this rank's class rows.
    labels : Tensor
        ``[b]`` *global* class indices in ``[0, num_classes)`` or ``ignore_index``.
    target_fn : callable
        The head's margin transform :math:`f` of the target cosine (differentiable).
    num_classes : int
        :math:`C`, the number of classes over all ranks.
    process_group : ProcessGroup or None, default None
        ``None`` runs in this process alone (``weight`` then holds every class), which is
        useful with ``sample_rate < 1``.
    scale, normalize_embeddings, normalize_weight, reduction, label_smoothing, ignore_index
        As in :func:`marginloss.fused.margin_softmax_loss`.
    chunk_size : int, "auto" or None, default "auto"
        Classes per chunk within the shard; ``None`` uses one chunk for the whole shard.
    sample_rate : float in (0, 1], default 1.0
        PartialFC: the fraction of each shard's classes kept per call, positives always
        included (see :func:`sample_classes`); 1 keeps every class.
    sample_seed, sample_step : int, default 0
        Seed the draw together with the rank; pass a new ``sample_step`` every step.

    Returns
    -------
    Tensor
        The same on every rank: a scalar (the mean over the valid rows of the global batch,
        or their sum), or ``[N]`` row losses of the global batch for ``reduction="none"``.

    Raises
    ------
    ValueError
        On every rank, if any rank's input is invalid or the ranks disagree on shapes,
        dtypes, ``num_classes`` or settings.  Without a process group, the usual
        ``TypeError``/``ValueError`` of the failing check.

    Examples
    --------
    Without a process group, ``sample_rate=1`` is the engine itself:

    >>> import torch
    >>> from marginloss.fused import margin_softmax_loss
    >>> x, w = torch.randn(6, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    >>> y = torch.tensor([0, 5, 19, 5, 2, -100])
    >>> def f(cos): return cos - 0.35
    >>> loss = sharded_margin_softmax_loss(x, w, y, f, num_classes=20, scale=30.0, chunk_size=7)
    >>> bool(torch.allclose(loss, margin_softmax_loss(x, w, y, f, scale=30.0)))
    True

    PartialFC over a fifth of the classes equals the full loss restricted to them:

    >>> rows = sample_classes(y, 20, 1, 0, 0.2, seed=1, step=0)
    >>> sampled = sharded_margin_softmax_loss(x, w, y, f, num_classes=20, scale=30.0,
    ...                                       sample_rate=0.2, sample_seed=1)
    >>> restricted = torch.searchsorted(rows, y.clamp_min(0)).where(y >= 0, -100)
    >>> bool(torch.allclose(sampled, margin_softmax_loss(x, w[rows], restricted, f, scale=30.0)))
    True
    """
    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return target_fn(cos)

    return margin_loss(
        embeddings, weight, labels, target, scale=scale, normalize_embeddings=normalize_embeddings,
        normalize_weight=normalize_weight, reduction=reduction, label_smoothing=label_smoothing,
        ignore_index=ignore_index, chunk_size=chunk_size, num_classes=num_classes,
        process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
        sample_step=sample_step,
    )


# ---------------------------------------------------------------- checkpoints


# The named facts the checkpoint helpers exchange, in record order.
_HEAD_FIELDS = ("num_classes", "embedding_dim", "the weight's dtype", "num_subcenters", "shard_start", "shard_size")


def _head_facts(head: MarginHead) -> list[int]:
    values = {
        "num_classes": head.num_classes,
        "embedding_dim": head.embedding_dim,
        "the weight's dtype": sharding.dtype_code(head.weight.dtype),
        "num_subcenters": head.num_subcenters,
        "shard_start": head.shard_start,
        "shard_size": head.weight.shape[0] // head.num_subcenters,
    }
    return [values[name] for name in _HEAD_FIELDS]


def _check_head_layout(rows: list[list[int]], what: str) -> None:
    field = {name: index for index, name in enumerate(_HEAD_FIELDS)}
    for name in ("num_classes", "embedding_dim", "the weight's dtype", "num_subcenters"):
        sharding.require_same(rows, field[name], name, what, sharding.show_dtype if "dtype" in name else None)
    world_size = len(rows)
    for rank, row in enumerate(rows):
        classes, start, size = row[field["num_classes"]], row[field["shard_start"]], row[field["shard_size"]]
        expected = sharding.shard_range(classes, world_size, rank)
        if (start, size) != expected:
            raise ValueError(
                f"{what}: rank {rank} holds rows [{start}, {start + size}) but its shard of "
                f"{classes} classes over {world_size} ranks is [{expected[0]}, {sum(expected)}) "
                f"(raised on every rank)"
            )


def _check_rank_argument(name: str, value: int | None, world_size: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < world_size):
        raise ValueError(f"{name} must be None or a rank in [0, {world_size}), got {value!r}")


def gather_weight(
    head: MarginHead, *, dst: int | None = None, device: torch.device | str = "cpu"
) -> Tensor | None:
    """The full ``[num_classes, embedding_dim]`` weight of a (sharded) head, e.g. for export
    (``[num_classes * num_subcenters, embedding_dim]`` for a head with sub-centres).

    Every rank of the head's group must call it.  Shards travel one at a time (a broadcast
    per rank, or a send to ``dst``), so besides the result each rank holds one shard-sized
    buffer at most.

    Parameters
    ----------
    head : marginloss.MarginHead
        Built with or without ``process_group`` (then this is a copy of its weight).
    dst : int or None, default None
        ``None``: every rank gets the full weight; a rank (of the group): only that rank
        does and the others get ``None``.
    device : torch.device or str, default "cpu"
        Where the full weight is assembled (host memory by default: it may not fit a GPU).

    Returns
    -------
    Tensor or None
        Detached ``[num_classes, embedding_dim]`` in the weight's dtype.

    Examples
    --------
    >>> import marginloss
    >>> head = marginloss.ArcFace(8, 10)
    >>> gather_weight(head).shape
    torch.Size([10, 8])
    """
    group = head.process_group
    world_size, rank = sharding.world(group)
    weight = head.weight.detach()
    per_class = head.num_subcenters
    if group is None:
        _check_rank_argument("dst", dst, world_size)
        return weight.to(device, copy=True)
    error: BaseException | None = None
    try:
        _check_rank_argument("dst", dst, world_size)
    except Exception as exc:  # any local failure must reach the other ranks, not strand them
        error = exc
    what = "gather_weight"
    rows = sharding.exchange(group, weight.device, [*_head_facts(head), -1 if dst is None else int(dst)], error, what)
    _check_head_layout(rows, what)
    sharding.require_same(rows, len(_HEAD_FIELDS), "dst", what)
    full = None
    if dst is None or rank == dst:
        full = torch.empty(head.num_classes * per_class, head.embedding_dim, dtype=weight.dtype, device=device)
    for source in range(world_size):
        start, size = sharding.shard_range(head.num_classes, world_size, source)
        start, size = start * per_class, size * per_class
        source_global = dist.get_global_rank(group, source)
        if dst is None:
            shard = weight.contiguous() if rank == source else weight.new_empty(size, weight.shape[1])
            dist.broadcast(shard, src=source_global, group=group)
        elif source == dst:
            shard = weight
        elif rank == source:
            dist.send(weight.contiguous(), dst=dist.get_global_rank(group, dst), group=group)
            continue
        elif rank == dst:
            shard = weight.new_empty(size, weight.shape[1])
            dist.recv(shard, src=source_global, group=group)
        else:
            continue
        if full is not None:
            full[start : start + size].copy_(shard)
    return full


def _check_full_weight(full_weight: object, num_classes: int, embedding_dim: int) -> Tensor:
    if not isinstance(full_weight, Tensor) or not full_weight.is_floating_point():
        described = f"dtype {full_weight.dtype}" if isinstance(full_weight, Tensor) else type(full_weight).__name__
        raise ValueError(f"full_weight must be a floating-point tensor, got {described}")
    if tuple(full_weight.shape) != (num_classes, embedding_dim):
        raise ValueError(
            f"full_weight must have shape [{num_classes}, {embedding_dim}] (num_classes x "
            f"num_subcenters, embedding_dim), got {tuple(full_weight.shape)}"
        )
    return full_weight


def load_full_weight(head: MarginHead, full_weight: Tensor | None, *, src: int | None = None) -> None:
    """Copy this rank's rows of a full ``[num_classes, embedding_dim]`` weight into a head
    (``[num_classes * num_subcenters, embedding_dim]`` for a head with sub-centres).

    The counterpart of :func:`gather_weight`; works for any world size the head was built
    with, since each rank takes rows ``shard_range(num_classes, world_size, rank)``.

    Parameters
    ----------
    head : marginloss.MarginHead
        Built with or without ``process_group``.
    full_weight : Tensor or None
        ``[num_classes, embedding_dim]`` on every rank (``src=None``, e.g. each rank loads
        the file with ``torch.load(..., mmap=True)``), or only on rank ``src``.
    src : int or None, default None
        The rank (of the group) that holds ``full_weight`` and sends every other rank its
        rows; the others may pass ``None``.

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.CosFace(8, 10)
    >>> load_full_weight(head, torch.ones(10, 8))
    >>> bool((head.weight == 1).all())
    True
    """
    group = head.process_group
    world_size, rank = sharding.world(group)
    error: BaseException | None = None
    try:
        _check_rank_argument("src", src, world_size)
        if src is None or rank == src:
            _check_full_weight(full_weight, head.num_classes * head.num_subcenters, head.embedding_dim)
    except Exception as exc:  # any local failure must reach the other ranks, not strand them
        error = exc
    what = "load_full_weight"
    rows = sharding.exchange(group, head.weight.device, [*_head_facts(head), -1 if src is None else int(src)], error, what)
    _check_head_layout(rows, what)
    sharding.require_same(rows, len(_HEAD_FIELDS), "src", what)
    weight = head.weight
    with torch.no_grad():
        if src is None or group is None:
            assert isinstance(full_weight, Tensor)  # checked above
            start = head.shard_start * head.num_subcenters
            weight.copy_(full_weight[start : start + weight.shape[0]])
            return
        for target in range(world_size):
            start, size = sharding.shard_range(head.num_classes, world_size, target)
            start, size = start * head.num_subcenters, size * head.num_subcenters
            if rank == src:
                assert isinstance(full_weight, Tensor)  # checked above
                rows_of_target = full_weight[start : start + size].to(weight.device, weight.dtype)
                if target == src:
                    weight.copy_(rows_of_target)
                else:
                    dist.send(rows_of_target.contiguous(), dst=dist.get_global_rank(group, target), group=group)
            elif rank == target:
                buffer = torch.empty_like(weight)
                dist.recv(buffer, src=dist.get_global_rank(group, src), group=group)
                weight.copy_(buffer)


def load_sharded_state_dict(head: MarginHead, state_dict: Mapping[str, Any]) -> None:
    """``head.load_state_dict(state_dict)`` after checking, on every rank at once, that each
    rank's ``state_dict`` matches its head (same keys and shapes, same shard layout).

    A per-rank ``state_dict`` of a sharded head holds the buffer ``shard_layout``
    (``[num_classes, world_size, shard_start, shard_size]``); loading it into a head whose
    group splits the classes differently raises a :class:`ValueError` on every rank instead
    of failing on some ranks while the others wait.  To change the world size, save with
    :func:`gather_weight` and load with :func:`load_full_weight`.

    Examples
    --------
    >>> import marginloss
    >>> head = marginloss.ArcFace(8, 10)
    >>> load_sharded_state_dict(head, marginloss.ArcFace(8, 10).state_dict())
    """
    group = head.process_group
    error: BaseException | None = None
    try:
        own = head.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(f"state_dict keys differ from the head's: missing {missing}, unexpected {unexpected}")
        layout = state_dict.get("shard_layout")
        if isinstance(layout, Tensor) and layout.tolist() != own["shard_layout"].tolist():
            saved_classes, saved_world, saved_start, saved_size = layout.tolist()
            classes, world, start, size = own["shard_layout"].tolist()
            raise ValueError(
                f"the checkpoint holds classes [{saved_start}, {saved_start + saved_size}) of "
                f"{saved_classes} split over {saved_world} ranks, this rank's head holds "
                f"[{start}, {start + size}) of {classes} over {world}; load it with the world "
                f"size it was saved with, or go through gather_weight / load_full_weight"
            )
        for key, value in own.items():
            saved = state_dict[key]
            if not isinstance(saved, Tensor) or saved.shape != value.shape:
                got = tuple(saved.shape) if isinstance(saved, Tensor) else type(saved).__name__
                raise ValueError(f"state_dict[{key!r}] must have shape {tuple(value.shape)}, got {got}")
    except Exception as exc:  # any local failure must reach the other ranks, not strand them
        error = exc
    sharding.exchange(group, head.weight.device, [], error, "load_sharded_state_dict")
    head.load_state_dict(state_dict)
