r"""Class shards, PartialFC sampling and the collectives the sharded engine uses.

This module sits below the heads and the engine: it knows nothing about margins.  It holds

* the shard layout (:func:`shard_range`) and the PartialFC draw (:func:`sample_classes`);
* the fixed-size record every rank exchanges before the first collective of a call
  (:func:`exchange`), so that bad input on one rank raises the same :class:`ValueError`
  on every rank instead of leaving the others waiting;
* :func:`gather_embeddings`, an all-gather whose backward reduce-scatters (sums the
  gradient over ranks and hands each rank its own rows), and the O(B) reductions the
  engine combines its row statistics with (:func:`all_reduce_logsumexp`,
  :func:`average_over_ranks`).

Plain ``torch.distributed.all_gather`` carries no autograd, and gloo cannot gather
uneven sizes: every gather here pads to the largest local batch.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from marginloss import _validation as V

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "all_gather_rows",
    "all_ranks_raise",
    "all_reduce_logsumexp",
    "average_over_ranks",
    "dtype_code",
    "exchange",
    "float_bits",
    "gather_embeddings",
    "init_shard_",
    "mix_seed",
    "require_same",
    "sample_classes",
    "sampled_total",
    "shard_range",
    "show_dtype",
    "show_float",
    "sum_over_ranks",
    "world",
]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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


def mix_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit generator seed from ``(seed, rank, step)``: unrelated for nearby triples."""
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


def sampled_total(labels: Tensor, num_classes: int, world_size: int, sample_rate: float) -> int:
    """How many classes PartialFC keeps over all ranks for these global labels (the size of
    the sampled softmax, which label smoothing spreads over)."""
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
    generator = torch.Generator().manual_seed(mix_seed(int(seed), rank, int(step)))
    # Uniform scores in [0, 1) for every row and 2 for the positives: the top `count` are the
    # positives plus a uniformly random subset of the other rows.
    scores = torch.rand(size, generator=generator, dtype=torch.float32)
    scores[positives] = 2.0
    return torch.topk(scores, count, sorted=False).indices.sort().values


def init_shard_(weight: Tensor, num_classes: int, rank: int) -> None:
    """Xavier-uniform with the bound of the full ``[num_classes, D]`` matrix, drawn from a
    stream of each rank's own, so that shards are not copies of one another.

    The stream's seed mixes one draw from the global generator (which advances alike on
    every rank) with the rank, so ``torch.manual_seed`` still makes the result reproducible.
    """
    bound = math.sqrt(6.0 / (num_classes + weight.shape[1]))
    base = int(torch.randint(0, 2**62, ()))
    if weight.device.type == "meta":
        return
    generator = torch.Generator(device=weight.device).manual_seed(mix_seed(base, rank, 0))
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)


# ---------------------------------------------------------------- agreement across ranks


def world(group: ProcessGroup | None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``; ``(1, 0)`` without one."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def dtype_code(dtype: torch.dtype) -> int:
    """A small int naming a floating dtype in the exchanged record (see :func:`show_dtype`)."""
    return DTYPES.index(dtype) + 1 if dtype in DTYPES else len(DTYPES) + 1


def float_bits(value: float) -> int:
    """The IEEE-754 bits of a float as an int64, so floats travel exactly in the record."""
    bits: int = struct.unpack("<q", struct.pack("<d", float(value)))[0]
    return bits


def exchange(
    group: ProcessGroup | None,
    device: torch.device,
    facts: Sequence[int],
    error: BaseException | None,
    what: str,
    extra: Tensor | None = None,
) -> list[list[int]]:
    """All-gather a fixed-size int64 record (``facts`` and this rank's error message, if
    any) and raise the same :class:`ValueError` on every rank when any rank had an error.

    ``extra``, an int64 vector already on ``device`` (a digest computed there, say), is
    appended to ``facts`` without a host round trip of its own.  Returns every rank's
    ``facts`` (and ``extra``), in rank order.  Without a group the error is re-raised as it
    is.
    """
    if group is None:
        if error is not None:
            raise error
        return [list(facts) + ([] if extra is None else extra.tolist())]
    world_size, _ = world(group)
    message = str(error).encode("utf-8")[:_MESSAGE_BYTES] if error is not None else b""
    count = len(facts)
    record = torch.zeros(count + 2 + _MESSAGE_BYTES, dtype=torch.int64)
    # Wrapped into int64 so that no value (a huge seed, say) can fail on one rank alone.
    record[:count] = torch.tensor([(value + 2**63) % 2**64 - 2**63 for value in facts], dtype=torch.int64)
    record[count] = int(error is not None)
    record[count + 1] = len(message)
    record[count + 2 : count + 2 + len(message)] = torch.tensor(list(message), dtype=torch.int64)
    record = record.to(device)
    extra_count = 0
    if extra is not None:
        extra_count = extra.numel()
        record = torch.cat([record, extra.to(device, torch.int64).flatten()])
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
    tail = len(rows[0]) - extra_count
    return [row[:count] + row[tail:] for row in rows]


def require_same(rows: list[list[int]], index: int, name: str, what: str, show: Any = None) -> None:
    """Raise (on every rank alike) unless every rank's record holds the same value at ``index``."""
    values = [row[index] for row in rows]
    if len(set(values)) > 1:
        shown = [show(v) for v in values] if show is not None else values
        raise ValueError(
            f"{what}: {name} must be the same on every rank, got {shown} (by rank; raised on every rank)"
        )


def show_dtype(code: int) -> str:
    """The dtype name of a :func:`dtype_code`."""
    return str(DTYPES[code - 1]).replace("torch.", "") if 1 <= code <= len(DTYPES) else "other"


def show_float(bits: int) -> float:
    """The float of :func:`float_bits`."""
    value: float = struct.unpack("<d", struct.pack("<q", bits))[0]
    return value


# ---------------------------------------------------------------- collectives with autograd


def all_gather_rows(local: Tensor, group: ProcessGroup, batch_sizes: Sequence[int]) -> Tensor:
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
        return all_gather_rows(local, group, batch_sizes)

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



def gather_embeddings(local: Tensor, group: ProcessGroup, batch_sizes: tuple[int, ...], rank: int) -> Tensor:
    """Every rank's ``[b_r, D]`` rows in rank order, differentiable: the backward sums the
    gradient over ranks and hands each rank its own rows."""
    gathered: Tensor = _GatherEmbeddings.apply(local, group, batch_sizes, rank)
    return gathered


def average_over_ranks(tensor: Tensor, group: ProcessGroup) -> Tensor:
    """The mean of ``tensor`` over the ranks of ``group`` (a new tensor, no autograd).

    The engine's backward averages its incoming O(B) gradients this way: every rank computes
    the same loss, so they agree, and averaging keeps the shards' pieces consistent even
    when ranks backpropagate different values.
    """
    total = tensor.detach().clone()
    dist.all_reduce(total, group=group)
    return total / dist.get_world_size(group)


def all_reduce_logsumexp(local: Tensor, group: ProcessGroup) -> Tensor:
    """``log Σ_r exp(local_r)`` over ranks (no autograd), stable for ``-inf`` entries."""
    row_max = local.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    total = torch.exp(local - row_max)
    dist.all_reduce(total, group=group)
    return row_max + total.log()


def all_ranks_raise(
    group: ProcessGroup | None, device: torch.device, check: Callable[[], Any], what: str
) -> Any:
    """Run ``check`` and make its failure, if any, every rank's ``ValueError``."""
    error: BaseException | None = None
    result = None
    try:
        result = check()
    except Exception as exc:  # any local failure must reach the other ranks, not strand them
        error = exc
    exchange(group, device, [], error, what)
    return result


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of per-rank pieces of a value every rank then uses alike; backward
    hands each rank's piece the gradient of the sum, averaged over ranks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, local: Tensor, group: ProcessGroup
    ) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        total = local.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None]:
        group: ProcessGroup = ctx.group  # type: ignore[attr-defined]
        return average_over_ranks(grad.contiguous(), group), None


def sum_over_ranks(local: Tensor, group: ProcessGroup) -> Tensor:
    """``Σ_r local_r`` over the ranks of ``group``, differentiable.

    For an O(B) quantity that one rank computes per row (the term of the class it holds,
    zero on the others) and every rank then uses alike in the same loss: each rank
    backpropagates the same upstream gradient, so backward passes it (averaged over ranks,
    as :func:`average_over_ranks` does for the engine) to each rank's piece, and only the
    rank that owns a row's term puts a gradient into it.
    """
    total: Tensor = _SumOverRanks.apply(local, group)
    return total
