"""Dev accuracy of ArcFace with and without ``--margin-warmup`` on toy faces (writes warmup.json).

Run from the repository root (minutes on one CPU thread per run)::

    python examples/face/results/warmup_study.py --work /tmp/warmup_study

Settings: the demo's toy problem (80 identities, ArcFace s=24, m=0.3), the same data with
the paper's s=64, m=0.5, and 200 identities with s=32, m=0.5 (6 epochs). Each runs with and without a
linear margin warm-up from 0 over the given number of optimizer steps, over several seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SETTINGS = [
    # name, identities, scale, margin, epochs, warm-up steps
    ("toy80_s24_m0.3", 80, 24.0, 0.3, 12, 150),
    ("toy80_s64_m0.5", 80, 64.0, 0.5, 12, 150),
    ("toy200_s32_m0.5", 200, 32.0, 0.5, 6, 200),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/warmup_study"), help="data and run folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("warmup.json"))
    parser.add_argument("--only", nargs="*", default=None, help="setting names to run (default: all)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "examples"))
    from face import make_toy_faces

    results = json.loads(args.out.read_text()) if args.out.exists() else {"settings": {}}
    for name, identities, scale, margin, epochs, warm in SETTINGS:
        if args.only and name not in args.only:
            continue
        data = args.work / f"data{identities}"
        if not (data / "toy_faces.json").exists():
            make_toy_faces.generate(data, seed=0, num_identities=identities, images_per_identity=30, image_size=32,
                                    unknown_dev=120, unknown_test=120)
        runs: dict[str, list[dict[str, float]]] = {"none": [], f"warmup_{warm}": []}
        for seed in args.seeds:
            for label, steps in (("none", 0), (f"warmup_{warm}", warm)):
                out = args.work / f"{name}_{label}_seed{seed}"
                command = [
                    sys.executable, str(ROOT / "examples/face/train.py"), "--data", str(data), "--out", str(out),
                    "--head", "arcface", "--scale", str(scale), "--margin", str(margin), "--epochs", str(epochs),
                    "--lr", "4e-3", "--batch-size", "64", "--threads", "1", "--workers", "0", "--no-progress",
                    "--no-plot", "--seed", str(seed), "--margin-warmup", str(steps),
                ]
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, text=True,
                               env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
                rows = list((out / "metrics.csv").read_text().splitlines())[1:]
                dev = [float(row.split(",")[7]) for row in rows]
                runs[label].append({"seed": seed, "final_dev_acc": dev[-1], "best_dev_acc": max(dev),
                                    "dev_acc_by_epoch": dev, "wall_s": round(time.perf_counter() - start, 1)})
                print(f"{name} {label} seed {seed}: final dev acc {dev[-1]:.3f}", flush=True)
        summary = {label: {"final_mean": statistics.mean(r["final_dev_acc"] for r in rs),
                           "final_std": statistics.pstdev(r["final_dev_acc"] for r in rs)} for label, rs in runs.items()}
        results["settings"][name] = {
            "identities": identities, "scale": scale, "margin": margin, "epochs": epochs, "warmup_steps": warm,
            "steps_per_epoch": (identities * 30) // 64, "lr": 4e-3, "runs": runs, "summary": summary,
        }
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
