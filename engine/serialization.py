"""Network state as safetensors bytes, and back. Never pickle.

The safetensors format: an 8-byte little-endian header length N, N bytes of JSON header
mapping each tensor's name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into
the data that follows) plus an optional "__metadata__" map of strings, then the raw
little-endian tensor data, contiguous and without gaps. This module writes and reads it
directly with numpy (one copy each way; reading can be zero-copy) and is tested against the
reference implementation.

A network's file holds:

- ``layers.{i}.weight`` (n_in, n_out) and ``layers.{i}.bias`` (n_out,): the parameters;
- ``optimizer.{slot}.layers.{i}.weight|bias``: the optimizer's slots in the same layout
  (sgd with momentum: momentum_buffer; adam, adamw: exp_avg, exp_avg_sq);
- metadata ``format`` ("propserve.mlp"), ``format_version``, ``spec`` (JSON), ``step``.

Loading it back and training on gives bit-identical results to never having stopped.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve.engine.errors import EngineError, StateError
from propserve.engine.network import Network, layer_views
from propserve.engine.spec import DEFAULT_MAX_PARAMS, ModelSpec

FORMAT = "propserve.mlp"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 16 << 20

_DTYPE_CODES: dict[np.dtype[Any], str] = {
    np.dtype("<f4"): "F32",
    np.dtype("<f8"): "F64",
    np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64",
    np.dtype("<i4"): "I32",
    np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}
_CODE_DTYPES: dict[str, np.dtype[Any]] = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def encode(tensors: dict[str, NDArray[Any]], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise named arrays (and string metadata) to safetensors bytes."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, array in tensors.items():
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _DTYPE_CODES:
            raise StateError(f"tensor {name!r}: dtype {array.dtype} is not supported")
        header[name] = {
            "dtype": _DTYPE_CODES[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw_header = json.dumps(header, separators=(",", ":")).encode()
    raw_header += b" " * (-len(raw_header) % 8)  # align the data to 8 bytes
    start = 8 + len(raw_header)
    out = bytearray(start + offset)
    struct.pack_into("<Q", out, 0, len(raw_header))
    out[8:start] = raw_header
    for name, array in tensors.items():
        begin = header[name]["data_offsets"][0]
        view = np.frombuffer(
            out, dtype=array.dtype.newbyteorder("<"), count=array.size, offset=start + begin
        )
        view[...] = array.reshape(-1)
    return bytes(out)


def decode(data: bytes | bytearray | memoryview) -> tuple[dict[str, NDArray[Any]], dict[str, str]]:
    """Parse safetensors bytes into read-only arrays (views of ``data``) and metadata.

    Raises StateError for anything malformed: a header that is too large, not JSON, or not
    an object; unknown dtypes; offsets that overlap, leave gaps, or run past the end.
    """
    buf = memoryview(data).cast("B")
    if len(buf) < 8:
        raise StateError("not safetensors data: shorter than its 8-byte header length")
    (size,) = struct.unpack_from("<Q", buf, 0)
    if size > min(MAX_HEADER_BYTES, len(buf) - 8):
        raise StateError(f"safetensors header length {size} is larger than the data allows")
    try:
        header = json.loads(bytes(buf[8 : 8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise StateError("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise StateError("safetensors metadata must map strings to strings")
    start, data_size = 8 + size, len(buf) - 8 - size
    tensors: dict[str, NDArray[Any]] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = _CODE_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise StateError(f"tensor {name!r}: malformed header entry {info!r}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if (
            min(shape, default=0) < 0
            or not 0 <= begin <= end <= data_size
            or (end - begin != count * dtype.itemsize)
        ):
            raise StateError(
                f"tensor {name!r}: shape {shape} and offsets {[begin, end]} do not "
                f"fit {data_size} bytes of data"
            )
        array = np.frombuffer(buf, dtype=dtype, count=count, offset=start + begin)
        tensors[name] = array.reshape(shape)
        spans.append((begin, end))
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise StateError("safetensors data has overlapping or missing tensor bytes")
        covered = end
    if covered != data_size:
        raise StateError(f"safetensors data has {data_size - covered} trailing bytes")
    return tensors, metadata


def _named(spec: ModelSpec, flat: NDArray[Any], prefix: str) -> dict[str, NDArray[Any]]:
    weights, biases = layer_views(spec, flat)
    named = {}
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        named[f"{prefix}layers.{i}.weight"] = w
        named[f"{prefix}layers.{i}.bias"] = b
    return named


def dump_network(net: Network) -> bytes:
    """A network's parameters, optimizer slots and step as safetensors bytes."""
    params, slots, step = net.export_state()
    tensors = _named(net.spec, params.flat, "")
    for slot, flat in slots.items():
        tensors |= _named(net.spec, flat, f"optimizer.{slot}.")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": json.dumps(net.spec.to_dict()),
        "step": str(step),
    }
    return encode(tensors, metadata)


def load_network(
    data: bytes | bytearray | memoryview, *, max_params: int = DEFAULT_MAX_PARAMS
) -> Network:
    """Rebuild a network saved by :func:`dump_network`; raise StateError if it does not fit."""
    tensors, metadata = decode(data)
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise StateError(
            f"not a {FORMAT} v{FORMAT_VERSION} file (metadata format "
            f"{metadata.get('format')!r} v{metadata.get('format_version')!r})"
        )
    try:
        spec = ModelSpec.from_dict(json.loads(metadata["spec"]), max_params=max_params)
        step = int(metadata["step"])
    except (KeyError, ValueError, EngineError) as exc:
        raise StateError(f"state metadata is invalid: {exc}") from None
    if step < 0:
        raise StateError(f"state step must be >= 0, got {step}")

    def gather(prefix: str) -> NDArray[Any]:
        flat = np.empty(spec.n_params, dtype=spec.dtype)
        for name, view in _named(spec, flat, prefix).items():
            saved = tensors.pop(name, None)
            if saved is None:
                raise StateError(f"state lacks tensor {name!r}")
            if saved.shape != view.shape or saved.dtype != view.dtype:
                raise StateError(
                    f"tensor {name!r} is {saved.dtype}{list(saved.shape)}, the spec "
                    f"needs {view.dtype}{list(view.shape)}"
                )
            view[...] = saved
        return flat

    net = Network(spec, gather(""), step=step)
    slots = {slot: gather(f"optimizer.{slot}.") for slot in net.optimizer_slot_names}
    if tensors:
        raise StateError(f"state has unexpected tensors: {sorted(tensors)[:5]}")
    if not all(np.isfinite(flat).all() for flat in (net.params.flat, *slots.values())):
        raise StateError("state holds non-finite values")
    net.load_optimizer_slots(slots)
    return net
