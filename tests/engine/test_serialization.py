"""State as safetensors: exact round trips, compatibility with the reference implementation,
and clear refusals of anything malformed."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from propserve.engine import ModelSpec, Network, StateError
from propserve.engine.serialization import decode, encode

SPEC: dict[str, Any] = {
    "input_dim": 6,
    "layers": [{"units": 10, "activation": "tanh"}, {"units": 4}],
    "loss": "softmax_cross_entropy",
}
OPTIMIZERS = [
    {"name": "sgd", "lr": 0.1},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    {"name": "adam", "lr": 0.01},
    {"name": "adamw", "lr": 0.01},
]


def batches(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(8, 6)), rng.integers(0, 4, size=8)) for _ in range(count)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "optimizer", OPTIMIZERS, ids=lambda o: str(o["name"]) + ("-momentum" if "momentum" in o else "")
)
def test_save_load_continue_equals_never_stopping(optimizer: dict[str, Any], dtype: str) -> None:
    spec = ModelSpec.from_dict(SPEC | {"optimizer": optimizer, "dtype": dtype})
    data = batches(0, 12)
    straight = Network(spec)
    for x, y in data:
        straight.train_step(x, y)
    first = Network(spec)
    for x, y in data[:5]:
        first.train_step(x, y)
    resumed = Network.from_bytes(first.to_bytes())
    assert resumed.step == 5 and resumed.spec == spec
    for x, y in data[5:]:
        resumed.train_step(x, y)
    assert resumed.params.flat.tobytes() == straight.params.flat.tobytes()
    assert resumed.to_bytes() == straight.to_bytes()


def test_tensor_names_and_metadata() -> None:
    net = Network(ModelSpec.from_dict(SPEC | {"optimizer": {"name": "adam"}}))
    tensors, metadata = decode(net.to_bytes())
    assert set(tensors) == {
        f"{prefix}layers.{i}.{kind}"
        for i in range(2)
        for kind in ("weight", "bias")
        for prefix in ("", "optimizer.exp_avg.", "optimizer.exp_avg_sq.")
    }
    assert tensors["layers.0.weight"].shape == (6, 10)
    assert metadata["format"] == "propserve.mlp" and metadata["step"] == "0"
    assert ModelSpec.from_dict(json.loads(metadata["spec"])) == net.spec


def test_reference_implementation_reads_our_bytes_and_we_read_its() -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "a": rng.normal(size=(3, 5)).astype(np.float32),
        "b": np.arange(7, dtype=np.int64),
        "c": rng.normal(size=(2, 2, 2)),
        "empty": np.zeros((0, 3), np.float32),
    }
    ours = encode(arrays, {"k": "v"})
    theirs = safetensors.numpy.load(ours)
    assert set(theirs) == set(arrays)
    for name, array in arrays.items():
        assert theirs[name].dtype == array.dtype and np.array_equal(theirs[name], array)
    back, metadata = decode(safetensors.numpy.save(arrays, metadata={"k": "v"}))
    assert metadata == {"k": "v"}
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array)


def header_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


MALFORMED: list[tuple[str, bytes, str]] = [
    ("too short", b"\x01\x00", "shorter"),
    ("header longer than data", struct.pack("<Q", 1000) + b"{}", "larger than"),
    ("header not json", struct.pack("<Q", 3) + b"{{{", "not valid JSON"),
    ("header not object", header_bytes([], b""), "not a JSON object"),  # type: ignore[arg-type]
    (
        "unknown dtype",
        header_bytes({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "malformed",
    ),
    (
        "offsets past the end",
        header_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
        "fit",
    ),
    (
        "shape mismatch",
        header_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        "fit",
    ),
    (
        "overlap",
        header_bytes(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
        ),
        "overlapping",
    ),
    (
        "trailing bytes",
        header_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
        "trailing",
    ),
    ("bad metadata", header_bytes({"__metadata__": {"k": 1}}, b""), "strings"),
]


@pytest.mark.parametrize(
    ("data", "message"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed_safetensors_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(StateError, match=message):
        decode(data)


def saved_state() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    net = Network(ModelSpec.from_dict(SPEC | {"optimizer": {"name": "adam"}}))
    x, y = batches(1, 1)[0]
    net.train_step(x, y)
    tensors, metadata = decode(net.to_bytes())
    return {k: v.copy() for k, v in tensors.items()}, metadata


def broken_states() -> list[tuple[str, bytes, str]]:
    cases = []
    tensors, metadata = saved_state()
    cases.append(("wrong format", encode(tensors, metadata | {"format": "other"}), "not a"))
    cases.append(
        (
            "bad spec",
            encode(tensors, metadata | {"spec": '{"input_dim": 0}'}),
            "metadata is invalid",
        )
    )
    cases.append(("bad step", encode(tensors, metadata | {"step": "x"}), "metadata is invalid"))
    cases.append(("negative step", encode(tensors, metadata | {"step": "-1"}), "step"))
    missing = dict(tensors)
    del missing["layers.1.bias"]
    cases.append(("missing tensor", encode(missing, metadata), "lacks tensor 'layers.1.bias'"))
    missing_slot = dict(tensors)
    del missing_slot["optimizer.exp_avg.layers.0.weight"]
    cases.append(("missing slot", encode(missing_slot, metadata), "lacks tensor"))
    extra = tensors | {"extra": np.zeros(2, np.float32)}
    cases.append(("extra tensor", encode(extra, metadata), "unexpected tensors"))
    reshaped = tensors | {"layers.0.weight": tensors["layers.0.weight"].T.copy()}
    cases.append(("wrong shape", encode(reshaped, metadata), "the spec needs"))
    retyped = tensors | {"layers.0.bias": tensors["layers.0.bias"].astype(np.float64)}
    cases.append(("wrong dtype", encode(retyped, metadata), "the spec needs"))
    poisoned = tensors | {"layers.0.bias": np.full_like(tensors["layers.0.bias"], np.nan)}
    cases.append(("non-finite", encode(poisoned, metadata), "non-finite"))
    return cases


@pytest.mark.parametrize(
    ("data", "message"),
    [case[1:] for case in broken_states()],
    ids=[case[0] for case in broken_states()],
)
def test_state_that_does_not_fit_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(StateError, match=message):
        Network.from_bytes(data)


def test_parameter_limit_applies_when_loading() -> None:
    data = Network(ModelSpec.from_dict(SPEC)).to_bytes()
    with pytest.raises(StateError, match="exceed the limit"):
        Network.from_bytes(data, max_params=10)
