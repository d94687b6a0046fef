"""The replica's core (service.replica) in process, beside a writer on the same folder: what
each refresh swaps in, what it reads from disk, and what it counts as lag."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from propserve.service.config import Settings
from propserve.service.errors import FailedPrecondition
from propserve.service.models import Models
from propserve.service.replica import ReplicaModels
from propserve.service.store import ModelStore

SPEC: dict[str, Any] = {"input_dim": 3, "layers": [{"units": 2}], "loss": "mse", "seed": 4}
X = np.ones((1, 3))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Models, ReplicaModels]]:
    root = tmp_path / "store"
    writer = Models(ModelStore(root), Settings(store=root))
    writer.create_model("m", SPEC)
    for _ in range(3):  # versions 1, 2, 3, a step apart
        writer.save_version("m")
        writer.train_step("m", X, np.zeros((1, 2)))
    replica = ReplicaModels(ModelStore(root, read_only=True), Settings(store=root, follow=True))
    yield writer, replica
    replica.close()
    writer.close()


def lag_count(replica: ReplicaModels) -> float:
    value = replica.metrics.registry.get_sample_value("propserve_replica_lag_seconds_count")
    return value or 0.0


def test_label_moves_back_and_forth_read_each_version_once_and_count_one_lag_each(
    pair: tuple[Models, ReplicaModels], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, replica = pair
    loads: list[int] = []
    load = replica._load_version

    def counted(model: Any, version: int) -> Any:
        loads.append(version)
        return load(model, version)

    monkeypatch.setattr(replica, "_load_version", counted)
    assert replica.predict("m", X).version == 3  # no label: the newest
    for move in range(6):
        version = 1 + move % 2
        writer.set_label("m", "stable", version)
        replica.refresh()
        answer = replica.predict("m", X)
        assert answer.version == version
        assert np.array_equal(answer.outputs, writer.predict("m", X, version=version).outputs)
    assert sorted(loads) == [1, 2]  # a version a label left stays at hand
    assert lag_count(replica) == 6  # one per move, none for re-reading an old version


def test_a_new_version_counts_one_lag_and_is_served_by_default(
    pair: tuple[Models, ReplicaModels],
) -> None:
    writer, replica = pair
    writer.save_version("m")  # version 4
    replica.refresh()
    replica.refresh()  # nothing new: nothing counted
    assert replica.predict("m", X).version == 4
    assert lag_count(replica) == 1
    assert replica.get_model("m").latest_version == 4


def test_every_change_is_refused(pair: tuple[Models, ReplicaModels]) -> None:
    _, replica = pair
    for change in (
        lambda: replica.create_model("n", SPEC),
        lambda: replica.train_step("m", X, np.zeros((1, 2))),
        lambda: replica.save_version("m"),
        lambda: replica.set_label("m", "x", 1),
        lambda: replica.rollback("m", version=1),
        lambda: replica.delete_model("m"),
        lambda: replica.unload("m"),
    ):
        with pytest.raises(FailedPrecondition, match="read-only replica"):
            change()
