r"""The one margin engine every classification head runs on.

A head is defined by its margin (see :class:`marginloss.MarginHead`); everything else is
here.  For embeddings :math:`x_i`, class weight rows :math:`w_j` (``K`` sub-centre rows per
class when ``num_subcenters > 1``) and labels :math:`y_i`, the engine computes

* the **target cosine** :math:`\cos\theta_{iy_i}` from the gathered rows ``weight[labels]``
  (O(B·D), in float64 so that :math:`\sin\theta` near :math:`\theta = 0` is not float32
  rounding), the embedding norms :math:`\lVert x_i\rVert` and the target weight norms;
* the **non-target row statistic** over every other class,
  :math:`r_i = \log\sum_{j\ne y_i} e^{z_{ij}}` (softmax form) or
  :math:`r_i = \sum_{j\ne y_i}\operatorname{softplus}(z_{ij})` (sigmoid form), with
  :math:`z_{ij} = \rho_{ij}\, g(\cos\theta_{ij}) + b`, where :math:`\rho` is the scale (times
  the norms for heads that do not normalise), :math:`g` an optional elementwise transform
  of the non-target cosines and :math:`b` an optional scalar bias;

in one :class:`torch.autograd.Function` with a closed-form backward.  The head's margin
:math:`f` is applied to the ``[B]`` target cosines *outside* that Function, in ordinary
autograd, so whatever the margin computes with (a learnable margin, the feature norm, an
EMA buffer) gets its exact gradient on every path.  The row loss is then assembled from
O(B) tensors: :math:`\operatorname{softplus}(r_i - t_i)` plus the label-smoothing terms for
the softmax form, :math:`\operatorname{softplus}(-t_i) + r_i` for the sigmoid form.

Paths (``chunk_size``):

* ``None``: plain autograd over the full ``[B, C]`` logits (twice differentiable).
* an int: the chunked engine walks the classes in chunks of that many and never holds more
  than one ``[B, chunk]`` block beyond the bounded cache of kept blocks
  (:func:`set_backward_cache_bytes`); weight rows are normalised on the fly and
  ``weight.grad`` is written chunk by chunk.
* ``"auto"``, by size.  At most ``2**21`` multiply-adds in ``x·Wᵀ`` (``B·C·K·D``; B=32,
  D=128 up to C=512): everything in float64 from one GEMM, the target cosine read off the
  same product (``_DenseEngine``, closed form, for the plain margin softmax; plain
  autograd for the other configurations); there a step costs its number of operations, so
  it is kept to about the plain PyTorch formula's.  At most :func:`plain_path_elements`
  logits: one ``[B, C]`` block with a closed-form backward and the float64 gathered-rows
  target (``_BlockEngine``; plain autograd for the other configurations).  Above:
  the chunked engine with :func:`default_chunk_size`.  Under autocast the small problems
  take the block or plain path (their GEMM follows autocast).  Every path gives the same
  values and gradients (to rounding) and every one is twice differentiable: a
  ``create_graph=True`` backward through a closed-form path recomputes the step with
  plain autograd (holding ``[B, C]`` for that backward only).

Class-sharded runs use the same Function: each rank computes the statistics of its shard,
the row statistics are combined by O(B) all-reduces, and the target cosine comes from the
rank that holds the target row (see :mod:`marginloss.sharding`).

Numerics: normalisation, margin, log-sum-exp and loss run in at least float32; only the
GEMMs follow ``torch.autocast``.  Embedding norms are taken in float64, so normalised heads
are scale invariant over the whole float32 range; a zero embedding has cosine 0 with every
class and gets a zero gradient.  Softmax probabilities whose gradient contribution would be
a subnormal float are set to exactly zero before the backward GEMMs (subnormal operands
slow CPU GEMMs down by more than an order of magnitude and carry no information at that
precision).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from marginloss import _validation as V
from marginloss import sharding

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "MarginContext",
    "TargetFn",
    "backward_cache_bytes",
    "default_chunk_size",
    "margin_loss",
    "margin_softmax_loss",
    "plain_path_elements",
    "reduce_rows",
    "replaying_forward",
    "rest_backward",
    "rest_logsumexp",
    "safe_reciprocal",
    "scaled_embeddings_backward",
    "set_backward_cache_bytes",
    "sigmoid_row_loss",
    "softmax_row_loss",
    "softplus",
]

TargetFn = Callable[[Tensor], Tensor]
"""The type of a margin on the target cosines, ``cos_target [B] -> f(cos_target) [B]``."""

ChunkSize = Union[int, str, None]
Scale = Union[float, Tensor]

_REDUCTIONS = ("mean", "sum", "none")
_FORMS = ("softmax", "sigmoid")
# CPU: one [B, chunk] float32 block of this many elements (4 MiB) stays cache-friendly while
# keeping each GEMM large enough to run near peak (measured: benchmarks/results/cpu.md).
_AUTO_BLOCK_ELEMENTS = 1 << 20
# Accelerators: each chunk launches ~40 kernels; 64 MiB blocks keep the GEMMs long enough
# to hide the launches (a design estimate, not yet measured on a GPU in this project).
_AUTO_BLOCK_ELEMENTS_ACCELERATOR = 1 << 24
_MIN_AUTO_CHUNK = 256
# "auto" takes the plain path up to this many [B, C] logits (1 MiB of float32 on CPU): there
# the per-chunk bookkeeping costs more than the one [B, C] block it saves.
_PLAIN_ELEMENTS = 1 << 18
# Below this many multiply-adds in x·Wᵀ (B·C·K·D) the plain path runs entirely in float64
# from one GEMM (its cost is then the number of operations, not their width).
_WIDE_MACS = 1 << 21
_DEFAULT_CACHE_BYTES = 64 << 20
# A placeholder the context holds until the engine has computed the norms.
_UNSET = torch.empty(0)
_cache_bytes = _DEFAULT_CACHE_BYTES


def plain_path_elements() -> int:
    """Up to how many ``[B, C]`` logits ``chunk_size="auto"`` computes one block (2**18).

    Below this size one ``[B, C]`` block costs at most 1 MiB of float32 and a single fused
    GEMM is faster than the chunked engine's per-chunk work; above it ``"auto"`` chunks
    (see the module docstring for the smaller, all-float64 regime below it).

    Examples
    --------
    >>> plain_path_elements()
    262144
    """
    return _PLAIN_ELEMENTS


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


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast disabled for ``device`` (nothing to disable on ``meta``)."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


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
    if device.type == "meta":
        return compute_dtype
    if torch.is_autocast_enabled(device.type) and compute_dtype == torch.float32:
        return torch.get_autocast_dtype(device.type)
    return compute_dtype

# ---------------------------------------------------------------- what a head sees


@dataclass
class MarginContext:
    """What the engine hands a head's hooks, one value per row of the (global) batch.

    Attributes
    ----------
    labels : Tensor
        ``[B]`` int64 class indices; rows that are ignored (``ignore_index``) hold 0.
    valid : Tensor
        ``[B]`` bool, ``False`` for ignored rows (their loss is dropped).
    embedding_norms : Tensor
        ``[B]`` :math:`\\lVert x_i\\rVert` in float64, differentiable (its gradient reaches the
        embeddings, e.g. for MagFace's magnitude-dependent margin); a detached copy in
        ``prepare``.
    weight_norms : Tensor
        ``[B]`` :math:`\\lVert w_{y_i}\\rVert` of each row's target weight (the winning
        sub-centre with ``num_subcenters > 1``), float64, differentiable.
    training : bool
        Whether the head is in training mode.
    update_state : bool
        Whether hooks should advance the head's state (EMA buffers, step counters): true in
        training mode, false in eval mode and while activation checkpointing replays a
        forward during backward (the replay must see the state the first pass saw).
    num_classes : int
        Classes in this step's softmax (the sampled union under PartialFC sampling).
    scale : float or Tensor
        The scale :math:`s` of this call.
    cos_target : Tensor or None
        ``[B]`` detached target cosines, set before :meth:`marginloss.MarginHead.prepare`
        and ``non_target`` run.
    rest : Tensor or None
        ``[B]`` detached non-target row statistic (log-sum-exp, or sum of softplus), set
        before ``row_loss`` runs.
    """

    labels: Tensor
    valid: Tensor
    embedding_norms: Tensor
    weight_norms: Tensor
    training: bool
    update_state: bool
    num_classes: int
    scale: Scale
    cos_target: Tensor | None = None
    rest: Tensor | None = None


TargetHook = Callable[[Tensor, MarginContext], Tensor]
NonTargetHook = Callable[[Tensor, MarginContext], Tensor]
PrepareHook = Callable[[MarginContext], None]
RowLossHook = Callable[[Tensor, Tensor, Tensor, MarginContext], Tensor]


class _Config:
    """Everything the chunked Function needs besides its tensor inputs (no tensors with grad)."""

    __slots__ = (
        "bias",
        "chunk_size",
        "form",
        "keep_blocks",
        "label_smoothing",
        "non_target",
        "non_target_grad",
        "normalize_embeddings",
        "normalize_weight",
        "num_classes",
        "num_subcenters",
        "prepare",
        "scale",
        "scale_grad",
    )

    def __init__(
        self,
        scale: Scale,
        normalize_embeddings: bool,
        normalize_weight: bool,
        label_smoothing: float,
        num_classes: int,
        chunk_size: int,
        *,
        keep_blocks: bool = False,
        num_subcenters: int = 1,
        form: str = "softmax",
        bias: Tensor | None = None,
        scale_grad: bool = False,
        non_target: Callable[[Tensor], Tensor] | None = None,
        non_target_grad: Callable[[Tensor], Tensor] | None = None,
        prepare: Callable[[Tensor, Tensor, Tensor], None] | None = None,
    ) -> None:
        self.scale = scale
        self.normalize_embeddings = normalize_embeddings
        self.normalize_weight = normalize_weight
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.chunk_size = chunk_size
        # Whether forward may keep logit blocks for backward (some input needs a gradient).
        self.keep_blocks = keep_blocks
        self.num_subcenters = num_subcenters
        self.form = form
        self.bias = bias
        self.scale_grad = scale_grad
        self.non_target = non_target
        self.non_target_grad = non_target_grad
        self.prepare = prepare

    @property
    def simple(self) -> bool:
        """The plain margin softmax (no sub-centres, transform, bias or learnable scale):
        the chunk loop's hand-tuned in-place path."""
        return (
            self.num_subcenters == 1
            and self.non_target is None
            and self.bias is None
            and not self.scale_grad
            and self.form == "softmax"
        )


# ---------------------------------------------------------------- O(B) math


def safe_reciprocal(norm: Tensor) -> Tensor:
    """``1/norm``, and 0 where the norm is 0 (a zero vector then has cosine 0 with everything
    and gets a zero gradient instead of a 1/eps one); differentiable without NaN."""
    # 1/inf = 0, and the gradient of the inf branch never reaches the norm.
    return torch.where(norm > 0, norm, math.inf).reciprocal()


def _row_norms(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """Row norms accumulated in ``dtype`` (float64 for embeddings: no overflow at 1e20,
    no underflow at 1e-25)."""
    norms: Tensor = torch.linalg.vector_norm(rows, dim=-1, dtype=dtype)
    return norms


def _clamp_unit(cos: Tensor) -> Tensor:
    # Rounding can push a cosine a few ulp past ±1; clamp the value, keep the gradient.
    return cos + (cos.clamp(-1.0, 1.0) - cos).detach()


def _target_cosine(
    x: Tensor, weight: Tensor, labels: Tensor, owned: Tensor, num_subcenters: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``cos θ_{i y_i}``, ``‖x_i‖``, ``‖w_{y_i}‖`` (float64, from the gathered target rows,
    O(B·K·D)) and the weight row index of each target (the winning sub-centre).

    ``labels`` are class indices into ``weight`` (``K`` rows per class); rows that do not
    hold their target here (``owned`` false) get cosine and weight norm 0.  Differentiable.
    """
    wide = _wide_dtype(x.device)
    classes = weight.shape[0] // num_subcenters
    cls = labels.clamp(0, max(classes - 1, 0))
    xw = x.to(wide)
    x_norm = _row_norms(xw, wide)
    x_inv = safe_reciprocal(x_norm)
    if num_subcenters == 1:
        rows = weight[cls].to(wide)
        w_norm = _row_norms(rows, wide)
        cos = (xw * rows).sum(dim=1) * x_inv * safe_reciprocal(w_norm)
        index = cls
    else:
        rows = weight.unflatten(0, (classes, num_subcenters))[cls].to(wide)
        w_norms = _row_norms(rows, wide)
        cos_k = (rows @ xw[:, :, None]).squeeze(2) * (x_inv[:, None] * safe_reciprocal(w_norms))
        cos, k = cos_k.max(dim=1)
        w_norm = w_norms.gather(1, k[:, None]).squeeze(1)
        index = cls * num_subcenters + k
    zero = torch.zeros((), dtype=wide, device=x.device)
    cos = torch.where(owned, _clamp_unit(cos), zero)
    return cos, x_norm, torch.where(owned, w_norm, zero), index


def _target_cosine_backward(
    x: Tensor,
    rows: Tensor,
    cos: Tensor,
    grad_cos: Tensor,
    grad_x_norm: Tensor,
    grad_w_norm: Tensor,
) -> tuple[Tensor, Tensor]:
    r"""Gradients of :func:`_target_cosine` for the embeddings and the target rows, float64.

    :math:`\partial\cos/\partial x = (\hat w - \cos\,\hat x)/\lVert x\rVert`,
    :math:`\partial\cos/\partial w = (\hat x - \cos\,\hat w)/\lVert w\rVert`,
    :math:`\partial\lVert x\rVert/\partial x = \hat x`.
    """
    wide = grad_cos.dtype
    x, rows = x.to(wide), rows.to(wide)
    x_inv = safe_reciprocal(_row_norms(x, wide))
    w_inv = safe_reciprocal(_row_norms(rows, wide))
    x_hat, w_hat = x * x_inv[:, None], rows * w_inv[:, None]
    # (ŵ - cos x̂) as a difference of unit vectors: near θ = 0 and π this gradient is
    # ill-conditioned, and this order of rounding is the one the references share.
    grad_x = (grad_cos * x_inv)[:, None] * (w_hat - cos[:, None] * x_hat) + grad_x_norm[:, None] * x_hat
    grad_w = (grad_cos * w_inv)[:, None] * (x_hat - cos[:, None] * w_hat) + grad_w_norm[:, None] * w_hat
    return grad_x, grad_w


def softmax_row_loss(
    target_logit: Tensor, rest: Tensor, rest_sum: Tensor, num_classes: int, label_smoothing: float
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
    loss = softplus(rest - target_logit)
    if label_smoothing > 0.0:
        loss = loss + label_smoothing * target_logit
        loss = loss - (label_smoothing / num_classes) * (rest_sum + target_logit)
    return loss


def softplus(z: Tensor) -> Tensor:
    """:math:`\\log(1 + e^z)` to full precision for every ``z`` (its gradient is exactly
    :math:`\\sigma(z)`).  ``torch.nn.functional.softplus`` at its default threshold of 20
    returns ``z`` itself above it, an error of :math:`e^{-20} \\approx 2\\cdot10^{-9}` that
    float64 sees; here the threshold is 40, above which :math:`\\log(1 + e^z) - z < e^{-40}`
    is below float64's rounding of ``z``, and below which torch computes ``log1p(exp(z))``."""
    return torch.nn.functional.softplus(z, beta=1.0, threshold=40.0)


def sigmoid_row_loss(target_logit: Tensor, rest: Tensor) -> Tensor:
    r"""Per-row loss of the sigmoid ("sum of softplus") form:
    :math:`\ell_i = \operatorname{softplus}(-t_i) + \sum_{j\ne y_i}\operatorname{softplus}(z_{ij})`,
    one binary classifier per class (UniFace, SphereFace2)."""
    return softplus(-target_logit) + rest


def reduce_rows(row_loss: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Rows of ``valid`` reduced by ``reduction``; invalid rows count as 0 (and not in a mean)."""
    row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    # Mean over non-ignored rows as torch.nn.CrossEntropyLoss does; an all-ignored batch
    # gives 0 (torch gives NaN) so padded distributed shards stay finite.
    return total / valid.sum().clamp_min(1).to(row_loss.dtype)


# ---------------------------------------------------------------- embeddings and weight norms


def _scaled_embeddings(x: Tensor, cfg: _Config) -> tuple[Tensor, Tensor | None]:
    """``xs = s·x/‖x‖`` (or ``s·x``) and the rows' 1/‖x‖ when normalising (norms in float64)."""
    if not cfg.normalize_embeddings:
        return x * cfg.scale, None
    wide = _wide_dtype(x.device)
    inv_norm = safe_reciprocal(_row_norms(x, wide))
    xs = (x.to(wide) * (inv_norm * cfg.scale)[:, None]).to(x.dtype)
    return xs, inv_norm.to(x.dtype)


def _weight_inv_norms(weight: Tensor, normalize_weight: bool, compute: torch.dtype) -> Tensor | None:
    """``1/‖w_j‖`` for every row (an O(C) vector), or None without weight normalisation."""
    if not normalize_weight:
        return None
    return safe_reciprocal(_row_norms(weight.detach(), compute))


def _kept_blocks(cfg: _Config, batch: int, num_rows: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """The ``[K, B, chunk_size·num_subcenters]`` buffer for the logit blocks forward keeps for
    backward: as many leading full-width chunks as fit the budget, or None (nothing to keep)."""
    if not cfg.keep_blocks:
        return None
    width = cfg.chunk_size * cfg.num_subcenters
    block = batch * width * torch.finfo(dtype).bits // 8
    kept = 0 if block == 0 else min(num_rows // width, _cache_bytes // block)
    return torch.empty((kept, batch, width), dtype=dtype, device=device) if kept else None


def _wants_gradient(*tensors: Tensor | None) -> bool:
    """Whether autograd will differentiate through these inputs (so blocks are worth keeping)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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


def _simple_rest_logsumexp(
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


def _simple_rest_backward(
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




# ---------------------------------------------------------------- the general chunk path
# Sub-centres, a non-target transform, a bias, a learnable scale or the sigmoid form, as lean
# as the simple path above: one GEMM per chunk, then the elementwise work tile by tile, in
# place in a few buffers allocated once per call; the per-row sign of the gradient goes onto
# the [B, D] operands, and would-be-subnormal gradients are exact zeros before the GEMMs.

# CPU: the elementwise passes of the general path run on column tiles of at most this many
# elements (1 MiB of float32).  A tile and its temporaries stay in a core's L2 cache over the
# dozen passes that go over it, and the temporaries a non-target hook allocates are recycled
# by the allocator: fresh [B, chunk] temporaries came from new pages each time, whose faults
# cost more than the hook's arithmetic (measured: benchmarks/results/cpu-every-head-100k.md).
_TILE_ELEMENTS = 1 << 18


class _Scratch:
    """Work blocks of one engine call, allocated at first use and reused by every chunk.

    ``take(name, rows, cols)`` is a contiguous ``[rows, cols]`` view of the first
    ``rows·cols`` elements of the buffer ``name`` (so narrower tiles and chunks fit too).
    """

    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.buffers: dict[str, Tensor] = {}
        self.views: dict[tuple[str, int, int], Tensor] = {}

    def take(self, name: str, rows: int, cols: int, dtype: torch.dtype | None = None) -> Tensor:
        view = self.views.get((name, rows, cols))
        if view is None:
            buffer = self.buffers.get(name)
            if buffer is None:
                buffer = torch.empty(self.capacity, dtype=dtype or self.dtype, device=self.device)
                self.buffers[name] = buffer
            view = self.views[name, rows, cols] = buffer[: rows * cols].view(rows, cols)
        return view


def _tile_width(batch: int, width: int, device: torch.device) -> int:
    """Class columns per tile of a ``width``-class chunk: equal tiles of at most
    :data:`_TILE_ELEMENTS` class logits on a CPU (``K`` times as many sub-centre logits:
    smaller tiles cost more in per-call overhead than they gain in cache), the whole chunk
    elsewhere (fewer launches) and under ``torch.compile`` (which fuses the passes and takes
    no strided ``out=``)."""
    if device.type != "cpu" or torch.compiler.is_compiling():  # compiled code fuses the passes
        return width
    most = max(1, _TILE_ELEMENTS // max(batch, 1))
    tiles = -(-width // most)
    return -(-width // tiles)


def _tile_targets(labels: Tensor, num_classes: int, width: int, tile: int) -> tuple[Tensor, Tensor]:
    """:func:`_chunk_targets` for the tiles of every chunk, in order: each tile's column of
    each row's target, ``[T, B, 1]`` (clamped into the tile), and whether it lies there."""
    if tile >= width:
        return _chunk_targets(labels, num_classes, width)
    starts, lasts = [], []
    for chunk in range(0, num_classes, width):
        n = min(width, num_classes - chunk)
        for offset in range(0, n, tile):
            starts.append(chunk + offset)
            lasts.append(min(tile, n - offset) - 1)
    start = torch.tensor(starts, device=labels.device)
    last = torch.tensor(lasts, device=labels.device)
    local = labels[None, :] - start[:, None]
    inside = (local >= 0) & (local <= last[:, None])
    local = local.clamp_min(0).minimum(last[:, None])
    return local[:, :, None], inside[:, :, None]


def _value_and_slope(non_target: Callable[[Tensor], Tensor], cos: Tensor) -> tuple[Tensor, Tensor]:
    """:math:`g(\\cos)` and :math:`g'(\\cos)` of a transform without a closed-form
    derivative, from one evaluation under autograd."""
    with torch.enable_grad():
        leaf = cos.detach().requires_grad_(True)
        value = non_target(leaf)
        if not value.requires_grad:  # a transform that does not depend on the cosine
            return value.detach(), torch.zeros((), dtype=cos.dtype, device=cos.device)
        (slope,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    if slope is None:
        slope = torch.zeros((), dtype=cos.dtype, device=cos.device)
    return value.detach(), slope


def _class_logits(
    z0: Tensor, cfg: _Config, scratch: _Scratch, own: bool, backward: bool = False
) -> tuple[Tensor, bool, Tensor | None, Tensor | None]:
    """``[B, m]`` class logits of one tile ``z0`` (``[B, m·K]``) of :math:`\\rho\\cos`: the
    max over each class's ``K`` sub-centres, the non-target transform :math:`s\\,g(z/s)`, the
    bias.

    Returns ``(z, writable, pooled, cos)``.  ``z`` is ``z0`` itself only when nothing changes
    it (one sub-centre, no transform, no bias); ``z0`` is overwritten only when ``own`` says
    the caller owns it, and ``writable`` says whether the caller may overwrite ``z``.
    ``pooled`` is the max over the sub-centres (None for ``K = 1``), kept intact in
    ``backward`` for :func:`_subcenter_grad`, with the sub-centre-major copy of ``z0`` it
    reads.  ``cos`` is what the transform saw (None
    without one), for :func:`_times_slope_`.  The non-target hooks see the tile's ``[B, m]``
    cosines.
    """
    batch, k = z0.shape[0], cfg.num_subcenters
    m = z0.shape[1] // k
    z, writable = z0, own
    pooled = cos = None
    if k > 1:
        pooled = scratch.take("pooled", batch, m)
        if backward:
            # Sub-centre-major planes [B, K, m] (one copy), so that the maxima here and the
            # winners in _subcenter_grad are contiguous passes (strided ones are not vectorised).
            planes = scratch.take("planes", batch, k * m).view(batch, k, m)
            planes.copy_(z0.unflatten(1, (m, k)).transpose(1, 2))
            torch.maximum(planes[:, 0], planes[:, 1], out=pooled)
            for j in range(2, k):
                torch.maximum(pooled, planes[:, j], out=pooled)
        else:
            torch.amax(z0.unflatten(1, (m, k)), dim=2, out=pooled)
        z, writable = pooled, not backward  # backward needs the pooled values for the winners
    bias = None if cfg.bias is None else cfg.bias.to(z.dtype)
    if cfg.non_target is not None:
        cos = z  # with a transform the GEMM gave the cosines themselves (_gemm_operand)
        if backward and cfg.non_target_grad is None:
            value, slope = _value_and_slope(cfg.non_target, cos)
            scratch.take("slope", batch, m).copy_(slope)
        else:
            value = cfg.non_target(cos)
        z = scratch.take("logits", batch, m)
        if bias is None:
            torch.mul(value, cfg.scale, out=z)
        elif isinstance(cfg.scale, Tensor):
            torch.addcmul(bias, value, cfg.scale, out=z)
        else:
            torch.add(bias, value, alpha=cfg.scale, out=z)
        return z, True, pooled, cos
    if bias is not None:
        if writable:
            z = z.add_(bias)
        else:
            z, writable = torch.add(z, bias, out=scratch.take("logits", batch, m)), True
    return z, writable, pooled, cos


def _subcenter_grad(grad: Tensor, pooled: Tensor, grad0: Tensor, scratch: _Scratch) -> Tensor:
    """``grad0`` (``[B, m·K]``): each class's gradient ``grad`` (``[B, m]``) on its winning
    sub-centre, the first of its ``K`` that holds the max ``pooled``, 0 elsewhere (0/1 float
    masks: boolean selects cost several passes), from the planes :func:`_class_logits` left."""
    batch, m = grad.shape
    k = grad0.shape[1] // m
    planes = scratch.take("planes", batch, k * m).view(batch, k, m)
    free = None
    for j in range(k):
        hit = torch.eq(planes[:, j], pooled, out=scratch.take("hit", batch, m))
        if free is not None:
            hit.mul_(free)
        if torch.compiler.is_compiling():  # no strided out= there
            grad0[:, j::k].copy_(grad * hit)
        else:
            torch.mul(grad, hit, out=grad0[:, j::k])
        if j < k - 1:
            if free is None:
                free = torch.sub(torch.ones((), dtype=hit.dtype, device=hit.device), hit, out=scratch.take("free", *grad.shape))
            else:
                free.sub_(hit)
    return grad0


def _gemm_operand(xs: Tensor, cfg: _Config) -> Tensor:
    """What the chunk GEMMs multiply the weight with: ``xs``, or with a non-target transform
    ``xs / s``, so that the blocks hold the cosines the transform takes (one pass over every
    block fewer; the weight gradient's radial term then carries the factor ``s``)."""
    return xs if cfg.non_target is None else xs * (1.0 / cfg.scale)


def _times_slope_(grad: Tensor, cos: Tensor, cfg: _Config, scratch: _Scratch) -> Tensor:
    """``grad`` times :math:`g'(\\cos)`, in place: the head's closed form, or what
    :func:`_class_logits` left from autograd."""
    if cfg.non_target_grad is None:
        return grad.mul_(scratch.take("slope", *grad.shape))
    return grad.mul_(cfg.non_target_grad(cos))


def _general_tile_forward(
    z0: Tensor, local: Tensor, inside: Tensor, cfg: _Config, need_sum: bool, scratch: _Scratch, own: bool
) -> tuple[Tensor, Tensor | None]:
    """Row statistic (float64) and sum of one tile's class logits; the target column is
    excluded.  ``z0`` is overwritten when ``own``."""
    z, writable, _, _ = _class_logits(z0, cfg, scratch, own)
    out = None if writable else scratch.take("terms", *z.shape)
    if cfg.form == "softmax":
        return _chunk_forward(z, local, inside, need_sum, out)
    at_target = z.gather(1, local)
    tile_sum = z.sum(dim=1) - torch.where(inside, at_target, 0.0).squeeze(1) if need_sum else None
    terms = torch.logaddexp(z, torch.zeros((), dtype=z.dtype, device=z.device), out=z if out is None else out)
    terms.scatter_(1, local, torch.where(inside, 0.0, terms.gather(1, local)))
    return terms.sum(dim=1).to(_wide_dtype(z.device)), tile_sum


def _general_chunk_grad(
    z: Tensor,
    local: Tensor,
    inside: Tensor,
    cfg: _Config,
    shift_hi: Tensor | None,
    shift_lo: Tensor | None,
    magnitude: Tensor | None,
    signed_sum: Tensor | None,
    out: Tensor,
) -> Tensor:
    """``dL/dz`` of one tile's class logits times each row's sign (target column 0), in
    ``out``: :math:`|g_i| p_{ij}` (softmax, folded into one exponent as in
    :func:`_chunk_grad_logits`) or :math:`|g_i| \\sigma(z_{ij})` (sigmoid), plus the signed
    label-smoothing term."""
    if cfg.form == "softmax":
        assert shift_hi is not None and shift_lo is not None
        return _chunk_grad_logits(z, local, inside, shift_hi, shift_lo, signed_sum, out)
    assert magnitude is not None
    grad = torch.sigmoid(z, out=out).mul_(magnitude[:, None])
    # Gradients below the smallest normal float become exact zeros (see the module docstring).
    info = torch.finfo(grad.dtype)
    torch.threshold_(grad, info.tiny * (1.0 - info.eps), 0.0)
    if signed_sum is not None:
        grad.add_(signed_sum[:, None])
    return grad.scatter_(1, local, torch.where(inside, 0.0, grad.gather(1, local)))


def _general_rest_logsumexp(
    xs: Tensor,
    weight: Tensor,
    labels: Tensor,
    cfg: _Config,
    compute: torch.dtype,
    inv_norms: Tensor | None,
    blocks: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    need_sum = cfg.label_smoothing > 0.0
    k = cfg.num_subcenters
    width, num_classes = cfg.chunk_size, weight.shape[0] // k
    batch = xs.shape[0]
    tile = _tile_width(batch, min(width, num_classes), xs.device)
    local, inside = _tile_targets(labels, num_classes, width, tile)
    kept = 0 if blocks is None else blocks.shape[0]
    wide = _wide_dtype(xs.device)
    softmax = cfg.form == "softmax"
    stat = torch.full((batch,), -math.inf if softmax else 0.0, dtype=wide, device=xs.device)
    sum_rest = torch.zeros_like(stat) if need_sum else None
    scratch = _Scratch(batch * min(width, num_classes) * k, compute, xs.device)
    operand = _gemm_operand(xs, cfg)
    position = 0
    for index, start in enumerate(range(0, num_classes, width)):
        n = min(width, num_classes - start)
        rows = slice(start * k, (start + n) * k)
        inv = None if inv_norms is None else inv_norms[rows]
        keep = blocks is not None and index < kept
        out = blocks[index] if keep and blocks is not None else scratch.take("block", batch, n * k)
        z0 = _chunk_logits(operand, weight[rows], inv, compute, out)
        for first in range(0, n, tile):
            last = min(first + tile, n)
            tile_stat, tile_sum = _general_tile_forward(
                z0[:, first * k : last * k], local[position], inside[position], cfg, need_sum, scratch,
                own=not keep,
            )
            position += 1
            stat = torch.logaddexp(stat, tile_stat) if softmax else stat + tile_stat
            if sum_rest is not None and tile_sum is not None:
                sum_rest = sum_rest + tile_sum.to(wide)
    return stat, sum_rest


def _general_rest_backward(
    xs: Tensor,
    weight: Tensor,
    labels: Tensor,
    stat: Tensor,
    grad_stat: Tensor,
    grad_sum: Tensor | None,
    cfg: _Config,
    compute: torch.dtype,
    need_x: bool,
    need_w: bool,
    inv_norms: Tensor | None,
    blocks: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """Gradients for ``xs``, ``weight``, the scale and the bias from the general chunk path.

    As in :func:`_simple_rest_backward`, the blocks hold ``dL/dz`` up to each row's sign
    :math:`\\operatorname{sign} g_i`, which is applied to the ``[B, D]`` operands; the scale
    and bias gradients are accumulated per row and signed at the end.
    """
    gemm = xs.dtype
    k = cfg.num_subcenters
    width, num_classes = cfg.chunk_size, weight.shape[0] // k
    batch = xs.shape[0]
    tile = _tile_width(batch, min(width, num_classes), xs.device)
    local, inside = _tile_targets(labels, num_classes, width, tile)
    kept = 0 if blocks is None else blocks.shape[0]
    sign = torch.where(grad_stat < 0, -1.0, 1.0).to(compute)
    signed_sum = None if grad_sum is None else (grad_sum * sign).to(compute)
    shift_hi = shift_lo = magnitude = None
    if cfg.form == "softmax":
        shift_hi = stat.to(compute)
        shift_lo = (grad_stat.to(stat.dtype).abs().log() - (stat - shift_hi.to(stat.dtype))).to(compute)
    else:
        magnitude = grad_stat.abs().to(compute)
    xs_signed = xs * sign.to(gemm)[:, None]
    grad_xs = torch.zeros(xs.shape, dtype=compute, device=xs.device) if need_x else None
    grad_weight = torch.empty_like(weight) if need_w else None
    direct = grad_weight is not None and grad_weight.dtype == gemm == compute
    # Per-row sums of the signed gradient (and of gradient times logit) over all chunks.
    row_grad = torch.zeros(batch, dtype=compute, device=xs.device) if cfg.bias is not None or cfg.scale_grad else None
    row_grad_logit = torch.zeros(batch, dtype=compute, device=xs.device) if cfg.scale_grad else None
    scratch = _Scratch(batch * min(width, num_classes) * k, compute, xs.device)
    operand = _gemm_operand(xs, cfg)
    # The radial term's factor: the blocks hold s·cos, or cos with a transform.
    radial_scale = None
    if inv_norms is not None:
        radial_scale = inv_norms.square() if operand is xs else inv_norms.square() * cfg.scale
    position = 0
    for index, start in enumerate(range(0, num_classes, width)):
        n = min(width, num_classes - start)
        rows = slice(start * k, (start + n) * k)
        chunk = weight[rows]
        inv = None if inv_norms is None else inv_norms[rows]
        if blocks is not None and index < kept:
            z0 = blocks[index]
        else:
            z0 = _chunk_logits(operand, chunk, inv, compute, scratch.take("block", batch, n * k))
        # dL/dz0 of the whole chunk (the GEMMs' operand) and, with 1/‖w‖, its radial term.
        grad0 = scratch.take("grad0", batch, n * k)
        radial = None
        if inv is not None and grad_weight is not None:
            radial = scratch.take("radial", 1, n * k)[0]
        for first in range(0, n, tile):
            last = min(first + tile, n)
            columns = slice(first * k, last * k)
            z0_tile, grad0_tile = z0[:, columns], grad0[:, columns]
            z, _, pooled, cos = _class_logits(z0_tile, cfg, scratch, own=False, backward=True)
            grad = _general_chunk_grad(
                z, local[position], inside[position], cfg, shift_hi, shift_lo, magnitude, signed_sum,
                grad0_tile if k == 1 else scratch.take("grad", batch, last - first),
            )
            position += 1
            if row_grad is not None:
                row_grad += grad.sum(dim=1)
            if row_grad_logit is not None:
                row_grad_logit += torch.mul(grad, z, out=scratch.take("product", *grad.shape)).sum(dim=1)
            if cos is not None:
                _times_slope_(grad, cos, cfg, scratch)
            if pooled is not None:
                _subcenter_grad(grad, pooled, grad0_tile, scratch)
            if radial is not None:
                # Σ_i g_ij z0_ij (g signed), for the addend -w_j·radial_j/‖w_j‖²; the product
                # overwrites z0 when it was recomputed (the block buffer is free otherwise).
                product = torch.mul(grad0_tile, z0_tile, out=scratch.take("block", batch, n * k)[:, columns])
                torch.mv(product.T, sign, out=radial[columns])
            if inv is not None:
                grad0_tile.mul_(inv[columns])
        if radial is not None and radial_scale is not None:
            radial.mul_(radial_scale[rows])
        grad_logits = grad0.to(gemm)
        if grad_xs is not None:
            if gemm == compute:
                grad_xs.addmm_(grad_logits, chunk.to(gemm))
            else:
                grad_xs.add_(torch.mm(grad_logits, chunk.to(gemm)).to(compute))
        if grad_weight is not None:
            out = grad_weight[rows]
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
    grad_scale = torch.zeros((), dtype=compute, device=xs.device)
    grad_bias = torch.zeros((), dtype=compute, device=xs.device)
    if row_grad is not None and cfg.bias is not None:
        grad_bias = (row_grad * sign).sum()
    if row_grad_logit is not None and row_grad is not None:
        # z - b = s·g(cos): the class logit is linear in s at fixed cosines.
        bias = 0.0 if cfg.bias is None else cfg.bias.to(compute)
        grad_scale = ((row_grad_logit - bias * row_grad) * sign).sum() / cfg.scale
    return grad_xs, grad_weight, grad_scale, grad_bias


def rest_logsumexp(
    xs: Tensor,
    weight: Tensor,
    labels: Tensor,
    cfg: _Config,
    compute: torch.dtype,
    inv_norms: Tensor | None = None,
    blocks: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """O(B) non-target row statistic (and sum, with label smoothing) over the rows of
    ``weight``, chunk by chunk, returned in float64.

    The statistic is the log-sum-exp of the non-target logits (softmax form) or the sum of
    their softplus (sigmoid form).  ``labels`` index classes of ``weight`` (``K`` rows each);
    a label outside ``[0, classes)`` (a target held by another shard) excludes nothing.
    ``xs`` are the scaled embeddings in the GEMM dtype; ``inv_norms`` the rows' 1/‖w‖ if
    already known.  ``blocks``, a ``[K, B, chunk_size·num_subcenters]`` buffer, receives the
    logits of the first ``K`` chunks for :func:`rest_backward`.
    """
    if inv_norms is None:
        inv_norms = _weight_inv_norms(weight, cfg.normalize_weight, compute)
    if cfg.simple:
        return _simple_rest_logsumexp(xs, weight, labels, cfg, compute, inv_norms, blocks)
    return _general_rest_logsumexp(xs, weight, labels, cfg, compute, inv_norms, blocks)


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
    if inv_norms is None:
        inv_norms = _weight_inv_norms(weight, cfg.normalize_weight, compute)
    if cfg.simple:
        return _simple_rest_backward(
            xs, weight, labels, lse_rest, grad_lse, grad_sum, cfg, compute, need_x, need_w, inv_norms, blocks
        )
    grad_xs, grad_weight, _, _ = _general_rest_backward(
        xs, weight, labels, lse_rest, grad_lse, grad_sum, cfg, compute, need_x, need_w, inv_norms, blocks
    )
    return grad_xs, grad_weight


# ---------------------------------------------------------------- the plain path


def _plain_rest(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    owned: Tensor,
    scale: Scale,
    bias: Tensor | None,
    cfg: _Config,
    gemm: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Row statistic and sum with plain autograd over the full ``[B, C]`` logits (the GEMM in
    ``gemm``: the autocast dtype the caller saw, or the compute dtype)."""
    compute = _compute_dtype(x, weight)
    wide = _wide_dtype(x.device)
    xc = x.to(compute)
    w = weight.to(compute)
    if cfg.normalize_embeddings:
        xc = (xc.to(wide) * safe_reciprocal(_row_norms(xc, wide))[:, None]).to(compute)
    if cfg.normalize_weight:
        w = w * safe_reciprocal(_row_norms(w, compute))[:, None]
    xc = xc * scale  # on the [B, D] side: one [B, C] tensor fewer
    with _autocast_off(x.device):
        z = (xc.to(gemm) @ w.to(gemm).T).to(compute)
    k = cfg.num_subcenters
    if k > 1:
        z = z.unflatten(1, (-1, k)).amax(dim=2)
    if cfg.non_target is not None:
        z = (scale * cfg.non_target(z / scale)).to(compute)
    if bias is not None:
        z = z + bias.to(compute)
    # Index-based exclusion of the target column: no [B, C] mask is built or kept.
    column = torch.where(owned, labels, torch.zeros_like(labels))[:, None]
    at_target = z.gather(1, column).squeeze(1)
    if cfg.label_smoothing > 0.0:
        rest_sum = z.sum(dim=1) - torch.where(owned, at_target, 0.0)
    else:
        rest_sum = torch.zeros_like(at_target)
    if cfg.form == "softmax":
        excluded = torch.where(owned, -math.inf, at_target)
        stat = z.scatter(1, column, excluded[:, None]).logsumexp(dim=1)
    else:
        terms = softplus(z)
        stat = terms.sum(dim=1) - torch.where(owned, terms.gather(1, column).squeeze(1), 0.0)
    return stat.to(wide), rest_sum.to(wide)


def _wide_parts(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    owned: Tensor,
    scale: Scale,
    bias: Tensor | None,
    cfg: _Config,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every per-row part of a small problem from one float64 GEMM, in plain autograd.

    Returns ``(stat, rest_sum, cos, ‖x‖, ‖w_y‖)`` like the chunked engine.  The target cosine
    is read off the same ``x·Wᵀ`` product as the rest, which in float64 is as exact as the
    engine's gathered-rows target path; a small problem then costs about as many operations
    as the plain PyTorch formula.  Twice differentiable.
    """
    wide = _wide_dtype(x.device)
    k = cfg.num_subcenters
    xw, ww = x.to(wide), weight.to(wide)
    x_norm, w_norms = _row_norms(xw, wide), _row_norms(ww, wide)
    x_inv, w_inv = safe_reciprocal(x_norm), safe_reciprocal(w_norms)
    dots = xw @ ww.T
    cls = labels.clamp_min(0)
    # Target cosines summed as the chunked engine sums them (near θ = 0 their gradient is
    # ill-conditioned, so the paths should round alike), not read off the product.
    if k == 1:
        index = cls
        cos = (xw * ww[cls]).sum(dim=1) * x_inv * w_inv[cls]
    else:
        rows = cls[:, None] * k + torch.arange(k, device=cls.device)
        cos_k = (ww[rows] @ xw[:, :, None]).squeeze(2) * (x_inv[:, None] * w_inv[rows])
        cos, winner = cos_k.max(dim=1)
        index = cls * k + winner
    zero = torch.zeros((), dtype=wide, device=x.device)
    cos = torch.where(owned, _clamp_unit(cos), zero)
    w_norm = torch.where(owned, w_norms[index], zero)
    if cfg.prepare is not None:
        cfg.prepare(cos, x_norm, w_norm)
    row_factor = x_inv * scale if cfg.normalize_embeddings else None
    if row_factor is not None:
        z = dots * row_factor[:, None]
    else:
        z = dots * scale
    if cfg.normalize_weight:
        z = z * w_inv
    if k > 1:
        z = z.unflatten(1, (-1, k)).amax(dim=2)
    if cfg.non_target is not None:
        z = scale * cfg.non_target(z / scale)
    if bias is not None:
        z = z + bias.to(wide)
    column = torch.where(owned, labels, torch.zeros_like(labels))[:, None]
    at_target = z.gather(1, column).squeeze(1)
    if cfg.label_smoothing > 0.0:
        rest_sum = z.sum(dim=1) - torch.where(owned, at_target, 0.0)
    else:
        rest_sum = torch.zeros_like(at_target)
    if cfg.form == "softmax":
        excluded = torch.where(owned, -math.inf, at_target)
        stat = z.scatter(1, column, excluded[:, None]).logsumexp(dim=1)
    else:
        terms = softplus(z)
        stat = terms.sum(dim=1) - torch.where(owned, terms.gather(1, column).squeeze(1), 0.0)
    return stat, rest_sum, cos, x_norm, w_norm


class _DenseEngine(torch.autograd.Function):
    r"""The plain margin softmax of a small problem in float64, one GEMM, closed-form backward.

    Outputs what :class:`_MarginEngine` does (row statistic, non-target sum, target cosine,
    ``‖x‖``, ``‖w_y‖``) from the dots :math:`d = x W^\top` and the row norms, with
    :math:`z_{ij} = a_i\,d_{ij}\,v_j` (:math:`a_i = s/\lVert x_i\rVert` or :math:`s`,
    :math:`v_j = 1/\lVert w_j\rVert` or 1) and :math:`\cos\theta_{iy_i} =
    d_{iy_i}/(\lVert x_i\rVert\lVert w_{y_i}\rVert)`.  Backward forms
    :math:`\partial L/\partial d` in one ``[B, C]`` block (the target cosine's gradient
    is one more entry per row), so two GEMMs and O(B + C) norm terms give both gradients.
    A zero embedding or weight row has cosine 0 and a zero gradient.  ``owned`` None means
    every row is valid (fewer operations).  Only for ``cfg.simple`` configurations; double
    backward recomputes with :func:`_wide_parts`.  Its cost is the number of operations
    (a few dozen each way), which is why small problems take this path.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        owned: Tensor | None,
        scale: Tensor | None,
        cfg: _Config,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        wide = _wide_dtype(embeddings.device)
        xw, ww = embeddings.to(wide), weight.to(wide)
        x_norm, w_norms = _row_norms(xw, wide), _row_norms(ww, wide)
        x_inv, w_inv = _reciprocal_or_zero(x_norm), _reciprocal_or_zero(w_norms)
        cls = labels.clamp_min(0)
        column = cls[:, None]
        dots = torch.mm(xw, ww.T)
        # The target cosine summed as the chunked engine sums it (its gradient near θ = 0 is
        # ill-conditioned, so the paths should round alike), not read off the product.
        cos = ((xw * ww[cls]).sum(dim=1) * x_inv * w_inv[cls]).clamp_(-1.0, 1.0)
        w_norm = w_norms[cls]
        if owned is not None:
            cos = torch.where(owned, cos, 0.0)
            w_norm = torch.where(owned, w_norm, 0.0)
        s = cfg.scale if scale is None else scale.to(wide)
        z = dots.mul_((x_inv * s)[:, None] if cfg.normalize_embeddings else s)
        if cfg.normalize_weight:
            z.mul_(w_inv)
        if owned is None:
            masked = z.scatter(1, column, -math.inf)
        else:
            masked = z.scatter(1, column, torch.where(owned[:, None], -math.inf, z.gather(1, column)))
        if cfg.label_smoothing > 0.0:
            rest_sum = masked.nan_to_num(neginf=0.0).sum(dim=1)
        else:
            rest_sum = torch.zeros_like(x_norm)
        stat = masked.logsumexp(dim=1)
        ctx.save_for_backward(embeddings, weight, labels, owned, scale, xw, ww, x_inv, w_inv, z, masked, stat, cos)  # type: ignore[arg-type]
        ctx.cfg = cfg  # type: ignore[attr-defined]
        return stat, rest_sum, cos, x_norm, w_norm

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_stat: Tensor | None,
        grad_sum: Tensor | None,
        grad_cos: Tensor | None,
        grad_x_norm: Tensor | None,
        grad_w_norm: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        cfg: _Config = ctx.cfg  # type: ignore[attr-defined]
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        embeddings, weight, labels, owned, scale, xw, ww, x_inv, w_inv, z, masked, stat, cos = saved
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            return _dense_double_backward(
                needs, (grad_stat, grad_sum, grad_cos, grad_x_norm, grad_w_norm), saved, cfg
            )
        wide = xw.dtype
        cls = labels.clamp_min(0)
        column = cls[:, None]
        # dL/dz: the softmax of the rest (target column 0; a row with no other class, stat
        # -inf, has none), plus the smoothing sum's 1s.
        if grad_stat is not None:
            shift = stat.clamp_min(torch.finfo(wide).min)[:, None]
            grad_z = masked.sub(shift).exp_().mul_(grad_stat.to(wide)[:, None])
        else:
            grad_z = torch.zeros_like(z)
        if grad_sum is not None and cfg.label_smoothing > 0.0:
            grad_z.add_(grad_sum.to(wide)[:, None]).scatter_(1, column, 0.0)
        s = cfg.scale if scale is None else scale.to(wide)
        # dL/d(dots): the logits' factors, and the target cosine's entry in its column.
        grad_dots = grad_z * ((x_inv * s)[:, None] if cfg.normalize_embeddings else s)
        if cfg.normalize_weight:
            grad_dots.mul_(w_inv)
        target_term = None
        if grad_cos is not None:
            g = grad_cos.to(wide) if owned is None else torch.where(owned, grad_cos.to(wide), 0.0)
            grad_dots.scatter_add_(1, column, (g * x_inv * w_inv[cls])[:, None])
            target_term = g * cos
        grad_x = torch.mm(grad_dots, ww) if needs[0] else None
        grad_w = torch.mm(grad_dots.T, xw) if needs[1] else None
        # Norm terms: dL/d‖x‖ = -(Σ_j g_ij z_ij [normalised] + g_cos cos)/‖x‖ + g_‖x‖, alike for w.
        product = grad_z.mul_(z) if cfg.normalize_embeddings or cfg.normalize_weight else None
        if grad_x is not None:
            radial = product.sum(dim=1) if product is not None and cfg.normalize_embeddings else None
            if target_term is not None:
                radial = target_term if radial is None else radial.add_(target_term)
            grad_norm = None if radial is None else (radial * x_inv).neg_()
            if grad_x_norm is not None:
                grad_norm = grad_x_norm.to(wide) if grad_norm is None else grad_norm.add_(grad_x_norm.to(wide))
            if grad_norm is not None:
                grad_x.addcmul_(xw, grad_norm.mul_(x_inv)[:, None])
        if grad_w is not None:
            radial_w = product.sum(dim=0) if product is not None and cfg.normalize_weight else torch.zeros_like(w_inv)
            if target_term is not None:
                radial_w.index_add_(0, cls, target_term)
            grad_norm_w = radial_w.mul_(w_inv).neg_()
            if grad_w_norm is not None:
                g_norm = grad_w_norm.to(wide) if owned is None else torch.where(owned, grad_w_norm.to(wide), 0.0)
                grad_norm_w.index_add_(0, cls, g_norm)
            grad_w.addcmul_(ww, grad_norm_w.mul_(w_inv)[:, None])
        return (
            None if grad_x is None else grad_x.to(embeddings.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None,
            None,
            None,
            None,
        )


def _reciprocal_or_zero(norm: Tensor) -> Tensor:
    """``1/norm`` with 0 for a zero norm, outside autograd (NaN stays NaN)."""
    return norm.reciprocal().nan_to_num_(nan=math.nan, posinf=0.0)


class _BlockEngine(torch.autograd.Function):
    r"""A mid-sized problem as one ``[B, C·K]`` block with a closed-form backward.

    What :class:`_MarginEngine` computes with a single chunk, in fewer passes: the block
    :math:`z^0 = (s\,x/\lVert x\rVert) W^\top` scaled by :math:`1/\lVert w_j\rVert` in the
    compute dtype (the GEMMs follow autocast); the class logits (max over each class's
    ``K`` sub-centres, the non-target transform :math:`s\,g(z/s)`, the bias); their
    exponentials (softmax form) or the logits (sigmoid form) kept for backward; the target
    cosine from the gathered winning rows in float64 (the winning sub-centre read off the
    block).  Backward: :math:`G = \partial L/\partial z` through the transform's slope back
    to the block, two GEMMs, the weight normalisation's radial term
    :math:`\sum_i G_{ij} z^0_{ij}` from the block, the embedding normalisation and the
    float64 target terms on ``[B, D]``; the scale's and the bias's gradients from the block.
    Needs normalised weights with sub-centres (every such head has them).  Double backward
    recomputes with plain autograd.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        owned: Tensor | None,
        scale: Tensor | None,
        bias: Tensor | None,
        inv_norms: Tensor | None,
        cfg: _Config,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        compute = _compute_dtype(embeddings, weight)
        gemm = _gemm_dtype(embeddings.device, compute)
        wide = _wide_dtype(embeddings.device)
        k = cfg.num_subcenters
        cls = labels.clamp_min(0)
        column = cls[:, None]
        x64 = embeddings.to(wide)
        x_norm = _row_norms(x64, wide)
        x_inv = _reciprocal_or_zero(x_norm)
        s = cfg.scale if scale is None else scale.to(wide)
        row_factor = (x_inv * s) if cfg.normalize_embeddings else None
        x = embeddings.to(compute)
        xs = x * (row_factor.to(compute)[:, None] if row_factor is not None else s)
        with _autocast_off(embeddings.device):
            z0 = torch.mm(xs.to(gemm), weight.to(gemm).T).to(compute)
        if cfg.normalize_weight:
            assert inv_norms is not None
            z0.mul_(inv_norms)
        winner = None
        index = cls
        if k > 1:
            # The target's winning sub-centre is the largest of its K block entries (the
            # block is x̂·ŵ times a per-row factor); its cosine is then taken in float64.
            candidates = cls[:, None] * k + torch.arange(k, device=cls.device)
            index = candidates.gather(1, z0.gather(1, candidates).argmax(dim=1, keepdim=True)).squeeze(1)
        r64 = weight.index_select(0, index).to(wide)
        r_norm = _row_norms(r64, wide)
        r_inv = _reciprocal_or_zero(r_norm)
        # The product's buffer is kept as backward's float64 workspace (fresh pages cost).
        work = torch.mul(x64, r64)
        cos = (work.sum(dim=1) * (x_inv * r_inv)).clamp_(-1.0, 1.0)
        w_norm = r_norm
        if owned is not None:
            cos = torch.where(owned, cos, 0.0)
            w_norm = torch.where(owned, r_norm, 0.0)
        if cfg.prepare is not None:
            cfg.prepare(cos, x_norm, w_norm)
        # The class logits (a new tensor unless the block is used as it is).
        z = z0
        if k > 1:
            z, winner = z0.unflatten(1, (-1, k)).max(dim=2)
        unit = None
        if cfg.non_target is not None:
            unit = z / cfg.scale
            z = (cfg.scale * cfg.non_target(unit)).to(compute)
        if cfg.bias is not None:
            z = z + cfg.bias.to(compute)
        at_target = z.gather(1, column)
        if owned is None:
            kept_target = at_target.squeeze(1)
        else:
            kept_target = torch.where(owned, at_target.squeeze(1), 0.0)
        if cfg.label_smoothing > 0.0:
            rest_sum = (z.sum(dim=1) - kept_target).to(wide)
        else:
            rest_sum = torch.zeros_like(x_norm)
        if cfg.form == "softmax":
            excluded = -math.inf if owned is None else torch.where(owned[:, None], -math.inf, at_target)
            masked = z.scatter(1, column, excluded)
            row_max = masked.amax(dim=1, keepdim=True).clamp_min_(torch.finfo(compute).min)
            kept = _flushed_exp_(masked.sub_(row_max))
            total = kept.sum(dim=1).to(wide)
            stat = total.log().add_(row_max.squeeze(1))
        else:
            terms = softplus(z)
            at_terms = terms.gather(1, column).squeeze(1)
            stat = (terms.sum(dim=1) - (at_terms if owned is None else torch.where(owned, at_terms, 0.0))).to(wide)
            kept, total = z, stat
        ctx.save_for_backward(
            embeddings, weight, labels, owned, scale, bias, inv_norms, xs, z0, z, kept, total,  # type: ignore[arg-type]
            x64, r64, x_inv, r_inv, cos, index, winner, unit,  # type: ignore[arg-type]
        )
        # Scratch only (backward overwrites it), so not a saved tensor under version checks.
        ctx.work = work  # type: ignore[attr-defined]
        ctx.cfg = cfg  # type: ignore[attr-defined]
        ctx.gemm = gemm  # type: ignore[attr-defined]
        return stat, rest_sum, cos, x_norm, w_norm

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_stat: Tensor | None,
        grad_sum: Tensor | None,
        grad_cos: Tensor | None,
        grad_x_norm: Tensor | None,
        grad_w_norm: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        cfg: _Config = ctx.cfg  # type: ignore[attr-defined]
        gemm: torch.dtype = ctx.gemm  # type: ignore[attr-defined]
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        (embeddings, weight, labels, owned, scale, bias, inv_norms, xs, z0, z, kept, total,
         x64, r64, x_inv, r_inv, cos, index, winner, unit) = saved
        work: Tensor = ctx.work  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            return _dense_double_backward(
                needs, (grad_stat, grad_sum, grad_cos, grad_x_norm, grad_w_norm), saved, cfg, wide_gemm=False
            )
        compute = z0.dtype
        wide = x64.dtype
        cls = labels.clamp_min(0)
        column = cls[:, None]
        # dL/dz of the class logits, the target column 0.
        if grad_stat is None:
            grad_z = torch.zeros_like(z)
        elif cfg.form == "softmax":
            grad_z = kept * (grad_stat.to(wide) * safe_reciprocal(total)).to(compute)[:, None]
        else:
            grad_z = torch.sigmoid(kept).mul_(grad_stat.to(compute)[:, None])
            grad_z.masked_fill_(grad_z.abs() < torch.finfo(compute).tiny, 0.0)
        if grad_sum is not None and cfg.label_smoothing > 0.0:
            grad_z.add_(grad_sum.to(compute)[:, None])
        if cfg.form != "softmax" or (grad_sum is not None and cfg.label_smoothing > 0.0):
            if owned is None:
                grad_z.scatter_(1, column, 0.0)
            else:
                grad_z.scatter_(1, column, torch.where(owned[:, None], 0.0, grad_z.gather(1, column)))
        grad_bias = grad_scale = None
        if needs[5]:
            grad_bias = grad_z.sum()
        if needs[4]:
            shifted = z if cfg.bias is None else z - cfg.bias.to(compute)
            grad_scale = (grad_z * shifted).sum() / cfg.scale
        if unit is not None:
            if cfg.non_target_grad is not None:
                slope = cfg.non_target_grad(unit)
            else:
                assert cfg.non_target is not None
                with torch.enable_grad():
                    leaf = unit.detach().requires_grad_(True)
                    (slope,) = torch.autograd.grad(cfg.non_target(leaf).sum(), leaf)
            grad_z = grad_z * slope.to(compute)
        if winner is not None:
            block = torch.zeros((*grad_z.shape, cfg.num_subcenters), dtype=compute, device=grad_z.device)
            grad_z = block.scatter_(2, winner[..., None], grad_z[..., None]).flatten(1)
        s = cfg.scale if scale is None else scale.to(wide)
        grad_x: Tensor | None = None
        grad_w: Tensor | None = None
        with _autocast_off(embeddings.device):
            if needs[1] and cfg.normalize_weight:
                assert inv_norms is not None
                radial_w = (grad_z * z0).sum(dim=0).mul_(inv_norms.square())
            if cfg.normalize_weight:
                grad_z.mul_(inv_norms)
            g = grad_z.to(gemm)
            if needs[0]:
                grad_x = torch.mm(g, weight.to(gemm)).to(compute)
            if needs[1]:
                grad_w = torch.mm(g.T, xs.to(gemm)).to(compute)
                if cfg.normalize_weight:
                    grad_w.addcmul_(weight.to(compute), radial_w[:, None], value=-1.0)
        # The rest's part of dL/dx through xs = s·x/‖x‖ (or s·x); then the float64 target terms.
        coefficient = None
        if grad_x is not None:
            if cfg.normalize_embeddings:
                radial = (xs * grad_x).sum(dim=1).to(wide)
                row_factor = x_inv * s
                grad_x.mul_(row_factor.to(compute)[:, None])
                coefficient = -radial * row_factor / (s * s)
            else:
                grad_x.mul_(s)
        g_cos = None if grad_cos is None else grad_cos.to(wide) if owned is None else torch.where(owned, grad_cos.to(wide), 0.0)
        g_wn = None if grad_w_norm is None else grad_w_norm.to(wide) if owned is None else torch.where(owned, grad_w_norm.to(wide), 0.0)
        if grad_x is not None:
            # x̂ = x64·x_inv: the coefficients on x64 of the embedding-norm terms.
            on_x = None if coefficient is None else coefficient * x_inv * s
            if grad_x_norm is not None:
                extra = grad_x_norm.to(wide) * x_inv
                on_x = extra if on_x is None else on_x + extra
            # Combined in float64 (the target terms cancel to O(sin θ) near θ = 0), added in
            # the compute dtype (a mixed-dtype in-place add is many times slower).
            if g_cos is not None:
                extra = -g_cos * cos * x_inv.square()
                on_x = extra if on_x is None else on_x + extra
                torch.mul(r64, (g_cos * x_inv * r_inv)[:, None], out=work).addcmul_(x64, on_x[:, None])
                grad_x.add_(work.to(compute))
            elif on_x is not None:
                grad_x.add_(torch.mul(x64, on_x[:, None], out=work).to(compute))
        if grad_w is not None and (g_cos is not None or g_wn is not None):
            on_r = torch.zeros_like(r_inv)
            if g_cos is not None:
                on_r = on_r - g_cos * cos * r_inv.square()
            if g_wn is not None:
                on_r = on_r + g_wn * r_inv
            torch.mul(r64, on_r[:, None], out=work)
            if g_cos is not None:
                work.addcmul_(x64, (g_cos * x_inv * r_inv)[:, None])
            grad_w.index_add_(0, index, work.to(compute))
        return (
            None if grad_x is None else grad_x.to(embeddings.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None,
            None,
            None if grad_scale is None else grad_scale.reshape(scale.shape).to(scale.dtype),
            None if grad_bias is None else grad_bias.reshape(bias.shape).to(bias.dtype),
            None,
            None,
        )


def _block_covers(num_subcenters: int, normalize_weight: bool) -> bool:
    """Whether :class:`_BlockEngine` computes this configuration (sub-centres need
    normalised weights: the winner is read off the block)."""
    return num_subcenters == 1 or normalize_weight


def _dense_double_backward(
    needs: tuple[bool, ...],
    grads: tuple[Tensor | None, ...],
    saved: tuple[Tensor, ...],
    cfg: _Config,
    *,
    wide_gemm: bool = True,
) -> tuple[Tensor | None, ...]:
    """A ``create_graph=True`` backward of :class:`_DenseEngine`: recompute with plain
    autograd (:func:`_wide_parts`) so that second derivatives are exact."""
    embeddings, weight, labels, owned, scale = saved[:5]
    bias = None if wide_gemm else saved[5]
    if owned is None:
        owned = torch.ones_like(labels, dtype=torch.bool)
    used_scale: Scale = scale if scale is not None else cfg.scale
    if wide_gemm:
        outputs = _wide_parts(embeddings, weight, labels, owned, used_scale, None, cfg)
    else:
        gemm = _gemm_dtype(embeddings.device, _compute_dtype(embeddings, weight))
        with _autocast_off(embeddings.device):
            cos, x_norm, w_norm, _ = _target_cosine(embeddings, weight, labels, owned, cfg.num_subcenters)
            stat, rest_sum = _plain_rest(embeddings, weight, labels, owned, used_scale, bias, cfg, gemm)
        outputs = (stat, rest_sum, cos, x_norm, w_norm)
    inputs = ((0, embeddings), (1, weight)) if wide_gemm else ((0, embeddings), (1, weight), (4, scale), (5, bias))
    candidates = [(i, t) for i, t in inputs if t is not None and needs[i]]
    return _recomputed_grads(outputs, grads, candidates, 6 if wide_gemm else 8)


def _recomputed_grads(
    outputs: tuple[Tensor, ...],
    grads: tuple[Tensor | None, ...],
    candidates: list[tuple[int, Tensor]],
    count: int,
) -> tuple[Tensor | None, ...]:
    """A Function's double-backward result from outputs recomputed with plain autograd:
    the gradients of ``outputs`` (weighted by ``grads``) for each ``(position, input)``,
    with a graph, in a tuple of ``count`` entries (None elsewhere)."""
    pairs = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None and out.requires_grad]
    result: list[Tensor | None] = [None] * count
    if not pairs or not candidates:
        return tuple(result)
    got = torch.autograd.grad(
        [out for out, _ in pairs],
        [t for _, t in candidates],
        [grad.to(out.dtype) for out, grad in pairs],
        create_graph=True,
        allow_unused=True,
    )
    for (position, tensor), grad in zip(candidates, got):
        result[position] = torch.zeros_like(tensor) if grad is None else grad
    return tuple(result)


# ---------------------------------------------------------------- the chunked Function


class _MarginEngine(torch.autograd.Function):
    """Target cosines, norms and the non-target row statistic, class chunk by class chunk.

    Inputs: the (global) embeddings ``[N, D]``, this process's weight rows, the target class
    of each row within them (``owned`` false where another shard holds it), the scale and the
    bias when they are tensors, the O(C) inverse weight norms.  Outputs (all ``[N]``): the
    row statistic, the non-target sum, the target cosine, ``‖x‖`` and ``‖w_y‖``.

    Saves the inputs, O(B) row statistics, the O(C) 1/‖w‖ and the logit blocks of the first
    chunks within :func:`set_backward_cache_bytes`; backward recomputes every other chunk.
    With a process group the statistics are combined over ranks in forward and the incoming
    gradients averaged over ranks in backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        owned: Tensor,
        scale: Tensor | None,
        bias: Tensor | None,
        inv_norms: Tensor | None,
        cfg: _Config,
        group: ProcessGroup | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        compute = _compute_dtype(embeddings, weight)
        gemm = _gemm_dtype(embeddings.device, compute)
        with _autocast_off(embeddings.device):
            cos, x_norm, w_norm, index = _target_cosine(embeddings, weight, labels, owned, cfg.num_subcenters)
            if group is not None:
                stacked = torch.stack([cos, w_norm])
                torch.distributed.all_reduce(stacked, group=group)
                cos, w_norm = stacked[0], stacked[1]
            if cfg.prepare is not None:
                cfg.prepare(cos, x_norm, w_norm)
            x = embeddings.to(compute)
            xs, _ = _scaled_embeddings(x, cfg)
            blocks = _kept_blocks(cfg, x.shape[0], weight.shape[0], compute, x.device)
            stat, rest_sum = rest_logsumexp(xs.to(gemm), weight, labels, cfg, compute, inv_norms, blocks)
            if rest_sum is None:
                rest_sum = torch.zeros_like(stat)
            if group is not None:
                if cfg.form == "softmax":
                    stat = sharding.all_reduce_logsumexp(stat, group)
                    torch.distributed.all_reduce(rest_sum, group=group)
                else:
                    stacked = torch.stack([stat, rest_sum])
                    torch.distributed.all_reduce(stacked, group=group)
                    stat, rest_sum = stacked[0], stacked[1]
        ctx.save_for_backward(
            embeddings, weight, labels, owned, scale, bias, inv_norms, stat, cos, index, blocks  # type: ignore[arg-type]
        )
        ctx.cfg = cfg  # type: ignore[attr-defined]
        ctx.group = group  # type: ignore[attr-defined]
        ctx.compute = compute  # type: ignore[attr-defined]
        ctx.gemm = gemm  # type: ignore[attr-defined]
        return stat, rest_sum, cos, x_norm, w_norm

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_stat: Tensor | None,
        grad_sum: Tensor | None,
        grad_cos: Tensor | None,
        grad_x_norm: Tensor | None,
        grad_w_norm: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        cfg: _Config = ctx.cfg  # type: ignore[attr-defined]
        group: ProcessGroup | None = ctx.group  # type: ignore[attr-defined]
        compute: torch.dtype = ctx.compute  # type: ignore[attr-defined]
        gemm: torch.dtype = ctx.gemm  # type: ignore[attr-defined]
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        embeddings, weight, labels, owned, scale_t, bias_t, inv_norms, stat, cos, index, blocks = saved
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        need_x, need_w, need_scale, need_bias = needs[0], needs[1], needs[4], needs[5]
        if torch.is_grad_enabled():
            return _double_backward(
                ctx, (grad_stat, grad_sum, grad_cos, grad_x_norm, grad_w_norm), saved, cfg, group
            )
        wide = stat.dtype

        def zeros_if_none(grad: Tensor | None) -> Tensor:
            return torch.zeros_like(stat) if grad is None else grad.to(wide)

        grads = torch.stack([zeros_if_none(g) for g in (grad_stat, grad_sum, grad_cos, grad_w_norm)])
        if group is not None:
            # Every shard must see the same upstream gradient for the pieces to add up to one
            # gradient; averaging makes that hold even if ranks backpropagate different values.
            grads = sharding.average_over_ranks(grads, group)
        grad_stat_, grad_sum_, grad_cos_, grad_w_norm_ = grads.unbind(0)
        grad_x_norm_ = zeros_if_none(grad_x_norm)
        if group is not None:
            # ‖x‖ is computed alike on every rank from the gathered batch, and the gather's
            # backward sums over ranks: each rank passes on its share.
            grad_x_norm_ = grad_x_norm_ / torch.distributed.get_world_size(group)
        zero = torch.zeros((), dtype=wide, device=stat.device)
        grad_cos_ = torch.where(owned, grad_cos_, zero)
        grad_w_norm_ = torch.where(owned, grad_w_norm_, zero)
        smoothing_sum = grad_sum_ if cfg.label_smoothing > 0.0 else None

        with _autocast_off(embeddings.device):
            x = embeddings.to(compute)
            xs, x_inv_norm = _scaled_embeddings(x, cfg)
            grad_scale = grad_bias = None
            if cfg.simple:
                grad_xs, grad_weight = _simple_rest_backward(
                    xs.to(gemm), weight, labels, stat, grad_stat_, smoothing_sum, cfg, compute,
                    need_x, need_w, inv_norms, blocks,
                )
            else:
                grad_xs, grad_weight, grad_scale, grad_bias = _general_rest_backward(
                    xs.to(gemm), weight, labels, stat, grad_stat_, smoothing_sum, cfg, compute,
                    need_x, need_w, inv_norms, blocks,
                )
                if group is not None and (need_scale or need_bias):
                    # The non-target part of a replicated scalar's gradient is per shard.
                    both = torch.stack([grad_scale, grad_bias])
                    torch.distributed.all_reduce(both, group=group)
                    grad_scale, grad_bias = both[0], both[1]
            rows = weight[index]
            grad_x_target, grad_rows = _target_cosine_backward(
                embeddings, rows, cos, grad_cos_, grad_x_norm_, grad_w_norm_
            )
            grad_embeddings = None
            if need_x:
                grad_x = grad_x_target.to(compute)
                if grad_xs is not None:
                    grad_x = grad_x + scaled_embeddings_backward(grad_xs, x, x_inv_norm, cfg)
                grad_embeddings = grad_x.to(embeddings.dtype)
            if grad_weight is not None:
                grad_weight.index_add_(0, index, grad_rows.to(weight.dtype))
        return (
            grad_embeddings,
            grad_weight if need_w else None,
            None,
            None,
            grad_scale.reshape(scale_t.shape).to(scale_t.dtype) if need_scale and grad_scale is not None else None,
            grad_bias.reshape(bias_t.shape).to(bias_t.dtype) if need_bias and grad_bias is not None else None,
            None,
            None,
            None,
        )


def _double_backward(
    ctx: Any,
    grads: tuple[Tensor | None, ...],
    saved: tuple[Tensor, ...],
    cfg: _Config,
    group: ProcessGroup | None,
) -> tuple[Tensor | None, ...]:
    """A ``create_graph=True`` backward: recompute with plain autograd (``[B, C]`` for this
    backward only) so that second derivatives are exact."""
    if group is not None:
        raise RuntimeError(
            "double backward (create_graph=True) through a class-sharded head is not supported: "
            "its gradient crosses ranks; compute the gradient penalty on an unsharded head"
        )
    embeddings, weight, labels, owned, scale_t, bias_t, _, _, _, _, _ = saved
    scale: Scale = scale_t if scale_t is not None else cfg.scale
    with _autocast_off(embeddings.device):
        stat, rest_sum = _plain_rest(embeddings, weight, labels, owned, scale, bias_t, cfg, ctx.gemm)
        cos, x_norm, w_norm, _ = _target_cosine(embeddings, weight, labels, owned, cfg.num_subcenters)
    needs = ctx.needs_input_grad
    candidates = [(i, t) for i, t in ((0, embeddings), (1, weight), (4, scale_t), (5, bias_t)) if needs[i]]
    return _recomputed_grads((stat, rest_sum, cos, x_norm, w_norm), grads, candidates, 9)


# ---------------------------------------------------------------- the entry point


def _check_scale_arg(scale: object) -> Scale:
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(
                f"scale must be a positive float or a one-element floating tensor, got a tensor of "
                f"shape {tuple(scale.shape)} and dtype {scale.dtype}"
            )
        return scale.reshape(())
    return V.check_float("scale", scale, low=0.0, low_open=True)


def _check_bias_arg(bias: object) -> Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, Tensor) or bias.numel() != 1 or not bias.is_floating_point():
        got = f"shape {tuple(bias.shape)}, dtype {bias.dtype}" if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a one-element floating tensor, got {got}")
    return bias.reshape(())


def _check_weight_tensor(weight: object) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        described = f"shape {tuple(weight.shape)} dtype {weight.dtype}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a floating [num_classes, embedding_dim] tensor, got {described}")


@dataclass
class _Checked:
    labels: Tensor
    scale: Scale
    bias: Tensor | None
    chunk: int | str | None


def _check_call(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: object,
    bias: object,
    num_classes: int,
    num_subcenters: int,
    world_size: int,
    rank: int,
    loss_form: str,
    reduction: str,
    label_smoothing: float,
    ignore_index: int,
    chunk_size: object,
    sample_rate: float,
    sample_seed: int,
    sample_step: int,
) -> _Checked:
    """Every check of one call that this process can make on its own (raising)."""
    V.check_choice("reduction", reduction, _REDUCTIONS)
    V.check_choice("loss_form", loss_form, _FORMS)
    smoothing = V.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if smoothing > 0.0 and loss_form != "softmax":
        raise ValueError(f"label_smoothing must be 0 for the {loss_form} loss form, got {label_smoothing!r}")
    chunk = V.check_chunk_size(chunk_size)
    V.check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
    V.check_int64("ignore_index", ignore_index)
    V.check_int64("sample_seed", sample_seed)
    V.check_int64("sample_step", sample_step)
    if sample_step < 0:
        raise ValueError(f"sample_step must be >= 0, got {sample_step}")
    V.check_positive_int("num_subcenters", num_subcenters)
    checked_scale = _check_scale_arg(scale)
    checked_bias = _check_bias_arg(bias)
    start, size = sharding.shard_range(num_classes, world_size, rank)
    rows = size * num_subcenters
    _check_weight_tensor(weight)
    if weight.shape[0] != rows:
        per_class = f" x {num_subcenters} sub-centres" if num_subcenters > 1 else ""
        if world_size > 1:
            raise ValueError(
                f"weight has {weight.shape[0]} rows but rank {rank} of {world_size} holds classes "
                f"[{start}, {start + size}) of num_classes={num_classes} ({rows} rows{per_class}); build "
                f"the head with this process group, or load a full weight with load_full_weight"
            )
        raise ValueError(
            f"weight must have {rows} rows (num_classes={num_classes}{per_class}), got shape "
            f"{tuple(weight.shape)}"
        )
    V.check_embeddings(embeddings, check_values=False)
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings must have shape [batch, {weight.shape[1]}] to match weight "
            f"{tuple(weight.shape)}, got shape {tuple(embeddings.shape)}"
        )
    checked = V.check_labels(labels, embeddings.shape[0], None, ignore_index)
    V.check_same_device(embeddings=embeddings, weight=weight, labels=checked)
    return _Checked(checked, checked_scale, checked_bias, chunk)


def _agreement_fields(
    embeddings: Tensor,
    weight: Tensor,
    checked: _Checked,
    *,
    num_classes: int,
    num_subcenters: int,
    normalize_embeddings: bool,
    normalize_weight: bool,
    loss_form: str,
    reduction: str,
    label_smoothing: float,
    ignore_index: int,
    sample_rate: float,
    sample_seed: int,
    sample_step: int,
    digest: int,
) -> list[tuple[str, int, Callable[[int], Any] | None]]:
    """The named facts every rank of a sharded call must agree on, as ``(name, value, show)``."""
    grad = torch.is_grad_enabled()
    scale = checked.scale
    return [
        ("batch size", embeddings.shape[0], None),
        ("num_classes", num_classes, None),
        ("embedding_dim", weight.shape[1], None),
        ("the embeddings' dtype", sharding.dtype_code(embeddings.dtype), sharding.show_dtype),
        ("the weight's dtype", sharding.dtype_code(weight.dtype), sharding.show_dtype),
        ("embeddings.requires_grad (every rank must backpropagate, or none)", int(grad and embeddings.requires_grad), None),
        ("weight.requires_grad (every rank must backpropagate, or none)", int(grad and weight.requires_grad), None),
        ("scale", sharding.float_bits(scale) if isinstance(scale, float) else -1, sharding.show_float),
        ("normalize_embeddings", int(normalize_embeddings), None),
        ("normalize_weight", int(normalize_weight), None),
        ("num_subcenters", num_subcenters, None),
        ("loss_form", _FORMS.index(loss_form), lambda i: _FORMS[i]),
        ("reduction", _REDUCTIONS.index(reduction), lambda i: _REDUCTIONS[i]),
        ("label_smoothing", sharding.float_bits(label_smoothing), sharding.show_float),
        ("ignore_index", ignore_index, None),
        ("sample_rate", sharding.float_bits(sample_rate), sharding.show_float),
        ("sample_seed", sample_seed, None),
        ("sample_step", sample_step, None),
        ("the head's hyperparameters (digest)", digest, None),
    ]


def _check_agreement(
    group: ProcessGroup | None,
    device: torch.device,
    fields: list[tuple[str, int, Callable[[int], Any] | None]],
    state_digest: Tensor | None,
    error: BaseException | None,
    what: str,
    describe: Callable[[], dict[str, Any]] | None,
) -> list[int]:
    """Exchange the facts (and any local error); raise the same error on every rank when any
    rank failed or the ranks disagree.  Returns every rank's batch size."""
    extra = None if state_digest is None else state_digest.reshape(1).to(torch.float64).view(torch.int64)
    rows = sharding.exchange(group, device, [value for _, value, _ in fields], error, what, extra)
    for index, (name, _, show) in enumerate(fields):
        if index == 0:
            continue
        if name.startswith("the head's hyperparameters") and len({row[index] for row in rows}) > 1:
            _raise_disagreement(group, what, "hyperparameters", describe)
        sharding.require_same(rows, index, name, what, show)
    if state_digest is not None and len({row[-1] for row in rows}) > 1:
        _raise_disagreement(group, what, "state (buffers and parameters other than weight)", describe)
    return [row[0] for row in rows]


def _raise_disagreement(
    group: ProcessGroup | None, what: str, kind: str, describe: Callable[[], dict[str, Any]] | None
) -> None:
    """Name what differs between ranks (an object all-gather: only on this error path)."""
    described: dict[str, Any] = describe() if describe is not None else {}
    gathered: list[Any] = [None] * sharding.world(group)[0]
    torch.distributed.all_gather_object(gathered, described, group=group)
    keys = sorted({key for item in gathered for key in item})
    differing = [key for key in keys if len({repr(item.get(key)) for item in gathered}) > 1]
    shown = "; ".join(f"{key}: {[item.get(key) for item in gathered]}" for key in differing) or "(not named)"
    raise ValueError(
        f"{what}: the head's {kind} must be the same on every rank (raised on every rank); "
        f"by rank, {shown}"
    )


def replaying_forward() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing
    (:func:`torch.utils.checkpoint.checkpoint`) replaying it to recompute activations.

    A head advances its state (step counters, EMA buffers) only outside such replays, so
    that the replay sees the state the first pass saw and nothing advances twice.

    Examples
    --------
    >>> replaying_forward()
    False
    """
    if torch.compiler.is_compiling():
        return False
    return bool(torch._C._current_graph_task_id() != -1)


def margin_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    target: TargetHook,
    *,
    non_target: NonTargetHook | None = None,
    non_target_grad: NonTargetHook | None = None,
    prepare: PrepareHook | None = None,
    row_loss: RowLossHook | None = None,
    scale: Scale = 1.0,
    bias: Tensor | None = None,
    normalize_embeddings: bool = True,
    normalize_weight: bool = True,
    num_subcenters: int = 1,
    loss_form: str = "softmax",
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
    num_classes: int | None = None,
    process_group: ProcessGroup | None = None,
    sample_rate: float = 1.0,
    sample_seed: int = 0,
    sample_step: int = 0,
    training: bool = False,
    update_state: bool = False,
    digest: int = 0,
    state_digest: Tensor | None = None,
    describe: Callable[[], dict[str, Any]] | None = None,
) -> Tensor:
    r"""The loss of a margin head: the engine behind every :class:`marginloss.MarginHead`.

    Logits are :math:`z_{ij} = \rho_{ij}\,g(\cos\theta_{ij}) + b` for :math:`j\ne y_i` and
    :math:`t_i = \rho_{iy_i} f(\cos\theta_{iy_i}) + b` for the target, where :math:`f` is
    ``target``, :math:`g` is ``non_target`` (identity by default), :math:`b` the ``bias`` (0
    by default) and :math:`\rho = s\,(1\text{ or }\lVert x_i\rVert)(1\text{ or }\lVert
    w_j\rVert)` by the two ``normalize_*`` flags.  With ``num_subcenters = K`` the weight
    holds ``K`` consecutive rows per class and a class's cosine is the max over them.
    ``loss_form="softmax"`` gives the cross entropy of these logits (``label_smoothing`` and
    ``ignore_index`` as in :class:`torch.nn.CrossEntropyLoss`, an all-ignored batch gives 0);
    ``"sigmoid"`` gives :math:`\operatorname{softplus}(-t_i) + \sum_{j\ne y_i}
    \operatorname{softplus}(z_{ij})`; ``row_loss`` replaces either.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating point (this rank's rows with a process group).
    weight : Tensor
        ``[C·K, D]`` class weights, or this rank's ``[shard_size·K, D]`` with a group.
    labels : Tensor
        ``[B]`` integer class indices in ``[0, C)`` or ``ignore_index``.
    target : callable
        ``(cos [B], MarginContext) -> [B]``: the margin on the target cosines, in cosine units; any tensor it uses gets its exact
        gradient on every path.
    non_target : callable, optional
        ``(cos, MarginContext) -> same shape``: an elementwise transform of the non-target cosines (a ``[B, n]`` block at a time;
        per-row parameters broadcast as ``[B, 1]``); gradient-free apart from ``cos``.
    non_target_grad : callable, optional
        ``(cos, MarginContext) -> same shape``: its elementwise derivative (otherwise autograd differentiates each chunk).
    prepare : callable, optional
        ``(MarginContext) -> None``, called once per call with ``context.cos_target`` set, before any logit is computed:
        where a head advances its state.
    row_loss : callable, optional
        ``(target_logit, rest, rest_sum, MarginContext) -> [B]``: replaces the default row loss of ``loss_form``.
    scale : float or Tensor, default 1.0
        :math:`s` (a one-element tensor may require grad or change every step).
    bias : Tensor, optional
        One-element :math:`b`, added to every logit (may require grad).
    normalize_embeddings, normalize_weight : bool, default True
    num_subcenters : int, default 1
    loss_form : {"softmax", "sigmoid"}, default "softmax"
    reduction : {"mean", "sum", "none"}, default "mean"
    label_smoothing : float in [0, 1], default 0.0
    ignore_index : int, default -100
    chunk_size : int, "auto" or None, default "auto"
        See the module docstring.
    num_classes : int, optional
        :math:`C`; required with a process group (the weight then holds a shard).
    process_group : ProcessGroup, optional
        Class sharding (see :mod:`marginloss.distributed`).
    sample_rate, sample_seed, sample_step
        PartialFC sampling (see :func:`marginloss.distributed.sample_classes`).
    training, update_state : bool, default False
        Passed to the hooks in the context (``update_state`` is forced off during an
        activation-checkpointing replay).
    digest, state_digest, describe
        What a sharded head's ranks must agree on (see :class:`marginloss.MarginHead`).

    Returns
    -------
    Tensor
        A scalar, or ``[B]`` for ``reduction="none"`` (the global batch with a group), in the
        compute dtype (at least float32).
    """
    group = process_group
    world_size, rank = sharding.world(group)
    total_classes = num_classes if num_classes is not None else (
        weight.shape[0] // max(num_subcenters, 1) if isinstance(weight, Tensor) and weight.dim() == 2 else 0
    )
    device = weight.device if isinstance(weight, Tensor) else torch.device("cpu")
    what = "sharded margin softmax"
    error: BaseException | None = None
    checked: _Checked | None = None
    try:
        if num_classes is None:
            _check_weight_tensor(weight)
        V.check_positive_int("num_classes", total_classes)
        checked = _check_call(
            embeddings, weight, labels, scale=scale, bias=bias, num_classes=total_classes,
            num_subcenters=num_subcenters, world_size=world_size, rank=rank, loss_form=loss_form,
            reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index,
            chunk_size=chunk_size, sample_rate=sample_rate, sample_seed=sample_seed,
            sample_step=sample_step,
        )
        compute = _compute_dtype(embeddings, weight)
        weight_norms = None
        if normalize_weight or V.values_checked(weight):
            with _autocast_off(weight.device):
                weight_norms = _row_norms(weight.detach(), compute)
        V.check_inputs_values(embeddings, weight_norms, checked.labels, total_classes, ignore_index)
    except Exception as exc:
        if group is None:
            raise
        error = exc
    if group is not None:
        fields: list[tuple[str, int, Callable[[int], Any] | None]] = [("batch size", 0, None)]
        if checked is not None:
            fields = _agreement_fields(
                embeddings, weight, checked, num_classes=total_classes, num_subcenters=num_subcenters,
                normalize_embeddings=normalize_embeddings, normalize_weight=normalize_weight,
                loss_form=loss_form, reduction=reduction, label_smoothing=label_smoothing,
                ignore_index=ignore_index, sample_rate=sample_rate, sample_seed=sample_seed,
                sample_step=sample_step, digest=digest,
            )
        else:
            fields += [("", 0, None)] * 18
        if state_digest is None:
            state_digest = torch.zeros((), dtype=torch.float64, device=device)
        batch_sizes = tuple(_check_agreement(group, device, fields, state_digest, error, what, describe))
    assert checked is not None  # every failure above raised
    scale_value, bias_value = checked.scale, checked.bias

    if group is None:
        x_global, labels_global = embeddings, checked.labels
    else:
        if sum(batch_sizes) == 0:
            # Every rank is empty: a zero loss still connected to the inputs, no collectives.
            zero = (embeddings.sum() * 0.0 + weight[:0].sum()).to(compute)
            return zero.expand(0) if reduction == "none" else zero
        x_global = sharding.gather_embeddings(embeddings, group, batch_sizes, rank)
        labels_global = sharding.all_gather_rows(checked.labels, group, batch_sizes)

    bad = None
    if V.labels_checked(labels_global):
        # Every label is in [0, C) or ignore_index (checked above).
        valid = labels_global != ignore_index
    else:
        in_range = (labels_global >= 0) & (labels_global < total_classes)
        ignored = labels_global == ignore_index
        valid = in_range & ~ignored
        # With value checks off (and labels off the CPU), a label outside [0, C) that is
        # not ignore_index makes its row NaN: never another class's loss.
        bad = ~in_range & ~ignored
    # On the CPU (no synchronisation) knowing that no row is ignored saves a few masking
    # operations per call, which is what a small problem's time is made of.
    all_valid = bad is None and labels_global.device.type == "cpu" and bool(valid.all())
    safe = labels_global if all_valid else torch.where(valid, labels_global, 0)
    if group is None:
        owned = valid
        local = labels_global if all_valid else torch.where(valid, labels_global, -1)
    else:
        start, _ = sharding.shard_range(total_classes, world_size, rank)
        local = safe - start
        owned = valid & (local >= 0) & (local < weight.shape[0] // num_subcenters)
        local = torch.where(owned, local, -1)

    used, used_norms, classes = weight, weight_norms, total_classes
    if sample_rate < 1.0:
        safe_cpu = torch.where(valid, labels_global, -1).cpu()
        kept = sharding.sample_classes(
            safe_cpu, total_classes, world_size, rank, sample_rate, seed=sample_seed, step=sample_step
        ).to(weight.device)
        classes = sharding.sampled_total(safe_cpu, total_classes, world_size, sample_rate)
        if num_subcenters > 1:
            kept_rows = (kept[:, None] * num_subcenters + torch.arange(num_subcenters, device=kept.device)).flatten()
        else:
            kept_rows = kept
        used = weight.index_select(0, kept_rows)
        used_norms = None if weight_norms is None else weight_norms.index_select(0, kept_rows)
        position = torch.searchsorted(kept, local.clamp_min(0)).clamp_max(kept.numel() - 1)
        owned = owned & (kept[position] == local)
        local = torch.where(owned, position, torch.full_like(position, -1))

    replay = replaying_forward()
    context = MarginContext(
        labels=safe, valid=valid, embedding_norms=_UNSET, weight_norms=_UNSET,
        training=training, update_state=update_state and not replay, num_classes=classes, scale=scale_value,
    )
    frozen: MarginContext | None = None

    def run_prepare(cos: Tensor, x_norm: Tensor, w_norm: Tensor) -> None:
        nonlocal frozen
        if prepare is not None:
            # Clones: inside the engine's Function these are outputs it also saves for
            # backward, and prepare may work in place.
            context.cos_target = cos.detach().clone()
            context.embedding_norms, context.weight_norms = x_norm.detach().clone(), w_norm.detach().clone()
            with torch.no_grad():
                prepare(context)
        else:
            context.cos_target = cos.detach()
            context.embedding_norms, context.weight_norms = x_norm.detach(), w_norm.detach()
        if non_target is not None:
            frozen = dataclasses.replace(context)

    def rest_transform(cos: Tensor) -> Tensor:
        assert non_target is not None and frozen is not None
        return non_target(cos, frozen)

    def rest_slope(cos: Tensor) -> Tensor:
        assert non_target_grad is not None and frozen is not None
        return non_target_grad(cos, frozen)

    if checked.chunk is None:
        width = used.shape[0] // num_subcenters
    elif checked.chunk == "auto":
        width = default_chunk_size(x_global.shape[0], used.shape[0] // num_subcenters, used.device)
    else:
        width = int(checked.chunk)
    scale_tensor = scale_value if isinstance(scale_value, Tensor) else None
    cfg = _Config(
        scale_value.detach() if isinstance(scale_value, Tensor) else scale_value,
        normalize_embeddings, normalize_weight, float(label_smoothing), classes,
        max(1, min(width, used.shape[0] // num_subcenters)),
        keep_blocks=_wants_gradient(x_global, used),
        num_subcenters=num_subcenters, form=loss_form,
        bias=None if bias_value is None else bias_value.detach(),
        scale_grad=scale_tensor is not None and scale_tensor.requires_grad,
        non_target=rest_transform if non_target is not None else None,
        non_target_grad=rest_slope if non_target_grad is not None else None,
        # A non-target transform may use state that prepare advances, so prepare must run
        # between the target cosines and the rest; otherwise it runs after the engine,
        # outside the autograd Function (traceable by torch.compile).
        prepare=run_prepare if non_target is not None else None,
    )
    compute = _compute_dtype(x_global, used)
    gemm = _gemm_dtype(x_global.device, compute)
    # "auto" on a small problem: everything in float64 from one GEMM (see _WIDE_MACS); under
    # autocast the GEMM keeps the autocast dtype, so the plain path runs instead.
    wide = (
        group is None and checked.chunk == "auto" and gemm == compute
        and x_global.numel() * used.shape[0] <= _WIDE_MACS
    )
    plain = group is None and not wide and (
        checked.chunk is None
        or (checked.chunk == "auto" and x_global.shape[0] * used.shape[0] <= _PLAIN_ELEMENTS)
    )
    # On the CPU, knowing that no row is ignored saves a few masking operations per call.
    # "auto" up to plain_path_elements(): one closed-form block (sub-centres with normalised
    # weights only: the winner is read off the block).
    block = plain and checked.chunk == "auto" and _block_covers(num_subcenters, normalize_weight)
    every_row = (wide or block) and all_valid
    if wide:
        with _autocast_off(x_global.device):
            if cfg.simple:
                stat, rest_sum, cos, x_norm, w_norm = _DenseEngine.apply(
                    x_global, used, local, None if every_row else owned, scale_tensor, cfg
                )
            else:
                stat, rest_sum, cos, x_norm, w_norm = _wide_parts(
                    x_global, used, local, owned, scale_value, bias_value, cfg
                )
    elif block:
        inv_norms = None if used_norms is None or not normalize_weight else _reciprocal_or_zero(used_norms)
        stat, rest_sum, cos, x_norm, w_norm = _BlockEngine.apply(
            x_global, used, local, None if every_row else owned, scale_tensor, bias_value, inv_norms, cfg
        )
    elif plain:
        with _autocast_off(x_global.device):
            cos, x_norm, w_norm, _ = _target_cosine(x_global, used, local, owned, num_subcenters)
            if non_target is not None:
                run_prepare(cos, x_norm, w_norm)
            stat, rest_sum = _plain_rest(x_global, used, local, owned, scale_value, bias_value, cfg, gemm)
    else:
        inv_norms = None if used_norms is None or not normalize_weight else safe_reciprocal(used_norms)
        stat, rest_sum, cos, x_norm, w_norm = _MarginEngine.apply(
            x_global, used, local, owned, scale_tensor, bias_value, inv_norms, cfg, group
        )
    if non_target is None:
        run_prepare(cos, x_norm, w_norm)
    # The hooks after prepare see the differentiable norms.
    context.embedding_norms, context.weight_norms = x_norm, w_norm
    context.rest = stat.detach()
    value = target(cos, context)
    if not isinstance(value, Tensor) or value.shape != cos.shape:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"target must return a tensor of shape {tuple(cos.shape)} (one value per row), got {got}")
    radius: Tensor | float = scale_value
    if not normalize_embeddings:
        radius = radius * x_norm
    if not normalize_weight:
        radius = radius * w_norm
    target_logit = radius * value.to(cos.dtype)
    if bias_value is not None:
        target_logit = target_logit + bias_value.to(cos.dtype)
    target_logit = target_logit.to(stat.dtype)
    if row_loss is not None:
        row = row_loss(target_logit, stat, rest_sum, context)
    elif loss_form == "softmax":
        row = softmax_row_loss(target_logit, stat, rest_sum, classes, float(label_smoothing))
    else:
        row = sigmoid_row_loss(target_logit, stat)
    row = row.to(_compute_dtype(embeddings, weight))
    if every_row and row.shape[0] > 0:
        return row if reduction == "none" else row.sum() if reduction == "sum" else row.mean()
    if bad is None:
        return reduce_rows(row, valid, reduction)
    return reduce_rows(torch.where(bad, math.nan, row), valid | bad, reduction)


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
    r"""Margin softmax cross entropy with the margin ``target_fn`` on the target column only.

    The 0.1 functional form of :func:`margin_loss` for a margin that needs only the cosine:
    logits :math:`z_{ij} = s\,\tilde x_i^\top \tilde w_j` for :math:`j \ne y_i` and
    :math:`z_{iy_i} = \rho_i\, f(\cos\theta_{iy_i})` for the target, where :math:`\tilde x`
    is :math:`x/\lVert x\rVert` if ``normalize_embeddings`` else :math:`x`, :math:`\tilde w`
    likewise, and :math:`\rho_i = s\,(1\text{ or }\lVert x_i\rVert)(1\text{ or }\lVert
    w_{y_i}\rVert)`.  The loss is the cross entropy of these logits with ``label_smoothing``
    and ``ignore_index`` as in :class:`torch.nn.CrossEntropyLoss` (an all-ignored batch gives
    0, not NaN).

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating point.
    weight : Tensor
        ``[C, D]`` class weights (the layout of :func:`torch.nn.functional.linear`).
    labels : Tensor
        ``[B]`` integer class indices in ``[0, C)`` or ``ignore_index``.
    target_fn : callable
        The head's margin transform :math:`f`, applied to the ``[B]`` target cosines in
        ordinary autograd, so anything it captures gets its exact gradient on every path.
    target_grad : callable, optional
        Accepted for compatibility with 0.1 and not needed: autograd differentiates
        ``target_fn`` on the ``[B]`` target cosines.
    scale : float, default 1.0
        :math:`s`.
    normalize_embeddings, normalize_weight : bool, default True
        Whether :math:`x` and :math:`w` are L2-normalised inside the logits.
    reduction : {"mean", "sum", "none"}, default "mean"
    label_smoothing : float in [0, 1], default 0.0
    ignore_index : int, default -100
    chunk_size : int, "auto" or None, default "auto"
        ``None`` runs plain autograd over the full ``[B, C]`` logits; an int runs the
        chunked engine with that many classes per chunk; ``"auto"`` picks the plain path for
        small problems (:func:`plain_path_elements`) and the chunked engine with
        :func:`default_chunk_size` otherwise.  Every path is twice differentiable.

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
    del target_grad  # autograd differentiates target_fn on O(B) tensors

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return target_fn(cos)

    return margin_loss(
        embeddings, weight, labels, target, scale=scale, normalize_embeddings=normalize_embeddings,
        normalize_weight=normalize_weight, reduction=reduction, label_smoothing=label_smoothing,
        ignore_index=ignore_index, chunk_size=chunk_size,
    )
