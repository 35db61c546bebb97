"""Class-sharded heads on spawned gloo process groups (2 and 3 CPU ranks, float64), against
one process on the concatenated global batch, plus the sharding and sampling helpers.

The ranks run this file as a script (``python -m tests.test_distributed --rank ...``): each
runs every case of its world size in one process group and saves what it saw; the tests
then compare that with a single-process head, case by case.  A worker that fails or hangs
fails the tests of its world size instead of blocking the suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import marginloss
from marginloss import distributed as MD

pytestmark = pytest.mark.xdist_group("distributed")

ROOT = Path(__file__).resolve().parents[1]
DIM = 6
SPAWN_TIMEOUT_S = 240
HEADS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "arcface": (marginloss.ArcFace, {"scale": 16.0, "margin": 0.4}),
    "cosface": (marginloss.CosFace, {"scale": 16.0, "margin": 0.3}),
    # λ fixed at 1 (base = min) so every forward uses the same target transform.
    "sphereface": (marginloss.SphereFace, {"margin": 4, "lambda_base": 1.0, "lambda_min": 1.0}),
    "lsoftmax": (marginloss.LSoftmax, {"margin": 2, "lambda_base": 0.5, "lambda_min": 0.5}),
    "normface": (marginloss.NormFace, {"scale": 8.0}),
    "combined": (marginloss.CombinedMargin, {"scale": 16.0, "m1": 1.0, "m2": 0.3, "m3": 0.2}),
    "uniformface": (marginloss.UniformFace, {"margin": 4, "lambda_base": 1.0, "lambda_min": 1.0, "uniform_weight": 2.0}),
    # Issue 13: one step each (t's EMA and the margin draws are over the global batch).
    "curricularface": (marginloss.CurricularFace, {"scale": 16.0, "margin": 0.4, "momentum": 0.3}),
    "elasticface": (marginloss.ElasticFace, {"scale": 16.0, "sigma": 0.1, "plus": True}),
    "elasticface_cos": (marginloss.ElasticFace, {"kind": "cos", "scale": 16.0, "sigma": 0.1}),
    "subcenter_arcface": (marginloss.SubCenterArcFace, {"num_subcenters": 3, "scale": 16.0, "margin": 0.4}),
    "uniface": (marginloss.UniFace, {"scale": 8.0, "margin": 0.3, "negative_weight": 0.7}),
    "sphereface2": (marginloss.SphereFace2, {"scale": 8.0, "margin": 0.3, "straight_through": False}),
}


class LearnedCosFace(marginloss.MarginHead):
    """A user-defined head with a learnable margin (the protocol issue's example)."""

    def __init__(self, embedding_dim: int, num_classes: int, **kwargs: Any) -> None:
        super().__init__(embedding_dim, num_classes, scale=8.0, **kwargs)
        self.margin = nn.Parameter(torch.tensor(0.3, dtype=kwargs.get("dtype")))

    def target(self, cos: torch.Tensor, context: Any) -> torch.Tensor:
        return cos - self.margin


LEARNED_CHUNKS = (1, 2, "auto")


@dataclasses.dataclass(frozen=True)
class Case:
    """One sharded forward/backward (or ``steps`` of them) and its single-process twin."""

    head: str
    num_classes: int
    batch_sizes: tuple[int, ...]
    chunk_size: int | str | None = "auto"
    reduction: str = "mean"
    label_smoothing: float = 0.0
    ignored_rows: bool = False
    sample_rate: float = 1.0
    steps: int = 1

    @property
    def name(self) -> str:
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
        return ",".join(fields).replace(" ", "")


def cases(world_size: int) -> list[Case]:
    if world_size == 2:
        listed = [
            Case(head, classes, batches)
            for head in ("arcface", "cosface", "sphereface")
            for classes, batches in ((12, (4, 4)), (13, (5, 3)))
        ]
        listed += [Case(head, 9, (3, 4)) for head in ("lsoftmax", "normface", "combined")]
        return [
            *listed,
            Case("arcface", 13, (5, 0), chunk_size=2, reduction="none", label_smoothing=0.1, ignored_rows=True),
            Case("cosface", 12, (2, 6), chunk_size=None, reduction="sum", label_smoothing=0.2),
            Case("lsoftmax", 11, (4, 3), chunk_size=3, label_smoothing=0.1, ignored_rows=True),
            Case("arcface", 13, (5, 3), label_smoothing=0.1, sample_rate=0.5, steps=2),
            Case("sphereface", 12, (4, 4), ignored_rows=True, sample_rate=0.3, steps=2),
            Case("cosface", 12, (0, 0)),
            Case("uniformface", 13, (5, 3), chunk_size=2, reduction="none", ignored_rows=True),
            Case("uniformface", 12, (4, 4)),
            Case("curricularface", 13, (5, 3)),
            Case("curricularface", 13, (5, 0), chunk_size=2, reduction="none", label_smoothing=0.1, ignored_rows=True),
            Case("elasticface", 13, (5, 3), chunk_size=2, ignored_rows=True),
            Case("elasticface_cos", 12, (2, 6)),
            Case("subcenter_arcface", 13, (5, 3), steps=2),  # per-rank counts are not shared state
            Case("subcenter_arcface", 13, (4, 2), chunk_size=2, label_smoothing=0.1, ignored_rows=True),
            Case("uniface", 13, (5, 3)),
            Case("sphereface2", 12, (4, 4), chunk_size=2, reduction="none", ignored_rows=True),
        ]
    return [
        *[
            Case(head, classes, batches)
            for head in ("arcface", "cosface", "sphereface")
            for classes, batches in ((12, (3, 2, 4)), (14, (4, 0, 3)))
        ],
        Case("cosface", 14, (4, 1, 3), chunk_size=2, reduction="none", label_smoothing=0.1, ignored_rows=True),
        Case("cosface", 14, (4, 2, 3), label_smoothing=0.1, sample_rate=0.4, steps=2),
        Case("curricularface", 14, (4, 1, 3), chunk_size=2),
        Case("elasticface", 14, (4, 0, 3)),
        Case("subcenter_arcface", 14, (4, 1, 3), chunk_size=3),
        Case("sphereface2", 14, (4, 0, 3), chunk_size=3),
    ]


def case_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global embeddings ``[N, D]``, labels ``[N]``, full weight ``[C, D]`` and the row
    weights that ``reduction="none"`` losses are summed with."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    total = sum(case.batch_sizes)
    k = HEADS[case.head][1].get("num_subcenters", 1)  # [C*K, D] for sub-centre heads
    weight = torch.randn(case.num_classes * k, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, case.num_classes, (total,), generator=gen)
    embeddings = torch.randn(total, DIM, generator=gen, dtype=torch.float64) + 0.7 * weight[labels * k]
    if case.ignored_rows:
        labels[::3] = -100
    coeffs = torch.rand(total, generator=gen, dtype=torch.float64) + 0.5
    return embeddings, labels, weight, coeffs


def make_head(case: Case, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    cls, hyperparameters = HEADS[case.head]
    return cls(
        DIM, num_classes or case.num_classes, **hyperparameters, reduction=case.reduction,
        label_smoothing=case.label_smoothing, chunk_size=case.chunk_size, dtype=torch.float64,
        **kwargs,
    )


def _load_rows(head: Any, weight: torch.Tensor) -> None:
    """load_full_weight, or for sub-centre heads (which it does not handle: it expects
    [C, D]) a copy of this rank's K rows per class."""
    k = head.num_subcenters
    if k == 1:
        MD.load_full_weight(head, weight)
        return
    with torch.no_grad():
        head.weight.copy_(weight[head.shard_start * k : (head.shard_start + head.shard_size) * k])


def backpropagate(loss: torch.Tensor, coeffs: torch.Tensor) -> None:
    """``backward`` of the loss, or of a weighted sum of the rows for ``reduction="none"``."""
    if loss.dim():
        loss = (loss * coeffs).sum()
    loss.backward()


def sampled_classes(case: Case, labels: torch.Tensor, world_size: int, step: int) -> torch.Tensor:
    """The union over ranks of the classes PartialFC keeps at ``step`` (sorted class ids)."""
    return torch.cat([
        MD.shard_range(case.num_classes, world_size, rank)[0]
        + MD.sample_classes(labels, case.num_classes, world_size, rank, case.sample_rate, seed=7, step=step)
        for rank in range(world_size)
    ])


# ---------------------------------------------------------------- what every rank runs


def _run_case(case: Case, rank: int, world_size: int) -> dict[str, list[torch.Tensor]]:
    import torch.distributed as dist

    embeddings, labels, weight, coeffs = case_inputs(case)
    start = sum(case.batch_sizes[:rank])
    stop = start + case.batch_sizes[rank]
    extra = {"sample_rate": case.sample_rate, "sample_seed": 7} if case.sample_rate < 1 else {}
    head = make_head(case, process_group=dist.group.WORLD, **extra)
    _load_rows(head, weight)
    seen: dict[str, list[torch.Tensor]] = {"loss": [], "grad_x": [], "grad_w": []}
    for _ in range(case.steps):
        x = embeddings[start:stop].clone().requires_grad_(True)
        loss = head(x, labels[start:stop])
        backpropagate(loss, coeffs)
        assert x.grad is not None and head.weight.grad is not None
        seen["loss"].append(loss.detach())
        seen["grad_x"].append(x.grad)
        seen["grad_w"].append(head.weight.grad.clone())
        head.weight.grad = None
    return seen


def _outcome(action: Callable[[], object]) -> tuple[str, str]:
    try:
        action()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "no error", ""


def _run_errors(rank: int, world_size: int) -> dict[str, tuple[str, str]]:
    """Bad input on some ranks only; every rank records what it raised."""
    import torch.distributed as dist

    group = dist.group.WORLD
    x = torch.randn(3, DIM, dtype=torch.float64)
    y = torch.tensor([0, 5, 11])

    def head(num_classes: int = 12, **kwargs: Any) -> nn.Module:
        return marginloss.ArcFace(DIM, num_classes, process_group=group, dtype=torch.float64, **kwargs)

    def f(cos: torch.Tensor) -> torch.Tensor:
        return cos

    sharded = head()
    bad_weight = torch.zeros(12 if rank == 0 else 6, DIM, dtype=torch.float64)
    checkpoint_13 = head(13).state_dict()
    return {
        "labels out of range": _outcome(lambda: sharded(x, y if rank == 0 else torch.tensor([0, 12, 1]))),
        "labels shape": _outcome(lambda: sharded(x, y if rank == 0 else y[:2])),
        "labels dtype": _outcome(lambda: sharded(x, y if rank == 0 else y.double())),
        "embedding_dim": _outcome(lambda: sharded(x if rank == 1 else x[:, :4], y)),
        "dtype": _outcome(lambda: sharded(x if rank == 0 else x.float(), y)),
        "nan": _outcome(lambda: sharded(x if rank == 1 else x * math.nan, y)),
        "requires_grad": _outcome(lambda: sharded(x.clone().requires_grad_(rank == 0), y)),
        "num_classes": _outcome(lambda: head(12 if rank == 0 else 13)(x, y)),
        "sample_rate head": _outcome(lambda: head(sample_rate=1.5)),
        "sample_rate functional": _outcome(
            lambda: MD.sharded_margin_softmax_loss(
                x, sharded.weight, y, f, num_classes=12, process_group=group,
                sample_rate=0.5 if rank == 0 else 0.0,
            )
        ),
        "settings": _outcome(
            lambda: MD.sharded_margin_softmax_loss(
                x, sharded.weight, y, f, num_classes=12, process_group=group, scale=2.0 + rank
            )
        ),
        "shard rows": _outcome(
            lambda: MD.sharded_margin_softmax_loss(x, bad_weight, y, f, num_classes=12, process_group=group)
        ),
        "checkpoint layout": _outcome(lambda: MD.load_sharded_state_dict(sharded, checkpoint_13)),
        "full weight shape": _outcome(
            lambda: MD.load_full_weight(sharded, torch.zeros(12 if rank == 0 else 13, DIM))
        ),
        "gather dst": _outcome(lambda: MD.gather_weight(sharded, dst=world_size)),
        "margin logits": _outcome(lambda: sharded.logits(x, y)),
        # The group is still in step after all of the above:
        "still in step": _outcome(lambda: sharded(x, y).backward()),
    }


def _run_ddp(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """A DDP backbone (gradients multiplied by the world size) and a sharded head."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    case = Case("arcface", 13, (5, 3)[:world_size])
    embeddings, labels, weight, _ = case_inputs(case)
    inputs = embeddings[:, :4] * 2.0
    torch.manual_seed(0)
    backbone = DistributedDataParallel(nn.Linear(4, DIM, dtype=torch.float64))
    head = make_head(case, process_group=dist.group.WORLD)
    MD.load_full_weight(head, weight)
    start = sum(case.batch_sizes[:rank])
    stop = start + case.batch_sizes[rank]
    loss = head(backbone(inputs[start:stop]), labels[start:stop])
    loss.backward()
    result = {name: param.grad * world_size for name, param in backbone.module.named_parameters()}
    result["loss"] = loss.detach()
    result["head"] = head.weight.grad
    return result


def _learned_inputs(world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    gen = torch.Generator().manual_seed(11 + world_size)
    sizes = (4, 2, 3)[:world_size]
    weight = torch.randn(13, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 13, (sum(sizes),), generator=gen)
    embeddings = torch.randn(sum(sizes), DIM, generator=gen, dtype=torch.float64) + 0.5 * weight[labels]
    return embeddings, labels, weight, sizes


def _run_learned(rank: int, world_size: int) -> dict[str, Any]:
    """The user-defined head, sharded: loss and the gradients of x, the shard and the margin."""
    import torch.distributed as dist

    embeddings, labels, weight, sizes = _learned_inputs(world_size)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    seen: dict[str, Any] = {}
    for chunk in LEARNED_CHUNKS:
        head = LearnedCosFace(DIM, 13, chunk_size=chunk, process_group=dist.group.WORLD, dtype=torch.float64)
        MD.load_full_weight(head, weight)
        x = embeddings[start:stop].clone().requires_grad_(True)
        loss = head(x, labels[start:stop])
        loss.backward()
        seen[str(chunk)] = (loss.detach(), x.grad, head.weight.grad, head.margin.grad)
    return seen


def _run_agreement(rank: int, world_size: int) -> dict[str, tuple[str, str]]:
    """Heads whose hyperparameters or state differ between ranks."""
    import torch.distributed as dist

    group = dist.group.WORLD
    x = torch.randn(3, DIM, dtype=torch.float64)
    y = torch.tensor([0, 5, 11])
    sphere = marginloss.SphereFace(DIM, 12, process_group=group, dtype=torch.float64)
    sphere.iteration.fill_(rank)
    learned = LearnedCosFace(DIM, 12, process_group=group, dtype=torch.float64)
    with torch.no_grad():
        learned.margin.fill_(0.3 + 0.1 * rank)
    return {
        "margin": _outcome(
            lambda: marginloss.ArcFace(DIM, 12, margin=0.5 - 0.1 * rank, process_group=group, dtype=torch.float64)(x, y)
        ),
        "easy_margin": _outcome(
            lambda: marginloss.ArcFace(DIM, 12, easy_margin=rank == 1, process_group=group, dtype=torch.float64)(x, y)
        ),
        "iteration": _outcome(lambda: sphere(x, y)),
        "user parameter": _outcome(lambda: learned(x, y)),
        "nan weight": _outcome(lambda: _nan_weight_head(rank, group)(x, y)),
        "agreeing heads still run": _outcome(
            lambda: marginloss.ArcFace(DIM, 12, process_group=group, dtype=torch.float64)(x, y).backward()
        ),
    }


def _nan_weight_head(rank: int, group: Any) -> nn.Module:
    head = marginloss.CosFace(DIM, 12, process_group=group, dtype=torch.float64)
    if rank == 1:
        with torch.no_grad():
            head.weight[2] = math.nan
    return head


def _run_checkpoints(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist

    group = dist.group.WORLD
    full = torch.randn(14, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    head = marginloss.CosFace(DIM, 14, process_group=group, dtype=torch.float64)
    start, size = MD.shard_range(14, world_size, rank)
    MD.load_full_weight(head, full if rank == 0 else None, src=0)
    from_src = torch.equal(head.weight.detach(), full[start : start + size])
    gathered = MD.gather_weight(head)
    at_last = MD.gather_weight(head, dst=world_size - 1)
    twin = marginloss.CosFace(DIM, 14, process_group=group, dtype=torch.float64)
    MD.load_sharded_state_dict(twin, head.state_dict())
    twin.train()
    fresh = marginloss.CosFace(DIM, 14, process_group=group, dtype=torch.float64)
    return {
        "loaded from src": from_src,
        "gathered on every rank": gathered is not None and torch.equal(gathered, full),
        "gathered on dst": (at_last is not None and torch.equal(at_last, full)) if rank == world_size - 1 else at_last is None,
        "state_dict round trip": torch.equal(twin.weight, head.weight),
        "state_dict keys": sorted(head.state_dict()),
        "shard_layout": head.shard_layout.tolist(),
        "repr": repr(head),
        "cosine shape": tuple(head.cosine(torch.randn(2, DIM, dtype=torch.float64)).shape),
        "fresh shard": fresh.weight.detach().clone(),
    }


def _worker(rank: int, world_size: int, init_method: str, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        results: dict[str, Any] = {case.name: _run_case(case, rank, world_size) for case in cases(world_size)}
        results["checkpoints"] = _run_checkpoints(rank, world_size)
        results["learned"] = _run_learned(rank, world_size)
        results["lgm"] = _run_lgm(rank, world_size)
        if world_size == 2:
            results["lgm_errors"] = _run_lgm_errors(rank, world_size)
            results["agreement"] = _run_agreement(rank, world_size)
            results["errors"] = _run_errors(rank, world_size)
            results["ddp"] = _run_ddp(rank, world_size)
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _main() -> None:
    parser = argparse.ArgumentParser(description="one rank of tests/test_distributed.py")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init", required=True, help="init_method, e.g. file:///tmp/x")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        _worker(args.rank, args.world_size, args.init, args.out)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    # The results are on disk: leave without the interpreter's teardown, where gloo's
    # threads have been seen to abort a finished rank ("terminate called without an active
    # exception") on a loaded machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- spawning


def _spawn(world_size: int, directory: Path) -> list[dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    init = f"file://{directory / 'rendezvous'}"
    logs = [open(directory / f"rank{rank}.log", "w+") for rank in range(world_size)]
    command = [sys.executable, "-m", "tests.test_distributed", "--world-size", str(world_size), "--init", init, "--out", str(directory)]
    procs = [
        subprocess.Popen([*command, "--rank", str(rank)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        for rank, log in enumerate(logs)
    ]
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    failure = ""
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            failure = "a rank failed"
            break
        if time.monotonic() > deadline:
            failure = f"ranks still running after {SPAWN_TIMEOUT_S} s (a hang?)"
            break
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if not failure and any(p.returncode != 0 for p in procs):
        failure = "a rank failed"
    outputs = []
    for rank, log in enumerate(logs):
        log.seek(0)
        outputs.append(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    if failure:
        raise RuntimeError(f"{world_size} gloo ranks: {failure}\n" + "\n".join(outputs))
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(world_size)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], list[dict[str, Any]]]:
    """``ranks(world_size)``: every rank's results, spawning each world size once."""
    done: dict[int, list[dict[str, Any]] | BaseException] = {}

    def get(world_size: int) -> list[dict[str, Any]]:
        if world_size not in done:
            try:
                done[world_size] = _spawn(world_size, tmp_path_factory.mktemp(f"world{world_size}"))
            except BaseException as exc:
                done[world_size] = exc
        result = done[world_size]
        if isinstance(result, BaseException):
            raise result
        return result

    return get


# ---------------------------------------------------------------- against one process


def _reference(case: Case, world_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, embedding and full weight gradient of one process on the global batch (for a
    sampled case: a plain head over the sampled classes only)."""
    embeddings, labels, weight, coeffs = case_inputs(case)
    classes = torch.arange(case.num_classes)
    if case.sample_rate < 1:
        classes = sampled_classes(case, labels, world_size, step)
    head = make_head(case, num_classes=len(classes))
    _load_rows(head, weight if case.sample_rate == 1 else weight[classes])
    valid = labels != -100
    restricted = torch.where(valid, torch.searchsorted(classes, labels.clamp_min(0)), -100)
    assert bool((classes[restricted[valid]] == labels[valid]).all()), "a positive class was not sampled"
    x = embeddings.clone().requires_grad_(True)
    loss = head(x, restricted)
    backpropagate(loss, coeffs)
    grad_w = torch.zeros_like(weight)
    if case.sample_rate < 1:
        grad_w[classes] = head.weight.grad
    else:
        grad_w = head.weight.grad  # every row (K per class for sub-centre heads)
    return loss.detach(), x.grad, grad_w


@pytest.mark.parametrize(
    "world_size, case",
    [(w, c) for w in (2, 3) for c in cases(w)],
    ids=[f"{w}ranks-{c.name}" for w in (2, 3) for c in cases(w)],
)
def test_matches_one_process_on_the_global_batch(world_size: int, case: Case, ranks: Any) -> None:
    from tests.reference import assert_close

    results = [rank[case.name] for rank in ranks(world_size)]
    tol = {"rtol": 1e-10, "atol": 1e-10}
    for step in range(case.steps):
        loss, grad_x, grad_w = _reference(case, world_size, step)
        for rank, seen in enumerate(results):
            assert_close(seen["loss"][step], loss, **tol, what=f"loss on rank {rank}, step {step}")
        assert_close(torch.cat([seen["grad_x"][step] for seen in results]), grad_x, **tol, what=f"embedding grad, step {step}")
        assert_close(torch.cat([seen["grad_w"][step] for seen in results]), grad_w, **tol, what=f"weight grad, step {step}")
    if case.steps > 1 and case.sample_rate < 1:
        _, labels, _, _ = case_inputs(case)
        first, second = (sampled_classes(case, labels, world_size, step) for step in (0, 1))
        assert not torch.equal(first, second), "the sample should change from step to step"


def test_ddp_backbone_times_world_size_gets_the_exact_gradient(ranks: Any) -> None:
    from tests.reference import assert_close

    results = [rank["ddp"] for rank in ranks(2)]
    case = Case("arcface", 13, (5, 3))
    embeddings, labels, weight, _ = case_inputs(case)
    torch.manual_seed(0)
    backbone = nn.Linear(4, DIM, dtype=torch.float64)
    head = make_head(case)
    MD.load_full_weight(head, weight)
    loss = head(backbone(embeddings[:, :4] * 2.0), labels)
    loss.backward()
    for rank, seen in enumerate(results):
        assert_close(seen["loss"], loss, rtol=1e-10, atol=1e-10, what=f"loss on rank {rank}")
        for name, param in backbone.named_parameters():
            assert_close(seen[name], param.grad, rtol=1e-10, atol=1e-10, what=f"{name}.grad on rank {rank}")
    assert_close(torch.cat([seen["head"] for seen in results]), head.weight.grad, rtol=1e-10, atol=1e-10, what="head grad")


@pytest.mark.parametrize("world_size", [2, 3])
def test_checkpoints_gather_and_load_any_world_size(world_size: int, ranks: Any) -> None:
    results = [rank["checkpoints"] for rank in ranks(world_size)]
    for rank, seen in enumerate(results):
        for check in ("loaded from src", "gathered on every rank", "gathered on dst", "state_dict round trip"):
            assert seen[check], f"{check} on rank {rank}"
        assert seen["state_dict keys"] == ["sample_step", "shard_layout", "weight"]
        start, size = MD.shard_range(14, world_size, rank)
        assert seen["shard_layout"] == [14, world_size, start, size]
        assert f"process_group=<rank {rank} of {world_size}, classes [{start}, {start + size})>" in seen["repr"]
        assert seen["cosine shape"] == (2, size)
        # Xavier bound of the full [14, D] matrix; shards are not copies of one another.
        assert float(seen["fresh shard"].abs().max()) <= math.sqrt(6 / (14 + DIM))
    assert not torch.equal(results[0]["fresh shard"][:4], results[1]["fresh shard"][:4])


ERRORS = {
    "labels out of range": "rank 1: labels must be in [0, 12)",
    "labels shape": "rank 1: labels must have shape [3]",
    "labels dtype": "rank 1: labels must be an integer tensor",
    "embedding_dim": "rank 0: embeddings must have shape [batch, 6]",
    "dtype": "the embeddings' dtype must be the same on every rank, got ['float64', 'float32']",
    "nan": "rank 0: embeddings must be finite",
    "requires_grad": "embeddings.requires_grad (every rank must backpropagate, or none) must be the same",
    "num_classes": "num_classes must be the same on every rank, got [12, 13]",
    "sample_rate head": "sample_rate must be in (0, 1], got 1.5",
    "sample_rate functional": "rank 1: sample_rate must be in (0, 1], got 0.0",
    "settings": "scale must be the same on every rank, got [2.0, 3.0]",
    "shard rows": "rank 0: weight has 12 rows but rank 0 of 2 holds classes [0, 6)",
    "checkpoint layout": "the checkpoint holds classes",
    "full weight shape": "rank 1: full_weight must have shape [12, 6]",
    "gather dst": "dst must be None or a rank in [0, 2), got 2",
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_input_raises_the_same_error_on_every_rank(name: str, ranks: Any) -> None:
    outcomes = [rank["errors"][name] for rank in ranks(2)]
    for rank, (kind, message) in enumerate(outcomes):
        assert kind == "ValueError", f"rank {rank} raised {kind}: {message}"
        assert ERRORS[name] in message, f"rank {rank}: {message}"
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("world_size", [2, 3])
def test_user_defined_head_with_learnable_margin_matches_float64(world_size: int, ranks: Any) -> None:
    """The protocol's promise: a user head gets sharding, and its margin its exact gradient."""
    from tests.reference import assert_close, generic_head_loss

    embeddings, labels, weight, _ = _learned_inputs(world_size)
    x = embeddings.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    margin = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    expected = generic_head_loss(x, w, labels, scale=8.0, target=lambda c, i: c - margin).mean()
    expected.backward()
    tol = {"rtol": 1e-10, "atol": 1e-12}
    results = [rank["learned"] for rank in ranks(world_size)]
    for chunk in LEARNED_CHUNKS:
        seen = [result[str(chunk)] for result in results]
        for rank, (loss, _, _, grad_margin) in enumerate(seen):
            assert_close(loss, expected, **tol, what=f"loss on rank {rank}, chunk {chunk}")
            assert_close(grad_margin, margin.grad, **tol, what=f"margin.grad on rank {rank}, chunk {chunk}")
        assert_close(torch.cat([s[1] for s in seen]), x.grad, **tol, what=f"embeddings.grad, chunk {chunk}")
        assert_close(torch.cat([s[2] for s in seen]), w.grad, **tol, what=f"weight.grad, chunk {chunk}")


AGREEMENT = {
    "margin": "the head's hyperparameters must be the same on every rank (raised on every rank); by rank, margin: [0.5, 0.4]",
    "easy_margin": "by rank, easy_margin: [False, True]",
    "iteration": "the head's state (buffers and parameters other than weight) must be the same on every rank",
    "user parameter": "by rank, margin: [0.3",
    "nan weight": "rank 1: weight must be finite, got 1 of 6 row(s)",
}


@pytest.mark.parametrize("name", sorted(AGREEMENT))
def test_ranks_that_disagree_raise_the_same_error(name: str, ranks: Any) -> None:
    """0.1 checked scale and num_classes across ranks but not the margin or the state: rows
    got the margin of whichever rank owned their class."""
    outcomes = [rank["agreement"][name] for rank in ranks(2)]
    for rank, (kind, message) in enumerate(outcomes):
        assert kind == "ValueError", f"rank {rank} raised {kind}: {message}"
        assert AGREEMENT[name] in message, f"rank {rank}: {message}"
    assert outcomes[0] == outcomes[1]
    assert [rank["agreement"]["agreeing heads still run"] for rank in ranks(2)] == [("no error", "")] * 2


def test_group_stays_in_step_after_errors(ranks: Any) -> None:
    results = [rank["errors"] for rank in ranks(2)]
    assert [seen["still in step"] for seen in results] == [("no error", "")] * 2
    # A local misuse is a local error:
    assert results[0]["margin logits"][0] == "ValueError"
    assert "holds classes [0, 6) only" in results[0]["margin logits"][1]


# ---------------------------------------------------------------- in one process


@given(num_classes=st.integers(1, 500), world_size=st.integers(1, 17))
@settings(max_examples=60, deadline=None)
def test_shard_range_is_a_contiguous_near_even_split(num_classes: int, world_size: int) -> None:
    if num_classes < world_size:
        with pytest.raises(ValueError, match="num_classes must be at least world_size"):
            MD.shard_range(num_classes, world_size, 0)
        return
    shards = [MD.shard_range(num_classes, world_size, rank) for rank in range(world_size)]
    assert [start for start, _ in shards] == [sum(size for _, size in shards[:r]) for r in range(world_size)]
    assert sum(size for _, size in shards) == num_classes
    expected = [len(part) for part in torch.arange(num_classes).tensor_split(world_size)]
    assert [size for _, size in shards] == expected


@pytest.mark.parametrize(
    "args, match",
    [
        ((10, 0, 0), "world_size must be a positive int"),
        ((10, 2, 2), r"rank must be an int in \[0, 2\)"),
        ((0, 1, 0), "num_classes must be a positive int"),
    ],
)
def test_shard_range_errors(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MD.shard_range(*args)


def test_sample_classes_keeps_positives_and_draws_uniformly() -> None:
    labels = torch.tensor([3, 14, 3, 27, -100, 39])
    for rank, (positives, count) in enumerate((([3, 14], 5), ([7], 5))):  # shards [0, 20), [20, 40)
        rows = MD.sample_classes(labels, 40, 2, rank, 0.25, seed=1, step=0)
        assert len(rows) == count and torch.equal(rows, rows.unique())
        assert set(positives) <= set(rows.tolist())
    # Every positive is kept even above the budget; rate 1 keeps everything.
    many = torch.arange(10)
    assert MD.sample_classes(many, 20, 1, 0, 0.1).tolist() == list(range(10))
    assert MD.sample_classes(labels, 40, 2, 0, 1.0).tolist() == list(range(20))
    assert len(MD.sample_classes(torch.tensor([-1]), 30, 1, 0, 0.1)) == 3  # not 4 from 0.1 * 30
    # Reproducible from (seed, rank, step) alone; different steps and seeds draw differently.
    empty = torch.tensor([-100])
    draw = [MD.sample_classes(empty, 40, 2, 0, 0.25, seed=1, step=step) for step in range(400)]
    assert torch.equal(draw[5], MD.sample_classes(empty, 40, 2, 0, 0.25, seed=1, step=5))
    assert not torch.equal(draw[5], MD.sample_classes(empty, 40, 2, 0, 0.25, seed=2, step=5))
    counts = torch.bincount(torch.cat(draw), minlength=20)  # 400 draws of 5 of 20: 100 each
    assert int(counts.min()) > 60 and int(counts.max()) < 140, counts.tolist()


@pytest.mark.parametrize("head", ["arcface", "sphereface"])
def test_sampling_in_one_process_is_the_restricted_head(head: str) -> None:
    from tests.reference import assert_close

    case = Case(head, 30, (9,), label_smoothing=0.1, ignored_rows=True, sample_rate=0.2, steps=2)
    embeddings, labels, weight, _ = case_inputs(case)
    sampled = make_head(case, sample_rate=0.2, sample_seed=7)
    MD.load_full_weight(sampled, weight)
    assert "sample_rate=0.2, sample_seed=7" in repr(sampled)
    for step in range(2):
        loss = sampled(embeddings, labels)
        expected, _, _ = _reference(case, 1, step)
        assert_close(loss, expected, rtol=1e-12, atol=1e-12, what=f"step {step}")
    assert int(sampled.sample_step) == 2 and "sample_step" in sampled.state_dict()
    sampled.eval()  # no sampling outside training: the full softmax
    full = make_head(case)
    MD.load_full_weight(full, weight)
    assert_close(sampled(embeddings, labels), full(embeddings, labels), rtol=1e-12, atol=1e-12, what="eval")
    assert int(sampled.sample_step) == 2


def test_single_process_heads_are_unchanged() -> None:
    head = marginloss.ArcFace(DIM, 10)
    assert head.weight.shape == (10, DIM) and list(head.state_dict()) == ["weight"]
    assert "process_group" not in repr(head) and "sample_rate" not in repr(head)
    assert head.shard_start == 0 and head.shard_size == 10


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sample_rate": 0.0}, ValueError, r"sample_rate must be in \(0, 1\], got 0.0"),
        ({"sample_rate": 1.5}, ValueError, r"sample_rate must be in \(0, 1\], got 1.5"),
        ({"sample_rate": math.nan}, ValueError, r"sample_rate must be in \(0, 1\]"),
        ({"sample_seed": 1.0}, TypeError, "sample_seed must be an int, got float"),
    ],
)
def test_bad_sampling_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        marginloss.CosFace(DIM, 10, **kwargs)


def test_gather_and_load_without_a_group() -> None:
    head = marginloss.NormFace(DIM, 5)
    full = torch.randn(5, DIM)
    MD.load_full_weight(head, full)
    gathered = MD.gather_weight(head)
    assert gathered is not None and torch.equal(gathered, full)
    with pytest.raises(ValueError, match=r"full_weight must have shape \[5, 6\]"):
        MD.load_full_weight(head, torch.zeros(4, DIM))
    with pytest.raises(ValueError, match="missing"):
        MD.load_sharded_state_dict(head, {})


@pytest.mark.slow
def test_example_runs_under_torchrun(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "examples" / "distributed" / "train.py"), "--smoke", "--out", str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "weight.pt").exists()
    assert "checkpoint round trip: ok" in done.stdout



# ---------------------------------------------------------------- L-GM, class-sharded (issue 14)


@dataclasses.dataclass(frozen=True)
class LGMCase:
    """One sharded L-GM forward/backward (or ``steps`` of them) and its float64 reference."""

    covariance: str
    num_classes: int
    batch_sizes: tuple[int, ...]
    chunk_size: int | str | None = "auto"
    reduction: str = "mean"
    label_smoothing: float = 0.0
    ignored_rows: bool = False
    sample_rate: float = 1.0
    steps: int = 1

    @property
    def name(self) -> str:
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
        return "lgm:" + ",".join(fields).replace(" ", "")


LGM_HYPERPARAMETERS = {"alpha": 0.3, "lambda_lkd": 0.5}


def lgm_cases(world_size: int) -> list[LGMCase]:
    if world_size == 2:
        return [
            LGMCase("diagonal", 13, (5, 3)),
            LGMCase("identity", 12, (4, 4), chunk_size=2, reduction="none", label_smoothing=0.1, ignored_rows=True),
            LGMCase("diagonal", 13, (5, 0), chunk_size=3, reduction="sum", ignored_rows=True),
            LGMCase("diagonal", 13, (2, 6), chunk_size=None, label_smoothing=0.2),
            LGMCase("diagonal", 13, (5, 3), label_smoothing=0.1, ignored_rows=True, sample_rate=0.5, steps=2),
        ]
    return [
        LGMCase("diagonal", 14, (4, 0, 3), chunk_size=2),
        LGMCase("identity", 14, (3, 2, 4), reduction="none", label_smoothing=0.2, ignored_rows=True),
        LGMCase("diagonal", 17, (2, 1, 1), sample_rate=0.4, steps=2),
    ]


def lgm_inputs(case: LGMCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global embeddings ``[N, D]``, labels ``[N]``, full means and log-variances ``[C, D]``
    and the row weights that ``reduction="none"`` losses are summed with."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    total = sum(case.batch_sizes)
    means = torch.randn(case.num_classes, DIM, generator=gen, dtype=torch.float64)
    log_variance = 0.4 * torch.randn(case.num_classes, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, case.num_classes, (total,), generator=gen)
    embeddings = means[labels] + 0.8 * torch.randn(total, DIM, generator=gen, dtype=torch.float64)
    if case.ignored_rows:
        labels[::3] = -100
    coeffs = torch.rand(total, generator=gen, dtype=torch.float64) + 0.5
    return embeddings, labels, means, log_variance, coeffs


def make_lgm(case: LGMCase, num_classes: int | None = None, **kwargs: Any) -> Any:
    return marginloss.LGM(
        DIM, num_classes or case.num_classes, **LGM_HYPERPARAMETERS, covariance=case.covariance,
        reduction=case.reduction, label_smoothing=case.label_smoothing, chunk_size=case.chunk_size,
        dtype=torch.float64, **kwargs,
    )


def _load_lgm(head: Any, means: torch.Tensor, log_variance: torch.Tensor) -> None:
    rows = slice(head.shard_start, head.shard_start + head.shard_size)
    with torch.no_grad():
        head.means.copy_(means[rows])
        if head.log_variance is not None:
            head.log_variance.copy_(log_variance[rows])


def lgm_sampled_classes(case: LGMCase, labels: torch.Tensor, world_size: int, step: int) -> torch.Tensor:
    """The union over ranks of the classes PartialFC keeps at ``step`` (sorted class ids)."""
    return torch.cat([
        MD.shard_range(case.num_classes, world_size, rank)[0]
        + MD.sample_classes(labels, case.num_classes, world_size, rank, case.sample_rate, seed=5, step=step)
        for rank in range(world_size)
    ])


def _run_lgm(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist

    group = dist.group.WORLD
    seen: dict[str, Any] = {}
    for case in lgm_cases(world_size):
        embeddings, labels, means, log_variance, coeffs = lgm_inputs(case)
        start = sum(case.batch_sizes[:rank])
        stop = start + case.batch_sizes[rank]
        extra = {"sample_rate": case.sample_rate, "sample_seed": 5} if case.sample_rate < 1 else {}
        head = make_lgm(case, process_group=group, **extra)
        _load_lgm(head, means, log_variance)
        steps: list[tuple[torch.Tensor, ...]] = []
        for _ in range(case.steps):
            x = embeddings[start:stop].clone().requires_grad_(True)
            loss = head(x, labels[start:stop])
            backpropagate(loss, coeffs)
            grad_u = head.log_variance.grad.clone() if head.log_variance is not None else torch.zeros(0)
            steps.append((loss.detach(), x.grad, head.means.grad.clone(), grad_u))
            head.zero_grad(set_to_none=True)
        seen[case.name] = steps
    head = marginloss.LGM(DIM, 14, covariance="diagonal", process_group=group, dtype=torch.float64)
    seen["checkpoint"] = {
        "state_dict keys": sorted(head.state_dict()),
        "shard_layout": head.shard_layout.tolist(),
        "repr": repr(head),
        "logits shape": tuple(head.logits(torch.randn(2, DIM, dtype=torch.float64)).shape),
        "fresh shard": head.means.detach().clone(),
    }
    return seen


def _run_lgm_errors(rank: int, world_size: int) -> dict[str, tuple[str, str]]:
    """Sharded L-GM heads whose ranks disagree, or get bad input on one rank only."""
    import torch.distributed as dist

    group = dist.group.WORLD
    x = torch.randn(3, DIM, dtype=torch.float64)
    y = torch.tensor([0, 5, 11])

    def head(num_classes: int = 12, **kwargs: Any) -> Any:
        return marginloss.LGM(DIM, num_classes, process_group=group, dtype=torch.float64, **kwargs)

    sharded = head(covariance="diagonal")
    return {
        "alpha": _outcome(lambda: head(alpha=0.1 + 0.1 * rank)(x, y)),
        "lambda_lkd": _outcome(lambda: head(lambda_lkd=0.01 * (rank + 1))(x, y)),
        "covariance": _outcome(lambda: head(covariance="diagonal" if rank == 1 else "identity")(x, y)),
        "num_classes": _outcome(lambda: head(12 if rank == 0 else 13)(x, y)),
        "reduction": _outcome(lambda: head(reduction="sum" if rank == 0 else "mean")(x, y)),
        "labels out of range": _outcome(lambda: sharded(x, y if rank == 0 else torch.tensor([0, 12, 1]))),
        "labels shape": _outcome(lambda: sharded(x, y if rank == 0 else y[:2])),
        "embedding_dim": _outcome(lambda: sharded(x if rank == 1 else x[:, :4], y)),
        "dtype": _outcome(lambda: sharded(x if rank == 0 else x.float(), y)),
        "nan": _outcome(lambda: sharded(x if rank == 1 else x * math.nan, y)),
        "requires_grad": _outcome(lambda: sharded(x.clone().requires_grad_(rank == 0), y)),
        "sample_rate head": _outcome(lambda: head(sample_rate=1.5)),
        "margin logits": _outcome(lambda: sharded.logits(x, y)),
        # The group is still in step after all of the above:
        "still in step": _outcome(lambda: sharded(x.clone().requires_grad_(True), y).backward()),
    }


def _lgm_reference(case: LGMCase, world_size: int, step: int) -> tuple[torch.Tensor, ...]:
    """Loss and gradients (embeddings, means, log-variances) of the float64 per-sample
    reference on the global batch (for a sampled case: over the sampled classes only)."""
    from tests.reference import lgm_loss

    embeddings, labels, means, log_variance, coeffs = lgm_inputs(case)
    classes = torch.arange(case.num_classes)
    if case.sample_rate < 1:
        classes = lgm_sampled_classes(case, labels, world_size, step)
    valid = labels != -100
    restricted = torch.where(valid, torch.searchsorted(classes, labels.clamp_min(0)), -100)
    assert bool((classes[restricted[valid]] == labels[valid]).all()), "a positive class was not sampled"
    x = embeddings.clone().requires_grad_(True)
    mu = means[classes].clone().requires_grad_(True)
    u = log_variance[classes].clone().requires_grad_(True) if case.covariance == "diagonal" else None
    rows = lgm_loss(x, mu, restricted, log_variance=u, label_smoothing=case.label_smoothing, **LGM_HYPERPARAMETERS)
    if case.reduction == "none":
        loss = torch.where(valid, rows, torch.zeros_like(rows))
    elif case.reduction == "sum":
        loss = rows[valid].sum()
    else:
        loss = rows[valid].sum() / max(int(valid.sum()), 1)
    backpropagate(loss, coeffs)
    grad_mu = torch.zeros_like(means)
    grad_mu[classes] = mu.grad
    grad_u = torch.zeros(0, dtype=torch.float64)
    if u is not None:
        grad_u = torch.zeros_like(log_variance)
        grad_u[classes] = u.grad
    return loss.detach(), x.grad, grad_mu, grad_u


@pytest.mark.parametrize(
    "world_size, case",
    [(w, c) for w in (2, 3) for c in lgm_cases(w)],
    ids=[f"{w}ranks-{c.name}" for w in (2, 3) for c in lgm_cases(w)],
)
def test_lgm_sharded_matches_the_float64_reference(world_size: int, case: LGMCase, ranks: Any) -> None:
    """Loss (classification + likelihood) and the gradients of the embeddings, the means and
    the log-variances, uneven shards and batches (an empty rank included), against one process."""
    from tests.reference import assert_close

    results = [rank["lgm"][case.name] for rank in ranks(world_size)]
    tol = {"rtol": 1e-10, "atol": 1e-10}
    for step in range(case.steps):
        loss, grad_x, grad_mu, grad_u = _lgm_reference(case, world_size, step)
        for rank, seen in enumerate(results):
            assert_close(seen[step][0], loss, **tol, what=f"loss on rank {rank}, step {step}")
        assert_close(torch.cat([seen[step][1] for seen in results]), grad_x, **tol, what=f"embedding grad, step {step}")
        assert_close(torch.cat([seen[step][2] for seen in results]), grad_mu, **tol, what=f"means grad, step {step}")
        if case.covariance == "diagonal":
            assert_close(torch.cat([seen[step][3] for seen in results]), grad_u, **tol, what=f"log_variance grad, step {step}")
    if case.steps > 1 and case.sample_rate < 1:
        _, labels, _, _, _ = lgm_inputs(case)
        first, second = (lgm_sampled_classes(case, labels, world_size, step) for step in (0, 1))
        assert not torch.equal(first, second), "the sample should change from step to step"


@pytest.mark.parametrize("world_size", [2, 3])
def test_lgm_sharded_state_layout_and_init(world_size: int, ranks: Any) -> None:
    results = [rank["lgm"]["checkpoint"] for rank in ranks(world_size)]
    for rank, seen in enumerate(results):
        assert seen["state_dict keys"] == ["log_variance", "means", "sample_step", "shard_layout"]
        start, size = MD.shard_range(14, world_size, rank)
        assert seen["shard_layout"] == [14, world_size, start, size]
        assert f"process_group=<rank {rank} of {world_size}, classes [{start}, {start + size})>" in seen["repr"]
        assert seen["logits shape"] == (2, size)
        # Xavier bound of the full [14, D] matrix; shards are not copies of one another.
        assert float(seen["fresh shard"].abs().max()) <= math.sqrt(6 / (14 + DIM))
    assert not torch.equal(results[0]["fresh shard"][:4], results[1]["fresh shard"][:4])


LGM_ERRORS = {
    "alpha": "sharded LGM: alpha must be the same on every rank, got [0.1, 0.2]",
    "lambda_lkd": "lambda_lkd must be the same on every rank, got [0.01, 0.02]",
    "covariance": "covariance must be the same on every rank, got ['identity', 'diagonal']",
    "num_classes": "num_classes must be the same on every rank, got [12, 13]",
    "reduction": "reduction must be the same on every rank, got ['sum', 'mean']",
    "labels out of range": "rank 1: labels must be in [0, 12)",
    "labels shape": "rank 1: labels must have shape [3]",
    "embedding_dim": "rank 0: embeddings must have shape [batch, 6]",
    "dtype": "the embeddings' dtype must be the same on every rank, got ['float64', 'float32']",
    "nan": "rank 0: embeddings must be finite",
    "requires_grad": "embeddings.requires_grad (every rank must backpropagate, or none) must be the same",
    "sample_rate head": "sample_rate must be in (0, 1], got 1.5",
}


@pytest.mark.parametrize("name", sorted(LGM_ERRORS))
def test_lgm_ranks_that_disagree_raise_the_same_error(name: str, ranks: Any) -> None:
    outcomes = [rank["lgm_errors"][name] for rank in ranks(2)]
    for rank, (kind, message) in enumerate(outcomes):
        assert kind == "ValueError", f"rank {rank} raised {kind}: {message}"
        assert LGM_ERRORS[name] in message, f"rank {rank}: {message}"
    assert outcomes[0] == outcomes[1]


def test_lgm_group_stays_in_step_after_errors(ranks: Any) -> None:
    results = [rank["lgm_errors"] for rank in ranks(2)]
    assert [seen["still in step"] for seen in results] == [("no error", "")] * 2
    assert results[0]["margin logits"][0] == "ValueError"
    assert "holds classes [0, 6) only" in results[0]["margin logits"][1]


@pytest.mark.parametrize("covariance", ["identity", "diagonal"])
def test_lgm_sampling_in_one_process_is_the_restricted_head(covariance: str) -> None:
    from tests.reference import assert_close

    case = LGMCase(covariance, 30, (9,), label_smoothing=0.1, ignored_rows=True, sample_rate=0.2, steps=2)
    embeddings, labels, means, log_variance, _ = lgm_inputs(case)
    sampled = make_lgm(case, sample_rate=0.2, sample_seed=5)
    _load_lgm(sampled, means, log_variance)
    assert "sample_rate=0.2, sample_seed=5" in repr(sampled)
    for step in range(2):
        x = embeddings.clone().requires_grad_(True)
        loss = sampled(x, labels)
        loss.backward()
        expected, grad_x, grad_mu, grad_u = _lgm_reference(case, 1, step)
        assert_close(loss, expected, rtol=1e-12, atol=1e-12, what=f"loss, step {step}")
        assert_close(x.grad, grad_x, rtol=1e-10, atol=1e-12, what=f"embedding grad, step {step}")
        assert_close(sampled.means.grad, grad_mu, rtol=1e-10, atol=1e-12, what=f"means grad, step {step}")
        if covariance == "diagonal":
            assert_close(sampled.log_variance.grad, grad_u, rtol=1e-10, atol=1e-12, what=f"log_variance grad, step {step}")
        sampled.zero_grad(set_to_none=True)
    assert int(sampled.sample_step) == 2 and "sample_step" in sampled.state_dict()
    sampled.eval()  # no sampling outside training: the full softmax
    full = make_lgm(case)
    _load_lgm(full, means, log_variance)
    assert_close(sampled(embeddings, labels), full(embeddings, labels), rtol=1e-12, atol=1e-12, what="eval")
    assert int(sampled.sample_step) == 2


def test_lgm_single_process_head_is_unchanged_by_sharding_arguments() -> None:
    head = marginloss.LGM(DIM, 10)
    assert head.means.shape == (10, DIM) and list(head.state_dict()) == ["means"]
    assert "process_group" not in repr(head) and "sample_rate" not in repr(head)
    assert head.shard_start == 0 and head.shard_size == 10
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\], got 0.0"):
        marginloss.LGM(DIM, 10, sample_rate=0.0)
    with pytest.raises(TypeError, match="sample_seed must be an int, got float"):
        marginloss.LGM(DIM, 10, sample_seed=1.0)

if __name__ == "__main__":
    _main()
