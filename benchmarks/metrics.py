"""Gallery-scale search behind the ranking metrics: time and peak memory.

Probes are searched against a gallery of L2-normalised-by-the-metric embeddings (cosine,
float32), for the ``k`` most similar gallery rows:

=====================  ==========================================================================
method                 what
=====================  ==========================================================================
``blocked_topk``       ``marginloss.metrics.topk_similarity``: blocks of ``batch_size`` probes x
                       ``gallery_batch_size`` gallery rows with a running top-k (ties by index)
``full_matrix_topk``   plain PyTorch: ``normalize(P) @ normalize(G).T`` then ``torch.topk`` over
                       the whole ``[probes, gallery]`` matrix; skipped where that matrix would
                       exceed ``--full-matrix-limit-gib``
``cmc_blocked``        ``marginloss.metrics.cmc_curve(template="max", max_rank=k)``: the same
                       search by identity (best image of each), as rank-k identification runs
=====================  ==========================================================================

Each method runs in its own subprocess (fresh allocator, nothing left from another method).
Peak memory is measured above the memory held before the step (the data): on CUDA with
``torch.cuda.max_memory_allocated``, on CPU from the resident set (``VmHWM`` reset through
``/proc/self/clear_refs``, see ``benchmarks/_measure.py``; ``ru_maxrss`` growth where that is
not possible), in the same run as the time.  The blocked and the full search are compared
(share of identical top-k indices, largest difference of the values).

Default sizes: 10^5 probes x 10^6 gallery x 512 on CUDA (issue #16's scale); on CPU a size
that finishes in a few minutes on 2 cores, 10^4 x 10^6 x 512 (the blocked search; the full
matrix would take 40 GB) and 4096 x 2*10^5 x 512 (both).  Results:
``<out>/metrics-<device>.{json,md}`` (``metrics-smoke.*`` with ``--smoke``).

Example::

    python benchmarks/metrics.py                        # the default sizes of this device
    python benchmarks/metrics.py --probes 100000 --gallery 1000000 --dim 512 --device cuda
    python benchmarks/metrics.py --smoke --out /tmp/bench   # tiny, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"
METHODS = ("blocked_topk", "full_matrix_topk", "cmc_blocked")
MIB = 1024 * 1024
NOISE = 2.0  # images = identity centre + NOISE * N(0, I): same-identity cosine ~0.2 at D=512


def _int_list(text: str) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip().lower().replace("_", "")
        scale = {"k": 10**3, "m": 10**6}.get(item[-1:], 1)
        try:
            value = int(float(item[:-1] if scale > 1 else item) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"sizes must look like 4096, 200k or 1M, got {item!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {item!r}")
        values.append(value)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=_int_list, default=None,
                        help="probe counts, comma-separated, paired with --gallery (default: by device)")
    parser.add_argument("--gallery", type=_int_list, default=None,
                        help="gallery sizes, comma-separated, one per --probes entry (default: by device)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--k", type=int, default=10, help="neighbours per probe (max_rank of cmc_blocked)")
    parser.add_argument("--identities-per-image", type=float, default=0.1,
                        help="gallery identities as a share of gallery images (cmc_blocked)")
    parser.add_argument("--batch-size", type=int, default=4096, help="probes per block")
    parser.add_argument("--gallery-batch-size", type=int, default=16384, help="gallery rows per block")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--full-matrix-limit-gib", type=float, default=None,
                        help="skip full_matrix_topk above this matrix size (default: 4 on CPU, 60 on CUDA)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda'")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic embeddings")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; writes metrics-smoke.*")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--render", type=Path, default=None,
                        help="only re-render the markdown table from a results JSON written by this script")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def resolve(args: argparse.Namespace) -> tuple[str, list[tuple[int, int]]]:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        probes, gallery = args.probes or [300], args.gallery or [5000]
        args.batch_size, args.gallery_batch_size = min(args.batch_size, 128), min(args.gallery_batch_size, 1024)
        args.dim = min(args.dim, 64)
    elif device == "cuda":
        probes, gallery = args.probes or [100_000, 10_000], args.gallery or [1_000_000, 1_000_000]
    else:
        probes, gallery = args.probes or [4096, 10_000], args.gallery or [200_000, 1_000_000]
    if len(probes) != len(gallery):
        raise SystemExit(f"error: --probes has {len(probes)} entries but --gallery has {len(gallery)}")
    if args.full_matrix_limit_gib is None:
        args.full_matrix_limit_gib = 60.0 if device == "cuda" else 4.0
    return device, list(zip(probes, gallery))


# ---------------------------------------------------------------- worker (one method, one size)


def _make_data(num_probes: int, num_gallery: int, dim: int, identities: int, seed: int, device: Any) -> dict[str, Any]:
    """Clustered float32 embeddings, generated in chunks (no full-size temporaries)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(identities, dim, generator=generator)
    gallery_labels = torch.randint(0, identities, (num_gallery,), generator=generator)
    gallery_labels[:identities] = torch.arange(identities)  # every identity enrolled
    probe_labels = gallery_labels[torch.randint(0, num_gallery, (num_probes,), generator=generator)]
    gallery = torch.empty(num_gallery, dim, device=device)
    probes = torch.empty(num_probes, dim, device=device)
    for target, labels in ((gallery, gallery_labels), (probes, probe_labels)):
        for start in range(0, labels.shape[0], 65536):
            chunk = labels[start : start + 65536]
            noise = torch.randn(chunk.shape[0], dim, generator=generator)
            target[start : start + chunk.shape[0]] = (centers[chunk] + NOISE * noise).to(device)
    return {"probes": probes, "gallery": gallery, "probe_labels": probe_labels.to(device),
            "gallery_labels": gallery_labels.to(device)}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from benchmarks import _measure as M
    from marginloss.metrics import cmc_curve, topk_similarity

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    identities = max(2, int(spec["gallery"] * spec["identities_per_image"]))
    data = _make_data(spec["probes"], spec["gallery"], spec["dim"], identities, spec["seed"], device)
    k, method = spec["k"], spec["method"]
    outputs: dict[str, Any] = {}

    def step() -> None:
        with torch.no_grad():
            if method == "blocked_topk":
                outputs["values"], outputs["indices"] = topk_similarity(
                    data["probes"], data["gallery"], k=k, batch_size=spec["batch_size"],
                    key_batch_size=spec["gallery_batch_size"])
            elif method == "full_matrix_topk":
                scores = F.normalize(data["probes"], dim=1) @ F.normalize(data["gallery"], dim=1).T
                outputs["values"], outputs["indices"] = torch.topk(scores, k, dim=1)
            else:
                outputs["cmc"] = cmc_curve(
                    data["probes"], data["probe_labels"], data["gallery"], data["gallery_labels"],
                    max_rank=k, template="max", batch_size=spec["batch_size"],
                    gallery_batch_size=spec["gallery_batch_size"]).tolist()

    if device.type == "cuda":
        step()  # warm-up: kernels, allocator
        time_s, cpu_s = M.time_step_s(step, device)
        peak = M.cuda_peak_memory(step, device)
        memory_method = "torch.cuda.max_memory_allocated minus memory_allocated before the step"
    else:
        memory = M.CpuPeakMemory()
        memory.prepare()
        holder: dict[str, tuple[float, float]] = {}
        peak = memory.measure(lambda: holder.__setitem__("t", M.time_step_s(step, device)))
        time_s, cpu_s = holder["t"]
        memory_method = memory.describe() + "; timed in the same run"
    result = {"time_ms": 1000 * time_s, "cpu_time_ms": 1000 * cpu_s, "peak_mib": peak / MIB,
              "memory_method": memory_method, "identities": identities}
    if "indices" in outputs:
        path = Path(spec["save"])
        torch.save({"values": outputs["values"].cpu(), "indices": outputs["indices"].cpu()}, path)
        result["saved"] = str(path)
    if "cmc" in outputs:
        result["cmc"] = outputs["cmc"]
    return result


# ---------------------------------------------------------------- driver


def run_case(args: argparse.Namespace, device: str, num_probes: int, num_gallery: int, methods: list[str],
             scratch: Path) -> list[dict[str, Any]]:
    import torch

    entries = []
    for method in methods:
        entry: dict[str, Any] = {"method": method, "probes": num_probes, "gallery": num_gallery,
                                 "dim": args.dim, "k": args.k, "batch_size": args.batch_size,
                                 "gallery_batch_size": args.gallery_batch_size, "error": None,
                                 "skipped": None}
        full_gib = num_probes * num_gallery * 4 / 2**30
        if method == "full_matrix_topk" and full_gib > args.full_matrix_limit_gib:
            entry["skipped"] = (f"the [probes, gallery] float32 matrix needs {full_gib:.1f} GiB "
                                f"> --full-matrix-limit-gib {args.full_matrix_limit_gib:g}")
            entries.append(entry)
            print(f"  {method:18s} skipped: {entry['skipped']}", flush=True)
            continue
        spec = {"method": method, "probes": num_probes, "gallery": num_gallery, "dim": args.dim, "k": args.k,
                "batch_size": args.batch_size, "gallery_batch_size": args.gallery_batch_size,
                "identities_per_image": args.identities_per_image, "seed": args.seed, "device": device,
                "threads": args.threads, "save": str(scratch / f"{method}-{num_probes}-{num_gallery}.pt")}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, cwd=REPO, check=False)
        if proc.returncode != 0:
            entry["error"] = (proc.stderr or proc.stdout)[-1500:]
            entry["time_ms"], entry["peak_mib"] = None, None
        else:
            entry.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        entries.append(entry)
        if entry["error"]:
            print(f"  {method:18s} error: {entry['error'].splitlines()[-1]}", flush=True)
        else:
            print(f"  {method:18s} {entry['time_ms'] / 1000:8.2f} s  peak {entry['peak_mib']:9.1f} MiB", flush=True)
    blocked = next((e for e in entries if e["method"] == "blocked_topk" and e.get("saved")), None)
    full = next((e for e in entries if e["method"] == "full_matrix_topk" and e.get("saved")), None)
    if blocked is not None and full is not None:
        a, b = torch.load(blocked["saved"]), torch.load(full["saved"])
        agreement = float((a["indices"] == b["indices"]).double().mean())
        blocked["index_agreement"] = agreement
        blocked["max_value_diff"] = float((a["values"] - b["values"]).abs().max())
        blocked["agrees_with_full_matrix"] = agreement == 1.0
    for entry in entries:
        entry.pop("saved", None)
    return entries


def _machine(device: str) -> dict[str, Any]:
    import torch

    from benchmarks import _measure as M

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                            "cpu": M.cpu_model(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "load_average": M.load_average()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def render_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# Gallery-scale search ({report['device']}{', smoke' if report['smoke'] else ''})",
        "",
        "## What ran",
        "",
        f"- device: {machine['device']}" + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + f"; CPU: {machine['cpu']}, {machine['cpu_count']} cores, {machine['torch_threads']} torch threads, "
        f"load average {machine['load_average']}; torch {machine['torch']}",
        "- sizes (probes x gallery x dim): "
        + ", ".join(f"{p} x {g} x {report['settings']['dim']}" for p, g in report["settings"]["cases"])
        + f"; k = {report['settings']['k']}; float32, cosine; blocks of {report['settings']['batch_size']} probes "
        f"x {report['settings']['gallery_batch_size']} gallery rows",
        f"- data: {report['settings'].get('data', 'synthetic clustered embeddings')}",
        f"- {report['note']}",
        "",
        "| method | probes | gallery | time (s) | CPU time (s) | peak above data (MiB) | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in report["results"]:
        if e["skipped"]:
            lines.append(f"| {e['method']} | {e['probes']} | {e['gallery']} | - | - | - | skipped: {e['skipped']} |")
            continue
        if e["error"]:
            lines.append(f"| {e['method']} | {e['probes']} | {e['gallery']} | - | - | - | error |")
            continue
        notes = []
        if "index_agreement" in e:
            notes.append(f"top-{e['k']} indices equal to the full matrix's: {100 * e['index_agreement']:.4f}%, "
                         f"max value diff {e['max_value_diff']:.2g}")
        if "cmc" in e:
            notes.append(f"rank-1 {e['cmc'][0]:.4f}, rank-{e['k']} {e['cmc'][-1]:.4f} over {e['identities']} identities")
        lines.append(f"| {e['method']} | {e['probes']} | {e['gallery']} | {e['time_ms'] / 1000:.2f} | "
                     f"{e['cpu_time_ms'] / 1000:.2f} | {e['peak_mib']:.1f} | {'; '.join(notes)} |")
    lines += ["", "Peak memory: " + next((e["memory_method"] for e in report["results"] if e.get("memory_method")),
                                          "n/a") + ".",
              "CPU time: the process's CPU seconds over all threads (a cross-check of the wall time on a "
              "shared machine: other processes slow the wall clock, not this).", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render_markdown(report))
        print(f"wrote {args.render.with_suffix('.md')}")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: unknown methods {unknown}; choose from {', '.join(METHODS)}")
    device, cases = resolve(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for num_probes, num_gallery in cases:
            print(f"{num_probes} probes x {num_gallery} gallery x {args.dim} on {device}", flush=True)
            results += run_case(args, device, num_probes, num_gallery, methods, Path(scratch))
    note = ("full size of issue #16 (10^5 x 10^6 x 512)" if any(p >= 10**5 and g >= 10**6 for p, g in cases)
            else "not the full 10^5 x 10^6 x 512 of issue #16 (run on CUDA for that: it is this script's "
            "default there); the blocked search's memory does not grow with the gallery, its time does linearly")
    report = {"device": device, "smoke": args.smoke, "machine": _machine(device), "note": note,
              "settings": {"data": f"synthetic: {args.identities_per_image:g} identities per gallery image, "
                           f"images = N(0, I) centre + {NOISE:g} * N(0, I); probes drawn like gallery images",
                           "cases": cases, "dim": args.dim, "k": args.k, "batch_size": args.batch_size,
                           "gallery_batch_size": args.gallery_batch_size, "methods": methods, "seed": args.seed,
                           "full_matrix_limit_gib": args.full_matrix_limit_gib},
              "results": results}
    stem = "metrics-smoke" if args.smoke else f"metrics-{device}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(render_markdown(report))
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')}")
    return 1 if any(e["error"] for e in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
