"""rest_api.PredictHotPath without a server: every answer, success or error, asks the loop
to keep polling (service.dispatch.BusyPoll)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from service.auth import Authenticator
from service.core import Core
from service.dispatch import Dispatcher
from service.metrics import Metrics
from service.rest_api import PredictHotPath
from service.store import ModelStore

SPEC: dict[str, Any] = {"input_dim": 2, "layers": [{"units": 1}], "loss": "mse", "seed": 0}


class Recorder:
    def __init__(self) -> None:
        self.touched = 0

    def touch(self) -> None:
        self.touched += 1


def test_every_answer_touches_the_busy_poll(tmp_path: Path) -> None:
    metrics = Metrics()
    core = Core(ModelStore(tmp_path / "store"), metrics=metrics)
    core.create_model("m", SPEC)
    dispatcher = Dispatcher(core)
    poll = Recorder()
    hot = PredictHotPath(
        dispatcher,
        Authenticator({}),
        metrics,
        max_body=1 << 20,
        max_elements=1 << 20,
        busy_poll=poll,  # type: ignore[arg-type]
    )
    bodies = [b'{"inputs": [[1.0, 2.0]]}', b'{"inputs": [[1.0]]}', b"not json"]

    async def run() -> list[tuple[int, int]]:
        answers: list[tuple[int, int]] = []
        for body in bodies:
            done = asyncio.get_running_loop().create_future()

            def reply(status: int, payload: bytes, *_: Any, done: Any = done) -> None:
                json.loads(payload)
                done.set_result(status)

            hot.handle("m", [], body, reply)
            answers.append((await done, poll.touched))
        return answers

    try:
        assert asyncio.run(run()) == [(200, 1), (400, 2), (400, 3)]
    finally:
        dispatcher.close()
        core.close()
