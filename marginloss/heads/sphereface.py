r"""SphereFace (A-Softmax): multiplicative angular margin :math:`\psi(\theta)` with annealing."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from marginloss import _validation as V
from marginloss.fused import ChunkSize, MarginContext, margin_loss
from marginloss.heads._common import (
    check_cosine_values,
    check_logit_inputs,
    replace_target,
    target_column,
)
from marginloss.heads.base import MarginHead, register_head

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "SphereFace",
    "angular_psi",
    "annealing_lambda",
    "sphereface",
    "sphereface_logits",
    "sphereface_target",
]

Lambda = Union[float, Tensor]
# The angle multiplier's upper bound: psi costs O(m) operations, and the papers use m <= 4.
MAX_MARGIN = 8


def check_int_margin(margin: object) -> int:
    if isinstance(margin, bool) or not isinstance(margin, int) or not 1 <= margin <= MAX_MARGIN:
        raise ValueError(
            f"margin must be a positive int (the angle multiplier m) of at most {MAX_MARGIN}, got {margin!r}"
        )
    return margin


def check_lambda(lambda_: Lambda) -> None:
    if isinstance(lambda_, Tensor):
        if lambda_.numel() != 1:
            raise ValueError(f"lambda_ must be a scalar, got a tensor of shape {tuple(lambda_.shape)}")
        return
    V.check_float("lambda_", lambda_, low=0.0)


def _psi_branch(cos_target: Tensor, margin: int) -> Tensor:
    # k = floor(mθ/π) without acos: θ >= jπ/m  <=>  cos θ <= cos(jπ/m).
    k = torch.zeros_like(cos_target)
    for j in range(1, margin):
        k = k + (cos_target <= math.cos(j * math.pi / margin)).to(cos_target.dtype)
    return k


def angular_psi(cos_target: Tensor, margin: int = 4) -> Tensor:
    r"""The monotonic extension of :math:`\cos(m\theta)` used by L-Softmax and SphereFace.

    .. math::
        \psi(\theta) = (-1)^k \cos(m\theta) - 2k,\qquad
        \theta \in \left[\tfrac{k\pi}{m}, \tfrac{(k+1)\pi}{m}\right],\ k \in \{0,\dots,m-1\}

    :math:`\cos(m\theta) = T_m(\cos\theta)` is evaluated with the Chebyshev recurrence and
    :math:`k` by comparing :math:`\cos\theta` with :math:`\cos(j\pi/m)`, so no ``acos`` is
    needed and the gradient is the exact :math:`(-1)^k T_m'(\cos\theta)`.

    Examples
    --------
    >>> import torch
    >>> angular_psi(torch.tensor([1.0, 0.0, -1.0]), 4)  # ψ(0)=1, ψ(π/2)=-3, ψ(π)=-7
    tensor([ 1., -3., -7.])
    """
    t_prev, t_cur = torch.ones_like(cos_target), cos_target
    for _ in range(margin - 1):
        t_prev, t_cur = t_cur, 2.0 * cos_target * t_cur - t_prev
    k = _psi_branch(cos_target, margin)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * t_cur - 2.0 * k


def sphereface_target(cos_target: Tensor, margin: int = 4, lambda_: Lambda = 0.0) -> Tensor:
    r"""SphereFace / L-Softmax target with the annealing of their releases.

    .. math::
        f(\cos\theta) = \frac{\lambda\cos\theta + \psi(\theta)}{1 + \lambda}

    with :math:`\psi` from :func:`angular_psi`.  :math:`\lambda = 0` is the pure margin;
    large :math:`\lambda` starts training close to plain softmax.

    Examples
    --------
    >>> import torch
    >>> sphereface_target(torch.tensor([0.0]), 4, lambda_=1.0)  # (0 + -3) / 2
    tensor([-1.5000])
    """
    psi = angular_psi(cos_target, margin)
    if isinstance(lambda_, Tensor):
        lam = lambda_.to(cos_target.dtype)
        return (lam * cos_target + psi) / (1.0 + lam)
    if lambda_ == 0.0:
        return psi
    return (lambda_ * cos_target + psi) / (1.0 + lambda_)


def annealing_lambda(
    iteration: int | Tensor,
    lambda_base: float,
    lambda_gamma: float,
    lambda_power: float,
    lambda_min: float,
) -> Tensor:
    r"""The annealing weight of SphereFace / L-Softmax at a training iteration.

    .. math:: \lambda = \max\left(\lambda_{\min},\ \lambda_{base}(1 + \gamma\, t)^{-p}\right)

    (the ``base``, ``gamma``, ``power``, ``lambda_min`` of the papers' Caffe releases).

    Examples
    --------
    >>> float(annealing_lambda(0, 1000.0, 0.12, 1.0, 5.0))
    1000.0
    >>> float(annealing_lambda(10_000, 1000.0, 0.12, 1.0, 5.0))
    5.0
    """
    it = iteration if isinstance(iteration, Tensor) else torch.tensor(iteration)
    value = lambda_base * torch.pow(1.0 + lambda_gamma * it.to(torch.float64), -lambda_power)
    return value.clamp_min(lambda_min)


def sphereface_logits(
    cosine: Tensor,
    labels: Tensor,
    embedding_norms: Tensor,
    *,
    margin: int = 4,
    lambda_: Lambda = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    r"""A-Softmax logits :math:`\lVert x_i\rVert f(\cos\theta_{iy_i})` on the target,
    :math:`\lVert x_i\rVert\cos\theta_{ij}` elsewhere (``embedding_norms`` is ``[B]``).

    Examples
    --------
    >>> import torch
    >>> sphereface_logits(torch.tensor([[0.0, 0.5]]), torch.tensor([0]), torch.tensor([2.0]))
    tensor([[-6.,  1.]])
    """
    margin = check_int_margin(margin)
    check_lambda(lambda_)
    labels, valid = check_logit_inputs(cosine, labels, ignore_index)
    if embedding_norms.shape != (cosine.shape[0],):
        raise ValueError(
            f"embedding_norms must have shape [{cosine.shape[0]}], got {tuple(embedding_norms.shape)}"
        )
    check_cosine_values(cosine)
    target = sphereface_target(target_column(cosine, labels), margin, lambda_)
    return embedding_norms[:, None] * replace_target(cosine, labels, valid, target)


def sphereface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    margin: int = 4,
    lambda_: Lambda = 0.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""SphereFace (A-Softmax) loss at annealing weight ``lambda_``; see :class:`marginloss.SphereFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16), torch.randn(100, 16)
    >>> sphereface(x, w, torch.randint(0, 100, (8,)), margin=4, lambda_=5.0).shape
    torch.Size([])
    """
    margin = check_int_margin(margin)
    check_lambda(lambda_)

    def target(cos: Tensor, context: MarginContext) -> Tensor:
        return sphereface_target(cos, margin, lambda_)

    return margin_loss(
        embeddings, weight, labels, target, scale=1.0, normalize_embeddings=False,
        normalize_weight=True, reduction=reduction, label_smoothing=label_smoothing,
        ignore_index=ignore_index, chunk_size=chunk_size,
    )


@register_head("sphereface")
class SphereFace(MarginHead):
    r"""SphereFace (A-Softmax): multiplicative angular margin on normalised weights.

    .. math::
        L_i = -\log\frac{e^{\lVert x_i\rVert f(\theta_{y_i})}}{e^{\lVert x_i\rVert f(\theta_{y_i})}
              + \sum_{j\ne y_i} e^{\lVert x_i\rVert\cos\theta_j}},\qquad
        f = \frac{\lambda\cos\theta + \psi(\theta)}{1+\lambda},\quad
        \psi(\theta) = (-1)^k\cos(m\theta) - 2k,\ k = \lfloor m\theta/\pi\rfloor

    Weights are L2-normalised, embeddings are not (logits scale with :math:`\lVert x\rVert`).
    :math:`\lambda = \max(\lambda_{\min}, \lambda_{base}(1+\gamma t)^{-p})` anneals from
    softmax towards the pure margin; the iteration counter :math:`t` is the buffer
    ``iteration``, advanced by one on every forward in training mode (not in eval mode, and
    not when activation checkpointing replays a forward) and saved in the ``state_dict``.  ``lambda_base=0, lambda_min=0`` switches annealing off.

    Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017.

    Parameters
    ----------
    embedding_dim : int
        :math:`D`.
    num_classes : int
        :math:`C`.
    margin : int, default 4
        The angle multiplier :math:`m`, in ``[1, 8]`` (the paper's choice is 4; the papers
        use :math:`m \le 4`).
    lambda_base : float, default 1000.0
        :math:`\lambda_{base}`, the starting weight of plain softmax (the SphereFace
        release's ``base`` of its ``margin_inner_product`` layer).
    lambda_gamma : float, default 0.12
        :math:`\gamma`, how fast :math:`\lambda` decays per iteration (the release's ``gamma``).
    lambda_power : float, default 1.0
        :math:`p`, the decay's power (the release's ``power``).
    lambda_min : float, default 5.0
        :math:`\lambda_{\min}`, the floor :math:`\lambda` anneals to (the release's
        ``lambda_min``).
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
    >>> head = marginloss.SphereFace(16, 100)
    >>> float(head.current_lambda())
    1000.0
    >>> head(torch.randn(8, 16), torch.randint(0, 100, (8,))).shape
    torch.Size([])
    >>> int(head.iteration)
    1
    """

    normalize_embeddings = False
    iteration: Tensor

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
        margin = check_int_margin(margin)
        schedule = [
            V.check_float(name, value, low=0.0)
            for name, value in (
                ("lambda_base", lambda_base), ("lambda_gamma", lambda_gamma),
                ("lambda_power", lambda_power), ("lambda_min", lambda_min),
            )
        ]
        super().__init__(
            embedding_dim, num_classes, scale=1.0, reduction=reduction, label_smoothing=label_smoothing,
            ignore_index=ignore_index, chunk_size=chunk_size, process_group=process_group,
            sample_rate=sample_rate, sample_seed=sample_seed, device=device, dtype=dtype,
        )
        self.margin = margin
        self.lambda_base, self.lambda_gamma, self.lambda_power, self.lambda_min = schedule
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64, device=self.weight.device))

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "margin": self.margin,
            "lambda_base": self.lambda_base,
            "lambda_gamma": self.lambda_gamma,
            "lambda_power": self.lambda_power,
            "lambda_min": self.lambda_min,
        }

    def current_lambda(self) -> Tensor:
        r""":math:`\lambda = \max(\lambda_{\min}, \lambda_{base}(1+\gamma t)^{-p})` at the current iteration :math:`t`."""
        return annealing_lambda(
            self.iteration, self.lambda_base, self.lambda_gamma, self.lambda_power, self.lambda_min
        )

    def prepare(self, context: MarginContext) -> None:
        if context.update_state:
            self.iteration.add_(1)

    def target(self, cos: Tensor, context: MarginContext) -> Tensor:
        # A training forward uses lambda at the iteration before prepare advanced it (also
        # when checkpointing replays it without advancing); eval uses the current one.
        iteration = self.iteration - 1 if context.training else self.iteration
        lambda_ = annealing_lambda(
            iteration.clamp_min(0), self.lambda_base, self.lambda_gamma, self.lambda_power, self.lambda_min
        )
        return sphereface_target(cos, self.margin, lambda_)
