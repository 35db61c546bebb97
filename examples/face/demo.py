"""The `make demo` entry point: toy faces, then train a backbone + ArcFace head, then verify.

Generates the synthetic HW2P2-layout dataset (unless ``--data`` already holds one), trains
the toy ResNet with an ArcFace head, then evaluates classification and open-set
verification on the dev sets and writes both Kaggle submissions. It prints the two dev
accuracies next to their chance levels. The defaults finish in about two minutes on two
CPU cores (the target is at most five, with other work sharing the machine).

Example::

    python examples/face/demo.py --out runs/demo
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `backbones` and `face` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import available
from face import make_toy_faces, train, verify
from face.data import DataLayoutError
from face.model import HEADS, CheckpointError

# Demo scale: small enough for two CPU cores, big enough that verification of unseen
# identities works: embeddings generalise to new faces only after seeing many identities
# (40 training identities reach about 50% verification accuracy, 80 about 90%), and 32 px
# keeps an epoch at a few seconds. --smoke shrinks everything to a seconds-long CI check.
DEMO_DATA = {"num_identities": 80, "images_per_identity": 30, "image_size": 32, "unknown_dev": 120, "unknown_test": 120}
SMOKE_DATA = {
    "num_identities": 4, "images_per_identity": 4, "dev_per_identity": 1, "test_per_identity": 1,
    "known_identities": 3, "unmatched_identities": 1, "unknown_dev": 4, "unknown_test": 4, "image_size": 32,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Writes <out>/data (unless --data is given), <out>/run (checkpoint, metrics.csv, curves.png, submissions).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for data and run outputs")
    parser.add_argument("--data", type=Path, default=None, help="use this HW2P2-layout dataset instead of <out>/data")
    parser.add_argument("--backbone", default="resnet_toy", choices=available(), help="backbone configuration")
    parser.add_argument("--head", default="arcface", choices=HEADS, help="classification head")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak AdamW learning rate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 plus one data-loading worker suits two shared cores")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    parser.add_argument("--seed", type=int, default=0, help="random seed of data generation and training")
    parser.add_argument("--progress", action="store_true", help="show tqdm progress bars")
    parser.add_argument("--smoke", action="store_true", help="tiny data and a 1-epoch run: a seconds-long CI check")
    return parser


def demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three steps; return the verification results with the timings added."""
    start = time.perf_counter()
    data: Path = args.data or args.out / "data"
    if args.data is None and not (data / "toy_faces.json").exists():
        settings = SMOKE_DATA if args.smoke else DEMO_DATA
        print(f"[1/3] generating toy faces in {data}", flush=True)
        make_toy_faces.generate(data, seed=args.seed, **settings)
    else:
        print(f"[1/3] using the dataset in {data}", flush=True)
    run_dir = args.out / "run"
    quiet = [] if args.progress else ["--no-progress"]
    train_argv = [
        "--data", str(data), "--out", str(run_dir), "--backbone", args.backbone, "--head", args.head,
        "--epochs", str(1 if args.smoke else args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--threads", str(args.threads), "--workers", str(0 if args.smoke else args.workers),
        "--device", args.device, "--seed", str(args.seed), *quiet,
    ]
    print(f"[2/3] training: train.py {' '.join(train_argv)}", flush=True)
    trained = train.train(train.build_parser().parse_args(train_argv))
    train_s = time.perf_counter() - start
    verify_argv = ["--data", str(data), "--checkpoint", str(trained["checkpoint"]), "--threads", str(args.threads),
                   "--device", args.device, *quiet]
    print(f"[3/3] verifying: verify.py {' '.join(verify_argv)}", flush=True)
    result = verify.verify(verify.build_parser().parse_args(verify_argv))
    result["wall_s"] = time.perf_counter() - start
    result["train_s"] = train_s
    print()
    print(f"classification dev accuracy {result['classification_dev_acc']:.3f}   (chance {result['classification_chance']:.3f})")
    print(f"verification   dev accuracy {result['verification_dev_acc']:.3f}   (chance {result['verification_chance']:.3f}: "
          f"always predicting the most common label)")
    print(f"demo finished in {result['wall_s']:.0f} s; outputs in {args.out}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        demo(args)
    except (DataLayoutError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
