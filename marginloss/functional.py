r"""Pure tensor math of the margin heads: target transforms, margin logits and losses.

Three layers, each usable on its own:

* **Target transforms** map the target cosine :math:`\cos\theta_{y}` (a ``[B]`` tensor) to
  the head's margin cosine :math:`f(\cos\theta_y)`: :func:`arcface_target`,
  :func:`cosface_target`, :func:`combined_margin_target`, :func:`sphereface_target` (also
  L-Softmax's), built on :func:`angular_psi`.
* **Margin logits** apply a transform to a ``[B, C]`` cosine matrix you computed yourself,
  touching only the target column: :func:`arcface_logits`, :func:`cosface_logits`,
  :func:`combined_margin_logits`, :func:`sphereface_logits`, :func:`lsoftmax_logits`,
  and :func:`margin_cross_entropy` for their loss.
* **Losses** from embeddings and class weights, with the same arguments as the modules in
  :mod:`marginloss.heads`: :func:`arcface`, :func:`cosface`, :func:`combined_margin`,
  :func:`sphereface`, :func:`lsoftmax`, :func:`normface`.  They run the engine in
  :mod:`marginloss.fused` (chunked by default).

Margins are in radians.  Gradients are the exact derivatives of the formulas.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from marginloss import _validation as V
from marginloss.fused import ChunkSize, _reduce, _row_loss, margin_softmax_loss

__all__ = [
    "angular_psi",
    "annealing_lambda",
    "arcface",
    "arcface_logits",
    "arcface_target",
    "combined_margin",
    "combined_margin_logits",
    "combined_margin_target",
    "cosface",
    "cosface_logits",
    "cosface_target",
    "lsoftmax",
    "lsoftmax_logits",
    "lsoftmax_target",
    "margin_cross_entropy",
    "normface",
    "sphereface",
    "sphereface_logits",
    "sphereface_target",
]

Lambda = Union[float, Tensor]


def _safe_sin(cos: Tensor) -> Tensor:
    # sin θ = sqrt(1 - cos²θ), kept >= machine epsilon so d/dcos stays finite at θ = 0 and
    # π; the value moves by at most eps·sin(m), below the rounding of cos θ itself.
    return (1.0 - cos * cos).clamp_min(torch.finfo(cos.dtype).eps ** 2).sqrt()


# ---------------------------------------------------------------- hyperparameter checks


def _check_scale(scale: float) -> float:
    return V.check_float("scale", scale, low=0.0, low_open=True)


def _check_arcface_args(scale: float, margin: float) -> tuple[float, float]:
    return _check_scale(scale), V.check_float("margin", margin, low=0.0, high=math.pi, high_open=True)


def _check_cosface_args(scale: float, margin: float) -> tuple[float, float]:
    return _check_scale(scale), V.check_float("margin", margin, low=0.0, high=2.0, high_open=True)


def _check_combined_args(scale: float, m1: float, m2: float, m3: float) -> tuple[float, ...]:
    return (
        _check_scale(scale),
        V.check_float("m1", m1, low=0.0, low_open=True),
        V.check_float("m2", m2, low=0.0, high=math.pi, high_open=True),
        V.check_float("m3", m3, low=0.0, high=2.0, high_open=True),
    )


def _check_int_margin(margin: object) -> int:
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
        raise ValueError(f"margin must be a positive int (the angle multiplier m), got {margin!r}")
    return margin


def _check_lambda(lambda_: Lambda) -> None:
    if isinstance(lambda_, Tensor):
        if lambda_.numel() != 1:
            raise ValueError(f"lambda_ must be a scalar, got a tensor of shape {tuple(lambda_.shape)}")
        return
    V.check_float("lambda_", lambda_, low=0.0)


# ---------------------------------------------------------------- target transforms


def arcface_target(
    cos_target: Tensor,
    margin: float = 0.5,
    *,
    easy_margin: bool = False,
    straight_through: bool = False,
) -> Tensor:
    r"""ArcFace's additive angular margin on target cosines.

    .. math::
        f(\cos\theta) = \begin{cases}
            \cos(\theta + m) & \theta + m \le \pi \\
            \cos\theta - m \sin m & \theta + m > \pi
        \end{cases}

    computed as :math:`\cos\theta\cos m - \sin\theta\sin m` (no ``acos``).  The second branch
    is the monotonic fallback of the ArcFace paper's release (Deng et al., CVPR 2019), which
    keeps the target logit decreasing in :math:`\theta` over :math:`[0, \pi]`.  With
    ``easy_margin`` the margin is applied only where :math:`\cos\theta > 0` and
    :math:`\cos\theta` is kept elsewhere.

    Parameters
    ----------
    cos_target : Tensor
        Any shape, values in ``[-1, 1]``.
    margin : float, default 0.5
        :math:`m` in radians, in ``[0, π)``; 0.5 is the paper's choice.
    easy_margin : bool, default False
    straight_through : bool, default False
        Forward value as above, but the gradient with respect to :math:`\cos\theta` is 1
        (as InsightFace's in-place ``arccos``/``cos`` implementation effectively does)
        instead of the exact :math:`\sin(\theta+m)/\sin\theta`.

    Examples
    --------
    >>> import math, torch
    >>> cos = torch.tensor([1.0, 0.0, -1.0])
    >>> arcface_target(cos, 0.5)  # cos(0.5), cos(π/2 + 0.5), fallback -1 - 0.5 sin 0.5
    tensor([ 0.8776, -0.4794, -1.2397])
    """
    sin = _safe_sin(cos_target)
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    shifted = cos_target * cos_m - sin * sin_m
    if easy_margin:
        out = torch.where(cos_target > 0, shifted, cos_target)
    else:
        # θ + m > π  <=>  cos θ < cos(π - m)
        out = torch.where(cos_target > math.cos(math.pi - margin), shifted, cos_target - margin * sin_m)
    if straight_through:
        out = cos_target + (out - cos_target).detach()
    return out


def cosface_target(cos_target: Tensor, margin: float = 0.35) -> Tensor:
    r"""CosFace's additive cosine margin: :math:`f(\cos\theta) = \cos\theta - m`.

    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.

    Examples
    --------
    >>> import torch
    >>> cosface_target(torch.tensor([0.5]), 0.35)
    tensor([0.1500])
    """
    return cos_target - margin


def combined_margin_target(
    cos_target: Tensor, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0
) -> Tensor:
    r"""InsightFace's combined margin: :math:`f(\cos\theta) = \cos(m_1\theta + m_2) - m_3`.

    ``(m1, m2, m3) = (1, 0.5, 0)`` is ArcFace without its fallback, ``(1, 0, 0.35)`` is
    CosFace, an integer ``m1`` is SphereFace's angle multiplier without its :math:`\psi`
    extension.  The formula is used as is: it is not monotonic once
    :math:`m_1\theta + m_2 > \pi`.  :math:`\theta` is computed from the clamped cosine as
    ``atan2(sin θ, cos θ)`` so the gradient stays finite at :math:`\theta \in \{0, \pi\}`.

    Examples
    --------
    >>> import math, torch
    >>> combined_margin_target(torch.tensor([0.0]), 1.0, 0.5, 0.2)  # cos(π/2 + .5) - .2
    tensor([-0.6794])
    """
    theta = torch.atan2(_safe_sin(cos_target), cos_target)
    return torch.cos(m1 * theta + m2) - m3


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


lsoftmax_target = sphereface_target
"""L-Softmax's target transform; the same :math:`f` as :func:`sphereface_target`."""


# ---------------------------------------------------------------- their derivatives
# d f / d cos θ of each transform, used by the chunked engine's closed-form backward.
# The tests check each against autograd through the transform itself.


def _arcface_slope(cos_target: Tensor, margin: float, easy_margin: bool, straight_through: bool) -> Tensor:
    if straight_through:
        return torch.ones_like(cos_target)
    # d/dcos [cos θ cos m - sin θ sin m] = cos m + cos θ sin m / sin θ
    main = math.cos(margin) + cos_target * math.sin(margin) / _safe_sin(cos_target)
    threshold = 0.0 if easy_margin else math.cos(math.pi - margin)
    return torch.where(cos_target > threshold, main, torch.ones_like(cos_target))


def _combined_margin_slope(cos_target: Tensor, m1: float, m2: float) -> Tensor:
    sin = _safe_sin(cos_target)
    theta = torch.atan2(sin, cos_target)
    return m1 * torch.sin(m1 * theta + m2) / sin


def _sphereface_slope(cos_target: Tensor, margin: int, lambda_: Lambda) -> Tensor:
    # ψ' = (-1)^k T_m'(cos θ) = (-1)^k m U_{m-1}(cos θ), Chebyshev polynomials of the 2nd kind.
    u_prev, u_cur = torch.zeros_like(cos_target), torch.ones_like(cos_target)
    for _ in range(margin - 1):
        u_prev, u_cur = u_cur, 2.0 * cos_target * u_cur - u_prev
    k = _psi_branch(cos_target, margin)
    psi_slope = (1.0 - 2.0 * torch.remainder(k, 2.0)) * margin * u_cur
    lam = lambda_.to(cos_target.dtype) if isinstance(lambda_, Tensor) else lambda_
    return (lam + psi_slope) / (1.0 + lam)


def _unit_slope(cos_target: Tensor) -> Tensor:
    return torch.ones_like(cos_target)


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


# ---------------------------------------------------------------- margin logits on [B, C]


def _check_logit_inputs(cosine: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    if not isinstance(cosine, Tensor) or cosine.dim() != 2 or not cosine.is_floating_point():
        got = f"shape {tuple(cosine.shape)}, dtype {cosine.dtype}" if isinstance(cosine, Tensor) else type(cosine).__name__
        raise ValueError(f"cosine must be a floating [batch, num_classes] tensor, got {got}")
    labels = V.check_labels(labels, cosine.shape[0], cosine.shape[1], ignore_index)
    valid = labels != ignore_index
    return torch.where(valid, labels, torch.zeros_like(labels)), valid


def _with_target(matrix: Tensor, labels: Tensor, valid: Tensor, target: Tensor) -> Tensor:
    current = matrix.gather(1, labels[:, None]).squeeze(1)
    value = torch.where(valid, target.to(matrix.dtype), current)
    return matrix.scatter(1, labels[:, None], value[:, None])


def arcface_logits(
    cosine: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    easy_margin: bool = False,
    straight_through: bool = False,
    ignore_index: int = -100,
) -> Tensor:
    r"""ArcFace logits :math:`s\,f(\cos\theta_{iy_i})` on the target, :math:`s\cos\theta_{ij}` elsewhere.

    ``cosine`` is a ``[B, C]`` matrix you computed; rows whose label is ``ignore_index`` are
    only scaled.  Returns a new tensor (the input is not modified).

    Examples
    --------
    >>> import torch
    >>> cos = torch.tensor([[0.8, 0.1], [0.2, 0.6]])
    >>> arcface_logits(cos, torch.tensor([0, 1]), scale=1.0, margin=0.0)
    tensor([[0.8000, 0.1000],
            [0.2000, 0.6000]])
    """
    scale, margin = _check_arcface_args(scale, margin)
    labels, valid = _check_logit_inputs(cosine, labels, ignore_index)
    cos_t = cosine.gather(1, labels[:, None]).squeeze(1).clamp(-1.0, 1.0)
    target = arcface_target(cos_t, margin, easy_margin=easy_margin, straight_through=straight_through)
    return scale * _with_target(cosine, labels, valid, target)


def cosface_logits(
    cosine: Tensor, labels: Tensor, *, scale: float = 64.0, margin: float = 0.35, ignore_index: int = -100
) -> Tensor:
    r"""CosFace logits :math:`s(\cos\theta_{iy_i} - m)` on the target, :math:`s\cos\theta_{ij}` elsewhere.

    Examples
    --------
    >>> import torch
    >>> cosface_logits(torch.tensor([[0.5, 0.2]]), torch.tensor([0]), scale=2.0, margin=0.25)
    tensor([[0.5000, 0.4000]])
    """
    scale, margin = _check_cosface_args(scale, margin)
    labels, valid = _check_logit_inputs(cosine, labels, ignore_index)
    cos_t = cosine.gather(1, labels[:, None]).squeeze(1)
    return scale * _with_target(cosine, labels, valid, cosface_target(cos_t, margin))


def combined_margin_logits(
    cosine: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    r"""Combined-margin logits :math:`s(\cos(m_1\theta_{iy_i} + m_2) - m_3)` on the target.

    Examples
    --------
    >>> import torch
    >>> combined_margin_logits(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), scale=1.0, m3=0.5)
    tensor([[0.5000, 0.0000]])
    """
    scale, m1, m2, m3 = _check_combined_args(scale, m1, m2, m3)
    labels, valid = _check_logit_inputs(cosine, labels, ignore_index)
    cos_t = cosine.gather(1, labels[:, None]).squeeze(1).clamp(-1.0, 1.0)
    return scale * _with_target(cosine, labels, valid, combined_margin_target(cos_t, m1, m2, m3))


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
    margin = _check_int_margin(margin)
    _check_lambda(lambda_)
    labels, valid = _check_logit_inputs(cosine, labels, ignore_index)
    if embedding_norms.shape != (cosine.shape[0],):
        raise ValueError(
            f"embedding_norms must have shape [{cosine.shape[0]}], got {tuple(embedding_norms.shape)}"
        )
    cos_t = cosine.gather(1, labels[:, None]).squeeze(1).clamp(-1.0, 1.0)
    target = sphereface_target(cos_t, margin, lambda_)
    return embedding_norms[:, None] * _with_target(cosine, labels, valid, target)


def lsoftmax_logits(
    cosine: Tensor,
    labels: Tensor,
    embedding_norms: Tensor,
    weight_norms: Tensor,
    *,
    margin: int = 4,
    lambda_: Lambda = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    r"""L-Softmax logits :math:`\lVert w_{y_i}\rVert\lVert x_i\rVert f(\cos\theta_{iy_i})` on the
    target and :math:`w_j^\top x_i = \lVert w_j\rVert\lVert x_i\rVert\cos\theta_{ij}` elsewhere.

    ``embedding_norms`` is ``[B]``, ``weight_norms`` is ``[C]``.

    Examples
    --------
    >>> import torch
    >>> lsoftmax_logits(torch.tensor([[0.0, 0.5]]), torch.tensor([0]), torch.tensor([2.0]),
    ...                 torch.tensor([1.0, 3.0]))
    tensor([[-6.,  3.]])
    """
    margin = _check_int_margin(margin)
    _check_lambda(lambda_)
    labels, valid = _check_logit_inputs(cosine, labels, ignore_index)
    if embedding_norms.shape != (cosine.shape[0],) or weight_norms.shape != (cosine.shape[1],):
        raise ValueError(
            f"embedding_norms must have shape [{cosine.shape[0]}] and weight_norms "
            f"[{cosine.shape[1]}], got {tuple(embedding_norms.shape)} and {tuple(weight_norms.shape)}"
        )
    cos_t = cosine.gather(1, labels[:, None]).squeeze(1).clamp(-1.0, 1.0)
    target = sphereface_target(cos_t, margin, lambda_)
    radius = embedding_norms[:, None] * weight_norms[None, :]
    return radius * _with_target(cosine, labels, valid, target)


def margin_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    r"""Cross entropy of margin logits, computed in at least float32.

    Equals :func:`torch.nn.functional.cross_entropy` (same ``label_smoothing`` and
    ``ignore_index`` semantics) except that an all-ignored batch gives 0 instead of NaN, and
    that the target term is evaluated as :math:`\operatorname{softplus}(r_i - z_{iy_i})` with
    :math:`r_i = \log\sum_{j\ne y_i}e^{z_{ij}}`, which keeps full precision as
    :math:`p_{y_i}\to 1`.

    Examples
    --------
    >>> import torch
    >>> z, y = torch.randn(5, 7), torch.tensor([0, 6, 2, -100, 3])
    >>> ref = torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1)
    >>> bool(torch.allclose(margin_cross_entropy(z, y, label_smoothing=0.1), ref))
    True
    """
    V.check_choice("reduction", reduction, ("mean", "sum", "none"))
    label_smoothing = V.check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"shape {tuple(logits.shape)}, dtype {logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating [batch, num_classes] tensor, got {got}")
    labels = V.check_labels(labels, logits.shape[0], logits.shape[1], ignore_index)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target_mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, safe[:, None], True)
    target = z.gather(1, safe[:, None]).squeeze(1)
    lse_rest = z.masked_fill(target_mask, -math.inf).logsumexp(dim=1)
    sum_rest = z.masked_fill(target_mask, 0.0).sum(dim=1) if label_smoothing > 0 else None
    row = _row_loss(lse_rest, sum_rest, target, z.shape[1], label_smoothing)
    return _reduce(row, valid, reduction)


# ---------------------------------------------------------------- losses from embeddings


def arcface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    easy_margin: bool = False,
    straight_through: bool = False,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""ArcFace loss from embeddings ``[B, D]`` and class weights ``[C, D]``; see :class:`marginloss.ArcFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    >>> arcface(x, w, torch.randint(0, 100, (8,))).backward()
    """
    scale, margin = _check_arcface_args(scale, margin)

    def target_fn(cos: Tensor) -> Tensor:
        return arcface_target(cos, margin, easy_margin=easy_margin, straight_through=straight_through)

    def target_grad(cos: Tensor) -> Tensor:
        return _arcface_slope(cos, margin, easy_margin, straight_through)

    return margin_softmax_loss(
        embeddings, weight, labels, target_fn, target_grad=target_grad, scale=scale, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


def cosface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.35,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""CosFace loss from embeddings and class weights; see :class:`marginloss.CosFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16), torch.randn(100, 16)
    >>> cosface(x, w, torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """
    scale, margin = _check_cosface_args(scale, margin)
    return margin_softmax_loss(
        embeddings, weight, labels, lambda cos: cosface_target(cos, margin), target_grad=_unit_slope,
        scale=scale,
        reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index,
        chunk_size=chunk_size,
    )


def combined_margin(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""Combined-margin loss; see :class:`marginloss.CombinedMargin`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16), torch.randn(100, 16)
    >>> combined_margin(x, w, torch.randint(0, 100, (8,)), m1=1.0, m2=0.3, m3=0.2).shape
    torch.Size([])
    """
    scale, m1, m2, m3 = _check_combined_args(scale, m1, m2, m3)
    return margin_softmax_loss(
        embeddings, weight, labels, lambda cos: combined_margin_target(cos, m1, m2, m3),
        target_grad=lambda cos: _combined_margin_slope(cos, m1, m2), scale=scale, reduction=reduction, label_smoothing=label_smoothing,
        ignore_index=ignore_index, chunk_size=chunk_size,
    )


def normface(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 16.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: ChunkSize = "auto",
) -> Tensor:
    r"""NormFace (normalised softmax) loss; see :class:`marginloss.NormFace`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16), torch.randn(100, 16)
    >>> normface(x, w, torch.randint(0, 100, (8,))).shape
    torch.Size([])
    """
    scale = _check_scale(scale)
    return margin_softmax_loss(
        embeddings, weight, labels, lambda cos: cos, target_grad=_unit_slope, scale=scale,
        reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


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
    margin = _check_int_margin(margin)
    _check_lambda(lambda_)
    return margin_softmax_loss(
        embeddings, weight, labels, lambda cos: sphereface_target(cos, margin, lambda_),
        target_grad=lambda cos: _sphereface_slope(cos, margin, lambda_), scale=1.0, normalize_embeddings=False, normalize_weight=True, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )


def lsoftmax(
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
    r"""L-Softmax loss at annealing weight ``lambda_``; see :class:`marginloss.LSoftmax`.

    Examples
    --------
    >>> import torch
    >>> x, w = torch.randn(8, 16), torch.randn(100, 16)
    >>> lsoftmax(x, w, torch.randint(0, 100, (8,)), margin=2).shape
    torch.Size([])
    """
    margin = _check_int_margin(margin)
    _check_lambda(lambda_)
    return margin_softmax_loss(
        embeddings, weight, labels, lambda cos: lsoftmax_target(cos, margin, lambda_),
        target_grad=lambda cos: _sphereface_slope(cos, margin, lambda_), scale=1.0, normalize_embeddings=False, normalize_weight=False, reduction=reduction,
        label_smoothing=label_smoothing, ignore_index=ignore_index, chunk_size=chunk_size,
    )
