"""Batched predictions (service.dispatch): who shares a forward pass, what each caller gets
back, and what happens when one caller's rows or the model go wrong."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from propserve.engine import ModelSpec, forward
from propserve.service import dispatch
from propserve.service.core import Core, Prediction
from propserve.service.dispatch import Dispatcher
from propserve.service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TooBusy,
    Unavailable,
)
from propserve.service.store import ModelStore

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


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    core = Core(ModelStore(tmp_path / "store"))
    core.create_model("m", SPEC)
    core.create_model("r", RELU_SPEC)
    yield core
    core.close()


def rows(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, 8))


def passes(core: Core, model: str = "m") -> tuple[int, float]:
    """(forward passes, rows computed) from the batch-size histogram."""
    count, rows = core.metrics.passes(model)
    return count, float(rows)


def submit_all(dispatcher: Dispatcher, requests: list[dict[str, Any]]) -> list[Any]:
    """Submit every request in one turn of the loop; gather each answer (or error)."""

    async def run() -> list[Any]:
        loop = asyncio.get_running_loop()
        futures = []
        for request in requests:
            future: asyncio.Future[Any] = loop.create_future()

            def done(result: Any, future: asyncio.Future[Any] = future) -> None:
                future.set_result(result)

            try:
                dispatcher.submit_predict(done=done, **request)
            except Exception as exc:
                future.set_result(exc)
            futures.append(future)
        return list(await asyncio.wait_for(asyncio.gather(*futures), 10))

    return asyncio.run(run())


def expected(core: Core, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    model = core._model("m")
    return forward(ModelSpec.from_dict(SPEC), model.network.params, x)


def test_predictions_arriving_together_share_one_forward_pass(core: Core) -> None:
    dispatcher = Dispatcher(core)
    try:
        inputs = [rows(n, seed) for seed, n in enumerate((1, 3, 2, 5))]
        answers = submit_all(dispatcher, [{"name": "m", "inputs": x} for x in inputs])
    finally:
        dispatcher.close()
    assert passes(core) == (1, 11.0)
    for x, answer in zip(inputs, answers, strict=True):
        assert isinstance(answer, Prediction)
        assert answer.outputs.shape == (len(x), 3)
        assert answer.version is None and answer.step == 0
        # Each caller gets its own rows: the engine's outputs to rounding (a batched matrix
        # product may round differently from one over these rows alone).
        np.testing.assert_allclose(answer.outputs, expected(core, x), rtol=1e-12, atol=1e-15)


def test_a_lone_prediction_is_exactly_the_engines_forward(core: Core) -> None:
    dispatcher = Dispatcher(core)
    try:
        x = rows(4)
        (answer,) = submit_all(dispatcher, [{"name": "m", "inputs": x}])
        direct = asyncio.run(dispatcher.predict("m", x))
    finally:
        dispatcher.close()
    assert np.array_equal(answer.outputs, expected(core, x))
    assert np.array_equal(direct.outputs, expected(core, x))


def test_a_query_alone_on_an_idle_model_is_answered_before_submit_returns(core: Core) -> None:
    """``alone`` (one connection open): the answer comes at once, the engine's forward; on a
    model with queries queued it waits its turn behind them, as any other query."""
    dispatcher = Dispatcher(core)
    x, y = rows(1, 1), rows(2, 2)

    async def run() -> tuple[list[Any], list[Any], list[str]]:
        answered: list[Any] = []
        dispatcher.submit_predict("m", x, answered.append, alone=True)
        at_once = list(answered)
        order: list[str] = []
        first: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def queued(result: Any) -> None:
            order.append("queued")
            first.set_result(result)

        dispatcher.submit_predict("m", y, queued)
        second: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def behind(result: Any) -> None:
            order.append("alone")
            second.set_result(result)

        dispatcher.submit_predict("m", x, behind, alone=True)
        waited_for = [len(order)]
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        return at_once, waited_for, order

    try:
        at_once, waited_for, order = asyncio.run(run())
    finally:
        dispatcher.close()
    (answer,) = at_once
    assert isinstance(answer, Prediction)
    assert np.array_equal(answer.outputs, expected(core, x))
    assert waited_for == [0]  # the model had a query queued: nothing was answered at once
    assert order == ["queued", "alone"]
    assert passes(core) == (2, 4.0)  # the lone pass, then the two queued ones shared one


def test_a_failing_callback_of_a_query_answered_at_once_is_logged_not_raised(
    core: Core, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = Dispatcher(core)

    def broken(result: Any) -> None:
        raise RuntimeError("the caller went wrong")

    async def run() -> None:
        dispatcher.submit_predict("m", rows(1), broken, alone=True)

    try:
        asyncio.run(run())
    finally:
        dispatcher.close()
    assert "predict.callback_failed" in caplog.text


def test_batches_hold_at_most_batch_rows_and_a_larger_query_runs_alone(core: Core) -> None:
    dispatcher = Dispatcher(core, batch_rows=4)
    try:
        sizes = (3, 1, 2, 9, 1)
        answers = submit_all(
            dispatcher, [{"name": "m", "inputs": rows(n, i)} for i, n in enumerate(sizes)]
        )
    finally:
        dispatcher.close()
    # [3, 1], [2], [9], [1]: in order, never over 4 rows unless one query alone is larger.
    assert passes(core) == (4, 16.0)
    assert [a.outputs.shape[0] for a in answers] == list(sizes)


def test_batch_rows_of_one_turns_batching_off(core: Core) -> None:
    dispatcher = Dispatcher(core, batch_rows=1)
    try:
        submit_all(dispatcher, [{"name": "m", "inputs": rows(1, i)} for i in range(5)])
    finally:
        dispatcher.close()
    assert passes(core) == (5, 5.0)


def test_one_callers_overflow_fails_only_that_caller(core: Core) -> None:
    dispatcher = Dispatcher(core)
    try:
        huge = np.full((1, 8), 3e38)  # finite float32 inputs whose outputs overflow
        good = rows(2)
        answers = submit_all(
            dispatcher, [{"name": "r", "inputs": good}, {"name": "r", "inputs": huge}]
        )
    finally:
        dispatcher.close()
    assert passes(core, "r") == (1, 3.0)
    assert isinstance(answers[0], Prediction)
    assert np.isfinite(answers[0].outputs).all()
    alone = asyncio.run(Dispatcher(core).predict("r", good))
    np.testing.assert_allclose(answers[0].outputs, alone.outputs, rtol=1e-6)
    assert isinstance(answers[1], FailedPrecondition)
    assert "not finite" in answers[1].message


def test_a_request_wrong_by_itself_is_refused_before_it_is_queued(core: Core) -> None:
    dispatcher = Dispatcher(core)
    try:
        answers = submit_all(
            dispatcher,
            [
                {"name": "m", "inputs": rows(1)},
                {"name": "m", "inputs": np.ones((1, 5))},
                {"name": "m", "inputs": np.full((1, 8), np.nan)},
                {"name": "nope", "inputs": rows(1)},
                {"name": "m", "inputs": rows(1), "label": "stable"},
                {"name": "m", "inputs": rows(1, 1)},
            ],
        )
    finally:
        dispatcher.close()
    assert isinstance(answers[1], InvalidArgument) and "features" in answers[1].message
    assert isinstance(answers[2], InvalidArgument) and "non-finite" in answers[2].message
    assert isinstance(answers[3], NotFound)
    assert isinstance(answers[4], NotFound) and "stable" in answers[4].message
    assert isinstance(answers[0], Prediction) and isinstance(answers[5], Prediction)
    assert passes(core) == (1, 2.0)


def test_the_head_and_each_version_are_batched_apart(core: Core) -> None:
    x = rows(1)
    before = expected(core, x)
    core.save_version("m")  # version 1 = step 0
    core.train_step("m", rows(4, 9), np.zeros((4, 3)))
    after = expected(core, x)
    assert not np.allclose(before, after)
    dispatcher = Dispatcher(core)
    try:
        core.predict("m", x, version=1)  # load version 1 into memory
        answers = submit_all(
            dispatcher,
            [
                {"name": "m", "inputs": x},
                {"name": "m", "inputs": x, "version": 1},
                {"name": "m", "inputs": x},
                {"name": "m", "inputs": x, "version": 1},
            ],
        )
    finally:
        dispatcher.close()
    assert [(a.version, a.step) for a in answers] == [(None, 1), (1, 0), (None, 1), (1, 0)]
    np.testing.assert_allclose(answers[0].outputs, after, rtol=1e-12)
    np.testing.assert_allclose(answers[1].outputs, before, rtol=1e-12)
    assert passes(core)[0] == 3  # the load, then one pass for the head, one for version 1


def test_a_version_not_in_memory_is_loaded_off_the_loop(core: Core) -> None:
    core.save_version("m")
    restarted = Core(core.store)  # a fresh core: nothing loaded yet
    dispatcher = Dispatcher(restarted)
    try:
        (answer,) = submit_all(dispatcher, [{"name": "m", "inputs": rows(2), "version": 1}])
        (again,) = submit_all(dispatcher, [{"name": "m", "inputs": rows(2), "version": 1}])
    finally:
        dispatcher.close()
    assert answer.version == 1 and again.version == 1
    assert np.array_equal(answer.outputs, again.outputs)


def test_a_model_deleted_before_its_batch_runs_answers_not_found(core: Core) -> None:
    dispatcher = Dispatcher(core)

    async def run() -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        dispatcher.submit_predict("m", rows(1), future.set_result)
        core.delete_model("m")  # before the batch's turn of the loop
        return await asyncio.wait_for(future, 10)

    try:
        answer = asyncio.run(run())
    finally:
        dispatcher.close()
    assert isinstance(answer, NotFound)


def test_large_batches_run_in_a_worker_and_queries_wait_for_the_next(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch over INLINE_MACS runs in a worker thread; what arrives meanwhile queues and
    becomes the next batch."""
    monkeypatch.setattr(dispatch, "INLINE_MACS", 1000)
    big = 1000 // core.parameter_count("m") + 1
    dispatcher = Dispatcher(core, batch_rows=big)

    async def run() -> list[Any]:
        loop = asyncio.get_running_loop()
        first: asyncio.Future[Any] = loop.create_future()
        dispatcher.submit_predict("m", rows(big), first.set_result)
        await asyncio.sleep(0)  # the first batch is handed to a worker
        later = [loop.create_future() for _ in range(3)]
        for i, future in enumerate(later):
            dispatcher.submit_predict("m", rows(1, i), future.set_result)
        return list(await asyncio.wait_for(asyncio.gather(first, *later), 10))

    try:
        answers = asyncio.run(run())
    finally:
        dispatcher.close()
    assert all(isinstance(a, Prediction) for a in answers)
    assert passes(core) == (2, float(big + 3))


def test_after_shutdown_queued_predictions_answer_unavailable(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "INLINE_MACS", 1000)
    big = 1000 // core.parameter_count("m") + 1
    dispatcher = Dispatcher(core, batch_rows=big)
    dispatcher.close()

    async def run() -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        dispatcher.submit_predict("m", rows(big), future.set_result)
        return await asyncio.wait_for(future, 10)

    answer = asyncio.run(run())
    assert isinstance(answer, Unavailable)


# -- Serial: the queue behind a Train stream ---------------------------------------------------


def test_serial_runs_calls_in_order_and_stops_after_a_failure(core: Core) -> None:
    dispatcher = Dispatcher(core)
    ran: list[int] = []

    def call(i: int) -> int:
        if i == 3:
            raise InvalidArgument("three is bad")
        ran.append(i)
        return i * 10

    async def run() -> list[Any]:
        serial = dispatcher.serial()
        futures = [serial.submit(call, i) for i in range(6)]
        return list(await asyncio.gather(*futures, return_exceptions=True))

    try:
        results = asyncio.run(run())
    finally:
        dispatcher.close()
    assert ran == [0, 1, 2]  # in order; nothing after the failure ran
    assert results[:3] == [0, 10, 20]
    assert isinstance(results[3], InvalidArgument)
    assert all(isinstance(r, asyncio.CancelledError) for r in results[4:])


def test_serial_keeps_going_after_its_queue_runs_dry(core: Core) -> None:
    dispatcher = Dispatcher(core)

    async def run() -> list[int]:
        serial = dispatcher.serial()
        first = await serial.submit(lambda: 1)
        await asyncio.sleep(0.01)  # the worker has left; the next call starts a new one
        return [first, await serial.submit(lambda: 2)]

    try:
        assert asyncio.run(run()) == [1, 2]
    finally:
        dispatcher.close()


def _set(event: threading.Event, done: asyncio.Future[Any]) -> None:
    event.set()


def test_serial_hands_a_result_over_when_the_next_call_starts(core: Core) -> None:
    """With calls queued back to back, a call's result reaches the loop when the next call
    says it started, while that call still runs: not when the call ends, nor only when the
    next one ends. One hand-over per call, in order."""
    dispatcher = Dispatcher(core)
    gate = threading.Event()
    seen: list[str] = []

    def call(i: int, delivered: list[threading.Event], started: Any) -> int:
        if i == 0:
            gate.wait(10)  # holds the worker while the others queue up
        else:
            # The previous result is still in the worker until this call starts.
            seen.append(f"{i - 1} {'early' if delivered[i - 1].is_set() else 'held'}")
            started()
            seen.append(f"{i - 1} {'arrived' if delivered[i - 1].wait(10) else 'lost'}")
        return i

    async def run() -> tuple[list[Any], int]:
        serial = dispatch.Serial(dispatcher.executor, started="started")
        delivered = [threading.Event() for _ in range(4)]
        futures = [serial.submit(call, i, delivered) for i in range(4)]
        for event, future in zip(delivered, futures, strict=True):
            future.add_done_callback(functools.partial(_set, event))
        await asyncio.sleep(0.01)
        gate.set()
        return list(await asyncio.wait_for(asyncio.gather(*futures), 10)), serial.handovers

    try:
        results, handovers = asyncio.run(run())
    finally:
        gate.set()
        dispatcher.close()
    assert results == [0, 1, 2, 3]
    assert seen == ["0 held", "0 arrived", "1 held", "1 arrived", "2 held", "2 arrived"]
    assert handovers == 4


def test_serial_without_a_start_hands_a_result_over_when_the_next_call_ends_or_starts(
    core: Core,
) -> None:
    """A call that never says it started lets the result before it through when it returns;
    without ``started`` the results are handed over before each next call begins."""
    dispatcher = Dispatcher(core)
    gate = threading.Event()

    async def run(started: str | None, wait: float) -> list[bool]:
        serial = dispatch.Serial(dispatcher.executor, started=started)
        delivered = threading.Event()
        first = serial.submit(lambda **_: gate.wait(10))
        first.add_done_callback(lambda done: delivered.set())
        # The second call sees whether the first one's result reaches the loop meanwhile.
        second = serial.submit(lambda **_: delivered.wait(wait))
        await asyncio.sleep(0.01)
        gate.set()
        results = list(await asyncio.wait_for(asyncio.gather(first, second), 10))
        gate.clear()
        return results

    try:
        with_start = asyncio.run(run("started", 0.2))
        without = asyncio.run(run(None, 10))
    finally:
        gate.set()
        dispatcher.close()
    assert with_start == [True, False]  # held through the second call, which never started
    assert without == [True, True]


def test_serial_holds_no_result_with_nothing_queued_behind_it(core: Core) -> None:
    """A result is handed over at once when no call waits behind it: a client answering each
    step before sending the next gets every answer without waiting for another step."""
    dispatcher = Dispatcher(core)

    async def run() -> list[Any]:
        serial = dispatch.Serial(dispatcher.executor, started="started")
        answers = []
        for i in range(3):
            answers.append(await asyncio.wait_for(serial.submit(lambda i=i, **_: i), 10))
        return [answers, serial.handovers]

    try:
        assert asyncio.run(run()) == [[0, 1, 2], 3]
    finally:
        dispatcher.close()


def test_serial_hands_over_held_results_before_a_failure(core: Core) -> None:
    """A result held when the next call fails (before it says it started) still arrives,
    before the failure and the cancellations behind it."""
    dispatcher = Dispatcher(core)
    gate = threading.Event()
    order: list[str] = []

    def fail(**_: Any) -> None:
        raise InvalidArgument("bad batch")

    def done(name: str, future: asyncio.Future[Any]) -> None:
        order.append(name)

    async def run() -> list[Any]:
        serial = dispatch.Serial(dispatcher.executor, started="started")
        futures: list[asyncio.Future[Any]] = [
            serial.submit(lambda **_: gate.wait(10)),  # its result is held while fail runs
            serial.submit(fail),
            serial.submit(lambda **_: "never"),
        ]
        for name, future in zip(("gate", "fail", "never"), futures, strict=True):
            future.add_done_callback(functools.partial(done, name))
        await asyncio.sleep(0.01)
        gate.set()
        return list(await asyncio.gather(*futures, return_exceptions=True))

    try:
        results = asyncio.run(run())
    finally:
        gate.set()
        dispatcher.close()
    assert results[0] is True
    assert isinstance(results[1], InvalidArgument)
    assert isinstance(results[2], asyncio.CancelledError)
    assert order == ["gate", "fail", "never"]


def test_serial_after_shutdown_answers_unavailable(core: Core) -> None:
    dispatcher = Dispatcher(core)
    dispatcher.close()

    async def run() -> Any:
        return await asyncio.gather(dispatcher.serial().submit(lambda: 1), return_exceptions=True)

    (result,) = asyncio.run(run())
    assert isinstance(result, Unavailable)


# -- too busy: bounded queues ------------------------------------------------------------------


def test_predictions_beyond_the_queued_rows_limit_are_refused_too_busy(core: Core) -> None:
    dispatcher = Dispatcher(core, max_queued_rows=3)
    try:
        answers = submit_all(
            dispatcher, [{"name": "m", "inputs": rows(2, i)} for i in range(3)]
        )  # 2 rows wait, then 4 (at the limit), then the third is refused
        later = submit_all(dispatcher, [{"name": "m", "inputs": rows(2)}])
    finally:
        dispatcher.close()
    assert isinstance(answers[0], Prediction) and isinstance(answers[1], Prediction)
    assert isinstance(answers[2], TooBusy)
    assert isinstance(answers[2], ResourceExhausted)
    assert "4 rows of predictions on model 'm' are waiting" in answers[2].message
    assert isinstance(later[0], Prediction)  # the queue drained: accepted again
    assert passes(core) == (2, 6.0)  # the refused query never ran


def test_calls_beyond_the_pending_limit_are_refused_too_busy(core: Core) -> None:
    dispatcher = Dispatcher(core, max_pending_calls=2)
    release = threading.Event()

    async def run() -> list[Any]:
        held = [asyncio.ensure_future(dispatcher.offload(release.wait, 10)) for _ in range(2)]
        await asyncio.sleep(0)  # both are pending now
        with pytest.raises(TooBusy, match="2 calls are waiting"):
            await dispatcher.offload(lambda: 1)
        release.set()
        done = await asyncio.gather(*held)
        return [*done, await dispatcher.offload(lambda: 3)]

    try:
        assert asyncio.run(run()) == [True, True, 3]
    finally:
        release.set()
        dispatcher.close()


# -- busy polling and the count of calls in workers ----------------------------------------


def test_working_counts_calls_in_workers_until_they_finish(core: Core) -> None:
    dispatcher = Dispatcher(core)
    release = threading.Event()
    seen: list[int] = []

    async def run() -> None:
        offloaded = asyncio.ensure_future(dispatcher.offload(release.wait, 10))
        serial = dispatcher.serial()
        queued = [serial.submit(release.wait, 10), serial.submit(lambda: 1)]
        await asyncio.sleep(0.01)
        seen.append(dispatcher.working)
        release.set()
        await asyncio.gather(offloaded, *queued)
        await asyncio.sleep(0)  # the done callbacks run on the next turn
        seen.append(dispatcher.working)

    try:
        asyncio.run(run())
    finally:
        release.set()
        dispatcher.close()
    assert seen == [3, 0]


def test_working_counts_a_batch_in_a_worker_and_a_failing_call(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "INLINE_MACS", 0)  # every batch goes to a worker
    release = threading.Event()
    compute = core.predict_batch

    def held(queries: Any) -> Any:
        release.wait(10)
        return compute(queries)

    monkeypatch.setattr(core, "predict_batch", held)
    dispatcher = Dispatcher(core)
    seen: list[int] = []

    async def run() -> None:
        answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        dispatcher.submit_predict("m", rows(2), answered.set_result)
        await asyncio.sleep(0.01)
        seen.append(dispatcher.working)
        release.set()
        assert isinstance(await answered, Prediction)
        with pytest.raises(ZeroDivisionError):
            await dispatcher.offload(lambda: 1 / 0)
        await asyncio.sleep(0)
        seen.append(dispatcher.working)

    try:
        asyncio.run(run())
    finally:
        release.set()
        dispatcher.close()
    assert seen == [1, 0]


def test_busy_poll_keeps_the_loop_turning_for_its_window() -> None:
    async def run() -> tuple[int, float, int]:
        poll = dispatch.BusyPoll(0.02, lambda: True)
        loop = asyncio.get_running_loop()
        start = loop.time()
        poll.touch()
        poll.touch()  # a touch while polling extends the window, with one poller
        await asyncio.sleep(0.05)
        polled = poll.turns
        await asyncio.sleep(0.02)
        return polled, loop.time() - start, poll.turns

    polled, elapsed, later = asyncio.run(run())
    assert polled > 100  # turned without sleeping, for ~20 ms
    assert later == polled  # and stopped after the window
    assert elapsed >= 0.07


def test_busy_poll_is_off_at_zero_and_yields_to_workers() -> None:
    async def run() -> tuple[int, int]:
        off = dispatch.BusyPoll(0.0, lambda: True)
        off.touch()
        working = dispatch.BusyPoll(0.05, lambda: False)
        working.touch()
        await asyncio.sleep(0.02)
        return off.turns, working.turns

    assert asyncio.run(run()) == (0, 0)


def test_predictions_start_the_busy_poll_unless_a_worker_computes(core: Core) -> None:
    polling = Dispatcher(core, busy_poll=0.01)
    off = Dispatcher(core, busy_poll=0.0)
    release = threading.Event()

    async def run() -> tuple[int, int, int, int]:
        await polling.predict("m", rows(1))  # the gRPC way
        await asyncio.sleep(0.02)
        after_predict = polling.busy_poll.turns
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        polling.submit_predict("m", rows(1), done.set_result)  # the REST way
        await done
        await asyncio.sleep(0.02)
        after_submit = polling.busy_poll.turns
        held = asyncio.ensure_future(polling.offload(release.wait, 10))
        await asyncio.sleep(0)
        await polling.predict("m", rows(1))
        await asyncio.sleep(0.02)
        while_working = polling.busy_poll.turns - after_submit
        release.set()
        await held
        await off.predict("m", rows(1))
        await asyncio.sleep(0.02)
        return after_predict, after_submit - after_predict, while_working, off.busy_poll.turns

    try:
        after_predict, after_submit, while_working, switched_off = asyncio.run(run())
    finally:
        release.set()
        polling.close()
        off.close()
    assert after_predict > 10 and after_submit > 10
    assert while_working == 0
    assert switched_off == 0
