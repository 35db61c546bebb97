"""Train a small backbone with a class-sharded margin head on generated identities, under torchrun.

The backbone is wrapped in DistributedDataParallel; the head is *not*: each rank holds its
block of the classes (``process_group=...``) and every rank gets the same loss of the
global batch.  The script then gathers the full classifier to rank 0, saves it, loads it
back into the sharded head and reports top-1 accuracy on held-out samples.

CPU (gloo), what CI runs::

    torchrun --nproc_per_node 2 examples/distributed/train.py --smoke

GPUs (nccl is picked automatically when CUDA is available), unchanged::

    torchrun --nproc_per_node 4 examples/distributed/train.py --classes 200000 --sample-rate 0.1

The data: class ``c`` has a random prototype in ``--input-dim`` dimensions and its samples
are the prototype plus Gaussian noise.  Every rank generates the same data set from
``--seed`` and takes every ``world_size``-th sample of each epoch's shuffle, so the last
batch of an epoch can be smaller (or empty) on some ranks, which the head handles.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import marginloss
from marginloss import distributed as MD

HEADS = {"arcface": marginloss.ArcFace, "cosface": marginloss.CosFace, "sphereface": marginloss.SphereFace}


def make_data(
    prototypes: torch.Tensor, num_samples: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` noisy copies of the class prototypes, every class used, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    num_classes, input_dim = prototypes.shape
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=gen)]
    inputs = prototypes[labels] + noise * torch.randn(num_samples, input_dim, generator=gen)
    return inputs, labels


def build_backbone(input_dim: int, embedding_dim: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(input_dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, embedding_dim)
    )


def build_head(args: argparse.Namespace, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    kwargs: dict[str, float] = {}
    if args.head in ("arcface", "cosface"):
        kwargs = {"scale": args.scale, "margin": args.margin}
    head: nn.Module = HEADS[args.head](
        args.embedding_dim, args.classes, **kwargs, process_group=group, sample_rate=args.sample_rate,
        sample_seed=args.seed, device=device,
    )
    return head


def local_batches(num_samples: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's sample indices per step; every rank gets the same number of steps."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + 3 + epoch))
    mine = order[rank::world]
    steps = math.ceil(math.ceil(num_samples / world) / batch_size)
    return [mine[step * batch_size : (step + 1) * batch_size] for step in range(steps)]


@torch.no_grad()
def top1_accuracy(backbone: nn.Module, full_weight: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    embeddings = nn.functional.normalize(backbone(inputs).float())
    scores = embeddings @ nn.functional.normalize(full_weight.float()).T
    return float((scores.argmax(dim=1) == labels).float().mean())


def train(args: argparse.Namespace) -> None:
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.manual_seed(args.seed)
    group = dist.group.WORLD
    assert group is not None

    # Every rank generates the same data; local_batches decides who trains on what.
    prototypes = torch.randn(args.classes, args.input_dim, generator=torch.Generator().manual_seed(args.seed))
    inputs, labels = make_data(prototypes, args.samples, args.noise, args.seed + 1)
    held_out, held_out_labels = make_data(prototypes, args.classes, args.noise, args.seed + 2)
    backbone = DistributedDataParallel(
        build_backbone(args.input_dim, args.embedding_dim, args.width).to(device),
        device_ids=[device.index] if device.type == "cuda" else None,
    )
    head = build_head(args, group, device)  # NOT wrapped in DDP: each rank holds other classes
    optimizer = torch.optim.SGD(
        [{"params": backbone.parameters()}, {"params": head.parameters()}],
        lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
    )
    if rank == 0:
        print(
            f"{world} ranks ({backend}), {args.classes} classes, {head.shard_size} on rank 0, "
            f"batch {args.batch_size} per rank, head {head}"
        )

    step, started = 0, time.perf_counter()
    for epoch in range(args.epochs):
        for indices in local_batches(args.samples, args.batch_size, epoch, args.seed, rank, world):
            x, y = inputs[indices].to(device), labels[indices].to(device)
            loss = head(backbone(x), y)  # the same global-batch loss on every rank
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # DDP averaged the backbone gradients over the ranks, but each rank's gradient is
            # already that of the *global* loss through its own samples: their sum is the
            # exact gradient, so undo the 1/world of the average.
            for param in backbone.parameters():
                if param.grad is not None:
                    param.grad.mul_(world)
            optimizer.step()
            if rank == 0 and (step % args.log_every == 0):
                print(f"epoch {epoch} step {step:5d}  loss {loss.item():8.4f}  {time.perf_counter() - started:6.1f} s")
            step += 1

    # Export: the full [C, D] classifier on rank 0 only, then load it back into the shards.
    full = MD.gather_weight(head, dst=0)
    out = Path(args.out)
    if rank == 0:
        assert full is not None
        out.mkdir(parents=True, exist_ok=True)
        torch.save(full, out / "weight.pt")
        torch.save(backbone.module.state_dict(), out / "backbone.pt")
        accuracy = top1_accuracy(backbone.module, full.to(device), held_out.to(device), held_out_labels.to(device))
        print(f"held-out top-1 accuracy over {args.classes} classes: {accuracy:.3f}")
    before = head.weight.detach().clone()
    with torch.no_grad():
        head.weight.zero_()
    saved = torch.load(out / "weight.pt", map_location="cpu") if rank == 0 else None
    MD.load_full_weight(head, saved, src=0)
    same = torch.tensor([int(torch.equal(head.weight.detach(), before))], device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"checkpoint round trip: {'ok' if int(same) else 'MISMATCH'} ({out / 'weight.pt'})")
    # Every rank done communicating before the group goes away: tearing gloo down while a
    # peer still has traffic in flight has aborted a finished rank on a loaded machine.
    dist.barrier()
    dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Class-sharded margin head + DDP backbone on generated data (run with torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--head", choices=sorted(HEADS), default="arcface")
    parser.add_argument("--classes", type=int, default=2000, help="number of identities C")
    parser.add_argument("--samples", type=int, default=40_000, help="training samples in all")
    parser.add_argument("--input-dim", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.5, help="std of the noise around a prototype")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the backbone MLP")
    parser.add_argument("--scale", type=float, default=32.0, help="s (arcface, cosface)")
    parser.add_argument("--margin", type=float, default=0.3, help="m (arcface, cosface)")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="PartialFC: fraction of each shard per step")
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl with CUDA, else gloo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    parser.add_argument("--out", default="runs/distributed", help="where weight.pt and backbone.pt go")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on CPU: tiny data and model (CI)")
    return parser


# What torch.distributed's env:// initialisation reads; torchrun sets all of them.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        print(
            f"error: {', '.join(missing)} not set: this script runs one process per rank under torchrun, e.g.\n"
            "  torchrun --nproc_per_node 2 examples/distributed/train.py --smoke\n"
            "(a single process works too: torchrun --nproc_per_node 1 ...)",
            file=sys.stderr,
        )
        return 2
    if args.smoke:
        args.classes, args.samples, args.epochs, args.batch_size = 50, 1003, 2, 32
        args.input_dim, args.embedding_dim, args.width, args.log_every = 16, 16, 32, 10
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
