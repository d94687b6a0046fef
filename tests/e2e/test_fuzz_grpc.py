"""Hypothesis against every method of propserve.v1.ModelService on one real server: random
bytes as the serialized request, and random but well-typed messages built from each request
message's descriptor (names, shapes, dtypes, data bytes, optional fields set or not). Each
call has a deadline, and the server must answer it:

- never INTERNAL or UNKNOWN;
- within the deadline (no hang);
- a call that failed changed nothing (the models, their versions and labels, what their
  heads predict), and neither did a read; a call that succeeded changed at most the model
  it names. A Train stream that failed after some steps keeps them (documented), so only
  one that was answered nothing must have changed nothing.

The models are scratch models, restored before each test, so no test depends on another.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from propserve import wire
from propserve.v1 import model_service_pb2 as pb
from propserve.v1 import model_service_pb2_grpc as pb_grpc
from tests.support.server import ServerProcess, start_server

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
ENV = {"PROPSERVE_TOKENS": f"{ADMIN_TOKEN}=admin", "PROPSERVE_MAX_PARAMS": "10000"}
SEED = 20260101
#: Calls per method and kind of request (26 runs of it).
MAX_EXAMPLES = 30
#: Seconds a call may take before it counts as a hang: generous on a busy machine.
PATIENCE = 30.0
#: Every call's deadline and credentials.
OPTIONS: dict[str, Any] = {"timeout": PATIENCE, "metadata": METADATA}

SERVICE = pb.DESCRIPTOR.services_by_name["ModelService"]
METHODS = [method.name for method in SERVICE.methods]
#: Methods that may change something when they succeed, and the field naming their model.
MUTATING = {
    "CreateModel": "name",
    "DeleteModel": "name",
    "UpdateModel": "name",
    "TrainStep": "model",
    "Train": "model",
    "SaveVersion": "model",
    "SetLabel": "model",
    "RemoveLabel": "model",
    "Rollback": "model",
    # CreateModel in chunks: its first message's model names it.
    "UploadModel": "model",
}
READING = {
    "GetModel",
    "ListModels",
    "ListVersions",
    "Predict",
    "Evaluate",
    "ExportWeights",
    "GetHistory",
    "WatchHistory",
}

#: Scratch models (restored before each test), each with a version its label LABEL names.
MODELS: dict[str, dict[str, Any]] = {
    "gz-mse": {"input_dim": 2, "layers": [{"units": 1}], "loss": "mse", "seed": 1},
    "gz-clf": {
        "input_dim": 2,
        "layers": [{"units": 3, "activation": "tanh"}, {"units": 3}],
        "loss": "softmax_cross_entropy",
        "optimizer": {"name": "adam", "lr": 0.01},
        "seed": 2,
    },
}
LABEL = "stable"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("fuzz-grpc") / "store", env=ENV)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(channel)


# -- calls: raw bytes in, the status and the answers out ------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    #: Messages answered (a stream may answer some before it fails).
    answers: int


def unparsed(data: bytes) -> bytes:
    return data


def invoke(channel: grpc.Channel, method: str, payloads: list[bytes]) -> Outcome:
    """Call ``method`` with serialized requests (one, or a stream's), unparsed both ways."""
    path = f"/{SERVICE.full_name}/{method}"
    raw: dict[str, Any] = {"request_serializer": unparsed, "response_deserializer": unparsed}
    answers = 0
    descriptor = SERVICE.methods_by_name[method]
    try:
        if descriptor.client_streaming and descriptor.server_streaming:
            stream = channel.stream_stream(path, **raw)
            for _ in stream(iter(payloads), timeout=PATIENCE, metadata=METADATA):
                answers += 1
        elif descriptor.client_streaming:
            channel.stream_unary(path, **raw)(iter(payloads), timeout=PATIENCE, metadata=METADATA)
            answers = 1
        elif descriptor.server_streaming:
            # The first answer (a watch never ends by itself: it answers at once, then waits).
            replies = channel.unary_stream(path, **raw)(
                payloads[0], timeout=PATIENCE, metadata=METADATA
            )
            for _ in replies:
                answers += 1
                break
            replies.cancel()
        else:
            channel.unary_unary(path, **raw)(payloads[0], timeout=PATIENCE, metadata=METADATA)
            answers = 1
    except grpc.RpcError as exc:
        error: Any = exc  # a grpc.Call too
        return Outcome(error.code(), error.details() or "", answers)
    return Outcome(grpc.StatusCode.OK, "", answers)


# -- the state a call may not change ----------------------------------------------------------

State = dict[str, Any]


def snapshot(stub: pb_grpc.ModelServiceStub) -> State:
    """Per model: its record, its versions, and what its head predicts for a row of ones."""
    state = {}
    for model in stub.ListModels(pb.ListModelsRequest(), **OPTIONS).models:
        versions = stub.ListVersions(pb.ListVersionsRequest(model=model.name), **OPTIONS)
        row = np.ones((1, json.loads(model.spec_json)["input_dim"]), "<f8")
        inputs = pb.Tensor(shape=row.shape, dtype=pb.DTYPE_FLOAT64, data=row.tobytes())
        predicted = stub.Predict(pb.PredictRequest(model=model.name, inputs=inputs), **OPTIONS)
        state[model.name] = (
            json_format.MessageToDict(model),
            json_format.MessageToDict(versions),
            predicted.outputs.data,
        )
    return state


def restore(stub: pb_grpc.ModelServiceStub) -> None:
    """Only the scratch models, each with a saved version that LABEL names."""
    for model in stub.ListModels(pb.ListModelsRequest(), **OPTIONS).models:
        if model.name not in MODELS:
            stub.DeleteModel(pb.DeleteModelRequest(name=model.name), **OPTIONS)
    present = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), **OPTIONS).models}
    for name, spec in MODELS.items():
        model = present.get(name) or stub.CreateModel(
            pb.CreateModelRequest(name=name, spec_json=json.dumps(spec)), **OPTIONS
        )
        if LABEL not in model.labels:
            versions = stub.ListVersions(pb.ListVersionsRequest(model=name), **OPTIONS).versions
            version = (
                versions[0].version
                if versions
                else stub.SaveVersion(pb.SaveVersionRequest(model=name), **OPTIONS).version
            )
            request = pb.SetLabelRequest(model=name, label=LABEL, version=version)
            stub.SetLabel(request, **OPTIONS)


# -- well-typed messages from the descriptors -------------------------------------------------

#: Names: mostly the scratch models' (and their label), to reach what lies behind a name.
NAMES = st.one_of(
    st.sampled_from([*MODELS, LABEL]),
    st.one_of(
        st.from_regex(f"^{wire.NAME_PATTERN}$", fullmatch=True),
        st.sampled_from(["", "A", "a" * 65, "..", "a/b", "a\x00b", "-a", "é"]),
        st.text(max_size=70),
    ),
)
#: The fields naming a model: set in every message (unset, they are empty: a name above).
NAMED = {"name", "model"}
MODEL_NAMES = st.one_of(st.sampled_from(list(MODELS)), NAMES)


def spec_json() -> st.SearchStrategy[str]:
    """Specs that are valid (small), nearly valid, or not JSON at all."""
    layer = st.fixed_dictionaries(
        {"units": st.integers(-1, 5)},
        optional={"activation": st.sampled_from(["relu", "softmax", "sigmoid", "nope"])},
    )
    spec = st.fixed_dictionaries(
        {
            "input_dim": st.one_of(st.integers(-1, 4), st.sampled_from([1.0, True, "2", 2**70])),
            "layers": st.lists(layer, max_size=3),
            "loss": st.sampled_from(["mse", "softmax_cross_entropy", "binary_cross_entropy"]),
        },
        optional={
            "optimizer": st.sampled_from(["sgd", "adam", {"name": "sgd", "momentum": -1}]),
            "seed": st.integers(-1, 2**64),
            "grad_clip_norm": st.one_of(st.none(), st.floats()),
            "extra": st.just(1),
        },
    )
    return st.one_of(
        st.sampled_from([json.dumps(spec) for spec in MODELS.values()]),
        spec.map(json.dumps),
        st.sampled_from(["", "null", "[]", "{", '"x"', "[" * 5000]),
        st.text(max_size=40),
    )


#: DType values and the wire's names; 7 is a value the enum does not know (proto3 keeps it).
DTYPE_NAMES = {pb.DTYPE_FLOAT64: "float64", pb.DTYPE_FLOAT32: "float32"} | {
    pb.DTYPE_INT64: "int64",
    pb.DTYPE_INT32: "int32",
    pb.DTYPE_UNSPECIFIED: "unspecified",
    7: "unknown",
}
#: Shapes and dtypes the scratch models take (inputs (rows, 2); targets (rows,) class labels,
#: (rows, 1) or (rows, 3) values), to reach their engine; rows differ at times.
FITTING = {
    "inputs": ([[1, 2], [3, 2]], [pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT32]),
    "targets": ([[1], [3], [1, 1], [3, 1], [1, 3], [3, 3]], [pb.DTYPE_FLOAT64, pb.DTYPE_INT64]),
}


def tensors(field: str) -> st.SearchStrategy[pb.Tensor]:
    """Tensors of the shapes and dtypes the models take, and tensors of any shape (huge,
    negative, of too many dimensions) and dtype, whose data fits them or not."""
    # Small, negative, and large: up to the element limit (2**24 by default) and beyond.
    dims = st.one_of(
        st.integers(0, 4), st.sampled_from([-1, 2**20, 2**24, 2**24 + 1, 2**31, 2**63 - 1])
    )
    any_shape = st.lists(dims, max_size=wire.MAX_RANK + 1)
    fitting_shapes, fitting_dtypes = FITTING.get(field, ([[1]], [pb.DTYPE_FLOAT64]))

    @st.composite
    def tensor(draw: st.DrawFn, shapes: Any, dtypes: Any, fits: bool) -> pb.Tensor:
        shape, dtype = draw(shapes), draw(dtypes)
        name = DTYPE_NAMES[dtype]
        count = math.prod(shape) if all(0 <= d <= 64 for d in shape) else 0
        if name in wire.DTYPES and (fits or draw(st.booleans())):
            values = draw(
                st.lists(st.integers(-1, 3) | st.floats(width=32), min_size=count, max_size=count)
            )
            with np.errstate(invalid="ignore", over="ignore"):
                data = np.asarray(values, "<f8").astype(wire.DTYPES[name]).tobytes()
        else:
            data = draw(st.binary(max_size=64))
        return pb.Tensor(shape=shape, dtype=dtype, data=data)

    return st.one_of(
        tensor(st.sampled_from(fitting_shapes), st.sampled_from(fitting_dtypes), fits=True),
        tensor(any_shape, st.sampled_from(list(DTYPE_NAMES)), fits=False),
    )


SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1)),
    FieldDescriptor.TYPE_UINT32: st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}


def field_values(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    one: st.SearchStrategy[Any]
    if field.message_type is not None:
        one = (
            tensors(field.name)
            if field.message_type.name == "Tensor"
            else messages(field.message_type)
        )
    elif field.name == "spec_json":
        one = spec_json()
    elif field.type == FieldDescriptor.TYPE_STRING:
        one = MODEL_NAMES if field.name in NAMED else NAMES
    elif field.enum_type is not None:
        one = st.sampled_from([value.number for value in field.enum_type.values])
    else:
        one = SCALARS[field.type]
    return st.lists(one, max_size=3) if field.is_repeated else one


def messages(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with each field set or left out (a oneof's last set wins)."""
    cls = GetMessageClass(descriptor)
    fields = {field.name: field_values(field) for field in descriptor.fields}
    # Names are always set; a tensor mostly (None: left out), to reach what lies behind.
    named = {name: fields.pop(name) for name in NAMED & fields.keys()}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.name == "Tensor":
            named[field.name] = st.one_of(fields.pop(field.name), st.none())
    return st.fixed_dictionaries(named, optional=fields).map(
        lambda values: cls(**{k: v for k, v in values.items() if v is not None})
    )


def requests(method: MethodDescriptor) -> st.SearchStrategy[list[Message]]:
    one = messages(method.input_type)
    return st.lists(one, max_size=4) if method.client_streaming else one.map(lambda m: [m])


def corrupted(payload: bytes) -> st.SearchStrategy[bytes]:
    """``payload`` cut short, grown or with a byte changed."""
    cut = st.integers(0, len(payload)).map(lambda n: payload[:n])
    grown = st.binary(min_size=1, max_size=16).map(lambda extra: payload + extra)
    if not payload:
        return st.one_of(cut, grown)
    flipped = st.tuples(st.integers(0, len(payload) - 1), st.integers(0, 255)).map(
        lambda change: payload[: change[0]] + bytes([change[1]]) + payload[change[0] + 1 :]
    )
    return st.one_of(cut, grown, flipped)


def raw_requests(method: MethodDescriptor) -> st.SearchStrategy[list[bytes]]:
    """Random bytes, or a well-typed message's bytes corrupted."""
    one = st.one_of(
        st.binary(max_size=128),
        messages(method.input_type).map(lambda m: m.SerializeToString()).flatmap(corrupted),
    )
    return st.lists(one, max_size=4) if method.client_streaming else one.map(lambda b: [b])


# -- the fuzzing -------------------------------------------------------------------------------


def named_model(method: str, payloads: list[bytes]) -> str | None:
    """The model a mutating call names (a stream's first message names it)."""
    input_type = GetMessageClass(SERVICE.methods_by_name[method].input_type)
    for payload in payloads:
        try:
            message = input_type.FromString(payload)
        except DecodeError:
            return None
        name = getattr(message, MUTATING[method])
        if method == "UploadModel":
            return str(name.name) if message.HasField("model") else None
        if name or method != "Train":
            return str(name)
    return None


def check_call(
    channel: grpc.Channel,
    stub: pb_grpc.ModelServiceStub,
    method: str,
    payloads: list[bytes],
    state: list[State],
) -> None:
    """Call ``method`` and check its outcome and effect; ``state[0]`` is the state before the
    call, and after it once this returns or fails."""
    outcome = invoke(channel, method, payloads)
    before, after = state[0], snapshot(stub)
    state[0] = after
    request = f"{method}({[p.hex() for p in payloads]})"
    assert outcome.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
        f"{request} -> {outcome}"
    )
    assert outcome.code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{request}: no answer in time"
    changed = outcome.code == grpc.StatusCode.OK or (method == "Train" and outcome.answers)
    touched = named_model(method, payloads) if changed and method in MUTATING else None
    differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert set(differ) <= {touched}, f"{request} -> {outcome} changed {differ}"


KINDS = ["bytes", "messages"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_fuzz_method(
    channel: grpc.Channel, stub: pb_grpc.ModelServiceStub, method: str, kind: str
) -> None:
    restore(stub)
    descriptor = SERVICE.methods_by_name[method]
    payloads = (
        raw_requests(descriptor)
        if kind == "bytes"
        else requests(descriptor).map(lambda ms: [m.SerializeToString() for m in ms])
    )
    state = [snapshot(stub)]  # the state before the next call

    @seed(SEED)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payloads=payloads)
    def fuzz(payloads: list[bytes]) -> None:
        check_call(channel, stub, method, payloads, state)

    fuzz()


def test_every_method_is_fuzzed() -> None:
    assert set(METHODS) == set(MUTATING) | READING


# -- bugs the fuzzing found ------------------------------------------------------------------------

#: A tensor of no element whose other dimensions, each within the element limit (2**24 by
#: default), multiply past what numpy can describe (it was answered INTERNAL).
EMPTY_BUT_HUGE = [2**24, 2**24, 2**24, 0]


@pytest.mark.parametrize("method", ["Predict", "TrainStep", "Train"])
def test_an_empty_tensor_numpy_cannot_shape_is_refused(
    channel: grpc.Channel, stub: pb_grpc.ModelServiceStub, method: str
) -> None:
    restore(stub)
    empty = pb.Tensor(shape=EMPTY_BUT_HUGE, dtype=pb.DTYPE_FLOAT32, data=b"")
    target = pb.Tensor(shape=[1], dtype=pb.DTYPE_FLOAT64, data=np.ones(1, "<f8").tobytes())
    request: Message = (
        pb.PredictRequest(model="gz-mse", inputs=empty)
        if method == "Predict"
        else pb.TrainStepRequest(model="gz-mse", inputs=empty, targets=target)
    )
    payloads = [request.SerializeToString()]
    outcome = invoke(channel, method, payloads)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
