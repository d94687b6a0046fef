"""examples/train_digits.py reports a refusal as one line naming the error's code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def test_a_refusal_is_one_line_with_the_codes_name(server: ServerProcess) -> None:
    command = [
        sys.executable,
        str(ROOT / "examples" / "train_digits.py"),
        "--grpc",
        server.grpc_target,
        "--rest",
        server.rest_url,
        "--model",
        "Not A Name",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("train_digits: invalid_argument: invalid model name "), done
    assert done.stderr.count("\n") == 1
