"""Python clients for propserve, over gRPC and REST, with the same methods and return types.

    from propserve.clients import GrpcClient, RestClient

    with GrpcClient("127.0.0.1:50051") as client:
        client.create_model("digits", spec)
        client.train("digits", batches, progress=True)   # streamed over one call
        client.save_version("digits")
    with RestClient("http://127.0.0.1:8000") as client:
        probabilities = client.predict("digits", x).outputs

The four share one implementation (:mod:`propserve.clients.client`): ``Client`` and
``AsyncClient`` are their common types. Errors are this package's own
(:mod:`propserve.clients.errors`), never transport exceptions, and carry the server's request
id. The package speaks only the wire: it imports nothing from the server or the engine.
"""

from propserve.clients._progress import Progress
from propserve.clients._retry import RetryPolicy
from propserve.clients.client import AsyncClient, Client
from propserve.clients.errors import (
    AlreadyExists,
    ClientError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TooBusy,
    Unauthenticated,
    Unavailable,
)
from propserve.clients.grpc_client import AsyncGrpcClient, GrpcClient
from propserve.clients.rest_client import AsyncRestClient, RestClient
from propserve.clients.types import Evaluation, Model, Prediction, StepResult, Version

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncGrpcClient",
    "AsyncRestClient",
    "Client",
    "ClientError",
    "DataLoss",
    "DeadlineExceeded",
    "Evaluation",
    "FailedPrecondition",
    "GrpcClient",
    "Internal",
    "InvalidArgument",
    "Model",
    "NotFound",
    "PermissionDenied",
    "Prediction",
    "Progress",
    "ResourceExhausted",
    "RestClient",
    "RetryPolicy",
    "StepResult",
    "TooBusy",
    "Unauthenticated",
    "Unavailable",
    "Version",
]
