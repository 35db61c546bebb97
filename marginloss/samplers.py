"""Class-balanced P x K batch sampling for pair and triplet losses.

Pair losses (contrastive, triplet, multi-similarity, ...) need several samples of each class
in a batch: a random batch of 64 faces from 7,000 identities holds almost no positive pair.
:class:`ClassBalancedBatchSampler` draws batches of ``P`` classes with ``K`` samples each
(Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person Re-Identification",
arXiv:1703.07737, 2017, who call it P x K sampling).  Torch only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["ClassBalancedBatchSampler"]


class ClassBalancedBatchSampler(Sampler[list[int]]):
    r"""Batches of ``classes_per_batch`` classes with ``samples_per_class`` samples each.

    Pass it as ``batch_sampler=`` to :class:`torch.utils.data.DataLoader`.  Every batch holds
    :math:`P \cdot K` dataset indices, :math:`K` consecutive ones per class, from :math:`P`
    distinct classes.

    How batches are drawn, per epoch (seeded by ``seed + epoch``, so every rank and every
    rerun draws the same):

    - for each global step, :math:`P \cdot R` distinct classes are chosen uniformly among
      the classes with samples (:math:`R` = ``num_replicas``); rank :math:`r` gets classes
      :math:`rP, \dots, (r+1)P - 1`, so the ranks' batches of one step are disjoint (no
      class, hence no sample, in two of them) and the global batch is a
      :math:`PR \times K` batch;
    - each class keeps a shuffled queue of its samples and hands out the next :math:`K`;
      when fewer than :math:`K` remain, the queue is reshuffled (the leftovers wait for a
      later epoch's shuffle).  Within an epoch a sample therefore repeats only once its
      class has used all of its samples;
    - with ``replacement=True``, a class with fewer than :math:`K` samples gets :math:`K`
      draws with replacement instead of raising; classes with enough samples are drawn
      as above.

    ``len(sampler)`` is the number of batches each rank yields per epoch: ``num_batches``,
    or by default ``len(labels) // (P * K * R)`` (about one pass over the data), at least 1.
    Call :meth:`set_epoch` at the start of every epoch, as with
    :class:`~torch.utils.data.distributed.DistributedSampler`.

    Parameters
    ----------
    labels : Tensor or sequence of int
        Class label of every dataset index, e.g. ``dataset.targets``; a 1-D integer tensor
        or a list/tuple of ints (any values; equal values mean the same class).
    classes_per_batch : int
        :math:`P \ge 1`.
    samples_per_class : int
        :math:`K \ge 1` (``K >= 2`` for positive pairs).
    replacement : bool, default False
        Allow classes with fewer than :math:`K` samples (sampled with replacement).
    num_batches : int, optional
        Batches per rank per epoch (default: about one pass over the data, see above).
    seed : int, default 0
        Base seed; epoch ``e`` uses ``seed + e``.
    num_replicas : int, optional
        Number of ranks :math:`R`; default: the world size of the initialised default
        process group, else 1.
    rank : int, optional
        This rank, in ``[0, num_replicas)``; default: the process group's rank, else 0.

    Raises
    ------
    TypeError
        If ``labels`` is not an integer tensor or a sequence of ints, or an int argument
        is not an int.
    ValueError
        If ``labels`` is empty or not 1-D, ``P`` / ``K`` / ``num_batches`` is not positive,
        ``rank`` is outside ``[0, num_replicas)``, fewer than :math:`P R` classes exist, or
        a class has fewer than :math:`K` samples and ``replacement`` is False (the message
        names the classes).

    Examples
    --------
    >>> import torch
    >>> from marginloss.samplers import ClassBalancedBatchSampler
    >>> labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    >>> sampler = ClassBalancedBatchSampler(labels, classes_per_batch=2, samples_per_class=2)
    >>> len(sampler)  # 12 samples // (2 * 2)
    3
    >>> batches = list(sampler)
    >>> [len({labels[i] for i in batch}) for batch in batches]  # 2 classes in each batch
    [2, 2, 2]
    >>> all(len(batch) == 4 for batch in batches)
    True
    >>> # as a DataLoader's batch sampler
    >>> dataset = torch.utils.data.TensorDataset(torch.randn(12, 3), torch.tensor(labels))
    >>> loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    >>> sampler.set_epoch(1)
    >>> [tuple(y.shape) for _, y in loader]
    [(4,), (4,), (4,)]
    """

    def __init__(
        self,
        labels: torch.Tensor | Sequence[int],
        classes_per_batch: int,
        samples_per_class: int,
        *,
        replacement: bool = False,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.labels = _check_sampler_labels(labels)
        self.classes_per_batch = _positive_int("classes_per_batch", classes_per_batch)
        self.samples_per_class = _positive_int("samples_per_class", samples_per_class)
        if not isinstance(replacement, bool):
            raise TypeError(f"replacement must be a bool, got {type(replacement).__name__}")
        self.replacement = replacement
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        self.seed = seed
        self.num_replicas, self.rank = _replicas_and_rank(num_replicas, rank)
        self.epoch = 0

        classes, inverse, counts = torch.unique(self.labels, return_inverse=True, return_counts=True)
        order = torch.argsort(inverse, stable=True)
        self._class_values = classes.tolist()
        self._members = [part.tolist() for part in torch.split(order, counts.tolist())]
        needed = self.classes_per_batch * self.num_replicas
        if len(self._members) < needed:
            raise ValueError(
                f"classes_per_batch * num_replicas = {self.classes_per_batch} * "
                f"{self.num_replicas} = {needed} distinct classes are needed per step, but "
                f"labels hold only {len(self._members)}"
            )
        small = [(value, len(m)) for value, m in zip(self._class_values, self._members)
                 if len(m) < self.samples_per_class]
        if small and not self.replacement:
            shown = ", ".join(f"{value} ({count})" for value, count in small[:5])
            raise ValueError(
                f"samples_per_class={self.samples_per_class}, but {len(small)} class(es) have "
                f"fewer samples, e.g. label (count): {shown}; pass replacement=True to "
                "sample them with replacement, or drop those classes"
            )
        if num_batches is None:
            per_step = self.classes_per_batch * self.samples_per_class * self.num_replicas
            self.num_batches = max(1, len(self.labels) // per_step)
        else:
            self.num_batches = _positive_int("num_batches", num_batches)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (seed ``seed + epoch``), as
        :meth:`torch.utils.data.distributed.DistributedSampler.set_epoch`."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__} {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        k = self.samples_per_class
        queues: list[list[int]] = [[] for _ in self._members]
        cursors = [0] * len(self._members)

        def take(class_index: int) -> list[int]:
            members = self._members[class_index]
            if len(members) < k:  # only with replacement=True
                draws = torch.randint(len(members), (k,), generator=generator).tolist()
                return [members[d] for d in draws]
            if cursors[class_index] + k > len(queues[class_index]):
                permutation = torch.randperm(len(members), generator=generator).tolist()
                queues[class_index] = [members[p] for p in permutation]
                cursors[class_index] = 0
            start = cursors[class_index]
            cursors[class_index] = start + k
            return queues[class_index][start : start + k]

        p = self.classes_per_batch
        for _ in range(self.num_batches):
            chosen = torch.randperm(len(self._members), generator=generator)[: p * self.num_replicas]
            # every rank draws the same global step; each keeps only its own classes' samples
            # (all classes take their samples so the queues stay in step across ranks)
            per_class = [take(int(c)) for c in chosen]
            mine = per_class[self.rank * p : (self.rank + 1) * p]
            yield [index for group in mine for index in group]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={len(self.labels)}, "
            f"num_classes={len(self._members)}, classes_per_batch={self.classes_per_batch}, "
            f"samples_per_class={self.samples_per_class}, replacement={self.replacement}, "
            f"num_batches={self.num_batches}, seed={self.seed}, "
            f"num_replicas={self.num_replicas}, rank={self.rank})"
        )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_sampler_labels(labels: object) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        checked = labels.detach().to("cpu", torch.long)
    elif isinstance(labels, Sequence) and not isinstance(labels, (str, bytes)):
        bad = [x for x in labels if isinstance(x, bool) or not isinstance(x, int)]
        if bad:
            raise TypeError(
                f"labels must be ints, got {len(bad)} other value(s), e.g. {bad[0]!r}"
            )
        checked = torch.tensor(list(labels), dtype=torch.long)
    else:
        raise TypeError(
            f"labels must be a 1-D integer tensor or a sequence of ints, got {type(labels).__name__}"
        )
    if checked.dim() != 1 or checked.numel() == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D sequence of class labels, got shape {tuple(checked.shape)}"
        )
    return checked


def _replicas_and_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    num_replicas = _positive_int("num_replicas", num_replicas)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__} {rank!r}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}) (num_replicas), got {rank}")
    return num_replicas, rank
