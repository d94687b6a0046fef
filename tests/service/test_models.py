"""The transport-free core (service.models), in process, over a real model store in
tmp_path: models, the live head, predictions from the head / a version / a label, training,
autosave, versions and their parents, rollback, labels, retention, limits, refusals that
change nothing, and shutdown followed by a restart over the same store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from propserve.engine import ModelSpec, Network
from propserve.service.config import Settings
from propserve.service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from propserve.service.models import Models
from propserve.service.store import ModelStore

Array = NDArray[Any]

#: A small regression model with adam, so that rollback has optimizer state to restore.
SPEC: dict[str, Any] = {
    "input_dim": 3,
    "layers": [{"units": 5, "activation": "tanh"}, {"units": 2, "activation": "identity"}],
    "loss": "mse",
    "optimizer": {"name": "adam", "lr": 0.01},
    "seed": 7,
}
#: A classifier with sgd + momentum (another optimizer state layout).
CLASSIFIER: dict[str, Any] = {
    "input_dim": 4,
    "layers": [{"units": 6, "activation": "relu"}, {"units": 3}],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "seed": 3,
}


def batches(seed: int, count: int, rows: int = 8) -> list[tuple[Array, Array]]:
    """``count`` (inputs, targets) batches for SPEC, from one seeded generator."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.standard_normal((rows, 3)).astype(np.float32)
        y = np.stack([x.sum(axis=1), x[:, 0] * x[:, 1]], axis=1).astype(np.float32)
        out.append((x, y))
    return out


PROBE = np.random.default_rng(99).standard_normal((4, 3)).astype(np.float32)


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


def open_models(root: Path, **settings: Any) -> Models:
    """The core over the store at ``root``, with these settings (others default)."""
    return Models(ModelStore(root), Settings(store=root, **settings))


@pytest.fixture
def core(store_root: Path) -> Iterator[Models]:
    opened = open_models(store_root)
    try:
        yield opened
    finally:
        opened.close()


def train(core: Models, name: str, data: list[tuple[Array, Array]]) -> list[float]:
    return [core.train_step(name, x, y).loss for x, y in data]


def head_state(core: Models, name: str) -> bytes:
    """The head's parameters, optimizer state and step as the engine serialises them.

    NOTE: reaches into the core's private table; saving a version to read the bytes back
    would change the very model whose unchanged state is being checked."""
    return core._models[name].head.to_bytes()


def version_network(core: Models, name: str, version: int) -> Network:
    _, data = core.store.load_version(name, version)
    return Network.from_bytes(data)


def assert_unchanged(core: Models, name: str, before: bytes, outputs: Array, step: int) -> None:
    assert head_state(core, name) == before, "the head's state changed"
    assert core.get_model(name).head_step == step
    prediction = core.predict(name, PROBE)
    np.testing.assert_array_equal(prediction.outputs, outputs)


# --- models -----------------------------------------------------------------------------


def test_create_get_list_delete(core: Models) -> None:
    info = core.create_model("alpha", SPEC)
    assert info.name == "alpha"
    assert info.head_step == 0
    assert info.latest_version is None
    assert info.unsaved_steps == 0
    assert info.parameter_count == ModelSpec.from_dict(SPEC).n_params == 3 * 5 + 5 + 5 * 2 + 2
    assert info.spec == ModelSpec.from_dict(SPEC).to_dict()
    core.create_model("beta", CLASSIFIER)
    assert [m.name for m in core.list_models()] == ["alpha", "beta"]
    assert core.get_model("beta").parameter_count == 4 * 6 + 6 + 6 * 3 + 3

    core.delete_model("alpha")
    assert [m.name for m in core.list_models()] == ["beta"]
    with pytest.raises(NotFound):
        core.get_model("alpha")
    with pytest.raises(NotFound):
        core.predict("alpha", PROBE)
    with pytest.raises(NotFound):
        core.delete_model("alpha")


def test_a_new_head_is_the_specs_initial_network(core: Models) -> None:
    core.create_model("m", SPEC)
    expected = Network(ModelSpec.from_dict(SPEC)).forward(PROBE)
    prediction = core.predict("m", PROBE)
    np.testing.assert_array_equal(prediction.outputs, expected)
    assert prediction.version is None
    assert prediction.step == 0


def test_create_refuses_a_taken_name(core: Models) -> None:
    core.create_model("m", SPEC)
    core.train_step("m", *batches(0, 1)[0])
    with pytest.raises(AlreadyExists):
        core.create_model("m", CLASSIFIER)
    assert core.get_model("m").head_step == 1
    assert core.get_model("m").spec["input_dim"] == 3


@pytest.mark.parametrize(
    "name", ["", "../x", "x/y", "Upper", ".hidden", "a" * 65, "x\n", "-lead", "sp ace"]
)
def test_create_refuses_bad_names(core: Models, store_root: Path, name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name"):
        core.create_model(name, SPEC)
    assert core.list_models() == []
    assert not (store_root.parent / "x").exists()


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"input_dim": 0, "layers": [{"units": 1}], "loss": "mse"},
        {"input_dim": 3, "layers": [], "loss": "mse"},
        {"input_dim": 3, "layers": [{"units": 2}], "loss": "hinge"},
        {"input_dim": 3, "layers": [{"units": 2}], "loss": "mse", "optimizer": {"name": "lbfgs"}},
        {"input_dim": 3, "layers": [{"units": 2}], "loss": "mse", "colour": "red"},
        "not a spec",
    ],
)
def test_create_refuses_bad_specs(core: Models, spec: Any) -> None:
    with pytest.raises(InvalidArgument, match="invalid spec"):
        core.create_model("m", spec)
    assert core.list_models() == []


def test_deleted_names_never_reuse_version_numbers(core: Models) -> None:
    core.create_model("m", SPEC)
    assert core.save_version("m").version == 1
    core.delete_model("m")
    core.create_model("m", SPEC)
    assert core.save_version("m").version == 2


# --- predicting -------------------------------------------------------------------------


def test_predict_on_head_version_and_label(core: Models) -> None:
    core.create_model("m", SPEC)
    data = batches(1, 6)
    train(core, "m", data[:3])
    v1 = core.save_version("m")
    assert (v1.version, v1.step) == (1, 3)
    train(core, "m", data[3:])
    core.set_label("m", "stable", 1)

    net1 = version_network(core, "m", 1)
    head = core.predict("m", PROBE)
    by_version = core.predict("m", PROBE, version=1)
    by_label = core.predict("m", PROBE, label="stable")

    assert (head.version, head.step) == (None, 6)
    assert (by_version.version, by_version.step) == (1, 3)
    assert (by_label.version, by_label.step) == (1, 3)
    np.testing.assert_array_equal(by_version.outputs, net1.forward(PROBE))
    np.testing.assert_array_equal(by_label.outputs, by_version.outputs)
    assert not np.array_equal(head.outputs, by_version.outputs)
    assert head.outputs.shape == (4, 2)
    assert head.outputs.dtype == np.float32


def test_predict_unknown_version_or_label(core: Models) -> None:
    core.create_model("m", SPEC)
    core.save_version("m")
    with pytest.raises(NotFound, match="version 2"):
        core.predict("m", PROBE, version=2)
    with pytest.raises(NotFound, match="label 'nope'"):
        core.predict("m", PROBE, label="nope")
    with pytest.raises(InvalidArgument, match="invalid label"):
        core.predict("m", PROBE, label="../x")
    with pytest.raises(InvalidArgument, match="invalid version"):
        core.predict("m", PROBE, version=0)
    with pytest.raises(InvalidArgument, match="invalid model name"):
        core.predict("../m", PROBE)
    with pytest.raises(NotFound, match="'other' not found"):
        core.predict("other", PROBE)


def test_predict_refuses_both_version_and_label(core: Models) -> None:
    core.create_model("m", SPEC)
    core.save_version("m")
    core.train_step("m", *batches(0, 1)[0])
    core.save_version("m")
    core.set_label("m", "stable", 2)
    with pytest.raises(InvalidArgument):
        core.predict("m", PROBE, version=1, label="stable")


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (np.ones((2, 4), np.float32), "features per row"),
        (np.ones((2, 3), np.int64), "floating point"),
        (np.ones(3, np.float32), "rank 2"),
        (np.ones((0, 3), np.float32), "empty batch"),
        (np.array([[1.0, np.nan, 0.0]], np.float32), "non-finite"),
        (np.array([[1.0, 0.0, -np.inf]]), "non-finite"),
    ],
)
def test_predict_refuses_bad_inputs(core: Models, inputs: Array, match: str) -> None:
    core.create_model("m", SPEC)
    with pytest.raises(InvalidArgument, match=match):
        core.predict("m", inputs)


def test_predict_accepts_float64_for_a_float32_model(core: Models) -> None:
    core.create_model("m", SPEC)
    as64 = core.predict("m", PROBE.astype(np.float64))
    np.testing.assert_array_equal(as64.outputs, core.predict("m", PROBE).outputs)


def test_non_finite_outputs_are_refused(core: Models) -> None:
    spec = {
        "input_dim": 1,
        "layers": [{"units": 64, "activation": "identity"}, {"units": 2}],
        "loss": "mse",
        "seed": 1,
    }
    core.create_model("m", spec)
    huge = np.full((1, 1), 3e38, np.float32)
    # Precondition: this finite input overflows this network.
    assert not np.isfinite(Network(ModelSpec.from_dict(spec)).forward(huge)).all()
    with pytest.raises(FailedPrecondition, match="not finite"):
        core.predict("m", huge)


def test_large_finite_inputs_are_accepted_quietly(core: Models) -> None:
    spec = {**SPEC, "layers": [{"units": 5, "activation": "tanh"}, {"units": 2}]}
    core.create_model("m", spec)
    x = np.array([[2e38, 2e38, 0.0]], np.float32)  # finite; its sum is not
    assert np.isfinite(core.predict("m", x).outputs).all()


# --- training ---------------------------------------------------------------------------


def test_train_step_matches_the_engine_bit_for_bit(core: Models) -> None:
    core.create_model("m", SPEC)
    reference = Network(ModelSpec.from_dict(SPEC))
    for i, (x, y) in enumerate(batches(2, 5), start=1):
        outcome = core.train_step("m", x, y)
        expected = reference.train_step(x, y)
        assert outcome.step == expected.step == i
        assert outcome.loss == expected.loss
        assert outcome.accuracy is None
        assert outcome.batch_size == 8
        assert outcome.saved_version is None
    assert head_state(core, "m") == reference.to_bytes()
    info = core.get_model("m")
    assert (info.head_step, info.unsaved_steps, info.latest_version) == (5, 5, None)
    assert info.last_loss == expected.loss


def test_train_step_learning_rate_override(core: Models) -> None:
    core.create_model("m", SPEC)
    reference = Network(ModelSpec.from_dict(SPEC))
    x, y = batches(3, 1)[0]
    core.train_step("m", x, y, learning_rate=0.5)
    reference.train_step(x, y, lr=0.5)
    assert head_state(core, "m") == reference.to_bytes()


def test_classifier_reports_accuracy(core: Models) -> None:
    core.create_model("c", CLASSIFIER)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 10)
    reference = Network(ModelSpec.from_dict(CLASSIFIER))
    outcome = core.train_step("c", x, labels)
    expected = reference.train_step(x, labels)
    assert outcome.accuracy == expected.accuracy
    assert outcome.accuracy is not None
    assert 0.0 <= outcome.accuracy <= 1.0


def test_autosave_every_n_steps(core: Models) -> None:
    core.create_model("m", SPEC, {"autosave_every": 3})
    saved = [core.train_step("m", x, y).saved_version for x, y in batches(5, 7)]
    assert saved == [None, None, 1, None, None, 2, None]
    versions = core.list_versions("m")
    assert [(v.version, v.step, v.parent) for v in versions] == [(1, 3, None), (2, 6, 1)]
    info = core.get_model("m")
    assert (info.head_step, info.unsaved_steps, info.latest_version) == (7, 1, 2)
    # Version 2 holds exactly the head as it was after step 6.
    reference = Network(ModelSpec.from_dict(SPEC))
    for x, y in batches(5, 6):
        reference.train_step(x, y)
    assert core.store.load_version("m", 2)[1] == reference.to_bytes()


def test_autosave_setting_can_change(core: Models) -> None:
    core.create_model("m", SPEC)
    train(core, "m", batches(6, 2))
    assert core.list_versions("m") == []
    assert core.update_settings("m", {"autosave_every": 2}).settings["autosave_every"] == 2
    saved = [core.train_step("m", x, y).saved_version for x, y in batches(7, 2)]
    assert saved == [None, 1]
    with pytest.raises(InvalidArgument, match="unknown setting"):
        core.update_settings("m", {"autosave": 1})
    with pytest.raises(InvalidArgument, match="invalid setting"):
        core.update_settings("m", {"retain": 0})
    assert core.get_model("m").settings["autosave_every"] == 2


# --- bad input and refused steps change nothing -----------------------------------------

_X, _Y = batches(8, 1)[0]
BAD_STEPS: list[tuple[str, Any, Any, float | None, str]] = [
    ("width", np.ones((8, 4), np.float32), _Y, None, "features per row"),
    ("int inputs", np.ones((8, 3), np.int32), _Y, None, "floating point"),
    ("nan inputs", np.where(np.eye(8, 3) > 0, np.nan, _X).astype(np.float32), _Y, None, "finite"),
    ("inf targets", _X, np.full((8, 2), np.inf, np.float32), None, "finite"),
    ("target rows", _X, _Y[:7], None, "rows"),
    ("target width", _X, np.ones((8, 3), np.float32), None, "shape"),
    ("negative lr", _X, _Y, -1.0, "learning rate"),
    ("nan lr", _X, _Y, float("nan"), "learning rate"),
]


@pytest.mark.parametrize(
    ("x", "y", "lr", "match"), [case[1:] for case in BAD_STEPS], ids=[c[0] for c in BAD_STEPS]
)
def test_bad_training_input_changes_nothing(
    core: Models, x: Any, y: Any, lr: float | None, match: str
) -> None:
    core.create_model("m", SPEC)
    train(core, "m", batches(9, 2))
    before, outputs = head_state(core, "m"), core.predict("m", PROBE).outputs
    with pytest.raises(InvalidArgument, match=match):
        core.train_step("m", x, y, learning_rate=lr)
    assert_unchanged(core, "m", before, outputs, 2)
    assert core.get_model("m").unsaved_steps == 2


def test_classifier_refuses_out_of_range_labels(core: Models) -> None:
    core.create_model("c", CLASSIFIER)
    x = np.ones((2, 4), np.float32)
    before = head_state(core, "c")
    with pytest.raises(InvalidArgument, match="out of range"):
        core.train_step("c", x, np.array([0, 3]))
    with pytest.raises(InvalidArgument, match="integers"):
        core.train_step("c", x, np.array([0.0, 1.0]))
    assert head_state(core, "c") == before


def test_a_diverging_step_is_refused_and_the_head_kept(core: Models) -> None:
    spec = {**SPEC, "optimizer": {"name": "sgd", "lr": 0.01}}
    core.create_model("m", spec, {"autosave_every": 1})
    x, y = batches(10, 1)[0]
    core.train_step("m", x, y)
    before, outputs = head_state(core, "m"), core.predict("m", PROBE).outputs
    with pytest.raises(FailedPrecondition, match="refused"):
        core.train_step("m", x * 1e20, y * 1e20)  # the loss overflows
    with pytest.raises(FailedPrecondition, match="refused"):
        core.train_step("m", x, y, learning_rate=1e38)  # the weights do
    assert_unchanged(core, "m", before, outputs, 1)
    info = core.get_model("m")
    assert (info.unsaved_steps, info.latest_version) == (0, 1)
    assert [v.version for v in core.list_versions("m")] == [1]
    # Training goes on from the kept head.
    assert core.train_step("m", x, y).step == 2


def test_rows_limit(store_root: Path) -> None:
    core = open_models(store_root, max_rows=4)
    try:
        core.create_model("m", SPEC)
        x, y = batches(11, 1, rows=5)[0]
        with pytest.raises(ResourceExhausted, match="limit is 4"):
            core.predict("m", x)
        with pytest.raises(ResourceExhausted, match="limit is 4"):
            core.train_step("m", x, y)
        assert core.get_model("m").head_step == 0
        assert core.predict("m", x[:4]).outputs.shape == (4, 2)
        assert core.train_step("m", x[:4], y[:4]).step == 1
    finally:
        core.close()


def test_param_limit_admits_a_model_at_the_limit(store_root: Path) -> None:
    n_params = ModelSpec.from_dict(SPEC).n_params
    core = open_models(store_root, max_params=n_params)
    try:
        assert core.create_model("m", SPEC).parameter_count == n_params
    finally:
        core.close()


def test_param_limit_is_resource_exhausted(store_root: Path) -> None:
    n_params = ModelSpec.from_dict(SPEC).n_params
    core = open_models(store_root, max_params=n_params - 1)
    try:
        with pytest.raises(ResourceExhausted):
            core.create_model("m", SPEC)
    finally:
        core.close()


def test_param_limit_refuses_and_creates_nothing(store_root: Path) -> None:
    n_params = ModelSpec.from_dict(SPEC).n_params
    core = open_models(store_root, max_params=n_params - 1)
    try:
        with pytest.raises((InvalidArgument, ResourceExhausted), match="exceed the limit"):
            core.create_model("m", SPEC)
        assert core.list_models() == []
        assert not (store_root / "m").exists()
    finally:
        core.close()


# --- versions, rollback, labels, retention ----------------------------------------------


def test_save_version_records_step_parent_and_loss(core: Models) -> None:
    core.create_model("m", SPEC)
    v1 = core.save_version("m")
    assert (v1.version, v1.step, v1.parent, v1.metrics) == (1, 0, None, {})
    losses = train(core, "m", batches(12, 2))
    v2 = core.save_version("m")
    assert (v2.version, v2.step, v2.parent) == (2, 2, 1)
    assert v2.metrics == {
        "last_loss": losses[-1],
        "mean_loss": sum(losses[-2:]) / 2,
        # The steps this version adds: its range in the model's history.
        "history_from": 1.0,
        "history_to": 2.0,
    }
    assert v2.size_bytes == len(core.store.load_version("m", 2)[1])
    assert core.get_model("m").unsaved_steps == 0
    assert core.get_model("m").latest_version == 2
    assert [v.version for v in core.list_versions("m")] == [1, 2]


def test_rollback_restores_weights_and_optimizer_state(core: Models) -> None:
    core.create_model("m", SPEC)
    data = batches(13, 8)
    train(core, "m", data[:3])
    assert core.save_version("m").version == 1
    train(core, "m", data[3:6])
    assert core.save_version("m").version == 2
    train(core, "m", data[6:])

    info = core.rollback("m", version=1)
    assert (info.head_step, info.unsaved_steps, info.latest_version) == (3, 0, 2)
    assert head_state(core, "m") == core.store.load_version("m", 1)[1]
    np.testing.assert_array_equal(
        core.predict("m", PROBE).outputs, version_network(core, "m", 1).forward(PROBE)
    )

    # Training continues bit-identically to a network loaded from version 1 ...
    reference = version_network(core, "m", 1)
    for x, y in data[3:6]:
        assert core.train_step("m", x, y).loss == reference.train_step(x, y).loss
    assert head_state(core, "m") == reference.to_bytes()
    # ... and so reproduces version 2 exactly: adam's moments came back too.
    assert head_state(core, "m") == core.store.load_version("m", 2)[1]

    v3 = core.save_version("m")
    assert (v3.version, v3.step, v3.parent) == (3, 6, 1)


def test_rollback_by_label_and_momentum_state(core: Models) -> None:
    core.create_model("c", CLASSIFIER)
    rng = np.random.default_rng(14)
    data = [
        (rng.standard_normal((6, 4)).astype(np.float32), rng.integers(0, 3, 6)) for _ in range(4)
    ]
    train(core, "c", data[:2])
    core.save_version("c")
    core.set_label("c", "good", 1)
    train(core, "c", data[2:])
    after_four = head_state(core, "c")
    core.rollback("c", label="good")
    assert core.get_model("c").head_step == 2
    train(core, "c", data[2:])
    assert head_state(core, "c") == after_four


def test_rollback_errors_change_nothing(core: Models) -> None:
    core.create_model("m", SPEC)
    core.save_version("m")
    train(core, "m", batches(15, 2))
    before, outputs = head_state(core, "m"), core.predict("m", PROBE).outputs
    with pytest.raises(NotFound):
        core.rollback("m", version=9)
    with pytest.raises(NotFound):
        core.rollback("m", label="nope")
    with pytest.raises(InvalidArgument):
        core.rollback("m")
    with pytest.raises(InvalidArgument):
        core.rollback("m", version=1, label="nope")
    with pytest.raises(InvalidArgument):
        core.rollback("m", version=0)
    assert_unchanged(core, "m", before, outputs, 2)
    assert core.get_model("m").unsaved_steps == 2


def test_labels_set_move_remove(core: Models) -> None:
    core.create_model("m", SPEC)
    core.save_version("m")
    core.train_step("m", *batches(16, 1)[0])
    core.save_version("m")
    assert core.set_label("m", "stable", 1).labels == {"stable": 1}
    assert core.set_label("m", "canary", 2).labels == {"stable": 1, "canary": 2}
    assert core.predict("m", PROBE, label="canary").version == 2
    assert core.set_label("m", "canary", 1).labels == {"stable": 1, "canary": 1}
    assert core.predict("m", PROBE, label="canary").version == 1
    assert [v.labels for v in core.list_versions("m")] == [("canary", "stable"), ()]
    assert core.remove_label("m", "canary").labels == {"stable": 1}
    with pytest.raises(NotFound):
        core.predict("m", PROBE, label="canary")
    with pytest.raises(NotFound):
        core.remove_label("m", "canary")
    with pytest.raises(NotFound):
        core.set_label("m", "x", 3)
    with pytest.raises(InvalidArgument):
        core.set_label("m", "Bad/Label", 1)
    assert core.get_model("m").labels == {"stable": 1}


def test_retention_keeps_the_last_k_and_labelled(core: Models) -> None:
    core.create_model("m", SPEC, {"retain": 2})
    core.save_version("m")
    core.set_label("m", "first", 1)
    for x, y in batches(17, 4):
        core.train_step("m", x, y)
        core.save_version("m")
    assert [v.version for v in core.list_versions("m")] == [1, 4, 5]
    with pytest.raises(NotFound):
        core.predict("m", PROBE, version=2)
    assert core.predict("m", PROBE, label="first").version == 1
    core.update_settings("m", {"retain": 1})
    assert [v.version for v in core.list_versions("m")] == [1, 5]
    core.remove_label("m", "first")
    core.train_step("m", *batches(18, 1)[0])
    assert core.save_version("m").version == 6
    assert [v.version for v in core.list_versions("m")] == [6]


def test_default_settings_apply_unless_overridden(store_root: Path) -> None:
    core = open_models(store_root, default_retain=1, default_autosave_every=2)
    try:
        assert core.create_model("a", SPEC).settings == {"retain": 1, "autosave_every": 2}
        info = core.create_model("b", SPEC, {"autosave_every": 0})
        assert info.settings == {"retain": 1, "autosave_every": 0}
        saved = [core.train_step("a", x, y).saved_version for x, y in batches(19, 4)]
        assert saved == [None, 1, None, 2]
        assert [v.version for v in core.list_versions("a")] == [2]
    finally:
        core.close()


# --- shutdown, restart, corrupt versions ------------------------------------------------


def test_shutdown_refuses_new_work(core: Models) -> None:
    core.create_model("m", SPEC)
    core.begin_shutdown()
    x, y = batches(20, 1)[0]
    for call in (
        lambda: core.predict("m", PROBE),
        lambda: core.train_step("m", x, y),
        lambda: core.create_model("n", SPEC),
        lambda: core.save_version("m"),
        lambda: core.rollback("m", version=1),
        lambda: core.delete_model("m"),
    ):
        with pytest.raises(Unavailable, match="shutting down"):
            call()
    assert core.get_model("m").head_step == 0


def test_close_saves_unsaved_heads_and_a_new_core_resumes(store_root: Path) -> None:
    first = open_models(store_root)
    first.create_model("m", SPEC)
    first.create_model("idle", CLASSIFIER)
    data = batches(21, 5)
    train(first, "m", data[:2])
    first.save_version("m")
    train(first, "m", data[2:4])
    state, outputs = head_state(first, "m"), first.predict("m", PROBE).outputs
    first.close()

    second = open_models(store_root)
    try:
        versions = second.list_versions("m")
        assert [(v.version, v.step, v.parent) for v in versions] == [(1, 2, None), (2, 4, 1)]
        assert second.list_versions("idle") == []  # nothing unsaved, nothing written
        info = second.get_model("m")
        assert (info.head_step, info.unsaved_steps, info.latest_version) == (4, 0, 2)
        assert head_state(second, "m") == state
        np.testing.assert_array_equal(second.predict("m", PROBE).outputs, outputs)
        # Training resumes exactly where the first core stopped.
        reference = Network.from_bytes(state)
        x, y = data[4]
        assert second.train_step("m", x, y).loss == reference.train_step(x, y).loss
        assert head_state(second, "m") == reference.to_bytes()
        assert second.get_model("idle").head_step == 0
    finally:
        second.close()


def test_a_rolled_back_head_survives_a_restart(store_root: Path) -> None:
    first = open_models(store_root)
    first.create_model("m", SPEC)
    data = batches(22, 2)
    train(first, "m", data[:1])
    first.save_version("m")
    train(first, "m", data[1:])
    first.save_version("m")
    first.rollback("m", version=1)
    state = head_state(first, "m")
    first.close()

    second = open_models(store_root)
    try:
        assert second.get_model("m").head_step == 1
        assert head_state(second, "m") == state
    finally:
        second.close()


def test_a_corrupt_latest_version_is_skipped_at_load(store_root: Path) -> None:
    first = open_models(store_root)
    first.create_model("m", SPEC)
    data = batches(23, 2)
    train(first, "m", data[:1])
    first.save_version("m")
    v1_state = head_state(first, "m")
    train(first, "m", data[1:])
    first.save_version("m")
    first.close()

    weights = store_root / "m" / "versions" / "2" / "weights.safetensors"
    corrupt = bytearray(weights.read_bytes())
    corrupt[-1] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(corrupt))

    second = open_models(store_root)
    try:
        info = second.get_model("m")
        assert info.head_step == 1
        assert head_state(second, "m") == v1_state
        assert second.predict("m", PROBE, version=1).step == 1
        with pytest.raises(Exception, match="sha256") as caught:
            second.predict("m", PROBE, version=2)
        assert type(caught.value).__name__ == "DataLoss"
    finally:
        second.close()


def test_a_model_whose_versions_are_all_corrupt_starts_fresh(store_root: Path) -> None:
    first = open_models(store_root)
    first.create_model("m", SPEC)
    train(first, "m", batches(24, 1))
    first.save_version("m")
    first.close()
    weights = store_root / "m" / "versions" / "1" / "weights.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(b"\0" * len(weights.read_bytes()))

    second = open_models(store_root)
    try:
        assert second.get_model("m").head_step == 0
        assert head_state(second, "m") == Network(ModelSpec.from_dict(SPEC)).to_bytes()
    finally:
        second.close()


def test_a_version_removed_by_retention_is_not_served_from_memory(store_root: Path) -> None:
    core = open_models(store_root)
    try:
        core.create_model("m", SPEC, {"retain": 1})
        core.save_version("m")  # version 1
        assert core.predict("m", PROBE, version=1).version == 1  # now in memory
        train(core, "m", batches(3, 1))
        core.save_version("m")  # version 2; retention removes version 1
        assert [v.version for v in core.list_versions("m")] == [2]
        with pytest.raises(NotFound, match="version 1"):
            core.predict("m", PROBE, version=1)
    finally:
        core.close()
