"""SoftTriple loss (Qian, Shang, Sun, Hu, Li & Jin, ICCV 2019): :func:`soft_triple_loss`, :class:`SoftTripleLoss`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginloss._validation import (
    _check_values,
    check_choice,
    check_embeddings,
    check_float,
    check_labels,
    check_positive_int,
    check_same_device,
)
from marginloss.losses._common import REDUCTIONS, _reduce
from marginloss.miners import _at_least_float32, _autocast_disabled, _unit_rows

__all__ = ["SoftTripleLoss", "soft_triple_loss"]


def soft_triple_loss(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    *,
    centers_per_class: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    tau: float = 0.2,
    reduction: str = "mean",
) -> Tensor:
    r"""SoftTriple loss: a softmax over classes, each class a soft maximum over K centres.

    With unit embeddings :math:`\hat x_i`, unit centres :math:`\hat w_c^t`
    (:math:`t = 1..K`) and

    .. math::

        S_{i,c} = \sum_{t=1}^{K} \frac{e^{\hat x_i^\top \hat w_c^t / \gamma}}
                  {\sum_{s} e^{\hat x_i^\top \hat w_c^s / \gamma}}\; \hat x_i^\top \hat w_c^t,

        \ell_i = -\log \frac{e^{\lambda (S_{i,y_i} - \delta)}}
                 {e^{\lambda (S_{i,y_i} - \delta)} + \sum_{c \ne y_i} e^{\lambda S_{i,c}}},
        \qquad
        R = \frac{1}{C K (K - 1)} \sum_{c=1}^{C} \sum_{t < s}
            \lVert \hat w_c^t - \hat w_c^s \rVert_2

    the loss of sample :math:`i` is :math:`\ell_i + \tau R`.  From Qian, Shang, Sun, Hu, Li &
    Jin, "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling", ICCV 2019 (their
    Eqs. 8, 9 and the adaptive-centre regulariser of Sec. 3.4, which
    pytorch-metric-learning's ``SoftTripleLoss`` leaves out).  The regulariser pulls the
    centres of a class together so that superfluous ones merge.

    ``"mean"`` is :math:`\frac1B \sum_i \ell_i + \tau R` (the paper's objective; an empty
    batch gives :math:`\tau R`); ``"none"`` returns :math:`\ell_i + \tau R` per sample, so
    ``"sum"`` is :math:`\sum_i \ell_i + B \tau R`.  Norms are taken safely (scaled first),
    a zero embedding or centre stays zero, and coincident centres give the regulariser a
    zero (sub)gradient instead of an infinite one.  The gradient reaches ``weight`` if it
    requires grad.  Memory: the ``[B, C K]`` similarities and ``[C, K, K]`` centre Gram.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite (normalised inside).
    labels : Tensor
        ``[B]`` integer class indices in ``[0, C)``.
    weight : Tensor
        ``[C * K, D]`` centres, finite; row ``c * K + t`` is centre :math:`t` of class
        :math:`c` (normalised inside).
    centers_per_class : int, default 10
        :math:`K`, the paper's value.
    la : float, default 20.0
        :math:`\lambda > 0`, the scale of the class similarities (paper: 20).
    gamma : float, default 0.1
        :math:`\gamma > 0`, the temperature of the soft maximum over centres (paper: 0.1).
    margin : float, default 0.01
        :math:`\delta \ge 0` on the target similarity (paper: 0.01).
    tau : float, default 0.2
        :math:`\tau \ge 0`, weight of the centre regulariser (paper: 0.2).
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.

    Returns
    -------
    Tensor
        Scalar, or ``[B]`` for ``"none"``; at least ``float32``.

    Raises
    ------
    TypeError
        If a tensor has the wrong type or dtype, or a hyperparameter has the wrong type.
    ValueError
        If shapes do not match (``weight`` must have ``C * centers_per_class`` rows),
        ``embeddings`` or ``weight`` is not finite, a label is outside ``[0, C)``, or a
        hyperparameter is out of range.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - weight: :math:`(C K, D)`
        - output: :math:`()`, or :math:`(B)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss.losses import soft_triple_loss
    >>> _ = torch.manual_seed(0)
    >>> weight = torch.randn(3 * 2, 8, requires_grad=True)  # 3 classes, 2 centres each
    >>> embeddings = torch.randn(4, 8, requires_grad=True)
    >>> labels = torch.tensor([0, 1, 2, 2])
    >>> loss = soft_triple_loss(embeddings, labels, weight, centers_per_class=2)
    >>> loss.backward()
    >>> weight.grad.shape
    torch.Size([6, 8])
    """
    args = _check_soft_triple_args(centers_per_class, la, gamma, margin, tau, reduction)
    weight = _check_weight(weight, args[0])
    embeddings, labels = _check_soft_triple_inputs(embeddings, labels, weight, args[0])
    return _soft_triple_loss(embeddings, labels, weight, *args)


def _check_soft_triple_args(
    centers_per_class: object,
    la: object,
    gamma: object,
    margin: object,
    tau: object,
    reduction: object,
) -> tuple[int, float, float, float, float, str]:
    return (
        check_positive_int("centers_per_class", centers_per_class),
        check_float("la", la, low=0.0, low_open=True),
        check_float("gamma", gamma, low=0.0, low_open=True),
        check_float("margin", margin, low=0.0),
        check_float("tau", tau, low=0.0),
        check_choice("reduction", reduction, REDUCTIONS),
    )


def _check_weight(weight: object, centers_per_class: int) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() != 2 or weight.shape[0] % centers_per_class or weight.shape[0] == 0:
        raise ValueError(
            "weight must have shape [num_classes * centers_per_class, embedding_dim] "
            f"(centers_per_class={centers_per_class}), got shape {tuple(weight.shape)}"
        )
    if _check_values() and weight.device.type != "meta":
        bad_rows = (~torch.isfinite(weight.detach())).any(dim=1)
        if bool(bad_rows.any()):
            rows = bad_rows.nonzero().squeeze(1)
            raise ValueError(
                f"weight must be finite, got {rows.numel()} of {weight.shape[0]} centre row(s) "
                f"with NaN/inf values (e.g. rows {rows[:5].tolist()})"
            )
    return weight


def _check_soft_triple_inputs(
    embeddings: object, labels: object, weight: Tensor, centers_per_class: int
) -> tuple[Tensor, Tensor]:
    checked = check_embeddings(embeddings, embedding_dim=weight.shape[1])
    num_classes = weight.shape[0] // centers_per_class
    checked_labels = check_labels(labels, checked.shape[0], num_classes=num_classes)
    check_same_device(embeddings=checked, labels=checked_labels, weight=weight)
    return checked, checked_labels


def _soft_triple_loss(
    embeddings: Tensor,
    labels: Tensor,
    weight: Tensor,
    centers_per_class: int,
    la: float,
    gamma: float,
    margin: float,
    tau: float,
    reduction: str,
) -> Tensor:
    num_centres, _ = weight.shape
    num_classes = num_centres // centers_per_class
    with _autocast_disabled(embeddings.device):
        dtype = torch.promote_types(_at_least_float32(embeddings).dtype, weight.dtype)
        dtype = torch.promote_types(dtype, torch.float32)
        unit = _unit_rows(embeddings.to(dtype))
        centres = _unit_rows(weight.to(dtype))
        similarity = (unit @ centres.T).reshape(-1, num_classes, centers_per_class)
        soft_max_weight = torch.softmax(similarity / gamma, dim=2)
        class_similarity = (soft_max_weight * similarity).sum(dim=2)
        target_margin = F.one_hot(labels, num_classes).to(dtype) * margin
        logits = la * (class_similarity - target_margin)
        losses = F.cross_entropy(logits, labels, reduction="none")
        regulariser = tau * _centre_spread(centres, num_classes, centers_per_class) if tau else None
        if regulariser is not None:
            losses = losses + regulariser
        if reduction == "mean" and losses.numel() == 0 and regulariser is not None:
            return regulariser + embeddings.sum() * 0
        return _reduce(losses, reduction)


def _centre_spread(centres: Tensor, num_classes: int, centers_per_class: int) -> Tensor:
    """The paper's R: sum over classes of the distances of its centre pairs t < s, over C K (K-1)."""
    if centers_per_class < 2:
        return centres.sum() * 0
    per_class = centres.reshape(num_classes, centers_per_class, -1)
    gram = per_class @ per_class.transpose(1, 2)
    norms = per_class.pow(2).sum(dim=2)
    squared = (norms[:, :, None] + norms[:, None, :] - 2 * gram).clamp_min(0.0)
    upper = torch.triu(
        torch.ones(centers_per_class, centers_per_class, dtype=torch.bool, device=centres.device),
        diagonal=1,
    )
    nonzero = (squared > 0) & upper
    distance = torch.where(nonzero, torch.where(nonzero, squared, 1.0).sqrt(), 0.0)
    return distance.sum() / (num_classes * centers_per_class * (centers_per_class - 1))


class SoftTripleLoss(nn.Module):
    r"""SoftTriple loss with learned centres (K per class) and the centre regulariser.

    .. math::

        \mathcal L = \frac1B \sum_i -\log \frac{e^{\lambda (S_{i,y_i} - \delta)}}
        {e^{\lambda (S_{i,y_i} - \delta)} + \sum_{c \ne y_i} e^{\lambda S_{i,c}}}
        + \tau R

    From Qian, Shang, Sun, Hu, Li & Jin, ICCV 2019; see :func:`soft_triple_loss` for
    :math:`S`, :math:`R` and the reductions.  For inference, compare embeddings directly
    (cosine): the centres only shape the training.

    Parameters
    ----------
    embedding_dim : int
        Size :math:`D` of each embedding.
    num_classes : int
        Number of classes :math:`C`.
    centers_per_class : int, default 10
        :math:`K` (paper: 10).
    la : float, default 20.0
        :math:`\lambda` (paper: 20).
    gamma : float, default 0.1
        :math:`\gamma` (paper: 0.1).
    margin : float, default 0.01
        :math:`\delta` (paper: 0.01).
    tau : float, default 0.2
        :math:`\tau` (paper: 0.2).
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``.
    device, dtype : optional
        Factory arguments for ``weight``, as in :class:`torch.nn.Linear`.

    Attributes
    ----------
    weight : Parameter
        ``[num_classes * centers_per_class, embedding_dim]``, row ``c * K + t`` centre
        :math:`t` of class :math:`c`; initialised as :class:`torch.nn.Linear`'s weight
        (Kaiming uniform, the authors' release does the same on its transposed layout).

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`, integers in :math:`[0, C)`
        - output: :math:`()`, or :math:`(B)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss import losses
    >>> _ = torch.manual_seed(0)
    >>> criterion = losses.SoftTripleLoss(embedding_dim=16, num_classes=4, centers_per_class=3)
    >>> criterion
    SoftTripleLoss(embedding_dim=16, num_classes=4, centers_per_class=3, la=20.0, gamma=0.1, margin=0.01, tau=0.2, reduction='mean')
    >>> embeddings = torch.randn(8, 16, requires_grad=True)
    >>> criterion(embeddings, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).backward()
    >>> criterion.weight.grad.shape
    torch.Size([12, 16])
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        tau: float = 0.2,
        reduction: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        self.num_classes = check_positive_int("num_classes", num_classes)
        (
            self.centers_per_class,
            self.la,
            self.gamma,
            self.margin,
            self.tau,
            self.reduction,
        ) = _check_soft_triple_args(centers_per_class, la, gamma, margin, tau, reduction)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.weight = nn.Parameter(
            torch.empty(
                num_classes * self.centers_per_class, embedding_dim, device=device, dtype=dtype
            )
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the centres again (Kaiming uniform, as :class:`torch.nn.Linear`)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """SoftTriple loss of the batch (see :func:`soft_triple_loss`)."""
        weight = _check_weight(self.weight, self.centers_per_class)
        embeddings, labels = _check_soft_triple_inputs(
            embeddings, labels, weight, self.centers_per_class
        )
        return _soft_triple_loss(
            embeddings, labels, weight, self.centers_per_class, self.la, self.gamma,
            self.margin, self.tau, self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
            f"margin={self.margin}, tau={self.tau}, reduction={self.reduction!r}"
        )
