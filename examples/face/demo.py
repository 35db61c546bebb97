"""The `make demo` entry point: toy faces, then train a backbone + ArcFace head, then verify.

Generates the synthetic HW2P2-layout dataset (unless ``--data`` already holds one), trains
the toy ResNet with an ArcFace head, then evaluates classification and open-set
verification on the dev sets and writes both Kaggle submissions. It prints the two dev
accuracies next to their chance levels and writes them, with the wall time, the machine and
its load, to ``<out>/demo.json``; ``--record FILE`` also appends that record to a results
file (``make demo-results`` does so for ``examples/face/results/demo.json``, the source of
the figures the README and the docs quote; ``make figures`` copies them there).

Example::

    python examples/face/demo.py --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
# make_toy_faces.py's defaults are the demo's data set; --smoke uses its SMOKE sizes.
SMOKE_DATA = make_toy_faces.SMOKE


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
    parser.add_argument("--record", type=Path, default=None,
                        help="append this run's record (settings, accuracies, wall time, machine, load) to this JSON file")
    return parser


def machine() -> dict[str, Any]:
    """What the timings depend on: CPU model, core count, torch version and thread count."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return {"cpu": model, "logical_cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to the ``runs`` list of the JSON results file at ``path``."""
    runs = json.loads(path.read_text(encoding="utf-8"))["runs"] if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": [*runs, record]}, indent=1) + "\n", encoding="utf-8")


def demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three steps; return the verification results with the timings added."""
    start = time.perf_counter()
    load_before = load_average()
    data: Path = args.data or args.out / "data"
    if args.data is None and not (data / "toy_faces.json").exists():
        settings = SMOKE_DATA if args.smoke else {}
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
    record = {
        "command": "python examples/face/demo.py" + ("" if args.seed == 0 else f" --seed {args.seed}"),
        "settings": {"backbone": args.backbone, "head": args.head, "epochs": 1 if args.smoke else args.epochs, "lr": args.lr,
                     "batch_size": args.batch_size, "threads": args.threads, "workers": args.workers,
                     "seed": args.seed, "smoke": args.smoke},
        "data": json.loads((data / "toy_faces.json").read_text(encoding="utf-8")) if (data / "toy_faces.json").exists() else None,
        "classification_dev_acc": round(float(result["classification_dev_acc"]), 4),
        "classification_chance": round(float(result["classification_chance"]), 4),
        "verification_dev_acc": round(float(result["verification_dev_acc"]), 4),
        "verification_chance": round(float(result["verification_chance"]), 4),
        "wall_s": round(result["wall_s"], 1), "train_s": round(train_s, 1),
        "load_1min": [load_before, load_average()], "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if args.record is not None:
        append_record(args.record, record)
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
