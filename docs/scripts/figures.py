"""Rewrite the figures the README and the docs quote from the results files (``make figures``).

Every number a reader sees about speed, memory or accuracy sits in a marked block::

    <!-- figures:demo -->            (Markdown)      .. figures:demo        (reStructuredText)
    ...                                              ...
    <!-- /figures:demo -->                           .. /figures:demo

and is rendered here from a results file that one documented command writes:

=================  ===================================================  =====================
block              results file                                         written by
=================  ===================================================  =====================
``demo``           ``examples/face/results/demo.json``                  ``make demo-results``
``benchmark-cpu``  ``benchmarks/results/cpu.json``                      ``make bench``
``mnist``          ``examples/mnist_arcface/results/results.json``      ``make mnist-results``
=================  ===================================================  =====================

``python docs/scripts/figures.py`` rewrites the blocks in place; ``--check`` only reports the
blocks that disagree with their results file (``tests/test_figures.py`` fails on any).  The
script needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEMO_RESULTS = ROOT / "examples" / "face" / "results" / "demo.json"
BENCHMARK_RESULTS = ROOT / "benchmarks" / "results" / "cpu.json"
MNIST_RESULTS = ROOT / "examples" / "mnist_arcface" / "results" / "results.json"
#: The files that quote figures; each holds one or more marked blocks.
DOCUMENTS = (
    ROOT / "README.md",
    ROOT / "examples" / "face" / "README.md",
    ROOT / "examples" / "mnist_arcface" / "README.md",
    ROOT / "docs" / "guide" / "examples.rst",
)

_MARKDOWN_BLOCK = re.compile(r"(<!-- figures:([\w-]+) -->\n)(.*?)(<!-- /figures:\2 -->)", re.DOTALL)
_RST_BLOCK = re.compile(r"(^\.\. figures:([\w-]+)\n\n)(.*?)(^\.\. /figures:\2$)", re.DOTALL | re.MULTILINE)


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _range(values: Sequence[float], fmt: str, unit: str = "") -> str:
    """``"93 to 157 s"`` for differing values, ``"0.925"`` when they agree."""
    low, high = min(values), max(values)
    if fmt.format(low) == fmt.format(high):
        return fmt.format(low) + unit
    return f"{fmt.format(low)} to {fmt.format(high)}{unit}"


def _loads(runs: Sequence[dict[str, Any]]) -> str:
    seen = [value for run in runs for value in run["load_1min"] if value is not None]
    return _range(seen, "{:.1f}") if seen else "not recorded"


# ---------------------------------------------------------------- the face demo


def demo_facts(results: dict[str, Any]) -> dict[str, str]:
    """The demo's figures, as text, from the runs recorded in ``demo.json``."""
    runs = [run for run in results["runs"] if not run["settings"]["smoke"] and run["settings"]["seed"] == 0]
    if not runs:
        raise ValueError("demo.json holds no full run with seed 0: run `make demo-results`")
    machine = runs[-1]["machine"]
    return {
        "runs": str(len(runs)),
        "wall": _range([run["wall_s"] for run in runs], "{:.0f}", " s"),
        "classification": _range([run["classification_dev_acc"] for run in runs], "{:.3f}"),
        "classification_chance": f"{runs[-1]['classification_chance']:.3f}",
        "verification": _range([run["verification_dev_acc"] for run in runs], "{:.3f}"),
        "verification_chance": f"{runs[-1]['verification_chance']:.3f}",
        "repeat": ("The accuracies were the same in every run; the wall time depends on the load."
                   if len({(run["classification_dev_acc"], run["verification_dev_acc"]) for run in runs}) == 1
                   else "The accuracies differed between runs (shown as a range)."),
        "machine": f"{machine['cpu']}, {machine['logical_cores']} logical cores, torch {machine['torch']}",
        "load": _loads(runs),
    }


def demo_markdown(results: dict[str, Any]) -> str:
    facts = demo_facts(results)
    return (
        f"Measured by `make demo-results` ({facts['runs']} runs of `make demo`'s settings, "
        f"`examples/face/results/demo.json`; {facts['machine']}, shared with other work, 1-minute load "
        f"average {facts['load']}): {facts['wall']} once the environment is installed, "
        f"classification dev accuracy {facts['classification']} (chance {facts['classification_chance']}) "
        f"and open-set verification dev accuracy {facts['verification']} (chance, always answering "
        f"\"unknown\", {facts['verification_chance']}). {facts['repeat']}\n"
    )


def demo_rst(results: dict[str, Any]) -> str:
    facts = demo_facts(results)
    return (
        f"Measured by ``make demo-results`` ({facts['runs']} runs, "
        f"``examples/face/results/demo.json``; {facts['machine']}, shared with other work, 1-minute "
        f"load average {facts['load']}): {facts['wall']} for all three steps, classification dev "
        f"accuracy {facts['classification']} (chance {facts['classification_chance']}), open-set "
        f"verification dev accuracy {facts['verification']} (chance {facts['verification_chance']}).\n\n"
    )


# ---------------------------------------------------------------- the CPU benchmark

_README_METHODS = (
    (("plain", None), "plain PyTorch ArcFace"),
    (("pml", None), "pytorch-metric-learning `ArcFaceLoss`"),
    (("marginloss_plain", None), "marginloss, `chunk_size=None`"),
    (("marginloss_fused", "auto"), "marginloss, fused (default)"),
)


def _entry(results: dict[str, Any], num_classes: int, method: str, chunk_size: Any) -> dict[str, Any]:
    for entry in results["results"]:
        if (entry["scenario"] == "arcface-random" and entry["num_classes"] == num_classes
                and entry["method"] == method and entry["chunk_size"] == chunk_size
                and entry["dtype"] == "fp32"):
            return entry
    raise ValueError(f"cpu.json has no arcface-random fp32 entry for C={num_classes}, {method}, {chunk_size}")


def _mib(value: float) -> str:
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value:.0f} MiB"


def benchmark_markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    loads = [value for entry in results["results"] for value in entry.get("load", [])]
    lines = [
        f"`{results['command']}` on {results['started'][:10]}, commit {results['code']['commit']}: "
        f"{machine['device_name']}, {machine['logical_cores']} logical cores, {machine['torch_threads']} torch "
        f"threads, torch {machine['torch']}, 1-minute load average {_range(loads, '{:.1f}')} "
        f"(`benchmarks/results/cpu.md`). ArcFace, B={results['settings']['batch']}, "
        f"D={results['settings']['dim']}, C=100k, fp32:",
        "",
        "| method | time × GEMM floor¹ | peak memory above W and W.grad |",
        "|---|---:|---:|",
    ]
    for (method, chunk), label in _README_METHODS:
        entry = _entry(results, 100_000, method, chunk)
        lines.append(f"| {label} | {entry['time_vs_floor']:.2f} | {_mib(entry['peak_above_params_mib'])} |")
    fused = _entry(results, 1_000_000, "marginloss_fused", "auto")
    pml = _entry(results, 1_000_000, "pml", None)
    lines += [
        "",
        "¹ A paired ratio: each method's median step time over the median time of the three bare "
        "GEMMs of the same shapes, timed alternately with it in the same process. It is not the "
        "ratio of two rows of `cpu.md`'s time column, which were measured minutes apart on a shared "
        "machine.",
        "",
        f"At C=1M the fused path runs at {fused['time_vs_floor']:.2f}× the floor in "
        f"{_mib(fused['peak_above_params_mib'])} above W and W.grad (pytorch-metric-learning: "
        f"{pml['time_vs_floor']:.1f}×, {_mib(pml['peak_above_params_mib'])}).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- the MNIST example


def mnist_markdown(results: dict[str, Any]) -> str:
    runs = [run for run in results["runs"] if run["command"] == results["runs"][-1]["command"]]
    rows = runs[0]["rows"]
    sizes = sorted({row["embedding_dim"] for row in rows})
    heads = list(dict.fromkeys(row["head"] for row in rows))
    by = {(row["head"], row["embedding_dim"]): row for row in rows}

    def numbers(run: dict[str, Any]) -> list[dict[str, Any]]:
        return [{key: value for key, value in row.items() if key != "train_s"} for row in run["rows"]]

    identical = all(numbers(run) == numbers(runs[0]) for run in runs)
    machine = runs[-1]["machine"]
    walls = [run["wall_s"] for run in runs]
    lines = [
        f"`{runs[-1]['command']}` ({len(walls)} run(s), `examples/mnist_arcface/results/results.json`; "
        f"{machine['cpu']}, {machine['logical_cores']} logical cores, {runs[-1]['threads']} torch thread(s), "
        f"1-minute load average {_loads(runs)}): {_range(walls, '{:.0f}', ' s')} wall-clock. "
        + ("Every run gave the same numbers." if identical else "The runs' numbers differ; the first is shown."),
        "",
        "| head | " + " | ".join(f"d={d} test acc" for d in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for head in heads:
        cells = []
        for d in sizes:
            row = by[(head, d)]
            params = ", ".join(f"{key[0]}={row[key]:g}" for key in ("scale", "margin") if row.get(key) is not None)
            cells.append(f"{100 * row['test_acc']:.2f}%" + (f" ({params})" if params else ""))
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    lines += ["", "| head | " + " | ".join(f"d={d} {name}" for d in sizes for name in ("intra", "min inter", "margin")) + " |",
              "|---|" + "---:|" * (3 * len(sizes))]
    for head in heads:
        cells = [f"{by[(head, d)][key]:.1f}°" for d in sizes for key in ("intra_deg", "min_inter_deg", "margin_deg")]
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------- blocks

#: Block name -> (results file, renderer for Markdown, renderer for reST or None).
BLOCKS: dict[str, tuple[Path, Callable[[Any], str], Callable[[Any], str] | None]] = {
    "demo": (DEMO_RESULTS, demo_markdown, demo_rst),
    "benchmark-cpu": (BENCHMARK_RESULTS, benchmark_markdown, None),
    "mnist": (MNIST_RESULTS, mnist_markdown, None),
}


def render(text: str, suffix: str, loaded: dict[str, Any]) -> str:
    """``text`` with every marked block re-rendered from ``loaded`` (block name -> results)."""

    def replace(match: re.Match[str], rst: bool) -> str:
        name = match.group(2)
        if name not in BLOCKS:
            raise ValueError(f"unknown figures block {name!r} (known: {sorted(BLOCKS)})")
        renderer = BLOCKS[name][2] if rst else BLOCKS[name][1]
        if renderer is None:
            raise ValueError(f"figures block {name!r} has no reStructuredText form")
        if name not in loaded:
            loaded[name] = _load(BLOCKS[name][0])
        return match.group(1) + renderer(loaded[name]) + match.group(4)

    if suffix == ".rst":
        return _RST_BLOCK.sub(lambda m: replace(m, True), text)
    return _MARKDOWN_BLOCK.sub(lambda m: replace(m, False), text)


def blocks_in(text: str) -> list[str]:
    return [m.group(2) for m in _MARKDOWN_BLOCK.finditer(text)] + [m.group(2) for m in _RST_BLOCK.finditer(text)]


def stale(documents: Sequence[Path] = DOCUMENTS) -> list[Path]:
    """The documents whose blocks disagree with their results files."""
    loaded: dict[str, Any] = {}
    out = []
    for path in documents:
        text = path.read_text(encoding="utf-8")
        if render(text, path.suffix, loaded) != text:
            out.append(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        paths = stale()
        for path in paths:
            print(f"stale figures in {path.relative_to(ROOT)}: run `make figures`", file=sys.stderr)
        return 1 if paths else 0
    loaded: dict[str, Any] = {}
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        new = render(text, path.suffix, loaded)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
