"""AdaFace, MagFace and AdaCos class-sharded over 2 and 3 spawned gloo ranks (uneven classes
and batches, float64), against one process on the global batch, over several steps: losses,
embedding and weight gradients (MagFace's through the magnitude) and the state (AdaFace's
EMA statistics, AdaCos's scale) after every step.

The ranks run this file as a script (``python -m tests.test_quality_heads_sharded``), as in
``tests/test_distributed.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import marginloss
from marginloss import distributed as MD

pytestmark = pytest.mark.xdist_group("distributed")

ROOT = Path(__file__).resolve().parents[1]
DIM, CLASSES = 5, 13  # shards of 7 + 6 and of 5 + 4 + 4 classes
# Rows per rank at each of three steps, by world size (empty ranks included).
BATCHES = {2: ((5, 3), (2, 6), (4, 0)), 3: ((4, 1, 3), (0, 5, 3), (2, 2, 0))}
STEPS = 3
SPAWN_TIMEOUT_S = 240
CASES: dict[str, tuple[type[marginloss.MarginHead], dict[str, Any]]] = {
    "adaface": (marginloss.AdaFace, {"scale": 16.0, "h": 1.0, "t_alpha": 0.5, "chunk_size": 2}),
    "magface": (marginloss.MagFace, {"scale": 16.0, "lambda_g": 20.0, "reduction": "none", "chunk_size": "auto"}),
    "adacos": (marginloss.AdaCos, {"chunk_size": 3, "label_smoothing": 0.1}),
}


def inputs(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global embeddings (norms spread over [3, 120]), labels, full weight, row weights."""
    gen = torch.Generator().manual_seed(100 + 10 * world + step)
    weight = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    total = sum(BATCHES[world][step])
    labels = torch.randint(0, CLASSES, (total,), generator=gen)
    x = torch.randn(total, DIM, generator=gen, dtype=torch.float64) + weight[labels]
    norms = 3.0 + 117.0 * torch.rand(total, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * norms[:, None]
    if step == 1:
        labels[::3] = -100
    coeffs = torch.rand(total, generator=gen, dtype=torch.float64) + 0.5
    return x, labels, weight, coeffs


def run_steps(head: marginloss.MarginHead, rows: list[slice], world: int) -> dict[str, list[torch.Tensor]]:
    """Every step's loss, embedding and weight gradient and state (this process's rows)."""
    seen: dict[str, list[torch.Tensor]] = {"loss": [], "grad_x": [], "grad_w": [], "state": []}
    for step, part in enumerate(rows):
        x, labels, _, coeffs = inputs(step, world)
        xs = x[part].clone().requires_grad_(True)
        loss = head(xs, labels[part])
        (loss * coeffs).sum().backward() if loss.dim() else loss.backward()
        assert xs.grad is not None and head.weight.grad is not None
        seen["loss"].append(loss.detach())
        seen["grad_x"].append(xs.grad)
        seen["grad_w"].append(head.weight.grad.clone())
        state = [b.detach().reshape(()).double() for n, b in head.named_buffers() if n in ("batch_mean", "batch_std", "scale")]
        seen["state"].append(torch.stack([*state, torch.zeros((), dtype=torch.float64)]))
        head.weight.grad = None
    return seen


def _worker(rank: int, world: int, init_method: str, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        rows = [slice(sum(b[:rank]), sum(b[: rank + 1])) for b in BATCHES[world]]
        results = {}
        for name, (cls, options) in CASES.items():
            head = cls(DIM, CLASSES, process_group=dist.group.WORLD, dtype=torch.float64, **options)
            MD.load_full_weight(head, inputs(0, world)[2])
            results[name] = run_steps(head, rows, world)
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _main() -> None:
    parser = argparse.ArgumentParser(description="one rank of tests/test_quality_heads_sharded.py")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        _worker(args.rank, args.world_size, args.init, args.out)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)


def _spawn(world: int, directory: Path) -> list[dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "tests.test_quality_heads_sharded", "--world-size", str(world),
               "--init", f"file://{directory / 'rendezvous'}", "--out", str(directory)]
    logs = [open(directory / f"rank{rank}.log", "w+") for rank in range(world)]
    procs = [subprocess.Popen([*command, "--rank", str(rank)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
             for rank, log in enumerate(logs)]
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode not in (None, 0) for p in procs):
            break
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = []
    for rank, log in enumerate(logs):
        log.seek(0)
        text.append(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"{world} gloo ranks failed\n" + "\n".join(text))
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``ranks(world)``: every rank's results, spawning each world size once."""
    done: dict[int, list[dict[str, Any]]] = {}

    def get(world: int) -> list[dict[str, Any]]:
        if world not in done:
            done[world] = _spawn(world, tmp_path_factory.mktemp(f"quality_heads_world{world}"))
        return done[world]

    return get


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_sharded_matches_one_process_over_steps(name: str, world: int, ranks: Any) -> None:
    from tests.reference import assert_close

    results = ranks(world)
    cls, options = CASES[name]
    single = cls(DIM, CLASSES, dtype=torch.float64, **options)
    with torch.no_grad():
        single.weight.copy_(inputs(0, world)[2])
    want = run_steps(single, [slice(None)] * STEPS, world)
    tol = {"rtol": 1e-10, "atol": 1e-11}
    for step in range(STEPS):
        for rank, got in enumerate(results):
            seen = got[name]
            assert_close(seen["loss"][step], want["loss"][step], **tol, what=f"loss on rank {rank}, step {step}")
            assert_close(seen["state"][step], want["state"][step], **tol, what=f"state on rank {rank}, step {step}")
        grad_x = torch.cat([got[name]["grad_x"][step] for got in results])
        grad_w = torch.cat([got[name]["grad_w"][step] for got in results])
        assert_close(grad_x, want["grad_x"][step], **tol, what=f"embedding grad, step {step}")
        assert_close(grad_w, want["grad_w"][step], **tol, what=f"weight grad, step {step}")
    if name != "magface":
        assert not torch.equal(want["state"][0], want["state"][-1]), "the state should move"


if __name__ == "__main__":
    _main()
