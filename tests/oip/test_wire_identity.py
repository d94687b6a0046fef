"""propserve's OIP messages (package propserve.oip) are the protocol's on the wire: every
message and field has the number, type and cardinality of tritonclient's copy of the
protocol (package inference), so the bytes one writes the other reads. Both import into one
process, which two copies under the protocol's own package could not."""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import service_pb2 as triton

from propserve.oip import open_inference_pb2 as ours
from propserve.service.grpc.oip import METHODS


def fields(descriptor: Descriptor) -> dict[str, Any]:
    """A message's fields as the wire sees them (number, type, repeated), nested included."""
    shape: dict[str, Any] = {}
    for field in descriptor.fields:
        nested = fields(field.message_type) if field.message_type is not None else None
        shape[field.name] = (field.number, field.type, field.is_repeated, nested)
    return shape


def test_every_message_is_the_protocols() -> None:
    names = list(ours.DESCRIPTOR.message_types_by_name)
    assert len(names) == 21
    for name in names:
        mine = fields(ours.DESCRIPTOR.message_types_by_name[name])
        theirs = fields(triton.DESCRIPTOR.message_types_by_name[name])
        if name == "ModelMetadataResponse":
            # The protocol's properties map (6) is not in Triton's copy.
            assert mine.pop("properties")[0] == 6
        assert mine == theirs, name


def test_every_method_is_the_protocols() -> None:
    service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    for method in METHODS:
        found = service.methods_by_name[method]
        assert found.input_type.name == f"{method}Request"
        assert found.output_type.name == f"{method}Response"


def test_bytes_cross_both_ways() -> None:
    request = ours.ModelInferRequest(model_name="m", model_version="3", id="x")
    tensor = request.inputs.add(name="inputs", datatype="FP32", shape=[2, 2])
    tensor.parameters["binary_data_size"].int64_param = 16
    request.raw_input_contents.append(np.arange(4, dtype="<f4").tobytes())
    read = triton.ModelInferRequest.FromString(request.SerializeToString())
    assert (read.model_name, read.model_version, read.id) == ("m", "3", "x")
    assert list(read.inputs[0].shape) == [2, 2]
    assert read.inputs[0].parameters["binary_data_size"].int64_param == 16
    assert np.array_equal(np.frombuffer(read.raw_input_contents[0], "<f4"), np.arange(4))
    back = ours.ModelInferRequest.FromString(read.SerializeToString())
    assert back == request
