r"""UniformFace: the A-Softmax head plus the uniform loss on the class centres."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from marginloss import _validation as V
from marginloss import fused, sharding
from marginloss.fused import ChunkSize
from marginloss.heads.base import register_head
from marginloss.heads.sphereface import Lambda, SphereFace, sphereface

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["UniformFace", "uniform_loss", "uniformface", "update_centers"]

PAIRS = ("all", "batch")
# Unit vectors are at most 2 apart: d^2 below this is a coincident pair, whose sqrt would
# have an infinite derivative; it is held at this floor (its gradient is then 0).
_MIN_SQUARED = 1e-24


def _pair_terms(rows: Tensor, cols: Tensor) -> Tensor:
    r"""``[r, c]`` :math:`1 / (\lVert\hat c_j - \hat c_k\rVert + 1)` of unit vectors (GEMM form)."""
    squared = (2.0 - 2.0 * (rows @ cols.T)).clamp_min(_MIN_SQUARED)
    return 1.0 / (squared.sqrt() + 1.0)


def update_centers(centers: Tensor, embeddings: Tensor, labels: Tensor, center_lr: float = 0.5) -> Tensor:
    r"""The class centres after one mini-batch update (rows of the batch's classes only).

    .. math::
        \Delta c_j = \frac{\sum_i [y_i = j]\,(c_j - \hat x_i)}{1 + \sum_i [y_i = j]}, \qquad
        c_j \leftarrow c_j - \alpha\,\Delta c_j,

    with :math:`\hat x_i = x_i / \lVert x_i\rVert` (the features on the hypersphere).
    ``centers`` is ``[n, D]``, the current centres of the ``n`` classes ``labels`` indexes
    (``labels`` in ``[0, n)``); differentiable in ``embeddings``.

    Examples
    --------
    >>> import torch
    >>> update_centers(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), torch.tensor([0]), 1.0)
    tensor([[0.3000, 0.4000]])
    """
    unit = F.normalize(embeddings, dim=1)
    counts = torch.bincount(labels, minlength=centers.shape[0]).to(unit.dtype)[:, None]
    sums = torch.zeros_like(centers, dtype=unit.dtype).index_add(0, labels, unit)
    return centers - center_lr * (counts * centers - sums) / (1.0 + counts)


def uniform_loss(centers: Tensor) -> Tensor:
    r"""The uniform loss of a set of class centres ``[n, D]`` (projected onto the sphere).

    .. math::
        L_u = \frac{1}{n(n-1)} \sum_{j=1}^{n} \sum_{k \ne j} \frac{1}{\lVert\hat c_j - \hat c_k\rVert_2 + 1}

    over all :math:`n(n-1)` ordered pairs; 0 for fewer than two centres.  Holds one
    ``[n, n]`` matrix: use it for a few centres (a batch's classes); :class:`marginloss.UniformFace`
    computes the loss over all classes in blocks.

    Examples
    --------
    >>> import torch
    >>> round(float(uniform_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))), 6)  # antipodal: 1 / (2 + 1)
    0.333333
    """
    n = centers.shape[0]
    if n < 2:
        return centers.sum() * 0.0
    unit = F.normalize(centers, dim=1)
    terms = _pair_terms(unit, unit)
    off = ~torch.eye(n, dtype=torch.bool, device=centers.device)
    return torch.where(off, terms, torch.zeros_like(terms)).sum() / (n * (n - 1))


def _pair_terms_(rows: Tensor, cols: Tensor) -> Tensor:
    """:func:`_pair_terms` in place on the GEMM's output (no autograd: fewer passes)."""
    block = rows @ cols.T
    return block.mul_(-2.0).add_(2.0).clamp_min_(_MIN_SQUARED).sqrt_().add_(1.0).reciprocal_()


def _tile(device: torch.device) -> int:
    """Side of the square ``[tile, tile]`` blocks of pair terms: about the engine's auto block
    size in elements (1024 for its 4 MiB on the CPU)."""
    elements = fused.default_chunk_size(1, 1 << 30, device)  # the block size in elements
    return max(1, math.isqrt(elements))


def _total_pairs(unit: Tensor, chunk: int | None) -> Tensor:
    r""":math:`\sum_{j \ne k} 1 / (\lVert\hat c_j - \hat c_k\rVert + 1)` over all ordered pairs of
    the unit rows ``[C, D]``, no autograd (float64 sum).

    Square ``[tile, tile]`` blocks on and above the block diagonal only (the terms are
    symmetric: each off-diagonal block counts twice), so the :math:`C^2 D` multiply-adds are
    halved and every block is a GEMM of two small panels; ``tile`` is ``chunk`` when given.
    """
    num_classes = unit.shape[0]
    tile = chunk if chunk is not None else _tile(unit.device)
    total = torch.zeros((), dtype=torch.float64, device=unit.device)
    with torch.no_grad():
        for start in range(0, num_classes, tile):
            rows = unit[start : start + tile]
            block = _pair_terms_(rows, rows)
            block.fill_diagonal_(0.0)
            total = total + block.sum(dtype=torch.float64)
            for other in range(start + tile, num_classes, tile):
                total = total + 2.0 * _pair_terms_(rows, unit[other : other + tile]).sum(dtype=torch.float64)
    return total


def _chunk_pairs(rows: Tensor, cols: Tensor, weight: Tensor) -> Tensor:
    return (_pair_terms(rows, cols) * weight).sum()


def _batch_pairs(full: Tensor, classes: Tensor, rows: Tensor, chunk: int | None, differentiable: bool) -> Tensor:
    r"""Every ordered pair with a class of the batch, once: :math:`\sum_{j\in b}\sum_{k\ne j}
    w_{jk} f(d_{jk})` with :math:`w = 1` for :math:`k` in the batch (``(k, j)`` is another
    row) and 2 outside (``(k, j)`` has no row here).  ``full`` ``[C, D]`` unit centres whose
    rows ``classes`` are ``rows`` ``[n, D]``; ``[n, chunk]`` blocks, under activation
    checkpointing when ``differentiable``."""
    num_classes = full.shape[0]
    width = chunk if chunk is not None else fused.default_chunk_size(max(classes.numel(), 1), num_classes, full.device)
    in_batch = torch.zeros(num_classes, dtype=torch.bool, device=full.device)
    in_batch[classes] = True
    base = torch.where(in_batch, 1.0, 2.0).to(full.dtype)
    total = torch.zeros((), dtype=full.dtype, device=full.device)
    for start in range(0, num_classes, width):
        stop = min(start + width, num_classes)
        weight = base[None, start:stop].expand(classes.numel(), -1).clone()
        local = classes - start
        inside = torch.nonzero((local >= 0) & (local < stop - start)).squeeze(1)
        weight[inside, local[inside]] = 0.0
        if differentiable:
            part = checkpoint(_chunk_pairs, rows, full[start:stop], weight, use_reentrant=False)
        else:
            with torch.no_grad():
                part = _chunk_pairs(rows, full[start:stop], weight)
        total = total + part
    return total


def _all_pairs_uniform(
    old: Tensor, classes: Tensor, new: Tensor, chunk: int | None, total: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r""":math:`L_u` over all :math:`C(C-1)` pairs of the centres ``old`` ``[C, D]`` (no
    gradient) with the rows ``classes`` replaced by ``new`` (differentiable), and the new
    pair total; never a ``[C, C]`` matrix.

    ``total`` is the pair sum of ``old`` if known (else computed, :math:`O(C^2 D)`).  Pairs of
    two classes outside the batch are then ``total`` minus the old pairs with a batch class,
    so a step costs :math:`O(n C D)`, two passes of ``[n, chunk]`` blocks.
    """
    num_classes = old.shape[0]
    unit_old = F.normalize(old, dim=1)
    if total is None:
        total = _total_pairs(unit_old, chunk)
    old_part = _batch_pairs(unit_old, classes, unit_old[classes], chunk, differentiable=False)
    unit_new = F.normalize(new, dim=1)
    full = unit_old.index_copy(0, classes, unit_new)
    new_part = _batch_pairs(full, classes, unit_new, chunk, differentiable=True)
    constant = (total - old_part.to(torch.float64)).to(new_part.dtype)
    value = (constant + new_part) / (num_classes * (num_classes - 1))
    return value, (constant.to(torch.float64) + new_part.detach().to(torch.float64))


def _uniform_of(
    centers: Tensor, classes: Tensor, new_rows: Tensor, pairs: str, chunk: int | None, total: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    if pairs == "batch":
        return uniform_loss(new_rows), None
    if centers.shape[0] < 2:
        return new_rows.sum() * 0.0, None
    return _all_pairs_uniform(centers, classes, new_rows, chunk, total)


def uniformface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    centers: Tensor,
    *,
    margin: int = 4,
    lambda_: Lambda = 0.0,
    uniform_weight: float = 1.0,
    center_lr: float = 0.5,
    uniform_pairs: str = "all",
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""UniformFace loss at annealing weight ``lambda_``; see :class:`marginloss.UniformFace`.

    ``centers`` ``[C, D]`` are the class centres before this batch; the loss uses their
    updated values (:func:`update_centers`, differentiable in ``embeddings``) and leaves
    ``centers`` unchanged: store the update yourself if you keep them.

    Examples
    --------
    >>> import torch
    >>> x, w, c = torch.randn(8, 16), torch.randn(100, 16), torch.randn(100, 16)
    >>> uniformface(x, w, torch.randint(0, 100, (8,)), c, lambda_=5.0).shape
    torch.Size([])
    """
    uniform_weight = V.check_float("uniform_weight", uniform_weight, low=0.0)
    center_lr = V.check_float("center_lr", center_lr, low=0.0, high=1.0)
    uniform_pairs = V.check_choice("uniform_pairs", uniform_pairs, PAIRS)
    loss = sphereface(
        embeddings, weight, labels, margin=margin, lambda_=lambda_, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )
    if not isinstance(centers, Tensor) or tuple(centers.shape) != tuple(weight.shape):
        got = tuple(centers.shape) if isinstance(centers, Tensor) else type(centers).__name__
        raise ValueError(f"centers must be a tensor of the weight's shape {tuple(weight.shape)}, got {got}")
    compute = torch.promote_types(torch.promote_types(embeddings.dtype, centers.dtype), torch.float32)
    labels = labels.long()
    valid = labels != ignore_index
    classes, inverse = torch.unique(labels[valid], return_inverse=True)
    old = centers.detach().to(compute)
    new_rows = update_centers(old[classes], embeddings.to(compute)[valid], inverse, center_lr)
    chunk = chunk_size if isinstance(chunk_size, int) else None
    uniform = _uniform_of(old, classes, new_rows, uniform_pairs, chunk)[0].to(loss.dtype) * uniform_weight
    if reduction != "none":
        return loss + uniform
    per_row = uniform / valid.sum().clamp_min(1).to(loss.dtype)
    return loss + torch.where(valid, per_row, torch.zeros_like(loss))


@register_head("uniformface")
class UniformFace(SphereFace):
    r"""UniformFace: SphereFace (A-Softmax) plus the uniform loss spreading the class centres.

    .. math::
        L = L_{A\text{-}Softmax} + \lambda L_u, \qquad
        L_u = \frac{1}{C(C-1)} \sum_{j=1}^{C} \sum_{k \ne j} \frac{1}{\lVert\hat c_j - \hat c_k\rVert_2 + 1},

    the electric potential energy of unit charges at the class centres :math:`\hat c_j` on
    the hypersphere (the "+1" keeps it bounded).  :math:`L_{A\text{-}Softmax}` is exactly
    :class:`marginloss.SphereFace` (same margin, same annealing, same ``iteration`` buffer).

    The centres are the buffer ``centers`` ``[C, D]`` (saved in the ``state_dict``), updated
    by the paper's mini-batch rule (that of the center loss) from the features projected
    onto the sphere, :math:`\hat x_i = x_i / \lVert x_i\rVert`:

    .. math::
        c_j^{new} = c_j - \alpha\,\frac{\sum_i [y_i = j](c_j - \hat x_i)}{1 + \sum_i [y_i = j]}

    for the classes of the batch, once per training forward (not in eval mode, not when
    activation checkpointing replays a forward).  :math:`L_u` is computed at
    :math:`c^{new}`, which is a differentiable function of the batch's features, so the
    uniform loss reaches the network through :math:`\partial c_j^{new} / \partial x_i =
    \alpha / (1 + n_j)\,\partial\hat x_i/\partial x_i`; the buffer keeps the detached value.
    In eval mode :math:`L_u` uses the stored centres and has no gradient.  Centres start as
    random unit vectors from a fixed seed (the same on every rank and in every process).

    **Which pairs, and why "all" is the default.**  The paper defines the uniform loss as the
    total electric potential energy of *the class centres* as like charges on the
    hypersphere (abstract; the formula above, the mean over all ordered pairs of the
    :math:`C` centres with the "+1" in the denominator), and updates the centres of the
    batch's classes only, by the center loss's mini-batch rule.  ``uniform_pairs="all"``
    (default) is that formula: all :math:`C(C-1)` ordered pairs, never a ``[C, C]`` matrix.
    Only pairs with one of the batch's :math:`n` classes change in a step; the head keeps the
    running sum of all pair terms, so a step costs :math:`O(nCD)` (the old and the new pairs
    of the batch's classes, ``[n, chunk]`` blocks, the new ones under activation
    checkpointing so that one block is held), like the A-Softmax logits themselves.  The
    full sum, :math:`C^2 D/2` multiply-adds in square ``[tile, tile]`` blocks on and above the
    block diagonal without autograd (``tile`` 1024 on the CPU, or ``chunk_size`` when it is an
    int), runs on the first step and whenever the centres were changed other than by a
    training step (a loaded ``state_dict``, ``.to()``): at :math:`C = 10^5`, :math:`D = 512`
    about 25 s on 2 CPU cores (the first step 30 s, later steps 3 s with B = 256), far less on
    a GPU; at :math:`C = 10^6` it is a hundred times that.
    ``uniform_pairs="batch"`` (the explicit choice for very many classes, or for a
    benchmark): only the :math:`n(n-1)` pairs among the :math:`n` distinct classes of the
    batch, one ``[n, n]`` matrix (:math:`n \le B`), no first-step cost; it is what the public
    PyTorch port computes (``compute_in_batch: True`` in its configuration), an estimate
    whose gradient differs from the all-pairs one (a batch's centres repel each other, not
    the classes outside the batch).

    ``reduction``: ``"mean"`` gives the mean A-Softmax loss plus :math:`\lambda L_u`, ``"sum"``
    the summed A-Softmax loss plus :math:`\lambda L_u`, ``"none"`` the ``[B]`` A-Softmax rows
    plus :math:`\lambda L_u / B_{valid}` on each non-ignored row (so their sum is ``"sum"``).
    Class-sharded (``process_group``): the A-Softmax part runs on the engine's shards, the
    centres are replicated on every rank and :math:`L_u` is computed on the global batch,
    identically on every rank.

    ``torch.compile(head, fullgraph=True)`` does not apply: the batch's distinct classes
    (``torch.unique``) have a data-dependent count, and the centre update writes a
    buffer; compile the backbone and call the head eagerly (or let ``torch.compile`` break
    the graph there).

    Duan, Lu & Zhou, "UniformFace: Learning Deep Equidistributed Representation for Face
    Recognition", CVPR 2019.  No official release exists; ``uniform_weight`` 1.0 is the
    weight of the public (unofficial) PyTorch port (ka-tsu-mo/pytorch-uniformface, its
    ``alpha: 1.0``), ``center_lr`` 0.5 the centre learning rate of the center loss (Wen et al.,
    ECCV 2016) whose update rule the paper adopts; the port itself trains with centre update
    rates 0 and 0.001 and reports the uniform loss going to NaN at 0.1 and 0.01.  The
    A-Softmax part keeps SphereFace's margin 4 and its release's annealing, on which the
    paper's SphereFace-based experiments build.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C` (at least 2 for a non-zero :math:`L_u`).
    margin, lambda_base, lambda_gamma, lambda_power, lambda_min
        The A-Softmax margin and annealing, defaults as :class:`marginloss.SphereFace`
        (4, 1000.0, 0.12, 1.0, 5.0: the SphereFace release).
    uniform_weight : float, default 1.0
        :math:`\lambda \ge 0`, the weight of the uniform loss.
    center_lr : float, default 0.5
        :math:`\alpha \in [0, 1]`, the centres' update rate.
    uniform_pairs : {"all", "batch"}, default "all"
        Which pairs of centres :math:`L_u` covers (above).
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :class:`torch.nn.CrossEntropyLoss`; ``"mean"`` averages over the rows whose label is
        not ``ignore_index`` (an all-ignored batch gives 0).
    label_smoothing : float, default 0.0
        As in :class:`torch.nn.CrossEntropyLoss`, in ``[0, 1]``.
    ignore_index : int, default -100
        Rows with this label contribute nothing (PyTorch's convention).
    chunk_size : int, "auto" or None, default "auto"
        Classes per chunk of the engine; ``"auto"`` picks plain autograd for small problems and the
        chunked engine otherwise, ``None`` is plain autograd (see :mod:`marginloss.fused`).
    process_group : ProcessGroup, optional
        Shard the classes over this group (see :mod:`marginloss.distributed`).
    sample_rate : float, default 1.0
        PartialFC: the fraction of each shard's classes kept per training step, in ``(0, 1]``.
    sample_seed : int, default 0
        Seeds the PartialFC draw together with the rank and the step.
    device : torch.device or str, optional
        Where the weight is created.
    dtype : torch.dtype, optional
        The weight's dtype (float32 by default).

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.UniformFace(16, 100)
    >>> before = head.centers.clone()
    >>> loss = head(torch.randn(8, 16), torch.randint(0, 100, (8,)))
    >>> loss.backward()
    >>> int((head.centers != before).any(1).sum()) <= 8  # only the batch's classes moved
    True
    >>> 1 / 3 <= float(head.uniform_term()) <= 1.0
    True
    """

    centers: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        margin: int = 4,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
        uniform_weight: float = 1.0,
        center_lr: float = 0.5,
        uniform_pairs: str = "all",
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        chunk_size: ChunkSize = "auto",
        process_group: ProcessGroup | None = None,
        sample_rate: float = 1.0,
        sample_seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        uniform_weight = V.check_float("uniform_weight", uniform_weight, low=0.0)
        center_lr = V.check_float("center_lr", center_lr, low=0.0, high=1.0)
        uniform_pairs = V.check_choice("uniform_pairs", uniform_pairs, PAIRS)
        super().__init__(
            embedding_dim, num_classes, margin=margin, lambda_base=lambda_base, lambda_gamma=lambda_gamma,
            lambda_power=lambda_power, lambda_min=lambda_min, reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
            device=device, dtype=dtype,
        )
        self.uniform_weight = uniform_weight
        self.center_lr = center_lr
        self.uniform_pairs = uniform_pairs
        generator = torch.Generator().manual_seed(0)
        start = torch.randn(num_classes, embedding_dim, generator=generator, dtype=torch.float64)
        start = F.normalize(start, dim=1).to(dtype=self.weight.dtype, device=self.weight.device)
        self.register_buffer("centers", start)
        self._replay_rows: Tensor | None = None
        # Running sum of the pair terms of the stored centres (uniform_pairs="all"), so that a
        # step costs O(n C D): refreshed each step, recomputed when the centres changed else.
        self._pair_total: Tensor | None = None
        self._pair_stamp: tuple[int, int] = (0, -1)
        self._replay_total: Tensor | None = None

    def hyperparameters(self) -> dict[str, Any]:
        found = super().hyperparameters()
        found.update(uniform_weight=self.uniform_weight, center_lr=self.center_lr, uniform_pairs=self.uniform_pairs)
        return found

    def _pair_chunk(self) -> int | None:
        return self.chunk_size if isinstance(self.chunk_size, int) else None

    def uniform_term(self) -> Tensor:
        r""":math:`L_u` of the stored centres over all :math:`C(C-1)` pairs (no gradient;
        ``[rows, C]`` blocks, :math:`O(C^2 D)`)."""
        if self.num_classes < 2:
            return torch.zeros((), dtype=torch.float64, device=self.centers.device)
        unit = F.normalize(self.centers.detach().to(torch.promote_types(self.centers.dtype, torch.float32)), dim=1)
        return _total_pairs(unit, self._pair_chunk()) / (self.num_classes * (self.num_classes - 1))

    def _global_batch(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        assert self.process_group is not None
        import torch.distributed as dist

        group = self.process_group
        size = torch.tensor([embeddings.shape[0]], device=embeddings.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=group)
        batch_sizes = tuple(int(s) for s in sizes)
        gathered = sharding.gather_embeddings(embeddings, group, batch_sizes, self.rank)
        # Every rank backpropagates the same L_u and the gather's backward sums over ranks:
        # scale this path by 1/W so each rank's rows get the gradient once.
        gathered = gathered.detach() + (gathered - gathered.detach()) / self.world_size
        all_labels = sharding.all_gather_rows(labels.long(), group, batch_sizes)
        return gathered, all_labels

    def _known_total(self) -> Tensor | None:
        """The running pair total of the stored centres, if they are unchanged since it was
        taken (a loaded ``state_dict``, ``.to()`` or an edit by hand invalidate it)."""
        if self._pair_total is None or self._pair_stamp != (self.centers.data_ptr(), self.centers._version):
            return None
        return self._pair_total

    def _uniform(self, embeddings: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
        compute = torch.promote_types(torch.promote_types(embeddings.dtype, self.centers.dtype), torch.float32)
        classes, inverse = torch.unique(labels[valid], return_inverse=True)
        replay = fused.replaying_forward()
        if replay and self._replay_rows is not None and self._replay_rows.shape[0] == classes.numel():
            old_rows = self._replay_rows.to(compute)
            known = self._replay_total
        else:
            old_rows = self.centers[classes].to(compute)
            known = self._known_total()
        x = embeddings.to(compute)[valid]
        new_rows = update_centers(old_rows, x, inverse, self.center_lr) if self.training else old_rows
        if self.training and not replay:
            self._replay_rows, self._replay_total = old_rows.detach().clone(), known
            with torch.no_grad():
                self.centers[classes] = new_rows.detach().to(self.centers.dtype)
        # The centres before this step (the buffer may already hold the new rows).
        before = self.centers.detach().to(compute).index_copy(0, classes, old_rows.detach())
        value, total = _uniform_of(before, classes, new_rows, self.uniform_pairs, self._pair_chunk(), known)
        if total is not None and not replay:
            self._pair_total = total
            self._pair_stamp = (self.centers.data_ptr(), self.centers._version)
        return value

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The A-Softmax loss of the batch plus ``uniform_weight`` times the uniform loss."""
        loss = super().forward(embeddings, labels)  # checks every input (on every rank)
        x, y = embeddings, labels.long()
        if self.process_group is not None:
            x, y = self._global_batch(x, y)
        valid = y != self.ignore_index
        uniform = self._uniform(x, y, valid).to(loss.dtype) * self.uniform_weight
        if self.reduction != "none":
            return loss + uniform
        per_row = uniform / valid.sum().clamp_min(1).to(loss.dtype)
        return loss + torch.where(valid, per_row, torch.zeros_like(loss))
