"""The README's CLI example works as written: its block (between <!-- cli-example --> and
<!-- /cli-example -->) is run line by line, verbatim, by bash, against a real server, with
the virtual environment's bin on PATH and the data files it names in the working folder.
The block relies on the default ports; here PROPSERVE_GRPC and PROPSERVE_REST point the
CLI at the test server instead, and PROPSERVE_TRANSPORT runs it over each transport."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from propserve.clients import GrpcClient
from tests.support.server import ServerProcess, start_server

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- cli-example -->\n```sh\n(.*?)```\n<!-- /cli-example -->", re.DOTALL)


def readme_lines() -> list[str]:
    """The block's commands, a line ending in a backslash joined with the next, comments
    and blank lines left out."""
    found = BLOCK.findall((ROOT / "README.md").read_text())
    assert len(found) == 1, "README.md needs exactly one marked CLI example"
    text = found[0].replace("\\\n", "")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_block_is_propserve_commands() -> None:
    lines = readme_lines()
    assert len(lines) >= 8
    assert all(line.startswith("propserve ") for line in lines), lines


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of its own: the block creates "digits" and expects versions 1 and 2 (numbers
    are never reused, even after a model is deleted)."""
    process = start_server(tmp_path / "store")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The working folder, with the files the block names: digits.npz (x, y), rows.npy."""
    work = tmp_path / "work"
    work.mkdir()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    np.savez(work / "digits.npz", x=x, y=digits.target.astype(np.int64))
    np.save(work / "rows.npy", x[:5])
    return work


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_the_readme_cli_example_runs_as_written(
    fresh_server: ServerProcess, folder: Path, transport: str
) -> None:
    server = fresh_server
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PROPSERVE_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PROPSERVE_GRPC": server.grpc_target,
        "PROPSERVE_REST": server.rest_url,
        "PROPSERVE_TRANSPORT": transport,
    }
    outputs = {}
    for line in readme_lines():
        done = subprocess.run(
            ["bash", "-c", line],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        outputs[line.split("#")[0].strip()] = done.stdout

    # And it did what its comments say.
    predicted = json.loads(outputs["propserve predict digits rows.npy --label stable"])
    assert predicted["version"] == 1 and np.asarray(predicted["outputs"]).shape == (5, 10)
    with GrpcClient(server.grpc_target) as client:
        versions = client.list_versions("digits")
        model = client.get_model("digits")
    assert [(v.version, v.labels) for v in versions] == [(1, ("stable",)), (2, ())]
    assert model.head_step == versions[0].step and model.labels == {"stable": 1}
