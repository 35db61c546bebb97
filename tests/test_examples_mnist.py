"""Smoke tests for examples/mnist_arcface/train.py (the CI-sized run and its command line).

The script is loaded in-process (its folder on ``sys.path`` for its helper modules, which
are removed from ``sys.modules`` afterwards) so the smoke run costs seconds, not a fresh
interpreter; ``--help`` also runs as a real subprocess, as a user would call it.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "mnist_arcface"
HELPER_MODULES = ("data", "figures")
DEFAULT_HEADS = ("softmax", "arcface", "cosface", "sphereface")
PROMISED_FILES = (
    "embeddings_2d.png",
    "embeddings_3d.png",
    "training_curves.png",
    "accuracy.png",
    "accuracy.md",
    "accuracy.csv",
    "results.csv",
    "history.csv",
)

pytestmark = pytest.mark.xdist_group("examples_mnist")


@pytest.fixture
def train_script(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    for name in HELPER_MODULES:  # another example's helper of the same name must not win
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = importlib.util.spec_from_file_location("mnist_arcface_train", EXAMPLE_DIR / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    for name in HELPER_MODULES:
        sys.modules.pop(name, None)


def test_smoke_run_writes_every_promised_file(
    train_script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    started = time.perf_counter()
    code = train_script.main(
        ["--data", "synthetic", "--smoke", "--out", str(out), "--device", "cpu"]
    )
    elapsed = time.perf_counter() - started
    assert code == 0
    for name in PROMISED_FILES:
        path = out / name
        assert path.is_file(), (
            f"{name} was not written; found {sorted(p.name for p in out.iterdir())}"
        )
        assert path.stat().st_size > 0, f"{name} is empty"
    for name in PROMISED_FILES:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"

    with open(out / "accuracy.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["head"] for row in rows] == list(DEFAULT_HEADS)
    for row in rows:
        for dim in (2, 3):
            assert 0.0 <= float(row[f"test_acc_d{dim}"]) <= 1.0, row

    table = (out / "accuracy.md").read_text()
    for head in DEFAULT_HEADS:
        assert sum(line.startswith(f"| {head} |") for line in table.splitlines()) >= 1, table

    with open(out / "results.csv", newline="") as handle:
        results = list(csv.DictReader(handle))
    assert {(row["head"], row["embedding_dim"]) for row in results} == {
        (head, str(dim)) for head in DEFAULT_HEADS for dim in (2, 3)
    }
    assert "total wall time" in capsys.readouterr().out
    # Tiny by design (a few hundred images, one epoch); generous for a loaded 2-core machine.
    assert elapsed < 120, f"the smoke run took {elapsed:.0f} s"


def test_smoke_run_is_deterministic_with_seed(train_script: ModuleType, tmp_path: Path) -> None:
    argv = ["--data", "synthetic", "--smoke", "--heads", "softmax,arcface", "--embedding-dims", "2"]
    argv += ["--device", "cpu", "--seed", "3"]
    for name in ("a", "b"):
        assert train_script.main([*argv, "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a" / "results.csv").read_text().split("train_seconds")[0] == (
        tmp_path / "b" / "results.csv"
    ).read_text().split("train_seconds")[0]
    first, second = ((tmp_path / n / "accuracy.csv").read_text() for n in ("a", "b"))
    assert first == second


def test_help_lists_every_flag() -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE_DIR / "train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    for flag in ("--data", "--root", "--download", "--heads", "--epochs", "--batch-size", "--lr",
                 "--embedding-dims", "--scale", "--margin", "--out", "--seed", "--device",
                 "--smoke", "--threads", "--progress-every", "--record"):  # fmt: skip
        assert flag in completed.stdout, f"{flag} missing from --help"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--heads", "softmax,arcfce"], "unknown head(s) 'arcfce'; choose from"),
        (["--heads", "arcface,arcface"], "listed twice"),
        (["--heads", ""], "no head given"),
        (["--embedding-dims", "2,1"], "integers >= 2"),
        (["--margin", "bogus=0.3"], "unknown head 'bogus'"),
        (["--margin", "0.3", "--heads", "sphereface"], "integer angle multiplier"),
        (["--scale", "sphereface=10", "--heads", "sphereface"], "sphereface has no such"),
        (["--margin", "arcface=4.0", "--heads", "arcface"], "margin"),
        (["--data", "imagenet"], "invalid choice: 'imagenet'"),
    ],
)
def test_bad_arguments_give_a_clear_argparse_error(
    train_script: ModuleType,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        train_script.main(
            [*argv, "--data", "synthetic", "--smoke"] if "--data" not in argv else argv
        )
    assert excinfo.value.code == 2
    stderr = capsys.readouterr().err
    assert "usage: train.py" in stderr
    assert message in stderr, stderr


def test_missing_torchvision_dataset_says_how_to_get_it(
    train_script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torchvision")
    code = train_script.main(["--data", "mnist", "--root", str(tmp_path), "--smoke", "--out",
                              str(tmp_path / "out")])  # fmt: skip
    assert code == 1
    stderr = capsys.readouterr().err
    assert "--download" in stderr and "--data synthetic" in stderr, stderr


def test_threads_progress_lines_and_the_results_record(
    train_script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import torch

    before = torch.get_num_threads()
    record = tmp_path / "results.json"
    argv = ["--data", "synthetic", "--smoke", "--heads", "softmax,arcface", "--embedding-dims", "2",
            "--device", "cpu", "--threads", "1", "--progress-every", "1e-9", "--record", str(record)]
    for name in ("a", "b"):
        assert train_script.main([*argv, "--out", str(tmp_path / name)]) == 0
    assert torch.get_num_threads() == before, "--threads leaked out of main()"
    out = capsys.readouterr().out
    # Within an epoch: "epoch 1/1  step 3/8  loss so far ... (0.1 s training this head)".
    within = [line for line in out.splitlines() if " step " in line and "loss so far" in line]
    assert within and all(line.endswith("s training this head)") for line in within), out[-2000:]
    runs = json.loads(record.read_text())["runs"]
    assert len(runs) == 2 and runs[0]["threads"] == 1
    assert [(row["head"], row["embedding_dim"]) for row in runs[0]["rows"]] == [("softmax", 2), ("arcface", 2)]
    assert runs[0]["rows"][1]["scale"] is not None and 0.0 <= runs[0]["rows"][0]["test_acc"] <= 1.0
    assert len(runs[0]["load_1min"]) == 2 and runs[0]["machine"]["logical_cores"] >= 1
    assert "--record" not in runs[0]["command"] and runs[0]["command"].startswith("python examples/mnist_arcface/train.py")


def test_negative_threads_are_refused(train_script: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_script.main(["--data", "synthetic", "--smoke", "--threads", "-1"])
    assert "--threads must be >= 0, got -1" in capsys.readouterr().err
