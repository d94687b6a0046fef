"""The Open Inference Protocol through tritonclient, unmodified, over both transports, against
the real server: health, metadata, inference (binary and JSON tensors, by version, by label
and by the server's policy), the model-repository extension, auth and errors.

Outputs are compared with propserve's own ``/v1`` predictions of the same rows: bit for bit,
since every request here is answered alone (one request at a time, so no forward pass is
shared) by the same forward pass on the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from propserve.clients import RestClient
from propserve.oip import open_inference_pb2
from tests.support.server import ServerProcess, start_server

ADMIN = "oip-admin-token-0123456789"
READER = "oip-predict-token-0123456789"
ENV = {"PROPSERVE_TOKENS": f"{ADMIN}=admin;{READER}=predict"}


def as_admin() -> dict[str, str]:
    # A new dict per call: tritonclient.http writes its own headers into the one it is given.
    return {"authorization": f"Bearer {ADMIN}"}


def as_reader() -> dict[str, str]:
    return {"authorization": f"Bearer {READER}"}


SPEC: dict[str, Any] = {
    "input_dim": 4,
    "layers": [{"units": 8, "activation": "relu"}, {"units": 3, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.1},
    "dtype": "float32",
    "seed": 7,
}
ROWS = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
TARGETS = np.array([0, 1, 2, 1, 0])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("oip-triton") / "store", env=ENV)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[RestClient]:
    with RestClient(server.rest_url, token=ADMIN) as client:
        yield client


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(f"127.0.0.1:{server.rest_port}")


@pytest.fixture(scope="module")
def grpc(server: ServerProcess) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(server.grpc_target)


@pytest.fixture(scope="module")
def model(admin: RestClient) -> str:
    """A model with versions 1 (untrained) and 2 (one step), 'canary' naming 1, and a head
    one step past version 2; no 'stable' label yet."""
    admin.create_model("iris", SPEC)
    admin.save_version("iris")
    admin.train_step("iris", ROWS, TARGETS)
    admin.save_version("iris")
    admin.train_step("iris", ROWS, TARGETS)
    admin.set_label("iris", "canary", 1)
    return "iris"


def http_input(x: np.ndarray, *, binary: bool = True) -> triton_http.InferInput:
    tensor = triton_http.InferInput(
        "inputs", list(x.shape), "FP32" if x.dtype == np.float32 else "FP64"
    )
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def grpc_input(x: np.ndarray) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("inputs", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


# -- health and metadata: open to anyone -----------------------------------------------------


def test_health_over_both_transports(
    http: triton_http.InferenceServerClient, grpc: triton_grpc.InferenceServerClient, model: str
) -> None:
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert http.is_model_ready(model) and grpc.is_model_ready(model)
    assert http.is_model_ready(model, "2") and grpc.is_model_ready(model, "canary")


def test_health_answers_in_the_body_too(server: ServerProcess, model: str) -> None:
    base = f"{server.rest_url}/v2"
    assert httpx.get(f"{base}/health/live").json() == {"live": True}
    assert httpx.get(f"{base}/health/ready").json() == {"ready": True}
    ready = httpx.get(f"{base}/models/{model}/ready")
    assert (ready.status_code, ready.json()) == (200, {"name": model, "ready": True})


def test_an_unknown_model_or_version_is_not_found(
    http: triton_http.InferenceServerClient, grpc: triton_grpc.InferenceServerClient, model: str
) -> None:
    assert not http.is_model_ready("ghost")
    assert not http.is_model_ready(model, "9")
    with pytest.raises(InferenceServerException) as raised:
        grpc.is_model_ready("ghost")
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as raised:
        http.get_model_metadata(model, "no-such-label")
    assert "no-such-label" in raised.value.message()


def test_server_metadata(
    http: triton_http.InferenceServerClient, grpc: triton_grpc.InferenceServerClient
) -> None:
    rest = http.get_server_metadata()
    assert rest["name"] == "propserve"
    assert set(rest["extensions"]) == {"binary_tensor_data", "model_repository"}
    assert list(grpc.get_server_metadata().extensions) == rest["extensions"]


def test_model_metadata(
    http: triton_http.InferenceServerClient, grpc: triton_grpc.InferenceServerClient, model: str
) -> None:
    rest = http.get_model_metadata(model)
    assert rest["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 4]}]
    assert rest["outputs"] == [{"name": "outputs", "datatype": "FP32", "shape": [-1, 3]}]
    assert rest["versions"] == ["1", "2"]
    assert rest["properties"]["label.canary"] == "1"
    assert rest["properties"]["step"] == "2"
    over_grpc = grpc.get_model_metadata(model)
    assert list(over_grpc.versions) == ["1", "2"]
    assert [list(t.shape) for t in over_grpc.inputs] == [[-1, 4]]
    # tritonclient's message has no properties field (the protocol's has): its bytes still
    # carry them, as the protocol's message reads them.
    ours = open_inference_pb2.ModelMetadataResponse.FromString(over_grpc.SerializeToString())
    assert dict(ours.properties) == rest["properties"]


# -- inference -----------------------------------------------------------------------------


def test_infer_matches_v1_bit_for_bit_over_every_encoding(
    http: triton_http.InferenceServerClient,
    grpc: triton_grpc.InferenceServerClient,
    admin: RestClient,
    model: str,
) -> None:
    expected = admin.predict(model, ROWS).outputs
    binary = http.infer(model, [http_input(ROWS)], headers=as_reader())
    as_json = http.infer(
        model,
        [http_input(ROWS, binary=False)],
        outputs=[triton_http.InferRequestedOutput("outputs", binary_data=False)],
        headers=as_reader(),
    )
    over_grpc = grpc.infer(model, [grpc_input(ROWS)], headers=as_reader())
    for result in (binary, as_json, over_grpc):
        out = result.as_numpy("outputs")
        assert out.dtype == np.float32 and np.array_equal(out, expected)
    # The live head answered (no 'stable' label): no saved version, the head's step.
    response = binary.get_response()
    assert response["model_version"] == "" and response["parameters"]["step"] == 2
    assert over_grpc.get_response().parameters["step"].int64_param == 2


def test_infer_by_version_and_by_label(
    http: triton_http.InferenceServerClient,
    grpc: triton_grpc.InferenceServerClient,
    admin: RestClient,
    model: str,
) -> None:
    for model_version, version in [("2", 2), ("canary", 1), ("1", 1)]:
        expected = admin.predict(model, ROWS, version=version)
        result = http.infer(
            model, [http_input(ROWS)], model_version=model_version, headers=as_reader()
        )
        assert np.array_equal(result.as_numpy("outputs"), expected.outputs)
        assert result.get_response()["model_version"] == str(version)
        result = grpc.infer(
            model, [grpc_input(ROWS)], model_version=model_version, headers=as_reader()
        )
        assert np.array_equal(result.as_numpy("outputs"), expected.outputs)
        assert result.get_response().model_version == str(version)


def test_the_stable_label_answers_when_no_version_is_named(
    http: triton_http.InferenceServerClient,
    grpc: triton_grpc.InferenceServerClient,
    admin: RestClient,
) -> None:
    admin.create_model("policy", SPEC)
    admin.save_version("policy")
    admin.train_step("policy", ROWS, TARGETS)
    head = admin.predict("policy", ROWS)
    result = grpc.infer("policy", [grpc_input(ROWS)], headers=as_reader())
    assert np.array_equal(result.as_numpy("outputs"), head.outputs)  # the head, before
    admin.set_label("policy", "stable", 1)
    stable = admin.predict("policy", ROWS, version=1)
    assert not np.array_equal(stable.outputs, head.outputs)
    for result in (
        http.infer("policy", [http_input(ROWS)], headers=as_reader()),
        grpc.infer("policy", [grpc_input(ROWS)], headers=as_reader()),
    ):
        assert np.array_equal(result.as_numpy("outputs"), stable.outputs)


def test_float64_inputs_to_a_float32_model(
    http: triton_http.InferenceServerClient, admin: RestClient, model: str
) -> None:
    x = ROWS.astype(np.float64) / 3
    expected = admin.predict(model, x).outputs
    result = http.infer(model, [http_input(x)], headers=as_reader())
    assert np.array_equal(result.as_numpy("outputs"), expected)


def test_the_request_id_is_echoed(
    http: triton_http.InferenceServerClient, grpc: triton_grpc.InferenceServerClient, model: str
) -> None:
    rest = http.infer(model, [http_input(ROWS)], request_id="req-7", headers=as_reader())
    assert rest.get_response()["id"] == "req-7"
    over_grpc = grpc.infer(model, [grpc_input(ROWS)], request_id="req-8", headers=as_reader())
    assert over_grpc.get_response().id == "req-8"


# -- bad requests ----------------------------------------------------------------------------


def _refused(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_bad_inference_requests_are_refused_with_the_reason(
    http: triton_http.InferenceServerClient,
    grpc: triton_grpc.InferenceServerClient,
    model: str,
    transport: str,
) -> None:
    client: Any = http if transport == "http" else grpc
    module: Any = triton_http if transport == "http" else triton_grpc
    status = {
        "http": {400: "400", 404: "404", 401: "401"},
        "grpc": {
            400: "StatusCode.INVALID_ARGUMENT",
            404: "StatusCode.NOT_FOUND",
            401: "StatusCode.UNAUTHENTICATED",
        },
    }[transport]

    def infer(tensor: Any, name: str = model, version: str = "", headers: Any = None) -> Any:
        sent = as_reader() if headers is None else headers
        return lambda: client.infer(name, [tensor], model_version=version, headers=sent)

    def tensor(name: str, shape: list[int], datatype: str, values: np.ndarray) -> Any:
        made = module.InferInput(name, shape, datatype)
        made.set_data_from_numpy(values)
        return made

    good = tensor("inputs", [5, 4], "FP32", ROWS)
    cases = [
        (infer(good, name="ghost"), 404, "ghost"),
        (infer(good, version="9"), 404, "9"),
        (infer(good, version="nope"), 404, "nope"),
        (infer(tensor("x", [5, 4], "FP32", ROWS)), 400, "'inputs'"),
        (infer(tensor("inputs", [5, 4], "INT32", ROWS.astype(np.int32))), 400, "INT32"),
        (infer(tensor("inputs", [4, 5], "FP32", ROWS.reshape(4, 5))), 400, "features"),
        (infer(tensor("inputs", [20], "FP32", ROWS.ravel())), 400, "[rows, features]"),
        (infer(good, headers={}), 401, "token"),
    ]
    for call, code, words in cases:
        error = _refused(call)
        assert error.status() == status[code], (code, error)
        assert words in error.message(), error.message()
    assert client.is_server_ready()


def test_a_float32_input_beyond_its_range_is_refused(
    http: triton_http.InferenceServerClient, model: str
) -> None:
    x = np.full((1, 4), 1e300)
    error = _refused(lambda: http.infer(model, [http_input(x)], headers=as_reader()))
    assert error.status() == "400"


# -- the model-repository extension -----------------------------------------------------------


def test_unload_and_load(
    http: triton_http.InferenceServerClient,
    grpc: triton_grpc.InferenceServerClient,
    admin: RestClient,
) -> None:
    admin.create_model("swap", SPEC)
    admin.save_version("swap")
    expected = admin.predict("swap", ROWS).outputs
    index = {m["name"]: m for m in http.get_model_repository_index(headers=as_reader())}
    assert index["swap"] == {"name": "swap", "version": "1", "state": "READY"}

    http.unload_model("swap", headers=as_admin())
    assert not http.is_model_ready("swap") and not grpc.is_model_ready("swap")
    entries = grpc.get_model_repository_index(headers=as_reader()).models
    assert [(m.state, m.reason) for m in entries if m.name == "swap"] == [
        ("UNAVAILABLE", "unloaded")
    ]
    error = _refused(lambda: http.infer("swap", [http_input(ROWS)], headers=as_reader()))
    assert error.status() == "409" and "not loaded" in error.message()
    assert admin.get_model("swap").latest_version == 1  # the record stays readable

    grpc.load_model("swap", headers=as_admin())
    assert http.is_model_ready("swap")
    result = grpc.infer("swap", [grpc_input(ROWS)], headers=as_reader())
    assert np.array_equal(result.as_numpy("outputs"), expected)


def test_unloading_a_head_with_unsaved_steps_is_refused_and_loses_nothing(
    http: triton_http.InferenceServerClient, admin: RestClient
) -> None:
    admin.create_model("busy", SPEC)
    admin.train_step("busy", ROWS, TARGETS)
    before = admin.predict("busy", ROWS).outputs
    error = _refused(lambda: http.unload_model("busy", headers=as_admin()))
    assert error.status() == "409" and "unsaved" in error.message()
    assert http.is_model_ready("busy")
    assert admin.get_model("busy").unsaved_steps == 1
    assert np.array_equal(admin.predict("busy", ROWS).outputs, before)


def test_repository_calls_need_their_roles(
    http: triton_http.InferenceServerClient,
    grpc: triton_grpc.InferenceServerClient,
    model: str,
) -> None:
    assert _refused(lambda: http.unload_model(model, headers=as_reader())).status() == "403"
    error = _refused(lambda: grpc.load_model(model, headers=as_reader()))
    assert error.status() == "StatusCode.PERMISSION_DENIED"
    assert _refused(http.get_model_repository_index).status() == "401"
    assert http.is_model_ready(model)


def test_oip_requests_are_counted_under_their_protocol(
    server: ServerProcess, http: triton_http.InferenceServerClient, model: str
) -> None:
    http.infer(model, [http_input(ROWS)], headers=as_reader())
    text = httpx.get(f"{server.rest_url}/metrics").text
    counted = [
        line
        for line in text.splitlines()
        if line.startswith("propserve_requests_total{")
        and 'method="ModelInfer"' in line
        and 'protocol="oip"' in line
        and 'code="ok"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1
