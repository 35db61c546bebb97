r"""Class sharding over :mod:`torch.distributed`: model-parallel heads and PartialFC sampling.

With millions of identities one device cannot hold the classifier (10M × 512 float32 is
20 GB before its gradient and optimizer state).  A head built with ``process_group=group``
keeps only its rank's contiguous block of class rows (see :func:`shard_range`) and computes
the **same loss as a single-process head on the concatenated global batch**, exactly:

1. every rank exchanges a small fixed-size record of shape facts (batch size, dims, dtypes,
   settings, and any local input error), so bad input raises the same :class:`ValueError` on
   every rank instead of leaving the others waiting in a collective;
2. the embeddings are all-gathered (padded to the largest local batch, which gloo needs) by
   an autograd function whose backward sums the embedding gradient over ranks and hands each
   rank its own rows (a reduce-scatter; an all-reduce and slice on backends without one);
   the labels are all-gathered too;
3. each rank runs the chunked engine of :mod:`marginloss.fused` on its shard only
   (:func:`~marginloss.fused.rest_logsumexp`), giving per row the log-sum-exp of its
   non-target logits, their sum (label smoothing only) and the target logit if it holds
   the target class;
4. two all-reduces of O(B) floats (the per-row max, then the sum of shifted exponentials,
   target logits and sums) assemble the global row losses, identical on every rank.

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

import math
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from marginloss import _validation as V
from marginloss.fused import (
    ChunkSize,
    TargetFn,
    _compute_dtype,
    _Config,
    _gemm_dtype,
    _kept_blocks,
    _reduce,
    _row_loss,
    _scaled_embeddings,
    _target_cos_radius,
    _wants_gradient,
    _wide_dtype,
    default_chunk_size,
    rest_backward,
    rest_logsumexp,
    scaled_embeddings_backward,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from marginloss.heads import _MarginHead

__all__ = [
    "gather_weight",
    "load_full_weight",
    "load_sharded_state_dict",
    "sample_classes",
    "shard_range",
    "sharded_margin_softmax_loss",
]

_REDUCTIONS = ("mean", "sum", "none")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Room for one error message per rank in the fixed-size record every rank exchanges.
_MESSAGE_BYTES = 512
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------- shards and sampling


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous block of classes rank ``rank`` holds, as ``(start, size)``.

    The first ``num_classes % world_size`` ranks hold ``num_classes // world_size + 1``
    classes and the others ``num_classes // world_size`` (the rule of
    :func:`torch.tensor_split`), so shards differ by at most one row and rank ``r`` holds
    classes ``[start, start + size)`` in rank order.  Every rank must hold at least one class.

    Examples
    --------
    >>> [shard_range(10, 3, r) for r in range(3)]  # 10 = 4 + 3 + 3
    [(0, 4), (4, 3), (7, 3)]
    >>> shard_range(1_000_000, 4, 3)
    (750000, 250000)
    """
    num_classes = V.check_positive_int("num_classes", num_classes)
    world_size = V.check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}) (world_size={world_size}), got {rank!r}")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes must be at least world_size so every rank holds a class, got "
            f"num_classes={num_classes} and world_size={world_size}"
        )
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def _splitmix64(value: int) -> int:
    # SplitMix64's finaliser (Steele, Lea & Flood, OOPSLA 2014): a bijective 64-bit mix, so
    # nearby (seed, rank, step) triples give unrelated generator seeds.
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _mix_seed(seed: int, rank: int, step: int) -> int:
    mixed = _splitmix64(seed & _MASK64)
    mixed = _splitmix64(mixed ^ (rank & _MASK64))
    return _splitmix64(mixed ^ (step & _MASK64)) >> 1


def _num_drawn(sample_rate: float, shard_size: int) -> int:
    # ceil(rate * size), forgiving the rounding of e.g. 0.1 * 30 = 3.0000000000000004.
    return min(shard_size, max(1, math.ceil(sample_rate * shard_size * (1.0 - 1e-12))))


def _positive_counts(labels: Tensor, num_classes: int, world_size: int) -> list[int]:
    """How many distinct labels of the global batch fall in each rank's shard."""
    classes = torch.unique(labels[(labels >= 0) & (labels < num_classes)])
    starts = torch.tensor([shard_range(num_classes, world_size, r)[0] for r in range(world_size)])
    owner = torch.bucketize(classes, starts, right=True) - 1
    return torch.bincount(owner, minlength=world_size).tolist()


def _sampled_total(labels: Tensor, num_classes: int, world_size: int, sample_rate: float) -> int:
    positives = _positive_counts(labels, num_classes, world_size)
    total = 0
    for rank, count in enumerate(positives):
        size = shard_range(num_classes, world_size, rank)[1]
        total += min(size, max(_num_drawn(sample_rate, size), count))
    return total


def sample_classes(
    labels: Tensor,
    num_classes: int,
    world_size: int,
    rank: int,
    sample_rate: float,
    *,
    seed: int = 0,
    step: int = 0,
) -> Tensor:
    """The rows of rank ``rank``'s shard that PartialFC keeps for one step.

    All classes of the shard that occur in ``labels`` (the *global* batch's labels; values
    outside ``[0, num_classes)`` such as ``ignore_index`` are skipped) plus uniformly drawn
    others, ``max(ceil(sample_rate * shard_size), positives)`` rows in all (at most the
    shard).  The draw uses a CPU generator seeded from ``(seed, rank, step)`` only, so every
    run, device and process count with the same shard layout makes the same choice.

    Parameters
    ----------
    labels : Tensor
        ``[N]`` integer labels of the global batch.
    num_classes, world_size, rank : int
        The shard, as in :func:`shard_range`.
    sample_rate : float in (0, 1]
    seed, step : int, default 0

    Returns
    -------
    Tensor
        Sorted int64 row indices into the shard (add the shard's start for class ids), on CPU.

    Examples
    --------
    >>> import torch
    >>> labels = torch.tensor([3, 17, 3, -100])
    >>> rows = sample_classes(labels, 20, 2, 0, 0.3, seed=0, step=0)  # shard 0 = classes 0..9
    >>> len(rows), 3 in rows.tolist()  # ceil(0.3 * 10) rows, the positive class 3 among them
    (3, True)
    >>> torch.equal(rows, sample_classes(labels, 20, 2, 0, 0.3, seed=0, step=0))  # reproducible
    True
    """
    start, size = shard_range(num_classes, world_size, rank)
    sample_rate = V.check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
    labels = labels.detach().to("cpu", torch.int64)
    local = labels - start
    positives = torch.unique(local[(local >= 0) & (local < size)])
    count = min(size, max(_num_drawn(sample_rate, size), positives.numel()))
    generator = torch.Generator().manual_seed(_mix_seed(int(seed), rank, int(step)))
    # Uniform scores in [0, 1) for every row and 2 for the positives: the top `count` are the
    # positives plus a uniformly random subset of the other rows.
    scores = torch.rand(size, generator=generator, dtype=torch.float32)
    scores[positives] = 2.0
    return torch.topk(scores, count, sorted=False).indices.sort().values


def _init_shard_(weight: Tensor, num_classes: int, rank: int) -> None:
    """Xavier-uniform with the bound of the full ``[num_classes, D]`` matrix, drawn from a
    stream of each rank's own, so that shards are not copies of one another.

    The stream's seed mixes one draw from the global generator (which advances alike on
    every rank) with the rank, so ``torch.manual_seed`` still makes the result reproducible.
    """
    bound = math.sqrt(6.0 / (num_classes + weight.shape[1]))
    base = int(torch.randint(0, 2**62, ()))
    if weight.device.type == "meta":
        return
    generator = torch.Generator(device=weight.device).manual_seed(_mix_seed(base, rank, 0))
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)


# ---------------------------------------------------------------- agreement across ranks


def _world(group: ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else len(_DTYPES) + 1


def _float_bits(value: float) -> int:
    bits: int = struct.unpack("<q", struct.pack("<d", float(value)))[0]
    return bits


def _exchange(
    group: ProcessGroup | None,
    device: torch.device,
    facts: Sequence[int],
    error: BaseException | None,
    what: str,
) -> list[list[int]]:
    """All-gather a fixed-size int64 record (``facts`` and this rank's error message, if
    any) and raise the same :class:`ValueError` on every rank when any rank had an error.

    Returns every rank's ``facts``, in rank order.  Without a group the error is re-raised
    as it is.
    """
    if group is None:
        if error is not None:
            raise error
        return [list(facts)]
    world_size, _ = _world(group)
    message = str(error).encode("utf-8")[:_MESSAGE_BYTES] if error is not None else b""
    count = len(facts)
    record = torch.zeros(count + 2 + _MESSAGE_BYTES, dtype=torch.int64)
    # Wrapped into int64 so that no value (a huge seed, say) can fail on one rank alone.
    record[:count] = torch.tensor([(value + 2**63) % 2**64 - 2**63 for value in facts], dtype=torch.int64)
    record[count] = int(error is not None)
    record[count + 1] = len(message)
    record[count + 2 : count + 2 + len(message)] = torch.tensor(list(message), dtype=torch.int64)
    record = record.to(device)
    parts = [torch.empty_like(record) for _ in range(world_size)]
    dist.all_gather(parts, record, group=group)
    rows: list[list[int]] = torch.stack(parts).cpu().tolist()
    problems = [
        f"rank {rank}: {bytes(row[count + 2 : count + 2 + row[count + 1]]).decode('utf-8', 'replace')}"
        for rank, row in enumerate(rows)
        if row[count]
    ]
    if problems:
        raise ValueError(
            f"{what}: invalid input on {len(problems)} of {world_size} rank(s) "
            f"(raised on every rank); " + "; ".join(problems)
        )
    return [row[:count] for row in rows]


def _require_same(rows: list[list[int]], index: int, name: str, what: str, show: Any = None) -> None:
    values = [row[index] for row in rows]
    if len(set(values)) > 1:
        shown = [show(v) for v in values] if show is not None else values
        raise ValueError(
            f"{what}: {name} must be the same on every rank, got {shown} (by rank; raised on every rank)"
        )


def _show_dtype(code: int) -> str:
    return str(_DTYPES[code - 1]).replace("torch.", "") if 1 <= code <= len(_DTYPES) else "other"


def _show_float(bits: int) -> float:
    value: float = struct.unpack("<d", struct.pack("<q", bits))[0]
    return value


# ---------------------------------------------------------------- collectives with autograd


def _all_gather_rows(local: Tensor, group: ProcessGroup, batch_sizes: Sequence[int]) -> Tensor:
    """Concatenate every rank's ``[b_r, ...]`` rows in rank order.

    Each rank sends its rows padded to the largest local batch: all-gather needs equal sizes
    on gloo, and fixed sizes keep every rank's collectives identical.
    """
    largest = max(batch_sizes)
    padded = local.new_zeros((largest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in batch_sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, batch_sizes)])


def _has_reduce_scatter(group: ProcessGroup, tensor: Tensor) -> bool:
    return tensor.is_cuda and "nccl" in str(dist.get_backend(group))


class _GatherEmbeddings(torch.autograd.Function):
    """All-gather of the local embeddings whose backward sums the gradient over ranks and
    returns each rank its own rows (:func:`torch.distributed.all_gather` has no autograd)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        local: Tensor,
        group: ProcessGroup,
        batch_sizes: tuple[int, ...],
        rank: int,
    ) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        ctx.batch_sizes = batch_sizes  # type: ignore[attr-defined]
        ctx.rank = rank  # type: ignore[attr-defined]
        return _all_gather_rows(local, group, batch_sizes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None, None, None]:
        group: ProcessGroup = ctx.group  # type: ignore[attr-defined]
        batch_sizes: tuple[int, ...] = ctx.batch_sizes  # type: ignore[attr-defined]
        rank: int = ctx.rank  # type: ignore[attr-defined]
        largest = max(batch_sizes)
        padded = grad.new_zeros((len(batch_sizes) * largest, *grad.shape[1:]))
        offset = 0
        for source, size in enumerate(batch_sizes):
            padded[source * largest : source * largest + size] = grad[offset : offset + size]
            offset += size
        if _has_reduce_scatter(group, padded):
            mine = grad.new_empty((largest, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, padded, group=group)
        else:
            # gloo has no reduce-scatter: sum everything, keep this rank's block.
            dist.all_reduce(padded, group=group)
            mine = padded[rank * largest : (rank + 1) * largest]
        return mine[: batch_sizes[rank]].clone(), None, None, None


def _combine_rows(
    lse_local: Tensor, sum_local: Tensor | None, target_local: Tensor, group: ProcessGroup | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Global ``lse_rest``, ``sum_rest`` and target logit from every shard's parts."""
    if group is None:
        return lse_local, sum_local, target_local
    row_max = lse_local.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # The target logit is non-zero on the rank holding the target only: summing is exact.
    parts = [torch.exp(lse_local - row_max), target_local.to(lse_local.dtype)]
    if sum_local is not None:
        parts.append(sum_local)
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, group=group)
    lse = row_max + stacked[0].log()
    return lse, (stacked[2] if sum_local is not None else None), stacked[1]


class _ShardedMarginSoftmax(torch.autograd.Function):
    """Global row losses from the local class shard: the engine of :mod:`marginloss.fused`
    on ``weight`` (this rank's rows), combined across ranks by O(B) all-reduces.

    ``labels`` index rows of ``weight``; a label outside ``[0, len(weight))`` is a target
    held by another rank (or an ignored row).  Backward writes the exact local weight
    gradient and this shard's part of the embedding gradient (summed over ranks by
    :class:`_GatherEmbeddings`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        valid: Tensor,
        cfg: _Config,
        group: ProcessGroup | None,
    ) -> Tensor:
        compute = _compute_dtype(embeddings, weight)
        gemm = _gemm_dtype(embeddings.device, compute)
        with torch.autocast(embeddings.device.type, enabled=False):
            x = embeddings.to(compute)
            xs, _ = _scaled_embeddings(x, cfg)
            blocks = _kept_blocks(cfg, x.shape[0], weight.shape[0], compute, x.device)
            lse_local, sum_local = rest_logsumexp(xs.to(gemm), weight, labels, cfg, compute, None, blocks)
            owned = (labels >= 0) & (labels < weight.shape[0])
            # The O(B·D) target path runs wide (float64): sin θ near θ = 0 from an fp32 cos is noise.
            wide = _wide_dtype(x.device)
            rows = weight[labels.clamp(0, weight.shape[0] - 1)].to(wide)
            cos, radius = _target_cos_radius(x.to(wide), rows, cfg.scale, cfg.normalize_embeddings, cfg.normalize_weight)
            target_local = torch.where(owned, radius * cfg.target_fn(cos), torch.zeros_like(cos))
            lse, sum_rest, target_logit = _combine_rows(
                lse_local, sum_local, target_local.to(lse_local.dtype), group
            )
            row = _row_loss(lse, sum_rest, target_logit, cfg.num_classes, cfg.label_smoothing).to(compute)
        ctx.save_for_backward(
            embeddings, weight, labels, valid, lse, target_logit, sum_rest, blocks  # type: ignore[arg-type]
        )
        ctx.cfg = cfg  # type: ignore[attr-defined]
        ctx.group = group  # type: ignore[attr-defined]
        ctx.compute = compute  # type: ignore[attr-defined]
        ctx.gemm = gemm  # type: ignore[attr-defined]
        return row

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_row: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        cfg: _Config = ctx.cfg  # type: ignore[attr-defined]
        group: ProcessGroup | None = ctx.group  # type: ignore[attr-defined]
        compute: torch.dtype = ctx.compute  # type: ignore[attr-defined]
        gemm: torch.dtype = ctx.gemm  # type: ignore[attr-defined]
        embeddings, weight, labels, valid, lse, target_logit, sum_rest, blocks = ctx.saved_tensors  # type: ignore[attr-defined]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        grad_row = torch.where(valid, grad_row.to(compute), torch.zeros((), dtype=compute, device=valid.device))
        if group is not None:
            # Every shard must see the same upstream gradient for the pieces to add up to one
            # gradient; averaging makes that hold even if ranks backpropagate different values.
            dist.all_reduce(grad_row, group=group)
            grad_row = grad_row / dist.get_world_size(group)

        with torch.autocast(embeddings.device.type, enabled=False):
            with torch.enable_grad():
                lse_leaf = lse.detach().requires_grad_(True)
                target_leaf = target_logit.detach().requires_grad_(True)
                sum_leaf = sum_rest.detach().requires_grad_(True) if sum_rest is not None else None
                row = _row_loss(lse_leaf, sum_leaf, target_leaf, cfg.num_classes, cfg.label_smoothing)
                leaves = [lse_leaf, target_leaf] + ([sum_leaf] if sum_leaf is not None else [])
                grads = torch.autograd.grad(row, leaves, grad_row.to(row.dtype))
            grad_lse, grad_target = grads[0], grads[1]
            grad_sum = grads[2] if sum_leaf is not None else None

            # The target logit, on the rank that holds the target row only.
            owned = (labels >= 0) & (labels < weight.shape[0])
            safe = labels.clamp(0, weight.shape[0] - 1)
            grad_target = torch.where(owned, grad_target, torch.zeros_like(grad_target))
            x = embeddings.to(compute)
            grad_x_target = grad_rows_target = None
            if need_x or need_w:
                wide = _wide_dtype(x.device)
                with torch.enable_grad():
                    x_leaf = x.detach().to(wide).requires_grad_(need_x)
                    rows_leaf = weight.detach()[safe].to(wide).requires_grad_(need_w)
                    cos, radius = _target_cos_radius(
                        x_leaf, rows_leaf, cfg.scale, cfg.normalize_embeddings, cfg.normalize_weight
                    )
                    target = radius * cfg.target_fn(cos)
                    inputs = [t for t in (x_leaf, rows_leaf) if t.requires_grad]
                    target_grads = list(
                        torch.autograd.grad(target, inputs, grad_target.to(target.dtype), allow_unused=True)
                    )
                if need_x:
                    grad_x_target = target_grads.pop(0).to(compute)
                if need_w:
                    grad_rows_target = target_grads.pop(0).to(compute)

            # The non-target columns of this shard, chunk by chunk, against the global lse.
            xs, x_inv_norm = _scaled_embeddings(x, cfg)
            grad_xs, grad_weight = rest_backward(
                xs.to(gemm), weight, labels, lse, grad_lse, grad_sum, cfg, compute, need_x, need_w,
                None, blocks,
            )
            grad_embeddings = None
            if grad_xs is not None:
                grad_x = scaled_embeddings_backward(grad_xs, x, x_inv_norm, cfg)
                if grad_x_target is not None:
                    grad_x = grad_x + grad_x_target
                grad_embeddings = grad_x.to(embeddings.dtype)
            if grad_weight is not None and grad_rows_target is not None:
                grad_weight.index_add_(0, safe, grad_rows_target.to(weight.dtype))
        return grad_embeddings, grad_weight, None, None, None, None


# ---------------------------------------------------------------- the loss


def _check_local_inputs(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    num_classes: int,
    world_size: int,
    rank: int,
    reduction: str,
    label_smoothing: float,
    ignore_index: int,
    chunk_size: ChunkSize,
    sample_rate: float,
    sample_seed: int,
    sample_step: int,
) -> Tensor:
    """This rank's own checks (raising); returns the labels as int64."""
    V.check_choice("reduction", reduction, _REDUCTIONS)
    V.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    V.check_chunk_size(chunk_size)
    V.check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
    for name, value in (("ignore_index", ignore_index), ("sample_seed", sample_seed), ("sample_step", sample_step)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if sample_step < 0:
        raise ValueError(f"sample_step must be >= 0, got {sample_step}")
    start, size = shard_range(num_classes, world_size, rank)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        described = f"shape {tuple(weight.shape)} dtype {weight.dtype}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a floating [shard_size, embedding_dim] tensor, got {described}")
    if weight.shape[0] != size:
        raise ValueError(
            f"weight has {weight.shape[0]} rows but rank {rank} of {world_size} holds classes "
            f"[{start}, {start + size}) of num_classes={num_classes} ({size} rows); build the head "
            f"with this process group, or load a full weight with load_full_weight"
        )
    V.check_embeddings(embeddings, weight.shape[1])
    checked = V.check_labels(labels, embeddings.shape[0], num_classes, ignore_index)
    V.check_same_device(embeddings=embeddings, weight=weight, labels=checked)
    return checked


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
    group = process_group
    world_size, rank = _world(group)
    device = weight.device if isinstance(weight, Tensor) else torch.device("cpu")
    error: BaseException | None = None
    checked = labels
    try:
        checked = _check_local_inputs(
            embeddings, weight, labels, num_classes, world_size, rank, reduction, label_smoothing,
            ignore_index, chunk_size, sample_rate, sample_seed, sample_step,
        )
    except Exception as exc:  # any local failure must reach the other ranks, not strand them
        error = exc
    facts = [0] * 15
    if error is None:
        needs_grad = torch.is_grad_enabled()
        facts = [
            embeddings.shape[0],
            weight.shape[1],
            _dtype_code(embeddings.dtype),
            _dtype_code(weight.dtype),
            num_classes,
            int(needs_grad and embeddings.requires_grad),
            int(needs_grad and weight.requires_grad),
            _float_bits(scale),
            int(normalize_embeddings) + 2 * int(normalize_weight),
            _REDUCTIONS.index(reduction),
            _float_bits(label_smoothing),
            ignore_index,
            _float_bits(sample_rate),
            sample_seed,
            sample_step,
        ]
    what = "sharded margin softmax"
    rows = _exchange(group, device, facts, error, what)
    for index, name, show in (
        (4, "num_classes", None),
        (1, "embedding_dim", None),
        (2, "the embeddings' dtype", _show_dtype),
        (3, "the weight's dtype", _show_dtype),
        (5, "embeddings.requires_grad (every rank must backpropagate, or none)", None),
        (6, "weight.requires_grad (every rank must backpropagate, or none)", None),
        (7, "scale", _show_float),
        (8, "normalize_embeddings + 2 * normalize_weight", None),
        (9, "reduction", lambda i: _REDUCTIONS[i]),
        (10, "label_smoothing", _show_float),
        (11, "ignore_index", None),
        (12, "sample_rate", _show_float),
        (13, "sample_seed", None),
        (14, "sample_step", None),
    ):
        _require_same(rows, index, name, what, show)

    batch_sizes = tuple(row[0] for row in rows)
    total = sum(batch_sizes)
    if total == 0:
        # Every rank is empty: a zero loss still connected to the inputs, no collectives.
        zero = embeddings.sum() * 0.0 + weight[:0].sum()
        zero = zero.to(_compute_dtype(embeddings, weight))
        return zero.expand(0) if reduction == "none" else zero

    if group is None:
        x_global, labels_global = embeddings, checked
    else:
        x_global = _GatherEmbeddings.apply(embeddings, group, batch_sizes, rank)
        labels_global = _all_gather_rows(checked, group, batch_sizes)
    valid = labels_global != ignore_index
    safe = torch.where(valid, labels_global, torch.full_like(labels_global, -1))
    start, _ = shard_range(num_classes, world_size, rank)

    classes = num_classes
    used = weight
    local_labels = torch.where(valid, safe - start, torch.full_like(safe, -1))
    if sample_rate < 1.0:
        safe_cpu = safe.cpu()
        kept = sample_classes(safe_cpu, num_classes, world_size, rank, sample_rate, seed=sample_seed, step=sample_step)
        classes = _sampled_total(safe_cpu, num_classes, world_size, sample_rate)
        kept = kept.to(weight.device)
        used = weight.index_select(0, kept)
        position = torch.searchsorted(kept, local_labels).clamp_max(kept.numel() - 1)
        hit = valid & (kept[position] == local_labels)
        local_labels = torch.where(hit, position, torch.full_like(position, -1))

    if chunk_size is None:
        width = used.shape[0]
    elif chunk_size == "auto":
        width = default_chunk_size(total, used.shape[0], used.device)
    else:
        width = int(chunk_size)
    cfg = _Config(
        target_fn, float(scale), normalize_embeddings, normalize_weight, float(label_smoothing),
        classes, min(width, used.shape[0]),
        keep_blocks=_wants_gradient(x_global, used),
    )
    row = _ShardedMarginSoftmax.apply(x_global, used, local_labels, valid, cfg, group)
    return _reduce(row, valid, reduction)


# ---------------------------------------------------------------- checkpoints


def _head_facts(head: _MarginHead) -> list[int]:
    return [
        head.num_classes,
        head.embedding_dim,
        _dtype_code(head.weight.dtype),
        head.shard_start,
        head.weight.shape[0],
    ]


def _check_head_layout(rows: list[list[int]], what: str) -> None:
    _require_same(rows, 0, "num_classes", what)
    _require_same(rows, 1, "embedding_dim", what)
    _require_same(rows, 2, "the weight's dtype", what, _show_dtype)
    world_size = len(rows)
    for rank, row in enumerate(rows):
        expected = shard_range(row[0], world_size, rank)
        if (row[3], row[4]) != expected:
            raise ValueError(
                f"{what}: rank {rank} holds rows [{row[3]}, {row[3] + row[4]}) but its shard of "
                f"{row[0]} classes over {world_size} ranks is [{expected[0]}, {sum(expected)}) "
                f"(raised on every rank)"
            )


def _check_rank_argument(name: str, value: int | None, world_size: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < world_size):
        raise ValueError(f"{name} must be None or a rank in [0, {world_size}), got {value!r}")


def gather_weight(
    head: _MarginHead, *, dst: int | None = None, device: torch.device | str = "cpu"
) -> Tensor | None:
    """The full ``[num_classes, embedding_dim]`` weight of a (sharded) head, e.g. for export.

    Every rank of the head's group must call it.  Shards travel one at a time (a broadcast
    per rank, or a send to ``dst``), so besides the result each rank holds one shard-sized
    buffer at most.

    Parameters
    ----------
    head : a classification head
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
    world_size, rank = _world(group)
    weight = head.weight.detach()
    if group is None:
        _check_rank_argument("dst", dst, world_size)
        return weight.to(device, copy=True)
    error: BaseException | None = None
    try:
        _check_rank_argument("dst", dst, world_size)
    except Exception as exc:  # any local failure must reach the other ranks, not strand them
        error = exc
    what = "gather_weight"
    rows = _exchange(group, weight.device, [*_head_facts(head), -1 if dst is None else int(dst)], error, what)
    _check_head_layout(rows, what)
    _require_same(rows, 5, "dst", what)
    full = None
    if dst is None or rank == dst:
        full = torch.empty(head.num_classes, head.embedding_dim, dtype=weight.dtype, device=device)
    for source in range(world_size):
        start, size = shard_range(head.num_classes, world_size, source)
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
            f"full_weight must have shape [{num_classes}, {embedding_dim}] (num_classes, "
            f"embedding_dim), got {tuple(full_weight.shape)}"
        )
    return full_weight


def load_full_weight(head: _MarginHead, full_weight: Tensor | None, *, src: int | None = None) -> None:
    """Copy this rank's rows of a full ``[num_classes, embedding_dim]`` weight into a head.

    The counterpart of :func:`gather_weight`; works for any world size the head was built
    with, since each rank takes rows ``shard_range(num_classes, world_size, rank)``.

    Parameters
    ----------
    head : a classification head
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
    world_size, rank = _world(group)
    error: BaseException | None = None
    try:
        _check_rank_argument("src", src, world_size)
        if src is None or rank == src:
            _check_full_weight(full_weight, head.num_classes, head.embedding_dim)
    except Exception as exc:  # any local failure must reach the other ranks, not strand them
        error = exc
    what = "load_full_weight"
    rows = _exchange(group, head.weight.device, [*_head_facts(head), -1 if src is None else int(src)], error, what)
    _check_head_layout(rows, what)
    _require_same(rows, 5, "src", what)
    weight = head.weight
    with torch.no_grad():
        if src is None or group is None:
            assert isinstance(full_weight, Tensor)  # checked above
            start = head.shard_start
            weight.copy_(full_weight[start : start + weight.shape[0]])
            return
        for target in range(world_size):
            start, size = shard_range(head.num_classes, world_size, target)
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


def load_sharded_state_dict(head: _MarginHead, state_dict: Mapping[str, Any]) -> None:
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
    _exchange(group, head.weight.device, [], error, "load_sharded_state_dict")
    head.load_state_dict(state_dict)
