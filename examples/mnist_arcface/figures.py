"""The example's figures, drawn with matplotlib's object API (no pyplot, so no global backend
or figure state: safe to call from tests and notebooks alike)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

__all__ = [
    "EmbeddingRun",
    "angular_statistics",
    "plot_accuracy_table",
    "plot_embeddings_2d",
    "plot_embeddings_3d",
    "plot_training_curves",
]

HEAD_COLOURS = {
    "softmax": "black",
    "normface": "tab:purple",
    "arcface": "tab:red",
    "cosface": "tab:blue",
    "sphereface": "tab:green",
}
_MAX_POINTS = 2000  # per panel; more only hides the shape of the clusters


class EmbeddingRun(Protocol):
    """What a figure needs from one trained (head, embedding size) run."""

    head: str
    label: str
    embedding_dim: int
    test_accuracy: float
    test_embeddings: torch.Tensor  # [N, D]
    test_labels: torch.Tensor  # [N]
    class_weights: torch.Tensor  # [num_classes, D]
    step_losses: list[float]
    epoch_rows: list[dict[str, float]]


def angular_statistics(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Angles (degrees) that say how tight and how separated the classes are.

    Measured on normalised features for every head, softmax included, since the angle is
    what the margin heads act on; class centres are the mean directions of the features.

    ``intra_angle_deg``
        median angle between a feature and its class centre (smaller = tighter; the
        median describes the cluster, the accuracy already counts the misfits);
    ``min_inter_angle_deg``
        smallest angle between two class centres (larger = better spread);
    ``margin_deg``
        median over features of (angle to the nearest other class centre) minus (angle to
        its own centre): the angular margin a feature keeps, which ArcFace enlarges.
    """
    directions = F.normalize(embeddings.double(), dim=1)
    classes = labels.unique()
    centres = F.normalize(torch.stack([directions[labels == c].mean(0) for c in classes]), dim=1)
    angles = torch.rad2deg((directions @ centres.T).clamp(-1, 1).acos())  # [N, classes]
    own = torch.searchsorted(classes, labels)
    to_own = angles.gather(1, own[:, None]).squeeze(1)
    to_others = angles.scatter(1, own[:, None], float("inf")).amin(1)
    between = torch.rad2deg((centres @ centres.T).clamp(-1, 1).acos())
    between.fill_diagonal_(float("inf"))
    return {
        "intra_angle_deg": float(to_own.median()),
        "min_inter_angle_deg": float(between.min()) if len(classes) > 1 else float("nan"),
        "margin_deg": float((to_others - to_own).median()) if len(classes) > 1 else float("nan"),
    }


def _panel_title(run: EmbeddingRun) -> str:
    stats = angular_statistics(run.test_embeddings, run.test_labels)
    return (
        f"{run.label}\ntest acc {100 * run.test_accuracy:.1f}%, "
        f"intra {stats['intra_angle_deg']:.1f}°, min inter {stats['min_inter_angle_deg']:.1f}°, "
        f"margin {stats['margin_deg']:.1f}°"
    )


def _subsample(run: EmbeddingRun, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    count = len(run.test_labels)
    keep = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:_MAX_POINTS]
    return run.test_embeddings[keep].double().numpy(), run.test_labels[keep].numpy()


def _class_colours(num_classes: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [cmap(index % cmap.N) for index in range(num_classes)]


def plot_embeddings_2d(
    runs: Sequence[EmbeddingRun], class_names: Sequence[str], path: Path, title: str
) -> Path:
    """One column per head.  Top: softmax's raw 2-D features / a margin head's normalised
    features on the unit circle (radius jittered by ±4% so overlapping points stay visible),
    each class's weight direction drawn as a line.  Bottom: histogram of feature angles
    per class with the weight directions dashed; narrow, well-spaced peaks are the claim."""
    colours = _class_colours(len(class_names))
    figure = Figure(figsize=(4.0 * len(runs), 8.4), layout="constrained")
    axes = figure.subplots(2, len(runs), squeeze=False)
    bins = np.linspace(-180.0, 180.0, 121)
    for column, run in enumerate(runs):
        points, labels = _subsample(run)
        weights = F.normalize(run.class_weights.double(), dim=1).numpy()
        scatter, histogram = axes[0, column], axes[1, column]
        if run.head == "softmax":
            reach = float(np.quantile(np.linalg.norm(points, axis=1), 0.98))
            shown, caption = points, "raw features"
        else:
            jitter = np.random.default_rng(0).uniform(0.96, 1.04, size=(len(points), 1))
            shown = points / np.linalg.norm(points, axis=1, keepdims=True) * jitter
            reach, caption = 1.2, "normalised features (unit circle)"
            circle = np.linspace(0, 2 * math.pi, 361)
            scatter.plot(np.cos(circle), np.sin(circle), color="0.6", linewidth=0.8)
        for index, colour in enumerate(colours):
            mine = labels == index
            scatter.scatter(
                shown[mine, 0],
                shown[mine, 1],
                s=3,
                color=colour,
                alpha=0.6,
                linewidths=0,
                label=class_names[index],
            )
            scatter.plot(
                [0, reach * weights[index, 0]],
                [0, reach * weights[index, 1]],
                color=colour,
                linewidth=1.5,
            )
        scatter.set_aspect("equal")
        scatter.set_xlim(-1.1 * reach, 1.1 * reach)
        scatter.set_ylim(-1.1 * reach, 1.1 * reach)
        scatter.set_title(f"{_panel_title(run)}\n{caption}", fontsize=9)

        angles = np.degrees(np.arctan2(points[:, 1], points[:, 0]))
        for index, colour in enumerate(colours):
            histogram.hist(angles[labels == index], bins=bins, color=colour, alpha=0.75)
            centre = math.degrees(math.atan2(weights[index, 1], weights[index, 0]))
            histogram.axvline(centre, color=colour, linestyle="--", linewidth=0.8)
        histogram.set_xlim(-180, 180)
        histogram.set_xticks(range(-180, 181, 90))
        histogram.set_xlabel("feature angle atan2(y, x) (degrees)")
        histogram.set_ylabel("test images")
    handles, names = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right center", markerscale=4, title="class")
    figure.suptitle(f"2-D features per class: {title}")
    figure.savefig(path, dpi=110)
    return path


def plot_embeddings_3d(
    runs: Sequence[EmbeddingRun], class_names: Sequence[str], path: Path, title: str
) -> Path:
    """One 3-D panel per head: normalised features on the unit sphere (softmax's too, for
    comparison), each class's weight direction as a line ending in a star."""
    colours = _class_colours(len(class_names))
    figure = Figure(figsize=(4.2 * len(runs), 5.4), layout="constrained")
    u, v = np.meshgrid(np.linspace(0, 2 * math.pi, 25), np.linspace(0, math.pi, 13))
    for column, run in enumerate(runs):
        axis = figure.add_subplot(1, len(runs), column + 1, projection="3d")
        points, labels = _subsample(run)
        points = points / np.linalg.norm(points, axis=1, keepdims=True)
        weights = F.normalize(run.class_weights.double(), dim=1).numpy()
        axis.plot_wireframe(
            np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", linewidth=0.4
        )
        for index, colour in enumerate(colours):
            mine = labels == index
            axis.scatter(
                *points[mine].T,
                s=3,
                color=colour,
                alpha=0.7,
                linewidths=0,
                label=class_names[index],
            )
            tip = 1.3 * weights[index]
            axis.plot(*np.stack([np.zeros(3), tip], axis=1), color=colour, linewidth=1.2)
            axis.scatter(*tip, marker="*", s=60, color=colour, edgecolors="black", linewidths=0.5)
        axis.set_box_aspect((1, 1, 1))
        axis.view_init(elev=20, azim=35)
        for setter in (axis.set_xlim, axis.set_ylim, axis.set_zlim):
            setter(-1.1, 1.1)
        axis.set_xticks([-1, 0, 1])
        axis.set_yticks([-1, 0, 1])
        axis.set_zticks([-1, 0, 1])
        caption = "softmax features, normalised for display" if run.head == "softmax" else ""
        axis.set_title(f"{_panel_title(run)}\n{caption}".strip(), fontsize=9)
    handles, names = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right center", markerscale=4, title="class")
    figure.suptitle(f"3-D features on the unit sphere: {title}")
    figure.savefig(path, dpi=110)
    return path


def plot_training_curves(runs: Sequence[EmbeddingRun], path: Path, title: str) -> Path:
    """Per embedding size: training loss per step (moving average) and test accuracy per
    epoch, one line per head.  Losses of different heads live on different scales (s, m),
    so compare their shapes, not their heights."""
    dims = sorted({run.embedding_dim for run in runs})
    figure = Figure(figsize=(5.0 * len(dims), 7.0), layout="constrained")
    axes = figure.subplots(2, len(dims), squeeze=False)
    for column, dim in enumerate(dims):
        loss_axis, accuracy_axis = axes[0, column], axes[1, column]
        for run in (run for run in runs if run.embedding_dim == dim):
            colour = HEAD_COLOURS.get(run.head, None)
            losses = np.asarray(run.step_losses)
            window = max(1, len(losses) // 40)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            epochs = len(run.epoch_rows)
            steps = (np.arange(len(smooth)) + window) * epochs / max(len(losses), 1)
            loss_axis.plot(steps, smooth, color=colour, label=run.label)
            accuracy_axis.plot(
                [row["epoch"] for row in run.epoch_rows],
                [100 * row["test_accuracy"] for row in run.epoch_rows],
                marker="o",
                color=colour,
                label=run.label,
            )
        loss_axis.set_yscale("log")
        loss_axis.set_xlabel("epoch")
        loss_axis.set_ylabel("training loss (moving average)")
        loss_axis.set_title(f"d={dim}: training loss")
        loss_axis.legend(fontsize=8)
        accuracy_axis.set_xlabel("epoch")
        accuracy_axis.set_ylabel("test accuracy (%)")
        accuracy_axis.set_title(f"d={dim}: test accuracy")
        accuracy_axis.xaxis.get_major_locator().set_params(integer=True)
        accuracy_axis.legend(fontsize=8)
    figure.suptitle(f"Training curves: {title}")
    figure.savefig(path, dpi=110)
    return path


def plot_accuracy_table(
    cells: Sequence[Sequence[str]], columns: Sequence[str], path: Path, title: str
) -> Path:
    """The accuracy table (one row per head) rendered as an image for reports."""
    figure = Figure(figsize=(2.2 + 1.7 * len(columns), 0.9 + 0.35 * len(cells)))
    axis = figure.add_subplot()
    axis.axis("off")
    table = axis.table(
        cellText=[list(row) for row in cells],
        colLabels=list(columns),
        loc="center",
        cellLoc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.scale(1.0, 1.4)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("0.9")
    axis.set_title(f"Test accuracy: {title}", fontsize=10)
    figure.savefig(path, dpi=130, bbox_inches="tight")
    return path
