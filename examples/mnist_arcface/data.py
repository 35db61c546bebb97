"""Datasets for the MNIST/CIFAR-10 ArcFace example, held as in-memory tensors.

* ``mnist`` / ``cifar10`` come from torchvision (``download=True`` fetches them once).
* ``synthetic`` needs nothing: digit-like seven-segment glyphs drawn procedurally, 28x28
  grey like MNIST, with per-sample handwriting jitter, pixel noise, a stray stroke and the
  odd missing segment, so that the classes are learnable but not trivially separable.

Everything is converted to normalised float tensors up front: a small CNN on CPU spends
most of its time in per-sample PIL transforms otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DATA_NAMES", "DataSplit", "ImageData", "load_data", "make_glyphs"]

DATA_NAMES = ("mnist", "cifar10", "synthetic")

_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# Seven-segment layout in glyph units (x right, y up; the glyph spans x in [-0.5, 0.5],
# y in [-1, 1]).  Segment order: top, upper right, lower right, bottom, lower left,
# upper left, middle.
_SEGMENTS = torch.tensor(
    [
        [[-0.5, 1.0], [0.5, 1.0]],
        [[0.5, 1.0], [0.5, 0.0]],
        [[0.5, 0.0], [0.5, -1.0]],
        [[-0.5, -1.0], [0.5, -1.0]],
        [[-0.5, -1.0], [-0.5, 0.0]],
        [[-0.5, 0.0], [-0.5, 1.0]],
        [[-0.5, 0.0], [0.5, 0.0]],
    ]
)
_DIGIT_SEGMENTS = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 0],  # 0
        [0, 1, 1, 0, 0, 0, 0],  # 1
        [1, 1, 0, 1, 1, 0, 1],  # 2
        [1, 1, 1, 1, 0, 0, 1],  # 3
        [0, 1, 1, 0, 0, 1, 1],  # 4
        [1, 0, 1, 1, 0, 1, 1],  # 5
        [1, 0, 1, 1, 1, 1, 1],  # 6
        [1, 1, 1, 0, 0, 0, 0],  # 7
        [1, 1, 1, 1, 1, 1, 1],  # 8
        [1, 1, 1, 1, 0, 1, 1],  # 9
    ],
    dtype=torch.bool,
)


@dataclass(frozen=True)
class DataSplit:
    """One split: ``images`` ``[N, C, H, W]`` float32 (normalised), ``labels`` ``[N]`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass(frozen=True)
class ImageData:
    """A train/test pair plus what a plot legend needs."""

    name: str
    train: DataSplit
    test: DataSplit
    class_names: tuple[str, ...]

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])


def make_glyphs(
    num_samples: int, *, generator: torch.Generator, size: int = 28
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` noisy seven-segment digits, classes balanced, order shuffled.

    Returns ``images`` ``[N, 1, size, size]`` in ``[0, 1]`` and ``labels`` ``[N]`` int64.
    The same generator state always gives the same images.
    """
    labels = torch.arange(num_samples) % 10
    labels = labels[torch.randperm(num_samples, generator=generator)]
    images = torch.empty(num_samples, 1, size, size)
    # Chunks bound the [chunk, segments, pixels] distance tensor to a few MiB.
    for start in range(0, num_samples, 1024):
        chunk = labels[start : start + 1024]
        images[start : start + len(chunk), 0] = _draw_glyphs(chunk, generator, size)
    return images, labels


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def _draw_glyphs(labels: torch.Tensor, gen: torch.Generator, size: int) -> torch.Tensor:
    n = len(labels)
    segments = _SEGMENTS.expand(n, -1, -1, -1).clone()  # [n, 7, 2 endpoints, 2 xy]
    # Handwriting wobble: every endpoint moves on its own, so strokes bend and gaps open.
    segments += 0.09 * torch.randn(segments.shape, generator=gen)
    active = _DIGIT_SEGMENTS[labels].clone()
    # A rare missing stroke turns an 8 into a 0/6/9 look-alike: a little genuine ambiguity.
    active &= torch.rand(active.shape, generator=gen) > 0.003

    # One stray stroke per image, anywhere near the glyph, shown with probability 0.2.
    stray_start = _uniform((n, 1, 2), -0.7, 0.7, gen) * torch.tensor([1.0, 1.4])
    stray_angle = _uniform((n, 1), 0.0, math.pi, gen)
    stray_length = _uniform((n, 1), 0.2, 0.6, gen)
    stray_end = stray_start + stray_length[..., None] * torch.stack(
        (stray_angle.cos(), stray_angle.sin()), dim=-1
    )
    segments = torch.cat((segments, torch.stack((stray_start, stray_end), dim=2)), dim=1)
    active = torch.cat((active, torch.rand(n, 1, generator=gen) < 0.2), dim=1)

    # Per-image affine pose: scale, aspect, slant, rotation, shift (glyph units -> pixels).
    height_px = _uniform((n,), 0.26, 0.36, gen) * size  # half the glyph height, in pixels
    aspect = _uniform((n,), 0.8, 1.25, gen)
    slant = _uniform((n,), -0.35, 0.1, gen)
    angle = torch.randn(n, generator=gen) * math.radians(8.0)
    shift = torch.randn(n, 2, generator=gen) * 1.5
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)
    shear = torch.zeros(n, 2, 2)
    shear[:, 0, 0] = aspect
    shear[:, 0, 1] = slant
    shear[:, 1, 1] = 1.0
    pose = height_px[:, None, None] * rotation @ shear  # [n, 2, 2]
    points = torch.einsum("nij,nskj->nski", pose, segments)
    # Image rows grow downwards, so y flips; the glyph centre sits mid-image.
    points = points * torch.tensor([1.0, -1.0]) + (size - 1) / 2 + shift[:, None, None, :]

    coords = torch.arange(size, dtype=torch.float32)
    pixels = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1).reshape(-1, 2)
    start, end = points[:, :, None, 0], points[:, :, None, 1]  # [n, S, 1, 2]
    direction = end - start
    along = ((pixels - start) * direction).sum(-1) / direction.pow(2).sum(-1).clamp_min(1e-6)
    nearest = start + along.clamp(0, 1)[..., None] * direction
    distance = (pixels - nearest).norm(dim=-1)  # [n, S, size*size]

    half_width = _uniform((n, 1, 1), 0.7, 1.4, gen)  # stroke half-width in pixels
    ink = (half_width + 0.5 - distance).clamp(0, 1) * active[..., None]
    ink = ink.amax(dim=1) * _uniform((n, 1), 0.7, 1.0, gen)  # pen pressure
    ink = ink + 0.12 * torch.randn(ink.shape, generator=gen)
    return ink.clamp(0, 1).reshape(n, size, size)


def load_data(
    name: str,
    *,
    root: str | Path,
    download: bool,
    train_size: int | None,
    test_size: int | None,
    seed: int,
) -> ImageData:
    """Load ``name`` (one of :data:`DATA_NAMES`) as normalised in-memory tensors.

    ``train_size``/``test_size`` keep a seeded random subset (``None``: the whole split;
    required for ``synthetic``, which has no natural size).

    Raises
    ------
    FileNotFoundError
        When a torchvision dataset is not under ``root`` and ``download`` is off, or the
        download fails (no internet); the message says what to do instead.
    """
    if name == "synthetic":
        if train_size is None or test_size is None:
            raise ValueError("synthetic data needs explicit train_size and test_size")
        generator = torch.Generator().manual_seed(seed)
        train_images, train_labels = make_glyphs(train_size, generator=generator)
        test_images, test_labels = make_glyphs(test_size, generator=generator)
        mean, std = train_images.mean().item(), train_images.std().item()
        return ImageData(
            name=name,
            train=DataSplit((train_images - mean) / std, train_labels),
            test=DataSplit((test_images - mean) / std, test_labels),
            class_names=tuple(str(digit) for digit in range(10)),
        )
    if name in ("mnist", "cifar10"):
        return _load_torchvision(name, Path(root), download, train_size, test_size, seed)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATA_NAMES)}")


def _load_torchvision(
    name: str,
    root: Path,
    download: bool,
    train_size: int | None,
    test_size: int | None,
    seed: int,
) -> ImageData:
    # Imported here: torchvision is only needed for the real datasets.
    from torchvision import datasets

    dataset_class = datasets.MNIST if name == "mnist" else datasets.CIFAR10
    splits = []
    for train in (True, False):
        try:
            dataset = dataset_class(str(root), train=train, download=download)
        except RuntimeError as exc:  # torchvision's "Dataset not found" / corrupt archive
            raise FileNotFoundError(
                f"{name} not found under {str(root)!r} ({exc}). Pass --download to fetch it "
                "(needs internet), point --root at an existing copy, or use --data synthetic "
                "to run offline."
            ) from exc
        except OSError as exc:  # urllib errors while downloading
            raise FileNotFoundError(
                f"downloading {name} into {str(root)!r} failed ({exc}); "
                "use --data synthetic to run offline."
            ) from exc
        if name == "mnist":
            images = dataset.data[:, None].float().div_(255)
            mean, std = _MNIST_MEAN, _MNIST_STD
        else:
            images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float().div_(255)
            mean, std = _CIFAR10_MEAN, _CIFAR10_STD
        images = (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
        keep = train_size if train else test_size
        if keep is not None and keep < len(labels):
            generator = torch.Generator().manual_seed(seed + (0 if train else 1))
            index = torch.randperm(len(labels), generator=generator)[:keep]
            images, labels = images[index], labels[index]
        splits.append(DataSplit(images.contiguous(), labels))
    class_names = tuple(str(digit) for digit in range(10)) if name == "mnist" else _CIFAR10_CLASSES
    return ImageData(name=name, train=splits[0], test=splits[1], class_names=class_names)
