r"""L-GM: the large-margin Gaussian-mixture loss, with its own class-chunked computation.

Why not :class:`~marginloss.MarginHead`: the engine computes cosine logits
:math:`\rho\,g(\cos\theta) + b` with one scalar bias.  L-GM's logits are negative
(Mahalanobis) squared distances, :math:`x\cdot\mu_k - \lVert\mu_k\rVert^2/2` up to a term common
to the row, so they need a per-class offset (:math:`-\lVert\mu_k\rVert^2/2`, and
:math:`-\tfrac12\log\lvert\Lambda_k\rvert` for a diagonal covariance) and, for the diagonal
covariance, a second GEMM (:math:`x^2 (1/\sigma^2)^\top`).  The engine has neither, so
:class:`LGM` is a plain :class:`torch.nn.Module` with the same keywords the heads share where
they make sense (``reduction``, ``label_smoothing``, ``ignore_index``, ``chunk_size``,
``device``, ``dtype``, and for class sharding ``process_group``, ``sample_rate``,
``sample_seed``); it is not in the head registry (:func:`marginloss.create_head` builds
``MarginHead`` subclasses only).

Class sharding follows the margin engine (:mod:`marginloss.distributed`): each rank holds
the means (and log-variances) of its block of classes, the embeddings and labels of every
rank are all-gathered (the gather's backward sums the embedding gradient over ranks), the
chunked Function walks the local classes and combines each row's non-target log-sum-exp and
sum over ranks with O(B) all-reduces (its backward averages the incoming O(B) gradients over
ranks and takes each block's softmax against the *global* log-sum-exp, so the gradients of
the local means and variances are exact and stay local).  The target's distance and
log-determinant, which the margin logit and the likelihood term need, are computed by the
rank that holds the class (zero elsewhere) and summed over ranks by
:func:`marginloss.sharding.sum_over_ranks`, whose backward hands the gradient to that rank's
piece only.  PartialFC sampling restricts each shard to the batch's classes plus drawn
others (:func:`marginloss.sharding.sample_classes`), as for the margin heads.

The chunked path is one :class:`torch.autograd.Function` with a closed-form backward (not
``torch.utils.checkpoint`` per chunk): the non-target log-sum-exp of a row is a smooth
function of the logits whose gradient is the non-target softmax, and the gradients of the
squared distances with respect to ``x``, the means and the log-variances are GEMMs of that
softmax block with ``x``, ``x**2`` and the means.  So forward and backward each walk the
classes once holding one ``[B, chunk]`` block, the backward needs no autograd graph per
chunk (checkpointing would rebuild one per chunk and keep its ``[B, chunk]`` intermediates
alive during that chunk's backward, several blocks at once), and nothing ``[B, C, D]``
exists on any path.  The target logit and the likelihood term are O(B·D) and run in plain
autograd outside the Function, as the margin heads' target does.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from marginloss import _validation as V
from marginloss import fused, sharding
from marginloss.fused import ChunkSize

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["LGM", "lgm", "lgm_logits"]

COVARIANCES = ("identity", "diagonal")


def _check_alpha(alpha: object) -> float:
    return V.check_float("alpha", alpha, low=0.0)


def _check_lambda(lambda_lkd: object) -> float:
    return V.check_float("lambda_lkd", lambda_lkd, low=0.0)


def _check_parameters(means: object, log_variance: object, embedding_dim: int | None = None) -> None:
    if not isinstance(means, Tensor) or means.dim() != 2 or not means.is_floating_point():
        got = f"shape {tuple(means.shape)}, dtype {means.dtype}" if isinstance(means, Tensor) else type(means).__name__
        raise ValueError(f"means must be a floating [num_classes, embedding_dim] tensor, got {got}")
    if embedding_dim is not None and means.shape[1] != embedding_dim:
        raise ValueError(
            f"means must have shape [num_classes, {embedding_dim}] to match embeddings, got {tuple(means.shape)}"
        )
    if log_variance is not None:
        if not isinstance(log_variance, Tensor) or tuple(log_variance.shape) != tuple(means.shape):
            got = str(tuple(log_variance.shape)) if isinstance(log_variance, Tensor) else type(log_variance).__name__
            raise ValueError(f"log_variance must be None or a tensor of the means' shape {tuple(means.shape)}, got {got}")
        if not log_variance.is_floating_point():
            raise ValueError(f"log_variance must be floating, got dtype {log_variance.dtype}")


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _block_logits(x: Tensor, x_sq: Tensor, xx: Tensor, means: Tensor, log_variance: Tensor | None) -> Tensor:
    r"""``[B, c]`` margin-free logits :math:`-\tfrac12 d_{ik} - \tfrac12\log\lvert\Lambda_k\rvert`
    of a block of classes, from GEMMs (``x_sq`` = ``x**2``, ``xx`` its row sums)."""
    if log_variance is None:
        squared = xx[:, None] - 2.0 * (x @ means.T) + (means * means).sum(1)[None, :]
        return -0.5 * squared.clamp_min(0.0)
    inv = torch.exp(-log_variance)
    squared = x_sq @ inv.T - 2.0 * (x @ (means * inv).T) + (means * means * inv).sum(1)[None, :]
    return -0.5 * squared.clamp_min(0.0) - 0.5 * log_variance.sum(1)[None, :]


def _target_mask(z: Tensor, labels: Tensor, start: int) -> Tensor:
    """``[B, width]`` True at each row's target inside the block of classes ``[start, start + width)``."""
    width = z.shape[1]
    local = labels - start
    inside = (local >= 0) & (local < width)
    column = torch.arange(width, device=z.device)[None, :]
    return inside[:, None] & (column == local[:, None])


def _plain_rest(x: Tensor, means: Tensor, log_variance: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor]:
    z = _block_logits(x, x * x, (x * x).sum(1), means, log_variance)
    hit = _target_mask(z, labels, 0)
    rest = torch.logsumexp(z.masked_fill(hit, float("-inf")), dim=1)
    return rest, z.masked_fill(hit, 0.0).sum(1)


class _ChunkedRest(torch.autograd.Function):
    """Non-target log-sum-exp :math:`r_i = \\log\\sum_{k\\ne y_i} e^{z_{ik}}` and sum
    :math:`S_i = \\sum_{k\\ne y_i} z_{ik}` (for label smoothing) over class chunks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        means: Tensor,
        log_variance: Tensor | None,
        labels: Tensor,
        chunk: int,
        group: ProcessGroup | None = None,
    ) -> tuple[Tensor, Tensor]:
        x_sq = x * x
        xx = x_sq.sum(1)
        running_max = torch.full_like(xx, float("-inf"))
        running_sum = torch.zeros_like(xx)
        logit_sum = torch.zeros_like(xx)
        for start in range(0, means.shape[0], chunk):
            stop = min(start + chunk, means.shape[0])
            block_var = None if log_variance is None else log_variance[start:stop]
            z = _block_logits(x, x_sq, xx, means[start:stop], block_var)
            hit = _target_mask(z, labels, start)
            logit_sum = logit_sum + z.masked_fill(hit, 0.0).sum(1)
            z = z.masked_fill(hit, float("-inf"))
            new_max = torch.maximum(running_max, z.amax(1))
            safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            running_sum = running_sum * torch.exp(running_max - safe) + torch.exp(z - safe[:, None]).sum(1)
            running_max = new_max
        safe = torch.where(torch.isfinite(running_max), running_max, torch.zeros_like(running_max))
        rest = safe + running_sum.log()
        if group is not None:
            # This shard's row statistics to the global ones (O(B) all-reduces); backward
            # then takes each block's softmax against the global log-sum-exp.
            rest = sharding.all_reduce_logsumexp(rest, group)
            torch.distributed.all_reduce(logit_sum, group=group)
        ctx.save_for_backward(x, means, log_variance, labels, rest)  # type: ignore[arg-type]
        ctx.chunk = chunk  # type: ignore[attr-defined]
        ctx.group = group  # type: ignore[attr-defined]
        return rest, logit_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_rest: Tensor, grad_sum: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, means, log_variance, labels, rest = ctx.saved_tensors  # type: ignore[attr-defined]
        chunk: int = ctx.chunk  # type: ignore[attr-defined]
        group: ProcessGroup | None = ctx.group  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        if group is not None:
            # Every shard must see the same upstream gradient for the pieces to add up
            # (as in the margin engine): average it over ranks.
            both = sharding.average_over_ranks(torch.stack([grad_rest, grad_sum]), group)
            grad_rest, grad_sum = both[0], both[1]
        x_sq = x * x
        xx = x_sq.sum(1)
        grad_x = torch.zeros_like(x) if needs[0] else None
        grad_means = torch.zeros_like(means) if needs[1] else None
        grad_var = torch.zeros_like(log_variance) if log_variance is not None and needs[2] else None
        scale = grad_rest.to(x.dtype)[:, None]
        ones = grad_sum.to(x.dtype)[:, None]
        for start in range(0, means.shape[0], chunk):
            stop = min(start + chunk, means.shape[0])
            mu = means[start:stop]
            block_var = None if log_variance is None else log_variance[start:stop]
            z = _block_logits(x, x_sq, xx, mu, block_var)
            hit = _target_mask(z, labels, start)
            # dr/dz = the non-target softmax and dS/dz = 1 (both exactly 0 at each row's target).
            p = torch.exp(z.masked_fill(hit, float("-inf")) - rest[:, None]) * scale
            p = p + torch.where(hit, torch.zeros_like(p), ones.expand_as(p))
            col = p.sum(0)[:, None]
            if block_var is None:
                if grad_x is not None:
                    grad_x -= x * p.sum(1, keepdim=True) - p @ mu
                if grad_means is not None:
                    grad_means[start:stop] = p.T @ x - col * mu
                continue
            inv = torch.exp(-block_var)
            if grad_x is not None:
                grad_x -= x * (p @ inv) - p @ (mu * inv)
            px = p.T @ x
            if grad_means is not None:
                grad_means[start:stop] = (px - col * mu) * inv
            if grad_var is not None:
                grad_var[start:stop] = 0.5 * (p.T @ x_sq - 2.0 * mu * px + col * mu * mu) * inv - 0.5 * col
        return grad_x, grad_means, grad_var, None, None, None


def _resolve_chunk(chunk_size: ChunkSize, batch: int, num_classes: int, device: torch.device) -> int | None:
    if chunk_size is None:
        return None
    if chunk_size == "auto":
        if batch * num_classes <= fused.plain_path_elements():
            return None
        return fused.default_chunk_size(batch, num_classes, device)
    return min(int(chunk_size), num_classes)


def lgm_logits(
    embeddings: Tensor,
    means: Tensor,
    labels: Tensor | None = None,
    *,
    alpha: float = 0.1,
    log_variance: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""``[B, C]`` L-GM logits :math:`-\tfrac12 d_{ik} - \tfrac12\log\lvert\Lambda_k\rvert`;
    with ``labels`` the target column carries the margin, :math:`-\tfrac12(1+\alpha)d_{iy_i}
    - \tfrac12\log\lvert\Lambda_{y_i}\rvert`.  Materialises the ``[B, C]`` matrix (from GEMMs).

    Examples
    --------
    >>> import torch
    >>> lgm_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    tensor([[-0., -1.]])
    >>> lgm_logits(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
    ...            torch.tensor([0]), alpha=1.0)
    tensor([[-1.0000, -2.5000]])
    """
    V.check_embeddings(embeddings)
    _check_parameters(means, log_variance, embeddings.shape[1])
    alpha = _check_alpha(alpha)
    compute = _compute_dtype(embeddings, means, log_variance)
    x = embeddings.to(compute)
    mu = means.to(compute)
    u = None if log_variance is None else log_variance.to(compute)
    z = _block_logits(x, x * x, (x * x).sum(1), mu, u)
    if labels is None:
        return z
    labels = V.check_labels(labels, x.shape[0], mu.shape[0], ignore_index)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    d_target, logdet = _target_terms(x, mu, u, safe)
    target = -0.5 * (1.0 + alpha) * d_target - 0.5 * logdet
    current = z.gather(1, safe[:, None]).squeeze(1)
    return z.scatter(1, safe[:, None], torch.where(valid, target, current)[:, None])


def _target_terms(x: Tensor, means: Tensor, log_variance: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor]:
    """:math:`d_{iy_i}` (exact, from the difference) and :math:`\\log\\lvert\\Lambda_{y_i}\\rvert`."""
    diff = x - means[labels]
    if log_variance is None:
        return (diff * diff).sum(1), torch.zeros_like(diff[:, 0])
    u = log_variance[labels]
    return (diff * diff * torch.exp(-u)).sum(1), u.sum(1)


def lgm(
    embeddings: Tensor,
    means: Tensor,
    labels: Tensor,
    *,
    alpha: float = 0.1,
    lambda_lkd: float = 0.01,
    log_variance: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""The L-GM loss :math:`L_{cls} + \lambda L_{lkd}`; see :class:`marginloss.LGM`.

    The module's arguments in its order, with the parameters as tensors: ``means`` ``[C, D]``
    and, in place of ``covariance``, ``log_variance`` (``[C, D]``, :math:`\log\sigma^2`: the
    diagonal covariance; ``None``: the identity).

    Examples
    --------
    >>> import torch
    >>> x, mu = torch.randn(8, 16), torch.randn(100, 16)
    >>> lgm(x, mu, torch.randint(0, 100, (8,)), alpha=0.1, lambda_lkd=0.01).shape
    torch.Size([])
    """
    return _lgm_loss(
        embeddings, means, labels, alpha=alpha, lambda_lkd=lambda_lkd, log_variance=log_variance,
        reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


_REDUCTIONS = ("mean", "sum", "none")


def _check_call(
    embeddings: Tensor,
    means: Tensor,
    labels: Tensor,
    log_variance: Tensor | None,
    *,
    num_classes: int,
    world_size: int,
    rank: int,
    alpha: float,
    lambda_lkd: float,
    reduction: str,
    label_smoothing: float,
    ignore_index: int,
    chunk_size: object,
    sample_rate: float,
    embedding_dim: int | None = None,
) -> tuple[Tensor, float, float, int | str | None]:
    """Every check of one call that this process can make on its own (raising)."""
    V.check_embeddings(embeddings, embedding_dim, check_values=False)
    _check_parameters(means, log_variance, embeddings.shape[1])
    alpha = _check_alpha(alpha)
    lambda_lkd = _check_lambda(lambda_lkd)
    V.check_choice("reduction", reduction, _REDUCTIONS)
    V.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    chunk = V.check_chunk_size(chunk_size)
    V.check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
    start, size = sharding.shard_range(num_classes, world_size, rank)
    if means.shape[0] != size:
        if world_size > 1:
            raise ValueError(
                f"means has {means.shape[0]} rows but rank {rank} of {world_size} holds classes "
                f"[{start}, {start + size}) of num_classes={num_classes} ({size} rows); build the "
                f"head with this process group"
            )
        raise ValueError(f"means must have {size} rows (num_classes={num_classes}), got shape {tuple(means.shape)}")
    V.check_same_device(embeddings=embeddings, means=means)
    checked = V.check_labels(labels, embeddings.shape[0], None, ignore_index)
    # One synchronisation for the finite embeddings and the label range (always on the CPU).
    V.check_inputs_values(embeddings, None, checked, num_classes, ignore_index)
    return checked, alpha, lambda_lkd, chunk


def _agree(
    group: ProcessGroup,
    device: torch.device,
    facts: list[tuple[str, int, Any]],
    error: BaseException | None,
) -> list[int]:
    """Exchange the named facts (and any local error) and raise on every rank alike when a
    rank failed or the ranks disagree; returns every rank's batch size."""
    what = "sharded LGM"
    rows = sharding.exchange(group, device, [value for _, value, _ in facts], error, what)
    for index, (name, _, show) in enumerate(facts[1:], start=1):
        sharding.require_same(rows, index, name, what, show)
    return [row[0] for row in rows]


def _lgm_loss(
    embeddings: Tensor,
    means: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    lambda_lkd: float,
    log_variance: Tensor | None,
    reduction: str,
    label_smoothing: float,
    ignore_index: int,
    chunk_size: ChunkSize,
    num_classes: int | None = None,
    process_group: ProcessGroup | None = None,
    sample_rate: float = 1.0,
    sample_seed: int = 0,
    sample_step: int = 0,
    embedding_dim: int | None = None,
) -> Tensor:
    """The L-GM loss of :func:`lgm`, optionally class-sharded over ``process_group`` (``means``
    and ``log_variance`` then hold this rank's rows of ``num_classes``) and PartialFC-sampled.

    Sharded, as the margin engine: the embeddings and labels are all-gathered (the gather's
    backward sums the embedding gradient over ranks), each rank walks its own classes and
    the non-target log-sum-exp and sum of each row are combined over ranks by O(B)
    all-reduces; the target's distance and log-determinant come from the rank that holds the
    class (zero elsewhere) and are summed over ranks by :func:`sharding.sum_over_ranks`, so
    the margin logit and :math:`L_{lkd}` get their exact gradients on the owning rank only.
    """
    group = process_group
    world_size, rank = sharding.world(group)
    total_classes = num_classes if num_classes is not None else (
        means.shape[0] if isinstance(means, Tensor) and means.dim() == 2 else 0
    )
    device = means.device if isinstance(means, Tensor) else torch.device("cpu")
    error: BaseException | None = None
    checked: tuple[Tensor, float, float, int | str | None] | None = None
    try:
        V.check_positive_int("num_classes", total_classes)
        checked = _check_call(
            embeddings, means, labels, log_variance, num_classes=total_classes, world_size=world_size, rank=rank,
            alpha=alpha, lambda_lkd=lambda_lkd, reduction=reduction, label_smoothing=label_smoothing,
            ignore_index=ignore_index, chunk_size=chunk_size, sample_rate=sample_rate, embedding_dim=embedding_dim,
        )
        V.check_int64("sample_seed", sample_seed)
        V.check_int64("sample_step", sample_step)
    except Exception as exc:
        if group is None:
            raise
        error = exc
    if group is not None:
        grad = torch.is_grad_enabled()
        facts: list[tuple[str, int, Any]] = [("batch size", 0, None)]
        if checked is not None:
            facts = [
                ("batch size", embeddings.shape[0], None),
                ("num_classes", total_classes, None),
                ("embedding_dim", means.shape[1], None),
                ("the embeddings' dtype", sharding.dtype_code(embeddings.dtype), sharding.show_dtype),
                ("the means' dtype", sharding.dtype_code(means.dtype), sharding.show_dtype),
                ("covariance", int(log_variance is not None), lambda v: COVARIANCES[v]),
                ("embeddings.requires_grad (every rank must backpropagate, or none)",
                 int(grad and embeddings.requires_grad), None),
                ("means.requires_grad (every rank must backpropagate, or none)", int(grad and means.requires_grad), None),
                ("log_variance.requires_grad (every rank must backpropagate, or none)",
                 int(grad and log_variance is not None and log_variance.requires_grad), None),
                ("alpha", sharding.float_bits(checked[1]), sharding.show_float),
                ("lambda_lkd", sharding.float_bits(checked[2]), sharding.show_float),
                ("reduction", _REDUCTIONS.index(reduction), lambda i: _REDUCTIONS[i]),
                ("label_smoothing", sharding.float_bits(label_smoothing), sharding.show_float),
                ("ignore_index", ignore_index, None),
                ("sample_rate", sharding.float_bits(sample_rate), sharding.show_float),
                ("sample_seed", sample_seed, None),
                ("sample_step", sample_step, None),
            ]
        else:
            facts += [("", 0, None)] * 16
        batch_sizes = tuple(_agree(group, device, facts, error))
    assert checked is not None  # every failure above raised
    labels, alpha, lambda_lkd, chunk_setting = checked
    compute = _compute_dtype(embeddings, means, log_variance)
    device_type = embeddings.device.type
    off = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()
    if group is None:
        x_all, labels_all = embeddings, labels
    else:
        if sum(batch_sizes) == 0:
            # Every rank is empty: a zero loss still connected to the inputs, no collectives.
            zero = (embeddings.sum() * 0.0 + means[:0].sum()).to(compute)
            if log_variance is not None:
                zero = zero + log_variance[:0].sum().to(compute)
            return zero.expand(0) if reduction == "none" else zero
        x_all = sharding.gather_embeddings(embeddings, group, batch_sizes, rank)
        labels_all = sharding.all_gather_rows(labels, group, batch_sizes)
    in_range = (labels_all >= 0) & (labels_all < total_classes)
    ignored = labels_all == ignore_index
    valid = in_range & ~ignored
    # With value checks off (labels off the CPU), a label outside [0, C) that is not
    # ignore_index makes its row NaN: never another class's loss.
    bad = None if V.labels_checked(labels_all) else ~in_range & ~ignored
    safe = torch.where(valid, labels_all, torch.zeros_like(labels_all))
    start, _ = sharding.shard_range(total_classes, world_size, rank)
    local = safe - start
    owned = valid & (local >= 0) & (local < means.shape[0])
    local = torch.where(owned, local, torch.full_like(local, -1))
    with off:
        x = x_all.to(compute)
        mu = means.to(compute)
        u = None if log_variance is None else log_variance.to(compute)
        used_mu, used_u, used_local, classes = mu, u, local, total_classes
        if sample_rate < 1.0:
            labels_cpu = torch.where(valid, labels_all, -1).cpu()
            kept = sharding.sample_classes(
                labels_cpu, total_classes, world_size, rank, sample_rate, seed=sample_seed, step=sample_step
            ).to(means.device)
            classes = sharding.sampled_total(labels_cpu, total_classes, world_size, sample_rate)
            used_mu = mu.index_select(0, kept)
            used_u = None if u is None else u.index_select(0, kept)
            position = torch.searchsorted(kept, local.clamp_min(0)).clamp_max(kept.numel() - 1)
            hit = owned & (kept[position] == local)
            used_local = torch.where(hit, position, torch.full_like(position, -1))
        if group is None and used_mu.shape[0] == 1:
            rest, rest_sum = torch.full_like(x[:, 0], float("-inf")), torch.zeros_like(x[:, 0])
        else:
            chunk = _resolve_chunk(chunk_setting, x.shape[0], used_mu.shape[0], x.device)  # type: ignore[arg-type]
            if chunk is None and group is None:
                rest, rest_sum = _plain_rest(x, used_mu, used_u, used_local)
            else:
                width = used_mu.shape[0] if chunk is None else chunk
                rest, rest_sum = _ChunkedRest.apply(x, used_mu, used_u, used_local, width, group)
        index = local.clamp_min(0)
        d_target, logdet = _target_terms(x, mu, u, index)
        if group is not None:
            zero = torch.zeros((), dtype=d_target.dtype, device=d_target.device)
            pieces = torch.stack([torch.where(owned, d_target, zero), torch.where(owned, logdet, zero)])
            d_target, logdet = sharding.sum_over_ranks(pieces, group).unbind(0)
        target = -0.5 * (1.0 + alpha) * d_target - 0.5 * logdet
        row = fused.softmax_row_loss(target, rest, rest_sum, classes, float(label_smoothing))
        row = row + lambda_lkd * 0.5 * (d_target + logdet)
    if bad is None:
        return fused.reduce_rows(row, valid, reduction)
    return fused.reduce_rows(torch.where(bad, math.nan, row), valid | bad, reduction)


class LGM(nn.Module):
    r"""L-GM: the large-margin Gaussian-mixture loss (classification + likelihood).

    The embeddings of class :math:`k` are modelled as :math:`\mathcal N(\mu_k, \Lambda_k)`
    with equal priors.  With the squared (Mahalanobis) distance and the margin :math:`\alpha`
    on the target's,

    .. math::
        d_{ik} = (x_i - \mu_k)^\top \Lambda_k^{-1} (x_i - \mu_k), \qquad
        z_{ik} = -\tfrac12 \bigl(1 + \alpha\,[k = y_i]\bigr) d_{ik} - \tfrac12 \log\lvert\Lambda_k\rvert,

    .. math::
        L_i = \underbrace{-\log\frac{e^{z_{iy_i}}}{\sum_k e^{z_{ik}}}}_{L_{cls}}
              + \lambda\,\underbrace{\Bigl(\tfrac12 d_{iy_i} + \tfrac12 \log\lvert\Lambda_{y_i}\rvert\Bigr)}_{L_{lkd}},

    :math:`L_{lkd}` being the negative log-likelihood of :math:`x_i` under its class's
    Gaussian up to a constant.  With ``covariance="identity"``, :math:`\Lambda_k = I` and the
    log-determinants vanish (the release's TensorFlow demo); with ``"diagonal"``,
    :math:`\Lambda_k = \operatorname{diag}(\sigma_k^2)`, learnt as ``log_variance``
    :math:`= \log\sigma_k^2` (initialised to 0, unit variances, as the release's ``sigma``
    filler; the log keeps variances positive where the Caffe release clamps them at
    1e-4).  The Caffe release's logits drop the :math:`\log\lvert\Lambda_k\rvert` term; this
    head keeps it, as the paper's Gaussian posterior has it (with learnt variances and no
    such term, every variance could grow without bound).

    The squared distances come from GEMMs, :math:`\lVert x\rVert^2 - 2x\mu_k^\top +
    \lVert\mu_k\rVert^2` (identity) and :math:`x^2 (1/\sigma_k^2)^\top - 2x(\mu_k/\sigma_k^2)^\top +
    \sum \mu_k^2/\sigma_k^2` (diagonal), clamped at 0; the target's :math:`d_{iy_i}` is taken from
    the difference :math:`x_i - \mu_{y_i}` directly.  No ``[B, C, D]`` tensor exists on any
    path; ``chunk_size`` walks the classes as the margin heads do (see the module docstring
    for why a closed-form backward rather than checkpointing).

    **Which metric to compare embeddings with.**  L-GM's logits are negative Euclidean (or
    Mahalanobis) distances to the class means, the "radial basis function" loss of the
    HW2P2 write-up's appendix A.2 (its Eq. 2, with the exponent's sign as a distance softmax
    needs it: :math:`e^{-\lVert W - X\rVert^2}`).  Its embeddings cluster around the means
    in Euclidean space and their norms carry information, so verify with the **Euclidean
    distance** between embeddings (or :meth:`logits`, the negative distances to the means),
    not cosine similarity, which the angular heads (ArcFace, SphereFace, ...) suit.

    Wan, Zhong, Li & Chen, "Rethinking Feature Distribution for Loss Functions in Image
    Classification", CVPR 2018; official release github.com/WeitaoVan/L-GM-loss (Caffe,
    with which the paper's experiments ran, and a TensorFlow demo).

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    alpha : float, default 0.1
        The margin :math:`\alpha \ge 0` (the release's TensorFlow ``lgm_logits(alpha=0.1)``;
        its Caffe CIFAR-100 example starts at 0.1 and doubles every 5000 iterations up to
        0.3, a schedule this head leaves to the caller).
    lambda_lkd : float, default 0.01
        :math:`\lambda \ge 0`, the weight of the likelihood regulariser (the release's
        TensorFlow ``lambda_=0.01``; its Caffe CIFAR-100 example sets ``center_coef: 0.1``).
    covariance : {"identity", "diagonal"}, default "identity"
        :math:`\Lambda_k`: fixed identity, or a learnt diagonal per class (the release's
        ``update_sigma`` with ``isotropic: false``).
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :class:`torch.nn.CrossEntropyLoss`; ``"mean"`` averages over non-ignored rows.
    label_smoothing : float, default 0.0
        As in :class:`torch.nn.CrossEntropyLoss`, on :math:`L_{cls}` (the logits :math:`z`
        with the margin); the release has none.
    ignore_index : int, default -100
        Rows with this label contribute nothing.
    chunk_size : int, "auto" or None, default "auto"
        ``None``: plain ``[B, C]`` autograd (twice differentiable); an int: classes per
        chunk, one ``[B, chunk]`` block at a time in forward and backward (blocks are always
        recomputed in backward, :func:`marginloss.fused.set_backward_cache_bytes` does not
        apply; once differentiable: use ``None`` for a ``create_graph=True`` backward);
        ``"auto"``: plain up to :func:`marginloss.fused.plain_path_elements` logits, else
        :func:`marginloss.fused.default_chunk_size`.  Both paths trace under
        ``torch.compile(fullgraph=True)`` (single process).  Class-sharded, the chunked path
        always runs (``None``: one block of the local classes).
    process_group : ProcessGroup, optional
        Shard the classes over this group, as :class:`~marginloss.MarginHead` does (see
        :mod:`marginloss.distributed`): this rank holds rows ``[shard_start, shard_start +
        shard_size)`` of ``means`` and ``log_variance`` (:func:`marginloss.distributed.shard_range`,
        initialised with the bound of the full matrix from a stream of each rank's own, the
        ``state_dict`` adding the buffer ``shard_layout``), ``num_classes`` stays the total
        and ``forward`` returns, on every rank, the loss of the global batch gathered from
        all ranks, with exact gradients.  :meth:`logits` covers the local classes only.
    sample_rate : float, default 1.0
        PartialFC: the fraction of each shard's classes kept per training step, in
        ``(0, 1]`` (the batch's classes are always kept; the softmax and label smoothing
        are then over the kept classes).  Below 1 the buffer ``sample_step`` counts steps.
    sample_seed : int, default 0
        Seeds the PartialFC draw together with the rank and the step.
    device, dtype : optional
        Where and how the parameters are created: ``means`` ``[C, D]``, the class means
        :math:`\mu_k` (Xavier-uniform, as the TensorFlow demo), and for
        ``covariance="diagonal"`` ``log_variance`` ``[C, D]``, :math:`\log\sigma_k^2`
        (``None`` otherwise).

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"`` (the global batch when sharded)

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.LGM(16, 100, covariance="diagonal")
    >>> x, y = torch.randn(8, 16), torch.randint(0, 100, (8,))
    >>> loss = head(x, y)
    >>> loss.backward()
    >>> head.log_variance.grad.shape
    torch.Size([100, 16])
    >>> head.logits(x).argmax(1).shape  # inference: the nearest mean (Mahalanobis)
    torch.Size([8])
    """

    log_variance: Tensor | None
    sample_step: Tensor
    shard_layout: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        alpha: float = 0.1,
        lambda_lkd: float = 0.01,
        covariance: str = "identity",
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
        super().__init__()
        self.embedding_dim = V.check_positive_int("embedding_dim", embedding_dim)
        self.num_classes = V.check_positive_int("num_classes", num_classes)
        self.sample_rate = V.check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
        self.sample_seed = V.check_int64("sample_seed", sample_seed)
        self.process_group = process_group
        self.world_size, self.rank = sharding.world(process_group)
        self.shard_start, self.shard_size = sharding.shard_range(num_classes, self.world_size, self.rank)
        self.alpha = _check_alpha(alpha)
        self.lambda_lkd = _check_lambda(lambda_lkd)
        self.covariance = V.check_choice("covariance", covariance, COVARIANCES)
        self.reduction = V.check_choice("reduction", reduction, ("mean", "sum", "none"))
        self.label_smoothing = V.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.ignore_index = V.check_int64("ignore_index", ignore_index)
        self.chunk_size = V.check_chunk_size(chunk_size)
        rows = self.shard_size
        self.means = nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype))
        if self.covariance == "diagonal":
            self.log_variance = nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype))
        else:
            self.register_parameter("log_variance", None)
        if process_group is not None:
            layout = [num_classes, self.world_size, self.shard_start, self.shard_size]
            self.register_buffer("shard_layout", torch.tensor(layout, device=self.means.device))
        if process_group is not None or self.sample_rate < 1.0:
            self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64, device=self.means.device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform means (the TensorFlow demo's initialiser), unit variances.

        A class-sharded head draws its rows with the bound of the full ``[C, D]`` matrix,
        from a random stream of each rank's own (as :class:`~marginloss.MarginHead`).
        """
        if self.process_group is not None:
            sharding.init_shard_(self.means, self.num_classes, self.rank)
        else:
            nn.init.xavier_uniform_(self.means)
        if self.log_variance is not None:
            nn.init.zeros_(self.log_variance)

    def hyperparameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lambda_lkd": self.lambda_lkd, "covariance": self.covariance}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of a batch: ``embeddings`` ``[B, D]``, ``labels`` ``[B]`` class indices
        (this rank's rows when class-sharded; the loss is then that of the global batch).

        Every check runs inside the loss, so that on a sharded head a bad input on one rank
        raises the same error on every rank instead of stranding the others.
        """
        sampling = self.training and self.sample_rate < 1.0
        replay = fused.replaying_forward()
        step = 0
        if sampling:
            # A replay (activation checkpointing) draws what its first pass drew.
            step = int(self.sample_step) - (1 if replay else 0)
        loss = _lgm_loss(
            embeddings, self.means, labels, log_variance=self.log_variance, alpha=self.alpha,
            lambda_lkd=self.lambda_lkd, reduction=self.reduction, label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index, chunk_size=self.chunk_size, num_classes=self.num_classes,
            process_group=self.process_group, sample_rate=self.sample_rate if sampling else 1.0,
            sample_seed=self.sample_seed, sample_step=step, embedding_dim=self.embedding_dim,
        )
        if sampling and not replay:
            self.sample_step.add_(1)
        return loss

    def logits(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        r"""``[B, C]`` logits: without ``labels`` the inference logits
        :math:`-\tfrac12 d_{ik} - \tfrac12\log\lvert\Lambda_k\rvert` (the log-posterior up to a
        row constant: their argmax is the most likely class), with ``labels`` the training
        logits (margin on the target).  Materialises ``[B, C]``.  On a class-sharded head
        the inference logits cover this rank's classes only (columns ``shard_start`` on)."""
        V.check_embeddings(embeddings, self.embedding_dim)
        if labels is not None and self.process_group is not None:
            raise ValueError(
                f"logits(embeddings, labels) needs every class, but this class-sharded head holds "
                f"classes [{self.shard_start}, {self.shard_start + self.shard_size}) only: use forward for the loss"
            )
        return lgm_logits(
            embeddings, self.means, labels, log_variance=self.log_variance, alpha=self.alpha,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        fields = [f"embedding_dim={self.embedding_dim}", f"num_classes={self.num_classes}"]
        fields += [f"{k}={v!r}" for k, v in self.hyperparameters().items()]
        fields += [
            f"reduction={self.reduction!r}", f"label_smoothing={self.label_smoothing!r}",
            f"ignore_index={self.ignore_index!r}", f"chunk_size={self.chunk_size!r}",
        ]
        if self.process_group is not None:
            end = self.shard_start + self.shard_size
            fields.append(f"process_group=<rank {self.rank} of {self.world_size}, classes [{self.shard_start}, {end})>")
        if self.sample_rate < 1.0:
            fields += [f"sample_rate={self.sample_rate!r}", f"sample_seed={self.sample_seed!r}"]
        return ", ".join(fields)
