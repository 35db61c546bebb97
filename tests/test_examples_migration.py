"""examples/migration/convert.py: weights from pytorch-metric-learning and InsightFace become a
marginloss head with the same loss and gradients.

pytorch-metric-learning is installed with the dev extras and is the oracle itself.  InsightFace
is not a package; its formula is restated below in plain torch from arcface_torch's
``CombinedMarginLoss`` and ``PartialFC_V2`` (normalised embeddings and class weights, cosine
clamped to [-1, 1], the target cosine replaced by ArcFace's ``cos(theta + m2)`` — with
``cos(theta) - m2 sin(m2)`` past ``pi - m2`` — or CosFace's ``cos(theta) - m3``, times ``s``,
cross entropy averaged over the batch), and its checkpoints are written in its layout: one
``checkpoint_gpu_<rank>.pt`` per rank holding ``"state_dict_softmax_fc": {"weight": [num_local,
D]}`` with PartialFC_V2's split of the classes over ranks.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from migration import convert  # noqa: E402

import marginloss  # noqa: E402

pml = pytest.importorskip("pytorch_metric_learning.losses")


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str, tol: float = 1e-9) -> None:
    error = (ours - theirs).abs().max().item()
    assert error <= tol * (1 + theirs.abs().max().item()), f"{what}: max abs difference {error:.3g}"


def _batch(seed: int, num_classes: int, dim: int, batch: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    return embeddings, labels


def _loss_and_grads(module: torch.nn.Module, weight: torch.Tensor, embeddings: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = embeddings.clone().requires_grad_()
    loss = module(x, labels)
    loss.backward()
    assert weight.grad is not None
    return loss.detach(), x.grad, weight.grad  # type: ignore[return-value]


# ---------------------------------------------------------------- pytorch-metric-learning


PML_LOSSES = {
    "ArcFaceLoss": lambda: pml.ArcFaceLoss(13, 8, margin=28.6, scale=30.0),
    "CosFaceLoss": lambda: pml.CosFaceLoss(13, 8, margin=0.35, scale=30.0),
    "NormalizedSoftmaxLoss": lambda: pml.NormalizedSoftmaxLoss(13, 8, temperature=0.1),
    "SphereFaceLoss": lambda: pml.SphereFaceLoss(13, 8, margin=4, scale=1),
    "LargeMarginSoftmaxLoss": lambda: pml.LargeMarginSoftmaxLoss(13, 8, margin=3, scale=1),
}


@pytest.mark.parametrize("name", sorted(PML_LOSSES))
def test_pml_weights_give_the_same_loss_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    theirs = PML_LOSSES[name]().to(torch.float64)
    head = convert.from_pytorch_metric_learning(theirs)
    assert head.weight.shape == (13, 8) and torch.equal(head.weight.detach(), theirs.W.detach().T)
    embeddings, labels = _batch(1, 13, 8)
    loss_a, grad_x_a, grad_w_a = _loss_and_grads(head, head.weight, embeddings, labels)
    loss_b, grad_x_b, grad_w_b = _loss_and_grads(theirs, theirs.W, embeddings, labels)
    _close(loss_a, loss_b, "loss")
    _close(grad_x_a, grad_x_b, "embeddings.grad", 1e-7)
    _close(grad_w_a, grad_w_b.T, "weight.grad", 1e-7)
    # Inference: PML's get_logits is the head's margin-free logits.
    _close(head.logits(embeddings).detach(), theirs.get_logits(embeddings).detach(), "logits")


def test_pml_arcface_margin_in_degrees_becomes_radians() -> None:
    head = convert.from_pytorch_metric_learning(pml.ArcFaceLoss(5, 4, margin=28.6, scale=64.0))
    assert isinstance(head, marginloss.ArcFace)
    assert math.isclose(head.margin, math.radians(28.6)) and head.scale == 64.0


def test_pml_loss_without_an_equivalent_is_refused() -> None:
    with pytest.raises(ValueError, match="no marginloss head for pytorch-metric-learning's ContrastiveLoss"):
        convert.from_pytorch_metric_learning(ContrastiveLoss())
    with pytest.raises(ValueError, match="SphereFaceLoss with scale=2"):
        convert.from_pytorch_metric_learning(pml.SphereFaceLoss(5, 4, margin=4, scale=2))


class ContrastiveLoss(torch.nn.Module):
    """Named like a pytorch-metric-learning loss that has no marginloss head; has a ``W``."""

    def __init__(self) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(4, 5))


# ---------------------------------------------------------------- InsightFace


def insightface_loss(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float,
                     m1: float, m2: float, m3: float) -> torch.Tensor:
    """arcface_torch's PartialFC_V2 + CombinedMarginLoss + cross entropy on one process."""
    logits = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    rows = torch.arange(len(labels))
    target = logits[rows, labels]
    if m1 == 1.0 and m3 == 0.0:
        sin_theta = torch.sqrt(1.0 - target**2)
        cos_theta_m = target * math.cos(m2) - sin_theta * math.sin(m2)
        final = torch.where(target > math.cos(math.pi - m2), cos_theta_m, target - math.sin(math.pi - m2) * m2)
    elif m3 > 0:
        final = target - m3
    else:
        raise ValueError("InsightFace has no branch for these margins")
    logits = logits.index_put((rows, labels), final)
    return F.cross_entropy(logits * s, labels)


def _write_partial_fc(tmp_path: Path, weight: torch.Tensor, world_size: int) -> list[Path]:
    """Per-rank checkpoints as arcface_torch's train_v2.py writes them (save_all_states)."""
    paths = []
    for rank in range(world_size):
        start, rows = convert.partial_fc_rows(weight.shape[0], world_size, rank)
        checkpoint = {
            "epoch": 3, "global_step": 1200,
            "state_dict_backbone": {"fc.weight": torch.zeros(2, 2)},
            "state_dict_softmax_fc": {"weight": weight[start : start + rows].clone()},
        }
        path = tmp_path / f"checkpoint_gpu_{rank}.pt"
        torch.save(checkpoint, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize(("margins", "head_class"), [((1.0, 0.5, 0.0), "ArcFace"), ((1.0, 0.0, 0.4), "CosFace")])
def test_insightface_checkpoints_give_the_same_loss(tmp_path: Path, margins: tuple[float, float, float],
                                                    head_class: str) -> None:
    num_classes, dim, world_size = 23, 16, 4  # 23 = 6 + 6 + 6 + 5: uneven shards
    generator = torch.Generator().manual_seed(7)
    weight = torch.normal(0, 0.01, (num_classes, dim), dtype=torch.float64, generator=generator)
    paths = _write_partial_fc(tmp_path, weight, world_size)
    head = convert.from_insightface(list(reversed(paths)), scale=64.0, margins=margins)  # any order of files
    assert type(head).__name__ == head_class and torch.equal(head.weight.detach(), weight)
    embeddings, labels = _batch(8, num_classes, dim, batch=40)
    # Random directions in 16-D are far from pi - m2, where the fallback applies: include one there too.
    embeddings[0] = -weight[labels[0]] * 100 + 1e-3 * embeddings[0]
    expected = insightface_loss(embeddings, weight, labels, 64.0, *margins)
    _close(head(embeddings, labels).detach(), expected, "loss")


def test_insightface_arcface_gradient_matches_the_restatement() -> None:
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(11, 8, dtype=torch.float64, generator=generator)
    head = convert.from_insightface([{"weight": weight}], scale=32.0, margins=(1.0, 0.3, 0.0))
    embeddings, labels = _batch(10, 11, 8)
    x_a, x_b = embeddings.clone().requires_grad_(), embeddings.clone().requires_grad_()
    w_b = weight.clone().requires_grad_()
    head(x_a, labels).backward()
    insightface_loss(x_b, w_b, labels, 32.0, 1.0, 0.3, 0.0).backward()
    _close(x_a.grad, x_b.grad, "embeddings.grad", 1e-7)
    _close(head.weight.grad, w_b.grad, "weight.grad", 1e-7)


def insightface_arccos_loss(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float,
                            m2: float) -> torch.Tensor:
    """The other arcface_torch form: the margin added to the angle in place, without autograd."""
    logits = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    rows = torch.arange(len(labels))
    with torch.no_grad():
        logits.arccos_()
        logits[rows, labels] += m2
        logits.cos_()
    return F.cross_entropy(logits * s, labels)


def test_insightface_in_place_arccos_version_is_straight_through() -> None:
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(11, 8, dtype=torch.float64, generator=generator)
    head = convert.from_insightface([{"weight": weight}], scale=32.0, margins=(1.0, 0.5, 0.0), straight_through=True)
    embeddings, labels = _batch(12, 11, 8)
    x_a, x_b = embeddings.clone().requires_grad_(), embeddings.clone().requires_grad_()
    w_b = weight.clone().requires_grad_()
    loss_a = head(x_a, labels)
    loss_b = insightface_arccos_loss(x_b, w_b, labels, 32.0, 0.5)
    _close(loss_a.detach(), loss_b.detach(), "loss")
    loss_a.backward()
    loss_b.backward()
    _close(x_a.grad, x_b.grad, "embeddings.grad", 1e-7)
    _close(head.weight.grad, w_b.grad, "weight.grad", 1e-7)


def test_a_missing_rank_is_found(tmp_path: Path) -> None:
    paths = _write_partial_fc(tmp_path, torch.randn(23, 4), world_size=4)
    with pytest.raises(ValueError, match=r"checkpoint ranks \[0, 1, 3\] are not 0..2"):
        convert.insightface_weight([paths[0], paths[1], paths[3]])
    states = [torch.load(path, weights_only=True) for path in paths]
    with pytest.raises(ValueError, match="rank 0's weight has shape"):
        convert.insightface_weight([states[3], states[0], states[1], states[2]])


def test_insightface_margins_without_a_branch_are_refused() -> None:
    with pytest.raises(ValueError, match=r"margins \(1.0, 0.3, 0.2\)"):
        convert.from_insightface([{"weight": torch.randn(3, 2)}], scale=64.0, margins=(1.0, 0.3, 0.2))
    with pytest.raises(ValueError, match="no PartialFC 'weight'"):
        convert.insightface_weight([{"bias": torch.zeros(3)}])
