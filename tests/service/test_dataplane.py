"""The data plane (service.dataplane, batching, workers, busypoll), in process: who shares a
forward pass and what each caller gets back, ordered queues, admission, busy polling, the
call context (draining, authorisation, metrics, logs) and the Train stream's pipeline."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from propserve import wire
from propserve.engine import ModelSpec, forward
from propserve.service import dataplane
from propserve.service.auth import Authenticator
from propserve.service.busypoll import BusyPoll
from propserve.service.config import Settings
from propserve.service.dataplane import Batch, DataPlane
from propserve.service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TooBusy,
    Unauthenticated,
    Unavailable,
)
from propserve.service.metrics import Metrics
from propserve.service.models import Models, Prediction
from propserve.service.store import ModelStore
from propserve.service.workers import TwoPhase

T = TypeVar("T")

SPEC: dict[str, Any] = {
    "input_dim": 8,
    "layers": [
        {"units": 16, "activation": "tanh"},
        {"units": 3, "activation": "identity"},
    ],
    "loss": "mse",
    "optimizer": {"name": "sgd", "lr": 0.1},
    "dtype": "float64",
    "seed": 3,
}
RELU_SPEC: dict[str, Any] = {
    **SPEC,
    "layers": [{"units": 16, "activation": "relu"}, {"units": 3, "activation": "identity"}],
    "dtype": "float32",
}
#: SPEC's parameters: 8 x 16 + 16 + 16 x 3 + 3.
N_PARAMS = 195


@pytest.fixture
def models(tmp_path: Path) -> Iterator[Models]:
    opened = Models(ModelStore(tmp_path / "store"), Settings(store=tmp_path / "store"))
    opened.create_model("m", SPEC)
    opened.create_model("r", RELU_SPEC)
    yield opened
    opened.close()


def plane_for(models: Models, tokens: dict[str, str] | None = None, **settings: Any) -> DataPlane:
    merged = Settings(store=models.store.root, **settings)
    return DataPlane(models, Authenticator(tokens or {}), models.metrics, merged)


def rows(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, 8))


def passes(metrics: Metrics, model: str = "m") -> tuple[int, float]:
    """(forward passes, rows computed): the batch-size histogram as /metrics shows it."""
    text = metrics.render().decode()
    found = {}
    for kind in ("count", "sum"):
        pattern = rf'^propserve_predict_batch_rows_{kind}{{model="{model}"}} (\S+)$'
        match = re.search(pattern, text, re.MULTILINE)
        found[kind] = float(match.group(1)) if match else 0.0
    return int(found["count"]), found["sum"]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def together(plane: DataPlane, requests: list[dict[str, Any]]) -> list[Any]:
    """Every prediction started in one turn of the loop; each answer, or its error."""
    calls = [plane.predict(**request) for request in requests]
    return list(await asyncio.gather(*calls, return_exceptions=True))


def expected(models: Models, x: np.ndarray[Any, Any], name: str = "m") -> np.ndarray[Any, Any]:
    model = models._models[name]  # the head's weights, as the engine would use them
    return forward(model.spec, model.head.params, x)


# -- batching ----------------------------------------------------------------------------------


def test_predictions_arriving_together_share_one_forward_pass(models: Models) -> None:
    plane = plane_for(models)
    inputs = [rows(n, seed) for seed, n in enumerate((1, 3, 2, 5))]
    try:
        answers = run(together(plane, [{"name": "m", "inputs": x} for x in inputs]))
    finally:
        plane.close()
    assert passes(models.metrics) == (1, 11.0)
    for x, answer in zip(inputs, answers, strict=True):
        assert isinstance(answer, Prediction)
        assert answer.outputs.shape == (len(x), 3)
        assert answer.version is None and answer.step == 0
        # Each caller gets its own rows: the engine's outputs to rounding (a batched matrix
        # product may round differently, in float64 a few ulp of 1e-16 per layer).
        np.testing.assert_allclose(answer.outputs, expected(models, x), rtol=1e-12, atol=1e-15)


def test_a_lone_prediction_is_exactly_the_engines_forward(models: Models) -> None:
    plane = plane_for(models)
    x = rows(4)
    try:
        answer = run(plane.predict("m", x))
    finally:
        plane.close()
    assert np.array_equal(answer.outputs, expected(models, x))


def test_batches_hold_at_most_batch_rows_and_a_larger_query_runs_alone(models: Models) -> None:
    plane = plane_for(models, batch_rows=4)
    sizes = (3, 1, 2, 9, 1)
    try:
        answers = run(
            together(plane, [{"name": "m", "inputs": rows(n, i)} for i, n in enumerate(sizes)])
        )
    finally:
        plane.close()
    # [3, 1], [2], [9], [1]: in order, never over 4 rows unless one query alone is larger.
    assert passes(models.metrics) == (4, 16.0)
    assert [a.outputs.shape[0] for a in answers] == list(sizes)


def test_batch_rows_of_one_turns_batching_off(models: Models) -> None:
    plane = plane_for(models, batch_rows=1)
    try:
        run(together(plane, [{"name": "m", "inputs": rows(1, i)} for i in range(5)]))
    finally:
        plane.close()
    assert passes(models.metrics) == (5, 5.0)


def test_one_callers_overflow_fails_only_that_caller(models: Models) -> None:
    plane = plane_for(models)
    huge = np.full((1, 8), 3e38)  # finite float32 inputs whose outputs overflow
    good = rows(2)
    try:
        answers = run(
            together(plane, [{"name": "r", "inputs": good}, {"name": "r", "inputs": huge}])
        )
        alone = run(plane.predict("r", good))
    finally:
        plane.close()
    assert passes(models.metrics, "r") == (2, 5.0)
    assert isinstance(answers[0], Prediction)
    # float32 through two layers: a batched product rounds within a few ulp (~1e-7 relative).
    np.testing.assert_allclose(answers[0].outputs, alone.outputs, rtol=1e-6)
    assert isinstance(answers[1], FailedPrecondition)
    assert "not finite" in answers[1].message


def test_a_request_wrong_by_itself_is_refused_before_it_is_queued(models: Models) -> None:
    plane = plane_for(models)
    try:
        answers = run(
            together(
                plane,
                [
                    {"name": "m", "inputs": rows(1)},
                    {"name": "m", "inputs": np.ones((1, 5))},
                    {"name": "m", "inputs": np.full((1, 8), np.nan)},
                    {"name": "nope", "inputs": rows(1)},
                    {"name": "m", "inputs": rows(1), "label": "stable"},
                    {"name": "m", "inputs": rows(1), "version": 1, "label": "stable"},
                    {"name": "m", "inputs": rows(1, 1)},
                ],
            )
        )
    finally:
        plane.close()
    assert isinstance(answers[1], InvalidArgument) and "features" in answers[1].message
    assert isinstance(answers[2], InvalidArgument) and "non-finite" in answers[2].message
    assert isinstance(answers[3], NotFound)
    assert isinstance(answers[4], NotFound) and "stable" in answers[4].message
    assert isinstance(answers[5], InvalidArgument) and "not both" in answers[5].message
    assert isinstance(answers[0], Prediction) and isinstance(answers[6], Prediction)
    assert passes(models.metrics) == (1, 2.0)


def test_the_head_and_each_version_are_batched_apart(models: Models) -> None:
    x = rows(1)
    before = expected(models, x)
    models.save_version("m")  # version 1 = step 0
    models.train_step("m", rows(4, 9), np.zeros((4, 3)))
    after = expected(models, x)
    assert not np.allclose(before, after)
    plane = plane_for(models)
    try:
        models.predict("m", x, version=1)  # version 1 in memory now: one pass
        answers = run(
            together(
                plane,
                [
                    {"name": "m", "inputs": x},
                    {"name": "m", "inputs": x, "version": 1},
                    {"name": "m", "inputs": x},
                    {"name": "m", "inputs": x, "version": 1},
                ],
            )
        )
    finally:
        plane.close()
    assert [(a.version, a.step) for a in answers] == [(None, 1), (1, 0), (None, 1), (1, 0)]
    np.testing.assert_allclose(answers[0].outputs, after, rtol=1e-12)
    np.testing.assert_allclose(answers[1].outputs, before, rtol=1e-12)
    assert passes(models.metrics)[0] == 3  # the load's, then one for the head, one for v1


def test_a_version_not_in_memory_is_loaded_off_the_loop(models: Models) -> None:
    models.save_version("m")
    restarted = Models(models.store, models.settings)  # nothing loaded yet
    plane = plane_for(restarted)
    loop_thread: list[str] = []
    load = restarted.load

    def watched(query: Any) -> Any:
        loop_thread.append(threading.current_thread().name)
        return load(query)

    restarted.load = watched  # type: ignore[method-assign]
    try:
        answer = run(plane.predict("m", rows(2), version=1))
        again = run(plane.predict("m", rows(2), version=1))
    finally:
        plane.close()
    assert answer.version == 1 and again.version == 1
    assert np.array_equal(answer.outputs, again.outputs)
    assert len(loop_thread) == 1  # read once, then kept in memory
    assert loop_thread[0].startswith("propserve-worker")


def test_a_model_deleted_before_its_batch_runs_answers_not_found(models: Models) -> None:
    plane = plane_for(models)

    async def predict_then_delete() -> Any:
        answer = asyncio.ensure_future(plane.predict("m", rows(1)))
        await asyncio.sleep(0)  # queued; its pass waits for the end of this turn
        models.delete_model("m")
        return await asyncio.gather(answer, return_exceptions=True)

    try:
        (answer,) = run(predict_then_delete())
    finally:
        plane.close()
    assert isinstance(answer, NotFound)


def test_large_passes_run_in_a_worker_and_queries_wait_for_the_next(
    models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass over INLINE_MULTIPLY_ADDS runs in a worker thread; what arrives meanwhile
    queues and becomes the next pass."""
    monkeypatch.setattr(dataplane, "INLINE_MULTIPLY_ADDS", 1000)
    big = 1000 // N_PARAMS + 1
    plane = plane_for(models, batch_rows=big)

    async def big_then_small() -> list[Any]:
        first = asyncio.ensure_future(plane.predict("m", rows(big)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first pass is in a worker
        later = [plane.predict("m", rows(1, i)) for i in range(3)]
        return list(await asyncio.gather(first, *later))

    try:
        answers = run(big_then_small())
    finally:
        plane.close()
    assert all(isinstance(a, Prediction) for a in answers)
    assert passes(models.metrics) == (2, float(big + 3))


def test_full_passes_run_side_by_side_while_partial_ones_wait(
    models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two workers one partial pass runs at a time (queries behind it batch up), but a
    queued pass that is full already starts beside it: waiting would not make it larger."""
    monkeypatch.setattr(dataplane, "INLINE_MULTIPLY_ADDS", 1000)
    big = 1000 // N_PARAMS + 1
    plane = plane_for(models, batch_rows=big)
    assert (plane.batcher.max_running, plane.batcher.max_full) == (1, plane.workers.threads)
    both_running = threading.Barrier(2, timeout=30)
    compute = plane.batcher._compute

    def meeting(queries: list[Any]) -> Any:
        # Each full pass waits for the other: the barrier breaks (an error) unless two run
        # at once.
        both_running.wait()
        return compute(queries)

    monkeypatch.setattr(plane.batcher, "_compute", meeting)
    try:
        answers = run(together(plane, [{"name": "m", "inputs": rows(big, i)} for i in range(2)]))
    finally:
        plane.close()
    assert all(isinstance(a, Prediction) for a in answers), answers
    assert passes(models.metrics) == (2, float(2 * big))


def test_after_shutdown_predictions_that_need_a_worker_answer_unavailable(
    models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataplane, "INLINE_MULTIPLY_ADDS", 0)
    plane = plane_for(models)
    plane.close()
    (answer,) = run(together(plane, [{"name": "m", "inputs": rows(2)}]))
    assert isinstance(answer, Unavailable)


# -- admission -----------------------------------------------------------------------------------


def test_predictions_beyond_the_queued_rows_limit_are_refused_too_busy(models: Models) -> None:
    plane = plane_for(models, max_queued_rows=3)
    try:
        # 2 rows wait, then 4 (at the limit), then the third is refused.
        answers = run(together(plane, [{"name": "m", "inputs": rows(2, i)} for i in range(3)]))
        later = run(plane.predict("m", rows(2)))
    finally:
        plane.close()
    assert isinstance(answers[0], Prediction) and isinstance(answers[1], Prediction)
    assert isinstance(answers[2], TooBusy) and isinstance(answers[2], ResourceExhausted)
    assert answers[2].code is wire.TOO_BUSY
    assert "4 rows of predictions on model 'm' are waiting" in answers[2].message
    assert isinstance(later, Prediction)  # the queue drained: accepted again
    assert passes(models.metrics) == (2, 6.0)  # the refused query never ran


def test_calls_beyond_the_pending_limit_are_refused_too_busy(models: Models) -> None:
    plane = plane_for(models, max_pending_calls=2)
    release = threading.Event()

    async def fill_then_overflow() -> list[Any]:
        held = [asyncio.ensure_future(plane.workers.run(release.wait, 10)) for _ in range(2)]
        await asyncio.sleep(0)  # both are pending now
        with pytest.raises(TooBusy, match="2 calls are waiting"):
            await plane.save_version("m")
        release.set()
        done = await asyncio.gather(*held)
        return [*done, (await plane.save_version("m")).version]

    try:
        assert run(fill_then_overflow()) == [True, True, 1]
    finally:
        release.set()
        plane.close()


def test_busy_counts_calls_in_workers_until_they_finish(models: Models) -> None:
    plane = plane_for(models)
    release = threading.Event()
    seen: list[int] = []

    async def hold_three() -> None:
        offloaded = asyncio.ensure_future(plane.workers.run(release.wait, 10))
        queue = plane.workers.ordered()
        queued = [queue.submit(lambda: release.wait(10)), queue.submit(lambda: 1)]
        await asyncio.sleep(0.01)
        seen.append(plane.workers.busy)
        release.set()
        await asyncio.gather(offloaded, *queued)
        await asyncio.sleep(0)  # the done callbacks run on the next turn
        seen.append(plane.workers.busy)

    try:
        run(hold_three())
    finally:
        release.set()
        plane.close()
    assert seen == [3, 0]


# -- ordered queues ----------------------------------------------------------------------------


def test_an_ordered_queue_runs_calls_in_order_and_stops_after_a_failure(models: Models) -> None:
    plane = plane_for(models)
    ran: list[int] = []

    def call(i: int) -> int:
        if i == 3:
            raise InvalidArgument("three is bad")
        ran.append(i)
        return i * 10

    async def six() -> list[Any]:
        queue = plane.workers.ordered()
        futures = [queue.submit(functools.partial(call, i)) for i in range(6)]
        return list(await asyncio.gather(*futures, return_exceptions=True))

    try:
        results = run(six())
    finally:
        plane.close()
    assert ran == [0, 1, 2]  # in order; nothing after the failure ran
    assert results[:3] == [0, 10, 20]
    assert isinstance(results[3], InvalidArgument)
    assert all(isinstance(r, asyncio.CancelledError) for r in results[4:])


def test_an_ordered_queue_hands_a_result_over_at_once_with_nothing_behind_it(
    models: Models,
) -> None:
    """A client that waits for each step's result before sending the next gets every one
    without waiting for another step."""
    plane = plane_for(models)

    async def one_by_one() -> list[int]:
        queue = plane.workers.ordered()
        return [await queue.submit(functools.partial(int, i)) for i in range(3)]

    try:
        assert run(one_by_one()) == [0, 1, 2]
    finally:
        plane.close()


def _set(event: threading.Event, future: asyncio.Future[Any]) -> None:
    event.set()


def _append(order: list[str], name: str, future: asyncio.Future[Any]) -> None:
    order.append(name)


def test_an_ordered_queue_hands_a_result_over_when_the_next_two_phase_call_prepared(
    models: Models,
) -> None:
    """With calls queued back to back, a result reaches the loop once the next call has
    prepared, while its work still runs; a one-phase call lets it through before it runs."""
    plane = plane_for(models)
    gate, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def prepare(i: int, delivered: list[threading.Event]) -> int:
        seen.append(f"{i - 1} {'early' if delivered[i - 1].is_set() else 'held'}")
        return i

    def work(i: int, delivered: list[threading.Event]) -> int:
        seen.append(f"{i - 1} {'arrived' if delivered[i - 1].wait(10) else 'lost'}")
        return i

    async def three() -> list[Any]:
        queue = plane.workers.ordered()
        delivered = [threading.Event() for _ in range(3)]
        futures = [queue.submit(lambda: gate.wait(10) and 0)]  # holds the worker
        futures += [
            queue.submit(
                TwoPhase(
                    functools.partial(prepare, i, delivered),
                    functools.partial(work, delivered=delivered),
                )
            )
            for i in (1, 2)
        ]
        for event, future in zip(delivered, futures, strict=True):
            future.add_done_callback(functools.partial(_set, event))
        await asyncio.sleep(0.01)
        gate.set()
        return list(await asyncio.gather(*futures))

    try:
        assert run(three()) == [0, 1, 2]
    finally:
        gate.set()
        release.set()
        plane.close()
    assert seen == ["0 held", "0 arrived", "1 held", "1 arrived"]


def test_an_ordered_queue_hands_a_held_result_over_before_a_failure(models: Models) -> None:
    plane = plane_for(models)
    gate = threading.Event()
    order: list[str] = []

    def refuse() -> None:
        raise InvalidArgument("bad batch")

    async def held_then_failing() -> list[Any]:
        queue = plane.workers.ordered()
        futures: list[asyncio.Future[Any]] = [
            queue.submit(lambda: gate.wait(10)),  # its result is held while the next prepares
            queue.submit(TwoPhase(refuse, lambda _: "never")),
            queue.submit(lambda: "never"),
        ]
        for name, future in zip(("gate", "fail", "never"), futures, strict=True):
            future.add_done_callback(functools.partial(_append, order, name))
        await asyncio.sleep(0.01)
        gate.set()
        return list(await asyncio.gather(*futures, return_exceptions=True))

    try:
        results = run(held_then_failing())
    finally:
        gate.set()
        plane.close()
    assert results[0] is True
    assert isinstance(results[1], InvalidArgument)
    assert isinstance(results[2], asyncio.CancelledError)
    assert order == ["gate", "fail", "never"]


def test_an_ordered_queue_keeps_going_after_it_runs_dry(models: Models) -> None:
    plane = plane_for(models)

    async def twice() -> list[int]:
        queue = plane.workers.ordered()
        first = await queue.submit(lambda: 1)
        await asyncio.sleep(0.01)  # the worker has left; the next call starts a new one
        return [first, await queue.submit(lambda: 2)]

    try:
        assert run(twice()) == [1, 2]
    finally:
        plane.close()


def test_an_ordered_queue_after_shutdown_answers_unavailable(models: Models) -> None:
    plane = plane_for(models)
    plane.close()

    async def once() -> list[Any]:
        return list(
            await asyncio.gather(plane.workers.ordered().submit(lambda: 1), return_exceptions=True)
        )

    (result,) = run(once())
    assert isinstance(result, Unavailable)


# -- busy polling ----------------------------------------------------------------------------


def test_busy_poll_polls_while_quiet_and_stops_when_workers_compute() -> None:
    quiet = [True]

    async def observe() -> list[bool]:
        poll = BusyPoll(60.0, lambda: quiet[0])  # a window no test outlasts
        seen = [poll.polling]
        poll.extend()
        seen.append(poll.polling)
        await asyncio.sleep(0.05)  # many turns of the loop, none of them asleep
        seen.append(poll.polling)
        quiet[0] = False  # a worker computes: the loop yields at its next turn
        await asyncio.sleep(0.05)
        seen.append(poll.polling)
        return seen

    assert run(observe()) == [False, True, True, False]


def test_busy_poll_ends_after_its_window_and_is_off_at_zero() -> None:
    async def observe() -> tuple[bool, bool]:
        short = BusyPoll(0.001, lambda: True)
        short.extend()
        off = BusyPoll(0.0, lambda: True)
        off.extend()
        started = off.polling
        await asyncio.sleep(0.2)
        return short.polling, started

    assert run(observe()) == (False, False)


def test_predictions_poll_only_when_the_setting_asks(models: Models) -> None:
    polling = plane_for(models, busy_poll_us=1_000_000)
    default = plane_for(models)

    async def predict_on_both() -> tuple[bool, bool]:
        await polling.predict("m", rows(1))
        await default.predict("m", rows(1))
        return polling.busy_poll.polling, default.busy_poll.polling

    try:
        assert run(predict_on_both()) == (True, False)
    finally:
        polling.busy_poll.window = 0.0
        polling.close()
        default.close()


# -- the call context ------------------------------------------------------------------------


def requests_total(metrics: Metrics, operation: str, code: str) -> float:
    text = metrics.render().decode()
    pattern = (
        rf'^propserve_requests_total{{code="{code}",method="{operation}",'
        rf'protocol="propserve",transport="test"}} (\S+)$'
    )
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_call_is_authorised_counted_and_its_failure_logged(
    models: Models, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = {"p" * 16: "predict", "a" * 16: "admin"}
    plane = plane_for(models, tokens)
    caplog.set_level(logging.INFO, "propserve.requests")
    try:
        with plane.call("Predict", "test", authorization="Bearer " + "p" * 16):
            pass
        with (
            pytest.raises(PermissionDenied),
            plane.call("DeleteModel", "test", authorization="Bearer " + "p" * 16),
        ):
            pass
        with pytest.raises(Unauthenticated), plane.call("Predict", "test"):
            pass
        with (
            pytest.raises(NotFound),
            plane.call("GetModel", "test", authorization="Bearer " + "a" * 16) as call,
        ):
            raise NotFound("model 'x' not found")
    finally:
        plane.close()
    assert requests_total(models.metrics, "Predict", "ok") == 1
    assert requests_total(models.metrics, "DeleteModel", "permission_denied") == 1
    assert requests_total(models.metrics, "Predict", "unauthenticated") == 1
    assert requests_total(models.metrics, "GetModel", "not_found") == 1
    failed = [r for r in caplog.records if r.getMessage() == "request.failed"]
    assert [getattr(r, "code", None) for r in failed] == [
        "permission_denied",
        "unauthenticated",
        "not_found",
    ]
    assert getattr(failed[-1], "request_id", None) == call.request_id
    assert plane.in_flight == 0


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123_X.y", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("abc level=error event=model.deleted", False),
        ("", False),
        ("caf\u00e9", False),
    ],
)
def test_a_request_id_is_kept_only_when_it_follows_the_rule(
    models: Models, given: str, kept: bool
) -> None:
    plane = plane_for(models)
    try:
        with plane.call("ListModels", "test", request_id=given) as call:
            pass
    finally:
        plane.close()
    assert (call.request_id == given) is kept
    assert wire.valid_request_id(call.request_id)


def test_a_bug_is_logged_with_its_traceback(
    models: Models, caplog: pytest.LogCaptureFixture
) -> None:
    plane = plane_for(models)
    try:
        with pytest.raises(ZeroDivisionError), plane.call("ListModels", "test"):
            _ = 1 / 0
    finally:
        plane.close()
    (record,) = [r for r in caplog.records if r.getMessage() == "request.internal_error"]
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
    assert requests_total(models.metrics, "ListModels", "internal") == 1


def test_draining_refuses_new_calls_and_waits_for_those_in_flight(models: Models) -> None:
    plane = plane_for(models)
    release = asyncio.Event()

    async def drain_during_a_call() -> tuple[bool, bool]:
        async def in_flight() -> None:
            with plane.call("ListModels", "test"):
                await release.wait()

        held = asyncio.ensure_future(in_flight())
        await asyncio.sleep(0)
        timed_out = await plane.drain(0.01)  # the call is still in flight
        with pytest.raises(Unavailable, match="shutting down"), plane.call("ListModels", "test"):
            pass
        release.set()
        drained = await plane.drain(10)
        await held
        return timed_out, drained

    try:
        assert run(drain_during_a_call()) == (False, True)
    finally:
        plane.close()
    assert requests_total(models.metrics, "ListModels", "unavailable") == 1


# -- the Train stream ------------------------------------------------------------------------


async def feed(batches: list[Any]) -> AsyncIterator[Batch]:
    for batch in batches:
        if isinstance(batch, Exception):
            raise batch
        yield batch


def batch(model: str, seed: int) -> Batch:
    x = rows(4, seed)
    return Batch(model, x, np.zeros((4, 3)), None)


async def stream(plane: DataPlane, batches: list[Any]) -> tuple[list[Any], Exception | None]:
    results: list[Any] = []
    try:
        async for result in plane.train(feed(batches)):
            results.append(result)
    except Exception as exc:
        return results, exc
    return results, None


def test_a_stream_answers_every_batch_in_order(models: Models) -> None:
    plane = plane_for(models)
    reference = Models(ModelStore(models.store.root.parent / "ref"), models.settings)
    reference.create_model("m", SPEC)
    try:
        results, failure = run(stream(plane, [batch("m", 1), batch("", 2), batch("m", 3)]))
        expected_losses = [
            reference.train_step("m", b.inputs, b.targets).loss
            for b in (batch("m", 1), batch("m", 2), batch("m", 3))
        ]
    finally:
        plane.close()
        reference.close()
    assert failure is None
    assert [r.step for r in results] == [1, 2, 3]
    assert [r.loss for r in results] == expected_losses  # the same steps, bit for bit


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (InvalidArgument("inputs: bad"), "batch 1: inputs: bad"),
        (batch("r", 2), "batch 1: model 'r' differs from the stream's model 'm'"),
    ],
)
def test_a_bad_batch_ends_the_stream_naming_it_and_earlier_steps_stay(
    models: Models, bad: Any, message: str
) -> None:
    plane = plane_for(models)
    try:
        results, failure = run(stream(plane, [batch("m", 1), bad, batch("m", 3)]))
    finally:
        plane.close()
    assert [r.step for r in results] == [1]
    assert isinstance(failure, InvalidArgument) and failure.message == message
    assert models.get_model("m").head_step == 1


def test_a_stream_must_name_its_model_first(models: Models) -> None:
    plane = plane_for(models)
    try:
        results, failure = run(stream(plane, [batch("", 1)]))
    finally:
        plane.close()
    assert results == []
    assert isinstance(failure, InvalidArgument)
    assert failure.message == "batch 0: the first batch must name the model"


def test_a_refused_step_ends_the_stream_and_the_batches_behind_it_do_not_run(
    models: Models,
) -> None:
    plane = plane_for(models)
    diverging = Batch("m", rows(4), np.full((4, 3), 1e200), None)  # the loss overflows
    try:
        results, failure = run(
            stream(plane, [batch("m", 1), diverging, batch("m", 3), batch("m", 4)])
        )
    finally:
        plane.close()
    assert [r.step for r in results] == [1]
    assert isinstance(failure, FailedPrecondition)
    assert failure.message.startswith("batch 1: ")
    assert models.get_model("m").head_step == 1


def test_spec_width_constant_matches() -> None:
    assert ModelSpec.from_dict(SPEC).n_params == N_PARAMS
