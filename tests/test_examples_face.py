"""Smoke tests of examples/face: toy data, train, resume, fine-tune, verify, demo, bad input.

Every script runs in-process through its ``main(argv)`` on a tiny generated dataset
(32 px, a handful of identities), except the demo, which runs as a file the way
``make demo`` does. Bad input must end in ``error: <message naming the path>`` and exit 2.
"""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("torchvision", reason="the face example needs torchvision (the examples extras)")

from face import demo, make_toy_faces, train, verify  # noqa: E402
from face.data import DataLayoutError, channel_stats  # noqa: E402

pytestmark = pytest.mark.xdist_group("examples_face")

TINY = [
    "--num-identities", "4", "--images-per-identity", "4", "--dev-per-identity", "1",
    "--test-per-identity", "2", "--known-identities", "3", "--unmatched-identities", "2",
    "--unknown-dev", "8", "--unknown-test", "5", "--image-size", "32", "--seed", "3",
]
FAST = ["--batch-size", "8", "--threads", "1", "--no-progress", "--embedding-dim", "16", "--seed", "0"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)  # the scripts' --threads 1 must not leak into other tests


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "faces"
    assert make_toy_faces.main(["--out", str(root), *TINY]) == 0
    return root


@pytest.fixture(scope="module")
def trained(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "softmax"
    assert train.main(["--data", str(toy_data), "--out", str(out), "--epochs", "1", *FAST]) == 0
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


# --- make_toy_faces ------------------------------------------------------------------------


def test_toy_faces_have_the_hw2p2_layout(toy_data: Path) -> None:
    classification, verification = toy_data / "classification", toy_data / "verification"
    identities = sorted(path.name for path in (classification / "train").iterdir())
    assert len(identities) == 4 and all(re.fullmatch(r"n\d{6}", name) for name in identities)
    for split, per_identity in (("train", 4), ("dev", 1), ("test", 2)):
        assert sorted(path.name for path in (classification / split).iterdir()) == identities
        assert all(len(list((classification / split / name).glob("*.jpg"))) == per_identity for name in identities)
    submission = _rows(classification / "classification_sample_submission.csv")
    assert list(submission[0]) == ["id", "label"]
    assert sorted(row["id"] for row in submission) == sorted(path.name for path in (classification / "test").rglob("*.jpg"))

    known = sorted(path.name for path in (verification / "known").iterdir())
    assert len(known) == 3 and not set(known) & set(identities)  # verification identities are new
    assert all(len(list((verification / "known" / name).glob("*.jpg"))) == 1 for name in known)
    unknown_dev = sorted(path.name for path in (verification / "unknown_dev").iterdir())
    dev_rows = _rows(verification / "verification_dev.csv")
    assert [row["id"] for row in dev_rows] == unknown_dev and len(unknown_dev) == 8
    labels = {row["label"] for row in dev_rows}
    assert labels <= set(known) | {"n000000"}
    assert "n000000" in labels and labels & set(known)  # some probes match, some do not
    test_rows = _rows(verification / "verification_sample_submission.csv")
    assert [row["id"] for row in test_rows] == sorted(path.name for path in (verification / "unknown_test").iterdir())
    assert len(test_rows) == 5


def _digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_toy_faces_are_deterministic_given_the_seed(tmp_path: Path) -> None:
    small = {"num_identities": 2, "images_per_identity": 2, "dev_per_identity": 1, "test_per_identity": 1,
             "known_identities": 1, "unmatched_identities": 1, "unknown_dev": 2, "unknown_test": 2, "image_size": 24}
    make_toy_faces.generate(tmp_path / "a", seed=5, **small)
    make_toy_faces.generate(tmp_path / "b", seed=5, **small)
    make_toy_faces.generate(tmp_path / "c", seed=6, **small)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_toy_faces_refuse_a_non_empty_folder(toy_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert make_toy_faces.main(["--out", str(toy_data), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(toy_data) in err and "--force" in err


def test_toy_faces_reject_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert make_toy_faces.main(["--out", str(tmp_path / "x"), "--num-identities", "1"]) == 2
    assert "num_identities must be >= 2, got 1" in capsys.readouterr().err


def test_channel_stats_are_cached(toy_data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "stats.json"
    mean, std = channel_stats(toy_data / "classification" / "train", cache=cache)
    assert cache.exists() and len(mean) == len(std) == 3
    assert all(0 < value < 1 for value in mean) and all(0 < value < 0.5 for value in std)
    cache.write_text(cache.read_text().replace(str(mean[0]), "0.123"))  # a cached value is used as is
    assert channel_stats(toy_data / "classification" / "train", cache=cache)[0][0] == 0.123


# --- train ---------------------------------------------------------------------------------


def test_train_writes_checkpoint_metrics_and_plot(trained: Path) -> None:
    assert {"last.pt", "metrics.csv", "curves.png", "channel_stats.json"} <= {path.name for path in trained.iterdir()}
    rows = _rows(trained / "metrics.csv")
    assert len(rows) == 1
    assert list(rows[0]) == list(train.METRIC_COLUMNS)
    assert rows[0]["epoch"] == "1" and rows[0]["head"] == "softmax"
    assert 0.0 <= float(rows[0]["dev_acc"]) <= 1.0


def test_train_prints_the_backbone_parameter_count(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", str(toy_data), "--out", str(tmp_path), "--head", "cosface", "--center-loss-weight", "0.01",
            "--smoke", "--no-plot", *FAST]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"backbone resnet_toy: [\d,]+ parameters", out)
    assert "cosface" in _rows(tmp_path / "metrics.csv")[0]["head"]


def test_resume_continues_where_the_run_stopped(trained: Path, toy_data: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    argv = ["--data", str(toy_data), "--out", str(run), "--epochs", "2", "--resume", "--no-plot", *FAST]
    assert train.main(argv) == 0
    rows = _rows(run / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0] == _rows(trained / "metrics.csv")[0]  # the first epoch is carried over, not redone
    assert torch.load(run / "last.pt", weights_only=True)["stage_epoch"] == 2


def test_an_interrupted_run_resumes_exactly(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", str(toy_data), "--no-plot", "--epochs", "2", "--dropout", "0.2", *FAST]
    assert train.main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert train.main([*common, "--out", str(tmp_path / "split"), "--stop-after", "1"]) == 0
    assert "continue with --resume" in capsys.readouterr().out
    assert len(_rows(tmp_path / "split" / "metrics.csv")) == 1
    assert train.main([*common, "--out", str(tmp_path / "split"), "--resume"]) == 0

    def without_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{key: value for key, value in row.items() if key != "epoch_time_s"} for row in rows]

    assert without_time(_rows(tmp_path / "split" / "metrics.csv")) == without_time(_rows(tmp_path / "straight" / "metrics.csv"))
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    for name, tensor in straight.items():
        assert torch.equal(tensor, split[name]), name


def test_finetune_swaps_in_a_margin_head(trained: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "arcface"
    argv = ["--data", str(toy_data), "--out", str(out), "--init", str(trained / "last.pt"), "--epochs", "0",
            "--finetune-head", "arcface", "--finetune-epochs", "1", "--no-plot", *FAST]
    assert train.main(argv) == 0
    assert "arcface head starts from the softmax class weights" in capsys.readouterr().out
    rows = _rows(out / "metrics.csv")
    assert [(row["stage"], row["head"]) for row in rows] == [("finetune", "arcface")]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["head"] == "arcface" and state["head_kwargs"]["margin"] == pytest.approx(0.3)


def test_two_stages_in_one_run(toy_data: Path, tmp_path: Path) -> None:
    argv = ["--data", str(toy_data), "--out", str(tmp_path), "--epochs", "1", "--finetune-head", "cosface",
            "--finetune-epochs", "1", "--max-steps-per-epoch", "1", *FAST]
    assert train.main(argv) == 0
    rows = _rows(tmp_path / "metrics.csv")
    assert [(row["epoch"], row["stage"], row["head"]) for row in rows] == [("1", "train", "softmax"), ("2", "finetune", "cosface")]


# --- verify --------------------------------------------------------------------------------


def test_verify_writes_both_submissions(trained: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify.main(["--data", str(toy_data), "--checkpoint", str(trained / "last.pt"), "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "classification dev accuracy" in out and "verification dev accuracy" in out

    sample = _rows(toy_data / "classification" / "classification_sample_submission.csv")
    written = _rows(tmp_path / "classification_submission.csv")
    assert list(written[0]) == ["id", "label"]
    assert [row["id"] for row in written] == [row["id"] for row in sample]
    assert all(0 <= int(row["label"]) < 4 for row in written)

    sample = _rows(toy_data / "verification" / "verification_sample_submission.csv")
    written = _rows(tmp_path / "verification_submission.csv")
    assert list(written[0]) == ["id", "label"]
    assert [row["id"] for row in written] == [row["id"] for row in sample]
    known = {path.name for path in (toy_data / "verification" / "known").iterdir()}
    assert {row["label"] for row in written} <= known | {"n000000"}


def test_verify_returns_accuracies_and_chance_levels(trained: Path, toy_data: Path, tmp_path: Path) -> None:
    args = verify.build_parser().parse_args(["--data", str(toy_data), "--checkpoint", str(trained / "last.pt"),
                                             "--out", str(tmp_path), "--no-progress", "--no-flip"])
    result = verify.verify(args)
    assert result["classification_chance"] == pytest.approx(0.25)
    assert 0 < result["verification_chance"] <= 1
    assert 0 <= result["classification_dev_acc"] <= 1 and 0 <= result["verification_dev_acc"] <= 1


# --- demo ----------------------------------------------------------------------------------


def test_demo_smoke_runs_as_a_script(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "face" / "demo.py"), "--out", str(tmp_path / "demo"), "--smoke"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert re.search(r"classification dev accuracy [\d.]+ +\(chance 0\.250\)", completed.stdout)
    assert re.search(r"verification +dev accuracy [\d.]+ +\(chance [\d.]+", completed.stdout)
    assert (tmp_path / "demo" / "run" / "verification_submission.csv").exists()


@pytest.mark.parametrize("module", [make_toy_faces, train, verify, demo])
def test_help_describes_every_option(module: object, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])  # type: ignore[attr-defined]
    assert exit_info.value.code == 0
    assert "--seed" in capsys.readouterr().out


# --- bad input -----------------------------------------------------------------------------


def _fails(capsys: pytest.CaptureFixture[str], status: int, *fragments: str) -> None:
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def test_missing_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    _fails(capsys, train.main(["--data", str(missing), "--out", str(tmp_path / "run"), *FAST]), str(missing), "does not exist")


def test_wrong_layout_names_the_missing_sub_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data" / "train" / "n000001").mkdir(parents=True)  # train/ at the top, not under classification/
    status = train.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *FAST])
    _fails(capsys, status, str(tmp_path / "data" / "classification" / "train"))


def test_empty_class_folder(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(toy_data, tmp_path)
    empty = root / "classification" / "train" / "n999999"
    empty.mkdir()
    _fails(capsys, train.main(["--data", str(root), "--out", str(tmp_path / "run"), *FAST]), str(empty), "holds no images")


def test_dev_identities_must_match_train(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(toy_data, tmp_path)
    dev = root / "classification" / "dev"
    first = sorted(dev.iterdir())[0]
    first.rename(dev / "n999998")
    _fails(capsys, train.main(["--data", str(root), "--out", str(tmp_path / "run"), *FAST]), str(dev), "different identity folders")


@pytest.mark.parametrize(
    ("csv_path", "missing_dir"),
    [
        ("verification/verification_dev.csv", "verification/unknown_dev"),
        ("verification/verification_sample_submission.csv", "verification/unknown_test"),
        ("classification/classification_sample_submission.csv", None),
    ],
)
def test_csv_naming_missing_images(csv_path: str, missing_dir: str | None, trained: Path, toy_data: Path,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(toy_data, tmp_path)
    path = root / csv_path
    lines = path.read_text().splitlines()
    lines[1] = "ghost.jpg," + lines[1].split(",", 1)[1]
    path.write_text("\n".join(lines) + "\n")
    status = verify.main(["--data", str(root), "--checkpoint", str(trained / "last.pt"), "--out", str(tmp_path), "--no-progress"])
    _fails(capsys, status, str(path), "ghost.jpg", "do not exist")


def test_verification_labels_must_be_known(trained: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(toy_data, tmp_path)
    path = root / "verification" / "verification_dev.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].split(",", 1)[0] + ",n424242"
    path.write_text("\n".join(lines) + "\n")
    status = verify.main(["--data", str(root), "--checkpoint", str(trained / "last.pt"), "--out", str(tmp_path), "--no-progress"])
    _fails(capsys, status, str(path), "n424242")


def test_missing_verification_folder(trained: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(toy_data, tmp_path)
    shutil.rmtree(root / "verification" / "known")
    status = verify.main(["--data", str(root), "--checkpoint", str(trained / "last.pt"), "--out", str(tmp_path), "--no-progress"])
    _fails(capsys, status, str(root / "verification" / "known"))


def test_missing_checkpoint(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "none.pt"
    _fails(capsys, verify.main(["--data", str(toy_data), "--checkpoint", str(checkpoint)]), str(checkpoint), "does not exist")
    _fails(capsys, train.main(["--data", str(toy_data), "--out", str(tmp_path), "--resume", *FAST]),
           str(tmp_path / "last.pt"), "does not exist")


def test_resume_with_another_backbone_is_refused(trained: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(trained, tmp_path)
    status = train.main(["--data", str(toy_data), "--out", str(run), "--resume", "--epochs", "2",
                         "--backbone", "convnext_toy", *FAST])
    _fails(capsys, status, "resnet_toy", "convnext_toy")


def test_fp16_on_cpu_is_refused(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = train.main(["--data", str(toy_data), "--out", str(tmp_path), "--amp", "fp16", "--device", "cpu", *FAST])
    _fails(capsys, status, "--amp fp16 needs a CUDA device")


def test_bf16_autocast_on_cpu_trains(toy_data: Path, tmp_path: Path) -> None:
    argv = ["--data", str(toy_data), "--out", str(tmp_path), "--amp", "bf16", "--device", "cpu", "--smoke", "--no-plot", *FAST]
    assert train.main(argv) == 0


def test_data_layout_error_is_an_exception_with_the_path(tmp_path: Path) -> None:
    from face.data import classification_dir

    with pytest.raises(DataLayoutError, match=re.escape(str(tmp_path / "classification" / "dev"))):
        classification_dir(tmp_path, "dev")


def test_center_loss_sees_unit_vectors_beside_norm_free_heads() -> None:
    from face.model import HEADS, NORM_FREE_HEADS, center_loss_input

    embeddings = 3.0 * torch.randn(5, 8)
    for name in HEADS:
        got = center_loss_input(name, embeddings)
        if name in NORM_FREE_HEADS:
            assert torch.allclose(got.norm(dim=1), torch.ones(5))
        else:
            assert got is embeddings
    assert set(NORM_FREE_HEADS) == {
        "arcface", "cosface", "combined", "normface", "subcenter_arcface", "curricularface", "elasticface",
        "uniface", "sphereface2",
    }


@pytest.mark.parametrize("extra", [["--loss", "multi_similarity", "--head", "arcface"],
                                   ["--loss", "soft_triple", "--loss-only"]], ids=["joint", "alone"])
def test_train_with_a_pair_loss_on_class_balanced_batches(toy_data: Path, tmp_path: Path, extra: list[str]) -> None:
    argv = ["--data", str(toy_data), "--out", str(tmp_path), "--smoke", "--no-plot", "--samples-per-class", "2",
            *extra, *FAST]
    assert train.main(argv) == 0
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["args"]["loss"] == extra[1]
    # SoftTriple's centres are trained and saved with the run
    assert state["pair_state"] is not None
    assert ("criterion.weight" in state["pair_state"]) == (extra[1] == "soft_triple")


def test_pair_loss_needs_room_for_pairs(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", str(toy_data), "--out", str(tmp_path), "--smoke", "--no-plot", "--loss", "triplet",
            "--samples-per-class", "1", *FAST]
    assert train.main(argv) == 2
    assert "--loss needs --samples-per-class >= 2" in capsys.readouterr().err


def test_a_pair_loss_run_resumes_exactly(toy_data: Path, tmp_path: Path) -> None:
    common = ["--data", str(toy_data), "--no-plot", "--epochs", "2", "--loss", "triplet", "--samples-per-class", "2",
              "--max-steps-per-epoch", "2", *FAST]
    assert train.main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert train.main([*common, "--out", str(tmp_path / "split"), "--stop-after", "1"]) == 0
    assert train.main([*common, "--out", str(tmp_path / "split"), "--resume"]) == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    for name, tensor in straight.items():
        assert torch.equal(tensor, split[name]), name


# --- what a newcomer hit (issue #15) ---------------------------------------------------------


def test_train_checks_the_verification_layout_before_training(toy_data: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(toy_data, tmp_path)
    shutil.rmtree(root / "verification" / "unknown_test")
    out = tmp_path / "run"
    _fails(capsys, train.main(["--data", str(root), "--out", str(out), "--epochs", "1", *FAST]),
           str(root / "verification" / "unknown_test"))
    assert not (out / "last.pt").exists(), "trained before finding the layout incomplete"


def test_a_corrupt_checkpoint_says_what_is_wrong(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"PK\x03\x04 not really a checkpoint" * 4)
    _fails(capsys, verify.main(["--data", str(toy_data), "--checkpoint", str(checkpoint), "--no-progress"]),
           str(checkpoint), "truncated, corrupt or not a torch checkpoint")


def test_verify_names_the_identity_folders_that_differ(trained: Path, toy_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(toy_data, tmp_path)
    dev = root / "classification" / "dev"
    first = sorted(dev.iterdir())[0]
    first.rename(dev / "n999997")
    status = verify.main(["--data", str(root), "--checkpoint", str(trained / "last.pt"), "--out", str(tmp_path),
                          "--no-progress"])
    _fails(capsys, status, "holds other identity folders", "extra: n999997", f"missing: {first.name}")


def test_toy_faces_smoke_writes_a_tiny_full_layout(tmp_path: Path) -> None:
    root = tmp_path / "smoke"
    assert make_toy_faces.main(["--out", str(root), "--smoke"]) == 0
    from face.data import check_layout

    check_layout(root)
    identities = sorted(p.name for p in (root / "classification" / "train").iterdir())
    assert len(identities) == make_toy_faces.SMOKE["num_identities"]


def test_progress_bars_stay_off_when_stderr_is_not_a_terminal(toy_data: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    fast = [arg for arg in FAST if arg != "--no-progress"]
    assert train.main(["--data", str(toy_data), "--out", str(tmp_path / "run"), "--smoke", "--no-plot", *fast]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err, err[-500:]


def _readme_commands() -> dict[str, list[str]]:
    readme = (EXAMPLES / "face" / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.DOTALL)
    assert block is not None
    commands = {}
    for line in block.group(1).splitlines():
        words = line.split("#")[0].split()
        if len(words) > 2 and words[0] == "python" and words[1].startswith("examples/face/"):
            commands[Path(words[1]).stem] = words[2:]
    return commands


def test_the_readme_commands_are_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/face/README.md's three commands train and verify with make demo's settings."""
    commands = _readme_commands()
    assert set(commands) == {"make_toy_faces", "train", "verify"}
    defaults = demo.build_parser().parse_args([])
    data_args = make_toy_faces.build_parser().parse_args(commands["make_toy_faces"])
    signature = __import__("inspect").signature(make_toy_faces.generate).parameters
    for name, parameter in signature.items():
        if parameter.default is not parameter.empty and name != "seed":
            assert getattr(data_args, name) == parameter.default, name  # the demo uses generate()'s defaults
    ours = vars(train.build_parser().parse_args(commands["train"]))
    theirs = vars(train.build_parser().parse_args([
        "--data", ours["data"].as_posix(), "--out", ours["out"].as_posix(), "--backbone", defaults.backbone,
        "--head", defaults.head, "--epochs", str(defaults.epochs), "--batch-size", str(defaults.batch_size),
        "--lr", str(defaults.lr), "--threads", str(defaults.threads), "--workers", str(defaults.workers),
        "--seed", str(defaults.seed),
    ]))
    assert ours == theirs
    verify_args = verify.build_parser().parse_args(commands["verify"])
    assert verify_args.threads == defaults.threads


def test_demo_record_holds_the_figures_and_their_conditions(tmp_path: Path) -> None:
    import json

    record = tmp_path / "results" / "demo.json"
    for _ in range(2):
        assert demo.main(["--out", str(tmp_path / "demo"), "--smoke", "--record", str(record)]) == 0
    runs = json.loads(record.read_text())["runs"]
    assert len(runs) == 2 and runs[0]["settings"]["smoke"] is True
    for key in ("classification_dev_acc", "verification_dev_acc", "wall_s", "load_1min", "machine", "data"):
        assert key in runs[0], key
    assert runs[0]["machine"]["logical_cores"] >= 1 and runs[0]["data"]["num_identities"] == make_toy_faces.SMOKE["num_identities"]
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["wall_s"] == runs[1]["wall_s"]

@pytest.mark.parametrize("head", ["lgm", "uniformface"])
def test_gaussian_mixture_and_uniform_heads_train_and_verify(head: str, toy_data: Path, tmp_path: Path) -> None:
    argv = ["--data", str(toy_data), "--out", str(tmp_path), "--head", head, "--smoke", "--no-plot", *FAST]
    assert train.main(argv) == 0
    assert _rows(tmp_path / "metrics.csv")[0]["head"] == head
    status = verify.main(["--data", str(toy_data), "--checkpoint", str(tmp_path / "last.pt"), "--out", str(tmp_path),
                          "--no-progress"])
    assert status == 0
