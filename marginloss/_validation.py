"""Argument and tensor checks shared by every public entry point.

Shape, dtype and hyperparameter checks are free and always run.  Checks on tensor
*values* (label range, finiteness) need a device-to-host synchronisation; they run by
default and can be switched off globally with :func:`~marginloss.set_validation` (in the spirit of
``torch.distributions.Distribution.set_default_validate_args``).  They are also skipped
while ``torch.compile`` traces, where a data-dependent ``raise`` cannot be expressed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["set_validation", "validation", "validation_enabled"]

_VALIDATE = True


def set_validation(enabled: bool) -> None:
    """Switch the value checks (label range, finite embeddings and weights) on or off process-wide.

    What the switch removes: on an accelerator, the one device synchronisation per call that
    checks embeddings and weight rows for NaN/inf and labels for their range; the range check
    of ``*_logits`` cosines.  What it keeps: every shape, dtype and hyperparameter check, and
    the label-range check of labels on the CPU (it needs no synchronisation).  With the checks
    off, a label outside ``[0, num_classes)`` that is not ``ignore_index`` gives its row a NaN
    loss (never the loss of another class), and non-finite inputs propagate as NaN.

    Parameters
    ----------
    enabled : bool
        ``True`` (the default state) checks tensor values on every call, which costs one
        device synchronisation per call on CUDA; ``False`` skips them.

    Examples
    --------
    >>> import marginloss
    >>> marginloss.set_validation(False)
    >>> marginloss.validation_enabled()
    False
    >>> marginloss.set_validation(True)
    """
    global _VALIDATE
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _VALIDATE = enabled


def validation_enabled() -> bool:
    """Whether value checks that need a device synchronisation are on (see :func:`~marginloss.set_validation`)."""
    return _VALIDATE


@contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager that sets :func:`~marginloss.set_validation` for a block and restores it after.

    Examples
    --------
    >>> import marginloss
    >>> with marginloss.validation(False):
    ...     marginloss.validation_enabled()
    False
    """
    previous = _VALIDATE
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


def _check_values() -> bool:
    return _VALIDATE and not torch.compiler.is_compiling()


def values_checked(*tensors: torch.Tensor | None) -> bool:
    """Whether value checks run for these tensors: validation on, not tracing, and no tensor
    on the ``meta`` device (which has shapes but no values, as model-size tools use)."""
    return _check_values() and not any(t is not None and t.device.type == "meta" for t in tensors)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_int64(name: str, value: object) -> int:
    """Check an integer argument fits an int64 (it is compared with int64 tensors)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name} must fit in int64, i.e. lie in [-2**63, 2**63 - 1], got {value!r}")
    return value


def labels_checked(labels: torch.Tensor) -> bool:
    """Whether :func:`check_inputs_values` checks the range of these labels: always on the
    CPU (no synchronisation needed), elsewhere when value checks are on."""
    if torch.compiler.is_compiling():
        return False
    return labels.device.type == "cpu" or values_checked(labels)


def check_inputs_values(
    embeddings: torch.Tensor,
    weight_norms: torch.Tensor | None,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int,
) -> None:
    """The value checks of a head's forward in one device synchronisation.

    Non-finite embeddings, weight rows with a non-finite norm (NaN/inf entries, or entries so
    large that the norm overflows) and labels outside ``[0, num_classes)`` that are not
    ``ignore_index``.  On the CPU the label check always runs (it costs no synchronisation);
    elsewhere all of them follow :func:`~marginloss.set_validation`.
    """
    checked = values_checked(embeddings, weight_norms, labels)
    if not checked and not labels_checked(labels):
        return
    # The usual case in one synchronisation and a handful of operations: the label range and
    # two sums that are finite when every entry is (an overflowing sum of finite values only
    # sends the call to the exact count below).
    quick = list(torch.aminmax(labels.masked_fill(labels == ignore_index, 0))) if labels.numel() else []
    if checked:
        quick.append(embeddings.sum())
        if weight_norms is not None:
            quick.append(weight_norms.sum())
    if quick:
        if labels.device.type == "cpu" and (embeddings.device.type == "cpu" or not checked):
            values = [value.item() for value in quick]  # no synchronisation: cheaper one by one
        else:
            values = torch.stack([value.to(torch.float64) for value in quick]).tolist()
        labels_fine = not labels.numel() or (values[0] >= 0 and values[1] < num_classes)
        if labels_fine and all(math.isfinite(value) for value in values[2:]):
            return
    elif not checked:
        return
    bad_labels = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    counts = [bad_labels.sum()]
    if checked:
        counts.append((~torch.isfinite(embeddings)).sum())
        if weight_norms is not None:
            counts.append((~torch.isfinite(weight_norms)).sum())
    values = torch.stack(counts).tolist()
    if values[0]:
        bad = labels[bad_labels]
        raise ValueError(
            f"labels must be in [0, {num_classes}) (num_classes={num_classes}) or equal "
            f"ignore_index={ignore_index}, got {bad.numel()} value(s) outside, e.g. {bad[:5].tolist()}"
        )
    if checked and values[1]:
        raise ValueError(
            f"embeddings must be finite, got {values[1]} NaN/inf value(s) in a tensor of shape "
            f"{tuple(embeddings.shape)}"
        )
    if checked and weight_norms is not None and values[2]:
        raise ValueError(
            f"weight must be finite, got {values[2]} of {weight_norms.numel()} row(s) with a NaN/inf "
            f"entry or a norm that overflows {weight_norms.dtype} (an optimizer step that blew up?)"
        )


# ---------------------------------------------------------------- hyperparameters


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check a finite real hyperparameter lies in a range and return it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if not math.isfinite(value) or not lo_ok or not hi_ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return str(value)


def check_chunk_size(chunk_size: object) -> int | str | None:
    if chunk_size is None or chunk_size == "auto":
        return chunk_size  # type: ignore[return-value]
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"chunk_size must be a positive int, 'auto' or None, got {type(chunk_size).__name__} "
            f"{chunk_size!r}"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")
    return chunk_size


# ---------------------------------------------------------------- tensors


def check_embeddings(
    embeddings: object, embedding_dim: int | None = None, name: str = "embeddings", *, check_values: bool = True
) -> torch.Tensor:
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(
            f"{name} must have shape [batch, embedding_dim], got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {embeddings.dtype}")
    if embedding_dim is not None and embeddings.shape[1] != embedding_dim:
        raise ValueError(
            f"{name} must have shape [batch, {embedding_dim}] (embedding_dim={embedding_dim}), "
            f"got shape {tuple(embeddings.shape)}"
        )
    # A finite sum is the usual case and one cheap reduction; only an inf/NaN sum (or one that
    # overflows) pays for the exact elementwise test.
    if (
        check_values and values_checked(embeddings) and embeddings.numel() > 0
        and not math.isfinite(float(embeddings.detach().sum())) and not bool(torch.isfinite(embeddings).all())
    ):
        bad = int((~torch.isfinite(embeddings)).sum())
        raise ValueError(
            f"{name} must be finite, got {bad} NaN/inf value(s) in a tensor of shape "
            f"{tuple(embeddings.shape)}"
        )
    return embeddings


def check_labels(
    labels: object,
    batch_size: int,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    name: str = "labels",
) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 class indices, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor (int64 class indices), got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != batch_size:
        raise ValueError(
            f"{name} must have shape [{batch_size}] to match embeddings' batch size, "
            f"got shape {tuple(labels.shape)}"
        )
    if ignore_index is not None:
        check_int64("ignore_index", ignore_index)
    if num_classes is not None and values_checked(labels) and labels.numel() > 0:
        valid = (labels >= 0) & (labels < num_classes)
        if ignore_index is not None:
            valid |= labels == ignore_index
        if not bool(valid.all()):
            bad = labels[~valid]
            raise ValueError(
                f"{name} must be in [0, {num_classes}) (num_classes={num_classes})"
                + (f" or equal ignore_index={ignore_index}" if ignore_index is not None else "")
                + f", got {bad.numel()} value(s) outside, e.g. {bad[:5].tolist()}"
            )
    return labels.long()


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        described = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {described}")
