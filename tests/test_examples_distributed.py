"""examples/distributed/train.py started without torchrun says how to start it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "distributed" / "train.py"


def test_plain_python_is_told_to_use_torchrun() -> None:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set")
    assert "torchrun --nproc_per_node 2 examples/distributed/train.py --smoke" in result.stderr
