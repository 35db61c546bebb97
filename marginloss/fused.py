"""The margin softmax engine every classification head uses.

Every head in :mod:`marginloss.heads` computes the same thing: non-target logits that are a
scaled dot product of (optionally normalised) embeddings and (optionally normalised)
class weights, and one target logit per row that goes through the head's margin
transform.  :func:`margin_softmax_loss` computes that loss either

* with plain autograd (``chunk_size=None``), materialising the ``[B, C]`` logits, or
* with a chunked :class:`torch.autograd.Function` that walks the classes in chunks and never
  holds more than one ``[B, chunk]`` block: it keeps an O(B) running log-sum-exp, normalises
  weight rows on the fly (no normalised copy of the weight), and in backward recomputes each
  chunk and writes ``weight.grad`` rows directly through the normalisation's Jacobian.
  The logit blocks of the first chunks, up to a fixed byte budget
  (:func:`set_backward_cache_bytes`, 64 MiB by default), are kept from forward so backward
  skips their GEMM; the memory stays flat in ``C`` and the gradients are the same bits.

Both paths compute the margin on the target column only, from the gathered target rows
``weight[labels]`` (O(B·D)), so no ``acos``/``cos`` touches the full matrix.  The loss is
assembled from three O(B) quantities per row (see :func:`_row_loss`), which is also what
the class-sharded heads in :mod:`marginloss.distributed` all-reduce.

Numerics: normalisation, margin, log-sum-exp and loss run in at least float32; only the
GEMMs follow ``torch.autocast``.  Softmax probabilities whose gradient contribution would
be a subnormal float are set to exactly zero before the backward GEMMs, because subnormal
operands slow CPU GEMMs down by more than an order of magnitude and carry no information
at that precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor

from marginloss import _validation as V

__all__ = [
    "TargetFn",
    "backward_cache_bytes",
    "default_chunk_size",
    "margin_softmax_loss",
    "rest_backward",
    "rest_logsumexp",
    "scaled_embeddings_backward",
    "set_backward_cache_bytes",
]

TargetFn = Callable[[Tensor], Tensor]
"""A head's target transform: ``cos_target [B] -> f(cos_target) [B]`` (differentiable)."""

ChunkSize = Union[int, str, None]

_NORM_EPS = 1e-12
_REDUCTIONS = ("mean", "sum", "none")
# CPU: one [B, chunk] float32 block of this many elements (4 MiB) stays cache-friendly while
# keeping each GEMM large enough to run near peak (measured: benchmarks/results/cpu.md).
_AUTO_BLOCK_ELEMENTS = 1 << 20
# Accelerators: each chunk launches ~40 kernels; 64 MiB blocks keep the GEMMs long enough
# to hide the launches (a design estimate, not yet measured on a GPU in this project).
_AUTO_BLOCK_ELEMENTS_ACCELERATOR = 1 << 24
_MIN_AUTO_CHUNK = 256
_DEFAULT_CACHE_BYTES = 64 << 20
_cache_bytes = _DEFAULT_CACHE_BYTES


def default_chunk_size(batch_size: int, num_classes: int, device: torch.device | str | None = None) -> int:
    """The class-chunk width ``chunk_size="auto"`` picks for a batch, class count and device.

    On the CPU (the default) it chooses ``2**20 / batch_size`` classes, a 4 MiB float32
    block that stays in cache; on an accelerator (CUDA and others) ``2**24 / batch_size``
    classes, a 64 MiB block, so that each chunk's matrix products outlast its few dozen
    kernel launches.  At least 256 and at most ``num_classes``.

    Examples
    --------
    >>> default_chunk_size(256, 100_000)
    4096
    >>> default_chunk_size(256, 1000)
    1000
    >>> default_chunk_size(256, 1_000_000, "cuda")
    65536
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    elements = _AUTO_BLOCK_ELEMENTS if on_cpu else _AUTO_BLOCK_ELEMENTS_ACCELERATOR
    chunk = max(_MIN_AUTO_CHUNK, elements // max(batch_size, 1))
    return max(1, min(chunk, num_classes))


def set_backward_cache_bytes(max_bytes: int) -> int:
    """Set how many bytes of forward logit blocks the chunked engine keeps for backward.

    The chunked engine needs each chunk's ``[B, chunk]`` logits twice: in forward for the
    log-sum-exp and in backward for the gradients.  Blocks of the first chunks, up to
    ``max_bytes`` in total per call, are kept from forward so backward skips their GEMM (one
    of the four GEMMs per chunk); the rest are recomputed, bit for bit the same.  The budget
    is fixed, so the engine's memory stays flat in the number of classes.  ``0`` keeps
    nothing: backward then saves only the inputs, O(B) row statistics and the O(C) inverse
    weight norms.  Nothing is kept when no input requires a gradient.

    Parameters
    ----------
    max_bytes : int
        Non-negative byte budget, process-wide (default 64 MiB).

    Returns
    -------
    int
        The previous budget, so a caller can restore it.

    Examples
    --------
    >>> from marginloss import fused
    >>> previous = fused.set_backward_cache_bytes(0)  # recompute every chunk in backward
    >>> fused.backward_cache_bytes()
    0
    >>> _ = fused.set_backward_cache_bytes(previous)
    """
    global _cache_bytes
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"max_bytes must be a non-negative int, got {type(max_bytes).__name__} {max_bytes!r}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes}")
    previous, _cache_bytes = _cache_bytes, max_bytes
    return previous


def backward_cache_bytes() -> int:
    """The byte budget set by :func:`set_backward_cache_bytes` (64 MiB by default)."""
    return _cache_bytes


def _kept_blocks(cfg: _Config, batch: int, num_rows: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """The ``[K, B, chunk_size]`` buffer for the logit blocks forward keeps for backward:
    as many leading full-width chunks as fit the budget, or None (nothing to keep)."""
    if not cfg.keep_blocks:
        return None
    block = batch * cfg.chunk_size * torch.finfo(dtype).bits // 8
    kept = 0 if block == 0 else min(num_rows // cfg.chunk_size, _cache_bytes // block)
    return torch.empty((kept, batch, cfg.chunk_size), dtype=dtype, device=device) if kept else None


def _wants_gradient(*tensors: Tensor) -> bool:
    """Whether autograd will differentiate through these inputs (so blocks are worth keeping)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------- shared O(B) math


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype of O(B) row statistics and the target path: float64, except on devices
    without it (Apple MPS), where float32 is the widest there is."""
    return torch.float32 if device.type == "mps" else torch.float64


def _gemm_dtype(device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type) and compute_dtype == torch.float32:
        return torch.get_autocast_dtype(device.type)
    return compute_dtype


def _target_cos_radius(
    embeddings: Tensor,
    weight_rows: Tensor,
    scale: float,
    normalize_embeddings: bool,
    normalize_weight: bool,
) -> tuple[Tensor, Tensor]:
    """cos θ between each embedding and its target weight row, and the logit radius.

    The target logit of every head is ``radius * f(cos)`` with
    ``radius = scale * (1 or ‖x‖) * (1 or ‖w_y‖)``.
    """
    x_norm = embeddings.norm(dim=1)
    w_norm = weight_rows.norm(dim=1)
    dot = (embeddings * weight_rows).sum(dim=1)
    cos = (dot / (x_norm.clamp_min(_NORM_EPS) * w_norm.clamp_min(_NORM_EPS))).clamp(-1.0, 1.0)
    radius = torch.full_like(cos, scale)
    if not normalize_embeddings:
        radius = radius * x_norm
    if not normalize_weight:
        radius = radius * w_norm
    return cos, radius


def _row_loss(
    lse_rest: Tensor,
    sum_rest: Tensor | None,
    target_logit: Tensor,
    num_classes: int,
    label_smoothing: float,
) -> Tensor:
    r"""Per-row cross entropy from O(B) parts.

    With :math:`r_i = \log\sum_{j\ne y_i} e^{z_{ij}}`, :math:`S_i = \sum_{j\ne y_i} z_{ij}`,
    target logit :math:`t_i` and smoothing :math:`\varepsilon`,

    .. math::
        \ell_i = \operatorname{softplus}(r_i - t_i) + \varepsilon t_i
                 - \tfrac{\varepsilon}{C}(S_i + t_i),

    which equals ``torch.nn.functional.cross_entropy`` with ``label_smoothing=ε`` but keeps
    full precision when :math:`p_{y}\to 1` (its target gradient is
    :math:`-\sigma(r_i - t_i)`, never ``p - 1`` rounded).
    """
    diff = lse_rest - target_logit
    loss = torch.logaddexp(diff, torch.zeros_like(diff))
    if label_smoothing > 0.0:
        assert sum_rest is not None  # internal invariant, not user input
        loss = loss + label_smoothing * target_logit
        loss = loss - (label_smoothing / num_classes) * (sum_rest + target_logit)
    return loss


def _reduce(row_loss: Tensor, valid: Tensor, reduction: str) -> Tensor:
    row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    # Mean over non-ignored rows as torch.nn.CrossEntropyLoss does; an all-ignored batch
    # gives 0 (torch gives NaN) so padded distributed shards stay finite.
    return total / valid.sum().clamp_min(1).to(row_loss.dtype)


# ---------------------------------------------------------------- plain path


def _plain_parts(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    scale: float,
    normalize_embeddings: bool,
    normalize_weight: bool,
    need_sum: bool,
) -> tuple[Tensor, Tensor | None]:
    """``lse_rest`` and ``sum_rest`` with plain autograd over the full ``[B, C]`` logits."""
    compute = _compute_dtype(embeddings, weight)
    gemm = _gemm_dtype(embeddings.device, compute)
    x = embeddings.to(compute)
    w = weight.to(compute)
    if normalize_embeddings:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    if normalize_weight:
        w = w / w.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    x = x * scale  # on the [B, D] side: one [B, C] tensor fewer
    with torch.autocast(embeddings.device.type, enabled=False):
        logits = (x.to(gemm) @ w.to(gemm).T).to(compute)
    # Index-based exclusion of the target column: no [B, C] mask is built or kept for backward.
    lse_rest = logits.scatter(1, labels[:, None], -math.inf).logsumexp(dim=1)
    sum_rest = None
    if need_sum:
        sum_rest = logits.sum(dim=1) - logits.gather(1, labels[:, None]).squeeze(1)
    return lse_rest, sum_rest


# ---------------------------------------------------------------- chunked path


def _weight_inv_norms(weight: Tensor, normalize_weight: bool, compute: torch.dtype) -> Tensor | None:
    """``1/‖w_j‖`` for every row (an O(C) vector), or None without weight normalisation."""
    if not normalize_weight:
        return None
    norms: Tensor = torch.linalg.vector_norm(weight, dim=1, dtype=compute)
    return norms.clamp_min_(_NORM_EPS).reciprocal_()


def _chunk_logits(
    xs: Tensor, weight_chunk: Tensor, inv_norm: Tensor | None, compute: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """``[B, n]`` logits of one class chunk (``xs`` already scaled, ``inv_norm`` its rows' 1/‖w‖),
    written into ``out`` when given."""
    if out is not None and xs.dtype == compute:
        logits = torch.mm(xs, weight_chunk.to(xs.dtype).T, out=out)
    else:
        logits = torch.mm(xs, weight_chunk.to(xs.dtype).T)
        if out is not None:
            logits = out.copy_(logits)
        elif logits.dtype != compute:
            logits = logits.to(compute)
    return logits if inv_norm is None else logits.mul_(inv_norm)


def _chunk_targets(labels: Tensor, num_rows: int, width: int) -> tuple[Tensor, Tensor]:
    """Every chunk's column of each row's target, ``[K, B, 1]`` (clamped into the chunk), and
    whether the target lies in that chunk, computed once for all ``K`` chunks."""
    starts = torch.arange(0, num_rows, width, device=labels.device)
    last = (num_rows - starts).clamp_max(width) - 1
    local = labels[None, :] - starts[:, None]
    inside = (local >= 0) & (local <= last[:, None])
    local = local.clamp_min(0).minimum(last[:, None])
    return local[:, :, None], inside[:, :, None]


def _log_tiny(dtype: torch.dtype) -> float:
    # exp() below this would be a subnormal float: such entries are made exact zeros instead,
    # because subnormal operands slow CPU arithmetic and GEMMs down by an order of magnitude.
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _flushed_exp_(exponent: Tensor) -> Tensor:
    """In-place ``exp`` whose would-be-subnormal results are exact zeros.

    Clamping first keeps ``exp`` itself off subnormal results (13x slower on some CPUs);
    everything at the clamp value is then zeroed in one pass.
    """
    cutoff = _log_tiny(exponent.dtype)
    floor_value = math.exp(cutoff)
    return torch.threshold_(exponent.clamp_min_(cutoff).exp_(), floor_value, 0.0)


def _chunk_forward(
    logits: Tensor, local: Tensor, inside: Tensor, need_sum: bool, out: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Masked log-sum-exp (and sum) of one chunk's logits; the target column is excluded.

    ``local``/``inside`` are this chunk's slice of :func:`_chunk_targets`.  Returns
    ``(lse, sum)``, ``lse`` in float64.  The exponentials ``exp(logits - row_max)``
    (target column and would-be subnormals exactly 0) go to ``out`` and ``logits`` is
    left as it was, or, without ``out``, overwrite ``logits``.  Fixed shapes, no host
    synchronisation: compilable as is.
    """
    at_target = logits.gather(1, local)
    chunk_sum = None
    if need_sum:
        chunk_sum = logits.sum(dim=1) - torch.where(inside, at_target, 0.0).squeeze(1)
    logits.scatter_(1, local, torch.where(inside, -math.inf, at_target))
    # A row whose only column is its target has max -inf: clamp keeps the shift finite.
    row_max = logits.amax(dim=1).clamp_min_(torch.finfo(logits.dtype).min)
    if out is None:
        probs = _flushed_exp_(logits.sub_(row_max[:, None]))
    else:
        probs = _flushed_exp_(torch.sub(logits, row_max[:, None], out=out))
        logits.scatter_(1, local, at_target)
    # Row statistics are O(B): keep them in float64 so lse ~ s = 64 carries no fp32 rounding.
    lse = probs.sum(dim=1).to(_wide_dtype(probs.device)).log_().add_(row_max)
    return lse, chunk_sum


def _chunk_grad_logits(
    logits: Tensor,
    local: Tensor,
    inside: Tensor,
    shift_hi: Tensor,
    shift_lo: Tensor,
    grad_sum: Tensor | None,
    out: Tensor | None = None,
) -> Tensor:
    """``|dL/dlogits|`` of one chunk, ``exp(logits - hi + lo)`` (``+ grad_sum``), target column 0.

    ``hi - lo = lse_rest - log|grad_lse|`` folds the per-row gradient into the exponent, so
    one scalar threshold turns every entry whose gradient would be subnormal into an exact
    zero; ``hi`` is ``lse_rest`` rounded to the compute dtype, so ``logits - hi`` is exact
    for the entries that matter and ``lo`` is small.  Written to ``out`` (a new tensor
    without it); ``logits`` is not modified.
    """
    shifted = torch.sub(logits, shift_hi[:, None], out=out) if out is not None else logits - shift_hi[:, None]
    grad = _flushed_exp_(shifted.add_(shift_lo[:, None]))
    if grad_sum is not None:
        grad.add_(grad_sum[:, None])
    # The target column is not part of the "rest": its gradient goes through the margin.
    return grad.scatter_(1, local, torch.where(inside, 0.0, grad.gather(1, local)))


class _Config:
    __slots__ = (
        "chunk_size",
        "keep_blocks",
        "label_smoothing",
        "normalize_embeddings",
        "normalize_weight",
        "num_classes",
        "scale",
        "target_fn",
        "target_grad",
    )

    def __init__(
        self,
        target_fn: TargetFn,
        scale: float,
        normalize_embeddings: bool,
        normalize_weight: bool,
        label_smoothing: float,
        num_classes: int,
        chunk_size: int,
        target_grad: TargetFn | None = None,
        keep_blocks: bool = False,
    ) -> None:
        self.target_fn = target_fn
        self.target_grad = target_grad
        self.scale = scale
        self.normalize_embeddings = normalize_embeddings
        self.normalize_weight = normalize_weight
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.chunk_size = chunk_size
        # Whether forward may keep logit blocks for backward (some input needs a gradient).
        self.keep_blocks = keep_blocks


def _scaled_embeddings(x: Tensor, cfg: _Config) -> tuple[Tensor, Tensor | None]:
    """``xs = s·x/‖x‖`` (or ``s·x``) and the rows' 1/‖x‖ when normalising."""
    if not cfg.normalize_embeddings:
        return x * cfg.scale, None
    inv_norm = x.norm(dim=1).clamp_min(_NORM_EPS).reciprocal()
    return x * (inv_norm * cfg.scale)[:, None], inv_norm


def scaled_embeddings_backward(
    grad_xs: Tensor, x: Tensor, inv_norm: Tensor | None, cfg: _Config
) -> Tensor:
    r"""dL/dx from dL/dxs for ``xs = s·x/‖x‖``: :math:`s(I - \hat x\hat x^\top)/\lVert x\rVert`."""
    grad = grad_xs * cfg.scale
    if inv_norm is None:
        return grad
    x_hat = x * inv_norm[:, None]
    radial = (x_hat * grad).sum(dim=1, keepdim=True)
    return (grad - x_hat * radial) * inv_norm[:, None]


def rest_logsumexp(
    xs: Tensor,
    weight: Tensor,
    labels: Tensor,
    cfg: _Config,
    compute: torch.dtype,
    inv_norms: Tensor | None = None,
    blocks: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """O(B) log-sum-exp (and sum, with label smoothing) of the non-target logits over the rows
    of ``weight``, chunk by chunk, returned in float64.

    ``labels`` index rows of ``weight``; a label outside ``[0, len(weight))`` (a target held
    by another shard) excludes nothing.  ``xs`` are the scaled embeddings in the GEMM dtype;
    ``inv_norms`` the rows' 1/‖w‖ if already known.  ``blocks``, a ``[K, B, chunk_size]``
    buffer, receives the logits of the first ``K`` chunks for :func:`rest_backward`.
    """
    need_sum = cfg.label_smoothing > 0.0
    if inv_norms is None:
        inv_norms = _weight_inv_norms(weight, cfg.normalize_weight, compute)
    width, num_rows = cfg.chunk_size, weight.shape[0]
    local, inside = _chunk_targets(labels, num_rows, width)
    kept = 0 if blocks is None else blocks.shape[0]
    work = torch.empty((xs.shape[0], min(width, num_rows)), dtype=compute, device=xs.device)
    lse_rest = torch.full((xs.shape[0],), -math.inf, dtype=_wide_dtype(xs.device), device=xs.device)
    sum_rest = torch.zeros_like(lse_rest) if need_sum else None
    for k, start in enumerate(range(0, num_rows, width)):
        stop = start + width
        inv = None if inv_norms is None else inv_norms[start:stop]
        full = min(stop, num_rows) - start == work.shape[1]
        if blocks is not None and k < kept:
            logits = _chunk_logits(xs, weight[start:stop], inv, compute, blocks[k])
            chunk_lse, chunk_sum = _chunk_forward(logits, local[k], inside[k], need_sum, work)
        else:
            logits = _chunk_logits(xs, weight[start:stop], inv, compute, work if full else None)
            chunk_lse, chunk_sum = _chunk_forward(logits, local[k], inside[k], need_sum)
        lse_rest = torch.logaddexp(lse_rest, chunk_lse)
        if sum_rest is not None and chunk_sum is not None:
            sum_rest = sum_rest + chunk_sum.to(sum_rest.dtype)
    return lse_rest, sum_rest


def rest_backward(
    xs: Tensor,
    weight: Tensor,
    labels: Tensor,
    lse_rest: Tensor,
    grad_lse: Tensor,
    grad_sum: Tensor | None,
    cfg: _Config,
    compute: torch.dtype,
    need_x: bool,
    need_w: bool,
    inv_norms: Tensor | None = None,
    blocks: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    r"""Backward of :func:`rest_logsumexp`: gradients for the scaled embeddings ``xs`` and for
    ``weight`` (through its row normalisation), recomputing each chunk's logits except the
    first ``K`` that forward kept in ``blocks`` (the same values, so the same gradients).

    ``weight.grad`` rows are written chunk by chunk into one ``empty_like(weight)``.  With
    :math:`z_{ij} = \hat w_j^\top x^s_i` and :math:`g_{ij} = \partial L/\partial z_{ij}`,

    .. math::
        \frac{\partial L}{\partial w_j} = \frac{1}{\lVert w_j\rVert}\Big(\sum_i g_{ij} x^s_i
        - \hat w_j \sum_i g_{ij} z_{ij}\Big),

    so the normalisation's radial term comes from the ``[B, chunk]`` block, not from a pass
    over the ``[chunk, D]`` weight gradient.
    """
    gemm = xs.dtype
    width, num_rows = cfg.chunk_size, weight.shape[0]
    if inv_norms is None:
        inv_norms = _weight_inv_norms(weight, cfg.normalize_weight, compute)
    local, inside = _chunk_targets(labels, num_rows, width)
    # dL/dz_ij = sign_i (|g_i| p_ij + sign_i h_i): the GEMMs see |g_i| p_ij folded into one exp
    # and the per-row sign is applied to the B x D operands instead of the B x chunk block.
    sign = torch.where(grad_lse < 0, -1.0, 1.0).to(compute)
    shift_hi = lse_rest.to(compute)
    shift_lo = (grad_lse.to(lse_rest.dtype).abs().log() - (lse_rest - shift_hi.to(lse_rest.dtype))).to(compute)
    signed_sum = None if grad_sum is None else (grad_sum * sign).to(compute)
    xs_signed = xs * sign.to(gemm)[:, None]
    grad_xs = torch.zeros(xs.shape, dtype=compute, device=xs.device) if need_x else None
    grad_weight = torch.empty_like(weight) if need_w else None
    direct = grad_weight is not None and grad_weight.dtype == gemm == compute
    kept = 0 if blocks is None else blocks.shape[0]
    shape = (xs.shape[0], min(width, num_rows))
    work_logits = torch.empty(shape, dtype=compute, device=xs.device)
    work_grad = torch.empty(shape, dtype=compute, device=xs.device)
    for k, start in enumerate(range(0, num_rows, width)):
        stop = start + width
        chunk = weight[start:stop]
        inv = None if inv_norms is None else inv_norms[start:stop]
        full = chunk.shape[0] == shape[1]
        if blocks is not None and k < kept:
            logits = blocks[k]
        else:
            logits = _chunk_logits(xs, chunk, inv, compute, work_logits if full else None)
        grad_logits = _chunk_grad_logits(
            logits, local[k], inside[k], shift_hi, shift_lo, signed_sum, work_grad if full else None
        )
        radial = None
        if inv is not None and grad_weight is not None:
            # Σ_i g_ij z_ij (g signed), scaled by 1/‖w_j‖² for the addend -w_j·radial_j.
            product = torch.mul(grad_logits, logits, out=work_logits if full else None)
            radial = torch.mv(product.T, sign).mul_(inv.square())
        if inv is not None:
            grad_logits.mul_(inv)
        grad_logits = grad_logits.to(gemm)
        if grad_xs is not None:
            if gemm == compute:
                grad_xs.addmm_(grad_logits, chunk.to(gemm))
            else:
                grad_xs.add_(torch.mm(grad_logits, chunk.to(gemm)).to(compute))
        if grad_weight is not None:
            out = grad_weight[start:stop]
            if direct and radial is not None:
                torch.mul(chunk, radial.neg_()[:, None], out=out).addmm_(grad_logits.T, xs_signed)
            elif direct:
                torch.mm(grad_logits.T, xs_signed, out=out)
            else:
                grad_chunk = torch.mm(grad_logits.T, xs_signed).to(compute)
                if radial is not None:
                    grad_chunk.addcmul_(chunk.to(compute), radial[:, None], value=-1.0)
                out.copy_(grad_chunk)
    if grad_xs is not None:
        grad_xs.mul_(sign[:, None])
    return grad_xs, grad_weight


def _target_backward(
    x: Tensor,
    rows: Tensor,
    lse_rest: Tensor,
    sum_rest: Tensor | None,
    grad_row: Tensor,
    cfg: _Config,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Closed-form gradients of the row losses w.r.t. ``lse_rest``, ``sum_rest``, the
    embeddings and their target weight rows, using the head's derivative ``target_grad``.

    No autograd inside, so ``torch.compile`` can trace the engine's backward.
    """
    assert cfg.target_grad is not None  # internal invariant
    # The target path is O(B·D): run it in float64 so sin θ near θ = 0 is not fp32 rounding.
    out_dtype = x.dtype
    x, rows = x.to(_wide_dtype(x.device)), rows.to(_wide_dtype(x.device))
    cos, radius = _target_cos_radius(x, rows, cfg.scale, cfg.normalize_embeddings, cfg.normalize_weight)
    value = cfg.target_fn(cos)
    target_logit = radius * value
    eps, num_classes = cfg.label_smoothing, cfg.num_classes
    sig = torch.sigmoid(lse_rest - target_logit.to(lse_rest.dtype))  # d softplus(r - t) / dr
    grad_lse = grad_row * sig
    grad_t = (grad_row * (eps - eps / num_classes - sig)).to(cos.dtype)
    grad_sum = grad_row * (-eps / num_classes) if sum_rest is not None else None
    grad_cos = grad_t * radius * cfg.target_grad(cos)
    grad_radius = grad_t * value
    x_norm = x.norm(dim=1).clamp_min(_NORM_EPS)
    w_norm = rows.norm(dim=1).clamp_min(_NORM_EPS)
    x_hat, w_hat = x / x_norm[:, None], rows / w_norm[:, None]
    # dcos/dx = (ŵ - cos x̂)/‖x‖,  dcos/dw = (x̂ - cos ŵ)/‖w‖,  dρ/dx = ρ x̂/‖x‖ if x unnormalised.
    radial_x = torch.zeros_like(cos) if cfg.normalize_embeddings else grad_radius * radius / x_norm
    radial_w = torch.zeros_like(cos) if cfg.normalize_weight else grad_radius * radius / w_norm
    grad_x = (grad_cos / x_norm)[:, None] * (w_hat - cos[:, None] * x_hat) + radial_x[:, None] * x_hat
    grad_w = (grad_cos / w_norm)[:, None] * (x_hat - cos[:, None] * w_hat) + radial_w[:, None] * w_hat
    return grad_lse, grad_sum, grad_x.to(out_dtype), grad_w.to(out_dtype)


def _target_backward_autograd(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    lse_rest: Tensor,
    sum_rest: Tensor | None,
    grad_row: Tensor,
    cfg: _Config,
    compute: torch.dtype,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """As :func:`_target_backward` for a ``target_fn`` given without its derivative (eager only)."""
    wide = _wide_dtype(embeddings.device)
    with torch.enable_grad():
        x_leaf = embeddings.detach().to(wide).requires_grad_(True)
        rows_leaf = weight.detach()[labels].to(wide).requires_grad_(True)
        lse_leaf = lse_rest.detach().requires_grad_(True)
        sum_leaf = sum_rest.detach().requires_grad_(True) if sum_rest is not None else None
        cos, radius = _target_cos_radius(
            x_leaf, rows_leaf, cfg.scale, cfg.normalize_embeddings, cfg.normalize_weight
        )
        target_logit = (radius * cfg.target_fn(cos)).to(lse_leaf.dtype)
        row = _row_loss(lse_leaf, sum_leaf, target_logit, cfg.num_classes, cfg.label_smoothing)
        inputs = [lse_leaf, x_leaf, rows_leaf] + ([sum_leaf] if sum_leaf is not None else [])
        grads = torch.autograd.grad(row, inputs, grad_row.to(row.dtype), allow_unused=True)
    zero = torch.zeros_like
    grad_lse = grads[0] if grads[0] is not None else zero(lse_rest)
    grad_x = grads[1] if grads[1] is not None else zero(x_leaf)
    grad_w = grads[2] if grads[2] is not None else zero(rows_leaf)
    grad_sum = (grads[3] if grads[3] is not None else zero(lse_rest)) if sum_leaf is not None else None
    return grad_lse, grad_sum, grad_x.to(compute), grad_w.to(compute)


class _ChunkedMarginSoftmax(torch.autograd.Function):
    """Row losses of the margin softmax, computed class chunk by class chunk.

    Saves the inputs, O(B) row statistics, the O(C) 1/‖w‖ and the logit blocks of the first
    chunks within :func:`set_backward_cache_bytes`; backward recomputes every other chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        valid: Tensor,
        cfg: _Config,
    ) -> Tensor:
        compute = _compute_dtype(embeddings, weight)
        gemm = _gemm_dtype(embeddings.device, compute)
        with torch.autocast(embeddings.device.type, enabled=False):
            x = embeddings.to(compute)
            xs, _ = _scaled_embeddings(x, cfg)
            xs_gemm = xs.to(gemm)
            inv_norms = _weight_inv_norms(weight, cfg.normalize_weight, compute)
            blocks = _kept_blocks(cfg, x.shape[0], weight.shape[0], compute, x.device)
            lse_rest, sum_rest = rest_logsumexp(xs_gemm, weight, labels, cfg, compute, inv_norms, blocks)
            wide = _wide_dtype(x.device)
            cos, radius = _target_cos_radius(
                x.to(wide), weight[labels].to(wide), cfg.scale, cfg.normalize_embeddings, cfg.normalize_weight
            )
            target_logit = (radius * cfg.target_fn(cos)).to(lse_rest.dtype)
            row = _row_loss(lse_rest, sum_rest, target_logit, cfg.num_classes, cfg.label_smoothing)
            row = row.to(compute)
        # Inputs, O(B) row statistics, the O(C) 1/‖w‖ and at most the cache budget of softmax
        # blocks (never a [B, C] block growing with C).
        ctx.save_for_backward(
            embeddings, weight, labels, valid, lse_rest, sum_rest, inv_norms, blocks  # type: ignore[arg-type]
        )
        ctx.cfg = cfg  # type: ignore[attr-defined]
        ctx.compute = compute  # type: ignore[attr-defined]
        ctx.gemm = gemm  # type: ignore[attr-defined]
        return row

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_row: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        cfg: _Config = ctx.cfg  # type: ignore[attr-defined]
        compute: torch.dtype = ctx.compute  # type: ignore[attr-defined]
        gemm: torch.dtype = ctx.gemm  # type: ignore[attr-defined]
        embeddings, weight, labels, valid, lse_rest, sum_rest, inv_norms, blocks = ctx.saved_tensors  # type: ignore[attr-defined]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        grad_row = torch.where(valid, grad_row.to(compute), 0.0)

        with torch.autocast(embeddings.device.type, enabled=False):
            # O(B) part: the target logit's margin transform and the loss assembly.
            grad_x_target: Tensor | None
            grad_rows_target: Tensor | None
            if cfg.target_grad is not None:
                grad_lse, grad_sum, grad_x_target, grad_rows_target = _target_backward(
                    embeddings.to(compute), weight[labels].to(compute), lse_rest, sum_rest,
                    grad_row, cfg,
                )
            else:
                grad_lse, grad_sum, grad_x_target, grad_rows_target = _target_backward_autograd(
                    embeddings, weight, labels, lse_rest, sum_rest, grad_row, cfg, compute
                )
            if not need_x:
                grad_x_target = None
            if not need_w:
                grad_rows_target = None

            # O(B·C·D) part: the non-target columns, chunk by chunk.
            x = embeddings.to(compute)
            xs, x_inv_norm = _scaled_embeddings(x, cfg)
            xs_gemm = xs.to(gemm)
            grad_xs, grad_weight = rest_backward(
                xs_gemm, weight, labels, lse_rest, grad_lse, grad_sum, cfg, compute, need_x, need_w,
                inv_norms, blocks,
            )

            grad_embeddings = None
            if grad_xs is not None and grad_x_target is not None:
                grad_x = scaled_embeddings_backward(grad_xs, x, x_inv_norm, cfg)
                grad_embeddings = (grad_x + grad_x_target).to(embeddings.dtype)
            if grad_weight is not None and grad_rows_target is not None:
                grad_weight.index_add_(0, labels, grad_rows_target.to(weight.dtype))
        return grad_embeddings, grad_weight, None, None, None


# ---------------------------------------------------------------- public entry point


def margin_softmax_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    target_fn: TargetFn,
    *,
    target_grad: TargetFn | None = None,
    scale: float = 1.0,
    normalize_embeddings: bool = True,
    normalize_weight: bool = True,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""Margin softmax cross entropy with the margin on the target column only.

    Logits are :math:`z_{ij} = s\,\tilde x_i^\top \tilde w_j` for :math:`j \ne y_i` and
    :math:`z_{iy_i} = \rho_i\, f(\cos\theta_{iy_i})` for the target, where
    :math:`\tilde x` is :math:`x/\lVert x\rVert` if ``normalize_embeddings`` else :math:`x`,
    :math:`\tilde w` likewise, and :math:`\rho_i = s\,(1\text{ or }\lVert x_i\rVert)
    (1\text{ or }\lVert w_{y_i}\rVert)` so that :math:`f(\cos) = \cos` gives back
    :math:`z_{iy_i} = s\,\tilde x_i^\top\tilde w_{y_i}`.  The loss is the cross entropy of
    these logits with ``label_smoothing`` and ``ignore_index`` as in
    :class:`torch.nn.CrossEntropyLoss` (an all-ignored batch gives 0, not NaN).

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating point.
    weight : Tensor
        ``[C, D]`` class weights (the layout of :func:`torch.nn.functional.linear`).
    labels : Tensor
        ``[B]`` integer class indices in ``[0, C)`` or ``ignore_index``.
    target_fn : callable
        The head's margin transform :math:`f`, applied to the ``[B]`` target cosines; it must
        be differentiable by autograd (the plain path differentiates it).
    target_grad : callable, optional
        Its derivative :math:`f'` (elementwise).  With it the chunked engine's backward is
        closed-form and traceable by ``torch.compile``; without it the chunked backward
        differentiates ``target_fn`` with :func:`torch.autograd.grad` (eager only).
    scale : float, default 1.0
        :math:`s`.
    normalize_embeddings, normalize_weight : bool, default True
        Whether :math:`x` and :math:`w` are L2-normalised inside the logits.
    reduction : {"mean", "sum", "none"}, default "mean"
    label_smoothing : float in [0, 1], default 0.0
    ignore_index : int, default -100
    chunk_size : int, "auto" or None, default "auto"
        ``None`` runs plain autograd over the full ``[B, C]`` logits; an int runs the
        chunked engine with that many classes per chunk; ``"auto"`` runs the chunked engine
        with :func:`default_chunk_size`.  The chunked engine is not twice differentiable.

    Returns
    -------
    Tensor
        A scalar, or ``[B]`` for ``reduction="none"``, in the compute dtype (at least float32).

    Examples
    --------
    >>> import torch
    >>> from marginloss.fused import margin_softmax_loss
    >>> x, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    >>> y = torch.tensor([1, 0, 9, 3])
    >>> loss = margin_softmax_loss(x, w, y, lambda cos: cos - 0.35, scale=30.0, chunk_size=4)
    >>> ref = margin_softmax_loss(x, w, y, lambda cos: cos - 0.35, scale=30.0, chunk_size=None)
    >>> bool(torch.allclose(loss, ref))
    True
    >>> loss.backward()
    """
    V.check_embeddings(embeddings)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        described = (
            f"shape {tuple(weight.shape)} dtype {weight.dtype}"
            if isinstance(weight, Tensor)
            else type(weight).__name__
        )
        raise ValueError(f"weight must be a floating [num_classes, embedding_dim] tensor, got {described}")
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"embeddings must have shape [batch, {weight.shape[1]}] to match weight "
            f"{tuple(weight.shape)}, got shape {tuple(embeddings.shape)}"
        )
    num_classes = weight.shape[0]
    labels = V.check_labels(labels, embeddings.shape[0], num_classes, ignore_index)
    V.check_same_device(embeddings=embeddings, weight=weight, labels=labels)
    V.check_choice("reduction", reduction, _REDUCTIONS)
    label_smoothing = V.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    chunk = V.check_chunk_size(chunk_size)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    if chunk is None:
        lse_rest, sum_rest = _plain_parts(
            embeddings, weight, safe_labels, scale, normalize_embeddings, normalize_weight,
            label_smoothing > 0.0,
        )
        compute = lse_rest.dtype
        # O(B·D) target path in float64: sin θ near θ = 0 from an fp32 cos is pure rounding.
        wide = _wide_dtype(embeddings.device)
        cos, radius = _target_cos_radius(
            embeddings.to(wide), weight[safe_labels].to(wide), scale, normalize_embeddings, normalize_weight,
        )
        target_logit = (radius * target_fn(cos)).to(compute)
        row = _row_loss(lse_rest, sum_rest, target_logit, num_classes, label_smoothing)
    else:
        width = default_chunk_size(embeddings.shape[0], num_classes, embeddings.device) if chunk == "auto" else int(chunk)
        cfg = _Config(
            target_fn, float(scale), normalize_embeddings, normalize_weight, label_smoothing,
            num_classes, min(width, num_classes), target_grad,
            keep_blocks=_wants_gradient(embeddings, weight),
        )
        row = _ChunkedMarginSoftmax.apply(embeddings, weight, safe_labels, valid, cfg)
    return _reduce(row, valid, reduction)
