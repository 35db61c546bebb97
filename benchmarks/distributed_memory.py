"""Peak memory per rank of a class-sharded ArcFace head: C = 1M classes, D = 512, 1/2/4 ranks.

Each configuration starts ``world_size`` fresh processes (gloo on CPU, one thread each), which
build ``ArcFace(512, C, process_group=...)`` in float32 and run one forward and backward on
a global batch of ``--batch-size`` embeddings split over the ranks.  For every rank it
reports, from the operating system's own accounting (``getrusage``'s ``ru_maxrss``, the
high-water mark of the process's resident memory):

  cold_mib       resident memory after ``import torch`` and the process group
  baseline_mib   the same after one step of a tiny head (8 classes per rank) on the same code
                 path, so the runtime's one-off costs (code paged in, BLAS and gloo buffers,
                 about 100 MiB) are not counted as the head's
  peak_mib       the high-water mark after the step
  head_mib       peak_mib - baseline_mib: what the head's step added at its worst moment
  weight_mib     the weight shard's own bytes (shard_size x D x 4)
  grad_mib       its gradient's bytes (same size)
  workspace_mib  head_mib - weight_mib - grad_mib: gathered embeddings, chunk logits,
                 PartialFC copies and allocator slack at the peak

Optimizer state (momentum, Adam moments) would add one or two more shard-sized tensors per
rank and is not part of the measurement.  ``--quick`` runs C = 100k for a fast check.

    python benchmarks/distributed_memory.py            # writes results/distributed_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import marginloss

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024


def _peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _worker(rank: int, world_size: int, init_method: str, config: dict[str, Any], out: str) -> None:
    torch.set_num_threads(config["threads"])
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    classes, dim, batch = config["classes"], config["embedding_dim"], config["batch_size"]
    local = batch // world_size + (1 if rank < batch % world_size else 0)
    cold = _peak_rss_bytes()
    # Run the same code path once on a tiny head first, so that the runtime's one-off costs
    # (library code paged in, BLAS and gloo buffers) land in the baseline, not in the head.
    tiny = marginloss.ArcFace(dim, 8 * world_size, process_group=dist.group.WORLD, sample_rate=config["sample_rate"])
    tiny(torch.randn(local, dim, requires_grad=True), torch.randint(0, 8 * world_size, (local,))).backward()
    del tiny
    baseline = _peak_rss_bytes()
    torch.manual_seed(0)
    head = marginloss.ArcFace(
        dim, classes, process_group=dist.group.WORLD, sample_rate=config["sample_rate"], dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(rank)
    embeddings = torch.randn(local, dim, generator=gen, requires_grad=True)
    labels = torch.randint(0, classes, (local,), generator=gen)
    dist.barrier()
    started = time.perf_counter()
    loss = head(embeddings, labels)
    loss.backward()
    dist.barrier()
    elapsed = time.perf_counter() - started
    peak = _peak_rss_bytes()
    assert head.weight.grad is not None
    weight_bytes = head.weight.numel() * head.weight.element_size()
    grad_bytes = head.weight.grad.numel() * head.weight.grad.element_size()
    row = {
        "world_size": world_size,
        "rank": rank,
        "classes": classes,
        "embedding_dim": dim,
        "global_batch": batch,
        "sample_rate": config["sample_rate"],
        "shard_size": head.shard_size,
        "cold_mib": cold / MIB,
        "baseline_mib": baseline / MIB,
        "peak_mib": peak / MIB,
        "head_mib": (peak - baseline) / MIB,
        "weight_mib": weight_bytes / MIB,
        "grad_mib": grad_bytes / MIB,
        "workspace_mib": (peak - baseline - weight_bytes - grad_bytes) / MIB,
        "step_time_ms": elapsed * 1e3,
        "loss": float(loss.detach()),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def run_config(world_size: int, config: dict[str, Any], scratch: Path) -> list[dict[str, Any]]:
    directory = scratch / f"w{world_size}_r{config['sample_rate']}"
    directory.mkdir(parents=True, exist_ok=True)
    init = f"file://{directory / 'rendezvous'}"
    mp.spawn(_worker, args=(world_size, init, config, str(directory)), nprocs=world_size, join=True)
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def markdown(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    lines = [
        f"# Peak memory per rank, class-sharded ArcFace (C = {config['classes']:,}, D = "
        f"{config['embedding_dim']}, float32, global batch {config['batch_size']})",
        "",
        "One forward + backward per configuration, fresh processes on CPU (gloo, 1 thread each).",
        "Measured: each process's resident-memory high-water mark (`getrusage` `ru_maxrss`);",
        "`baseline` = the mark after torch, the process group and one step of a tiny head on the same",
        "code path (the runtime's one-off costs); `head` = peak - baseline. `weight`/`grad` are the",
        "shard's tensor sizes; `workspace` = head - weight - grad (gathered embeddings, chunk logits,",
        "PartialFC's copy of the sampled rows, allocator slack).",
        "Optimizer state is not included. The largest rank (rank 0) is shown; all ranks are in the JSON.",
        "",
        "| ranks | sample_rate | shard rows | baseline_mib | peak_mib | head_mib | weight_mib | grad_mib | workspace_mib | head vs 1 rank | step_time_ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    single = next((r["head_mib"] for r in rows if r["world_size"] == 1 and r["rank"] == 0 and r["sample_rate"] == 1.0), None)
    for row in rows:
        if row["rank"] != 0:
            continue
        ratio = f"{row['head_mib'] / single:.3f}" if single else "-"
        lines.append(
            f"| {row['world_size']} | {row['sample_rate']:g} | {row['shard_size']:,} | {row['baseline_mib']:.0f} | "
            f"{row['peak_mib']:.0f} | {row['head_mib']:.0f} | {row['weight_mib']:.0f} | {row['grad_mib']:.0f} | "
            f"{row['workspace_mib']:.1f} | {ratio} | {row['step_time_ms']:.0f} |"
        )
    lines += [
        "",
        "Weight and gradient shrink as 1/W; the workspace is the engine's `[batch, chunk]` blocks",
        "(chunk = 2^20 / batch classes; up to 64 MiB of them kept from forward for backward), the",
        "same at every W.  With PartialFC the peak also holds",
        "the gradient of the sampled rows' copy (`ceil(rate x shard) x D`) while it is scattered",
        "into the dense shard gradient.  Step times come from 1-thread processes sharing 2 CPU cores",
        "with other work: they are not a speed benchmark.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--embedding-dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks")
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--partial-fc", type=float, default=0.1, help="also run 2 ranks at this sample_rate (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="C = 100k")
    args = parser.parse_args()
    if args.quick:
        args.classes = 100_000
    base = {"classes": args.classes, "embedding_dim": args.embedding_dim, "batch_size": args.batch_size, "threads": args.threads}
    plan = [(int(w), 1.0) for w in args.world_sizes.split(",")]
    if args.partial_fc:
        plan.append((2, args.partial_fc))
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"marginloss_dist_memory_{os.getpid()}"
    rows: list[dict[str, Any]] = []
    for world_size, rate in plan:
        found = run_config(world_size, {**base, "sample_rate": rate}, scratch)
        rows.extend(found)
        top = found[0]
        print(
            f"{world_size} rank(s), sample_rate {rate:g}: shard {top['shard_size']:,} rows, peak {top['peak_mib']:.0f} MiB, "
            f"head {top['head_mib']:.0f} MiB (weight {top['weight_mib']:.0f} + grad {top['grad_mib']:.0f} + "
            f"workspace {top['workspace_mib']:.1f}), {top['step_time_ms']:.0f} ms"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "distributed_memory" + ("_quick" if args.quick else "")
    meta = {**base, "torch": torch.__version__, "platform": platform.platform(), "cpus": os.cpu_count()}
    (args.out / f"{name}.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, base)
    (args.out / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
