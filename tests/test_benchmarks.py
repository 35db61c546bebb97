"""Smoke tests of the benchmark scripts: tiny runs write well-formed results (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "heads.py"
METHODS = ("gemm", "plain", "marginloss_fused")


@pytest.mark.slow
def test_quick_benchmark_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    command = [
        sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--devices", "cpu",
        "--sizes", "1000", "--repeats", "1", "--scenarios", "arcface-random",
        "--methods", ",".join(METHODS), "--threads", "1",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]

    report = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert report["device"] == "cpu" and report["quick"] is True
    assert report["settings"]["sizes"] == [1000]
    results = report["results"]
    assert sorted(r["method"] for r in results) == sorted(METHODS)
    for result in results:
        assert result["errors"] == [], result["errors"]
        assert result["num_classes"] == 1000 and result["batch"] == 256 and result["dim"] == 512
        assert len(result["time_ms_samples"]) == 1 and result["time_ms"] > 0
        assert result["peak_above_params_mib"] is not None
        assert result["weight_grad_mib"] == pytest.approx(1000 * 512 * 4 / 2**20)
    floor = next(r for r in results if r["method"] == "gemm")
    assert floor["time_vs_floor"] == pytest.approx(1.0)

    markdown = (tmp_path / "cpu-quick.md").read_text()
    assert "| C | method |" in markdown
    for label in ("bare GEMMs (floor)", "plain PyTorch ArcFace", "marginloss fused (chunk_size=auto)"):
        assert label in markdown
    assert "How this is measured" in markdown

    png = (tmp_path / "cpu-quick.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


@pytest.mark.slow
def test_small_problem_sweep_writes_every_method_and_ratio(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "small.py"), "--quick", "--heads", "adacos,subcenter_arcface",
        "--classes", "10", "--out", str(tmp_path), "--threads", "1",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "cpu-small-quick.json").read_text())
    assert sorted(r["head"] for r in report["results"]) == ["adacos", "subcenter_arcface"]
    for result in report["results"]:
        assert result["error"] is None, result["error"]
        assert set(result["time_ms"]) == {"marginloss", "plain", "gemm", "logits", "plain_logits"}
        assert all(value > 0 for value in result["time_ms"].values())
        for key in ("vs_plain", "vs_floor", "logits_vs_plain"):
            assert result[key] is not None and result[key] > 0
    markdown = (tmp_path / "cpu-small-quick.md").read_text()
    assert "marginloss ÷ plain PyTorch formula, B=32, D=128" in markdown
    assert (tmp_path / "cpu-small-quick.png").read_bytes().startswith(b"\x89PNG")
