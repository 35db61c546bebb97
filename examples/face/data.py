"""Read the HW2P2 face data as it is laid out: ImageFolder datasets, flat probe folders, CSVs.

Expected layout (the toy generator ``make_toy_faces.py`` writes exactly this)::

    <root>/classification/{train,dev,test}/<identity>/<image>.jpg
    <root>/classification/classification_sample_submission.csv
    <root>/verification/known/<identity>/<image>.jpg
    <root>/verification/{unknown_dev,unknown_test}/<image>.jpg
    <root>/verification/{verification_dev.csv,verification_sample_submission.csv}

Whatever is missing or inconsistent raises :class:`DataLayoutError` with the offending
path in the message; the scripts print it as ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NO_MATCH_LABEL = "n000000"

CLASSIFICATION_SPLITS = ("train", "dev", "test")
VERIFICATION_FOLDERS = ("known", "unknown_dev", "unknown_test")
CLASSIFICATION_SUBMISSION = "classification_sample_submission.csv"
VERIFICATION_DEV = "verification_dev.csv"
VERIFICATION_SUBMISSION = "verification_sample_submission.csv"


class DataLayoutError(Exception):
    """The data folder does not have the HW2P2 layout; the message names the path at fault."""


def check_root(root: Path) -> None:
    """Raise :class:`DataLayoutError` unless ``root`` is an existing folder."""
    if not root.exists():
        raise DataLayoutError(f"data folder {root} does not exist (generate one with make_toy_faces.py --out {root})")
    if not root.is_dir():
        raise DataLayoutError(f"data folder {root} is not a directory")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataLayoutError(f"missing {path}: expected {what} (HW2P2 layout, see examples/face/README.md)")
    return path


def classification_dir(root: Path, split: str) -> Path:
    """``<root>/classification/<split>``, checked to exist."""
    check_root(root)
    if split not in CLASSIFICATION_SPLITS:
        raise ValueError(f"split must be one of {CLASSIFICATION_SPLITS}, got {split!r}")
    return _require(root / "classification" / split, f"the classification {split} split with one folder per identity")


def verification_dir(root: Path, folder: str) -> Path:
    """``<root>/verification/<folder>``, checked to exist."""
    check_root(root)
    if folder not in VERIFICATION_FOLDERS:
        raise ValueError(f"folder must be one of {VERIFICATION_FOLDERS}, got {folder!r}")
    kind = "one folder per known identity" if folder == "known" else "a flat folder of images"
    return _require(root / "verification" / folder, f"verification/{folder}: {kind}")


def classification_csv(root: Path) -> Path:
    check_root(root)
    return _require(root / "classification" / CLASSIFICATION_SUBMISSION, "the classification sample submission (id,label)")


def verification_csv(root: Path, name: str) -> Path:
    check_root(root)
    return _require(root / "verification" / name, f"{name} (id,label)")


def check_layout(root: Path) -> None:
    """Check that every folder and CSV of the HW2P2 layout exists, classification and
    verification alike, so a missing piece is reported before training, not after it."""
    for split in CLASSIFICATION_SPLITS:
        classification_dir(root, split)
    classification_csv(root)
    for folder in VERIFICATION_FOLDERS:
        verification_dir(root, folder)
    verification_csv(root, VERIFICATION_DEV)
    verification_csv(root, VERIFICATION_SUBMISSION)


def identity_difference(found: Sequence[str], expected: Sequence[str], limit: int = 5) -> str:
    """Which identity folders are extra and which are missing, naming up to ``limit`` of each.

    >>> identity_difference(["n1", "n2", "n4"], ["n1", "n2", "n3"])
    'extra: n4; missing: n3'
    """

    def named(names: list[str]) -> str:
        return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")

    extra = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    parts = ([f"extra: {named(extra)}"] if extra else []) + ([f"missing: {named(missing)}"] if missing else [])
    return "; ".join(parts) or "the same names in another order"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _check_class_folders(folder: Path) -> list[str]:
    """Class folder names of an ImageFolder root; every one must hold at least one image."""
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not classes:
        raise DataLayoutError(f"{folder} holds no identity folders (expected {folder}/<identity>/<image>.jpg)")
    for name in classes:
        if not any(_is_image(path) for path in (folder / name).iterdir()):
            raise DataLayoutError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return classes


def image_folder(folder: Path, transform: Callable[[Image.Image], torch.Tensor] | None = None) -> datasets.ImageFolder:
    """A torchvision ImageFolder over ``folder``, after checking that no class folder is empty."""
    _check_class_folders(folder)
    return datasets.ImageFolder(str(folder), transform=transform)


class FlatImages(Dataset):
    """The images of a flat folder (``unknown_dev``, ``unknown_test``), sorted by file name.

    Items are ``(image, index)``; :attr:`names` holds the file names in that order.
    """

    def __init__(self, folder: Path, transform: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        self.folder = folder
        self.names = sorted(path.name for path in folder.iterdir() if _is_image(path))
        if not self.names:
            raise DataLayoutError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.folder / self.names[index]) as image:
            rgb = image.convert("RGB")
        return (self.transform(rgb) if self.transform else transforms.functional.to_tensor(rgb)), index


def read_id_label_csv(path: Path, image_names: Sequence[str]) -> list[tuple[str, str]]:
    """Rows ``(id, label)`` of an ``id,label`` CSV whose ids must all be in ``image_names``."""
    known = set(image_names)
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [column.strip().lower() for column in header[:2]] != ["id", "label"]:
            raise DataLayoutError(f"{path}: expected the header 'id,label', got {header!r}")
        rows = [(row[0].strip(), row[1].strip() if len(row) > 1 else "") for row in reader if row]
    missing = [image_id for image_id, _ in rows if image_id not in known]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataLayoutError(f"{path} names {len(missing)} image(s) that do not exist: {shown}")
    return rows


# --- transforms ----------------------------------------------------------------------------


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """Augmentations the HW2P2 material recommends for faces, then normalisation.

    Random resized crops (mild: faces are already roughly centred), horizontal flips (never
    vertical: upside-down faces do not occur), small rotations, brightness/contrast/saturation
    jitter without hue changes (skin and hair colour are identity cues), and random erasing
    as an occlusion stand-in.
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.75, 1.0), ratio=(0.9, 1.1)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(8),
        transforms.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.2),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
        transforms.RandomErasing(p=0.2, scale=(0.02, 0.12)),
    ])


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """Resize to ``image_size`` and normalise: what dev, test and verification images get."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def channel_stats(folder: Path, cache: Path | None = None, image_size: int | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the images under ``folder`` (values in [0, 1]).

    The result is cached in the JSON file ``cache`` (when given) together with the folder
    and its image count; a cache that does not match is recomputed.
    """
    paths = sorted(path for path in folder.rglob("*") if _is_image(path))
    if not paths:
        raise DataLayoutError(f"{folder} holds no images to compute the normalisation from")
    key = {"folder": str(folder.resolve()), "images": len(paths), "image_size": image_size}
    if cache is not None and cache.exists():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return list(stored["mean"]), list(stored["std"])
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable cache is recomputed below
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        if image_size is not None:
            rgb = rgb.resize((image_size, image_size))
        pixels = transforms.functional.to_tensor(rgb).to(torch.float64).flatten(1)
        total += pixels.sum(1)
        total_sq += (pixels * pixels).sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    result = (mean.tolist(), std.tolist())
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "mean": result[0], "std": result[1]}, indent=2) + "\n")
    return result
