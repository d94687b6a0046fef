"""The Open Inference Protocol through KServe's own Python clients, unmodified, against the
real server: ``InferenceRESTClient`` (protocol v2) and ``InferenceGRPCClient``.

What a KServe user does first: ask whether the server is live and ready and whether a model
is ready, then infer with FP32 tensors, by the server's default version, by a saved
version's number and by a label. Over REST inputs go as JSON and as binary data (the
binary tensor data extension), outputs as JSON and as binary; over gRPC inputs go in typed
``contents`` and in ``raw_input_contents``. The outputs must be propserve's own ``/v1``
predictions of the same rows from the same weights, bit for bit: every request here is
answered alone (one at a time), so each is the same forward pass on the same rows. An
unknown model makes both clients raise, with the model's name in the message.

KServe cannot be imported beside tritonclient (both register ``inference.*`` messages in
protobuf's default pool), so the clients run in a child process, tests/oip/kserve_check.py,
which reports what each call returned or raised as JSON; nothing here imports KServe.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

from propserve.clients import RestClient
from tests.support.server import ServerProcess, start_server

CHECK = Path(__file__).with_name("kserve_check.py")
SPEC: dict[str, Any] = {
    "input_dim": 4,
    "layers": [{"units": 8, "activation": "relu"}, {"units": 3, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
    "dtype": "float32",
    "seed": 1,
}
UNKNOWN = "no-such-model"
#: The predictions asked for: (model, model_version string) -> what /v1 is asked for the
#: same weights, and the ``model_version`` the answer names. "m1" has no ``stable`` label, so
#: its default is the live head (version ""); "s1" has one, so its default is that version.
CASES: dict[tuple[str, str], tuple[dict[str, Any], str]] = {
    ("m1", ""): ({}, ""),
    ("m1", "2"): ({"version": 2}, "2"),
    ("m1", "canary"): ({"label": "canary"}, "1"),
    ("s1", ""): ({"label": "stable"}, "1"),
}
ENCODINGS = {"rest": ("json", "binary"), "grpc": ("contents", "raw")}
#: Generous: the child process's time depends on the host, the assertions never do.
PATIENCE = 180.0


@dataclass(frozen=True)
class Run:
    """The server, what propserve's /v1 predicted for each case, and what the KServe
    clients saw."""

    server: ServerProcess
    expected: dict[tuple[str, str], NDArray[Any]]
    results: dict[str, Any]


def _rows() -> NDArray[np.float32]:
    return np.random.default_rng(7).normal(0.0, 2.0, size=(5, 4)).astype(np.float32)


def _targets(rows: int) -> NDArray[np.int64]:
    return np.arange(rows, dtype=np.int64) % 3


def _prepare(client: RestClient) -> None:
    """m1: versions 1 and 2 saved, ``canary`` on 1, the head trained past both; s1: version
    1 labelled ``stable``, the head trained past it; idle: saved, then unloaded."""
    x = _rows()
    for name in ("m1", "s1", "idle"):
        client.create_model(name, {**SPEC, "seed": len(name)})
    for _ in range(2):
        client.train_step("m1", x, _targets(len(x)))
        client.save_version("m1")
    client.train_step("m1", x, _targets(len(x)))
    client.set_label("m1", "canary", 1)
    client.train_step("s1", x, _targets(len(x)))
    client.save_version("s1")
    client.set_label("s1", "stable", 1)
    client.train_step("s1", x, _targets(len(x)))
    client.save_version("idle")


def _decode(record: dict[str, Any]) -> NDArray[Any]:
    raw = base64.b64decode(record["b64"])
    return np.frombuffer(raw, dtype=np.dtype(record["dtype"]).newbyteorder("<")).reshape(
        record["shape"]
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    process = start_server(tmp_path_factory.mktemp("oip-kserve") / "store")
    try:
        x = _rows()
        with RestClient(process.rest_url) as client:
            _prepare(client)
            expected = {
                case: client.predict(name, x, **source).outputs
                for case, (source, _) in CASES.items()
                for name in [case[0]]
            }
        unloaded = httpx.post(f"{process.rest_url}/v2/repository/models/idle/unload")
        assert unloaded.status_code == 200, unloaded.text
        plan = {
            "rest_url": process.rest_url,
            "grpc_target": process.grpc_target,
            "inputs": {"shape": list(x.shape), "b64": base64.b64encode(x.tobytes()).decode()},
            "infer": [{"model": model, "version": version} for model, version in CASES],
            "ready": ["m1", "idle"],
            "unknown": UNKNOWN,
        }
        child = subprocess.run(
            [sys.executable, str(CHECK)],
            input=json.dumps(plan),
            capture_output=True,
            text=True,
            timeout=PATIENCE,
            check=False,
        )
        assert child.returncode == 0, child.stderr
        yield Run(process, expected, json.loads(child.stdout))
    finally:
        process.stop()


def _value(outcome: dict[str, Any]) -> Any:
    assert "value" in outcome, f"the client raised: {outcome.get('raised')}"
    return outcome["value"]


def _infer(run: Run, transport: str, case: tuple[str, str], encoding: str) -> dict[str, Any]:
    model, version = case
    (found,) = [
        entry
        for entry in run.results[transport]["infer"]
        if (entry["model"], entry["version"], entry["encoding"]) == (model, version, encoding)
    ]
    value: dict[str, Any] = _value(found["outcome"])
    return value


def test_the_kserve_clients_are_not_imported_here() -> None:
    """The premise of running them in a child process: this process has tritonclient's
    ``inference.*`` messages (or may), and KServe's would collide with them."""
    assert "kserve" not in sys.modules


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_the_server_is_live_and_ready(run: Run, transport: str) -> None:
    """is_server_live and is_server_ready: over REST the client reads ``live`` and ``ready``
    from the JSON body, over gRPC from the messages."""
    assert _value(run.results[transport]["live"]) is True
    assert _value(run.results[transport]["ready"]) is True


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_loaded_model_is_ready_and_an_unloaded_one_is_not(run: Run, transport: str) -> None:
    ready = run.results[transport]["model_ready"]
    assert _value(ready["m1"]) is True
    assert _value(ready["idle"]) is False


def test_an_unknown_model_is_not_ready_over_rest(run: Run) -> None:
    """The REST client reads readiness from the status alone: the 404 is "not ready"."""
    assert _value(run.results["rest"]["model_ready"][UNKNOWN]) is False


def test_an_unknown_model_raises_not_found_over_grpc_naming_it(run: Run) -> None:
    outcome = run.results["grpc"]["model_ready"][UNKNOWN]
    assert "raised" in outcome, outcome
    assert outcome["raised"]["code"] == "NOT_FOUND"
    assert UNKNOWN in outcome["raised"]["details"]


@pytest.mark.parametrize(
    ("transport", "encoding"),
    [(transport, encoding) for transport, encodings in ENCODINGS.items() for encoding in encodings],
)
@pytest.mark.parametrize("case", list(CASES), ids=lambda case: f"{case[0]}@{case[1] or 'default'}")
def test_infer_answers_the_v1_prediction_bit_for_bit(
    run: Run, transport: str, encoding: str, case: tuple[str, str]
) -> None:
    got = _infer(run, transport, case, encoding)
    assert got["model_name"] == case[0]
    (output,) = got["outputs"]
    assert output["name"] == "outputs"
    assert output["datatype"] == "FP32"
    outputs = _decode(output)
    expected = run.expected[case]
    assert outputs.dtype == expected.dtype == np.float32
    assert outputs.shape == expected.shape == (5, 3)
    assert outputs.tobytes() == expected.astype("<f4").tobytes()


@pytest.mark.parametrize("encoding", ENCODINGS["grpc"])
@pytest.mark.parametrize("case", list(CASES), ids=lambda case: f"{case[0]}@{case[1] or 'default'}")
def test_a_grpc_answer_names_the_version_that_answered_and_echoes_the_id(
    run: Run, encoding: str, case: tuple[str, str]
) -> None:
    """``model_version`` is the saved version that answered ("" for the live head), so a
    label or the server's default is seen resolved; the step is in the parameters."""
    got = _infer(run, "grpc", case, encoding)
    assert got["model_version"] == CASES[case][1]
    assert got["id"] == f"grpc-{case[0]}-{case[1] or 'default'}-{encoding}"
    assert isinstance(got["step"], int)
    assert got["step"] >= 1


@pytest.mark.parametrize("encoding", ENCODINGS["rest"])
def test_a_rest_answer_echoes_the_id(run: Run, encoding: str) -> None:
    """The REST client keeps the answer's id (it drops ``model_version`` when it decodes)."""
    got = _infer(run, "rest", ("m1", "2"), encoding)
    assert got["id"] == f"rest-m1-2-{encoding}"


def test_infer_on_an_unknown_model_raises_over_rest_naming_it(run: Run) -> None:
    outcome = run.results["rest"]["unknown_infer"]
    assert "raised" in outcome, outcome
    assert outcome["raised"]["type"] == "httpx.HTTPStatusError"
    assert "404" in outcome["raised"]["message"]
    assert f"model '{UNKNOWN}' not found" in outcome["raised"]["message"]


def test_infer_on_an_unknown_model_raises_over_grpc_naming_it(run: Run) -> None:
    outcome = run.results["grpc"]["unknown_infer"]
    assert "raised" in outcome, outcome
    assert outcome["raised"]["code"] == "NOT_FOUND"
    assert UNKNOWN in outcome["raised"]["details"]


def test_the_server_stays_healthy(run: Run) -> None:
    assert run.server.process.poll() is None
    assert httpx.get(f"{run.server.rest_url}/v2/health/ready").json() == {"ready": True}
