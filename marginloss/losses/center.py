"""Center loss (Wen, Zhang, Li & Qiao, ECCV 2016): :func:`center_loss` and :class:`CenterLoss`."""

from __future__ import annotations

import torch
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
from marginloss.miners import _at_least_float32, _autocast_disabled

__all__ = ["CenterLoss", "center_loss"]

# ---------------------------------------------------------------- center loss


def center_loss(
    embeddings: Tensor, labels: Tensor, centers: Tensor, *, reduction: str = "mean"
) -> Tensor:
    r"""Center loss: half the squared distance of each embedding to its class center.

    .. math::

        \ell_i = \tfrac12 \lVert x_i - c_{y_i} \rVert_2^2, \qquad
        \mathcal{L}_\text{mean} = \frac{1}{B} \sum_{i=1}^{B} \ell_i

    From Wen, Zhang, Li & Qiao, "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016.  ``reduction="mean"`` is the mean over the samples of the half
    squared distance (the paper's sum divided by the batch size); ``"sum"`` is the paper's
    :math:`\tfrac12 \sum_i \lVert x_i - c_{y_i} \rVert^2`; ``"none"`` returns every
    :math:`\ell_i`.  An empty batch gives 0 for ``"mean"`` and ``"sum"``.  The gradient flows
    into ``embeddings`` and, if it requires grad, into ``centers`` (Wen et al.'s alternative
    center update lives in :class:`~marginloss.CenterLoss`).  Computed in at least ``float32``, also under
    autocast.

    Parameters
    ----------
    embeddings : Tensor
        ``[B, D]`` floating-point embeddings, finite.
    labels : Tensor
        ``[B]`` integer class indices in ``[0, C)``.
    centers : Tensor
        ``[C, D]`` floating-point class centers, finite.
    reduction : str, default "mean"
        ``"mean"``, ``"sum"`` or ``"none"``, as in :func:`torch.nn.functional.mse_loss`.

    Returns
    -------
    Tensor
        Scalar for ``"mean"``/``"sum"``, ``[B]`` for ``"none"``; dtype is the promoted dtype of
        ``embeddings`` and ``centers``, at least ``float32``.

    Raises
    ------
    TypeError
        If ``embeddings`` or ``centers`` is not a floating-point tensor or ``labels`` not an
        integer tensor.
    ValueError
        If shapes do not match, ``embeddings`` or ``centers`` is not finite (value checks,
        see :func:`marginloss.set_validation`; the message names the bad center rows), a label
        is outside ``[0, C)``,
        the tensors are on different devices, or ``reduction`` is unknown.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`
        - centers: :math:`(C, D)`
        - output: :math:`()`, or :math:`(B)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss.losses import center_loss
    >>> centers = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    >>> embeddings = torch.tensor([[3.0, 4.0], [1.0, 2.0]], requires_grad=True)
    >>> labels = torch.tensor([0, 1])
    >>> center_loss(embeddings, labels, centers, reduction="none")  # 25 / 2 and 1 / 2
    tensor([12.5000,  0.5000], grad_fn=<MulBackward0>)
    >>> loss = center_loss(embeddings, labels, centers)  # (12.5 + 0.5) / 2
    >>> loss.backward()
    >>> embeddings.grad  # (x_i - c_{y_i}) / B
    tensor([[1.5000, 2.0000],
            [0.0000, 0.5000]])
    """
    centers = _check_centers(centers)
    embeddings, labels = _check_center_inputs(embeddings, labels, centers)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    return _center_loss(embeddings, labels, centers, reduction)


def _check_centers(centers: object) -> Tensor:
    if not isinstance(centers, Tensor):
        raise TypeError(f"centers must be a torch.Tensor, got {type(centers).__name__}")
    if centers.dim() != 2:
        raise ValueError(
            f"centers must have shape [num_classes, embedding_dim], got shape {tuple(centers.shape)}"
        )
    if not centers.is_floating_point():
        raise TypeError(f"centers must be a floating-point tensor, got dtype {centers.dtype}")
    return centers


def _check_centers_finite(centers: Tensor) -> None:
    """Under the validation switch: a NaN/inf center (e.g. after a diverged optimizer step)."""
    if _check_values() and centers.numel() > 0 and centers.device.type != "meta":
        bad_rows = (~torch.isfinite(centers.detach())).any(dim=1)
        if bool(bad_rows.any()):
            rows = bad_rows.nonzero().squeeze(1)
            raise ValueError(
                f"centers must be finite, got {rows.numel()} of {centers.shape[0]} row(s) with "
                f"NaN/inf values (e.g. classes {rows[:5].tolist()}); the centers diverged or "
                "were loaded from a broken checkpoint"
            )


def _check_center_inputs(
    embeddings: object, labels: object, centers: Tensor
) -> tuple[Tensor, Tensor]:
    num_classes, embedding_dim = centers.shape
    checked = check_embeddings(embeddings, embedding_dim=embedding_dim)
    checked_labels = check_labels(labels, checked.shape[0], num_classes=num_classes)
    check_same_device(embeddings=checked, labels=checked_labels, centers=centers)
    _check_centers_finite(centers)
    return checked, checked_labels


def _center_loss(embeddings: Tensor, labels: Tensor, centers: Tensor, reduction: str) -> Tensor:
    dtype = torch.promote_types(_at_least_float32(embeddings).dtype, centers.dtype)
    with _autocast_disabled(embeddings.device):
        diff = embeddings.to(dtype) - centers[labels].to(dtype)
        per_sample = 0.5 * diff.pow(2).sum(dim=1)
        return _reduce(per_sample, reduction)


@torch.no_grad()
def _update_centers_(centers: Tensor, embeddings: Tensor, labels: Tensor, alpha: float) -> None:
    """Wen et al.'s center step, in place: c_j -= alpha * sum_{y_i=j}(c_j - x_i) / (1 + n_j).

    Spread over samples: sample i adds -alpha (c_j - x_i) / (1 + n_j) to row j, so one
    index_add_ does every class at once (no loop over classes, no host sync; bincount would
    sync on CUDA to size its output).
    """
    num_classes = centers.shape[0]
    samples = embeddings.detach().to(centers.dtype)
    counts = torch.zeros(num_classes, dtype=centers.dtype, device=centers.device)
    counts.index_add_(0, labels, torch.ones_like(labels, dtype=centers.dtype))
    step = (centers[labels] - samples) / (1.0 + counts[labels]).unsqueeze(1)
    centers.index_add_(0, labels, step, alpha=-alpha)


class CenterLoss(nn.Module):
    r"""Center loss with learned or moving-average class centers.

    .. math::

        \mathcal{L} = \frac{1}{B} \sum_{i=1}^{B} \tfrac12 \lVert x_i - c_{y_i} \rVert_2^2

    From Wen, Zhang, Li & Qiao, "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016; see :func:`center_loss` for the loss and its reductions.  The
    centers are held ``[num_classes, embedding_dim]`` and updated in one of two ways:

    - ``alpha=None``: ``centers`` is an :class:`~torch.nn.Parameter` learned by the optimizer
      from the gradient of the loss.
    - ``alpha`` in ``(0, 1]``: ``centers`` is a buffer that gets no gradient and, after the
      loss is computed and only in training mode, takes the paper's step (their Eq. 4)

      .. math::

          \Delta c_j = \frac{\sum_{i:\, y_i = j} (c_j - x_i)}{1 + n_j}, \qquad
          c_j \leftarrow c_j - \alpha\, \Delta c_j

      where :math:`n_j` is the number of samples of class :math:`j` in the batch (classes
      absent from the batch do not move).  The step is vectorised (``index_add_``, no host
      synchronisation); on CUDA its float atomics make it non-deterministic in the last bits.

    The embeddings always receive the gradient of the loss and are never modified.

    Parameters
    ----------
    embedding_dim : int
        Size :math:`D` of each embedding.
    num_classes : int
        Number of classes :math:`C`.
    alpha : float or None, default None
        Center learning rate of the paper's update, in ``(0, 1]`` (the paper uses 0.5);
        ``None`` learns the centers by gradient instead.
    reduction : str, default "mean"
        ``"mean"`` (mean over samples of the half squared distance), ``"sum"`` or ``"none"``.
    device, dtype : optional
        Factory arguments for ``centers``, as in :class:`torch.nn.Linear`.

    Attributes
    ----------
    centers : Tensor
        ``[num_classes, embedding_dim]``, initialised from the standard normal
        :math:`\mathcal{N}(0, 1)` (see :meth:`reset_parameters`); a parameter or a buffer as
        described above, saved in the ``state_dict`` either way.

    Raises
    ------
    ValueError
        If ``embedding_dim`` or ``num_classes`` is not a positive int, ``alpha`` is outside
        ``(0, 1]``, or ``reduction`` is unknown.
    TypeError
        If ``alpha`` is not a real number or ``None``, or ``dtype`` is not floating point.

    Shape:
        - embeddings: :math:`(B, D)`
        - labels: :math:`(B)`, integers in :math:`[0, C)`
        - output: :math:`()`, or :math:`(B)` for ``reduction="none"``

    Examples
    --------
    >>> import torch
    >>> from marginloss import losses
    >>> _ = torch.manual_seed(0)
    >>> criterion = losses.CenterLoss(embedding_dim=4, num_classes=3, alpha=0.5)
    >>> criterion
    CenterLoss(embedding_dim=4, num_classes=3, alpha=0.5, reduction='mean')
    >>> embeddings = torch.randn(6, 4, requires_grad=True)
    >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
    >>> before = criterion.centers.clone()
    >>> loss = criterion(embeddings, labels)  # also moves the centers towards the batch
    >>> loss.backward()
    >>> bool((criterion.centers != before).all()), embeddings.grad.shape
    (True, torch.Size([6, 4]))
    >>> learned = losses.CenterLoss(4, 3)  # alpha=None: centers are a Parameter
    >>> [name for name, _ in learned.named_parameters()]
    ['centers']
    """

    centers: Tensor

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        alpha: float | None = None,
        reduction: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.alpha = (
            None if alpha is None else check_float("alpha", alpha, low=0.0, high=1.0, low_open=True)
        )
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        centers = torch.empty(num_classes, embedding_dim, device=device, dtype=dtype)
        if self.alpha is None:
            self.centers = nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the centers again from the standard normal :math:`\\mathcal{N}(0, 1)`."""
        with torch.no_grad():
            self.centers.normal_()

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Loss of ``embeddings`` against their class centers (see :func:`center_loss`).

        With ``alpha`` set and in training mode, the centers take one update step after the
        loss is computed; the returned loss uses the centers from before the step.  With
        value checks on (:func:`marginloss.set_validation`), NaN/inf centers (a diverged
        step, a broken checkpoint) raise a ``ValueError`` naming how many rows are bad.
        """
        embeddings, labels = _check_center_inputs(embeddings, labels, self.centers)
        loss = _center_loss(embeddings, labels, self.centers, self.reduction)
        if self.alpha is not None and self.training:
            _update_centers_(self.centers, embeddings, labels, self.alpha)
        return loss

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"alpha={self.alpha}, reduction={self.reduction!r}"
        )


