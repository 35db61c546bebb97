"""The classification heads the face examples train, and the checkpoint both scripts share.

``--head softmax`` is a plain linear layer with cross-entropy (HW2P2's baseline); every
other head is a :mod:`marginloss` class. All follow one calling convention:
``head(embeddings, labels) -> loss`` and ``head.logits(embeddings) -> [B, C]`` for
prediction (margin-free).

The default scale and margin of each head are chosen for the small toy problem (tens of
classes, a few minutes of CPU training), not the papers' values for 10k-100k identities;
:data:`HEAD_DEFAULTS` lists both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("softmax", "arcface", "cosface", "sphereface", "lsoftmax", "combined", "normface", "lgm", "uniformface",
         "subcenter_arcface", "curricularface", "elasticface", "adaface", "magface", "adacos", "uniface", "sphereface2")

# Toy defaults (used when --scale/--margin are not given). The papers' values are larger:
# ArcFace s=64 m=0.5, CosFace s=64 m=0.35, NormFace s=16, combined (InsightFace) s=64
# m1=1.0 m2=0.3 m3=0.2, SphereFace/L-Softmax m=4. A large scale on a few dozen classes
# saturates the softmax at once and training stalls; s=16-30 trains within a few epochs.
# SphereFace and L-Softmax anneal from softmax to the margin over the iterations (lambda
# from 1000 down to lambda_min); the library's schedules take thousands of steps, so the
# toy ones reach lambda_min within the ~200 steps of a demo run.
HEAD_DEFAULTS: dict[str, dict[str, float]] = {
    "softmax": {},
    "arcface": {"scale": 24.0, "margin": 0.3},
    "cosface": {"scale": 24.0, "margin": 0.25},
    "normface": {"scale": 16.0},
    "combined": {"scale": 24.0, "m1": 1.0, "m2": 0.2, "m3": 0.1},
    "sphereface": {"margin": 4, "lambda_gamma": 1.0},
    "lsoftmax": {"margin": 4, "lambda_gamma": 1.0, "lambda_power": 1.0, "lambda_min": 5.0},
    # L-GM: the release's alpha and lambda (its embeddings suit Euclidean verification);
    # UniformFace: SphereFace's toy schedule plus the uniform loss at weight 1.
    "lgm": {"alpha": 0.1, "lambda_lkd": 0.01},
    "uniformface": {"margin": 4, "lambda_gamma": 1.0, "uniform_weight": 1.0},
    # Issue 13 heads at the toy ArcFace setting (the papers': s=64, m=0.5; ElasticFace-Arc
    # sigma 0.05; CurricularFace momentum 0.01, here faster for ~200 steps).
    "subcenter_arcface": {"scale": 24.0, "margin": 0.3},
    "curricularface": {"scale": 24.0, "margin": 0.3, "momentum": 0.05},
    "elasticface": {"scale": 24.0, "margin": 0.3},
    # AdaFace: the release's h and t_alpha; the toy scale and margin of ArcFace above.
    "adaface": {"scale": 24.0, "margin": 0.3},
    # MagFace: the backbones end in BatchNorm1d, so magnitudes start near sqrt(128) ~ 11;
    # [l_a, u_a] = [5, 30] brackets them (the release's [10, 110] fits 512-d ResNets), and
    # lambda_g = 10 is above the paper's bound s k u_a^2 l_a^2 / (u_a^2 - l_a^2) ~ 4.9.
    "magface": {"scale": 24.0, "l_a": 5.0, "u_a": 30.0, "l_m": 0.2, "u_m": 0.4, "lambda_g": 10.0},
    "adacos": {},  # no hyperparameters: the scale is sqrt(2) log(C - 1), then adapted
    # Sigmoid-form heads (one binary classifier per class, learnable bias; papers: UniFace
    # s=64 m=0.4, SphereFace2 r=40 m=0.4). They take no label smoothing.
    "uniface": {"scale": 24.0, "margin": 0.3},
    "sphereface2": {"scale": 24.0, "margin": 0.3},
}
SIGMOID_HEADS = ("uniface", "sphereface2")

CHECKPOINT_FORMAT = "marginloss-face-example/1"


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or does not match the run that wants it."""


class SoftmaxHead(nn.Module):
    """A linear classifier with cross-entropy, in the margin heads' calling convention.

    Parameters
    ----------
    embedding_dim, num_classes : int
        Input size and number of classes.
    label_smoothing : float, default 0.0
        Passed to :func:`torch.nn.functional.cross_entropy`.

    Shape:
        ``head(embeddings [B, D], labels [B]) -> scalar``; ``head.logits(embeddings) -> [B, C]``
    """

    def __init__(self, embedding_dim: int, num_classes: int, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(embedding_dim, num_classes)
        self.label_smoothing = label_smoothing

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings), labels, label_smoothing=self.label_smoothing)


def head_kwargs(name: str, *, scale: float | None = None, margin: float | None = None,
                combined_margins: tuple[float, float, float] | None = None) -> dict[str, float]:
    """Hyperparameters of head ``name``: the toy defaults, overridden by what was given."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    kwargs = dict(HEAD_DEFAULTS[name])
    if scale is not None and "scale" in kwargs:
        kwargs["scale"] = scale
    if margin is not None and "margin" in kwargs:
        kwargs["margin"] = margin
    if combined_margins is not None and name == "combined":
        kwargs.update(zip(("m1", "m2", "m3"), combined_margins))
    return kwargs


def make_head(name: str, embedding_dim: int, num_classes: int, kwargs: dict[str, float],
              label_smoothing: float = 0.0) -> nn.Module:
    """Instantiate head ``name`` (see :data:`HEADS`) with the hyperparameters ``kwargs``."""
    if name == "softmax":
        return SoftmaxHead(embedding_dim, num_classes, label_smoothing=label_smoothing)
    import marginloss  # the library is only needed for the margin heads

    if name == "lgm":  # a Gaussian-mixture head, not a registered MarginHead
        return marginloss.LGM(embedding_dim, num_classes, label_smoothing=label_smoothing, **kwargs)
    registered = {"combined": "combined_margin"}.get(name, name)  # the CLI's short name
    if name not in HEADS or registered not in marginloss.list_heads():
        raise ValueError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    options = dict(kwargs)
    if name in ("sphereface", "lsoftmax", "uniformface"):
        options["margin"] = int(options["margin"])  # an integer multiplicative margin
    if name not in SIGMOID_HEADS:  # label smoothing belongs to the softmax form
        options["label_smoothing"] = label_smoothing
    return marginloss.create_head(registered, embedding_dim, num_classes, **options)


# Heads whose logits ignore the embedding norm: a center loss beside them should see unit
# vectors, or it could be lowered for free by shrinking every embedding towards zero.
NORM_FREE_HEADS = ("arcface", "cosface", "combined", "normface", "subcenter_arcface", "curricularface", "elasticface",
                   "uniface", "sphereface2")


def center_loss_input(head_name: str, embeddings: torch.Tensor) -> torch.Tensor:
    """What the center loss beside head ``head_name`` compares: unit vectors for the
    norm-free heads, raw embeddings otherwise (softmax, SphereFace, L-Softmax)."""
    return F.normalize(embeddings, dim=1) if head_name in NORM_FREE_HEADS else embeddings


def copy_class_weights(source: nn.Module, target: nn.Module) -> bool:
    """Start ``target``'s class weights from ``source``'s (same ``[C, D]`` shape); True if copied.

    Used when fine-tuning swaps a softmax head for a margin head: the softmax class
    vectors are already good class centres on the sphere, so the margin head need not
    learn them from scratch.
    """
    source_weight = getattr(source, "weight", None)
    target_weight = getattr(target, "weight", None)
    if not isinstance(source_weight, torch.Tensor) or not isinstance(target_weight, torch.Tensor):
        return False
    if source_weight.shape != target_weight.shape:
        return False
    with torch.no_grad():
        target_weight.copy_(source_weight.to(target_weight.dtype))
    return True


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write atomically: a crash mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"format": CHECKPOINT_FORMAT, **state}, partial)
    partial.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only: the checkpoint holds tensors and plain containers, so nothing in a
        # downloaded file can run code on load.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: report it, whatever broke
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated, corrupt or not a torch checkpoint "
            f"({type(error).__name__}: {error}); train again or point --checkpoint/--init at another file"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a face-example checkpoint (format {CHECKPOINT_FORMAT})")
    return state
