r"""ElasticFace: ArcFace or CosFace with each row's margin drawn from a normal distribution."""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from marginloss import _validation as V
from marginloss.fused import ChunkSize, MarginContext, margin_loss
from marginloss.heads._common import (
    check_cosine_values,
    check_logit_inputs,
    check_scale,
    replace_target,
    safe_sin,
    target_column,
)
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ElasticFace", "elastic_margins", "elasticface", "elasticface_logits", "elasticface_target"]

KINDS = ("arc", "cos")
# The release's configs (fdbtrs/ElasticFace, config/config.py): m and std per loss.
DEFAULT_MARGIN = {"arc": 0.5, "cos": 0.35}
DEFAULT_SIGMA = {("arc", False): 0.05, ("cos", False): 0.05, ("arc", True): 0.0175, ("cos", True): 0.02}


def _resolve(kind: str, margin: float | None, sigma: float | None, plus: bool) -> tuple[str, float, float, bool]:
    kind = V.check_choice("kind", kind, KINDS)
    if not isinstance(plus, bool):
        raise TypeError(f"plus must be a bool, got {type(plus).__name__} {plus!r}")
    margin = DEFAULT_MARGIN[kind] if margin is None else margin
    margin = V.check_float("margin", margin, low=0.0, high=math.pi if kind == "arc" else 2.0, high_open=True)
    sigma = DEFAULT_SIGMA[(kind, plus)] if sigma is None else sigma
    sigma = V.check_float("sigma", sigma, low=0.0, high=1.0)
    return kind, margin, sigma, plus


def _generator_seed(seed: int, step: int) -> int:
    digest = hashlib.blake2b(f"elasticface:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def elastic_margins(
    batch_size: int,
    margin: float,
    sigma: float,
    *,
    seed: int = 0,
    step: int = 0,
    plus: bool = False,
    cos_target: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    r"""The ``[batch_size]`` float64 margins of one ElasticFace step: :math:`m_i \sim \mathcal N(m, \sigma^2)`.

    Drawn on the CPU from a generator seeded by ``(seed, step)`` (the same numbers on every
    device and rank).  With ``plus`` (ElasticFace+), the draws of the ``valid`` rows are
    sorted and handed out so that the row with the largest ``cos_target`` gets the smallest
    margin (the release's rule); rows that are not valid get ``margin``.

    Examples
    --------
    >>> m = elastic_margins(4, 0.5, 0.05, seed=0, step=3)
    >>> bool(torch.equal(m, elastic_margins(4, 0.5, 0.05, seed=0, step=3)))
    True
    >>> cos = torch.tensor([0.1, 0.9, 0.5, 0.3])
    >>> p = elastic_margins(4, 0.5, 0.05, step=3, plus=True, cos_target=cos)
    >>> bool(p[1] == p.min()) and bool(p[0] == p.max())
    True
    """
    generator = torch.Generator().manual_seed(_generator_seed(seed, step))
    draws = torch.randn(batch_size, generator=generator, dtype=torch.float64) * sigma + margin
    if not plus:
        return draws
    if cos_target is None:
        raise ValueError("plus=True needs cos_target (the rows' target cosines)")
    cos = cos_target.detach().to(device="cpu", dtype=torch.float64)
    keep = torch.ones_like(cos, dtype=torch.bool) if valid is None else valid.to("cpu")
    # Valid rows by decreasing target cosine (the others last) receive the valid draws in
    # increasing order (the others' draws, set to +inf, last): ties keep the row order.
    order = torch.sort(torch.where(keep, cos, -math.inf), descending=True, stable=True).indices
    ascending = torch.sort(torch.where(keep, draws, math.inf), stable=True).values
    ranked = torch.empty_like(draws).scatter_(0, order, ascending)
    return torch.where(keep, ranked, torch.full_like(ranked, margin))


def elasticface_target(cos_target: Tensor, margins: Tensor | float, kind: str = "arc") -> Tensor:
    r"""ElasticFace's target with per-row margins :math:`m_i`.

    .. math::
        f_{\text{arc}}(\cos\theta_i) = \cos(\theta_i + m_i),\qquad
        f_{\text{cos}}(\cos\theta_i) = \cos\theta_i - m_i

    The arc form is computed as :math:`\cos\theta\cos m - \sin\theta\sin m` (no ``acos``)
    and, as in the release, without ArcFace's fallback for :math:`\theta + m > \pi`.

    Examples
    --------
    >>> import torch
    >>> elasticface_target(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    tensor([ 0.8776, -0.4794])
    >>> elasticface_target(torch.tensor([1.0, 0.0]), 0.35, kind="cos")
    tensor([ 0.6500, -0.3500])
    """
    kind = V.check_choice("kind", kind, KINDS)
    m = margins.to(cos_target.dtype) if isinstance(margins, Tensor) else torch.full_like(cos_target, margins)
    if kind == "cos":
        return cos_target - m
    return cos_target * torch.cos(m) - safe_sin(cos_target) * torch.sin(m)


def elasticface_logits(
    cosine: Tensor,
    labels: Tensor,
    *,
    kind: str = "arc",
    scale: float = 64.0,
    margin: float | None = None,
    sigma: float | None = None,
    plus: bool = False,
    seed: int = 0,
    step: int = 0,
    ignore_index: int = -100,
) -> Tensor:
    r"""ElasticFace logits with the margins of step ``step`` (:func:`~marginloss.functional.elastic_margins`):
    :math:`s\,f(\cos\theta_{iy_i})` on the target, :math:`s\cos\theta_{ij}` elsewhere.

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([[0.8, 0.1], [0.2, 0.6]])
    >>> elasticface_logits(cos, torch.tensor([0, 1]), kind="cos", scale=1.0, margin=0.0, sigma=0.0)
    tensor([[0.8000, 0.1000],
            [0.2000, 0.6000]])
    """
    kind, margin, sigma, plus = _resolve(kind, margin, sigma, plus)
    scale = check_scale(scale)
    seed = V.check_int64("seed", seed)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    check_cosine_values(cosine)
    cos_target = target_column(cosine, labels)
    margins = elastic_margins(
        cosine.shape[0], margin, sigma, seed=seed, step=step, plus=plus, cos_target=cos_target, valid=valid
    ).to(cosine.device)
    return scale * replace_target(cosine, labels, valid, elasticface_target(cos_target, margins, kind))


def elasticface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    kind: str = "arc",
    scale: float = 64.0,
    margin: float | None = None,
    sigma: float | None = None,
    plus: bool = False,
    seed: int = 0,
    step: int = 0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""ElasticFace loss with the margins of step ``step``; see :class:`marginloss.ElasticFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    >>> elasticface(x, w, torch.randint(0, 100, (8,)), step=0).backward()
    """
    kind, margin, sigma, plus = _resolve(kind, margin, sigma, plus)
    scale = check_scale(scale)
    seed = V.check_int64("seed", seed)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        margins = elastic_margins(
            cos.shape[0], margin, sigma, seed=seed, step=step, plus=plus,
            cos_target=context.cos_target, valid=context.valid,
        )
        return elasticface_target(cos, margins.to(cos.device), kind)

    return margin_loss(
        embeddings, weight, labels, target, scale=scale, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("elasticface")
class ElasticFace(MarginHead):
    r"""ElasticFace: elastic margin loss, ArcFace (``kind="arc"``) or CosFace (``kind="cos"``)
    with each sample's margin drawn afresh every step.

    .. math::
        L_i = -\log\frac{e^{s\,f(\cos\theta_{y_i})}}{e^{s\,f(\cos\theta_{y_i})}
              + \sum_{j\ne y_i} e^{s\cos\theta_j}},\qquad
        f_{\text{arc}} = \cos(\theta_{y_i} + m_i),\quad f_{\text{cos}} = \cos\theta_{y_i} - m_i,\quad
        m_i \sim \mathcal N(m, \sigma^2)

    The arc form has no fallback for :math:`\theta + m > \pi` (as in the release).  With
    ``plus=True`` (ElasticFace+), the batch's draws are sorted so that the row with the
    largest target cosine gets the smallest margin (the release's rule).

    Reproducible randomness: step :math:`t`'s margins come from a generator seeded by
    ``(seed, t)``, where :math:`t` is the buffer ``step`` (saved in the ``state_dict``),
    advanced once per forward in training mode (not in eval mode, nor when activation
    checkpointing replays a forward, which sees the first pass's margins).  The draws cover
    the rows of the global batch, so on a class-sharded head every rank uses the same
    margins for the same rows.  In eval mode (a validation loss) every row gets the mean
    margin :math:`m`; :meth:`~marginloss.MarginHead.logits` with labels uses the last training step's draws.

    Boutros, Damer, Kirchbuchner & Kuijper, "ElasticFace: Elastic Margin Loss for Deep
    Face Recognition", CVPR Workshops 2022.  Defaults from the release's configs
    (``fdbtrs/ElasticFace``, ``config/config.py``), the same as the paper: :math:`s = 64`,
    :math:`m = 0.5` (arc) or 0.35 (cos), :math:`\sigma = 0.05`, and for ElasticFace+
    :math:`\sigma = 0.0175` (arc) or 0.02 (cos).  (The loss classes' own ``std=0.0125``
    default is overridden by every config; we take the configs'.)

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    kind : {"arc", "cos"}, default "arc"
        Angular (ElasticFace-Arc) or cosine (ElasticFace-Cos) margin.
    scale : float, default 64.0
        :math:`s` (the release's value).
    margin : float, optional
        The mean margin :math:`m`: 0.5 radians for ``"arc"`` (in ``[0, π)``), 0.35 for
        ``"cos"`` (in ``[0, 2)``), the release's values.
    sigma : float, optional
        The standard deviation :math:`\sigma` in ``[0, 1]``: 0.05, or with ``plus`` 0.0175
        (arc) / 0.02 (cos), the release's values.  ``0`` gives ArcFace / CosFace without
        ArcFace's fallback.
    plus : bool, default False
        ElasticFace+: the largest target cosine gets the smallest margin.
    seed : int, default 0
        Seeds the margin draws together with the step.
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
    >>> head = marginloss.ElasticFace(16, 100, kind="cos")
    >>> head.margin, head.sigma
    (0.35, 0.05)
    >>> head(torch.randn(8, 16), torch.randint(0, 100, (8,))).backward()
    >>> int(head.step)
    1
    """

    step: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        kind: str = "arc",
        scale: float = 64.0,
        margin: float | None = None,
        sigma: float | None = None,
        plus: bool = False,
        seed: int = 0,
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
        kind, margin, sigma, plus = _resolve(kind, margin, sigma, plus)
        seed = V.check_int64("seed", seed)
        super().__init__(
            embedding_dim, num_classes, scale=check_scale(scale), reduction=reduction,
            label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
            process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed,
            device=device, dtype=dtype,
        )
        self.kind, self.margin, self.sigma, self.plus, self.seed = kind, margin, sigma, plus, seed
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=self.weight.device))

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "scale": self.scale, "margin": self.margin, "sigma": self.sigma,
            "plus": self.plus, "seed": self.seed,
        }

    def margins(self, cos_target: Tensor, valid: Tensor, step: int | None = None) -> Tensor:
        """The ``[B]`` margins of ``step`` (by default the last training step's) for rows with
        these target cosines (used by ``plus``); see :func:`marginloss.functional.elastic_margins`."""
        if step is None:
            step = max(int(self.step) - 1, 0)
        return elastic_margins(
            cos_target.shape[0], self.margin, self.sigma, seed=self.seed, step=step, plus=self.plus,
            cos_target=cos_target, valid=valid,
        )

    def prepare(self, context: MarginContext) -> None:
        if context.update_state:
            self.step.add_(1)

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        if not context.training:
            return elasticface_target(cos, self.margin, self.kind)
        assert context.cos_target is not None
        # prepare has advanced the step (a checkpointing replay did not, and sees the same one).
        margins = self.margins(context.cos_target, context.valid)
        return elasticface_target(cos, margins.to(cos.device), self.kind)
