"""The README's Python examples run as written, in order, against a real server of their own
(the addresses they name are pointed at it): the ten lines that train "demo", then the
seed example that imports one neuron, predicts 3.2 and 0, exports it as ONNX and reads the
demo's history."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.server import ServerProcess, start_server

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = start_server(tmp_path / "store")
    try:
        yield process
    finally:
        process.stop()


def run(code: str, server: ServerProcess, folder: Path) -> str:
    code = code.replace("http://127.0.0.1:8000", server.rest_url)
    code = code.replace("127.0.0.1:50051", server.grpc_target)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{code}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_readme_python_examples_run_as_written(
    fresh_server: ServerProcess, tmp_path: Path
) -> None:
    ten_lines, seed = BLOCK.findall((ROOT / "README.md").read_text())
    assert len(ten_lines.strip().splitlines()) <= 12
    probabilities = run(ten_lines, fresh_server, tmp_path)
    assert probabilities.count("[") == 4  # a (3, 3) array
    out = run(seed, fresh_server, tmp_path).splitlines()
    assert out[:2] == ["[[3.2]", " [0. ]]"]  # relu(0.4*2 + 0.3*3 + 0.2*5 + 0.5), relu(-2.2)
    assert out[2].startswith("HistoryPoint(step=160, loss=")  # 8 batches x 20 passes
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(
        str(tmp_path / "neuron.onnx"), providers=["CPUExecutionProvider"]
    )
    rows = np.array([[2, 3, 5], [-2, -3, -5]], np.float32)
    outputs = session.run(None, {"input": rows})[0]
    assert abs(outputs[0, 0] - 3.2) < 1e-6 and outputs[1, 0] == 0
