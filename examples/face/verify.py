"""Evaluate a trained checkpoint and write both HW2P2 Kaggle submissions.

1. Embeds images with flip test-time augmentation: the embedding of an image is the
   average of the embeddings of the image and of its horizontal mirror.
2. Classification: dev accuracy (argmax of the head's margin-free logits) and predictions
   for ``classification/test`` -> ``<out>/classification_submission.csv``.
3. Verification (open-set identification): every ``unknown_dev`` image is matched against
   the ``known`` gallery by cosine similarity; below a threshold it is declared
   "no correspondence" (``n000000``). The threshold is the one that maximises accuracy on
   ``verification_dev.csv``; it is then applied to ``unknown_test`` ->
   ``<out>/verification_submission.csv``.
4. The numbers papers report, on the same dev probes and ``known`` gallery
   (:mod:`marginloss.metrics`; see the verification guide for which answers which question):
   rank-1 identification of the known probes (:func:`~marginloss.metrics.cmc_curve`), TPIR at
   FPIR 0.1 and 0.01 with the unknown probes as non-mated searches
   (:func:`~marginloss.metrics.tpir_at_fpir`, the IJB-C 1:N numbers) and TAR at FAR 1e-2 and
   1e-3 over every probe-gallery image pair (:func:`~marginloss.metrics.tar_at_far`).  A number
   the dev data cannot support (no unknown probes, say) is reported as ``n/a``.

Submissions keep the row order and column names of the sample submission files.

Example::

    python examples/face/verify.py --data data/toy_faces --checkpoint runs/arcface/last.pt
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `backbones` and `face` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from backbones import build
from face.data import (
    NO_MATCH_LABEL,
    VERIFICATION_DEV,
    VERIFICATION_SUBMISSION,
    DataLayoutError,
    FlatImages,
    classification_csv,
    classification_dir,
    eval_transform,
    identity_difference,
    image_folder,
    read_id_label_csv,
    verification_csv,
    verification_dir,
)
from face.model import CheckpointError, load_checkpoint, make_head
from face.train import resolve_device

UNKNOWN = -1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Writes <out>/classification_submission.csv and <out>/verification_submission.csv "
        "(columns and row order of the sample submissions) and prints dev accuracies. "
        "Errors in the data layout or checkpoint print 'error: ...' and exit with 2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset root in the HW2P2 layout")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint written by train.py (e.g. runs/x/last.pt)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the submissions (default: the checkpoint's folder)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    parser.add_argument("--no-flip", action="store_true", help="turn off flip test-time augmentation")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    parser.add_argument("--seed", type=int, default=0, help="random seed (verification is deterministic; kept for symmetry)")
    parser.add_argument("--smoke", action="store_true", help="accepted for CI symmetry; verification is already small")
    return parser


@torch.no_grad()
def embed(backbone: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, flip: bool,
          workers: int = 0, progress: bool = True, desc: str = "embed") -> torch.Tensor:
    """Embeddings ``[N, D]`` of every item's image, in dataset order (flip TTA if ``flip``)."""
    backbone.eval()
    chunks = []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    for images, _ in tqdm(loader, desc=desc, disable=not progress or not sys.stderr.isatty(), leave=False):
        images = images.to(device)
        embeddings = backbone(images).float()
        if flip:
            embeddings = (embeddings + backbone(torch.flip(images, dims=[3])).float()) / 2
        chunks.append(embeddings.cpu())
    return torch.cat(chunks)


def _write_submission(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        writer.writerows(rows)


FPIRS = (1e-1, 1e-2)
FARS = (1e-2, 1e-3)


def field_metrics(probes: torch.Tensor, probe_labels: torch.Tensor, gallery: torch.Tensor,
                  gallery_labels: torch.Tensor) -> dict[str, Any]:
    """Rank-1, TPIR@FPIR and TAR@FAR of labelled probes (``UNKNOWN`` = not in the gallery).

    Each is ``None`` where the data cannot define it (e.g. no unknown probes for TPIR@FPIR).
    """
    from marginloss.metrics import cmc_curve, pairwise_similarity, tar_at_far, tpir_at_fpir

    known = torch.isin(probe_labels, gallery_labels)
    num_identities = int(torch.unique(gallery_labels).numel())
    rank1 = None
    if bool(known.any()) and num_identities >= 2:
        rank1 = float(cmc_curve(probes[known], probe_labels[known], gallery, gallery_labels, max_rank=1)[0])
    tpir = None
    if bool(known.any()) and not bool(known.all()):
        tpir = tpir_at_fpir(probes, probe_labels, gallery, gallery_labels, fpirs=FPIRS)
    # Every probe against every gallery image: genuine pairs share the label.
    scores = pairwise_similarity(probes, gallery).flatten()
    is_same = (probe_labels.unsqueeze(1) == gallery_labels.unsqueeze(0)).flatten()
    tar = None
    if bool(is_same.any()) and not bool(is_same.all()):
        tar = tar_at_far(scores, is_same, fars=FARS)
    return {"identification_rank1": rank1, "tpir_at_fpir": tpir, "tar_at_far": tar,
            "num_impostor_pairs": int((~is_same).sum())}


def _rates(rates: dict[float, float] | None, name: str) -> str:
    if rates is None:
        return f"{name} n/a"
    return ", ".join(f"{name}={alpha:g}: {rate:.3f}" for alpha, rate in rates.items())


def verify(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate and write submissions; returns accuracies, threshold, chance levels, the
    field's metrics (rank-1, TPIR@FPIR, TAR@FAR) and paths."""
    from marginloss.metrics import open_set_identify, tune_open_set_threshold

    device = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    state = load_checkpoint(args.checkpoint)
    out: Path = args.out or args.checkpoint.parent
    root: Path = args.data
    # Check the whole layout before spending time on embeddings.
    dev_dir, test_dir = classification_dir(root, "dev"), classification_dir(root, "test")
    known_dir = verification_dir(root, "known")
    unknown_dev_dir, unknown_test_dir = verification_dir(root, "unknown_dev"), verification_dir(root, "unknown_test")
    class_csv = classification_csv(root)
    dev_csv, submission_csv = verification_csv(root, VERIFICATION_DEV), verification_csv(root, VERIFICATION_SUBMISSION)

    transform = eval_transform(state["image_size"], state["mean"], state["std"])
    classes: list[str] = state["classes"]
    dev_set = image_folder(dev_dir, transform)
    if dev_set.classes != classes:
        raise DataLayoutError(f"{dev_dir} holds other identity folders than the checkpoint was trained on "
                              f"({identity_difference(dev_set.classes, classes)})")
    test_set = image_folder(test_dir, transform)
    test_names = [Path(path).name for path, _ in test_set.samples]
    duplicates = [name for name, count in Counter(test_names).items() if count > 1]
    if duplicates:
        raise DataLayoutError(f"{test_dir}: image file names must be unique across identity folders, "
                              f"{duplicates[0]} occurs {test_names.count(duplicates[0])} times")
    class_rows = read_id_label_csv(class_csv, test_names)
    known_set = image_folder(known_dir, transform)
    unknown_dev = FlatImages(unknown_dev_dir, transform)
    unknown_test = FlatImages(unknown_test_dir, transform)
    dev_rows = read_id_label_csv(dev_csv, unknown_dev.names)
    test_rows = read_id_label_csv(submission_csv, unknown_test.names)
    known_index = {name: index for index, name in enumerate(known_set.classes)}
    bad = [label for _, label in dev_rows if label != NO_MATCH_LABEL and label not in known_index]
    if bad:
        raise DataLayoutError(f"{dev_csv} has label(s) that are neither a folder in {known_dir} nor {NO_MATCH_LABEL}: {bad[:5]}")

    backbone = build(state["backbone"], state["embedding_dim"], dropout=state["dropout"])
    backbone.load_state_dict(state["model"])
    head = make_head(state["head"], state["embedding_dim"], len(classes), state["head_kwargs"], state["label_smoothing"])
    head.load_state_dict(state["head_state"])
    backbone.to(device)
    head.to(device).eval()
    flip, progress = not args.no_flip, not args.no_progress

    def run(dataset: Dataset, desc: str) -> torch.Tensor:
        return embed(backbone, dataset, args.batch_size, device, flip, args.workers, progress, desc)

    with torch.no_grad():
        dev_embeddings = run(dev_set, "classification dev")
        dev_targets = torch.tensor(dev_set.targets)
        dev_pred = head.logits(dev_embeddings.to(device)).argmax(1).cpu()
        classification_acc = float((dev_pred == dev_targets).float().mean())
        test_pred = head.logits(run(test_set, "classification test").to(device)).argmax(1).cpu()
    prediction_by_name = dict(zip(test_names, test_pred.tolist()))
    classification_path = out / "classification_submission.csv"
    _write_submission(classification_path, [(image_id, str(prediction_by_name[image_id])) for image_id, _ in class_rows])

    gallery = run(known_set, "known")
    gallery_labels = torch.tensor(known_set.targets)
    probes = run(unknown_dev, "unknown_dev")
    position = {name: index for index, name in enumerate(unknown_dev.names)}
    probe_order = torch.tensor([position[image_id] for image_id, _ in dev_rows])
    probe_labels = torch.tensor([known_index.get(label, UNKNOWN) for _, label in dev_rows])
    threshold, verification_acc = tune_open_set_threshold(
        probes[probe_order], probe_labels, gallery, gallery_labels, unknown_label=UNKNOWN
    )
    field = field_metrics(probes[probe_order], probe_labels, gallery, gallery_labels)
    test_probes = run(unknown_test, "unknown_test")
    predicted, _ = open_set_identify(test_probes, gallery, gallery_labels, threshold, unknown_label=UNKNOWN)
    label_by_name = {
        name: (known_set.classes[index] if index != UNKNOWN else NO_MATCH_LABEL)
        for name, index in zip(unknown_test.names, predicted.tolist())
    }
    verification_path = out / "verification_submission.csv"
    _write_submission(verification_path, [(image_id, label_by_name[image_id]) for image_id, _ in test_rows])

    majority_label, majority_count = Counter(label for _, label in dev_rows).most_common(1)[0]
    result = {
        "classification_dev_acc": classification_acc,
        "classification_chance": 1.0 / len(classes),
        "verification_dev_acc": float(verification_acc),
        "verification_chance": majority_count / len(dev_rows),
        "verification_majority_label": majority_label,
        "threshold": float(threshold),
        **field,
        "classification_submission": classification_path,
        "verification_submission": verification_path,
    }
    print(f"classification dev accuracy {classification_acc:.3f} (chance {result['classification_chance']:.3f}, "
          f"{len(classes)} classes, {len(dev_set)} images)")
    print(f"verification dev accuracy {result['verification_dev_acc']:.3f} at cosine threshold {threshold:.3f} "
          f"(chance: always '{majority_label}' scores {result['verification_chance']:.3f}; "
          f"{len(known_set.classes)} known identities, {len(dev_rows)} probes)")
    rank1 = field["identification_rank1"]
    print(f"identification dev rank-1 {'n/a' if rank1 is None else f'{rank1:.3f}'} (known probes); "
          f"{_rates(field['tpir_at_fpir'], 'TPIR@FPIR')} (unknown probes as non-mated); "
          f"{_rates(field['tar_at_far'], 'TAR@FAR')} ({field['num_impostor_pairs']} impostor pairs)")
    print(f"wrote {classification_path} ({len(class_rows)} rows) and {verification_path} ({len(test_rows)} rows)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        verify(args)
    except (DataLayoutError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
