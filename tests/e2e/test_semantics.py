"""The service's semantics, end to end: the real server in a child process, the real clients,
the real store on disk, and the in-process engine as the reference.

Every comparison with the engine is exact (bit for bit): the server runs the same code on the
same bytes, so anything else is a bug, not rounding.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.typing import NDArray

from propserve.clients import (
    ClientError,
    GrpcClient,
    NotFound,
    Progress,
    RestClient,
    RetryPolicy,
    StepResult,
    Unavailable,
)
from propserve.engine import ModelSpec, Network, Params, forward
from tests.support.server import ServerProcess, start_server

Array = NDArray[Any]
Batch = tuple[Array, Array]
WAIT = 20.0  # seconds: the bound on every wait in this module
NO_RETRY = RetryPolicy(attempts=1)
SERVING = health_pb2.HealthCheckResponse.SERVING


def mlp(
    input_dim: int = 6,
    hidden: tuple[int, ...] = (16, 8),
    outputs: int = 3,
    *,
    loss: str = "mse",
    optimizer: dict[str, Any] | None = None,
    seed: int = 0,
    activation: str = "tanh",
) -> dict[str, Any]:
    layers: list[dict[str, Any]] = [{"units": u, "activation": activation} for u in hidden]
    out_activation = {"mse": "identity", "softmax_cross_entropy": "softmax"}[loss]
    layers.append({"units": outputs, "activation": out_activation})
    return {
        "input_dim": input_dim,
        "layers": layers,
        "loss": loss,
        "optimizer": optimizer or {"name": "adam", "lr": 0.01},
        "seed": seed,
    }


def make_batches(spec: dict[str, Any], count: int, *, seed: int, rows: int = 8) -> list[Batch]:
    """Seeded batches for ``spec``: float32 inputs; float32 targets for mse, int64 class
    labels for softmax cross-entropy. Batch sizes vary (rows, rows + 3, ...)."""
    rng = np.random.default_rng(seed)
    n_in, n_out = spec["input_dim"], spec["layers"][-1]["units"]
    batches = []
    for i in range(count):
        n = rows + 3 * (i % 2)
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        if spec["loss"] == "mse":
            y: Array = rng.standard_normal((n, n_out)).astype(np.float32)
        else:
            y = rng.integers(0, n_out, size=n).astype(np.int64)
        batches.append((x, y))
    return batches


def probe(spec: dict[str, Any], rows: int = 4, seed: int = 99) -> Array:
    return np.random.default_rng(seed).standard_normal((rows, spec["input_dim"])).astype(np.float32)


def replay(spec: dict[str, Any], batches: list[Batch]) -> dict[int, Params]:
    """Train a fresh in-process network on ``batches``: its snapshot after each step, by step
    (snapshots are immutable, so keeping them is safe)."""
    net = Network(ModelSpec.from_dict(spec))
    snapshots = {0: net.params}
    for x, y in batches:
        net.train_step(x, y)
        snapshots[net.step] = net.params
    return snapshots


def outputs_at(spec: dict[str, Any], params: Params, x: Array) -> Array:
    return forward(ModelSpec.from_dict(spec), params, x)


def weights_file(store: Path, model: str, version: int) -> Path:
    return store / model / "versions" / str(version) / "weights.safetensors"


def assert_same_array(got: Array, want: Array, what: str) -> None:
    """Bit-identical, dtype included; on failure show both and the largest difference."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if not np.array_equal(got, want):
        diff = np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))
        pytest.fail(f"{what}: not bit-identical (max |diff| {diff:g})\nours {got}\nref  {want}")


def exact_and_bound(params: Params, x: Array) -> tuple[Array, Array]:
    """A tanh/identity network's outputs for ``x`` computed in float64 from its float32
    parameters, and a bound on how far any float32 forward pass may be from them, whatever
    the order of its sums (a batched pass sums in another order than a pass over ``x``
    alone).

    The bound is the standard one for dot products (Higham, Accuracy and Stability of
    Numerical Algorithms, 3.1): a float32 sum of n products is within gamma_n = n*u/(1-n*u)
    of |a|.|w| of the exact one, u = 2**-24; one more rounding for the bias and one for the
    activation; and tanh and identity pass an input error on at most unchanged (their
    slopes are at most 1), so the errors of a layer's inputs reach its outputs through |W|.
    """
    u = 2.0**-24
    a = x.astype(np.float64)
    magnitude = np.abs(a)
    bound = np.zeros_like(a)
    last = len(params.weights) - 1
    for i, (w, b) in enumerate(zip(params.weights, params.biases, strict=True)):
        w64, b64 = w.astype(np.float64), b.astype(np.float64)
        n = w.shape[0] + 2
        gamma = n * u / (1 - n * u)
        magnitude = magnitude @ np.abs(w64) + np.abs(b64)
        bound = bound @ np.abs(w64) + gamma * magnitude + u * magnitude
        a = a @ w64 + b64
        if i < last:
            a = np.tanh(a)
            magnitude = np.abs(a)
    return a, bound


def close_to(got: Array, want: tuple[Array, Array]) -> bool:
    """Within the float32 rounding bound of the exact outputs (see exact_and_bound), and no
    further."""
    exact, bound = want
    difference = np.abs(got.astype(np.float64) - exact)
    return got.shape == exact.shape and bool((difference <= bound).all())


def assert_same_network(got: Network, want: Network, what: str) -> None:
    """Same parameters, optimizer slots and step, bit for bit."""
    assert got.step == want.step, f"{what}: step {got.step}, expected {want.step}"
    assert_same_array(got.params.flat, want.params.flat, f"{what}: parameters")
    _, got_slots, _ = got.export_state()
    _, want_slots, _ = want.export_state()
    assert sorted(got_slots) == sorted(want_slots), f"{what}: optimizer slots differ"
    for name in want_slots:
        assert_same_array(got_slots[name], want_slots[name], f"{what}: optimizer slot {name}")


@pytest.fixture
def grpc_client(server: ServerProcess) -> Iterator[GrpcClient]:
    with GrpcClient(server.grpc_target, timeout=WAIT) as client:
        yield client


@pytest.fixture
def rest_client(server: ServerProcess) -> Iterator[RestClient]:
    with RestClient(server.rest_url, timeout=WAIT) as client:
        yield client


# -- training over the wire is training ------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        mlp(optimizer={"name": "adam", "lr": 0.01}, seed=11),
        mlp(
            loss="softmax_cross_entropy",
            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
            seed=12,
            activation="relu",
        ),
    ],
    ids=["mse-adam", "softmax-sgd-nesterov"],
)
def test_grpc_training_is_bit_identical_and_rest_predicts_it_at_once(
    server: ServerProcess,
    grpc_client: GrpcClient,
    rest_client: RestClient,
    spec: dict[str, Any],
) -> None:
    name = f"wire-{spec['seed']}"
    batches = make_batches(spec, 9, seed=spec["seed"])
    grpc_client.create_model(name, spec)

    results = grpc_client.train(name, batches)

    net = Network(ModelSpec.from_dict(spec))
    expected = [net.train_step(x, y) for x, y in batches]
    assert [r.step for r in results] == list(range(1, len(batches) + 1))
    assert [r.loss for r in results] == [e.loss for e in expected]
    assert [r.accuracy for r in results] == [e.accuracy for e in expected]
    assert [r.batch_size for r in results] == [len(x) for x, _ in batches]

    # Right after the stream ends, REST answers with the trained weights.
    x = probe(spec)
    prediction = rest_client.predict(name, x)
    assert prediction.version is None
    assert prediction.step == len(batches)
    assert_same_array(prediction.outputs, net.forward(x), "REST prediction vs engine forward")
    assert_same_array(
        prediction.outputs, forward(net.spec, net.params, x), "REST prediction vs forward()"
    )

    # The saved version on disk is the in-process network, weights and optimizer state.
    version = grpc_client.save_version(name)
    data = weights_file(server.store, name, version.version).read_bytes()
    assert version.sha256 == hashlib.sha256(data).hexdigest()
    assert version.step == len(batches)
    assert_same_network(Network.from_bytes(data), net, "saved version vs in-process network")
    assert data == net.to_bytes(), "the saved file is not byte-identical to the engine's state"


# -- one writer per model, models independent --------------------------------------------


def test_steps_on_one_model_are_serialised_with_no_lost_update(
    server: ServerProcess, rest_client: RestClient
) -> None:
    spec = mlp(optimizer={"name": "adam", "lr": 0.01}, seed=21)
    name = "serial"
    per_stream = 25
    streams = [make_batches(spec, per_stream, seed=210 + i) for i in range(2)]
    with GrpcClient(server.grpc_target, timeout=WAIT) as admin:
        admin.create_model(name, spec)
    results: list[list[StepResult]] = [[], []]
    failures: list[BaseException] = []
    start = threading.Barrier(2, timeout=WAIT)

    def run(i: int) -> None:
        try:
            with GrpcClient(server.grpc_target, timeout=WAIT) as client:
                start.wait()
                results[i] = client.train(name, streams[i])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a training stream did not finish"
    assert not failures, failures

    total = 2 * per_stream
    steps = sorted(r.step for rs in results for r in rs)
    assert steps == list(range(1, total + 1)), "steps were lost or duplicated"
    for rs in results:  # each stream's own steps are in order
        assert [r.step for r in rs] == sorted(r.step for r in rs)
    assert rest_client.get_model(name).head_step == total

    # No lost update: the head equals the engine trained on the batches in step order.
    by_step = {
        r.step: batch
        for rs, batches in zip(results, streams, strict=True)
        for r, batch in zip(rs, batches, strict=True)
    }
    ordered = [by_step[s] for s in range(1, total + 1)]
    reference = replay(spec, ordered)
    x = probe(spec)
    assert_same_array(
        rest_client.predict(name, x).outputs,
        outputs_at(spec, reference[total], x),
        "head after two concurrent streams vs engine replay in step order",
    )
    # And the losses each stream saw are the engine's, step by step.
    net = Network(ModelSpec.from_dict(spec))
    losses = {}
    for bx, by in ordered:
        result = net.train_step(bx, by)
        losses[result.step] = result.loss
    assert all(r.loss == losses[r.step] for rs in results for r in rs)


def test_different_models_train_in_parallel(server: ServerProcess) -> None:
    """While one long step runs on a big model, a second model completes steps: each model has
    its own writer. (Asserts overlap, not speed.)"""
    big = mlp(256, (1024, 1024), 10, optimizer={"name": "sgd", "lr": 1e-5}, seed=31)
    small = mlp(optimizer={"name": "sgd", "lr": 0.01}, seed=32)
    rng = np.random.default_rng(31)
    big_batch = (
        rng.standard_normal((4096, 256)).astype(np.float32),
        rng.standard_normal((4096, 10)).astype(np.float32),
    )
    small_batches = make_batches(small, 2000, seed=32)
    with GrpcClient(server.grpc_target, timeout=60) as admin:
        admin.create_model("parallel-big", big)
        admin.create_model("parallel-small", small)
        admin.train_step("parallel-big", *big_batch)  # warm up the big model's buffers

    big_started = threading.Event()
    big_done = threading.Event()
    times: dict[str, float] = {}
    small_times: list[float] = []
    failures: list[BaseException] = []

    def big_stream() -> Iterator[Batch]:
        times["big_sent"] = time.monotonic()
        big_started.set()
        yield big_batch

    class Clock(Progress):
        def update(self, result: StepResult) -> None:
            small_times.append(time.monotonic())

    def small_stream() -> Iterator[Batch]:
        for batch in small_batches:
            if big_done.is_set():
                return
            yield batch

    def run_big() -> None:
        try:
            with GrpcClient(server.grpc_target, timeout=60) as client:
                client.train("parallel-big", big_stream())
                times["big_done"] = time.monotonic()
        except BaseException as exc:
            failures.append(exc)
        finally:
            big_done.set()

    def run_small() -> None:
        try:
            with GrpcClient(server.grpc_target, timeout=60) as client:
                assert big_started.wait(WAIT)
                time.sleep(0.1)  # the big step has surely begun
                times["small_start"] = time.monotonic()
                client.train("parallel-small", small_stream(), progress=Clock(stream=io.StringIO()))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run_big), threading.Thread(target=run_small)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures
    during = [t for t in small_times if times["small_start"] < t < times["big_done"]]
    assert times["big_done"] - times["big_sent"] > 0.15, "the big step was too quick to tell"
    assert len(during) >= 3, (
        f"only {len(during)} steps of another model finished during one "
        f"{times['big_done'] - times['big_sent']:.2f}s step: models do not train in parallel"
    )


# -- a prediction sees exactly one step ------------------------------------------------------


def test_predictions_never_see_a_mix_of_two_steps(server: ServerProcess) -> None:
    """Torn-read detector: adam moves every parameter of every layer at every step, so the
    probe's outputs for step s are unique to s, and outputs computed from layers of different
    steps match no step at all. Every prediction taken while training streams must be the
    outputs for the step it reports, to float32 rounding (see exact_and_bound): concurrent
    predictions share batched forward passes, whose sums round in another order than a pass
    over the probe alone. A torn read is off by orders of magnitude more."""
    spec = mlp(16, (64, 64), 4, optimizer={"name": "adam", "lr": 1e-3}, seed=41)
    name = "torn"
    steps = 60
    batches = make_batches(spec, steps, seed=41, rows=32)
    x = probe(spec, rows=3)
    with GrpcClient(server.grpc_target, timeout=WAIT) as admin:
        admin.create_model(name, spec)

    reference = replay(spec, batches)
    expected = [exact_and_bound(reference[s], x) for s in range(steps + 1)]
    # The detector's power: every step's outputs are distinct, and a torn read (first layer of
    # one step, the rest of the next) matches neither step.
    assert len({outputs_at(spec, reference[s], x).tobytes() for s in reference}) == steps + 1
    for s in range(steps + 1):  # the engine's own float32 pass is within the bound
        assert close_to(outputs_at(spec, reference[s], x), expected[s])
    for s in (0, steps // 2, steps - 1):
        a, b = reference[s], reference[s + 1]
        torn = Params(b.flat, (a.weights[0], *b.weights[1:]), (a.biases[0], *b.biases[1:]), s)
        mixed = outputs_at(spec, torn, x)
        assert not close_to(mixed, expected[s]) and not close_to(mixed, expected[s + 1])
        assert not close_to(outputs_at(spec, reference[s], x), expected[s + 1])

    training_done = threading.Event()
    observed: list[tuple[str, int, Array]] = []
    failures: list[BaseException] = []

    def paced() -> Iterator[Batch]:
        for batch in batches:
            time.sleep(0.005)
            yield batch

    def predictor(kind: str) -> None:
        client: GrpcClient | RestClient = (
            GrpcClient(server.grpc_target, timeout=WAIT)
            if kind == "grpc"
            else RestClient(server.rest_url, timeout=WAIT)
        )
        try:
            with client:
                for _ in range(5000):  # bounded; stops when training is done
                    p = client.predict(name, x)
                    observed.append((kind, p.step, p.outputs))
                    if training_done.is_set():
                        break
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=predictor, args=(k,)) for k in ("grpc", "rest") * 2]
    for t in threads:
        t.start()
    try:
        with GrpcClient(server.grpc_target, timeout=WAIT) as trainer:
            results = trainer.train(name, paced())
    finally:
        training_done.set()
        for t in threads:
            t.join(WAIT)
    assert not failures, failures
    assert [r.step for r in results] == list(range(1, steps + 1))

    for kind, step, outputs in observed:
        assert 0 <= step <= steps
        assert outputs.dtype == np.float32
        assert close_to(outputs, expected[step]), (
            f"{kind} prediction reporting step {step}: {outputs} is not {expected[step][0]}"
        )
    seen = {step for _, step, _ in observed}
    assert len(seen) >= 5, f"predictions saw only steps {sorted(seen)}: too little overlap"
    assert {kind for kind, _, _ in observed} == {"grpc", "rest"}


def test_a_train_stream_in_lockstep_gets_each_answer_before_it_sends_the_next_batch(
    grpc_client: GrpcClient,
) -> None:
    """A client that waits for each step's answer before it sends the next batch gets every
    answer at once: the worker holds a result back only while another step is queued behind
    it (see dispatch.Serial); holding it here would leave the stream waiting forever."""
    spec = mlp(seed=33)
    name = "lockstep"
    batches = make_batches(spec, 6, seed=33)
    grpc_client.create_model(name, spec)
    answered = threading.Semaphore(0)
    waits: list[bool] = []

    def lockstep() -> Iterator[Batch]:
        for i, batch in enumerate(batches):
            if i:
                waits.append(answered.acquire(timeout=10))
            yield batch

    recorder = _Recorder(lambda result: answered.release())
    results = grpc_client.train(name, lockstep(), progress=recorder)
    assert waits == [True] * (len(batches) - 1)
    assert [r.step for r in results] == list(range(1, len(batches) + 1))


# -- versions, labels, rollback, retention ---------------------------------------------------


def test_autosave_every_n_steps(grpc_client: GrpcClient, rest_client: RestClient) -> None:
    spec = mlp(seed=51)
    name = "autosave"
    batches = make_batches(spec, 10, seed=51)
    model = grpc_client.create_model(name, spec, autosave_every=3)
    assert model.settings["autosave_every"] == 3

    results = grpc_client.train(name, batches)

    saved = {r.step: r.saved_version for r in results if r.saved_version is not None}
    assert saved == {3: 1, 6: 2, 9: 3}
    versions = rest_client.list_versions(name)
    assert [(v.version, v.step, v.parent) for v in versions] == [
        (1, 3, None),
        (2, 6, 1),
        (3, 9, 2),
    ]
    # A version records its last batch's loss and the mean over the steps it adds (summed
    # in step order on both sides, so the means agree to the bit).
    assert [v.metrics["last_loss"] for v in versions] == [results[s - 1].loss for s in (3, 6, 9)]
    means = [sum(r.loss for r in results[s - 3 : s]) / 3 for s in (3, 6, 9)]
    assert [v.metrics["mean_loss"] for v in versions] == means
    info = rest_client.get_model(name)
    assert (info.head_step, info.latest_version, info.unsaved_steps) == (10, 3, 1)
    # Each autosaved version is the engine's state at its step.
    reference = replay(spec, batches)
    x = probe(spec)
    for v in versions:
        p = rest_client.predict(name, x, version=v.version)
        assert (p.version, p.step) == (v.version, v.step)
        assert_same_array(p.outputs, outputs_at(spec, reference[v.step], x), f"version {v.version}")


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_labels_set_move_remove_and_predict_by_label_and_version(
    grpc_client: GrpcClient, rest_client: RestClient, transport: str
) -> None:
    client: GrpcClient | RestClient = grpc_client if transport == "grpc" else rest_client
    spec = mlp(seed=61)
    name = f"labels-{transport}"
    batches = make_batches(spec, 4, seed=61)
    reference = replay(spec, batches)
    x = probe(spec)
    client.create_model(name, spec)
    client.train(name, batches[:2])
    v1 = client.save_version(name)
    client.train(name, batches[2:])
    v2 = client.save_version(name)
    assert (v1.version, v1.step, v2.version, v2.step, v2.parent) == (1, 2, 2, 4, 1)

    def answers(**source: Any) -> tuple[int | None, int]:
        p = client.predict(name, x, **source)
        assert_same_array(p.outputs, outputs_at(spec, reference[p.step], x), f"{source}")
        return p.version, p.step

    assert client.set_label(name, "stable", 1).labels == {"stable": 1}
    assert answers(label="stable") == (1, 2)
    assert answers(version=2) == (2, 4)
    assert answers() == (None, 4)
    assert [v.labels for v in client.list_versions(name)] == [("stable",), ()]

    # Move: the label now names version 2, on both transports.
    assert client.set_label(name, "stable", 2).labels == {"stable": 2}
    assert answers(label="stable") == (2, 4)
    assert rest_client.get_model(name).labels == grpc_client.get_model(name).labels == {"stable": 2}
    assert answers(version=1) == (1, 2)

    # Remove: predicting by the label is NotFound, versions stay.
    assert client.remove_label(name, "stable").labels == {}
    with pytest.raises(NotFound, match="stable"):
        client.predict(name, x, label="stable")
    with pytest.raises(NotFound):
        client.set_label(name, "stable", 99)
    assert [v.version for v in client.list_versions(name)] == [1, 2]


def test_rollback_restores_weights_and_optimizer_state(
    server: ServerProcess, grpc_client: GrpcClient, rest_client: RestClient
) -> None:
    spec = mlp(optimizer={"name": "adam", "lr": 0.02}, seed=71)
    name = "rollback"
    first, second, after = (make_batches(spec, 3, seed=s) for s in (710, 711, 712))
    grpc_client.create_model(name, spec)
    grpc_client.train(name, first)
    v1 = grpc_client.save_version(name)
    grpc_client.train(name, second)
    v2 = grpc_client.save_version(name)
    assert (v1.step, v2.step) == (3, 6)

    model = rest_client.rollback(name, version=v1.version)
    assert (model.head_step, model.unsaved_steps) == (3, 0)
    x = probe(spec)
    p = grpc_client.predict(name, x)
    assert p.step == 3

    # Continuing after the rollback equals continuing the saved version in process...
    loaded = Network.from_bytes(weights_file(server.store, name, v1.version).read_bytes())
    assert_same_array(p.outputs, loaded.forward(x), "head after rollback vs version 1")
    results = rest_client.train(name, after)
    expected = [loaded.train_step(bx, by) for bx, by in after]
    assert [r.loss for r in results] == [e.loss for e in expected]
    assert [r.step for r in results] == [4, 5, 6]
    assert_same_array(rest_client.predict(name, x).outputs, loaded.forward(x), "after rollback")
    # ... and differs from continuing v1's weights with a fresh optimizer: the state matters.
    fresh = Network(loaded.spec, np.array(replay(spec, first)[3].flat), step=3)
    assert [fresh.train_step(bx, by).loss for bx, by in after] != [e.loss for e in expected]

    # The next version records its parent, and its bytes are the in-process state.
    v3 = grpc_client.save_version(name)
    assert (v3.version, v3.step, v3.parent) == (3, 6, v1.version)
    assert weights_file(server.store, name, 3).read_bytes() == loaded.to_bytes()
    # Rollback by label works too.
    grpc_client.set_label(name, "good", v2.version)
    assert grpc_client.rollback(name, label="good").head_step == v2.step
    assert_same_array(
        grpc_client.predict(name, x).outputs,
        grpc_client.predict(name, x, version=v2.version).outputs,
        "head after rollback to label 'good' vs version 2",
    )


def test_retention_keeps_last_k_plus_labelled(
    server: ServerProcess, grpc_client: GrpcClient, rest_client: RestClient
) -> None:
    spec = mlp(seed=81)
    name = "retention"
    batches = make_batches(spec, 6, seed=81)
    grpc_client.create_model(name, spec, retain=2)
    x = probe(spec)
    for i, (bx, by) in enumerate(batches[:6]):
        grpc_client.train_step(name, bx, by)
        saved = grpc_client.save_version(name)
        assert saved.version == i + 1
        if i == 1:
            grpc_client.set_label(name, "keep", 2)

    assert [v.version for v in rest_client.list_versions(name)] == [2, 5, 6]
    on_disk = sorted(int(p.name) for p in (server.store / name / "versions").iterdir())
    assert on_disk == [2, 5, 6]
    with pytest.raises(NotFound):
        rest_client.predict(name, x, version=4)
    kept = rest_client.predict(name, x, label="keep")
    assert (kept.version, kept.step) == (2, 2)
    # Version numbers are never reused.
    assert grpc_client.save_version(name).version == 7
    # Unlabelling lets retention take the old version at the next save.
    grpc_client.remove_label(name, "keep")
    grpc_client.train_step(name, *batches[0])
    grpc_client.save_version(name)
    assert [v.version for v in rest_client.list_versions(name)] == [7, 8]


# -- shutdown and crashes ------------------------------------------------------------------


class _Recorder(Progress):
    """A progress display that records results as they arrive (and shows nothing)."""

    def __init__(self, on_result: Any = None) -> None:
        super().__init__(stream=io.StringIO())
        self.results: list[tuple[float, StepResult]] = []
        self.on_result = on_result

    def update(self, result: StepResult) -> None:
        self.results.append((time.monotonic(), result))
        if self.on_result is not None:
            self.on_result(result)


def _predictor(
    process: ServerProcess,
    kind: str,
    name: str,
    x: Array,
    stop: threading.Event,
    observed: list[tuple[int, Array]],
    errors: list[BaseException],
) -> None:
    client: GrpcClient | RestClient = (
        GrpcClient(process.grpc_target, timeout=WAIT, retry=NO_RETRY)
        if kind == "grpc"
        else RestClient(process.rest_url, timeout=WAIT, retry=NO_RETRY)
    )
    with client:
        for _ in range(20000):
            if stop.is_set() or process.process.poll() is not None:
                return
            try:
                p = client.predict(name, x)
                observed.append((p.step, p.outputs))
            except Unavailable:
                time.sleep(0.01)
            except ClientError as exc:
                if kind != "grpc" or exc.status != "CANCELLED":
                    raise
                # A call that reaches the server as the drain begins may be CANCELLED rather
                # than UNAVAILABLE: see test_calls_arriving_while_draining_are_unavailable.
                time.sleep(0.01)
            except BaseException as exc:
                errors.append(RuntimeError(f"{kind} predictor: {exc!r}"))
                return


def test_sigterm_drains_saves_unsaved_heads_and_restarts(tmp_path: Path) -> None:
    spec = mlp(16, (32,), 4, seed=91)
    name = "drain"
    batches = make_batches(spec, 28, seed=91)
    saved_steps, unsaved_steps = 5, 3
    stream = batches[saved_steps + unsaved_steps :]
    reference = replay(spec, batches)
    x = probe(spec)
    store = tmp_path / "store"
    process = start_server(store)
    try:
        with GrpcClient(process.grpc_target, timeout=WAIT) as client:
            client.create_model(name, spec)
            client.train(name, batches[:saved_steps])
            client.save_version(name)
            client.train(name, batches[saved_steps : saved_steps + unsaved_steps])
            other = client.create_model("untouched", mlp(seed=92))
            assert other.head_step == 0

        midway = threading.Event()
        stop = threading.Event()
        not_serving = threading.Event()
        failures: list[BaseException] = []
        observed: list[tuple[int, Array]] = []
        ready_polls: list[tuple[float, int | None]] = []
        health: list[tuple[float, int]] = []
        recorder = _Recorder()

        def paced() -> Iterator[Batch]:
            for i, batch in enumerate(stream):
                if i == 5:
                    midway.set()
                time.sleep(0.04)
                yield batch

        def train() -> None:
            try:
                with GrpcClient(process.grpc_target, timeout=WAIT, retry=NO_RETRY) as client:
                    client.train(name, paced(), progress=recorder)
            except BaseException as exc:
                failures.append(RuntimeError(f"training stream: {exc!r}"))

        channel = grpc.insecure_channel(process.grpc_target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=WAIT
        )

        def watch_health() -> None:
            try:
                for response in watch:
                    health.append((time.monotonic(), response.status))
                    if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        not_serving.set()
                        watch.cancel()
            except grpc.RpcError:
                pass  # cancelled by us, or the server went away

        def poll_ready() -> None:
            with httpx.Client(base_url=process.rest_url, timeout=2.0) as http:
                for _ in range(2000):
                    if stop.is_set() or process.process.poll() is not None:
                        return
                    sent = time.monotonic()
                    try:
                        ready_polls.append((sent, http.get("/readyz").status_code))
                    except httpx.HTTPError:
                        ready_polls.append((sent, None))
                    time.sleep(0.01)

        threads = [
            threading.Thread(target=train),
            threading.Thread(target=watch_health),
            threading.Thread(target=poll_ready),
            *(
                threading.Thread(
                    target=_predictor, args=(process, k, name, x, stop, observed, failures)
                )
                for k in ("grpc", "rest")
            ),
        ]
        for t in threads:
            t.start()
        try:
            assert midway.wait(WAIT), "the training stream did not start"
            for _ in range(int(WAIT / 0.01)):  # predictions and readiness polls are running
                if observed and ready_polls:
                    break
                time.sleep(0.01)
            terminated = time.monotonic()
            process.process.send_signal(signal.SIGTERM)
            assert not_serving.wait(WAIT), f"gRPC health never said NOT_SERVING: {health}"
            code = process.process.wait(WAIT)
        finally:
            stop.set()
            for t in threads:
                t.join(WAIT)
            channel.close()
        assert code == 0, process.log()
        assert not failures, failures

        # Readiness was true before, and false from the moment health said NOT_SERVING.
        assert ready_polls and ready_polls[0][1] == 200, ready_polls[:3]
        went_down = next(t for t, status in health if status != SERVING)
        assert all(status != 200 for t, status in ready_polls if t > went_down), ready_polls
        assert health[0][1] == SERVING
        # The in-flight stream finished: every batch answered, some after SIGTERM.
        steps = [r.step for _, r in recorder.results]
        final = saved_steps + unsaved_steps + len(stream)
        assert steps == list(range(saved_steps + unsaved_steps + 1, final + 1))
        assert any(t > terminated for t, _ in recorder.results)
        # Every prediction, before or during the drain, was exactly one step's outputs.
        assert observed
        for step, outputs in observed:
            assert_same_array(outputs, outputs_at(spec, reference[step], x), f"step {step}")
        log = process.log()
        assert "saved_on_shutdown" in log
    finally:
        process.kill()

    restarted = start_server(store)
    try:
        with GrpcClient(restarted.grpc_target, timeout=WAIT) as client:
            info = client.get_model(name)
            assert (info.head_step, info.latest_version, info.unsaved_steps) == (final, 2, 0)
            versions = client.list_versions(name)
            assert [(v.version, v.step, v.parent) for v in versions] == [
                (1, saved_steps, None),
                (2, final, 1),
            ]
            for v in versions:
                data = weights_file(store, name, v.version).read_bytes()
                assert hashlib.sha256(data).hexdigest() == v.sha256
            head = client.predict(name, x)
            assert head.step == final
            assert_same_array(head.outputs, outputs_at(spec, reference[final], x), "head")
            first = client.predict(name, x, version=1)
            assert_same_array(first.outputs, outputs_at(spec, reference[saved_steps], x), "v1")
            # A model with nothing unsaved was not given a version.
            assert client.list_versions("untouched") == []
            assert client.get_model("untouched").head_step == 0
    finally:
        assert restarted.stop() == 0


# A child that runs ``propserve serve`` with SIGTERM sent to itself at one moment of
# start-up: before the server starts, or the moment it has said it is ready.
_SIGNAL_DURING_START = """
import asyncio, os, signal, sys
import propserve.service.server as server
from propserve.cli import main

real_start = server.start

async def start(settings, **options):
    if sys.argv[1] == "before":
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0)
    started = await real_start(settings, **options)
    if sys.argv[1] == "after-ready":
        os.kill(os.getpid(), signal.SIGTERM)
    return started

server.start = start
sys.exit(main(["serve"]))
"""


@pytest.mark.parametrize("moment", ["before", "after-ready"])
def test_sigterm_during_start_up_drains_instead_of_killing(tmp_path: Path, moment: str) -> None:
    """An orchestrator may stop a server it has just seen ready; that is a drain, exit 0."""
    env = {
        **os.environ,
        "PROPSERVE_REST_PORT": "0",
        "PROPSERVE_GRPC_PORT": "0",
        "PROPSERVE_STORE": str(tmp_path / "store"),
        "PROPSERVE_GRACE_SECONDS": "5",
    }
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_DURING_START, moment],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "server.ready" in done.stderr and "server.stopped" in done.stderr, done.stderr


def test_sigkill_keeps_every_saved_version_and_resumes_from_the_latest(tmp_path: Path) -> None:
    spec = mlp(16, (32,), 4, seed=95)
    name = "crash"
    batches = make_batches(spec, 400, seed=95)
    reference = replay(spec, batches)
    x = probe(spec)
    store = tmp_path / "store"
    process = start_server(store)
    saved: list[int] = []
    three_saved = threading.Event()

    def on_result(result: StepResult) -> None:
        if result.saved_version is not None:
            saved.append(result.saved_version)
            if len(saved) >= 3:
                three_saved.set()

    failures: list[BaseException] = []

    def paced() -> Iterator[Batch]:
        for batch in batches:
            time.sleep(0.003)
            yield batch

    def train() -> None:
        try:
            with GrpcClient(process.grpc_target, timeout=WAIT, retry=NO_RETRY) as client:
                client.train(name, paced(), progress=_Recorder(on_result))
        except BaseException as exc:
            failures.append(exc)

    try:
        with GrpcClient(process.grpc_target, timeout=WAIT) as client:
            client.create_model(name, spec, autosave_every=4)
        trainer = threading.Thread(target=train)
        trainer.start()
        assert three_saved.wait(WAIT), "no autosaves observed"
        process.kill()  # SIGKILL, mid-stream
        trainer.join(WAIT)
        assert not trainer.is_alive()
    finally:
        process.kill()
    assert len(failures) == 1 and isinstance(failures[0], ClientError), failures
    assert process.process.returncode == -signal.SIGKILL

    restarted = start_server(store)
    try:
        with GrpcClient(restarted.grpc_target, timeout=WAIT) as client:
            versions = client.list_versions(name)
            numbers = [v.version for v in versions]
            assert set(saved) <= set(numbers), (saved, numbers)
            assert numbers == list(range(1, len(numbers) + 1))
            for v in versions:
                assert v.step == 4 * v.version
                data = weights_file(store, name, v.version).read_bytes()
                assert hashlib.sha256(data).hexdigest() == v.sha256
                loaded = Network.from_bytes(data)
                assert loaded.step == v.step
                assert_same_array(loaded.params.flat, reference[v.step].flat, f"v{v.version}")
                p = client.predict(name, x, version=v.version)
                assert_same_array(p.outputs, outputs_at(spec, reference[v.step], x), "predict")
            latest = versions[-1]
            info = client.get_model(name)
            assert (info.head_step, info.latest_version, info.unsaved_steps) == (
                latest.step,
                latest.version,
                0,
            )
            head = client.predict(name, x)
            assert head.step == latest.step
            assert_same_array(head.outputs, outputs_at(spec, reference[latest.step], x), "head")
            # Training resumes from there, bit-identical to the engine continuing that version.
            resumed = Network.from_bytes(weights_file(store, name, latest.version).read_bytes())
            nxt = batches[latest.step]
            result = client.train_step(name, *nxt)
            assert (result.step, result.loss) == (latest.step + 1, resumed.train_step(*nxt).loss)
    finally:
        assert restarted.stop() == 0


def test_calls_arriving_while_draining_are_unavailable_never_cancelled(tmp_path: Path) -> None:
    spec = mlp(16, (32,), 4, seed=97)
    x = probe(spec)
    others: list[BaseException] = []
    for attempt in range(3):  # the window is a few milliseconds wide: a few tries
        process = start_server(tmp_path / f"store-{attempt}")
        stop = threading.Event()
        observed: list[tuple[int, Array]] = []

        def hammer(
            process: ServerProcess = process,
            stop: threading.Event = stop,
            observed: list[tuple[int, Array]] = observed,
        ) -> None:
            with GrpcClient(process.grpc_target, timeout=WAIT, retry=NO_RETRY) as client:
                for _ in range(100000):
                    if stop.is_set() or process.process.poll() is not None:
                        return
                    try:
                        p = client.predict("m", x)
                        observed.append((p.step, p.outputs))
                    except Unavailable:
                        time.sleep(0.002)
                    except ClientError as exc:
                        others.append(exc)
                        return

        try:
            with GrpcClient(process.grpc_target, timeout=WAIT) as client:
                client.create_model("m", spec)
            threads = [threading.Thread(target=hammer) for _ in range(6)]
            for t in threads:
                t.start()
            for _ in range(int(WAIT / 0.01)):
                if len(observed) >= 50:
                    break
                time.sleep(0.01)
            process.process.send_signal(signal.SIGTERM)
            assert process.process.wait(WAIT) == 0
        finally:
            stop.set()
            for t in threads:
                t.join(WAIT)
            process.kill()
        if others:
            break
    assert others == []
