"""Per-call cost of every head from small to large problems, against plain PyTorch and the GEMMs.

For each registered head (:func:`marginloss.list_heads`, built by
:func:`marginloss.create_head` at its defaults, ``chunk_size="auto"``), each shape ``B x D``
and each class count ``C``, one process times, interleaved round by round:

``marginloss``
    ``head(x, labels)`` forward+backward (gradients for the embeddings and the weight);
``plain``
    the head's plain PyTorch formula, ``tests.reference.plain_head_loss`` (``F.normalize``,
    ``F.linear``, the margin on the gathered target column, ``scatter``,
    ``F.cross_entropy`` or the per-class binary form): the tests' baseline, imported so the
    two never drift;
``gemm``
    the three bare GEMMs of the step (``x·Wᵀ``, ``G·W``, ``Gᵀ·x`` against the ``[C·K, D]``
    weight): the compute floor;
``logits`` / ``plain_logits``
    inference logits under ``no_grad``: ``head.logits(x)`` against
    ``s·F.linear(F.normalize(x), F.normalize(W))`` (times the norms a head does not
    normalise away, max over sub-centres, plus the bias).

Each method's time is the median over its steps (wall clock; the process CPU time is kept
too), and every ratio divides two medians of the same round-robin, so slow drifts in the
machine's load cancel.  No timed assertions anywhere: this script reports.

Writes ``<out>/<device>-small[-<tag>].json`` (every sample), ``.md`` and ``.png`` and, for a
full run into ``benchmarks/results``, the table in ``benchmarks/README.md``.

Examples::

    python benchmarks/small.py                        # every head, C = 10 .. 1M, ~30 min on 2 cores
    python benchmarks/small.py --quick                # smoke run (two heads, C = 10, 100), seconds
    python benchmarks/small.py --heads arcface,cosface --classes 10,100,1000 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import statistics
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
METHODS = ("marginloss", "plain", "gemm", "logits", "plain_logits")
# Heads measured only up to a class count by default, and why (``--all-sizes`` lifts it).
SIZE_LIMITS = {
    "uniformface": (10_000, "its first step sums the uniform term over all C(C-1) centre pairs (O(C²·D))"),
}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        batch, _, dim = part.strip().lower().partition("x")
        if not batch.isdigit() or not dim.isdigit() or int(batch) < 1 or int(dim) < 1:
            raise argparse.ArgumentTypeError(f"shapes are BxD pairs such as 32x128, got {part!r}")
        shapes.append((int(batch), int(dim)))
    return shapes


def parse_classes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        factor = 1_000_000 if part.endswith("m") else 1000 if part.endswith("k") else 1
        number = part.rstrip("mk")
        if not number.isdigit() or int(number) * factor < 2:
            raise argparse.ArgumentTypeError(f"class counts are integers >= 2 (10, 1k, 1m), got {part!r}")
        out.append(int(number) * factor)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", default="all", help="comma-separated registered names, or 'all' (default)")
    parser.add_argument("--shapes", type=parse_shapes, default=None, help="BxD list (default 32x128,256x512)")
    parser.add_argument("--classes", type=parse_classes, default=None,
                        help="class counts (default 10,100,1k,10k,100k,1m)")
    parser.add_argument("--budget-s", type=float, default=0.6,
                        help="seconds of timed steps per method and configuration (default 0.6)")
    parser.add_argument("--max-steps", type=int, default=300, help="at most this many timed steps (default 300)")
    parser.add_argument("--min-steps", type=int, default=3, help="at least this many timed steps (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes over the methods (default 3)")
    parser.add_argument("--plain-max-logits", type=int, default=1 << 28,
                        help="skip the plain formula above this many B*C logits (default 2**28)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--max-gib", type=float, default=6.0,
                        help="skip a configuration whose weight, its gradient and the [B, C·K] blocks would "
                             "exceed this many GiB (default 6)")
    parser.add_argument("--all-sizes", action="store_true",
                        help="measure every head at every class count (see SIZE_LIMITS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run into a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--tag", default="", help="suffix for the result files")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    parser.add_argument("--marginloss-tree", type=Path, default=None,
                        help="import marginloss from this source tree (e.g. a git worktree of an older "
                             "commit) to measure it against the same plain formulas")
    return parser


def _plain_formulas() -> Any:
    """``tests/reference.py`` of this tree, loaded by path (it imports only torch), so the
    plain formulas stay this tree's whichever marginloss is measured."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_reference", REPO / "tests" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- one configuration


def _plain_logits(head: Any, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    weight = head.weight
    cosine = F.linear(F.normalize(x), F.normalize(weight))
    k = head.num_subcenters
    if k > 1:
        cosine = cosine.unflatten(1, (-1, k)).amax(dim=2)
    scale = head.scale
    logits = cosine * scale
    if not type(head).normalize_embeddings:
        logits = logits * x.norm(dim=1, keepdim=True)
    if not type(head).normalize_weight:
        logits = logits * weight.norm(dim=1)
    if head.bias is not None:
        logits = logits + head.bias
    return logits


def _steps(head_name: str, batch: int, dim: int, classes: int, seed: int, plain_max: int) -> dict[str, Callable[[], Any]]:
    import marginloss

    plain_head_loss = _plain_formulas().plain_head_loss
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    torch.manual_seed(seed)
    head = marginloss.create_head(head_name, dim, classes)
    head.train()
    twin = copy.deepcopy(head)
    k = head.num_subcenters
    weight = head.weight.detach()
    grad = torch.softmax(torch.randn(batch, classes * k, generator=gen), dim=1)

    def ours() -> None:
        head(x, labels).backward()
        x.grad = head.weight.grad = None

    def plain() -> None:
        plain_head_loss(twin, x, labels).backward()
        x.grad = None
        for p in twin.parameters():
            p.grad = None

    def gemm() -> None:
        with torch.no_grad():
            torch.mm(x, weight.T)
            torch.mm(grad, weight)
            torch.mm(grad.T, x)

    def logits() -> None:
        with torch.no_grad():
            head.logits(x)

    def plain_logits() -> None:
        with torch.no_grad():
            _plain_logits(head, x)

    steps = {"marginloss": ours, "gemm": gemm, "logits": logits, "plain_logits": plain_logits}
    if batch * classes <= plain_max:
        steps["plain"] = plain
    return steps


def measure(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Round-robin timing of every method of one (head, B, D, C); medians and ratios."""
    steps = _steps(spec["head"], spec["batch"], spec["dim"], spec["classes"], args.seed, args.plain_max_logits)
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    error = None
    try:
        for fn in steps.values():
            fn()  # warm-up (and the first step of a stateful head)
        per_round = max(1, args.max_steps // args.rounds)
        for _ in range(args.rounds):
            for name, fn in steps.items():
                started = time.perf_counter()
                for _ in range(per_round):
                    w0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    wall[name].append(time.perf_counter() - w0)
                    cpu[name].append(time.process_time() - c0)
                    spent = time.perf_counter() - started
                    done = len(wall[name])
                    if spent > args.budget_s / args.rounds and done >= max(1, args.min_steps // args.rounds):
                        break
    except Exception as exc:  # reported, never hidden
        error = f"{type(exc).__name__}: {exc}"
    medians = {name: statistics.median(v) * 1e3 for name, v in wall.items() if v}
    cpu_medians = {name: statistics.median(v) * 1e3 for name, v in cpu.items() if v}

    def ratio(a: str, b: str, table: dict[str, float]) -> float | None:
        return table[a] / table[b] if a in table and b in table and table[b] > 0 else None

    return {
        **spec,
        "time_ms": medians,
        "cpu_ms": cpu_medians,
        "steps": {name: len(v) for name, v in wall.items()},
        "vs_plain": ratio("marginloss", "plain", medians),
        "vs_floor": ratio("marginloss", "gemm", medians),
        "plain_vs_floor": ratio("plain", "gemm", medians),
        "logits_vs_plain": ratio("logits", "plain_logits", medians),
        "cpu_vs_plain": ratio("marginloss", "plain", cpu_medians),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "error": error,
        "samples_ms": {name: [round(t * 1e3, 4) for t in v] for name, v in wall.items()},
    }


# ---------------------------------------------------------------- reports


def _pretty(classes: int) -> str:
    if classes >= 1_000_000 and classes % 1_000_000 == 0:
        return f"{classes // 1_000_000}M"
    if classes >= 1000 and classes % 1000 == 0:
        return f"{classes // 1000}k"
    return str(classes)


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    lines = [f"# marginloss per-call benchmark: {report['device']}", "", f"`{report['command']}`, "
             f"{report['finished']}, commit {report['commit']}.  {report['machine']}; torch "
             f"{torch.__version__}, {report['threads']} torch thread(s); 1-minute load average seen: "
             f"{min(r['load'] or 0 for r in results):.2f} to {max(r['load'] or 0 for r in results):.2f}.", ""]
    shapes = sorted({(r["batch"], r["dim"]) for r in results})
    classes = sorted({r["classes"] for r in results})
    heads = sorted({r["head"] for r in results})
    for title, key in (("fwd+bwd time, marginloss ÷ plain PyTorch formula", "vs_plain"),
                       ("fwd+bwd time, marginloss ÷ bare GEMMs", "vs_floor"),
                       ("inference logits, head.logits ÷ plain PyTorch", "logits_vs_plain")):
        for batch, dim in shapes:
            lines += [f"## {title}, B={batch}, D={dim}", "",
                      "| head | " + " | ".join(f"C={_pretty(c)}" for c in classes) + " |",
                      "|---|" + "---:|" * len(classes)]
            for head in heads:
                row = {r["classes"]: r for r in results if r["head"] == head and (r["batch"], r["dim"]) == (batch, dim)}
                lines.append(f"| {head} | " + " | ".join(_cell(row[c][key]) if c in row else "—" for c in classes) + " |")
            lines.append("")
    lines += ["## Times (ms, median)", "", "| head | B×D | C | marginloss | plain | GEMMs | logits | plain logits |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["head"], r["batch"], r["classes"])):
        t = r["time_ms"]
        lines.append(f"| {r['head']} | {r['batch']}×{r['dim']} | {_pretty(r['classes'])} | "
                     + " | ".join(f"{t[m]:.3f}" if m in t else "—" for m in METHODS) + " |")
    failures = [r for r in results if r["error"]]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {r['head']} B={r['batch']} C={r['classes']}: {r['error']}" for r in failures]
    lines += ["", "Ratios divide medians of the same round-robin (see the script's docstring); "
              "`—`: not measured (the plain formula is skipped above `--plain-max-logits`; "
              + "; ".join(f"{name} above C={_pretty(limit)}: {why}" for name, (limit, why) in SIZE_LIMITS.items())
              + ")."]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = report["results"]
    shapes = sorted({(r["batch"], r["dim"]) for r in results})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, (batch, dim) in zip(axes[0], shapes):
        for head in sorted({r["head"] for r in results}):
            rows = sorted((r["classes"], r["vs_plain"]) for r in results
                          if r["head"] == head and (r["batch"], r["dim"]) == (batch, dim) and r["vs_plain"])
            if rows:
                ax.plot([c for c, _ in rows], [v for _, v in rows], marker="o", label=head)
        ax.axhline(1.1, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes C")
        ax.set_ylabel("marginloss ÷ plain PyTorch (fwd+bwd)")
        ax.set_title(f"B={batch}, D={dim}")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_readme(markdown: str, stem: str) -> bool:
    start, end = f"<!-- results:{stem} -->", f"<!-- /results:{stem} -->"
    if not README.exists():
        return False
    text = README.read_text()
    if start not in text or end not in text:
        return False
    body = markdown.split("\n## Times", 1)[0].split("\n", 2)[2]
    before, rest = text.split(start, 1)
    README.write_text(before + start + "\n" + body.strip() + "\n" + end + rest.split(end, 1)[1])
    return True


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.marginloss_tree is not None:
        sys.path.insert(0, str(args.marginloss_tree.resolve()))
    import marginloss

    print(f"marginloss from {Path(marginloss.__file__).parent}", flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    names = marginloss.list_heads() if args.heads == "all" else [h.strip() for h in args.heads.split(",")]
    unknown = sorted(set(names) - set(marginloss.list_heads()))
    if unknown:
        raise SystemExit(f"unknown heads {unknown}; registered: {marginloss.list_heads()}")
    if args.quick:
        names = names[:2] if args.heads == "all" else names
        shapes = args.shapes or [(32, 128)]
        classes = args.classes or [10, 100]
        args.budget_s, args.rounds = min(args.budget_s, 0.1), 1
    else:
        shapes = args.shapes or [(32, 128), (256, 512)]
        classes = args.classes or [10, 100, 1000, 10_000, 100_000, 1_000_000]
    out = args.out or (Path(tempfile.mkdtemp(prefix="marginloss-small-")) if args.quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    stem = "cpu-small" + (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick else "")
    from benchmarks import _measure as M

    def report() -> dict[str, Any]:
        return {
            "device": "cpu",
            "command": "python benchmarks/small.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            "commit": _commit(),
            "marginloss_tree": str(args.marginloss_tree) if args.marginloss_tree else None,
            "machine": f"{M.cpu_model()}, {os.cpu_count()} logical cores",
            "threads": torch.get_num_threads(),
            "results": results,
        }

    for batch, dim in shapes:
        for num_classes in classes:
            for name in names:
                limit = SIZE_LIMITS.get(name)
                if limit is not None and num_classes > limit[0] and not args.all_sizes:
                    print(f"{name:18s} B={batch:4d} D={dim:4d} C={_pretty(num_classes):>5s}  skipped: {limit[1]}")
                    continue
                rows = num_classes * marginloss.create_head(name, 8, 64).num_subcenters
                gib = (2 * rows * dim + 4 * batch * rows) * 4 / 2**30
                if gib > args.max_gib:
                    print(f"{name:18s} B={batch:4d} D={dim:4d} C={_pretty(num_classes):>5s}  skipped: "
                          f"about {gib:.1f} GiB above --max-gib {args.max_gib:g}")
                    continue
                result = measure({"head": name, "batch": batch, "dim": dim, "classes": num_classes}, args)
                results.append(result)
                t = result["time_ms"]
                print(f"{name:18s} B={batch:4d} D={dim:4d} C={_pretty(num_classes):>5s}  ours {t.get('marginloss', math.nan):9.3f} ms"
                      f"  plain {t.get('plain', math.nan):9.3f} ms  ×plain {_cell(result['vs_plain'])}"
                      f"  ×floor {_cell(result['vs_floor'])}  logits ×plain {_cell(result['logits_vs_plain'])}"
                      + (f"  ERROR {result['error']}" if result["error"] else ""), flush=True)
                # Written after every configuration: a long run that is stopped keeps what it measured.
                (out / f"{stem}.json").write_text(json.dumps(report(), indent=1))
    final = report()
    (out / f"{stem}.json").write_text(json.dumps(final, indent=1))
    markdown = render_markdown(final)
    (out / f"{stem}.md").write_text(markdown)
    render_plot(final, out / f"{stem}.png")
    print(f"wrote {out / stem}.json, .md, .png")
    if not args.quick and not args.no_readme and out.resolve() == DEFAULT_OUT.resolve():
        update_readme(markdown, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
