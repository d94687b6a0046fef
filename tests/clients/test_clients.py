"""The four clients (gRPC and REST, blocking and asyncio) against a real server: every method
works, all of them return identical results, errors are the clients' own, predict retries on
Unavailable and training never does."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

from propserve.clients import (
    AlreadyExists,
    AsyncGrpcClient,
    AsyncRestClient,
    ClientError,
    DeadlineExceeded,
    FailedPrecondition,
    GrpcClient,
    InvalidArgument,
    Model,
    NotFound,
    Prediction,
    RestClient,
    RetryPolicy,
    Unavailable,
    Version,
)
from propserve.engine import ModelSpec, Network
from tests.clients.helpers import KINDS, SPECS, WAIT, batches_for, connect, free_port
from tests.support.server import ServerProcess, start_server


@dataclass(frozen=True)
class CountingRetry(RetryPolicy):
    """A RetryPolicy that records each wait between attempts (and may act on it)."""

    waits: list[int] = field(default_factory=list)
    on_wait: Callable[[int], None] | None = None

    def delay(self, attempt: int, error: ClientError | None = None) -> float:
        self.waits.append(attempt)
        if self.on_wait is not None:
            self.on_wait(attempt)
        return super().delay(attempt, error)


# -- one scenario, four clients, identical results -----------------------------------------


def _when(created_at: float) -> float:
    """A creation time as 0.0 when it is recent (seconds since the epoch, within the last
    hour: each transcript creates its own model), else as it is, to fail the comparison."""
    fresh = isinstance(created_at, float) and 0 <= time.time() - created_at < 3600
    return 0.0 if fresh else created_at


def _plain(value: Any) -> Any:
    """A comparable form of a client result: the model's name blanked, recent creation times
    as 0.0, arrays as bytes."""
    if isinstance(value, Prediction):
        out = value.outputs
        return ("prediction", out.dtype.str, out.shape, out.tobytes(), value.version, value.step)
    if isinstance(value, Model):
        return replace(value, name="<model>", created_at=_when(value.created_at))
    if isinstance(value, Version):
        return replace(value, model="<model>", created_at=_when(value.created_at))
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def scenario(client: Any, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Every method once (and a few twice), in an order that exercises each; the transcript."""
    batches = batches_for(spec, 7, seed=5)
    x = batches[0][0]
    t: dict[str, Any] = {}
    t["create"] = client.create_model(name, spec, retain=3, autosave_every=4)
    t["get"] = client.get_model(name)
    t["predict_fresh"] = client.predict(name, x)
    t["train_step"] = client.train_step(name, *batches[0])
    t["train"] = client.train(name, batches[1:6])
    t["train_step_lr"] = client.train_step(name, *batches[6], learning_rate=0.001)
    t["predict_head"] = client.predict(name, x)
    t["predict_f64_input"] = client.predict(name, x.astype(np.float64))
    t["save"] = client.save_version(name)
    t["predict_v1"] = client.predict(name, x, version=1)
    t["set_label"] = client.set_label(name, "stable", 1)
    t["predict_label"] = client.predict(name, x, label="stable")
    t["versions"] = client.list_versions(name)
    t["remove_label"] = client.remove_label(name, "stable")
    t["update"] = client.update_model(name, retain=2, autosave_every=0)
    t["rollback"] = client.rollback(name, version=1)
    t["predict_rolled_back"] = client.predict(name, x)
    t["listed"] = [m for m in client.list_models() if m.name == name]
    t["delete"] = client.delete_model(name)
    with pytest.raises(NotFound):
        client.get_model(name)
    return {key: _plain(value) for key, value in t.items()}


_transcripts: dict[tuple[str, str], dict[str, Any]] = {}


def transcript(server: ServerProcess, kind: str, spec_id: str) -> dict[str, Any]:
    key = (kind, spec_id)
    if key not in _transcripts:
        with connect(kind, server) as client:
            _transcripts[key] = scenario(client, f"scenario-{kind}-{spec_id}", SPECS[spec_id])
    return _transcripts[key]


@pytest.mark.parametrize("spec_id", list(SPECS))
@pytest.mark.parametrize("kind", [*KINDS, "rest-json"])
def test_every_method_gives_identical_results_on_every_client(
    server: ServerProcess, kind: str, spec_id: str
) -> None:
    spec = SPECS[spec_id]
    got = transcript(server, kind, spec_id)
    want = transcript(server, "grpc", spec_id)
    for key in want:
        assert got[key] == want[key], f"{kind} differs from grpc at {key}"

    # And the gRPC transcript itself is right (so the four agree on the right answers).
    batches = batches_for(spec, 7, seed=5)
    net = Network(ModelSpec.from_dict(spec))
    expected_losses = [net.train_step(bx, by).loss for bx, by in batches[:6]]
    steps = [got["train_step"], *got["train"]]
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]
    assert [s.loss for s in steps] == expected_losses
    assert [s.saved_version for s in steps] == [None, None, None, 1, None, None]
    assert all((s.accuracy is None) == (spec["loss"] == "mse") for s in steps)
    net.train_step(*batches[6], lr=0.001)
    dtype = np.dtype(spec.get("dtype", "float32"))
    kind_, dt, shape, raw, version, step = got["predict_head"]
    assert (kind_, dt, version, step) == ("prediction", dtype.str, None, 7)
    assert shape == (6, spec["layers"][-1]["units"])
    assert raw == net.forward(batches[0][0]).tobytes()
    assert got["predict_f64_input"] == got["predict_head"]
    assert got["predict_v1"][4:] == (1, 4) and got["predict_label"] == got["predict_v1"]
    assert got["save"].version == 2 and got["save"].step == 7 and got["save"].parent == 1
    assert [v.version for v in got["versions"]] == [1, 2]
    assert got["versions"][0].labels == ("stable",)
    assert got["set_label"].labels == {"stable": 1} and got["remove_label"].labels == {}
    assert got["update"].settings == {"retain": 2, "autosave_every": 0}
    assert (got["rollback"].head_step, got["rollback"].unsaved_steps) == (4, 0)
    assert got["predict_rolled_back"][3:] == (got["predict_v1"][3], None, 4)
    assert got["listed"] == [got["rollback"]] and got["delete"] is None


# -- errors -------------------------------------------------------------------------------


ERROR_CASES: list[tuple[str, type[ClientError], str, Callable[[Any], Any]]] = [
    ("unknown model", NotFound, "model 'nope' not found", lambda c: c.get_model("nope")),
    ("predict unknown", NotFound, "'nope'", lambda c: c.predict("nope", np.ones((1, 5)))),
    ("unknown version", NotFound, "99", lambda c: c.predict("errs", np.ones((1, 5)), version=99)),
    (
        "unknown label",
        NotFound,
        "'gone'",
        lambda c: c.predict("errs", np.ones((1, 5)), label="gone"),
    ),
    ("exists", AlreadyExists, "errs", lambda c: c.create_model("errs", SPECS["f64-mse-sgd"])),
    ("bad spec", InvalidArgument, "spec", lambda c: c.create_model("bad", {"input_dim": -1})),
    (
        "bad name",
        InvalidArgument,
        "name",
        lambda c: c.create_model("Bad Name!", SPECS["f64-mse-sgd"]),
    ),
    ("wrong width", InvalidArgument, "", lambda c: c.predict("errs", np.ones((2, 4)))),
    ("nan input", InvalidArgument, "", lambda c: c.predict("errs", np.full((1, 5), np.nan))),
    (
        "diverging step",
        FailedPrecondition,
        "refused",
        lambda c: c.train_step("errs", np.ones((2, 5)), np.ones((2, 2)), learning_rate=1e300),
    ),
]


@pytest.fixture(scope="module")
def errs_model(server: ServerProcess) -> str:
    with GrpcClient(server.grpc_target) as client:
        client.create_model("errs", SPECS["f64-mse-sgd"])
        client.train_step("errs", np.ones((2, 5)), np.zeros((2, 2)))
    return "errs"


@pytest.mark.parametrize("kind", KINDS)
def test_errors_are_the_clients_own_with_the_servers_message(
    server: ServerProcess, errs_model: str, kind: str
) -> None:
    with connect(kind, server) as client:
        before = client.get_model(errs_model)
        probe = np.linspace(-1, 1, 5).reshape(1, 5)
        outputs = client.predict(errs_model, probe).outputs
        for what, error, message, call in ERROR_CASES:
            with pytest.raises(ClientError) as caught:
                call(client)
            exc = caught.value
            assert type(exc) is error, f"{what}: {exc!r}"
            assert not isinstance(exc, grpc.RpcError | httpx.HTTPError)
            # No transport exception rides along either.
            assert exc.__cause__ is None, what
            assert exc.__context__ is None or exc.__suppress_context__, what
            assert message in exc.message and exc.message == str(exc), f"{what}: {exc.message!r}"
            # The server answered (a transport status): the REST client sends tensors as
            # their bytes (base64), NaN included, and the server refuses them.
            assert exc.status is not None, what
        # Nothing bad changed the model.
        after = client.get_model(errs_model)
        assert after == before
        assert np.array_equal(client.predict(errs_model, probe).outputs, outputs)


def test_both_transports_carry_the_same_server_messages(
    server: ServerProcess, errs_model: str
) -> None:
    messages: dict[str, dict[str, str]] = {}
    for kind in ("grpc", "rest"):
        with connect(kind, server) as client:
            messages[kind] = {}
            for what, _, _, call in ERROR_CASES:
                with pytest.raises(ClientError) as caught:
                    call(client)
                messages[kind][what] = caught.value.message
    assert "non-finite" in messages["grpc"]["nan input"]
    assert messages["grpc"] == messages["rest"]


def test_the_json_encoding_refuses_what_json_cannot_carry(server: ServerProcess) -> None:
    with RestClient(server.rest_url, tensor_encoding="json") as client:
        with pytest.raises(InvalidArgument, match="JSON cannot carry") as caught:
            client.predict("errs", np.full((1, 5), np.nan))
        assert caught.value.status is None  # refused before sending


def test_tensor_encodings_are_checked_and_unsigned_values_must_fit(
    server: ServerProcess, errs_model: str
) -> None:
    with pytest.raises(ValueError, match="tensor_encoding must be one of base64, json"):
        RestClient(server.rest_url, tensor_encoding="protobuf")
    with RestClient(server.rest_url) as client:
        huge = np.array([[2**63, 0, 0, 0, 0]], dtype=np.uint64)
        with pytest.raises(InvalidArgument, match="out of the range of int64") as caught:
            client.predict(errs_model, huge)
        assert caught.value.status is None  # refused before sending


@pytest.mark.parametrize("kind", KINDS)
def test_a_server_that_is_down_is_unavailable(kind: str) -> None:
    down = (f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    retry = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02)
    with connect(kind, down, retry=retry, timeout=5) as client:
        for call in (
            client.list_models,
            lambda: client.predict("m", np.ones((1, 2))),
            lambda: client.train("m", [(np.ones((1, 2)), np.ones((1, 1)))]),
        ):
            with pytest.raises(Unavailable) as caught:
                call()
            assert not isinstance(caught.value, grpc.RpcError | httpx.HTTPError)


@pytest.mark.parametrize("kind", KINDS)
def test_predict_retries_with_backoff_and_training_never_does(kind: str) -> None:
    down = (f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    retry = CountingRetry(attempts=4, base_delay=0.01, max_delay=0.02)
    x, y = np.ones((1, 2)), np.ones((1, 1))
    with connect(kind, down, retry=retry, timeout=5) as client:
        not_idempotent: list[Callable[[], Any]] = [
            lambda: client.train_step("m", x, y),
            lambda: client.train("m", [(x, y)]),
            lambda: client.create_model("m", SPECS["f64-mse-sgd"]),
            lambda: client.save_version("m"),
            lambda: client.rollback("m", version=1),
        ]
        for call in not_idempotent:
            with pytest.raises(Unavailable):
                call()
        assert retry.waits == [], "a non-idempotent call was retried"
        with pytest.raises(Unavailable):
            client.predict("m", x)
        assert retry.waits == [0, 1, 2], "predict did not retry 4 attempts with backoff"
        assert [retry.delay(k) <= 0.03 for k in range(3)] == [True] * 3


@pytest.mark.parametrize("kind", ["grpc", "rest"])
def test_predict_rides_out_a_restart(tmp_path: Path, kind: str) -> None:
    """The server goes down; predict fails, waits and retries; the server comes back on the
    same ports (restarted during the first wait, before the retry: nothing here races the
    clock), and predict answers as before."""
    spec = SPECS["f64-mse-sgd"]
    store = tmp_path / "store"
    process = start_server(store)
    ports = {
        "PROPSERVE_REST_PORT": str(process.rest_port),
        "PROPSERVE_GRPC_PORT": str(process.grpc_port),
    }
    x = np.linspace(-1, 1, 10).reshape(2, 5)
    try:
        with GrpcClient(process.grpc_target) as admin:
            admin.create_model("back", spec)
            admin.train_step("back", *batches_for(spec, 1, seed=3)[0])
            before = admin.predict("back", x)
    finally:
        assert process.stop() == 0  # saves the head

    restarted: list[ServerProcess] = []

    def restart(attempt: int) -> None:
        if attempt == 0:
            restarted.append(start_server(store, env=ports))

    # NOTE: after a failed connection a gRPC channel waits out its own reconnect backoff
    # (about a second) and fails calls fast meanwhile; the attempts leave it ample room.
    retry = CountingRetry(attempts=60, base_delay=0.05, max_delay=0.5, on_wait=restart)
    target = (f"127.0.0.1:{process.grpc_port}", f"http://127.0.0.1:{process.rest_port}")
    try:
        with connect(kind, target, retry=retry, timeout=5) as client:
            after = client.predict("back", x)
    finally:
        for p in restarted:
            assert p.stop() == 0
    assert len(restarted) == 1 and len(retry.waits) >= 1
    assert (after.step, after.version) == (before.step, before.version)
    assert np.array_equal(after.outputs, before.outputs)  # both answered alone


@pytest.fixture
def silent() -> Iterator[tuple[str, str]]:
    """An address that takes connections and never answers: the kernel completes them into
    the listen backlog, and nothing reads. Every call to it times out, however fast the
    machine."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("kind", KINDS)
def test_timeouts_are_deadline_exceeded_and_not_retried(silent: tuple[str, str], kind: str) -> None:
    retry = CountingRetry(attempts=3, base_delay=0.01)
    with connect(kind, silent, timeout=0.2, retry=retry) as client:
        for call in (lambda: client.predict("m", np.ones((1, 5))), client.list_models):
            with pytest.raises(DeadlineExceeded) as caught:
                call()
            assert not isinstance(caught.value, grpc.RpcError | httpx.HTTPError)
    assert retry.waits == [], "a deadline is not retried"


# -- progress and context managers ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_progress_shows_loss_and_samples_per_second(
    server: ServerProcess, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = SPECS["f32-softmax-adam"]
    name = f"progress-{kind}"
    batches = batches_for(spec, 3, seed=8)
    with connect(kind, server) as client:
        client.create_model(name, spec)
        capsys.readouterr()
        results = client.train(name, batches, progress=True, total=3)
    err = capsys.readouterr().err
    final = err.rsplit("\r", 1)[-1]
    assert final.endswith("\n")
    assert "3/3" in final and "step 3" in final
    assert f"loss {results[-1].loss:.4f}" in final
    assert f"acc {results[-1].accuracy:.4f}" in final
    assert "samples/s" in final
    with connect(kind, server) as client:  # no progress unless asked
        capsys.readouterr()
        client.train(name, batches[:1])
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kind", ["grpc", "rest"])
def test_context_managers_close(server: ServerProcess, kind: str) -> None:
    with connect(kind, server) as client:
        assert isinstance(client.list_models(), list)
    with pytest.raises((ClientError, ValueError, RuntimeError)):
        client.list_models()


@pytest.mark.parametrize("make", [AsyncGrpcClient, AsyncRestClient])
def test_async_context_managers_close(server: ServerProcess, make: type[Any]) -> None:
    address = server.grpc_target if make is AsyncGrpcClient else server.rest_url

    async def run() -> Any:
        async with make(address, timeout=WAIT) as client:
            listed = await client.list_models()
        return client, listed

    async def after(client: Any) -> Any:
        return await client.list_models()

    client, listed = asyncio.run(run())
    assert isinstance(listed, list)
    try:
        asyncio.run(after(client))
    except Exception:  # any refusal will do: the channel or pool is closed
        pass
    else:
        pytest.fail("the client still works after its context closed")


def test_async_clients_run_concurrently(server: ServerProcess) -> None:
    """The asyncio clients' point: many calls in flight on one loop, each answered right."""
    spec = SPECS["f32-softmax-adam"]
    rows = [np.random.default_rng(i).standard_normal((1, 5)).astype(np.float32) for i in range(16)]

    async def run() -> list[Prediction]:
        async with (
            AsyncGrpcClient(server.grpc_target, timeout=WAIT) as g,
            AsyncRestClient(server.rest_url, timeout=WAIT) as r,
        ):
            await g.create_model("concurrent", spec)
            calls: list[Coroutine[Any, Any, Prediction]] = [
                (g if i % 2 else r).predict("concurrent", x) for i, x in enumerate(rows)
            ]
            return list(await asyncio.gather(*calls))

    predictions = asyncio.run(run())
    net = Network(ModelSpec.from_dict(spec))
    for x, p in zip(rows, predictions, strict=True):
        # Concurrent requests may have shared forward passes (the server batches them):
        # close to the row's pass alone, not necessarily the same bits.
        assert_close_to_alone(p.outputs, net.forward(x))
    # The bound covers what batching can do: all 16 rows in one pass, against each alone.
    batched = net.forward(np.vstack(rows))
    assert_close_to_alone(batched, np.vstack([net.forward(x) for x in rows]))


#: How far a prediction from a shared (batched) forward pass may be from the same row's pass
#: alone. A matrix-product kernel chosen for another batch size may sum a row's n products
#: in another order; in float32 (unit roundoff u = 2**-24, about 6e-8) that moves a dot
#: product by at most about 2·n·u times the sum of its terms' magnitudes: a few ulp for
#: n <= 12 here, in each of the two layers, and softmax turns the logits' small absolute
#: errors into relative errors of the same size. That is a few 1e-6 relative at most; 1e-5
#: leaves room, and a wrong answer (another row's, other weights) is off by far more.
RTOL_SHARED_PASS = 1e-5


def assert_close_to_alone(shared: NDArray[Any], alone: NDArray[Any]) -> None:
    """Outputs from a pass that may have been shared, against the row's pass alone. Bits
    are equal only for a request answered alone (README: Batching), which a concurrent
    request cannot count on."""
    assert shared.dtype == alone.dtype and shared.shape == alone.shape
    np.testing.assert_allclose(shared, alone, rtol=RTOL_SHARED_PASS, atol=0)


def test_the_shared_pass_tolerance_takes_rounding_and_refuses_a_wrong_answer() -> None:
    """What the assertion above accepts: the last-bit differences a shared pass can make
    (np.array_equal, used before, failed on them), and nothing like a wrong answer."""
    alone = np.array([[0.2, 0.3, 0.5], [1e-4, 0.4999, 0.5]], np.float32)
    for ulps in (1, 4, 16):
        rounded = alone.copy()
        for _ in range(ulps):
            rounded = np.nextafter(rounded, np.float32(1))
        assert not np.array_equal(rounded, alone)
        assert_close_to_alone(rounded, alone)
    with pytest.raises(AssertionError):
        assert_close_to_alone(alone * np.float32(1.001), alone)
    with pytest.raises(AssertionError):
        assert_close_to_alone(alone[::-1], alone)
