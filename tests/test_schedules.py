"""MarginWarmup: values over steps, resume from a checkpoint, the heads it works with, errors."""

from __future__ import annotations

import io

import pytest
import torch

import marginloss
from tests.reference import assert_close, head_loss


def test_linear_values_over_steps() -> None:
    head = marginloss.ArcFace(4, 10, margin=0.5)
    warmup = marginloss.MarginWarmup(head, steps=4)
    seen = [head.margin]
    for _ in range(6):
        warmup.step()
        seen.append(head.margin)
    assert seen == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert warmup.finished and warmup.value == 0.5
    assert "steps=4" in repr(warmup) and "step_count=6" in repr(warmup)


def test_start_value_and_decreasing_schedule() -> None:
    head = marginloss.CombinedMargin(4, 10, m1=1.35, m2=0.0, m3=0.0)
    warmup = marginloss.MarginWarmup(head, steps=2, attribute="m1", start=1.0)
    assert head.m1 == 1.0
    warmup.step()
    assert abs(head.m1 - 1.175) < 1e-12
    warmup.step()
    assert head.m1 == 1.35


def test_resume_from_state_dict_through_torch_save() -> None:
    head = marginloss.CosFace(4, 10, margin=0.4)
    warmup = marginloss.MarginWarmup(head, steps=10)
    for _ in range(3):
        warmup.step()
    buffer = io.BytesIO()
    torch.save({"head": head.state_dict(), "warmup": warmup.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = marginloss.CosFace(4, 10, margin=0.4)  # built with its full margin, as a script would
    resumed = marginloss.MarginWarmup(fresh, steps=10)
    resumed.load_state_dict(saved["warmup"])
    assert fresh.margin == head.margin == pytest.approx(0.12)
    for _ in range(7):
        warmup.step()
        resumed.step()
        assert fresh.margin == head.margin
    assert fresh.margin == 0.4
    with pytest.raises(ValueError, match="steps=10"):
        marginloss.MarginWarmup(marginloss.CosFace(4, 10, margin=0.4), steps=5).load_state_dict(saved["warmup"])
    with pytest.raises(ValueError, match="step_count"):
        resumed.load_state_dict({**saved["warmup"], "step_count": -1})


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_loss_follows_the_scheduled_margin(name: str) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 9, (6,))
    head = marginloss.create_head(name, 4, 9, scale=8.0, margin=0.4, dtype=torch.float64, chunk_size=3)
    with torch.no_grad():
        head.weight.copy_(w)
    warmup = marginloss.MarginWarmup(head, steps=4)
    assert_close(head(x, y), head_loss("normface", x, w, y, {"scale": 8.0}), rtol=1e-12, atol=1e-12, what="start")
    warmup.step()
    warmup.step()
    expected = head_loss(name, x, w, y, {"scale": 8.0, "margin": 0.2})
    assert_close(head(x, y), expected, rtol=1e-12, atol=1e-12, what="half way")


def test_combined_margin_m2_and_m3() -> None:
    x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 7, (5,))
    head = marginloss.CombinedMargin(4, 7, scale=8.0, m1=1.0, m2=0.3, m3=0.2, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    schedules = [marginloss.MarginWarmup(head, steps=2, attribute=a) for a in ("m2", "m3")]
    assert (head.m2, head.m3) == (0.0, 0.0)
    for schedule in schedules:
        schedule.step()
    expected = head_loss("combined", x, w, y, {"scale": 8.0, "m1": 1.0, "m2": 0.15, "m3": 0.1})
    assert_close(head(x, y), expected, rtol=1e-12, atol=1e-12, what="combined")


class BufferMarginHead(marginloss.MarginHead):
    """A user-defined head whose margin is a buffer (so it travels in the state_dict)."""

    def __init__(self, embedding_dim: int, num_classes: int, **kwargs) -> None:
        super().__init__(embedding_dim, num_classes, scale=8.0, **kwargs)
        self.register_buffer("gap", torch.tensor(0.3))

    def target(self, cos, context):
        return cos - self.gap.to(cos.dtype)


class FloatMarginHead(marginloss.MarginHead):
    def __init__(self, embedding_dim: int, num_classes: int, **kwargs) -> None:
        super().__init__(embedding_dim, num_classes, scale=8.0, **kwargs)
        self.push = 0.25

    def target(self, cos, context):
        return cos - self.push


def test_user_defined_heads() -> None:
    head = BufferMarginHead(4, 6)
    warmup = marginloss.MarginWarmup(head, steps=3, attribute="gap")
    assert float(head.gap) == 0.0
    warmup.step()
    assert float(head.gap) == pytest.approx(0.1)
    loss = head(torch.randn(5, 4), torch.randint(0, 6, (5,)))
    assert torch.isfinite(loss)
    user = FloatMarginHead(4, 6)
    marginloss.MarginWarmup(user, steps=2, attribute="push").step()
    assert user.push == 0.125


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"attribute.*NormFace has no attribute 'margin'"):
        marginloss.MarginWarmup(marginloss.NormFace(4, 6), steps=3)
    with pytest.raises(ValueError, match=r"attribute 'weight'.*one-element"):
        marginloss.MarginWarmup(marginloss.ArcFace(4, 6), steps=3, attribute="weight")
    with pytest.raises(ValueError, match=r"attribute 'easy_margin'.*got bool"):
        marginloss.MarginWarmup(marginloss.ArcFace(4, 6), steps=3, attribute="easy_margin")
    with pytest.raises(ValueError, match="learnable parameter"):
        marginloss.MarginWarmup(marginloss.UniFace(4, 6), steps=3, attribute="bias")
    with pytest.raises(ValueError, match="steps"):
        marginloss.MarginWarmup(marginloss.ArcFace(4, 6), steps=0)
    with pytest.raises(ValueError, match="start"):
        marginloss.MarginWarmup(marginloss.ArcFace(4, 6), steps=3, start=float("nan"))
    with pytest.raises(ValueError, match="attribute must be a non-empty str"):
        marginloss.MarginWarmup(marginloss.ArcFace(4, 6), steps=3, attribute="")
