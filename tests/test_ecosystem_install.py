"""propserve, tritonclient[all] and KServe install into one environment, where propserve's
server answers the ecosystem's clients over REST and gRPC.

The wheel is built as tests/test_packaging.py builds it and installed into a fresh virtual
environment with ``tritonclient[all]`` and ``kserve`` at the versions the dev extra pins
(from the package index, through pip's cache). ``propserve serve`` runs from that
environment, and so does tests/support/ecosystem_check.py, which predicts through each
client: tritonclient's in one process and KServe's in another (each registers the
protocol's messages as ``inference.*``), each beside propserve's own OIP module. Every
prediction is compared with propserve's ``/v1`` one, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from tests import test_packaging
from tests.support.ecosystem_check import MESSAGES, MODULES, PREDICTIONS
from tests.support.server import START_TIMEOUT
from tests.test_generated_code import _gencode, _version
from tests.test_packaging import ROOT, _run

#: The fixture: the wheel built from a copy of the sources, as tests/test_packaging.py does.
wheel = test_packaging.wheel

CHECK = ROOT / "tests" / "support" / "ecosystem_check.py"
#: The ecosystem's packages as a user names them; their versions come from the dev extra.
ECOSYSTEM = {"tritonclient": "tritonclient[all]", "kserve": "kserve"}


def _pinned(name: str) -> str:
    """The version pyproject.toml's dev extra pins ``name`` to."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev: list[str] = project["optional-dependencies"]["dev"]
    for requirement in dev:
        project, _, version = requirement.partition("==")
        if project.split("[")[0].strip() == name:
            return version.strip()
    raise AssertionError(f"pyproject.toml's dev extra pins no {name}")


@dataclass
class Outcome:
    """What the clients answered, per mode of ecosystem_check.py, and how the server ended."""

    reports: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, NDArray[Any]]]
    server_exit: int
    server_log: str


@pytest.fixture(scope="module")
def environment(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ecosystem") / "env"
    made = _run(sys.executable, "-m", "venv", folder, cwd=folder.parent)
    assert made.returncode == 0, made.stderr
    requirements = [f"{wheel}[server]"]
    requirements += [f"{spec}=={_pinned(name)}" for name, spec in ECOSYSTEM.items()]
    python = folder / "bin" / "python"
    # --no-compile: modules compile when first imported, not all ~100 packages up front.
    installed = _run(
        python, "-I", "-m", "pip", "install", "--no-compile", *requirements, cwd=folder.parent
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr
    return folder


@pytest.fixture(scope="module")
def versions(environment: Path) -> dict[str, str]:
    listed = _run(
        environment / "bin" / "python", "-I", "-m", "pip", "list", "--format=json",
        cwd=environment,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    return {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}


def _start(python: Path, folder: Path) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """``propserve serve`` from the environment, on ports the OS picks."""
    ready = folder / "ready.json"
    log_path = folder / "server.log"
    env = {
        **os.environ,
        "PROPSERVE_REST_PORT": "0",
        "PROPSERVE_GRPC_PORT": "0",
        "PROPSERVE_STORE": str(folder / "store"),
        "PROPSERVE_READY_FILE": str(ready),
        "PROPSERVE_GRACE_SECONDS": "5",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [python, "-I", "-m", "propserve", "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"the server did not start:\n{log_path.read_text()}")
        time.sleep(0.02)
    ports = json.loads(ready.read_text())
    return process, ports["rest_port"], ports["grpc_port"], log_path


def _stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then wait; the exit code."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@pytest.fixture(scope="module")
def outcome(environment: Path, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    folder = tmp_path_factory.mktemp("ecosystem-server")
    python = environment / "bin" / "python"
    process, rest_port, grpc_port, log_path = _start(python, folder)
    reports: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, NDArray[Any]]] = {}
    try:
        for mode in MODULES:
            out = folder / mode
            checked = _run(
                python, "-I", CHECK, mode, f"http://127.0.0.1:{rest_port}",
                f"127.0.0.1:{grpc_port}", out,
                cwd=folder,
            )  # fmt: skip
            assert checked.returncode == 0, f"{mode}:\n{checked.stdout}{checked.stderr}"
            reports[mode] = json.loads(out.with_suffix(".json").read_text())
            with np.load(out.with_suffix(".npz")) as arrays:
                outputs[mode] = {name: arrays[name] for name in arrays.files}
    finally:
        exit_code = _stop(process)
    return Outcome(reports, outputs, exit_code, log_path.read_text(errors="replace"))


def test_the_packages_resolve_together(environment: Path, versions: dict[str, str]) -> None:
    checked = _run(environment / "bin" / "python", "-I", "-m", "pip", "check", cwd=environment)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for name in ECOSYSTEM:
        assert versions[name] == _pinned(name)
    protobuf = _version(versions["protobuf"])
    assert protobuf[0] == 6, f"tritonclient takes protobuf <7; resolved {versions['protobuf']}"
    gencode = _gencode(ROOT / "propserve" / "oip" / "open_inference_pb2.py")
    assert protobuf >= gencode, (versions["protobuf"], gencode)


def test_the_server_and_clients_run_from_the_environment(
    environment: Path, outcome: Outcome
) -> None:
    site = environment / "lib"
    for mode, report in outcome.reports.items():
        assert sorted(report["files"]) == sorted(MODULES[mode])
        for module, file in report["files"].items():
            assert Path(file).is_relative_to(site), (mode, module, file)
    assert outcome.server_exit == 0, outcome.server_log


def test_propserve_oip_messages_load_beside_each_clients_own(outcome: Outcome) -> None:
    """propserve's server-side OIP module and tritonclient.grpc (or KServe) in one process:
    both ``inference.*`` and ``propserve.oip.*`` are in protobuf's default pool."""
    for report in outcome.reports.values():
        assert report["messages"] == list(MESSAGES)


def test_health_and_metadata_answer_every_client(outcome: Outcome) -> None:
    for mode, report in outcome.reports.items():
        others = {k: v for k, v in report["errors"].items() if k not in PREDICTIONS[mode]}
        assert others == {}, mode


@pytest.mark.parametrize(
    ("mode", "client"),
    [(mode, name) for mode, names in PREDICTIONS.items() for name in names if name != "v1"],
)
def test_each_client_predicts_what_v1_predicts(outcome: Outcome, mode: str, client: str) -> None:
    v1 = outcome.outputs["triton"]["v1"]
    assert v1.shape == (5, 3)
    error = outcome.reports[mode]["errors"].get(client)
    assert error is None, f"{client}: {error}"
    outputs = outcome.outputs[mode]
    assert np.array_equal(outputs["inputs"], outcome.outputs["triton"]["inputs"])
    assert outputs[client].dtype == v1.dtype
    assert np.array_equal(outputs[client], v1), (outputs[client], v1)
