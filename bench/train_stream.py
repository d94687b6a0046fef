"""Streamed training over gRPC against the engine's train_step in this process, on the same
batches, in alternating rounds."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray

from bench.common import DIMS_A, SPEC_A
from propserve.engine import ModelSpec, Network
from propserve.v1 import model_service_pb2 as pb

TRAIN_METHOD = "/propserve.v1.ModelService/Train"
TRAIN_BATCH = 256


@dataclass(frozen=True)
class TrainBatches:
    """Batches of model A's inputs and labels, and each as a serialized TrainStepRequest."""

    inputs: list[NDArray[np.float32]]
    labels: list[NDArray[np.int64]]
    wire: list[bytes]


def train_batches(model: str, count: int, batch: int = TRAIN_BATCH) -> TrainBatches:
    rng = np.random.default_rng(7)
    xs, ys, wire = [], [], []
    for _ in range(count):
        x = rng.standard_normal((batch, DIMS_A[0]), dtype=np.float32)
        y = rng.integers(0, DIMS_A[-1], batch, dtype=np.int64)
        xs.append(x)
        ys.append(y)
        request = pb.TrainStepRequest(
            model=model,
            inputs=pb.Tensor(shape=list(x.shape), dtype=pb.DTYPE_FLOAT32, data=x.tobytes()),
            targets=pb.Tensor(shape=[batch], dtype=pb.DTYPE_INT64, data=y.tobytes()),
        )
        wire.append(request.SerializeToString())
    return TrainBatches(xs, ys, wire)


@dataclass
class TrainComparison:
    """Interleaved rounds of in-process steps and streamed steps on the same batches."""

    batch: int
    local_seconds: float = 0.0
    remote_seconds: float = 0.0
    steps: int = 0
    round_ratios: list[float] = field(default_factory=list)

    @property
    def local(self) -> float:
        """In-process samples/s."""
        return self.steps * self.batch / self.local_seconds

    @property
    def remote(self) -> float:
        """Streamed samples/s."""
        return self.steps * self.batch / self.remote_seconds


async def compare_training(
    channel: grpc.aio.Channel, train: TrainBatches, rounds: int, steps: int
) -> TrainComparison:
    """Samples/s of ``Network.train_step`` in this process and of one gRPC Train stream,
    alternating round by round over the same batches.

    NOTE: the host's speed drifts within a minute, so a baseline measured once before or
    after the stream compares different machines; rounds of about a second each, alternating,
    let the drift hit both alike. The stream stays open across rounds, as a training client's
    does; each of its rounds starts with an empty pipeline, which the in-process rounds do not
    pay, so longer rounds read closer to a client streaming without pause."""
    network = Network(ModelSpec.from_dict(SPEC_A))
    network.train_step(train.inputs[0], train.labels[0])
    result = TrainComparison(batch=train.inputs[0].shape[0])
    call: Any = channel.stream_stream(TRAIN_METHOD)
    stream = call(timeout=60 + rounds * steps)
    count = len(train.inputs)
    try:
        for r in range(rounds):
            chosen = [(i + r * steps) % count for i in range(steps)]
            start = time.perf_counter()
            for i in chosen:
                network.train_step(train.inputs[i], train.labels[i])
            local = time.perf_counter() - start

            async def send(chosen: list[int] = chosen) -> None:
                for i in chosen:
                    await stream.write(train.wire[i])

            start = time.perf_counter()
            sending = asyncio.ensure_future(send())
            try:
                for _ in chosen:
                    if await stream.read() is grpc.aio.EOF:
                        raise RuntimeError("the Train stream ended early")
            except BaseException:
                sending.cancel()
                raise
            remote = time.perf_counter() - start
            await sending
            result.local_seconds += local
            result.remote_seconds += remote
            result.steps += steps
            result.round_ratios.append(local / remote)
        await stream.done_writing()
        if await stream.read() is not grpc.aio.EOF:
            raise RuntimeError("the Train stream answered more batches than it was sent")
    finally:
        stream.cancel()
    return result
