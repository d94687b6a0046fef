"""The Open Inference Protocol's shared rules (service.oip) and what they need of the core, in
process: how a model_version string picks the weights, that OIP and propserve's own
predictions share forward passes, the metadata a model answers, and unloading and loading."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from propserve.service import oip
from propserve.service.config import Settings
from propserve.service.errors import FailedPrecondition, InvalidArgument, NotFound
from propserve.service.models import Models, Prediction
from propserve.service.store import ModelStore
from tests.service.test_dataplane import RELU_SPEC, SPEC, passes, plane_for, rows, run


@pytest.fixture
def models(tmp_path: Path) -> Iterator[Models]:
    opened = Models(ModelStore(tmp_path / "store"), Settings(store=tmp_path / "store"))
    opened.create_model("m", SPEC)
    opened.create_model("r", RELU_SPEC)
    yield opened
    opened.close()


@pytest.fixture
def trained(models: Models) -> Iterator[Models]:
    """Model m with versions 1 and 2 (a step apart) and a head a step past version 2."""
    targets = np.zeros((4, 3))
    models.save_version("m")
    models.train_step("m", rows(4), targets)
    models.save_version("m")
    models.train_step("m", rows(4), targets)
    yield models


@pytest.mark.parametrize(
    ("text", "version", "label"),
    [("", None, None), ("3", 3, None), ("007", 7, None), ("canary", None, "canary")],
)
def test_a_model_version_string_names_a_version_a_label_or_the_policy(
    text: str, version: int | None, label: str | None
) -> None:
    source = oip.source(text)
    assert (source.version, source.label, source.default) == (version, label, not text)


@pytest.mark.parametrize("text", ["0", str(2**63), "a b", "-1", "x" * 200, "٣"])
def test_a_malformed_model_version_is_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument, match="model version"):
        oip.source(text)


def test_the_policy_is_the_stable_label_else_the_head(trained: Models) -> None:
    plane = plane_for(trained)
    x = rows(2)
    try:
        head = run(oip.infer(plane, "m", "", x))
        assert head.version is None and head.step == 2
        trained.set_label("m", "stable", 1)
        stable = run(oip.infer(plane, "m", "", x))
        assert (stable.version, stable.step) == (1, 0)
        assert np.array_equal(stable.outputs, trained.predict("m", x, version=1).outputs)
        by_label = run(oip.infer(plane, "m", "stable", x))
        by_number = run(oip.infer(plane, "m", "2", x))
        assert (by_label.version, by_number.version) == (1, 2)
        with pytest.raises(NotFound):
            run(oip.infer(plane, "m", "9", x))
        with pytest.raises(NotFound):
            run(oip.infer(plane, "m", "gone", x))
    finally:
        plane.close()
    assert oip.answered_version(head) == "" and oip.answered_version(by_number) == "2"


def test_oip_and_v1_predictions_on_the_same_weights_share_a_pass(models: Models) -> None:
    plane = plane_for(models)
    x1, x2, x3 = rows(1, 1), rows(2, 2), rows(3, 3)

    async def together() -> list[Prediction]:
        return list(
            await asyncio.gather(
                plane.predict("m", x1),
                oip.infer(plane, "m", "", x2),
                plane.predict("m", x3),
            )
        )

    try:
        answers = run(together())
    finally:
        plane.close()
    assert passes(models.metrics) == (1, 6.0)
    for x, answer in zip((x1, x2, x3), answers, strict=True):
        assert answer.outputs.shape == (len(x), 3)


def test_metadata_names_the_tensors_versions_and_labels(trained: Models) -> None:
    trained.set_label("m", "canary", 2)
    plane = plane_for(trained)
    try:
        meta = run(oip.model_metadata(plane, "m", ""))
        assert run(oip.model_metadata(plane, "m", "canary")) == meta
        with pytest.raises(NotFound, match="'5'"):
            run(oip.model_metadata(plane, "m", "5"))
    finally:
        plane.close()
    assert meta == {
        "name": "m",
        "versions": ["1", "2"],
        "platform": oip.PLATFORM,
        "inputs": [{"name": "inputs", "datatype": "FP64", "shape": [-1, SPEC["input_dim"]]}],
        "outputs": [{"name": "outputs", "datatype": "FP64", "shape": [-1, 3]}],
        "properties": {"label.canary": "2", "step": "2", "latest_version": "2"},
    }


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "words"),
    [
        ("x", "FP32", [1, 8], "unknown input 'x'"),
        ("inputs", "INT64", [1, 8], "'INT64' is not supported"),
        ("inputs", "FP32", [8], "[rows, features]"),
        ("inputs", "FP32", [1, 2, 4], "[rows, features]"),
    ],
)
def test_an_input_is_checked(name: str, datatype: str, shape: list[int], words: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        oip.check_input(name, datatype, shape)
    assert words in raised.value.message


def test_unloading_drops_the_model_from_memory_until_loaded(trained: Models) -> None:
    trained.save_version("m")  # version 3: nothing unsaved
    trained.set_label("m", "stable", 1)
    before = trained.predict("m", rows(2)).outputs
    trained.unload("m")
    assert not trained.is_loaded("m")
    assert trained._versions.get("m", 1) is None
    record = trained.get_model("m")
    assert (record.name, record.latest_version, record.head_step) == ("m", 3, 2)
    assert [m.name for m in trained.list_models()] == ["m", "r"]
    for call in (
        lambda: trained.predict("m", rows(2)),
        lambda: trained.train_step("m", rows(2), np.zeros((2, 3))),
        lambda: trained.save_version("m"),
        lambda: trained.set_label("m", "x", 1),
        lambda: trained.unload("m"),
    ):
        with pytest.raises(FailedPrecondition, match="not loaded"):
            call()
    trained.load_model("m")
    assert trained.is_loaded("m")
    assert trained._versions.get("m", 1) is not None  # what the labels name, in memory
    assert np.array_equal(trained.predict("m", rows(2)).outputs, before)
    trained.load_model("m")  # loading a loaded model only warms its labelled versions


def test_unloading_refuses_unsaved_steps_and_changes_nothing(trained: Models) -> None:
    with pytest.raises(FailedPrecondition, match="1 unsaved steps"):
        trained.unload("m")
    assert trained.is_loaded("m") and trained.get_model("m").unsaved_steps == 1
    trained.rollback("m", version=1)
    with pytest.raises(FailedPrecondition, match="rolled-back head"):
        trained.unload("m")
    assert trained.is_loaded("m")


def test_an_unloaded_model_can_be_deleted(models: Models) -> None:
    models.unload("r")
    models.delete_model("r")
    with pytest.raises(NotFound):
        models.get_model("r")
    with pytest.raises(NotFound):
        models.is_loaded("r")
    assert [m.name for m in models.list_models()] == ["m"]


def test_repository_index(trained: Models) -> None:
    trained.unload("r")
    plane = plane_for(trained)
    try:
        index = run(oip.repository_index(plane, ready_only=False))
        ready = run(oip.repository_index(plane, ready_only=True))
    finally:
        plane.close()
    assert index == [
        {"name": "m", "version": "2", "state": "READY"},
        {"name": "r", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"},
    ]
    assert ready == index[:1]
