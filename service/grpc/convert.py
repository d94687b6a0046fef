"""Conversions between propserve.v1's messages and the data plane's values."""

from __future__ import annotations

import json
from typing import Any

from numpy.typing import NDArray

from propserve import wire
from propserve.service import tensors
from propserve.service.dataplane import Batch
from propserve.service.errors import InvalidArgument, PropserveError
from propserve.service.models import Prediction
from propserve.v1 import model_service_pb2 as pb

#: The proto's DType enum values (ints at run time) and the wire's dtype names.
_DTYPE_NAMES: dict[Any, str] = {
    pb.DType.Value(f"DTYPE_{name.upper()}"): name for name in wire.DTYPES
}
_DTYPE_ENUMS = {name: enum for enum, name in _DTYPE_NAMES.items()}
_ENUM_NAMES = ", ".join(f"DTYPE_{name.upper()}" for name in wire.DTYPES)


def tensor_in(tensor: pb.Tensor, what: str, max_elements: int) -> NDArray[Any]:
    dtype = _DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(f"{what}: dtype must be set ({_ENUM_NAMES})")
    try:
        return tensors.from_bytes(list(tensor.shape), dtype, tensor.data, max_elements)
    except PropserveError as exc:
        raise type(exc)(f"{what}: {exc.message}") from None


def tensor_out(array: NDArray[Any]) -> pb.Tensor:
    shape, dtype, data = tensors.to_bytes(array)
    return pb.Tensor(shape=shape, dtype=_DTYPE_ENUMS[dtype], data=data)


def spec_in(spec_json: str) -> Any:
    try:
        return json.loads(spec_json)
    except (ValueError, RecursionError) as exc:
        # NOTE: deeply nested JSON exhausts the parser's recursion, not its grammar.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidArgument(f"spec_json is not valid JSON: {reason}") from None


def settings_in(settings: pb.ModelSettings) -> dict[str, int]:
    return {name: getattr(settings, name) for name in wire.SETTINGS if settings.HasField(name)}


def source_in(
    request: pb.PredictRequest | pb.EvaluateRequest | pb.RollbackRequest, oneof: str
) -> dict[str, Any]:
    """The version or label a request names, as keyword arguments."""
    field = request.WhichOneof(oneof)
    return {} if field is None else {field: getattr(request, field)}


def batch_in(request: pb.TrainStepRequest, max_elements: int) -> Batch:
    return Batch(
        request.model,
        tensor_in(request.inputs, "inputs", max_elements),
        tensor_in(request.targets, "targets", max_elements),
        request.learning_rate if request.HasField("learning_rate") else None,
    )


def model_out(model: wire.Model) -> pb.Model:
    return pb.Model(
        name=model.name,
        spec_json=json.dumps(model.spec),
        settings=pb.ModelSettings(**model.settings),
        labels=model.labels,
        head_step=model.head_step,
        latest_version=model.latest_version,
        unsaved_steps=model.unsaved_steps,
        parameter_count=model.parameter_count,
        created_at=model.created_at,
        last_loss=model.last_loss,
    )


def version_out(version: wire.Version) -> pb.Version:
    return pb.Version(
        model=version.model,
        version=version.version,
        step=version.step,
        created_at=version.created_at,
        parent=version.parent,
        metrics=version.metrics,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        labels=version.labels,
    )


def step_out(result: wire.StepResult) -> pb.TrainStepResponse:
    return pb.TrainStepResponse(
        step=result.step,
        loss=result.loss,
        accuracy=result.accuracy,
        batch_size=result.batch_size,
        saved_version=result.saved_version,
    )


def evaluation_out(result: wire.Evaluation) -> pb.EvaluateResponse:
    return pb.EvaluateResponse(
        loss=result.loss,
        accuracy=result.accuracy,
        rows=result.rows,
        step=result.step,
        version=result.version,
    )


def prediction_out(result: Prediction) -> pb.PredictResponse:
    return pb.PredictResponse(
        outputs=tensor_out(result.outputs), version=result.version, step=result.step
    )


def weights_info_out(exported: wire.WeightsFile) -> pb.WeightsInfo:
    return pb.WeightsInfo(
        model=exported.model,
        version=exported.version,
        step=exported.step,
        format=exported.format,
        layout=exported.layout,
        sha256=exported.sha256,
        size_bytes=len(exported.data),
    )


def history_out(history: wire.History) -> pb.History:
    return pb.History(
        model=history.model,
        points=[
            pb.HistoryPoint(
                step=p.step,
                loss=p.loss,
                accuracy=p.accuracy,
                learning_rate=p.learning_rate,
                rows=p.rows,
                time=p.time,
            )
            for p in history.points
        ],
        next_since=history.next_since,
    )
