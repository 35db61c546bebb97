"""Train a small CNN with a plain softmax head and with margin heads, then draw the pictures
the ArcFace paper explains itself with.

For every embedding size in ``--embedding-dims`` (default 2 and 3) and every head in
``--heads``, the same backbone (same initialisation, same batch order) is trained and
evaluated; the script then writes, into ``--out``:

  embeddings_2d.png     per-class 2-D features: softmax raw features vs. the margin heads'
                        normalised features on the unit circle, with angle histograms
  embeddings_3d.png     per-class 3-D features on the unit sphere, one panel per head
  training_curves.png   training loss per step and test accuracy per epoch
  accuracy.md/.csv/.png test accuracy per head (one row per head, one column per size),
                        plus angular statistics in accuracy.md
  results.csv           one row per (head, size): hyperparameters, accuracy, angles, time
  history.csv           one row per (head, size, epoch)

Examples
--------
Offline, in seconds (what CI runs)::

    python examples/mnist_arcface/train.py --data synthetic --smoke --out runs/smoke

Offline, a couple of minutes on 2 CPU cores::

    python examples/mnist_arcface/train.py --data synthetic --epochs 3

MNIST / CIFAR-10, downloaded by torchvision on first use::

    python examples/mnist_arcface/train.py --data mnist --download
    python examples/mnist_arcface/train.py --data cifar10 --download --epochs 15
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from data import DATA_NAMES, ImageData, load_data
from figures import (
    angular_statistics,
    plot_accuracy_table,
    plot_embeddings_2d,
    plot_embeddings_3d,
    plot_training_curves,
)
from torch import nn

import marginloss

HEAD_NAMES = ("softmax", "normface", "arcface", "cosface", "sphereface")
DEFAULT_HEADS = "softmax,arcface,cosface,sphereface"
# Which hyperparameters --scale / --margin may set, per head.
SCALED_HEADS = ("normface", "arcface", "cosface")
MARGIN_HEADS = ("arcface", "cosface", "sphereface")

# Demo hyperparameters by embedding size; README.md explains them.  The library defaults
# (ArcFace s=64, m=0.5) are tuned for 512-D face embeddings and 10^4-10^6 identities.  On a
# circle, 10 classes sit at best 36 degrees apart, and normalised features only get
# tangential gradients, so every wrong class centre is a wall they must climb over; the
# walls grow with s, and s=10 trained best of the values tried (4, 6, 10, 16).  ArcFace's
# m=0.35 rad (20 degrees) leaves a zone of +-8 degrees around each centre where the margin
# is met, and CosFace's m=0.2 exceeds 1 - cos(36 degrees) = 0.19, so neither loss saturates
# and both keep pulling classes together; smaller margins trained worse here.  On the
# sphere the classes end up 55-60 degrees apart, hence the larger 3-D margins.
DEMO_HPARAMS: dict[int, dict[str, dict[str, float]]] = {
    2: {
        "normface": {"scale": 10.0},
        "arcface": {"scale": 10.0, "margin": 0.35},
        "cosface": {"scale": 10.0, "margin": 0.2},
        "sphereface": {"margin": 4},
    },
    3: {
        "normface": {"scale": 10.0},
        "arcface": {"scale": 10.0, "margin": 0.6},
        "cosface": {"scale": 10.0, "margin": 0.4},
        "sphereface": {"margin": 4},
    },
    # 4-D and up: the usual small-dataset settings (the papers' m, a smaller s for 10 classes).
    4: {
        "normface": {"scale": 16.0},
        "arcface": {"scale": 30.0, "margin": 0.5},
        "cosface": {"scale": 30.0, "margin": 0.35},
        "sphereface": {"margin": 4},
    },
}
# SphereFace anneals lambda from lambda_base down to lambda_min (lambda = base / (1 + gamma
# * step)); the paper's gamma=0.12 takes ~1,700 steps, longer than this whole demo, so
# gamma is chosen to reach lambda_min halfway through training.
SPHEREFACE_LAMBDA_BASE = 1000.0
SPHEREFACE_LAMBDA_MIN = 5.0

SYNTHETIC_SIZES = (6000, 2000)
SMOKE_SIZES = (320, 160)


# ---------------------------------------------------------------------------------------
# model and the softmax baseline
# ---------------------------------------------------------------------------------------
def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four 3x3 conv blocks, global average pooling, and a 2-layer MLP to ``embedding_dim``.

    Works on 28x28 grey (MNIST) and 32x32 RGB (CIFAR-10) alike; the last layer is linear,
    so the embedding can point anywhere (no ReLU folding it into one quadrant).
    """

    def __init__(self, in_channels: int, embedding_dim: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, width),
            nn.MaxPool2d(2),
            _conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width),
            nn.MaxPool2d(2),
            _conv_block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embedding = nn.Sequential(
            nn.Linear(4 * width, 4 * width),
            nn.BatchNorm1d(4 * width),
            nn.PReLU(),
            nn.Linear(4 * width, embedding_dim),
            # Centres the features at the origin, so that from the first step they point in
            # all directions (as InsightFace's backbones end).  Without it, an untrained
            # network maps every image to nearly one direction, and in 2-D the classes must
            # then squeeze past one another around the circle to reach their places.
            nn.BatchNorm1d(embedding_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features(images))


class SoftmaxHead(nn.Module):
    """The baseline: a linear classifier with bias and cross-entropy, called like a margin head."""

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embedding_dim, num_classes)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.linear(embeddings), labels)


def demo_hparams(head: str, embedding_dim: int) -> dict[str, float]:
    """The example's default hyperparameters for ``head`` at ``embedding_dim``."""
    if head == "softmax":
        return {}
    return dict(DEMO_HPARAMS[min(embedding_dim, 4)][head])


def evenly_spread_directions(num_classes: int, embedding_dim: int) -> torch.Tensor:
    """``[num_classes, embedding_dim]`` unit vectors spread evenly: equal angles on the
    circle (2-D), a Fibonacci lattice on the sphere (3-D)."""
    index = torch.arange(num_classes, dtype=torch.float64)
    if embedding_dim == 2:
        angle = 2 * math.pi * index / num_classes
        return torch.stack((angle.cos(), angle.sin()), dim=1).float()
    if embedding_dim == 3:
        height = 1 - (2 * index + 1) / num_classes
        radius = (1 - height**2).sqrt()
        angle = math.pi * (3 - math.sqrt(5)) * index  # the golden angle
        return torch.stack((radius * angle.cos(), radius * angle.sin(), height), dim=1).float()
    raise ValueError(f"evenly spread directions are defined for 2-D and 3-D, got {embedding_dim}")


def build_head(
    head: str,
    embedding_dim: int,
    num_classes: int,
    hparams: dict[str, float],
    total_steps: int,
    class_init: str = "random",
) -> nn.Module:
    """Construct ``head``; raises the library's ``ValueError`` for out-of-range values.

    ``class_init="even"`` points the class weights (softmax's included) in evenly spread
    directions when the embedding is 2-D or 3-D, keeping their initial norms; see
    :func:`evenly_spread_directions` and the README.
    """
    module = _construct_head(head, embedding_dim, num_classes, hparams, total_steps)
    if class_init == "even" and embedding_dim in (2, 3):
        with torch.no_grad():
            norms = module.weight.norm(dim=1, keepdim=True)
            module.weight.copy_(evenly_spread_directions(num_classes, embedding_dim) * norms)
    return module


def _construct_head(
    head: str, embedding_dim: int, num_classes: int, hparams: dict[str, float], total_steps: int
) -> nn.Module:
    if head == "softmax":
        return SoftmaxHead(embedding_dim, num_classes)
    if head not in marginloss.list_heads():
        raise ValueError(f"unknown head {head!r}")
    options: dict[str, float | int] = dict(hparams)
    if head == "sphereface":
        # Anneal lambda from its base to its floor over the first half of training.
        half = max(total_steps // 2, 1)
        options = {
            "margin": int(hparams["margin"]),
            "lambda_base": SPHEREFACE_LAMBDA_BASE,
            "lambda_gamma": (SPHEREFACE_LAMBDA_BASE / SPHEREFACE_LAMBDA_MIN - 1.0) / half,
            "lambda_power": 1.0,
            "lambda_min": SPHEREFACE_LAMBDA_MIN,
        }
    return marginloss.create_head(head, embedding_dim, num_classes, **options)


# ---------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """Everything the figures and tables need from one (head, embedding size) run."""

    head: str
    embedding_dim: int
    hparams: dict[str, float]
    test_accuracy: float
    train_seconds: float
    test_embeddings: torch.Tensor  # [N, D], CPU
    test_labels: torch.Tensor  # [N], CPU
    class_weights: torch.Tensor  # [num_classes, D], CPU
    step_losses: list[float] = field(default_factory=list)
    epoch_rows: list[dict[str, float]] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``"arcface (s=10, m=0.2)"``: the head with its hyperparameters."""
        if not self.hparams:
            return self.head
        values = ", ".join(
            f"{'s' if key == 'scale' else 'm'}={value:g}" for key, value in self.hparams.items()
        )
        return f"{self.head} ({values})"


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def accuracy(head: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    head.eval()
    return float((head.logits(embeddings).argmax(1) == labels).float().mean())


def train_one(
    head_name: str,
    embedding_dim: int,
    hparams: dict[str, float],
    data: ImageData,
    args: argparse.Namespace,
    device: torch.device,
) -> RunResult:
    """Train backbone + ``head_name`` from the same seed every time and evaluate it."""
    torch.manual_seed(args.seed)  # identical backbone initialisation for every head
    num_classes = len(data.class_names)
    train_images = data.train.images.to(device)
    train_labels = data.train.labels.to(device)
    test_images = data.test.images.to(device)
    test_labels = data.test.labels.to(device)
    steps_per_epoch = math.ceil(len(train_labels) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    model = SmallCNN(data.in_channels, embedding_dim, width=args.width).to(device)
    head = build_head(
        head_name, embedding_dim, num_classes, hparams, total_steps, args.class_init
    ).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=args.lr)
    # One-cycle: a warm-up while the random initial geometry sorts itself out, then a long
    # annealed tail in which the clusters settle.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.2
    )
    order = torch.Generator().manual_seed(args.seed)  # identical batch order for every head

    result = RunResult(
        head=head_name,
        embedding_dim=embedding_dim,
        hparams=hparams,
        test_accuracy=float("nan"),
        train_seconds=0.0,
        test_embeddings=torch.empty(0),
        test_labels=data.test.labels,
        class_weights=torch.empty(0),
    )
    start = time.perf_counter()
    last_report = start
    for epoch in range(1, args.epochs + 1):
        model.train()
        head.train()
        permutation = torch.randperm(len(train_labels), generator=order).to(device)
        loss_sum, correct = 0.0, 0
        for step in range(steps_per_epoch):
            index = permutation[step * args.batch_size : (step + 1) * args.batch_size]
            embeddings = model(train_images[index])
            loss = head(embeddings, train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                correct += int((head.logits(embeddings).argmax(1) == train_labels[index]).sum())
            result.step_losses.append(loss.item())
            loss_sum += result.step_losses[-1] * len(index)
            now = time.perf_counter()
            if args.progress_every > 0 and now - last_report >= args.progress_every and step + 1 < steps_per_epoch:
                last_report = now
                seen = (step + 1) * args.batch_size
                print(
                    f"[{result.label}, d={embedding_dim}] epoch {epoch}/{args.epochs}  step "
                    f"{step + 1}/{steps_per_epoch}  loss so far {loss_sum / seen:.4f}  "
                    f"({now - start:.1f} s training this head)",
                    flush=True,
                )
        test_accuracy = accuracy(head, embed(model, test_images), test_labels)
        result.epoch_rows.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum / len(train_labels),
                "train_accuracy": correct / len(train_labels),
                "test_accuracy": test_accuracy,
            }
        )
        print(
            f"[{result.label}, d={embedding_dim}] epoch {epoch}/{args.epochs}  "
            f"loss {loss_sum / len(train_labels):.4f}  train acc {correct / len(train_labels):.4f}"
            f"  test acc {test_accuracy:.4f}  ({time.perf_counter() - start:.1f} s training this head)",
            flush=True,
        )
        last_report = time.perf_counter()
    result.train_seconds = time.perf_counter() - start
    test_embeddings = embed(model, test_images)
    result.test_accuracy = accuracy(head, test_embeddings, test_labels)
    result.test_embeddings = test_embeddings.cpu()
    result.class_weights = head.weight.detach().cpu()
    return result


# ---------------------------------------------------------------------------------------
# result files
# ---------------------------------------------------------------------------------------
def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def write_tables(
    results: Sequence[RunResult], heads: Sequence[str], dims: Sequence[int], out: Path, title: str
) -> list[Path]:
    """accuracy.md/.csv (one row per head), results.csv (per run) and history.csv (per epoch)."""
    by_key = {(r.head, r.embedding_dim): r for r in results}
    angles = {
        key: angular_statistics(r.test_embeddings, r.test_labels) for key, r in by_key.items()
    }

    with open(out / "accuracy.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["head", *(f"test_acc_d{dim}" for dim in dims)])
        for head in heads:
            writer.writerow([head, *(f"{by_key[head, dim].test_accuracy:.4f}" for dim in dims)])

    def hyperparameters(head: str, dim: int) -> str:
        return by_key[head, dim].label[len(head) :].strip(" ()") or "-"

    lines = [
        f"# Test accuracy: {title}",
        "",
        "| head | " + " | ".join(f"d={dim} test acc (hyperparameters)" for dim in dims) + " |",
        "|---|" + "---:|" * len(dims),
    ]
    for head in heads:
        cells = (
            f"{_percent(by_key[head, d].test_accuracy)} ({hyperparameters(head, d)})" for d in dims
        )
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Angles of the normalised test features (degrees)",
        "",
        "intra: median angle between a feature and its class centre (smaller = tighter); "
        "min inter: smallest angle between two class centres (larger = better spread); "
        "margin: median of (angle to the nearest other centre - angle to its own centre) "
        "(larger = better separated). Class centre = mean feature direction of the class.",
        "",
        "| head | "
        + " | ".join(f"d={d} intra | d={d} min inter | d={d} margin" for d in dims)
        + " |",
        "|---|" + "---:|---:|---:|" * len(dims),
    ]
    for head in heads:
        cells = (
            f"{angles[head, d][name]:.1f}"
            for d in dims
            for name in ("intra_angle_deg", "min_inter_angle_deg", "margin_deg")
        )
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")

    fields = ["head", "embedding_dim", "scale", "margin", "test_accuracy", "intra_angle_deg",
              "min_inter_angle_deg", "margin_deg", "train_seconds"]  # fmt: skip
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in results:
            row = {
                "head": r.head,
                "embedding_dim": r.embedding_dim,
                "scale": r.hparams.get("scale", ""),
                "margin": r.hparams.get("margin", ""),
                "test_accuracy": f"{r.test_accuracy:.4f}",
                "train_seconds": f"{r.train_seconds:.2f}",
            }
            row.update({k: f"{v:.2f}" for k, v in angles[r.head, r.embedding_dim].items()})
            writer.writerow(row)

    with open(out / "history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["head", "embedding_dim", "epoch", "train_loss", "train_accuracy", "test_accuracy"]
        )
        for r in results:
            for row in r.epoch_rows:
                writer.writerow([r.head, r.embedding_dim, int(row["epoch"]), f"{row['train_loss']:.5f}",
                                 f"{row['train_accuracy']:.4f}", f"{row['test_accuracy']:.4f}"])  # fmt: skip
    return [out / name for name in ("accuracy.md", "accuracy.csv", "results.csv", "history.csv")]


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def parse_heads(text: str) -> list[str]:
    """``"softmax,arcface"`` -> ``["softmax", "arcface"]``; an argparse type."""
    heads = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in heads if name not in HEAD_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown head(s) {', '.join(map(repr, unknown))}; choose from {', '.join(HEAD_NAMES)}"
        )
    if not heads:
        raise argparse.ArgumentTypeError(f"no head given; choose from {', '.join(HEAD_NAMES)}")
    if len(set(heads)) != len(heads):
        raise argparse.ArgumentTypeError(f"a head is listed twice in {text!r}")
    return heads


def parse_dims(text: str) -> list[int]:
    """``"2,3"`` -> ``[2, 3]``; an argparse type (sizes must be integers >= 2)."""
    try:
        dims = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not dims or any(dim < 2 for dim in dims) or len(set(dims)) != len(dims):
        raise argparse.ArgumentTypeError(
            f"expected distinct integers >= 2 (a 1-D feature has no angle), got {text!r}"
        )
    return dims


def parse_override(text: str) -> dict[str, float]:
    """``"0.3"`` -> ``{"*": 0.3}`` (every head that has it); ``"arcface=0.3,cosface=0.2"``
    -> per head.  An argparse type."""
    overrides: dict[str, float] = {}
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        head, _, value = part.rpartition("=")
        head = head.strip().lower() or "*"
        if head != "*" and head not in HEAD_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown head {head!r} in {text!r}; choose from {', '.join(HEAD_NAMES)}"
            )
        try:
            overrides[head] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected VALUE or HEAD=VALUE[,HEAD=VALUE...], got {text!r}"
            ) from None
    if not overrides:
        raise argparse.ArgumentTypeError(f"expected VALUE or HEAD=VALUE[,...], got {text!r}")
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=(
            "Train a small CNN with a plain softmax head and with marginloss heads (ArcFace, "
            "CosFace, SphereFace, NormFace) on MNIST, CIFAR-10 or offline synthetic digits, and "
            "save the ArcFace paper's figures: 2-D features (softmax raw vs. margin heads on the "
            "unit circle, with angle histograms), 3-D features on the unit sphere, training "
            "curves and an accuracy table (markdown, CSV and PNG)."
        ),
        epilog=(
            "Default hyperparameters depend on the embedding size (library defaults such as "
            "ArcFace s=64, m=0.5 are for 512-D faces and thousands of classes): "
            + "; ".join(
                f"d{'>=4' if dim == 4 else '=' + str(dim)}: "
                + ", ".join(
                    f"{head} " + " ".join(f"{k}={v:g}" for k, v in values.items())
                    for head, values in table.items()
                )
                for dim, table in DEMO_HPARAMS.items()
            )
            + ". SphereFace's lambda anneals from 1000 to 5, reaching 5 halfway through training. "
            "Outputs: embeddings_2d.png, embeddings_3d.png (when 2 / 3 are among "
            "--embedding-dims), training_curves.png, accuracy.md, accuracy.csv, accuracy.png, "
            "results.csv, history.csv. Example: train.py --data synthetic --smoke --out runs/smoke"
        ),
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        choices=DATA_NAMES,
        default="mnist",
        help="dataset; 'synthetic' draws noisy seven-segment digits (28x28 grey) offline "
        "(default: %(default)s)",
    )
    data.add_argument(
        "--root", default="data", help="where torchvision datasets live (default: %(default)s)"
    )
    data.add_argument(
        "--download", action="store_true", help="let torchvision download --data into --root"
    )
    data.add_argument(
        "--train-size",
        type=int,
        default=None,
        help=f"training images to use (default: all; synthetic {SYNTHETIC_SIZES[0]}, "
        f"--smoke {SMOKE_SIZES[0]})",
    )
    data.add_argument(
        "--test-size",
        type=int,
        default=None,
        help=f"test images to use (default: all; synthetic {SYNTHETIC_SIZES[1]}, "
        f"--smoke {SMOKE_SIZES[1]})",
    )
    model = parser.add_argument_group("model and heads")
    model.add_argument(
        "--heads",
        type=parse_heads,
        default=DEFAULT_HEADS,
        metavar="H1,H2,...",
        help=f"comma-separated heads, from: {', '.join(HEAD_NAMES)} (default: %(default)s)",
    )
    model.add_argument(
        "--embedding-dims",
        type=parse_dims,
        default="2,3",
        metavar="D1,D2,...",
        help="embedding sizes to train (2 -> circle figure, 3 -> sphere figure; e.g. add 64 "
        "for an accuracy-oriented run; default: %(default)s)",
    )
    model.add_argument(
        "--scale",
        type=parse_override,
        default=None,
        metavar="S | HEAD=S,...",
        help=f"logit scale s for {', '.join(SCALED_HEADS)}: one value for all of them, or per "
        "head (e.g. arcface=16,cosface=12); default: per embedding size, see below",
    )
    model.add_argument(
        "--margin",
        type=parse_override,
        default=None,
        metavar="M | HEAD=M,...",
        help="margin m: arcface in radians (additive angle), cosface in cosine units "
        "(subtracted), sphereface an integer angle multiplier; one value for all, or per head "
        "(e.g. arcface=0.3,cosface=0.15); default: per embedding size, see below",
    )
    model.add_argument(
        "--class-init",
        choices=("even", "random"),
        default="even",
        help="initial class weight directions for 2-D/3-D embeddings: 'even' spreads them "
        "evenly over the circle/sphere; 'random' is the heads' Xavier init (always used for "
        "d>=4, where random directions are nearly orthogonal anyway; default: %(default)s)",
    )
    model.add_argument(
        "--width",
        type=int,
        default=16,
        help="channels of the first conv layer (default: %(default)s)",
    )
    train = parser.add_argument_group("training and output")
    train.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default 5; --smoke 1)"
    )
    train.add_argument(
        "--batch-size", type=int, default=32, help="mini-batch size (default: %(default)s)"
    )
    train.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="peak Adam learning rate, one-cycle schedule (default: %(default)s)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for data, initialisation and batch order (default: %(default)s)",
    )
    train.add_argument(
        "--device",
        default="auto",
        help="torch device; 'auto' (default): cuda when available, else cpu",
    )
    train.add_argument(
        "--out",
        type=Path,
        default=Path("runs/mnist_arcface"),
        help="output folder (default: %(default)s)",
    )
    train.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: torch's choice, one per core); 1 is often fastest "
        "on a small or busy machine",
    )
    train.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        help="seconds between progress lines within an epoch; 0: one line per epoch only "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--record",
        type=Path,
        default=None,
        help="append this run (command, accuracies, angles, wall time, machine, load) to this "
        "JSON results file; `make mnist-results` writes examples/mnist_arcface/results/results.json",
    )
    train.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny run for CI: {SMOKE_SIZES[0]}/{SMOKE_SIZES[1]} images, 1 epoch, seconds "
        "(combine with --data synthetic to run offline)",
    )
    return parser


def resolve_hparams(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> dict[tuple[str, int], dict[str, float]]:
    """Demo defaults with --scale/--margin applied; parser.error on a meaningless override."""
    for flag, overrides, allowed in (
        ("--scale", args.scale, SCALED_HEADS),
        ("--margin", args.margin, MARGIN_HEADS),
    ):
        for head in overrides or {}:
            if head != "*" and head not in allowed:
                parser.error(
                    f"{flag} {head}=...: {head} has no such hyperparameter; "
                    f"{flag} applies to {', '.join(allowed)}"
                )
            if head != "*" and head not in args.heads:
                parser.error(f"{flag} {head}=...: {head} is not in --heads")
    table: dict[tuple[str, int], dict[str, float]] = {}
    for head in args.heads:
        for dim in args.embedding_dims:
            hparams = demo_hparams(head, dim)
            for key, overrides in (("scale", args.scale), ("margin", args.margin)):
                if overrides and key in hparams:
                    hparams[key] = overrides.get(head, overrides.get("*", hparams[key]))
            if head == "sphereface" and not float(hparams["margin"]).is_integer():
                parser.error(
                    f"--margin: sphereface's margin is an integer angle multiplier (1, 2, 3, 4), "
                    f"got {hparams['margin']:g}; give per-head values such as "
                    "--margin arcface=0.3,cosface=0.15"
                )
            if head == "sphereface":
                hparams["margin"] = int(hparams["margin"])
            table[head, dim] = hparams
    # Build every head once now, so an out-of-range value fails before any training.
    for (head, dim), hparams in table.items():
        try:
            build_head(head, dim, 10, hparams, total_steps=1)
        except (ValueError, TypeError) as exc:
            parser.error(f"{head} at d={dim} with {hparams}: {exc}")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        train_size, test_size = SMOKE_SIZES
        args.epochs = 1 if args.epochs is None else args.epochs
    elif args.data == "synthetic":
        train_size, test_size = SYNTHETIC_SIZES
    else:
        train_size = test_size = None
    args.train_size = train_size if args.train_size is None else args.train_size
    args.test_size = test_size if args.test_size is None else args.test_size
    args.epochs = 5 if args.epochs is None else args.epochs
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--width", args.width), ("--train-size", args.train_size),
                        ("--test-size", args.test_size)):  # fmt: skip
        if value is not None and value < 1:
            parser.error(f"{flag} must be a positive integer, got {value}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    hparams = resolve_hparams(parser, args)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )

    started = time.perf_counter()
    load_before = _load_average()
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads_used = torch.get_num_threads()
    # Seeds are set per run inside; fork_rng keeps a caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        try:
            data = load_data(
                args.data,
                root=args.root,
                download=args.download,
                train_size=args.train_size,
                test_size=args.test_size,
                seed=args.seed,
            )
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(
            f"{args.data}: {len(data.train)} train / {len(data.test)} test images, "
            f"{len(data.class_names)} classes, device {device}",
            flush=True,
        )
        results = [
            train_one(head, dim, hparams[head, dim], data, args, device)
            for dim in args.embedding_dims
            for head in args.heads
        ]

    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{args.data}, {len(data.train)} train images, {args.epochs} epoch(s), seed {args.seed}"
    written = write_tables(results, args.heads, args.embedding_dims, args.out, title)
    by_key = {(r.head, r.embedding_dim): r for r in results}
    cells = [
        [head, *(_percent(by_key[head, dim].test_accuracy) for dim in args.embedding_dims)]
        for head in args.heads
    ]
    columns = ["head", *(f"test acc, d={dim}" for dim in args.embedding_dims)]
    written.append(plot_accuracy_table(cells, columns, args.out / "accuracy.png", title))
    for dim, plot in ((2, plot_embeddings_2d), (3, plot_embeddings_3d)):
        runs = [r for r in results if r.embedding_dim == dim]
        if runs:
            written.append(plot(runs, data.class_names, args.out / f"embeddings_{dim}d.png", title))
    written.append(plot_training_curves(results, args.out / "training_curves.png", title))

    torch.set_num_threads(previous_threads)
    wall_s = time.perf_counter() - started
    if args.record is not None:
        _append_record(args.record, results, argv if argv is not None else sys.argv[1:], wall_s,
                       [load_before, _load_average()], threads_used)
        written.append(args.record)

    print()
    print((args.out / "accuracy.md").read_text())
    print(f"total wall time {wall_s:.1f} s (data, every head and size, tables and figures); wrote:")
    for path in written:
        print(f"  {path}")
    return 0


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _append_record(path: Path, results: Sequence[RunResult], argv: Sequence[str], wall_s: float,
                   load: list[float | None], threads: int) -> None:
    """Append one run to the JSON results file the README's tables are rendered from."""
    rows = []
    for r in results:
        angles = angular_statistics(r.test_embeddings, r.test_labels)
        rows.append({
            "head": r.head, "embedding_dim": r.embedding_dim,
            "scale": r.hparams.get("scale"), "margin": r.hparams.get("margin"),
            "test_acc": round(r.test_accuracy, 4),
            "intra_deg": round(angles["intra_angle_deg"], 2),
            "min_inter_deg": round(angles["min_inter_angle_deg"], 2),
            "margin_deg": round(angles["margin_deg"], 2),
            "train_s": round(r.train_seconds, 1),
        })
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    run = {
        "command": " ".join(["python examples/mnist_arcface/train.py",
                             *(arg for arg in argv if not arg.startswith("--record") and arg != str(path))]),
        "threads": threads,
        "machine": {"cpu": cpu, "logical_cores": os.cpu_count(), "torch": torch.__version__},
        "wall_s": round(wall_s, 1), "load_1min": load, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": [*runs, run]}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
