"""Weights in and out of the real server: CreateModel from a safetensors file (both layouts,
REST as JSON base64 and multipart, gRPC in one message and as a chunked upload), and a saved
version exported as safetensors (both layouts) or ONNX, through the clients and the CLI.

References: the seed example's arithmetic (one relu neuron, 0.4*2 + 0.3*3 + 0.2*5 + 0.5 =
3.2), the stored version's sha256 (an export in the propserve layout is that file, so a
round trip is equal bit for bit), and onnxruntime running the exported graph."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from propserve.cli import main
from propserve.clients import Client, GrpcClient, RestClient
from propserve.clients.errors import InvalidArgument, NotFound
from propserve.engine.serialization import decode, encode
from propserve.v1 import model_service_pb2 as pb
from propserve.v1 import model_service_pb2_grpc as pb_grpc
from tests.support.server import ServerProcess

NEURON: dict[str, Any] = {
    "input_dim": 3,
    "layers": [{"units": 1, "activation": "relu"}],
    "loss": "mse",
    "dtype": "float32",
}
W = np.array([0.4, 0.3, 0.2], dtype=np.float32)
B = np.array([0.5], dtype=np.float32)
SEED_ROWS = np.array([[2, 3, 5], [-2, -3, -5]], dtype=np.float32)
# float32: each product and sum rounds once (relative 2**-24); five operations on values
# below 4 stay well inside 8 ulps of 3.2.
SEED_TOLERANCE = 8 * 3.2 * 2.0**-24

SPEC: dict[str, Any] = {
    "input_dim": 5,
    "layers": [{"units": 7, "activation": "tanh"}, {"units": 3, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "adam", "lr": 0.01},
    "dtype": "float32",
    "seed": 3,
}
X = np.random.default_rng(1).standard_normal((16, 5)).astype(np.float32)
Y = np.arange(16) % 3


def neuron_file(layout: str) -> bytes:
    if layout == "torch":
        return encode({"0.weight": W.reshape(1, 3), "0.bias": B})
    return encode({"layers.0.weight": W.reshape(3, 1), "layers.0.bias": B})


@pytest.fixture(params=["grpc", "rest"])
def client(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[Client]:
    made: Client = (
        GrpcClient(server.grpc_target, timeout=60)
        if request.param == "grpc"
        else RestClient(server.rest_url, timeout=60)
    )
    with made:
        yield made


def _tag(client: Client) -> str:
    return "g" if isinstance(client, GrpcClient) else "r"


# -- the seed example ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["propserve", "torch"])
def test_the_seed_neuron_imported_predicts_3_2_and_0(client: Client, layout: str) -> None:
    name = f"seed-{_tag(client)}-{layout}"
    model = client.create_model(name, NEURON, weights=neuron_file(layout), layout=layout)
    assert (model.latest_version, model.head_step, model.unsaved_steps) == (1, 0, 0)
    outputs = client.predict(name, SEED_ROWS).outputs
    assert abs(outputs[0, 0] - 3.2) <= SEED_TOLERANCE
    assert outputs[1, 0] == 0.0  # relu of 0.4*-2 + 0.3*-3 + 0.2*-5 + 0.5 = -2.2
    # The import is saved at once: version 1 holds it.
    assert client.predict(name, SEED_ROWS, version=1).outputs.tolist() == outputs.tolist()


def test_the_seed_neuron_over_rest_json_base64(server: ServerProcess) -> None:
    body = {
        "name": "seed-json",
        "spec": NEURON,
        "weights": base64.b64encode(neuron_file("torch")).decode(),
        "layout": "torch",
    }
    with httpx.Client(base_url=server.rest_url, timeout=60) as http:
        created = http.post("/v1/models", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["latest_version"] == 1
        answer = http.post("/v1/models/seed-json/predict", json={"inputs": [[2, 3, 5]]})
    assert abs(answer.json()["outputs"][0][0] - 3.2) <= SEED_TOLERANCE


# -- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["propserve", "torch"])
def test_export_then_import_is_the_same_version_bit_for_bit(client: Client, layout: str) -> None:
    name, copy = f"rt-{_tag(client)}-{layout}", f"rt-{_tag(client)}-{layout}-copy"
    client.create_model(name, SPEC)
    client.train(name, [(X, Y)] * 3)
    saved = client.save_version(name)
    exported = client.export_weights(name, saved.version, layout=layout)
    assert (exported.version, exported.step, exported.layout) == (saved.version, 3, layout)
    assert exported.sha256 == saved.sha256
    if layout == "propserve":
        assert hashlib.sha256(exported.data).hexdigest() == saved.sha256  # the stored file
    model = client.create_model(copy, SPEC, weights=exported.data, layout=layout)
    assert model.head_step == 3  # the optimizer state came along, and its step
    assert client.list_versions(copy)[0].sha256 == saved.sha256
    # Training on continues identically: Adam's moments and step were imported.
    a, b = client.train_step(name, X, Y), client.train_step(copy, X, Y)
    assert (a.step, a.loss) == (b.step, b.loss)
    assert client.predict(name, X).outputs.tolist() == client.predict(copy, X).outputs.tolist()


def test_a_large_import_goes_as_a_chunked_upload_over_grpc(server: ServerProcess) -> None:
    spec = {
        "input_dim": 300,
        "layers": [{"units": 600, "activation": "relu"}, {"units": 4}],
        "loss": "mse",
        "optimizer": {"name": "adam", "lr": 0.001},
        "dtype": "float64",
    }
    with GrpcClient(server.grpc_target, timeout=60) as grpc_client:
        grpc_client.create_model("big-src", spec)
        version = grpc_client.save_version("big-src")
        exported = grpc_client.export_weights("big-src", version.version)
        assert len(exported.data) > 2 << 20  # more than one chunk each way
        grpc_client.create_model("big-copy", spec, weights=exported.data)
        assert grpc_client.list_versions("big-copy")[0].sha256 == version.sha256


# -- ONNX ---------------------------------------------------------------------------------


def test_onnx_export_runs_in_onnxruntime_as_predict_does(client: Client) -> None:
    ort = pytest.importorskip("onnxruntime")
    name = f"onnx-{_tag(client)}"
    client.create_model(name, SPEC)
    client.train(name, [(X, Y)] * 2)
    version = client.save_version(name).version
    exported = client.export_weights(name, version, format="onnx")
    assert exported.format == "onnx" and exported.sha256 == client.list_versions(name)[0].sha256
    session = ort.InferenceSession(exported.data, providers=["CPUExecutionProvider"])
    ours = client.predict(name, X, version=version).outputs
    theirs = session.run(None, {"input": X})[0]
    # Probabilities in float32: two layers of dot products of length <= 7 plus softmax,
    # each within a few ulps; 1e-5 is ~100 ulps of values at most 1.
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "problem"),
    [
        (b"not safetensors at all", "safetensors"),
        (encode({"layers.0.weight": W.reshape(1, 3), "layers.0.bias": B}), "layers.0.weight"),
        (encode({"layers.0.weight": W.reshape(3, 1)}), "layers.0.bias"),
        (
            encode({"layers.0.weight": np.full((3, 1), np.nan, np.float32), "layers.0.bias": B}),
            "finite",
        ),
    ],
    ids=["garbage", "transposed", "no-bias", "nan"],
)
def test_bad_weights_are_refused_and_nothing_is_created(
    client: Client, weights: bytes, problem: str
) -> None:
    name = f"bad-{_tag(client)}"
    with pytest.raises(InvalidArgument, match=problem):
        client.create_model(name, NEURON, weights=weights)
    with pytest.raises(NotFound):
        client.get_model(name)


def test_bad_layout_and_format_are_refused(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="layout"):
        client.create_model("never", NEURON, weights=neuron_file("torch"), layout="keras")
    name = f"fmt-{_tag(client)}"
    client.create_model(name, NEURON, weights=neuron_file("propserve"))
    with pytest.raises(InvalidArgument, match="format"):
        client.export_weights(name, 1, format="pickle")
    with pytest.raises(InvalidArgument, match="safetensors"):
        client.export_weights(name, 1, format="onnx", layout="torch")
    with pytest.raises(NotFound):
        client.export_weights(name, 9)


def test_rest_bodies_that_do_not_hold_weights_properly(server: ServerProcess) -> None:
    model = json.dumps({"name": "mp-bad", "spec": NEURON}).encode()
    with httpx.Client(base_url=server.rest_url, timeout=60) as http:
        not_b64 = http.post("/v1/models", json={"name": "mp-bad", "spec": NEURON, "weights": "@@@"})
        assert not_b64.status_code == 422
        no_file = http.post("/v1/models", files={"model": (None, model, "application/json")})
        assert no_file.status_code == 400 and "weights" in no_file.json()["error"]["message"]
        extra = http.post(
            "/v1/models",
            files={
                "model": (None, model, "application/json"),
                "weights": ("w", neuron_file("propserve")),
                "other": (None, b"x"),
            },
        )
        assert extra.status_code == 400
        assert http.get("/v1/models/mp-bad").status_code == 404
        bad_version = http.get("/v1/models/mp-bad/versions/0/weights")
        assert bad_version.status_code == 422


def test_an_upload_must_start_with_the_model(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.UploadModel(iter([pb.UploadModelRequest(chunk=b"abc")]), timeout=60)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as raised:
            model = pb.CreateModelRequest(name="up-empty", spec_json=json.dumps(NEURON))
            stub.UploadModel(iter([pb.UploadModelRequest(model=model)]), timeout=60)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the CLI ------------------------------------------------------------------------------


def test_cli_create_from_torch_weights_and_export_onnx(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file, weights_file = tmp_path / "spec.json", tmp_path / "w.safetensors"
    spec_file.write_text(json.dumps(NEURON))
    weights_file.write_bytes(neuron_file("torch"))
    connection = ["--grpc", server.grpc_target, "--rest", server.rest_url, "--timeout", "60"]
    argv = ["models", "create", "cli-seed", "--spec", str(spec_file)]
    code = main([*argv, "--weights", str(weights_file), "--layout", "torch", *connection])
    assert code == 0
    assert "saved as version 1" in capsys.readouterr().out
    onnx_file = tmp_path / "seed.onnx"
    argv = ["versions", "export", "cli-seed", "1", "-o", str(onnx_file), "--format", "onnx"]
    assert main([*argv, *connection]) == 0
    out = capsys.readouterr().out
    with GrpcClient(server.grpc_target) as grpc_client:
        sha = grpc_client.list_versions("cli-seed")[0].sha256
    assert sha in out and onnx_file.stat().st_size > 0
    torch_file = tmp_path / "seed-torch.safetensors"
    argv = ["versions", "export", "cli-seed", "1", "-o", str(torch_file), "--layout", "torch"]
    assert main([*argv, *connection]) == 0
    tensors, _ = decode(torch_file.read_bytes())
    assert tensors["0.weight"].tolist() == W.reshape(1, 3).tolist()
