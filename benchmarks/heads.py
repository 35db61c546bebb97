"""Forward+backward time and peak memory of margin softmax heads against their baselines.

Measures, for ``B`` embeddings of dimension ``D`` and ``C`` classes:

``gemm``
    the three bare GEMMs of the same shapes (``x·Wᵀ``, ``G·W``, ``Gᵀ·x``), the compute floor,
    with ``G`` the true softmax gradient of the scenario's logits, subnormals flushed to zero;
``gemm_subnormal``
    the same GEMMs with ``G`` as autograd produces it, subnormals kept (trained-like inputs);
``plain``
    plain PyTorch ArcFace, ``tests.reference.plain_arcface_loss`` (normalize, linear,
    acos/cos on the target, cross entropy), so the benchmark and the tests share one baseline;
``pml``
    pytorch-metric-learning ``ArcFaceLoss`` (its weight is ``[D, C]``);
``marginloss_plain`` / ``marginloss_fused``
    :mod:`marginloss.functional` with ``chunk_size=None`` / ``"auto"`` (or ``--chunk-sizes``);
``every-head`` scenario (``--scenarios every-head``, ``--heads``)
    ``gemm`` and ``marginloss_fused`` for every registered head, built by
    :func:`marginloss.create_head` at its defaults, each against its own floor;
``baseline_fused``
    ``marginloss_fused`` imported from another source tree (``--baseline-tree``, e.g. a
    ``git worktree`` of the previous release), so a redesign is measured before and after
    in one run.

Scenarios: ``arcface-random`` (random embeddings, Xavier weights: the time/memory vs C
sweep), ``arcface-trained`` (embeddings at cos 0.7 to their class weight) and
``sphereface-trained`` (the same directions with feature norm 200, where many softmax
probabilities become subnormal floats).

Every (scenario, method, C, dtype) runs in a fresh subprocess: warm-up step(s), timed steps
(median reported), then one step whose peak memory is measured (see ``_measure.py``; on CUDA
``torch.cuda.max_memory_allocated``).  Memory is reported above the inputs, the weight and
the weight's gradient: ``W.grad`` starts as ``None`` (``zero_grad(set_to_none=True)``), so
the step's gradient becomes ``W.grad`` and its size is subtracted.

Writes ``<out>/<device>.json``, ``.md`` and ``.png`` (``<device>-quick.*`` into a temporary
folder with ``--quick``)
and, for a full run into ``benchmarks/results``, the table in ``benchmarks/README.md``.

Examples::

    python benchmarks/heads.py                      # full run, ~20-30 min on 2 CPU cores
    python benchmarks/heads.py --quick              # smoke run, about a minute
    python benchmarks/heads.py --chunk-sizes 1024,2048,4096,8192,16384 --sweep-sizes 100k
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
RESULT_PREFIX = "RESULT "

SCALE = 64.0  # ArcFace s (the paper's value)
ARC_MARGIN = 0.5  # ArcFace m, radians
SPHERE_MARGIN = 4
SPHERE_LAMBDA = 5.0  # SphereFace's lambda_min: the value the annealing ends at
TRAINED_COS = 0.7  # cos θ between a trained-like embedding and its class weight
SPHERE_FEATURE_NORM = 200.0  # ‖x‖ of trained-like SphereFace features (late training)

METHODS = ("gemm", "gemm_subnormal", "plain", "pml", "marginloss_plain", "marginloss_fused", "baseline_fused")
LABELS = {
    "gemm": "bare GEMMs (floor)",
    "gemm_subnormal": "bare GEMMs, subnormals kept in G",
    "plain": "plain PyTorch ArcFace",
    "pml": "pytorch-metric-learning ArcFaceLoss",
    "marginloss_plain": "marginloss plain (chunk_size=None)",
    "marginloss_fused": "marginloss fused (chunk_size=auto)",
    "baseline_fused": "baseline tree's marginloss fused (--baseline-tree)",
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "arcface-random": {
        "head": "arcface",
        "embeddings": "random",
        "methods": ("gemm", "plain", "pml", "marginloss_plain", "marginloss_fused", "baseline_fused"),
        "about": "ArcFace (s=64, m=0.5), x ~ N(0, I), W Xavier-uniform (random init)",
    },
    "arcface-trained": {
        "head": "arcface",
        "embeddings": "trained",
        "feature_norm": 1.0,
        "methods": ("gemm", "plain", "pml", "marginloss_plain", "marginloss_fused", "baseline_fused"),
        "about": f"ArcFace (s=64, m=0.5), each x at cos θ = {TRAINED_COS} to its class weight",
    },
    "sphereface-trained": {
        "head": "sphereface",
        "embeddings": "trained",
        "feature_norm": SPHERE_FEATURE_NORM,
        "methods": ("gemm", "gemm_subnormal", "marginloss_plain", "marginloss_fused", "baseline_fused"),
        "about": (
            f"SphereFace (m=4, λ=5), x at cos θ = {TRAINED_COS} to its class weight, "
            f"‖x‖ = {SPHERE_FEATURE_NORM:g} (large late-training feature norms)"
        ),
    },
    "every-head": {
        "head": "arcface",
        "embeddings": "random",
        # Each fused worker times its own paired floor (K times the GEMMs for sub-centres);
        # with --baseline-tree every head also runs from that tree, in the same run.
        "methods": ("marginloss_fused", "baseline_fused"),
        "about": (
            "every head of marginloss.list_heads() (or --heads) at its defaults, built with "
            "marginloss.create_head, x ~ N(0, I), W Xavier-uniform; the floor of a head with K "
            "sub-centres is the GEMMs against its [C*K, D] weight"
        ),
    },
}
MAIN_SCENARIO = "arcface-random"
# Scenarios that only run when asked for (--scenarios): one config per registered head.
OPT_IN_SCENARIOS = ("every-head",)
# Thread-pool settings that change CPU timings a lot on a shared machine; recorded with results.
THREADING_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_BLOCKTIME")


# ---------------------------------------------------------------- command line


def parse_sizes(text: str) -> list[int]:
    """``"10k,100k,1M"`` -> ``[10000, 100000, 1000000]``; ``"none"`` -> ``[]``."""
    if text.strip().lower() in ("", "none"):
        return []
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", item)
        if match is None:
            raise argparse.ArgumentTypeError(f"sizes must look like 10000 or 10k or 1M, got {item!r}")
        sizes.append(int(match.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[match.group(2).lower()])
    return sizes


def parse_chunk_sizes(text: str) -> list[int | str]:
    out: list[int | str] = []
    for item in text.split(","):
        item = item.strip()
        if item == "auto":
            out.append(item)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"chunk sizes must be positive ints or 'auto', got {item!r}")
    return out


def parse_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="More in benchmarks/README.md.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: sizes 1k,10k, 2 repeats, short limits; writes <device>-quick.*")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="class counts C for the main sweep (default 10k,100k,1M; quick 1k,10k)")
    parser.add_argument("--trained-sizes", type=parse_sizes, default=None,
                        help="C for the trained-like scenarios (default 100k; quick: smallest size; 'none')")
    parser.add_argument("--batch", type=int, default=256, help="B (default 256)")
    parser.add_argument("--dim", type=int, default=512, help="D (default 512)")
    parser.add_argument("--scenarios", type=parse_list(tuple(SCENARIOS)), default=None,
                        help=f"comma list from {', '.join(SCENARIOS)} (default all; quick: "
                        f"{MAIN_SCENARIO},sphereface-trained)")
    parser.add_argument("--methods", type=parse_list(METHODS), default=list(METHODS),
                        help=f"comma list from {', '.join(METHODS)} (default all)")
    parser.add_argument("--devices", default="auto",
                        help="comma list of cpu, cuda; 'auto' = cpu plus cuda when available")
    parser.add_argument("--chunk-sizes", type=parse_chunk_sizes, default=None,
                        help="also sweep the fused path's chunk_size (e.g. 1024,2048,4096,8192,auto)")
    parser.add_argument("--sweep-sizes", type=parse_sizes, default=None,
                        help="C for the chunk_size sweep (default 100k; quick: smallest size)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per config (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole list of configs this many times, interleaved, pooling samples")
    parser.add_argument("--max-step-s", type=float, default=None,
                        help="measure memory only when a warm-up step takes longer (default 60; quick 10)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="cap on timed seconds per config; repeats shrink to fit (default 90; quick 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in workers")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; quick: <tmp>/marginloss-benchmarks-quick)")
    parser.add_argument("--tag", default="", help="suffix for the result files: <device>-<tag>.* (e.g. omp-passive)")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only re-render <stem>.md, <stem>.png (and the README table) from a results JSON")
    parser.add_argument("--heads", default="all",
                        help="registered heads for the every-head scenario, comma-separated (default all)")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="also run the fused method from this source tree (before/after in one run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def resolve_defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "marginloss-benchmarks-quick" if quick else DEFAULT_OUT
    if args.sizes is None:
        args.sizes = [1000, 10_000] if quick else [10_000, 100_000, 1_000_000]
    smallest = [min(args.sizes)] if args.sizes else []
    if args.trained_sizes is None:
        args.trained_sizes = smallest if quick else [100_000]
    if args.sweep_sizes is None:
        args.sweep_sizes = smallest if quick else [100_000]
    if args.repeats is None:
        args.repeats = 2 if quick else 5
    if args.max_step_s is None:
        args.max_step_s = 10.0 if quick else 60.0
    if args.time_budget_s is None:
        args.time_budget_s = 5.0 if quick else 90.0
    if args.scenarios is None:
        args.scenarios = [MAIN_SCENARIO, "sphereface-trained"] if quick else [
            name for name in SCENARIOS if name not in OPT_IN_SCENARIOS
        ]
    if args.devices == "auto":
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        bad = [d for d in args.devices if d not in ("cpu", "cuda")]
        if bad:
            raise SystemExit(f"--devices must be cpu and/or cuda, got {bad}")
    for name in ("repeats", "warmup", "rounds", "batch", "dim"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise SystemExit(f"--{name} must be positive, got {getattr(args, name)}")


def dtypes_for(device: str) -> list[str]:
    return ["fp32"] if device == "cpu" else ["fp32", "bf16"]


def _every_head_names(heads: str) -> list[str]:
    import marginloss

    registered = marginloss.list_heads()
    if heads == "all":
        return registered
    names = [name.strip() for name in heads.split(",") if name.strip()]
    unknown = [name for name in names if name not in registered]
    if unknown:
        raise SystemExit(f"--heads must name registered heads {registered}, got {unknown}")
    return names


def _configs_of(add: Callable[..., None], *args: Any) -> list[dict[str, Any]]:
    """The configs ``add`` would append, collected (so a caller can annotate them)."""
    collected: list[dict[str, Any]] = []
    add(*args, METHODS, into=collected)
    return collected


def build_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    common = {
        "batch": args.batch, "dim": args.dim, "seed": args.seed, "repeats": args.repeats,
        "warmup": args.warmup, "max_step_s": args.max_step_s, "time_budget_s": args.time_budget_s,
        "threads": args.threads,
    }
    configs: list[dict[str, Any]] = []

    def add(device: str, dtype: str, scenario: str, sizes: list[int], methods: Sequence[str],
            chunk_sizes: Sequence[int | str] = ("auto",), into: list[dict[str, Any]] | None = None) -> None:
        target = configs if into is None else into
        for num_classes in sizes:
            for method in methods:
                if method not in args.methods or method not in SCENARIOS[scenario]["methods"]:
                    continue
                if method == "baseline_fused" and args.baseline_tree is None:
                    continue
                for chunk in chunk_sizes if method == "marginloss_fused" else (None,):
                    config = {**common, "device": device, "dtype": dtype, "scenario": scenario,
                              "num_classes": num_classes, "method": method, "chunk_size": chunk}
                    if method == "baseline_fused":
                        config["chunk_size"] = "auto"
                        config["baseline_tree"] = str(args.baseline_tree.resolve())
                    target.append(config)

    for device in args.devices:
        for dtype in dtypes_for(device):
            for scenario in args.scenarios:
                if scenario == "every-head":
                    for name in _every_head_names(args.heads):
                        for config in _configs_of(add, device, dtype, scenario, args.trained_sizes):
                            config["head_name"] = name
                            configs.append(config)
                    continue
                sizes = args.sizes if scenario == MAIN_SCENARIO else args.trained_sizes
                add(device, dtype, scenario, sizes, METHODS)
            if args.chunk_sizes and MAIN_SCENARIO in args.scenarios:
                add(device, dtype, MAIN_SCENARIO, args.sweep_sizes, ("gemm", "marginloss_fused"),
                    args.chunk_sizes)
    # Where the sweep's sizes overlap the main sweep, its floor and "auto" runs are duplicates.
    unique, seen = [], set()
    for config in configs:
        key = json.dumps(config, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(config)
    return unique


# ---------------------------------------------------------------- worker (one config)


def _subcenters(spec: dict[str, Any]) -> int:
    """Weight rows per class of the config's head (built on the meta device: no memory)."""
    if "head_name" not in spec:
        return 1
    import marginloss

    return marginloss.create_head(spec["head_name"], spec["dim"], spec["num_classes"], device="meta").num_subcenters


def _worker_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """Embeddings, class weights ``[C, D]``, labels and the softmax gradient for the floor."""
    import torch.nn.functional as F

    scenario = SCENARIOS[spec["scenario"]]
    batch, dim, num_classes = spec["batch"], spec["dim"], spec["num_classes"]
    generator = torch.Generator().manual_seed(spec["seed"])
    rows = num_classes * _subcenters(spec)
    bound = math.sqrt(6.0 / (rows + dim))  # Xavier-uniform, as the heads initialise
    weight = torch.empty(rows, dim).uniform_(-bound, bound, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    noise = torch.randn(batch, dim, generator=generator)
    if scenario["embeddings"] == "random":
        embeddings = noise
    else:
        w_hat = F.normalize(weight[labels])
        noise = F.normalize(noise - (noise * w_hat).sum(1, keepdim=True) * w_hat)
        direction = TRAINED_COS * w_hat + math.sqrt(1.0 - TRAINED_COS**2) * noise
        embeddings = scenario["feature_norm"] * direction
    return {"embeddings": embeddings, "weight": weight, "labels": labels}


def _head_logits(head: str, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    from marginloss import functional as MF

    cosine = F.linear(F.normalize(embeddings), F.normalize(weight))
    if head == "arcface":
        return MF.arcface_logits(cosine, labels, scale=SCALE, margin=ARC_MARGIN)
    return MF.sphereface_logits(cosine, labels, embeddings.norm(dim=1), margin=SPHERE_MARGIN, lambda_=SPHERE_LAMBDA)


def _marginloss_loss(head: str, chunk_size: int | str | None) -> Callable[..., torch.Tensor]:
    from marginloss import functional as MF

    if head == "arcface":
        return lambda x, w, y: MF.arcface(x, w, y, scale=SCALE, margin=ARC_MARGIN, chunk_size=chunk_size)
    return lambda x, w, y: MF.sphereface(
        x, w, y, margin=SPHERE_MARGIN, lambda_=SPHERE_LAMBDA, chunk_size=chunk_size
    )


def _make_step(
    spec: dict[str, Any], device: torch.device
) -> tuple[Callable[[], Any], Callable[[], None], dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """The step to time and measure, a function resetting gradients, facts about the inputs,
    and the operands ``(x, W as [C, D])`` of the step (views, for the paired floor)."""
    import torch.nn.functional as F

    method, head = spec["method"], SCENARIOS[spec["scenario"]]["head"]
    autocast_dtype = torch.bfloat16 if spec["dtype"] == "bf16" else None
    inputs = _worker_inputs(spec)
    facts: dict[str, Any] = {}
    x = inputs["embeddings"].to(device).requires_grad_(True)
    labels = inputs["labels"].to(device)

    if method in ("gemm", "gemm_subnormal"):
        weight = inputs.pop("weight").to(device)
        logits = _head_logits(head, x.detach(), weight, labels).requires_grad_(True)
        (grad_logits,) = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
        del logits
        tiny = torch.finfo(torch.float32).tiny
        subnormal = (grad_logits != 0) & (grad_logits.abs() < tiny)
        facts["subnormal_fraction"] = float(subnormal.float().mean())
        facts["zero_fraction"] = float((grad_logits == 0).float().mean())
        if method == "gemm":
            grad_logits = torch.where(subnormal, torch.zeros_like(grad_logits), grad_logits)
        gemm_dtype = autocast_dtype or torch.float32
        xg, wg, gg = x.detach().to(gemm_dtype), weight.to(gemm_dtype), grad_logits.to(gemm_dtype)
        del weight, grad_logits, subnormal
        produced: dict[str, torch.Tensor] = {}

        def gemm_step() -> Any:
            with torch.no_grad():
                out = torch.mm(xg, wg.T)
                del out
                produced["grad_x"] = torch.mm(gg, wg)
                produced["grad_weight"] = torch.mm(gg.T, xg)
            return produced["grad_weight"]

        return gemm_step, produced.clear, facts, (xg, wg)

    if method == "pml":
        from pytorch_metric_learning.losses import ArcFaceLoss

        module = ArcFaceLoss(spec["num_classes"], spec["dim"], margin=math.degrees(ARC_MARGIN), scale=SCALE)
        with torch.no_grad():
            module.W.copy_(inputs.pop("weight").T)
        module = module.to(device)
        param = module.W
        weight_cd = param.detach().T

        def loss_fn() -> torch.Tensor:
            return module(x, labels)

    else:
        param = torch.nn.Parameter(inputs.pop("weight").to(device))
        weight_cd = param.detach()
        if method == "plain":
            from tests.reference import plain_arcface_loss

            def loss_fn() -> torch.Tensor:
                return plain_arcface_loss(x, param, labels, SCALE, ARC_MARGIN)

        elif "head_name" in spec:
            import marginloss

            module = marginloss.create_head(spec["head_name"], spec["dim"], spec["num_classes"],
                                            chunk_size=spec["chunk_size"]).to(device)
            with torch.no_grad():
                module.weight.copy_(param)
            param = module.weight
            weight_cd = param.detach()

            def loss_fn() -> torch.Tensor:
                return module(x, labels)

        else:
            chunk = None if method == "marginloss_plain" else spec["chunk_size"]
            loss_of = _marginloss_loss(head, chunk)

            def loss_fn() -> torch.Tensor:
                return loss_of(x, param, labels)

    def step() -> Any:
        autocast = (contextlib.nullcontext() if autocast_dtype is None
                    else torch.autocast(device.type, dtype=autocast_dtype))
        with autocast:
            loss = loss_fn()
        loss.backward()
        return param.grad

    def reset() -> None:
        x.grad = None
        param.grad = None

    return step, reset, facts, (x.detach(), weight_cd)


def _paired_floor(
    spec: dict[str, Any], operands: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[Callable[[], Any], Callable[[], None]]:
    """The three bare GEMMs on this worker's own ``x`` and ``W`` (views, no copy in fp32), with
    a dense ``G`` of ordinary floats: timed alternately with the method's steps, so its
    × floor ratio is measured in the same process and the same minutes."""
    x, weight = operands
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    grad = torch.rand(x.shape[0], weight.shape[0], generator=generator).div_(x.shape[0] * weight.shape[0])
    grad = grad.to(device=device, dtype=dtype)
    x, weight = x.to(dtype), weight.to(dtype)
    produced: list[torch.Tensor] = []

    def floor_step() -> None:
        with torch.no_grad():
            out = torch.mm(x, weight.T)
            del out
            produced.append(torch.mm(grad, weight))
            produced.append(torch.mm(grad.T, x))

    return floor_step, produced.clear


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this (fresh) process and return its measurements."""
    from benchmarks import _measure as M

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    load_start = M.load_average()
    step, reset, facts, operands = _make_step(spec, device)
    result: dict[str, Any] = {**facts, "threads": torch.get_num_threads()}

    warm = []
    for _ in range(max(spec["warmup"], 1)):
        reset()
        warm.append(M.time_step_s(step, device)[0])
    result["first_step_ms"] = warm[0] * 1e3
    samples: list[float] = []
    cpu_samples: list[float] = []
    floor_samples: list[float] = []
    floor_cpu_samples: list[float] = []
    if warm[-1] <= spec["max_step_s"]:
        repeats = max(1, min(spec["repeats"], int(spec["time_budget_s"] / max(warm[-1], 1e-9))))
        floor = _paired_floor(spec, operands, device) if spec["method"] != "gemm" else None
        if floor is not None:
            M.time_step_s(floor[0], device)
            floor[1]()
        for _ in range(repeats):
            if floor is not None:
                wall_s, cpu_s = M.time_step_s(floor[0], device)
                floor[1]()
                floor_samples.append(wall_s * 1e3)
                floor_cpu_samples.append(cpu_s * 1e3)
            reset()
            wall_s, cpu_s = M.time_step_s(step, device)
            samples.append(wall_s * 1e3)
            cpu_samples.append(cpu_s * 1e3)
        del floor
    del operands
    result["time_ms_samples"] = samples
    result["cpu_time_ms_samples"] = cpu_samples
    result["floor_ms_samples"] = floor_samples
    result["floor_cpu_time_ms_samples"] = floor_cpu_samples

    reset()
    grads: list[Any] = []
    if device.type == "cuda":
        peak = M.cuda_peak_memory(lambda: grads.append(step()), device)
        result["memory_method"] = "torch.cuda.max_memory_allocated minus memory_allocated before the step"
    else:
        meter = M.CpuPeakMemory()
        meter.prepare()
        peak = meter.measure(lambda: grads.append(step()))
        result["memory_method"] = meter.describe()
    grad_bytes = grads[0].numel() * grads[0].element_size()
    grads.clear()
    result.update({
        "peak_mib": peak / M.MIB,
        "weight_grad_mib": grad_bytes / M.MIB,
        "peak_above_params_mib": (peak - grad_bytes) / M.MIB,
        "load_start": load_start,
        "load_end": M.load_average(),
    })
    return result


# ---------------------------------------------------------------- orchestration


def run_config(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    paths = [spec.get("baseline_tree"), str(REPO), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_s"] = time.perf_counter() - started
    return result


def config_key(config: dict[str, Any]) -> tuple[Any, ...]:
    return (config["device"], config["dtype"], config["scenario"], config["num_classes"],
            config["method"], config["chunk_size"], config.get("head_name"))


def merge(entry: dict[str, Any] | None, config: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    if entry is None:
        entry = {key: config[key] for key in ("device", "dtype", "scenario", "num_classes", "method",
                                              "chunk_size", "batch", "dim")}
        if "head_name" in config:
            entry["head_name"] = config["head_name"]
        entry.update({"time_ms_samples": [], "cpu_time_ms_samples": [], "floor_ms_samples": [],
                      "floor_cpu_time_ms_samples": [], "peak_above_params_mib_runs": [], "load": [], "errors": []})
    if "error" in result:
        entry["errors"].append(result["error"])
        return entry
    for key in ("time_ms_samples", "cpu_time_ms_samples", "floor_ms_samples", "floor_cpu_time_ms_samples"):
        entry[key] += result[key]
    entry["peak_above_params_mib_runs"].append(result["peak_above_params_mib"])
    entry["load"] += [v for v in (result["load_start"], result["load_end"]) if v is not None]
    for key in ("first_step_ms", "weight_grad_mib", "peak_mib", "memory_method", "threads",
                "subnormal_fraction", "zero_fraction"):
        if key in result:
            entry[key] = result[key]
    samples = entry["time_ms_samples"]
    entry["time_ms"] = statistics.median(samples) if samples else None
    entry["time_ms_min"] = min(samples, default=None)
    entry["time_ms_max"] = max(samples, default=None)
    for key in ("cpu_time_ms", "floor_ms", "floor_cpu_time_ms"):
        values = entry[key + "_samples"]
        entry[key] = statistics.median(values) if values else None
    entry["peak_above_params_mib"] = statistics.median(entry["peak_above_params_mib_runs"])
    return entry


def describe(entry: dict[str, Any]) -> str:
    if entry.get("peak_above_params_mib") is None:
        return f"FAILED: {entry['errors'][-1] if entry['errors'] else '?'}"
    time_text = f"{entry['time_ms']:.1f} ms" if entry.get("time_ms") is not None else (
        f"memory only (step {entry['first_step_ms'] / 1e3:.1f} s)")
    return f"{time_text}, {entry['peak_above_params_mib']:.1f} MiB above W+W.grad"


def method_label(entry: dict[str, Any]) -> str:
    if entry.get("head_name"):
        return f"{entry['head_name']}: {LABELS[entry['method']]}"
    if entry["method"] == "marginloss_fused" and entry["chunk_size"] != "auto":
        return f"marginloss fused (chunk_size={entry['chunk_size']})"
    return LABELS[entry["method"]]


# ---------------------------------------------------------------- reporting


def _find(entries: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for entry in entries:
        if all(entry.get(k) == v for k, v in match.items()):
            return entry
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def add_ratios(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        same = {k: entry[k] for k in ("device", "dtype", "scenario", "num_classes")}
        same["head_name"] = entry.get("head_name")
        floor = _find(entries, method="gemm", **same)
        pml = _find(entries, method="pml", **same)
        # Paired: the floor timed in the same worker, alternating with the method's steps.
        # Cross: against the separate floor configuration (minutes apart on a shared machine).
        entry["time_vs_floor_cross"] = _ratio(entry.get("time_ms"), floor and floor.get("time_ms"))
        entry["time_vs_floor"] = (_ratio(entry.get("time_ms"), entry.get("floor_ms"))
                                  if entry.get("floor_ms") else entry["time_vs_floor_cross"])
        entry["cpu_time_vs_floor"] = (
            _ratio(entry.get("cpu_time_ms"), entry.get("floor_cpu_time_ms")) if entry.get("floor_cpu_time_ms")
            else _ratio(entry.get("cpu_time_ms"), floor and floor.get("cpu_time_ms")))
        entry["peak_vs_pml"] = _ratio(entry.get("peak_above_params_mib"), pml and pml.get("peak_above_params_mib"))


def check_targets(entries: list[dict[str, Any]], device: str, dtype: str) -> list[dict[str, Any]]:
    """The issue's targets at B=256, D=512, C=100k (time, memory) and C=1M (memory)."""
    base = {"device": device, "dtype": dtype, "scenario": MAIN_SCENARIO}
    fused = {"method": "marginloss_fused", "chunk_size": "auto"}
    at_100k = _find(entries, num_classes=100_000, **base, **fused)
    at_1m = _find(entries, num_classes=1_000_000, **base, **fused)
    targets = []
    if at_100k is not None:
        targets.append({"target": "fused time ≤ 1.5 × bare-GEMM floor (C=100k)",
                        "measured": at_100k.get("time_vs_floor"), "limit": 1.5, "unit": "×"})
        targets.append({"target": "fused peak above W, W.grad ≤ 25% of pytorch-metric-learning (C=100k)",
                        "measured": at_100k.get("peak_vs_pml"), "limit": 0.25, "unit": "×"})
    if at_1m is not None:
        targets.append({"target": "fused peak above W, W.grad ≤ 1 GiB (C=1M)",
                        "measured": at_1m.get("peak_above_params_mib"), "limit": 1024.0, "unit": "MiB"})
    for target in targets:
        target["met"] = target["measured"] is not None and target["measured"] <= target["limit"]
    return targets


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:,.{digits}f}{suffix}"


def _time_cell(entry: dict[str, Any]) -> str:
    if entry.get("time_ms") is None:
        if entry.get("first_step_ms") is None:
            return "failed"
        return f"— (one step {entry['first_step_ms'] / 1e3:.0f} s: memory only)"
    return f"{entry['time_ms']:,.1f} (n={len(entry['time_ms_samples'])})"


def _pretty_c(num_classes: int) -> str:
    if num_classes % 1_000_000 == 0:
        return f"{num_classes // 1_000_000}M"
    if num_classes % 1000 == 0:
        return f"{num_classes // 1000}k"
    return str(num_classes)


def main_table(entries: list[dict[str, Any]], device: str, dtype: str) -> list[str]:
    rows = [e for e in entries if e["device"] == device and e["dtype"] == dtype
            and e["scenario"] == MAIN_SCENARIO and e["chunk_size"] in (None, "auto")]
    lines = ["| C | method | fwd+bwd time, ms (median) | × GEMM floor | (CPU time × floor) "
             "| peak above W, W.grad (MiB) | × PML memory |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for entry in sorted(rows, key=lambda e: (e["num_classes"], METHODS.index(e["method"]))):
        lines.append(
            f"| {_pretty_c(entry['num_classes'])} | {method_label(entry)} | {_time_cell(entry)} | "
            f"{_fmt(entry.get('time_vs_floor'), 2)} | {_fmt(entry.get('cpu_time_vs_floor'), 2)} | "
            f"{_fmt(entry.get('peak_above_params_mib'))} | {_fmt(entry.get('peak_vs_pml'), 3)} |"
        )
    return lines


def trained_table(entries: list[dict[str, Any]], device: str, dtype: str) -> list[str]:
    rows = [e for e in entries if e["device"] == device and e["dtype"] == dtype
            and e["scenario"] != MAIN_SCENARIO]
    if not rows:
        return []
    lines = ["| scenario | C | method | fwd+bwd time, ms | × GEMM floor | peak above W, W.grad (MiB) |",
             "|---|---:|---|---:|---:|---:|"]
    for entry in sorted(rows, key=lambda e: (e["scenario"], e.get("head_name") or "", e["num_classes"],
                                             METHODS.index(e["method"]))):
        lines.append(
            f"| {entry['scenario']} | {_pretty_c(entry['num_classes'])} | {method_label(entry)} | "
            f"{_time_cell(entry)} | {_fmt(entry.get('time_vs_floor'), 2)} | "
            f"{_fmt(entry.get('peak_above_params_mib'))} |"
        )
    facts = []
    for entry in rows:
        if entry["method"] == "gemm" and "subnormal_fraction" in entry:
            facts.append(
                f"- {entry['scenario']}, C={_pretty_c(entry['num_classes'])}: "
                f"{100 * entry['subnormal_fraction']:.1f}% of dL/dlogits are subnormal floats, "
                f"{100 * entry['zero_fraction']:.1f}% exactly zero."
            )
    return [*lines, "", *facts]


def sweep_table(entries: list[dict[str, Any]], device: str, dtype: str) -> list[str]:
    rows = [e for e in entries if e["device"] == device and e["dtype"] == dtype
            and e["scenario"] == MAIN_SCENARIO and e["method"] == "marginloss_fused"]
    sizes = {e["num_classes"] for e in rows if e["chunk_size"] != "auto"}
    rows = [e for e in rows if e["num_classes"] in sizes]
    if not rows:
        return []
    lines = ["| C | chunk_size | fwd+bwd time, ms | × GEMM floor | peak above W, W.grad (MiB) |",
             "|---:|---:|---:|---:|---:|"]
    for entry in sorted(rows, key=lambda e: (e["num_classes"], 1 << 62 if e["chunk_size"] == "auto" else e["chunk_size"])):
        lines.append(
            f"| {_pretty_c(entry['num_classes'])} | {entry['chunk_size']} | {_time_cell(entry)} | "
            f"{_fmt(entry.get('time_vs_floor'), 2)} | {_fmt(entry.get('peak_above_params_mib'))} |"
        )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    entries, machine, settings = report["results"], report["machine"], report["settings"]
    device = report["device"]
    tag = f"({report['tag']})" if report["tag"] else ""
    quick = "(quick)" if report["quick"] else ""
    loads = [v for e in entries for v in e["load"]]
    memory_methods = sorted({e["memory_method"] for e in entries if "memory_method" in e})
    out = [
        f"# marginloss heads benchmark: {' '.join(filter(None, [device, tag, quick]))}",
        "",
        f"`{report['command']}`, {report['finished']}, commit {report['code']['commit']}"
        f"{' + uncommitted marginloss/ changes' if report['code']['marginloss_dirty'] else ''} "
        f"(marginloss/*.py sha256 {report['code']['marginloss_sha256']}"
        f"{', CHANGED during the run' if report['code'].get('changed_during_run') else ''}).  "
        f"{machine['device_name']}, "
        f"{machine['logical_cores']} logical cores, {machine['torch_threads']} torch threads; "
        f"torch {machine['torch']}, pytorch-metric-learning {machine['pml']}, python {machine['python']}"
        f"{''.join(f', {k}={v}' for k, v in machine.get('env', {}).items())}.  "
        f"B={settings['batch']}, D={settings['dim']}, {settings['repeats']} timed steps per config "
        f"(fewer where a step exceeds the time budget), {settings['rounds']} round(s); 1-minute load "
        f"average seen by the workers: {_fmt(min(loads, default=None), 2)} to {_fmt(max(loads, default=None), 2)}.",
        "",
    ]
    for dtype in dtypes_for(device):
        table = main_table(entries, device, dtype)
        if len(table) > 2:
            out += [f"## ArcFace forward+backward, random init, {dtype}", "", *table, ""]
        targets = [t for t in report["targets"] if t["dtype"] == dtype]
        if targets:
            out += ["Targets:", ""]
            for t in targets:
                digits = 0 if t["unit"] == "MiB" else 2
                out.append(f"- {t['target']}: **{_fmt(t['measured'], digits)} {t['unit']}** "
                           f"({'met' if t['met'] else 'NOT met'}, limit {t['limit']:g} {t['unit']})")
            out.append("")
        trained = trained_table(entries, device, dtype)
        if trained:
            out += [f"## Trained-like inputs, {dtype}", "",
                    *(f"- `{name}`: {SCENARIOS[name]['about']}" for name in SCENARIOS if name != MAIN_SCENARIO),
                    "", *trained, ""]
        sweep = sweep_table(entries, device, dtype)
        if sweep:
            out += [f"## Fused path chunk_size sweep, {dtype}", "", *sweep, ""]
    failed = [e for e in entries if e["errors"]]
    if failed:
        out += ["## Failures", ""] + [f"- {e['scenario']} C={e['num_classes']} {method_label(e)}: {e['errors'][-1]}"
                                      for e in failed] + [""]
    out += [
        "## How this is measured",
        "",
        "- Every configuration runs in a fresh subprocess: "
        f"{settings['warmup']} warm-up step(s), then timed forward+backward steps "
        "(loss, `backward()`, gradients for the embeddings and the weight; garbage collector "
        "paused, CUDA synchronised); the median is reported.  A configuration whose warm-up "
        f"step takes over {settings['max_step_s']:g} s is measured for memory only.",
        "- × GEMM floor is paired: every worker also times the three bare GEMMs on its own x and "
        "W (dense G), alternating with its own steps, and divides the two medians, so slow changes "
        "in machine load cancel; the ratio against the separate floor row is in the JSON "
        "(`time_vs_floor_cross`).  The CPU-time ratio (process CPU time, all threads, spin-waits "
        "included) is a cross-check.  × PML memory compares configurations of the same run.",
        "- The GEMM floor is `x·Wᵀ`, `G·W` and `Gᵀ·x` with `G` the softmax gradient of the "
        "scenario's logits (subnormals flushed), run on the same shapes and dtype.",
        "- Peak memory: " + "; ".join(memory_methods) + ".  `W.grad` starts as `None`, the step's "
        "weight gradient becomes `W.grad`, and its size is subtracted: the figure is what the "
        "loss needs beyond the inputs, the weight and its gradient (x.grad included).",
        f"- Scenarios: {SCENARIOS[MAIN_SCENARIO]['about']}; the trained-like ones are listed above.",
        "",
    ]
    return "\n".join(out)


def render_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in report["results"] if e["scenario"] == MAIN_SCENARIO and e["chunk_size"] in (None, "auto")]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"fp32": "-", "bf16": "--"}
    for dtype in dtypes_for(report["device"]):
        for method in METHODS:
            rows = sorted((e for e in entries if e["method"] == method and e["dtype"] == dtype),
                          key=lambda e: e["num_classes"])
            if not rows:
                continue
            label = f"{LABELS[method]}{'' if dtype == 'fp32' else ' ' + dtype}"
            timed = [e for e in rows if e.get("time_ms") is not None]
            if timed:
                ax_time.plot([e["num_classes"] for e in timed], [e["time_ms"] for e in timed],
                             styles[dtype], marker="o", label=label)
            sized = [e for e in rows if e.get("peak_above_params_mib") is not None]
            if sized:
                ax_mem.plot([e["num_classes"] for e in sized],
                            [max(e["peak_above_params_mib"], 0.1) for e in sized],
                            styles[dtype], marker="o", label=label)
    machine = report["machine"]
    for ax, title, unit in ((ax_time, "forward+backward time", "ms (median)"),
                            (ax_mem, "peak memory above W and W.grad", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes C")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.legend(fontsize=8)
    settings = report["settings"]
    fig.suptitle(f"ArcFace, B={settings['batch']}, D={settings['dim']}, random init, "
                 f"{machine['device_name']} ({machine['torch_threads']} threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def result_stem(device: str, tag: str, quick: bool) -> str:
    return "-".join(filter(None, [device, tag, "quick" if quick else ""]))


def update_readme(report: dict[str, Any], readme: Path) -> bool:
    """Replace the text between ``<!-- results:<stem> -->`` markers in the README."""
    device, stem = report["device"], result_stem(report["device"], report["tag"], report["quick"])
    start, end = f"<!-- results:{stem} -->", f"<!-- /results:{stem} -->"
    if not readme.exists():
        return False
    text = readme.read_text()
    if start not in text or end not in text:
        return False
    machine, code = report["machine"], report["code"]
    loads = [v for e in report["results"] for v in e["load"]]
    env = "".join(f", {k}={v}" for k, v in machine.get("env", {}).items())
    body = [f"{machine['device_name']} ({machine['logical_cores']} cores, {machine['torch_threads']} torch "
            f"threads{env}), commit {code['commit']}{' + local changes' if code['marginloss_dirty'] else ''}, "
            f"{report['finished'][:10]}; load average during the run {_fmt(min(loads, default=None), 1)}"
            f"-{_fmt(max(loads, default=None), 1)}.", ""]
    for dtype in dtypes_for(device):
        table = main_table(report["results"], device, dtype)
        if len(table) > 2:
            body += [f"{dtype}:", "", *table, ""]
        body += [f"- {t['target']}: **{_fmt(t['measured'], 0 if t['unit'] == 'MiB' else 2)} {t['unit']}** "
                 f"({'met' if t['met'] else 'not met'})" for t in report["targets"] if t["dtype"] == dtype]
        body.append("")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    readme.write_text(before + start + "\n" + "\n".join(body) + end + after)
    return True


def code_version() -> dict[str, Any]:
    """The commit measured and whether marginloss/ had uncommitted changes (read-only git)."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--", "marginloss")
    digest = hashlib.sha256()
    for path in sorted((REPO / "marginloss").glob("*.py")):
        digest.update(path.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "marginloss_dirty": bool(status) if status is not None else None,
        "marginloss_sha256": digest.hexdigest()[:16],
    }


def machine_info(device: str, threads: int | None) -> dict[str, Any]:
    from benchmarks import _measure as M

    try:
        from importlib.metadata import version

        pml = version("pytorch-metric-learning")
    except Exception:  # not installed: the pml configs report their own error
        pml = "not installed"
    name = M.cpu_model() if device == "cpu" else torch.cuda.get_device_name(0)
    return {
        "device_name": name,
        "logical_cores": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "pml": pml,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "env": {k: os.environ[k] for k in THREADING_ENV if k in os.environ},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.worker is not None:
        print(RESULT_PREFIX + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.render is not None:
        report = json.loads(args.render.read_text())
        report.setdefault("tag", "")
        write_reports(report, args.render.with_suffix(""), readme=not (report["quick"] or args.no_readme)
                      and args.render.parent.resolve() == DEFAULT_OUT.resolve())
        return 0
    resolve_defaults(args)
    configs = build_configs(args)
    if not configs:
        raise SystemExit("nothing to run: check --scenarios, --methods and the sizes")
    started = _dt.datetime.now().isoformat(timespec="seconds")
    version_info = code_version()
    print(f"{len(configs)} configurations x {args.rounds} round(s); each in a fresh subprocess", flush=True)
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    total = len(configs) * args.rounds
    for round_index in range(args.rounds):
        for i, config in enumerate(configs):
            result = run_config(config, timeout_s=max(600.0, 20 * args.max_step_s + args.time_budget_s))
            key = config_key(config)
            merged[key] = merge(merged.get(key), config, result)
            chunk = f" chunk={config['chunk_size']}" if config["chunk_size"] not in (None, "auto") else ""
            print(f"[{round_index * len(configs) + i + 1:>3}/{total}] {config['device']} {config['dtype']} "
                  f"{config['scenario']} C={config['num_classes']} {config['method']}{chunk}: "
                  f"{describe(merged[key])} (load {_fmt(result.get('load_start'), 2)})", flush=True)
    entries = list(merged.values())
    add_ratios(entries)
    version_info["changed_during_run"] = code_version()["marginloss_sha256"] != version_info["marginloss_sha256"]
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/heads.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for device in args.devices:
        device_entries = [e for e in entries if e["device"] == device]
        report = {
            "schema": 1,
            "device": device,
            "quick": args.quick,
            "tag": args.tag,
            "command": command.strip(),
            "started": started,
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(device, args.threads),
            "code": version_info,
            "settings": {k: getattr(args, k) for k in (
                "batch", "dim", "sizes", "trained_sizes", "sweep_sizes", "chunk_sizes", "repeats",
                "warmup", "rounds", "max_step_s", "time_budget_s", "seed", "scenarios", "methods")},
            "targets": [{**t, "dtype": dtype} for dtype in dtypes_for(device)
                        for t in check_targets(device_entries, device, dtype)],
            "results": device_entries,
        }
        stem = args.out / result_stem(device, args.tag, args.quick)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        write_reports(report, stem, readme=not (args.quick or args.no_readme)
                      and args.out.resolve() == DEFAULT_OUT.resolve())
    return 0


def write_reports(report: dict[str, Any], stem: Path, readme: bool) -> None:
    """``<stem>.md`` and ``<stem>.png`` from a report, and its table in the README if asked."""
    markdown = render_markdown(report)
    stem.with_suffix(".md").write_text(markdown)
    render_plot(report, stem.with_suffix(".png"))
    print("\n" + markdown)
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    if readme and update_readme(report, README):
        print(f"updated the {stem.name} table in {README}")


if __name__ == "__main__":
    sys.exit(main())
