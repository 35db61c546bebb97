"""Argument and tensor checks shared by every public entry point.

Shape, dtype and hyperparameter checks are free and always run.  Checks on tensor
*values* (label range, finiteness) need a device-to-host synchronisation; they run by
default and can be switched off globally with :func:`set_validation` (in the spirit of
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
    """Switch the value checks (label range, finite embeddings) on or off process-wide.

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
    """Whether value checks that need a device synchronisation are on (see :func:`set_validation`)."""
    return _VALIDATE


@contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager that sets :func:`set_validation` for a block and restores it after.

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


def check_embeddings(embeddings: object, embedding_dim: int | None = None, name: str = "embeddings") -> torch.Tensor:
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
    if _check_values() and embeddings.numel() > 0 and not bool(torch.isfinite(embeddings).all()):
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
    if num_classes is not None and _check_values() and labels.numel() > 0:
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
