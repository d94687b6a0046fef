"""Start-up refusals: what an operator gets wrong (a store path that is a file, a port in use,
TLS files that are missing or do not match, a setting out of range) ends ``propserve serve``
with one clear line and exit status 1 (2 for a setting), never a traceback, and never a ready
file. A misspelt variable is not an error, but it is logged."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import serve_once, start_server
from tests.support.tls import make_certificate


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket listens on."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield holder.getsockname()[1]


def refused(tmp_path: Path, env: dict[str, str], status: int = 1) -> str:
    done = serve_once(tmp_path, env)
    assert done.returncode == status, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "ready.json").exists()
    # Every refusal here comes before the store is opened: nothing was created.
    assert not (tmp_path / "store").exists()
    lines = [line for line in done.stderr.splitlines() if line.startswith("propserve: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def refused_tls(tmp_path: Path, certificate: Path, key: Path) -> str:
    return refused(
        tmp_path, {"PROPSERVE_TLS_CERT": str(certificate), "PROPSERVE_TLS_KEY": str(key)}
    )


def test_a_store_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "models"
    path.write_text("not a store")
    line = refused(tmp_path, {"PROPSERVE_STORE": str(path)})
    assert line == f"propserve: cannot open the model store at {path}: it is not a folder"
    assert path.read_text() == "not a store"


def test_a_rest_port_in_use(tmp_path: Path, taken_port: int) -> None:
    line = refused(tmp_path, {"PROPSERVE_REST_PORT": str(taken_port)})
    assert f"cannot listen for REST on 127.0.0.1:{taken_port}" in line
    assert "in use" in line


def test_a_grpc_port_in_use(tmp_path: Path, taken_port: int) -> None:
    line = refused(tmp_path, {"PROPSERVE_GRPC_PORT": str(taken_port)})
    assert f"cannot listen for gRPC on 127.0.0.1:{taken_port}" in line
    assert "in use or not available" in line


def test_missing_tls_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    line = refused_tls(tmp_path, missing, missing)
    assert f"cannot read the TLS certificate {missing}" in line
    assert "No such file or directory" in line


def test_tls_files_that_are_not_pem(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    line = refused_tls(tmp_path, junk, junk)
    assert "not a PEM certificate chain and its private key" in line


def test_a_tls_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    certificate, _ = make_certificate(tmp_path / "one")
    _, other_key = make_certificate(tmp_path / "two")
    line = refused_tls(tmp_path, certificate, other_key)
    assert f"cannot use the TLS certificate {certificate} with the key {other_key}" in line
    assert "KEY_VALUES_MISMATCH" in line


def test_a_setting_out_of_range(tmp_path: Path) -> None:
    line = refused(tmp_path, {"PROPSERVE_REST_PORT": "70000"}, status=2)
    assert line.startswith("propserve: invalid setting: rest_port (PROPSERVE_REST_PORT): ")
    assert "(got '70000')" in line  # as the environment spells it


def test_a_misspelt_variable_is_logged(tmp_path: Path) -> None:
    server = start_server(tmp_path / "store", env={"PROPSERVE_GRACE_SECNODS": "3"})
    assert server.stop() == 0
    warnings = [
        json.loads(line)
        for line in server.log().splitlines()
        if '"config.unknown_variable"' in line
    ]
    assert [w["variable"] for w in warnings] == ["PROPSERVE_GRACE_SECNODS"]
    assert warnings[0]["level"] == "warning"
