"""Draw the decision-boundary and target-logit figures of the documentation.

All four figures are computed with :mod:`marginloss.functional` itself, so they show what the
heads compute, not a re-derivation:

``decision_boundaries.png``
    Binary classification with two unit class weights :math:`w_1, w_2`: a sample at angles
    :math:`(\\theta_1, \\theta_2)` from them is decided for class 1 *with margin* where the
    margin target of class 1 still beats the other logit, :math:`f(\\cos\\theta_1) >
    \\cos\\theta_2`, and likewise for class 2.  The grey band between the two is the decision
    margin: a training sample there still pays loss although it is classified correctly.
    Top row in angle space, bottom row in cosine space, for softmax (normalised, i.e.
    NormFace), SphereFace, CosFace and ArcFace with the papers' margins.
``decision_boundaries_adaptive.png``
    The same for AdaFace at the normalised norms :math:`\\hat z = -1, +1` and MagFace at the
    magnitudes :math:`a = 10, 110` (the ends of its range), a pair of samples of the same
    quality.
``target_logits.png``
    The target logit :math:`f(\\cos\\theta)` of each head against the angle to its class
    (left) and the margin it amounts to in angle, :math:`\\arccos f(\\cos\\theta) - \\theta`
    (right): constant for ArcFace, growing with :math:`\\theta` for SphereFace, shrinking for
    CosFace.
``target_logits_adaptive.png``
    The same two panels for the newer heads, each at its release defaults with its state
    fixed: CurricularFace (whose target is ArcFace's), ElasticFace-Arc at its mean margin
    with the band of :math:`m \\pm 2\\sigma`, AdaFace at the normalised norms
    :math:`\\hat z = -1, 0, 1`, MagFace at the magnitudes :math:`a = 10, 60, 110`, UniFace and
    SphereFace2-C; a third panel shows the non-target logits that CurricularFace (at
    :math:`t = 0, 0.5, 1`) and SphereFace2 change.  AdaCos has no margin (its target is
    :math:`\\cos\\theta`).

The documentation build runs this script (``docs/_ext/marginloss_docs.py``); to draw the
figures by hand::

    python docs/scripts/decision_boundaries.py --out-dir docs/_generated
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from marginloss import functional as MF

Transform = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "_generated"
# Same colour per head in every figure of the docs.
COLOURS = {
    "softmax": "black",
    "sphereface": "tab:green",
    "cosface": "tab:blue",
    "arcface": "tab:red",
    "combined": "tab:purple",
    "elasticface": "tab:orange",
    "adaface": "tab:cyan",
    "magface": "tab:brown",
    "uniface": "tab:pink",
    "sphereface2": "tab:olive",
}
CLASS_COLOURS = ListedColormap(["#9ecae1", "#d9d9d9", "#fdae6b"])  # class 2, margin, class 1
PNG_METADATA = {"Software": None}  # byte-stable output across matplotlib versions


def boundary_heads(arcface_margin: float, cosface_margin: float, sphereface_margin: int) -> list[tuple[str, str, Transform]]:
    """``(key, title, f)`` of the four heads of the decision-boundary figure."""
    return [
        ("softmax", "Softmax (normalised) / NormFace", lambda cos: cos),
        (
            "sphereface",
            f"SphereFace, $m={sphereface_margin}$",
            lambda cos: MF.sphereface_target(cos, sphereface_margin),
        ),
        ("cosface", f"CosFace, $m={cosface_margin:g}$", lambda cos: MF.cosface_target(cos, cosface_margin)),
        ("arcface", f"ArcFace, $m={arcface_margin:g}$", lambda cos: MF.arcface_target(cos, arcface_margin)),
    ]


def adaptive_boundary_heads() -> list[tuple[str, str, Transform]]:
    """``(key, title, f)`` of ``decision_boundaries_adaptive.png``: AdaFace at a low and a high
    normalised norm and MagFace at both ends of its magnitude range, at the releases'
    defaults (both samples of a pair sharing the quality)."""
    heads: list[tuple[str, str, Transform]] = []
    for z, quality in ((-1.0, "low"), (1.0, "high")):
        heads.append(
            (
                "adaface",
                rf"AdaFace $m=0.4$, $\hat z={z:+g}$ ({quality} quality)",
                lambda cos, z=z: MF.adaface_target(cos, torch.full_like(cos, z), 0.4),
            )
        )
    for a in (10.0, 110.0):
        heads.append(
            (
                "magface",
                rf"MagFace $a={a:g}$: $m(a)={float(MF.magface_margin(torch.tensor(a))):.2g}$",
                lambda cos, a=a: MF.magface_target(cos, MF.magface_margin(torch.full_like(cos, a))),
            )
        )
    return heads


def decision_regions(transform: Transform, cos_1: torch.Tensor, cos_2: torch.Tensor) -> torch.Tensor:
    """+1 where class 1 wins with margin, -1 where class 2 does, 0 in the margin between."""
    class_1 = transform(cos_1) > cos_2
    class_2 = transform(cos_2) > cos_1
    return class_1.to(torch.int64) - class_2.to(torch.int64)


def _pi_ticks(axis: object, which: str) -> None:
    ticks = [0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi]
    labels = ["0", r"$\pi/4$", r"$\pi/2$", r"$3\pi/4$", r"$\pi$"]
    getattr(axis, f"set_{which}ticks")(ticks)
    getattr(axis, f"set_{which}ticklabels")(labels)


def draw_decision_boundaries(
    arcface_margin: float = 0.5,
    cosface_margin: float = 0.35,
    sphereface_margin: int = 4,
    resolution: int = 600,
    heads: list[tuple[str, str, Transform]] | None = None,
    suptitle: str = "Decision boundaries of two classes (grey: the margin a training sample must clear)",
) -> Figure:
    if heads is None:
        heads = boundary_heads(arcface_margin, cosface_margin, sphereface_margin)
    figure = Figure(figsize=(3.1 * len(heads), 6.4), layout="constrained")
    axes = figure.subplots(2, len(heads))
    theta = torch.linspace(0.0, math.pi, resolution, dtype=torch.float64)
    theta_1, theta_2 = torch.meshgrid(theta, theta, indexing="xy")
    cos = torch.linspace(-1.0, 1.0, resolution, dtype=torch.float64)
    cos_1, cos_2 = torch.meshgrid(cos, cos, indexing="xy")
    for column, (key, title, transform) in enumerate(heads):
        for row, (grid_1, grid_2, x1, x2) in enumerate(
            (
                (theta_1, theta_2, torch.cos(theta_1), torch.cos(theta_2)),
                (cos_1, cos_2, cos_1, cos_2),
            )
        ):
            axis = axes[row, column]
            regions = decision_regions(transform, x1, x2)
            axis.pcolormesh(
                grid_1.numpy(), grid_2.numpy(), regions.numpy(), cmap=CLASS_COLOURS,
                vmin=-1, vmax=1, shading="auto", rasterized=True,
            )
            for sign in (1, -1):
                axis.contour(
                    grid_1.numpy(), grid_2.numpy(), (regions == sign).to(torch.float64).numpy(),
                    levels=[0.5], colors=COLOURS[key], linewidths=1.6,
                )
            diagonal = [grid_1.min().item(), grid_1.max().item()]
            axis.plot(diagonal, diagonal, color="black", linestyle=":", linewidth=0.8)
            axis.set_aspect("equal")
            if row == 0:
                axis.set_title(title, fontsize=10)
                _pi_ticks(axis, "x")
                _pi_ticks(axis, "y")
                axis.set_xlabel(r"$\theta_1$")
                axis.set_ylabel(r"$\theta_2$")
            else:
                axis.set_xlabel(r"$\cos\theta_1$")
                axis.set_ylabel(r"$\cos\theta_2$")
    axes[0, 0].text(
        0.3, 2.6, "class 1", fontsize=9, ha="left", va="center",
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7},
    )
    axes[0, 0].text(
        2.6, 0.3, "class 2", fontsize=9, ha="center", va="center",
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7},
    )
    figure.suptitle(suptitle, fontsize=11)
    return figure


Curve = tuple[str, str, str, torch.Tensor]  # (colour key, line style, label, f(cos θ) / scale)


def target_curves(theta: torch.Tensor) -> list[Curve]:
    """The curves of ``target_logits.png``: the 0.1 heads with the papers' margins."""
    cos = torch.cos(theta)
    return [
        ("softmax", "-", r"softmax / NormFace: $\cos\theta$", cos),
        ("sphereface", "-", r"SphereFace $m=4$, $\lambda=0$: $\psi(\theta)$", MF.sphereface_target(cos, 4)),
        (
            "sphereface",
            "--",
            r"SphereFace $m=4$, $\lambda=5$ (end of annealing)",
            MF.sphereface_target(cos, 4, lambda_=5.0),
        ),
        ("cosface", "-", r"CosFace $m=0.35$: $\cos\theta - m$", MF.cosface_target(cos, 0.35)),
        ("arcface", "-", r"ArcFace $m=0.5$: $\cos(\theta + m)$", MF.arcface_target(cos, 0.5)),
        (
            "combined",
            "-",
            r"combined $(1, 0.3, 0.2)$: $\cos(\theta + 0.3) - 0.2$",
            MF.combined_margin_target(cos, 1.0, 0.3, 0.2),
        ),
    ]


#: AdaFace's normalised norms and MagFace's magnitudes drawn in ``target_logits_adaptive.png``.
ADAFACE_QUALITIES = (-1.0, 0.0, 1.0)
MAGFACE_MAGNITUDES = (10.0, 60.0, 110.0)
ELASTIC_SIGMA = 0.05
_STYLES = ("-", "--", ":")


def adaptive_target_curves(theta: torch.Tensor) -> list[Curve]:
    r"""The curves of ``target_logits_adaptive.png``: the heads whose target is still a function
    of the target cosine alone once their state is fixed, at their release defaults.

    CurricularFace's target is ArcFace's (it changes the non-target logits instead);
    ElasticFace-Arc is drawn at its mean margin; AdaFace at three normalised norms
    :math:`\hat z`; MagFace at three magnitudes :math:`a` (its margin :math:`m(a)`); UniFace
    and SphereFace2 are per-class sigmoid heads, whose target is compared with a learnt
    threshold rather than with the other classes (drawn in cosine units, SphereFace2's
    after its similarity adjustment :math:`g`).
    """
    cos = torch.cos(theta)
    curves: list[Curve] = [
        ("softmax", "-", r"softmax / NormFace / AdaCos: $\cos\theta$", cos),
        (
            "arcface",
            "-",
            r"ArcFace = CurricularFace $m=0.5$: $\cos(\theta + m)$",
            MF.arcface_target(cos, 0.5),
        ),
        (
            "elasticface",
            "--",
            rf"ElasticFace-Arc, mean $m=0.5$ ($\sigma={ELASTIC_SIGMA:g}$, band $\pm 2\sigma$)",
            MF.elasticface_target(cos, 0.5),
        ),
    ]
    for style, z in zip(_STYLES, ADAFACE_QUALITIES):
        scaler = torch.full_like(cos, z)
        curves.append(("adaface", style, rf"AdaFace $m=0.4$, $\hat z={z:+g}$", MF.adaface_target(cos, scaler, 0.4)))
    for style, a in zip(_STYLES, MAGFACE_MAGNITUDES):
        margin = MF.magface_margin(torch.full_like(cos, a))
        curves.append(
            ("magface", style, rf"MagFace $a={a:g}$: $m(a)={float(margin[0]):.3g}$", MF.magface_target(cos, margin))
        )
    curves += [
        ("uniface", "-", r"UniFace $m=0.4$: $\cos\theta - m$ (= AdaFace $\hat z=0$)", MF.uniface_target(cos, 0.4)),
        ("sphereface2", "-", r"SphereFace2-C $m=0.4, t=3$: $g(\cos\theta) - m$", MF.sphereface2_target(cos, 0.4)),
    ]
    return curves


#: The target angle and the curriculum parameters of the non-target panel.
CURRICULAR_THETA_Y = math.pi / 4
CURRICULAR_T = (0.0, 0.5, 1.0)


def non_target_curves(theta: torch.Tensor) -> list[Curve]:
    r"""The right panel of ``target_logits_adaptive.png``: non-target logit / scale against the
    angle :math:`\theta_j` to the other class.

    CurricularFace at :math:`t = 0, 0.5, 1` for a sample at :math:`\theta_y = \pi/4` from its
    own class (negatives above :math:`\cos(\theta_y + m)` become
    :math:`\cos\theta_j(t + \cos\theta_j)`), and SphereFace2-C's :math:`g(\cos\theta) + m`.
    """
    cos = torch.cos(theta)
    cos_target = torch.full_like(cos, math.cos(CURRICULAR_THETA_Y))
    curves: list[Curve] = [("softmax", "-", r"every other head: $\cos\theta_j$", cos)]
    for style, t in zip(_STYLES, CURRICULAR_T):
        curves.append(
            (
                "arcface",
                style,
                rf"CurricularFace $t={t:g}$ ($\theta_y=\pi/4$, $m=0.5$)",
                MF.curricularface_non_target(cos, cos_target, 0.5, t=t),
            )
        )
    curves.append(
        ("sphereface2", "-", r"SphereFace2-C: $g(\cos\theta_j) + m$", MF.sphereface2_non_target(cos, 0.4))
    )
    return curves


def _logit_and_margin_panels(
    logit_axis: object, margin_axis: object, theta: torch.Tensor, curves: list[Curve],
    legend_size: float = 7.5, legend_loc: str | None = "lower left",
) -> None:
    for key, style, label, target in curves:
        logit_axis.plot(theta.numpy(), target.numpy(), color=COLOURS[key], linestyle=style, label=label)
        inside = target >= -1.0
        angle = torch.arccos(target[inside].clamp(-1.0, 1.0)) - theta[inside]
        margin_axis.plot(theta[inside].numpy(), angle.numpy(), color=COLOURS[key], linestyle=style)
    logit_axis.set_ylim(-2.0, 1.05)
    logit_axis.set_xlabel(r"angle $\theta$ between embedding and its class weight")
    logit_axis.set_ylabel(r"target logit / scale, $f(\cos\theta)$")
    logit_axis.set_title("Target logit", fontsize=10)
    if legend_loc:
        logit_axis.legend(fontsize=legend_size, loc=legend_loc)
    margin_axis.set_xlabel(r"angle $\theta$")
    margin_axis.set_ylabel(r"angular margin $\arccos f(\cos\theta) - \theta$")
    margin_axis.set_title(r"Margin in angle (where $f \geq -1$)", fontsize=10)
    margin_axis.set_ylim(bottom=0.0)
    for axis in (logit_axis, margin_axis):
        _pi_ticks(axis, "x")
        axis.grid(alpha=0.3)


def draw_target_logits(resolution: int = 721) -> Figure:
    theta = torch.linspace(0.0, math.pi, resolution, dtype=torch.float64)
    figure = Figure(figsize=(11.0, 4.2), layout="constrained")
    logit_axis, margin_axis = figure.subplots(1, 2)
    _logit_and_margin_panels(logit_axis, margin_axis, theta, target_curves(theta))
    return figure


def draw_adaptive_target_logits(resolution: int = 721) -> Figure:
    """Target logits of the newer heads (left, middle) and the non-target logits that
    CurricularFace and SphereFace2 change (right)."""
    theta = torch.linspace(0.0, math.pi, resolution, dtype=torch.float64)
    figure = Figure(figsize=(16.0, 5.6), layout="constrained")
    logit_axis, margin_axis, other_axis = figure.subplots(1, 3)
    # ElasticFace's band: the targets of margins m ± 2σ (left) and those margins (middle).
    cos = torch.cos(theta)
    spread = 2 * ELASTIC_SIGMA
    logit_axis.fill_between(
        theta.numpy(), MF.elasticface_target(cos, 0.5 + spread).numpy(),
        MF.elasticface_target(cos, 0.5 - spread).numpy(),
        color=COLOURS["elasticface"], alpha=0.2, linewidth=0,
    )
    inside = theta + 0.5 + spread <= math.pi
    margin_axis.fill_between(
        theta[inside].numpy(), 0.5 - spread, 0.5 + spread, color=COLOURS["elasticface"], alpha=0.2, linewidth=0,
    )
    _logit_and_margin_panels(
        logit_axis, margin_axis, theta, adaptive_target_curves(theta),
        legend_loc=None,
    )
    figure.legend(
        *logit_axis.get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=7.5,
    )
    for key, style, label, logit in non_target_curves(theta):
        other_axis.plot(theta.numpy(), logit.numpy(), color=COLOURS[key], linestyle=style, label=label)
    other_axis.axvline(CURRICULAR_THETA_Y + 0.5, color="grey", linewidth=0.8, linestyle=":")
    other_axis.set_ylim(-2.0, 2.05)
    other_axis.set_xlabel(r"angle $\theta_j$ to another class")
    other_axis.set_ylabel(r"non-target logit / scale")
    other_axis.set_title(r"Non-target logit (dotted: $\theta_y + m$)", fontsize=10)
    other_axis.legend(fontsize=7.0, loc="lower left")
    _pi_ticks(other_axis, "x")
    other_axis.grid(alpha=0.3)
    figure.suptitle(
        "The newer heads at their release defaults (per-sample state fixed)",
        fontsize=11,
    )
    return figure


def save(figure: Figure, path: Path, dpi: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=dpi, metadata=PNG_METADATA)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Draw decision_boundaries.png, decision_boundaries_adaptive.png, target_logits.png "
            "and target_logits_adaptive.png for the documentation."
        ),
    )
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR,
        help=f"folder to write the four PNG files to (default {DEFAULT_OUT_DIR})",
    )
    parser.add_argument("--dpi", type=int, default=110, help="resolution of the PNG files (default 110)")
    parser.add_argument("--arcface-margin", type=float, default=0.5, help="ArcFace m in radians (default 0.5)")
    parser.add_argument("--cosface-margin", type=float, default=0.35, help="CosFace m (default 0.35)")
    parser.add_argument("--sphereface-margin", type=int, default=4, help="SphereFace m (default 4)")
    parser.add_argument("--resolution", type=int, default=600, help="grid points per axis (default 600)")
    args = parser.parse_args(argv)
    save(
        draw_decision_boundaries(
            args.arcface_margin, args.cosface_margin, args.sphereface_margin, args.resolution
        ),
        args.out_dir / "decision_boundaries.png",
        args.dpi,
    )
    save(
        draw_decision_boundaries(
            resolution=args.resolution,
            heads=adaptive_boundary_heads(),
            suptitle="Decision boundaries of the quality-aware heads (both samples of the same quality)",
        ),
        args.out_dir / "decision_boundaries_adaptive.png",
        args.dpi,
    )
    save(draw_target_logits(), args.out_dir / "target_logits.png", args.dpi)
    save(draw_adaptive_target_logits(), args.out_dir / "target_logits_adaptive.png", args.dpi)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
