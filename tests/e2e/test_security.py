"""Security end to end: bearer tokens and roles on both transports, the loopback rule, and TLS
with a certificate made in the test. Loopback only: nothing here sends traffic elsewhere."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from propserve.clients import (
    ClientError,
    GrpcClient,
    PermissionDenied,
    RestClient,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from tests.support.server import ServerProcess, serve_once, start_server
from tests.support.tls import make_certificate

TOKENS = {
    "predict": "predict-token-0123456789",
    "train": "train-token-0123456789ab",
    "admin": "admin-token-0123456789ab",
}
ROLES = ("predict", "train", "admin")
SPEC = {
    "input_dim": 3,
    "layers": [{"units": 4, "activation": "tanh"}, {"units": 2}],
    "loss": "mse",
    "optimizer": {"name": "sgd", "lr": 0.01},
    "seed": 0,
}
X = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
Y = np.random.default_rng(1).standard_normal((2, 2)).astype(np.float32)
NO_RETRY = RetryPolicy(attempts=1)

Client = GrpcClient | RestClient


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("secured")
    tokens = ";".join(f"{token}={role}" for role, token in TOKENS.items())
    process = start_server(root / "store", env={"PROPSERVE_TOKENS": tokens})
    try:
        with GrpcClient(process.grpc_target, token=TOKENS["admin"]) as admin:
            admin.create_model("m", SPEC)
            admin.train_step("m", X, Y)
            admin.save_version("m")
            admin.set_label("m", "first", 1)  # keeps version 1 through retention
        yield process
    finally:
        assert process.stop() == 0


def connect(process: ServerProcess, transport: str, token: str | None) -> Client:
    if transport == "grpc":
        return GrpcClient(process.grpc_target, token=token, timeout=10, retry=NO_RETRY)
    return RestClient(process.rest_url, token=token, timeout=10, retry=NO_RETRY)


#: Each operation with the role it needs (predict < train < admin); each call leaves the
#: server as it found it when it succeeds, so they can run in any order and role.
def _operations() -> list[tuple[str, str, Callable[[Client], Any]]]:
    return [
        ("ListModels", "predict", lambda c: c.list_models()),
        ("GetModel", "predict", lambda c: c.get_model("m")),
        ("ListVersions", "predict", lambda c: c.list_versions("m")),
        ("Predict", "predict", lambda c: c.predict("m", X)),
        ("PredictVersion", "predict", lambda c: c.predict("m", X, version=1)),
        ("TrainStep", "train", lambda c: c.train_step("m", X, Y, learning_rate=0.0)),
        ("Train", "train", lambda c: c.train("m", [(X, Y)], learning_rate=0.0)),
        ("SaveVersion", "train", lambda c: c.save_version("m")),
        ("SetLabel", "admin", lambda c: c.set_label("m", "stable", 1)),
        ("RemoveLabel", "admin", lambda c: (c.set_label("m", "x", 1), c.remove_label("m", "x"))),
        ("UpdateModel", "admin", lambda c: c.update_model("m", retain=50)),
        ("Rollback", "admin", lambda c: c.rollback("m", version=1)),
        ("CreateDelete", "admin", lambda c: (c.create_model("tmp", SPEC), c.delete_model("tmp"))),
    ]


OPERATIONS = _operations()


@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.parametrize("token", [None, "not-a-known-token-at-all"], ids=["missing", "unknown"])
@pytest.mark.parametrize("operation", OPERATIONS, ids=[op[0] for op in OPERATIONS])
def test_missing_or_unknown_token_is_unauthenticated(
    secured: ServerProcess,
    transport: str,
    token: str | None,
    operation: tuple[str, str, Callable[[Client], Any]],
) -> None:
    with (
        connect(secured, transport, token) as client,
        pytest.raises(Unauthenticated, match="token"),
    ):
        operation[2](client)


@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.parametrize("role", ROLES)
def test_roles_are_ordered_predict_train_admin(
    secured: ServerProcess, transport: str, role: str
) -> None:
    with connect(secured, transport, TOKENS[role]) as client:
        for name, needed, call in OPERATIONS:
            before = client.get_model("m")
            if ROLES.index(role) >= ROLES.index(needed):
                call(client)  # allowed: it must not raise
                continue
            with pytest.raises(PermissionDenied, match=f"needs the role '{needed}'"):
                call(client)
            # A refused call changed nothing.
            after = client.get_model("m")
            assert (after.head_step, after.latest_version, after.labels, after.settings) == (
                before.head_step,
                before.latest_version,
                before.labels,
                before.settings,
            ), name


@pytest.mark.parametrize("token", [None, "not-a-known-token-at-all"])
def test_health_stays_open(secured: ServerProcess, token: str | None) -> None:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=secured.rest_url, headers=headers, timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        assert http.get("/v1/models").status_code == 401  # while the API is closed
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(secured.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=metadata)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


# -- the loopback rule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [{"PROPSERVE_REST_HOST": "0.0.0.0"}, {"PROPSERVE_GRPC_HOST": "0.0.0.0"}],
    ids=["rest", "grpc"],
)
def test_refuses_to_listen_beyond_loopback_without_tokens(
    tmp_path: Path, env: dict[str, str]
) -> None:
    done = serve_once(tmp_path, env)
    assert done.returncode != 0
    assert "beyond loopback" in done.stderr and "--insecure" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    # It stopped before doing anything: no store opened, never ready.
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "ready.json").exists()


def test_refuses_short_tokens(tmp_path: Path) -> None:
    done = serve_once(tmp_path, {"PROPSERVE_TOKENS": "short=admin"})
    assert done.returncode != 0
    assert "16 characters" in done.stderr, done.stderr
    assert not (tmp_path / "ready.json").exists()


def test_starts_beyond_loopback_with_insecure(tmp_path: Path) -> None:
    """Started and stopped at once: no traffic is sent to it."""
    process = start_server(
        tmp_path / "store", env={"PROPSERVE_REST_HOST": "0.0.0.0"}, args=["--insecure"]
    )
    assert process.stop() == 0
    assert process.rest_port > 0
    assert "server.ready" in process.log()


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(root)
    process = start_server(
        root / "store", env={"PROPSERVE_TLS_CERT": str(cert), "PROPSERVE_TLS_KEY": str(key)}
    )
    try:
        yield process, cert
    finally:
        assert process.stop() == 0


def test_tls_grpc(tls: tuple[ServerProcess, Path]) -> None:
    process, cert = tls
    with GrpcClient(process.grpc_target, root_certificates=cert, timeout=10) as client:
        client.create_model("tls-grpc", SPEC)
        trained = client.train("tls-grpc", [(X, Y)])
        assert client.get_model("tls-grpc").head_step == trained[-1].step == 1
        assert client.predict("tls-grpc", X).outputs.shape == (2, 2)
    # REST serves the same certificate (checked with httpx itself).
    url = f"https://127.0.0.1:{process.rest_port}"
    with httpx.Client(verify=ssl.create_default_context(cafile=cert), timeout=10) as http:
        assert http.get(f"{url}/healthz").status_code == 200
        assert http.get(f"{url}/v1/models/tls-grpc").json()["head_step"] == 1


def test_tls_rest(tls: tuple[ServerProcess, Path]) -> None:
    process, cert = tls
    url = f"https://127.0.0.1:{process.rest_port}"
    with RestClient(url, root_certificates=cert, timeout=10) as client:
        client.create_model("tls-rest", SPEC)
        trained = client.train("tls-rest", [(X, Y)])
        assert client.get_model("tls-rest").head_step == trained[-1].step == 1
        over_rest = client.predict("tls-rest", X)
    with GrpcClient(process.grpc_target, root_certificates=cert, timeout=10) as client:
        assert np.array_equal(client.predict("tls-rest", X).outputs, over_rest.outputs)


@pytest.mark.parametrize(
    "make",
    [
        lambda p, c: GrpcClient(p.grpc_target, timeout=5, retry=NO_RETRY),
        lambda p, c: RestClient(p.rest_url, timeout=5, retry=NO_RETRY),
        lambda p, c: GrpcClient(p.grpc_target, tls=True, timeout=5, retry=NO_RETRY),
        lambda p, c: RestClient(f"https://127.0.0.1:{p.rest_port}", timeout=5, retry=NO_RETRY),
    ],
    ids=["plain-grpc", "plain-rest", "grpc-untrusted-cert", "rest-untrusted-cert"],
)
def test_tls_refuses_plain_text_and_untrusted_clients(
    tls: tuple[ServerProcess, Path], make: Callable[[ServerProcess, Path], Client]
) -> None:
    process, cert = tls
    with make(process, cert) as client, pytest.raises(Unavailable) as caught:
        client.list_models()
    assert isinstance(caught.value, ClientError)
