"""examples/face/train.py with --margin-warmup (resumed exactly) and the sigmoid-form heads."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("torchvision", reason="the face example needs torchvision (the examples extras)")

from face import make_toy_faces, train  # noqa: E402

pytestmark = pytest.mark.xdist_group("examples_face")

TINY = [
    "--num-identities", "4", "--images-per-identity", "4", "--dev-per-identity", "1",
    "--test-per-identity", "1", "--known-identities", "2", "--unmatched-identities", "1",
    "--unknown-dev", "2", "--unknown-test", "2", "--image-size", "32", "--seed", "5",
]
FAST = ["--batch-size", "8", "--threads", "1", "--no-progress", "--no-plot", "--embedding-dim", "16", "--seed", "0"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "faces"
    assert make_toy_faces.main(["--out", str(root), *TINY]) == 0
    return root


def test_margin_warmup_is_checkpointed_and_resumed(toy_data: Path, tmp_path: Path) -> None:
    common = ["--data", str(toy_data), "--head", "arcface", "--epochs", "3", "--margin-warmup", "5", *FAST]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main([*common, "--out", str(whole)]) == 0
    assert train.main([*common, "--out", str(parts), "--stop-after", "1"]) == 0
    state = torch.load(parts / "last.pt", weights_only=False)["warmup_state"]
    assert state[0]["step_count"] == 2 and state[0]["end"] == 0.3  # 16 images / 8 per batch
    assert train.main([*common, "--out", str(parts), "--resume"]) == 0
    final = torch.load(parts / "last.pt", weights_only=False)
    assert final["warmup_state"][0]["step_count"] == 6
    reference = torch.load(whole / "last.pt", weights_only=False)["history"]
    # The resumed run saw the same margins at the same steps as the uninterrupted one.
    assert [row["train_loss"] for row in final["history"]] == pytest.approx([row["train_loss"] for row in reference])
    assert [row["dev_loss"] for row in final["history"]] == pytest.approx([row["dev_loss"] for row in reference])


def test_margin_warmup_needs_a_float_margin(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = train.main(["--data", str(toy_data), "--out", str(tmp_path), "--head", "normface", "--epochs", "1",
                         "--margin-warmup", "5", *FAST])
    assert status == 2
    assert "--margin-warmup needs a head with a float margin" in capsys.readouterr().err


@pytest.mark.parametrize("head", ["uniface", "sphereface2"])
def test_sigmoid_heads_train_through_create_head(head: str, toy_data: Path, tmp_path: Path) -> None:
    result = train.train(train.build_parser().parse_args(
        ["--data", str(toy_data), "--out", str(tmp_path), "--head", head, "--smoke", "--margin-warmup", "3", *FAST]
    ))
    assert 0.0 <= result["dev_acc"] <= 1.0
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert "bias" in state["head_state"]
