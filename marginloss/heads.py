r"""Margin softmax classification heads: thin modules around :mod:`marginloss.functional`.

Every head holds ``weight`` ``[num_classes, embedding_dim]`` (the layout of
:class:`torch.nn.Linear`, no bias) and its hyperparameters, and maps
``(embeddings [B, D], labels [B])`` to the loss.  Besides ``forward`` each head offers
``logits(embeddings, labels=None)`` (``[B, C]`` margin logits with labels, margin-free
inference logits without) and ``cosine(embeddings)`` (``[B, C]`` :math:`\cos\theta`).

Common keyword arguments (all heads):

``reduction`` (``"mean"``), ``label_smoothing`` (0.0) and ``ignore_index`` (-100) behave as
in :class:`torch.nn.CrossEntropyLoss`; ``chunk_size`` (``"auto"``) selects the memory-frugal
chunked engine (``None`` = plain autograd, see :func:`marginloss.fused.margin_softmax_loss`);
``device`` and ``dtype`` place the weight.

Class sharding (see :mod:`marginloss.distributed`): with ``process_group`` (default ``None``,
one process) a head holds only its rank's rows
``[shard_start, shard_start + shard_size)`` of the classes and ``forward`` returns, on every
rank, the loss of the global batch gathered from all ranks; ``num_classes`` stays the total.
``sample_rate`` (1.0) below 1 turns on PartialFC sampling of each shard's classes in training
mode, seeded from ``(sample_seed, rank, step)`` (``sample_seed`` 0; the step is the buffer
``sample_step``).  On a sharded head, ``cosine`` and the inference ``logits`` cover the
local classes only.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from marginloss import _validation as V
from marginloss import distributed as MD
from marginloss import functional as MF
from marginloss.fused import _NORM_EPS, ChunkSize, TargetFn

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ArcFace", "CombinedMargin", "CosFace", "LSoftmax", "NormFace", "SphereFace"]


class _MarginHead(nn.Module):
    """Shared storage, validation and inference helpers of the classification heads."""

    weight: Tensor
    sample_step: Tensor
    shard_layout: Tensor
    _normalize_embeddings = True
    _normalize_weight = True

    @property
    def _scale(self) -> float:
        return float(getattr(self, "scale", 1.0))

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        reduction: str,
        label_smoothing: float,
        ignore_index: int,
        chunk_size: ChunkSize,
        process_group: ProcessGroup | None = None,
        sample_rate: float = 1.0,
        sample_seed: int = 0,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.embedding_dim = V.check_positive_int("embedding_dim", embedding_dim)
        self.num_classes = V.check_positive_int("num_classes", num_classes)
        self.reduction = V.check_choice("reduction", reduction, ("mean", "sum", "none"))
        self.label_smoothing = V.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        self.chunk_size = V.check_chunk_size(chunk_size)
        self.sample_rate = V.check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
        if isinstance(sample_seed, bool) or not isinstance(sample_seed, int):
            raise TypeError(f"sample_seed must be an int, got {type(sample_seed).__name__}")
        self.sample_seed = sample_seed
        self.process_group = process_group
        self.world_size, self.rank = MD._world(process_group)
        self.shard_start, self.shard_size = MD.shard_range(num_classes, self.world_size, self.rank)
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim, device=device, dtype=dtype))
        if process_group is not None:
            layout = [num_classes, self.world_size, self.shard_start, self.shard_size]
            self.register_buffer("shard_layout", torch.tensor(layout, device=self.weight.device))
        if process_group is not None or self.sample_rate < 1.0:
            self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64, device=self.weight.device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform initialisation of ``weight`` (the papers' Caffe ``xavier`` filler).

        A class-sharded head draws its rows with the bound of the full matrix, from a
        random stream of each rank's own.
        """
        if self.process_group is not None:
            MD._init_shard_(self.weight, self.num_classes, self.rank)
            return
        nn.init.xavier_uniform_(self.weight)

    def _sharded(self) -> bool:
        return self.process_group is not None or (self.sample_rate < 1.0 and self.training)

    def _sharded_forward(self, embeddings: Tensor, labels: Tensor, target_fn: TargetFn) -> Tensor:
        """The loss through :func:`marginloss.distributed.sharded_margin_softmax_loss`."""
        sampling = self.training and self.sample_rate < 1.0
        loss = MD.sharded_margin_softmax_loss(
            embeddings, self.weight, labels, target_fn, num_classes=self.num_classes,
            process_group=self.process_group, scale=self._scale,
            normalize_embeddings=self._normalize_embeddings,
            normalize_weight=self._normalize_weight, **self._loss_kwargs(),
            sample_rate=self.sample_rate if sampling else 1.0, sample_seed=self.sample_seed,
            # Read on the host only when sampling needs it (a device sync on GPU).
            sample_step=int(self.sample_step) if sampling else 0,
        )
        if sampling:
            self.sample_step.add_(1)
        return loss

    def _loss_kwargs(self) -> dict[str, Any]:
        return {
            "reduction": self.reduction,
            "label_smoothing": self.label_smoothing,
            "ignore_index": self.ignore_index,
            "chunk_size": self.chunk_size,
        }

    def _check_embeddings(self, embeddings: Tensor) -> Tensor:
        return V.check_embeddings(embeddings, self.embedding_dim)

    def cosine(self, embeddings: Tensor) -> Tensor:
        r"""``[B, C]`` cosine similarities :math:`\cos\theta_{ij}` between embeddings and class weights."""
        self._check_embeddings(embeddings)
        compute = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        x = embeddings.to(compute)
        w = self.weight.to(compute)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        w = w / w.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        cosine: Tensor = x @ w.T
        return cosine

    def _norms(self, embeddings: Tensor, cosine: Tensor) -> tuple[Tensor, Tensor]:
        return embeddings.to(cosine.dtype).norm(dim=1), self.weight.to(cosine.dtype).norm(dim=1)

    @abstractmethod
    def _margin_logits(self, cosine: Tensor, labels: Tensor, x_norm: Tensor, w_norm: Tensor) -> Tensor:
        """The head's training logits from the cosine matrix and the row norms."""

    def logits(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """``[B, C]`` logits: with ``labels`` the training (margin) logits, else inference logits.

        Materialises the full matrix; for the loss use ``forward``, which need not.
        """
        if labels is not None and self.process_group is not None:
            raise ValueError(
                f"logits(embeddings, labels) needs every class, but this class-sharded head holds "
                f"classes [{self.shard_start}, {self.shard_start + self.shard_size}) only: use forward "
                f"for the loss, or marginloss.distributed.gather_weight for the full weight"
            )
        cosine = self.cosine(embeddings)
        x_norm, w_norm = self._norms(embeddings, cosine)
        if labels is not None:
            return self._margin_logits(cosine, labels, x_norm, w_norm)
        radius = torch.full_like(x_norm, self._scale)[:, None]
        if not self._normalize_embeddings:
            radius = radius * x_norm[:, None]
        if not self._normalize_weight:
            radius = radius * w_norm[None, :]
        return radius * cosine

    def extra_repr(self) -> str:
        fields = [f"embedding_dim={self.embedding_dim}", f"num_classes={self.num_classes}"]
        fields += [f"{k}={v!r}" for k, v in self._hyperparameters().items()]
        fields += [f"{k}={v!r}" for k, v in self._loss_kwargs().items()]
        if self.process_group is not None:
            end = self.shard_start + self.shard_size
            fields.append(f"process_group=<rank {self.rank} of {self.world_size}, classes [{self.shard_start}, {end})>")
        if self.sample_rate < 1.0:
            fields += [f"sample_rate={self.sample_rate!r}", f"sample_seed={self.sample_seed!r}"]
        return ", ".join(fields)

    def _hyperparameters(self) -> dict[str, Any]:
        return {}


class ArcFace(_MarginHead):
    r"""ArcFace: additive angular margin softmax.

    .. math::
        L_i = -\log\frac{e^{s\,f(\cos\theta_{y_i})}}{e^{s\,f(\cos\theta_{y_i})}
              + \sum_{j\ne y_i} e^{s\cos\theta_j}},\qquad
        f(\cos\theta) = \begin{cases}\cos(\theta+m) & \theta+m\le\pi\\
                        \cos\theta - m\sin m & \text{otherwise}\end{cases}

    with :math:`\cos\theta_j = \hat x^\top \hat w_j` (both L2-normalised).  The fallback branch
    is the one of the paper's release, which keeps the target logit monotonic; see
    :func:`marginloss.functional.arcface_target`.

    Deng, Guo, Xue & Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR 2019.

    Parameters
    ----------
    embedding_dim, num_classes : int
    scale : float, default 64.0
        :math:`s`, the paper's value for face recognition.
    margin : float, default 0.5
        :math:`m` in radians, in ``[0, π)``; 0.5 as in the paper.
    easy_margin : bool, default False
        Apply the margin only where :math:`\cos\theta_{y} > 0` (keeping :math:`\cos\theta`
        elsewhere) instead of using the fallback.
    straight_through : bool, default False
        Use gradient 1 for :math:`f` with respect to :math:`\cos\theta` (the effective gradient
        of InsightFace's ``arcface_torch`` implementation) instead of the exact
        :math:`\sin(\theta+m)/\sin\theta`.
    reduction, label_smoothing, ignore_index, chunk_size, device, dtype
        See :mod:`marginloss.heads`.
    process_group, sample_rate, sample_seed
        Class sharding and PartialFC sampling; see :mod:`marginloss.distributed`.

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.ArcFace(16, 100)
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> loss = head(embeddings, torch.randint(0, 100, (8,)))
    >>> loss.backward()
    >>> head.logits(embeddings).shape  # inference logits s·cos θ
    torch.Size([8, 100])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
        straight_through: bool = False,
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
        self.scale, self.margin = MF._check_arcface_args(scale, margin)
        self.easy_margin = bool(easy_margin)
        self.straight_through = bool(straight_through)
        super().__init__(
            embedding_dim, num_classes, reduction=reduction, label_smoothing=label_smoothing,
            ignore_index=ignore_index, chunk_size=chunk_size, process_group=process_group,
            sample_rate=sample_rate, sample_seed=sample_seed, device=device, dtype=dtype,
        )

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "margin": self.margin,
            "easy_margin": self.easy_margin,
            "straight_through": self.straight_through,
        }

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self._sharded():
            return self._sharded_forward(
                embeddings, labels,
                lambda cos: MF.arcface_target(
                    cos, self.margin, easy_margin=self.easy_margin, straight_through=self.straight_through
                ),
            )
        self._check_embeddings(embeddings)
        return MF.arcface(embeddings, self.weight, labels, **self._hyperparameters(), **self._loss_kwargs())

    def _margin_logits(self, cosine: Tensor, labels: Tensor, x_norm: Tensor, w_norm: Tensor) -> Tensor:
        return MF.arcface_logits(cosine, labels, **self._hyperparameters(), ignore_index=self.ignore_index)


class CosFace(_MarginHead):
    r"""CosFace (large margin cosine loss, AM-Softmax): additive cosine margin.

    .. math::
        L_i = -\log\frac{e^{s(\cos\theta_{y_i} - m)}}{e^{s(\cos\theta_{y_i} - m)}
              + \sum_{j\ne y_i} e^{s\cos\theta_j}}

    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018
    (also Wang, Cheng, Liu & Liu, "Additive Margin Softmax", 2018).

    Parameters
    ----------
    embedding_dim, num_classes : int
    scale : float, default 64.0
        :math:`s`, the CosFace paper's value.
    margin : float, default 0.35
        :math:`m` in ``[0, 2)``; 0.35 is the CosFace paper's best setting.
    reduction, label_smoothing, ignore_index, chunk_size, device, dtype
        See :mod:`marginloss.heads`.
    process_group, sample_rate, sample_seed
        Class sharding and PartialFC sampling; see :mod:`marginloss.distributed`.

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.CosFace(16, 100, scale=30.0, margin=0.4)
    >>> head(torch.randn(8, 16), torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.35,
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
        self.scale, self.margin = MF._check_cosface_args(scale, margin)
        super().__init__(
            embedding_dim, num_classes, reduction=reduction, label_smoothing=label_smoothing,
            ignore_index=ignore_index, chunk_size=chunk_size, process_group=process_group,
            sample_rate=sample_rate, sample_seed=sample_seed, device=device, dtype=dtype,
        )

    def _hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale, "margin": self.margin}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self._sharded():
            return self._sharded_forward(embeddings, labels, lambda cos: MF.cosface_target(cos, self.margin))
        self._check_embeddings(embeddings)
        return MF.cosface(embeddings, self.weight, labels, **self._hyperparameters(), **self._loss_kwargs())

    def _margin_logits(self, cosine: Tensor, labels: Tensor, x_norm: Tensor, w_norm: Tensor) -> Tensor:
        return MF.cosface_logits(cosine, labels, **self._hyperparameters(), ignore_index=self.ignore_index)


class CombinedMargin(_MarginHead):
    r"""Combined angular/additive margin (InsightFace).

    .. math::
        f(\cos\theta) = \cos(m_1\theta + m_2) - m_3,\qquad
        L_i = -\log\frac{e^{s f(\cos\theta_{y_i})}}{e^{s f(\cos\theta_{y_i})}
              + \sum_{j\ne y_i} e^{s\cos\theta_j}}

    ``m1`` is SphereFace's multiplicative angular margin, ``m2`` ArcFace's additive angular
    margin and ``m3`` CosFace's additive cosine margin (Deng et al., CVPR 2019, Sec. 2.2).
    The formula is used as is, without ArcFace's fallback.

    Parameters
    ----------
    embedding_dim, num_classes : int
    scale : float, default 64.0
    m1 : float, default 1.0
        Multiplicative angular margin, > 0.
    m2 : float, default 0.0
        Additive angular margin in radians, in ``[0, π)``.
    m3 : float, default 0.0
        Additive cosine margin, in ``[0, 2)``.  The defaults are the identity (NormFace);
        InsightFace's combined setting is ``(1.0, 0.3, 0.2)``.
    reduction, label_smoothing, ignore_index, chunk_size, device, dtype
        See :mod:`marginloss.heads`.
    process_group, sample_rate, sample_seed
        Class sharding and PartialFC sampling; see :mod:`marginloss.distributed`.

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.CombinedMargin(16, 100, m1=1.0, m2=0.3, m3=0.2)
    >>> head(torch.randn(8, 16), torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
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
        self.scale, self.m1, self.m2, self.m3 = MF._check_combined_args(scale, m1, m2, m3)
        super().__init__(
            embedding_dim, num_classes, reduction=reduction, label_smoothing=label_smoothing,
            ignore_index=ignore_index, chunk_size=chunk_size, process_group=process_group,
            sample_rate=sample_rate, sample_seed=sample_seed, device=device, dtype=dtype,
        )

    def _hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale, "m1": self.m1, "m2": self.m2, "m3": self.m3}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self._sharded():
            return self._sharded_forward(
                embeddings, labels, lambda cos: MF.combined_margin_target(cos, self.m1, self.m2, self.m3)
            )
        self._check_embeddings(embeddings)
        return MF.combined_margin(embeddings, self.weight, labels, **self._hyperparameters(), **self._loss_kwargs())

    def _margin_logits(self, cosine: Tensor, labels: Tensor, x_norm: Tensor, w_norm: Tensor) -> Tensor:
        return MF.combined_margin_logits(cosine, labels, **self._hyperparameters(), ignore_index=self.ignore_index)


class NormFace(_MarginHead):
    r"""NormFace: normalised softmax, no margin.

    .. math::
        L_i = -\log\frac{e^{s\cos\theta_{y_i}}}{\sum_j e^{s\cos\theta_j}}

    Wang, Xiang, Cheng & Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification",
    ACM MM 2017.

    Parameters
    ----------
    embedding_dim, num_classes : int
    scale : float, default 16.0
        :math:`s`.  NormFace shows that with normalised features the loss has a lower bound
        that only a large enough :math:`s` can approach; :math:`s = 16` satisfies the paper's
        bound :math:`s \ge \frac{C-1}{C}\log\frac{(C-1)P}{1-P}` for :math:`P = 0.9` up to
        about :math:`10^6` classes.
    reduction, label_smoothing, ignore_index, chunk_size, device, dtype
        See :mod:`marginloss.heads`.
    process_group, sample_rate, sample_seed
        Class sharding and PartialFC sampling; see :mod:`marginloss.distributed`.

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.NormFace(16, 100)
    >>> head(torch.randn(8, 16), torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 16.0,
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
        self.scale = MF._check_scale(scale)
        super().__init__(
            embedding_dim, num_classes, reduction=reduction, label_smoothing=label_smoothing,
            ignore_index=ignore_index, chunk_size=chunk_size, process_group=process_group,
            sample_rate=sample_rate, sample_seed=sample_seed, device=device, dtype=dtype,
        )

    def _hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self._sharded():
            return self._sharded_forward(embeddings, labels, lambda cos: cos)
        self._check_embeddings(embeddings)
        return MF.normface(embeddings, self.weight, labels, **self._hyperparameters(), **self._loss_kwargs())

    def _margin_logits(self, cosine: Tensor, labels: Tensor, x_norm: Tensor, w_norm: Tensor) -> Tensor:
        V.check_labels(labels, cosine.shape[0], self.num_classes, self.ignore_index)
        return self.scale * cosine


class _AnnealedHead(_MarginHead):
    """SphereFace / L-Softmax: integer angle multiplier and the λ annealing schedule."""

    iteration: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        margin: int,
        lambda_base: float,
        lambda_gamma: float,
        lambda_power: float,
        lambda_min: float,
        **kwargs: Any,
    ) -> None:
        self.margin = MF._check_int_margin(margin)
        self.lambda_base = V.check_float("lambda_base", lambda_base, low=0.0)
        self.lambda_gamma = V.check_float("lambda_gamma", lambda_gamma, low=0.0)
        self.lambda_power = V.check_float("lambda_power", lambda_power, low=0.0)
        self.lambda_min = V.check_float("lambda_min", lambda_min, low=0.0)
        super().__init__(embedding_dim, num_classes, **kwargs)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64, device=self.weight.device))

    def current_lambda(self) -> Tensor:
        r""":math:`\lambda = \max(\lambda_{\min}, \lambda_{base}(1+\gamma t)^{-p})` at the current iteration :math:`t`."""
        return MF.annealing_lambda(
            self.iteration, self.lambda_base, self.lambda_gamma, self.lambda_power, self.lambda_min
        )

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "margin": self.margin,
            "lambda_base": self.lambda_base,
            "lambda_gamma": self.lambda_gamma,
            "lambda_power": self.lambda_power,
            "lambda_min": self.lambda_min,
        }

    def _step_lambda(self) -> Tensor:
        lambda_ = self.current_lambda()
        if self.training:
            self.iteration.add_(1)
        return lambda_


class SphereFace(_AnnealedHead):
    r"""SphereFace (A-Softmax): multiplicative angular margin on normalised weights.

    .. math::
        L_i = -\log\frac{e^{\lVert x_i\rVert f(\theta_{y_i})}}{e^{\lVert x_i\rVert f(\theta_{y_i})}
              + \sum_{j\ne y_i} e^{\lVert x_i\rVert\cos\theta_j}},\qquad
        f = \frac{\lambda\cos\theta + \psi(\theta)}{1+\lambda},\quad
        \psi(\theta) = (-1)^k\cos(m\theta) - 2k,\ k = \lfloor m\theta/\pi\rfloor

    Weights are L2-normalised, embeddings are not (logits scale with :math:`\lVert x\rVert`).
    :math:`\lambda = \max(\lambda_{\min}, \lambda_{base}(1+\gamma t)^{-p})` anneals from
    softmax towards the pure margin; the iteration counter :math:`t` is the buffer
    ``iteration``, advanced by one on every forward in training mode and saved in the
    ``state_dict``.  ``lambda_base=0, lambda_min=0`` switches annealing off.

    Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017.

    Parameters
    ----------
    embedding_dim, num_classes : int
    margin : int, default 4
        The angle multiplier :math:`m` (the paper's choice).
    lambda_base, lambda_gamma, lambda_power, lambda_min : float, default 1000, 0.12, 1, 5
        The annealing schedule of the SphereFace release (``base``, ``gamma``, ``power``,
        ``lambda_min`` of its ``margin_inner_product`` layer).
    reduction, label_smoothing, ignore_index, chunk_size, device, dtype
        See :mod:`marginloss.heads`.
    process_group, sample_rate, sample_seed
        Class sharding and PartialFC sampling; see :mod:`marginloss.distributed`.

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.SphereFace(16, 100)
    >>> float(head.current_lambda())
    1000.0
    >>> head(torch.randn(8, 16), torch.randint(0, 100, (8,))).shape
    torch.Size([])
    >>> int(head.iteration)
    1
    """

    _normalize_embeddings = False

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
        super().__init__(
            embedding_dim, num_classes, margin=margin, lambda_base=lambda_base,
            lambda_gamma=lambda_gamma, lambda_power=lambda_power, lambda_min=lambda_min,
            reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index,
            chunk_size=chunk_size, process_group=process_group, sample_rate=sample_rate,
            sample_seed=sample_seed, device=device, dtype=dtype,
        )

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self._sharded():
            lambda_ = self._step_lambda()
            return self._sharded_forward(
                embeddings, labels, lambda cos: MF.sphereface_target(cos, self.margin, lambda_)
            )
        self._check_embeddings(embeddings)
        return MF.sphereface(
            embeddings, self.weight, labels, margin=self.margin, lambda_=self._step_lambda(),
            **self._loss_kwargs(),
        )

    def _margin_logits(self, cosine: Tensor, labels: Tensor, x_norm: Tensor, w_norm: Tensor) -> Tensor:
        return MF.sphereface_logits(
            cosine, labels, x_norm, margin=self.margin, lambda_=self.current_lambda(),
            ignore_index=self.ignore_index,
        )


class LSoftmax(_AnnealedHead):
    r"""L-Softmax: large-margin softmax with unnormalised weights and embeddings.

    .. math::
        L_i = -\log\frac{e^{\lVert w_{y_i}\rVert\lVert x_i\rVert f(\theta_{y_i})}}
              {e^{\lVert w_{y_i}\rVert\lVert x_i\rVert f(\theta_{y_i})}
              + \sum_{j\ne y_i} e^{w_j^\top x_i}},\qquad
        f = \frac{\lambda\cos\theta + \psi(\theta)}{1+\lambda}

    with :math:`\psi` as in :class:`SphereFace` and the same annealing of :math:`\lambda`
    (buffer ``iteration``).

    Liu, Wen, Yu & Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks",
    ICML 2016.

    Parameters
    ----------
    embedding_dim, num_classes : int
    margin : int, default 4
        The angle multiplier :math:`m`.
    lambda_base, lambda_gamma, lambda_power, lambda_min : float, default 1000, 2.5e-5, 35, 0
        The annealing schedule of the L-Softmax release (its MNIST ``largemargin_inner_product``
        settings).
    reduction, label_smoothing, ignore_index, chunk_size, device, dtype
        See :mod:`marginloss.heads`.
    process_group, sample_rate, sample_seed
        Class sharding and PartialFC sampling; see :mod:`marginloss.distributed`.

    Shape:
        - embeddings: ``[B, embedding_dim]``, labels: ``[B]`` int64
        - output: scalar, or ``[B]`` if ``reduction="none"``

    Examples
    --------
    >>> import torch, marginloss
    >>> head = marginloss.LSoftmax(16, 10, margin=2)
    >>> head(torch.randn(8, 16), torch.randint(0, 10, (8,))).shape
    torch.Size([])
    """

    _normalize_embeddings = False
    _normalize_weight = False

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        margin: int = 4,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 2.5e-5,
        lambda_power: float = 35.0,
        lambda_min: float = 0.0,
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
        super().__init__(
            embedding_dim, num_classes, margin=margin, lambda_base=lambda_base,
            lambda_gamma=lambda_gamma, lambda_power=lambda_power, lambda_min=lambda_min,
            reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index,
            chunk_size=chunk_size, process_group=process_group, sample_rate=sample_rate,
            sample_seed=sample_seed, device=device, dtype=dtype,
        )

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self._sharded():
            lambda_ = self._step_lambda()
            return self._sharded_forward(
                embeddings, labels, lambda cos: MF.lsoftmax_target(cos, self.margin, lambda_)
            )
        self._check_embeddings(embeddings)
        return MF.lsoftmax(
            embeddings, self.weight, labels, margin=self.margin, lambda_=self._step_lambda(),
            **self._loss_kwargs(),
        )

    def _margin_logits(self, cosine: Tensor, labels: Tensor, x_norm: Tensor, w_norm: Tensor) -> Tensor:
        return MF.lsoftmax_logits(
            cosine, labels, x_norm, w_norm, margin=self.margin, lambda_=self.current_lambda(),
            ignore_index=self.ignore_index,
        )

