"""examples/train_digits.py run as a user would, against a real server, on a few epochs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from propserve.clients import RestClient
from tests.support.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_digits.py"


def run_example(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        str(EXAMPLE),
        "--grpc",
        server.grpc_target,
        "--rest",
        server.rest_url,
        *args,
    ]
    # Bytes, decoded here: text mode would turn the progress line's "\r" into "\n".
    raw = subprocess.run(command, capture_output=True, timeout=120, cwd=ROOT, check=False)
    return subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode()
    )


def test_example_trains_saves_labels_and_reaches_accuracy(server: ServerProcess) -> None:
    result = run_example(server, "--epochs", "3", "--min-accuracy", "0.85", "--model", "ex")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "created model ex: 64-128-10, 9,610 parameters"
    # 1437 training rows in batches of 32: 45 steps per epoch, streamed over gRPC.
    assert lines[1] == "saved version 1 at step 135, labelled stable"
    assert re.fullmatch(r"predicted \[\d, \d, \d\], true \[\d, \d, \d\]", lines[2])
    found = re.fullmatch(
        r"test accuracy (\d\.\d{4}), loss (\d+\.\d{4}) on 360 held-out digits .*", lines[3]
    )
    assert found, result.stdout
    accuracy, loss = float(found.group(1)), float(found.group(2))
    assert 0.85 <= accuracy <= 1.0 and loss > 0
    # The progress display redraws in place ("\r") and ends one line per epoch on stderr.
    finals = [line.rsplit("\r", 1)[-1] for line in result.stderr.strip().split("\n")]
    assert [line.split()[:3] for line in finals] == [
        ["epoch", f"{epoch}/3", "45/45"] for epoch in (1, 2, 3)
    ]
    assert all("samples/s" in line for line in finals)
    with RestClient(server.rest_url) as client:
        model = client.get_model("ex")
    assert model.labels == {"stable": 1}
    assert model.head_step == 135


def test_example_fails_below_min_accuracy_and_on_a_taken_name(server: ServerProcess) -> None:
    result = run_example(server, "--epochs", "1", "--min-accuracy", "0.999", "--model", "ex1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "below --min-accuracy 0.999" in result.stderr
    again = run_example(server, "--epochs", "1", "--model", "ex1")
    assert again.returncode == 2
    assert "already exists (pass --replace to start over)" in again.stderr
