r"""AdaCos: no margin, an automatically chosen (fixed or adaptive) scale."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from marginloss import _validation as V
from marginloss import fused
from marginloss.fused import ChunkSize, MarginContext, margin_loss
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["AdaCos", "adacos", "adacos_dynamic_scale", "adacos_fixed_scale"]


def adacos_fixed_scale(num_classes: int) -> float:
    r"""AdaCos's fixed scale :math:`\tilde s_f = \sqrt 2\,\log(C - 1)`.

    Needs :math:`C \ge 3` (the scale is 0 for two classes).

    Examples
    --------
    >>> round(adacos_fixed_scale(10_000), 4)
    13.0252
    """
    V.check_positive_int("num_classes", num_classes)
    if num_classes < 3:
        raise ValueError(f"num_classes must be >= 3 for AdaCos's scale sqrt(2)*log(C-1), got {num_classes}")
    return math.sqrt(2.0) * math.log(num_classes - 1)


def _lower_median(values: Tensor, valid: Tensor) -> Tensor:
    """The lower median of ``values[valid]`` (``torch.median``'s rule), 0 without valid rows.

    Written with a sort and a gather instead of boolean indexing, so that no shape depends
    on the data (``torch.compile(fullgraph=True)`` traces it).
    """
    count = valid.sum()
    ordered = torch.sort(torch.where(valid, values, torch.full_like(values, math.inf))).values
    index = torch.div(count - 1, 2, rounding_mode="floor").clamp_min(0)
    middle = ordered.gather(0, index.reshape(1)).squeeze(0)
    return torch.where(count > 0, middle, torch.zeros_like(middle))


def adacos_dynamic_scale(
    cos_target: Tensor, log_rest: Tensor, valid: Tensor | None = None
) -> Tensor:
    r"""One step of AdaCos's dynamic scale, from row statistics (the paper's Algorithm 1).

    .. math::
        \tilde s^{(t)} = \frac{\log B^{(t)}_{avg}}{\cos\big(\min(\tfrac{\pi}{4}, \theta^{(t)}_{med})\big)},
        \qquad B^{(t)}_{avg} = \frac1N\sum_i \sum_{k\ne y_i} e^{\tilde s^{(t-1)}\cos\theta_{ik}}

    Parameters
    ----------
    cos_target : Tensor
        ``[B]`` target cosines :math:`\cos\theta_{iy_i}`.
    log_rest : Tensor
        ``[B]`` :math:`\log\sum_{k\ne y_i} e^{\tilde s^{(t-1)}\cos\theta_{ik}}` (the engine's
        non-target log-sum-exp, ``context.rest``); :math:`\log B_{avg}` is formed from it
        by a log-sum-exp, so no exponential overflows.
    valid : Tensor, optional
        ``[B]`` bool, the rows that count (all by default).

    Returns
    -------
    Tensor
        The new scale, a 0-dim tensor; ``nan`` when no row is valid.  :math:`\theta_{med}`
        is the lower median (``torch.median``'s rule) of the valid rows' target angles.

    Examples
    --------
    >>> import math, torch
    >>> cos = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    >>> rest = torch.full((3,), math.log(99.0), dtype=torch.float64)  # 99 classes at cos 0
    >>> float(adacos_dynamic_scale(cos, rest)) == math.log(99.0) / math.cos(math.pi / 4)
    True
    """
    if valid is None:
        valid = torch.ones_like(cos_target, dtype=torch.bool)
    cos_target, log_rest = cos_target.detach(), log_rest.detach()
    count = valid.sum()
    kept = torch.where(valid, log_rest, torch.full_like(log_rest, -math.inf))
    log_b_avg = torch.logsumexp(kept, dim=0) - count.clamp_min(1).to(log_rest.dtype).log()
    theta = torch.acos(cos_target.clamp(-1.0, 1.0))
    theta_med = _lower_median(theta, valid)
    scale = log_b_avg / torch.cos(theta_med.clamp_max(math.pi / 4))
    return torch.where(count > 0, scale, torch.full_like(scale, math.nan))


def adacos(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float | Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""AdaCos loss at a given scale (the fixed AdaCos by default); see :class:`marginloss.AdaCos`.

    The functional form holds no state: ``scale=None`` uses the fixed scale
    :func:`adacos_fixed_scale` of ``weight.shape[0]`` classes; to reproduce a step of the
    dynamic AdaCos pass the head's ``scale`` buffer.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16), torch.randn(100, 16)
    >>> adacos(x, w, torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """
    if scale is None:
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a [num_classes, embedding_dim] tensor")
        scale = adacos_fixed_scale(weight.shape[0])
    elif not isinstance(scale, Tensor):
        scale = V.check_float("scale", scale, low=0.0, low_open=True)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return cos

    return margin_loss(
        embeddings, weight, labels, target, scale=scale, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("adacos")
class AdaCos(MarginHead):
    r"""AdaCos: the cosine softmax with no margin and a scale chosen for you.

    .. math::
        L_i = -\log\frac{e^{\tilde s\cos\theta_{iy_i}}}{\sum_j e^{\tilde s\cos\theta_{ij}}},
        \qquad \tilde s^{(0)} = \sqrt2\,\log(C-1),

    and with ``dynamic=True``, after each training step :math:`t`,

    .. math::
        \tilde s^{(t)} = \frac{\log B^{(t)}_{avg}}{\cos\big(\min(\tfrac{\pi}{4},\theta^{(t)}_{med})\big)},
        \qquad B^{(t)}_{avg} = \frac1N\sum_i\sum_{k\ne y_i} e^{\tilde s^{(t-1)}\cos\theta_{ik}},

    :math:`\theta^{(t)}_{med}` the median target angle of the batch (the lower median,
    ``torch.median``'s rule, of the non-ignored rows).

    Zhang, Zhao, Qiao, Wang & Li, "AdaCos: Adaptively Scaling Cosine Logits for Effectively
    Learning Deep Face Representations", CVPR 2019.  The authors released no code; the
    defaults are the paper's (its fixed scale and Algorithm 1).

    **When the dynamic scale takes effect.**  :math:`B_{avg}` is the batch mean of
    :math:`e^{r_i}`, where :math:`r_i` is the engine's own non-target log-sum-exp
    (``context.rest``), so the update costs no extra pass over the classes, but it is known
    only once this step's logits are: the new scale applies **from the next step**.  The
    paper's Algorithm 1 (and the common unofficial PyTorch port) computes the statistics
    with :math:`\tilde s^{(t-1)}` and then uses :math:`\tilde s^{(t)}` in the same step,
    which costs a second pass over the ``[B, C]`` logits.  The scale is the one-element
    buffer ``scale`` (in the ``state_dict``); it changes only in training mode, not in eval
    mode nor when activation checkpointing replays a forward.  Each training step computes
    with a private copy of the buffer, which is then updated in place (the step's autograd
    graph keeps the value it used, so two forwards before one backward work); a step with no
    valid row, or whose new scale would not be a positive finite number, keeps the scale.  A
    replay by activation checkpointing uses the scale of the latest training forward's
    first pass (one checkpointed forward per backward, as for
    :class:`~marginloss.SphereFace`).

    On a class-sharded head the statistics are those of the global batch over all classes
    (every rank computes the same scale).  With PartialFC sampling (``sample_rate < 1``)
    :math:`B_{avg}` sums over the sampled classes only, so the scale adapts to the sampled
    softmax.

    ``torch.compile(head, fullgraph=True)`` traces the head: the median is a sort and a
    gather over all rows, ignored rows sorted last, so no shape depends on the data.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`, at least 3 when ``scale`` is not given.
    dynamic : bool, default True
        Adapt the scale every training step (the paper's dynamic AdaCos); ``False`` keeps
        the fixed scale (the paper's fixed AdaCos).
    scale : float, optional
        The starting (``dynamic=True``) or fixed scale; default :math:`\sqrt2\log(C-1)`,
        the paper's.
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
    >>> import math, torch, marginloss
    >>> head = marginloss.AdaCos(16, 100)
    >>> round(float(head.scale), 4), round(math.sqrt(2) * math.log(99), 4)  # sqrt(2) log(C - 1)
    (6.4985, 6.4985)
    >>> loss = head(torch.randn(8, 16), torch.randint(0, 100, (8,)))
    >>> bool(head.scale != head.initial_scale)  # adapted, for the next step
    True
    """

    scale: Tensor  # type: ignore[assignment]

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        dynamic: bool = True,
        scale: float | None = None,
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
        if not isinstance(dynamic, bool):
            raise TypeError(f"dynamic must be a bool, got {type(dynamic).__name__} {dynamic!r}")
        V.check_positive_int("num_classes", num_classes)
        initial = adacos_fixed_scale(num_classes) if scale is None else V.check_float(
            "scale", scale, low=0.0, low_open=True
        )
        state = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        super().__init__(
            embedding_dim, num_classes, scale=torch.tensor(initial, dtype=state), reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
            device=device, dtype=dtype,
        )
        self.dynamic = dynamic
        self.initial_scale = initial
        # The copy of the scale the latest training forward used (an activation-checkpointing
        # replay of that forward must see it), and the new value its row_loss computed.
        self._used_scale: Tensor | None = None
        self._next_scale: Tensor | None = None

    def hyperparameters(self) -> dict[str, Any]:
        return {"dynamic": self.dynamic, "initial_scale": self.initial_scale}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if not (self.training and self.dynamic):
            return super().forward(embeddings, labels)
        stored = self.scale
        replay = fused.replaying_forward() and self._used_scale is not None
        # The step runs on a private copy of the scale, so that the buffer itself can be
        # updated in place afterwards (its identity stays: DDP's buffer broadcast and
        # references to it keep working) while this step's autograd graph keeps the value it
        # used.  A checkpointing replay reuses the copy of the forward it replays.
        used = self._used_scale if replay and self._used_scale is not None else stored.detach().clone()
        self.scale = used
        try:
            loss = super().forward(embeddings, labels)
        finally:
            self.scale = stored
        update = self._next_scale
        if update is not None and not replay:
            self._next_scale = None
            self._used_scale = used
            with torch.no_grad():
                stored.copy_(update)
        return loss

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        return cos

    def row_loss(self, target_logit: Tensor, rest: Tensor, rest_sum: Tensor, context: MarginContext) -> Tensor:
        if self.dynamic and context.update_state:
            self._adapt_scale(context)
        return super().row_loss(target_logit, rest, rest_sum, context)

    def _adapt_scale(self, context: MarginContext) -> None:
        assert context.cos_target is not None and context.rest is not None
        with torch.no_grad():
            old = self.scale
            new = adacos_dynamic_scale(context.cos_target, context.rest, context.valid)
            keep = ~(torch.isfinite(new) & (new > 0))
            self._next_scale = torch.where(keep, old, new.to(old.dtype))
