r"""Schedules of a head's hyperparameters over training steps.

:class:`MarginWarmup` ramps a head's margin linearly from a start value (0 by default) to
the value the head was built with, over the first ``steps`` optimizer steps.  It is the
usual cure when a margin head trained from scratch does not converge (the loss stays near
:math:`\log C`, or the accuracy lags far behind a plain softmax): the first steps see an
easy, margin-free problem and the margin grows as the classes separate.  See the
troubleshooting section of the training guide.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from marginloss import _validation as V

__all__ = ["MarginWarmup"]


class MarginWarmup:
    r"""Step a head's margin attribute linearly from ``start`` to its built value.

    After :math:`k` calls of :meth:`step`,

    .. math::
        m_k = m_0 + (m_\text{end} - m_0)\,\min(k / N, 1),

    with :math:`m_0` = ``start``, :math:`N` = ``steps`` and :math:`m_\text{end}` the value
    the attribute held when the schedule was created.  Creating the schedule sets the
    attribute to ``start`` at once; call :meth:`step` once per optimizer step (after
    ``optimizer.step()``, like a learning-rate scheduler).  Its position is in
    :meth:`state_dict`: save it beside the head's and restore it with
    :meth:`load_state_dict` to resume a run (a head's float margin is a hyperparameter,
    not part of the head's ``state_dict``).

    Works with any head whose margin is a plain ``float`` attribute (ArcFace and CosFace
    ``margin``, CombinedMargin ``m2``/``m3`` (``m1`` with ``start=1.0``), a user-defined
    head's) or a floating tensor attribute that does not require grad (a buffer); the value
    is written in place.  Attributes the head checks only in its constructor are not
    re-checked: keep ``start`` in the head's valid range.

    Parameters
    ----------
    head : object
        The head whose attribute is scheduled (any object with the attribute).
    steps : int
        :math:`N`, the number of :meth:`step` calls over which the value ramps, at least 1.
    attribute : str, default "margin"
        The name of the attribute.
    start : float, default 0.0
        :math:`m_0`, the value at step 0 (0: no margin, the normalised softmax for ArcFace
        and CosFace).

    Examples
    --------
    >>> import marginloss
    >>> head = marginloss.ArcFace(16, 100, margin=0.5)
    >>> warmup = marginloss.MarginWarmup(head, steps=4)
    >>> head.margin
    0.0
    >>> for _ in range(2):
    ...     warmup.step()
    >>> head.margin
    0.25
    >>> state = warmup.state_dict()
    >>> resumed = marginloss.MarginWarmup(marginloss.ArcFace(16, 100, margin=0.5), steps=4)
    >>> resumed.load_state_dict(state)
    >>> resumed.value
    0.25
    """

    def __init__(self, head: Any, steps: int, attribute: str = "margin", start: float = 0.0) -> None:
        if not isinstance(attribute, str) or not attribute:
            raise ValueError(f"attribute must be a non-empty str, got {attribute!r}")
        if not hasattr(head, attribute):
            raise ValueError(
                f"attribute must name a margin attribute of the head, but {type(head).__name__} has no "
                f"attribute {attribute!r} (margins are named e.g. 'margin', or 'm1'/'m2'/'m3' for CombinedMargin)"
            )
        current = getattr(head, attribute)
        if isinstance(current, Tensor):
            if current.numel() != 1 or not current.is_floating_point():
                raise ValueError(
                    f"attribute {attribute!r} of {type(head).__name__} must be a float or a one-element floating "
                    f"tensor, got a tensor of shape {tuple(current.shape)} and dtype {current.dtype}"
                )
            if current.requires_grad:
                raise ValueError(
                    f"attribute {attribute!r} of {type(head).__name__} is a learnable parameter (requires_grad): "
                    f"the optimiser owns its value, a warm-up cannot schedule it"
                )
            end = float(current.detach())
        elif isinstance(current, (int, float)) and not isinstance(current, bool):
            end = float(current)
        else:
            raise ValueError(
                f"attribute {attribute!r} of {type(head).__name__} must be a float or a one-element floating "
                f"tensor, got {type(current).__name__}"
            )
        if not math.isfinite(end):
            raise ValueError(f"attribute {attribute!r} of {type(head).__name__} must be finite, got {end!r}")
        self.head = head
        self.attribute = attribute
        self.steps = V.check_positive_int("steps", steps)
        self.start = V.check_float("start", start)
        self.end = end
        self.step_count = 0
        self._apply()

    @property
    def value(self) -> float:
        """The scheduled value at the current step."""
        fraction = min(self.step_count / self.steps, 1.0)
        if fraction >= 1.0:
            return self.end
        return self.start + (self.end - self.start) * fraction

    @property
    def finished(self) -> bool:
        """Whether the value has reached its end (``step_count >= steps``)."""
        return self.step_count >= self.steps

    def _apply(self) -> None:
        value = self.value
        current = getattr(self.head, self.attribute)
        if isinstance(current, Tensor):
            with torch.no_grad():
                current.fill_(value)
        else:
            setattr(self.head, self.attribute, value)

    def step(self) -> None:
        """Advance one step and write the new value into the head."""
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position and settings (plain Python values)."""
        return {
            "step_count": self.step_count, "steps": self.steps, "attribute": self.attribute,
            "start": self.start, "end": self.end,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: restores the position and writes the value.

        The saved ``steps``, ``attribute``, ``start`` and ``end`` must match this
        schedule's (a checkpoint of another schedule raises ``ValueError``).
        """
        if not isinstance(state_dict, dict) or "step_count" not in state_dict:
            raise ValueError(f"state_dict must be a MarginWarmup.state_dict(), got {state_dict!r}")
        mine = self.state_dict()
        for key in ("steps", "attribute", "start", "end"):
            if key in state_dict and state_dict[key] != mine[key]:
                raise ValueError(
                    f"state_dict holds a schedule with {key}={state_dict[key]!r}, but this one has "
                    f"{key}={mine[key]!r}"
                )
        step_count = state_dict["step_count"]
        if isinstance(step_count, bool) or not isinstance(step_count, int) or step_count < 0:
            raise ValueError(f"state_dict['step_count'] must be a non-negative int, got {step_count!r}")
        self.step_count = step_count
        self._apply()

    def __repr__(self) -> str:
        return (
            f"MarginWarmup({type(self.head).__name__}, steps={self.steps}, attribute={self.attribute!r}, "
            f"start={self.start!r}, end={self.end!r}, step_count={self.step_count})"
        )

