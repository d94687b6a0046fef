"""Unit tests of the model store: models, versions, labels, retention, validation,
verification, read-only opens. Crashes are in test_store_faults.py, processes in
test_store_concurrency.py."""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from propserve.service.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from propserve.service.store import DEFAULT_SETTINGS, ModelStore, records

SPEC: dict[str, Any] = {"input": 3, "layers": [{"units": 2, "activation": "relu"}]}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[ModelStore]:
    with ModelStore(root) as opened:
        yield opened


def state(seed: int, size: int = 1000) -> bytes:
    return random.Random(seed).randbytes(size)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders)."""
    tree: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        tree[rel] = None if path.is_dir() else path.read_bytes()
    return tree


def numbers(store: ModelStore, name: str = "m") -> list[int]:
    return [meta.version for meta in store.list_versions(name)]


# --- models -----------------------------------------------------------------------------


def test_model_lifecycle(store: ModelStore) -> None:
    created = store.create_model("m", SPEC, {"retain": 4})
    assert created.name == "m" and created.spec == SPEC and created.labels == {}
    assert created.settings == {**DEFAULT_SETTINGS, "retain": 4}
    assert store.get_model("m") == created
    store.create_model("a.b-c_1", {}, None)
    assert [r.name for r in store.list_models()] == ["a.b-c_1", "m"]
    updated = store.update_settings("m", {"autosave_every": 50})
    assert updated.settings == {"retain": 4, "autosave_every": 50}
    store.delete_model("m")
    assert [r.name for r in store.list_models()] == ["a.b-c_1"]
    with pytest.raises(NotFound, match="'m'"):
        store.get_model("m")


def test_create_existing_model_is_refused(store: ModelStore, root: Path) -> None:
    store.create_model("m", SPEC, None)
    before = snapshot(root)
    with pytest.raises(AlreadyExists, match="'m'"):
        store.create_model("m", {}, None)
    assert snapshot(root) == before


def test_record_does_not_alias_the_callers_spec(store: ModelStore) -> None:
    spec = {"layers": [1, 2]}
    record = store.create_model("m", spec, None)
    spec["layers"].append(3)
    assert record.spec == {"layers": [1, 2]} == store.get_model("m").spec


# --- versions ---------------------------------------------------------------------------


def test_save_and_load_round_trip(store: ModelStore) -> None:
    store.create_model("m", SPEC, None)
    first = store.save_version("m", state(1), step=10, parent=None, metrics={"loss": 0.5})
    second = store.save_version("m", state(2, 3_000_000), step=20, parent=1, metrics={})
    assert (first.version, second.version) == (1, 2)
    assert first.sha256 == hashlib.sha256(state(1)).hexdigest()
    assert (first.step, first.parent, first.size_bytes) == (10, None, 1000)
    assert first.metrics == {"loss": 0.5}
    assert second.parent == 1 and second.spec == SPEC
    meta, data = store.load_version("m", 2)
    assert meta == second and data == state(2, 3_000_000)
    assert store.list_versions("m") == [first, second]
    assert store.latest_version("m") == second


def test_empty_state_is_a_valid_version(store: ModelStore) -> None:
    store.create_model("m", SPEC, None)
    store.save_version("m", b"", step=0)
    assert store.load_version("m", 1)[1] == b""


def test_list_versions_reads_no_weights(store: ModelStore, root: Path) -> None:
    store.create_model("m", SPEC, None)
    store.save_version("m", state(1), step=1)
    (root / "m" / "versions" / "1" / "weights.safetensors").unlink()
    assert numbers(store) == [1]
    with pytest.raises(DataLoss, match="'m' version 1"):
        store.load_version("m", 1)


@pytest.mark.parametrize("parent", [0, 3, 4, -1, True, "1"])
def test_parent_must_be_an_earlier_version(store: ModelStore, root: Path, parent: Any) -> None:
    store.create_model("m", SPEC, None)
    store.save_version("m", state(1), step=1)
    store.save_version("m", state(2), step=2)
    before = snapshot(root)
    with pytest.raises(InvalidArgument):
        store.save_version("m", state(3), step=3, parent=parent)
    assert snapshot(root) == before


# --- numbering ------------------------------------------------------------------------


def test_numbers_are_never_reused(store: ModelStore, root: Path) -> None:
    store.create_model("m", SPEC, {"retain": 1})
    for step in range(3):
        store.save_version("m", state(step), step=step)
    assert numbers(store) == [3]
    store.delete_model("m")
    store.create_model("m", SPEC, None)
    assert store.save_version("m", state(9), step=0).version == 4
    store.close()
    # A crash mid-save leaves a staged folder; it is cleaned and its number unseen.
    (root / ".staging" / "version-x").mkdir()
    (root / ".staging" / "version-x" / "weights.safetensors").write_bytes(b"partial")
    with ModelStore(root) as reopened:
        assert os.listdir(root / ".staging") == []
        assert reopened.save_version("m", state(10), step=1).version == 5


# --- labels and retention -------------------------------------------------------------


def test_labels_set_move_remove(store: ModelStore) -> None:
    store.create_model("m", SPEC, None)
    for step in range(3):
        store.save_version("m", state(step), step=step)
    assert store.set_label("m", "stable", 1).labels == {"stable": 1}
    store.set_label("m", "canary", 3)
    assert store.set_label("m", "stable", 2).labels == {"stable": 2, "canary": 3}
    assert store.get_model("m").labels == {"stable": 2, "canary": 3}
    assert store.remove_label("m", "canary").labels == {"stable": 2}
    with pytest.raises(NotFound, match="canary"):
        store.remove_label("m", "canary")


def test_label_on_missing_version_is_refused(store: ModelStore, root: Path) -> None:
    store.create_model("m", SPEC, None)
    store.save_version("m", state(1), step=1)
    before = snapshot(root)
    with pytest.raises(NotFound, match="version 7"):
        store.set_label("m", "stable", 7)
    assert snapshot(root) == before


def test_retention_keeps_last_k_and_labelled(store: ModelStore) -> None:
    store.create_model("m", SPEC, {"retain": 3})
    store.save_version("m", state(1), step=1)
    store.set_label("m", "stable", 1)
    for step in range(2, 8):
        store.save_version("m", state(step), step=step)
    assert numbers(store) == [1, 5, 6, 7]
    store.update_settings("m", {"retain": 1})  # applies at once
    assert numbers(store) == [1, 7]
    store.remove_label("m", "stable")  # label changes never delete by themselves
    assert numbers(store) == [1, 7]
    store.save_version("m", state(8), step=8)
    assert numbers(store) == [8]


# --- validation -----------------------------------------------------------------------

BAD_NAMES = ["", ".", "..", "../x", "/abs", "a/b", "A", "x" * 65, ".hidden", "a\n", "a b",
             "é", "-x", "_x", "a\x00", None, 3, b"m"]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_refused_and_change_nothing(store: ModelStore, root: Path, bad: Any) -> None:
    store.create_model("m", SPEC, None)
    store.save_version("m", state(1), step=1)
    before = snapshot(root)
    calls: list[Callable[[], object]] = [
        lambda: store.create_model(bad, SPEC, None),
        lambda: store.get_model(bad),
        lambda: store.save_version(bad, state(2), step=2),
        lambda: store.load_version(bad, 1),
        lambda: store.list_versions(bad),
        lambda: store.delete_model(bad),
        lambda: store.set_label("m", bad, 1),
        lambda: store.remove_label("m", bad),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            call()
    assert snapshot(root) == before


def test_longest_name_is_accepted(store: ModelStore) -> None:
    assert store.create_model("x" * 64, SPEC, None).name == "x" * 64


@pytest.mark.parametrize(
    "bad",
    [{"retain": 0}, {"retain": True}, {"retain": "3"}, {"retain": 1.0},
     {"autosave_every": -1}, {"bogus": 1}, {3: 1}, [("retain", 1)]],
)  # fmt: skip
def test_bad_settings_are_refused(store: ModelStore, root: Path, bad: Any) -> None:
    with pytest.raises(InvalidArgument):
        store.create_model("m", SPEC, bad)
    store.create_model("m", SPEC, None)
    before = snapshot(root)
    with pytest.raises(InvalidArgument):
        store.update_settings("m", bad)
    assert snapshot(root) == before


@pytest.mark.parametrize("bad", [0, -1, True, "1", 1.0, 2**63])
def test_bad_version_numbers_are_refused(store: ModelStore, bad: Any) -> None:
    store.create_model("m", SPEC, None)
    with pytest.raises(InvalidArgument):
        store.load_version("m", bad)


@pytest.mark.parametrize(
    ("spec", "metrics"),
    [({"x": float("nan")}, {}), ({"x": object()}, {}), ({1: 2}, {}), ([1], {}),
     (SPEC, {"loss": float("inf")}), (SPEC, {"loss": "low"}), (SPEC, {"": 1.0})],
)  # fmt: skip
def test_non_json_metadata_is_refused(store: ModelStore, spec: Any, metrics: Any) -> None:
    with pytest.raises(InvalidArgument):
        store.create_model("n", spec, None)
        store.save_version("n", b"", step=0, metrics=metrics)
    if spec is SPEC:
        assert numbers(store, "n") == []


def test_unknown_things_are_not_found(store: ModelStore) -> None:
    with pytest.raises(NotFound, match="'nope'"):
        store.list_versions("nope")
    with pytest.raises(NotFound, match="'nope'"):
        store.save_version("nope", b"", step=0)
    store.create_model("m", SPEC, None)
    with pytest.raises(NotFound, match="version 1 of model 'm'"):
        store.load_version("m", 1)
    assert store.latest_version("m") is None


def test_metadata_too_large(root: Path) -> None:
    with ModelStore(root, max_metadata_bytes=1000) as store:
        with pytest.raises(ResourceExhausted, match="spec"):
            store.create_model("m", {"blob": "x" * 1000}, None)
        store.create_model("m", SPEC, None)
        before = snapshot(root)
        with pytest.raises(ResourceExhausted, match="metrics"):
            store.save_version("m", b"", step=0, metrics={f"k{i}": 1.0 for i in range(200)})
        for i in range(100):  # labels grow model.json until it hits the limit
            try:
                store.set_label("m", f"label-{i:03d}", 1)
            except (NotFound, ResourceExhausted) as exc:
                assert isinstance(exc, NotFound)  # there is no version 1 yet
                break
        assert snapshot(root) == before
        store.save_version("m", b"", step=0)
        with pytest.raises(ResourceExhausted, match="model 'm' metadata"):
            for i in range(100):
                store.set_label("m", f"label-{i:03d}", 1)
        assert len(store.get_model("m").labels) < 100


def test_default_metadata_limit_is_one_mebibyte(store: ModelStore) -> None:
    store.create_model("ok", {"blob": "x" * 1_000_000}, None)
    with pytest.raises(ResourceExhausted):
        store.create_model("big", {"blob": "x" * (1 << 20)}, None)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab0._-/\\ A\n\x00é"), max_size=70))
def test_names_are_single_safe_path_components(name: str) -> None:
    valid = re.fullmatch(records.NAME_PATTERN, name) is not None
    try:
        records.check_name(name)
    except InvalidArgument:
        assert not valid
        return
    assert valid
    root = Path("/store")
    assert (root / name).parent == root and (root / name).name == name
    assert not name.startswith(".") and name not in (".", "..")


# --- verification ----------------------------------------------------------------------


def _tamper(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    with open(path, "r+b") as f:
        f.write(data)


def test_tampered_weights_are_never_served(store: ModelStore, root: Path) -> None:
    store.create_model("m", SPEC, None)
    for step in (1, 2):
        store.save_version("m", state(step), step=step)
    _tamper(root / "m" / "versions" / "2" / "weights.safetensors")
    with pytest.raises(DataLoss, match=r"model 'm' version 2: .*sha256"):
        store.load_version("m", 2)
    latest = store.latest_version("m")
    assert latest is not None and latest.version == 1
    assert store.latest_version("m").version == 1  # type: ignore[union-attr]
    assert numbers(store) == [1, 2]  # reported, not hidden from the listing


def test_truncated_weights_and_bad_meta_are_data_loss(store: ModelStore, root: Path) -> None:
    store.create_model("m", SPEC, None)
    for step in (1, 2, 3):
        store.save_version("m", state(step), step=step)
    (root / "m" / "versions" / "3" / "weights.safetensors").write_bytes(b"short")
    (root / "m" / "versions" / "2" / "meta.json").write_text("{not json")
    with pytest.raises(DataLoss, match="'m' version 3"):
        store.load_version("m", 3)
    with pytest.raises(DataLoss, match="'m' version 2"):
        store.load_version("m", 2)
    assert numbers(store) == [1, 3]
    assert store.latest_version("m").version == 1  # type: ignore[union-attr]


def test_latest_caches_verdicts_by_file_identity(
    store: ModelStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create_model("m", SPEC, None)
    store.save_version("m", state(1, 100_000), step=1)
    store.save_version("m", state(2, 100_000), step=2)
    hashed: list[int] = []
    real = hashlib.sha256

    def counting(data: bytes = b"") -> Any:
        hashed.append(len(data))
        return real(data)

    monkeypatch.setattr(hashlib, "sha256", counting)
    fresh = ModelStore(root, read_only=True)
    assert fresh.latest_version("m").version == 2  # type: ignore[union-attr]
    assert fresh.latest_version("m").version == 2  # type: ignore[union-attr]
    assert len(hashed) == 1  # the second call cost a stat
    # Rewritten in place (new contents, new mtime/ctime) or replaced (new inode).
    path = root / "m" / "versions" / "2" / "weights.safetensors"
    os.utime(path, ns=(1, 1))
    _tamper(path)
    assert fresh.latest_version("m").version == 1  # type: ignore[union-attr]


# --- read-only, locking, lifecycle ----------------------------------------------------


def test_read_only_open_never_writes(root: Path) -> None:
    with ModelStore(root) as writer:
        writer.create_model("m", SPEC, None)
        writer.save_version("m", state(1), step=1)
    (root / ".staging" / "leftover").mkdir()
    os.unlink(root / ".lock")
    before = snapshot(root)
    with ModelStore(root, read_only=True) as reader:
        assert reader.load_version("m", 1)[1] == state(1)
        assert reader.latest_version("m") is not None
        writes: list[Callable[[], object]] = [
            lambda: reader.create_model("n", SPEC, None),
            lambda: reader.save_version("m", b"", step=0),
            lambda: reader.set_label("m", "stable", 1),
            lambda: reader.remove_label("m", "stable"),
            lambda: reader.update_settings("m", {"retain": 1}),
            lambda: reader.delete_model("m"),
        ]
        for write in writes:
            with pytest.raises(FailedPrecondition, match="read-only"):
                write()
    assert snapshot(root) == before


def test_read_only_open_of_missing_store(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        ModelStore(tmp_path / "nothing", read_only=True)
    assert not (tmp_path / "nothing").exists()


def test_reader_follows_the_writer(store: ModelStore, root: Path) -> None:
    reader = ModelStore(root, read_only=True)
    store.create_model("m", SPEC, None)
    store.save_version("m", state(1), step=1)
    assert numbers(reader) == [1]
    store.set_label("m", "stable", 1)
    assert reader.get_model("m").labels == {"stable": 1}


def test_one_writer_per_store(store: ModelStore, root: Path) -> None:
    with pytest.raises(FailedPrecondition, match=str(root)):
        ModelStore(root)
    store.close()
    with ModelStore(root) as second:
        assert second.list_models() == []


def test_closed_store_refuses_calls(store: ModelStore) -> None:
    store.close()
    store.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        store.list_models()


def test_random_operations_match_a_simple_model(store: ModelStore) -> None:
    """300 seeded random operations against a dict that states the rules plainly."""
    rng = random.Random(7)
    expected: dict[str, dict[str, Any]] = {}  # name -> {"versions", "labels", "retain"}
    high: dict[str, int] = {}
    for _ in range(300):
        name = rng.choice(["a", "b"])
        op = rng.random()
        model = expected.get(name)
        if model is None:
            store.create_model(name, SPEC, {"retain": rng.randint(1, 3)})
            expected[name] = model = {"versions": [], "labels": {}, "retain": None}
            model["retain"] = store.get_model(name).settings["retain"]
        elif op < 0.05:
            store.delete_model(name)
            del expected[name]
            continue
        elif op < 0.25 and model["versions"]:
            label, version = rng.choice(["x", "y"]), rng.choice(model["versions"])
            store.set_label(name, label, version)
            model["labels"][label] = version
        elif op < 0.3 and model["labels"]:
            label = rng.choice(sorted(model["labels"]))
            store.remove_label(name, label)
            del model["labels"][label]
        else:
            meta = store.save_version(name, state(rng.randrange(1000), 10), step=0)
            assert meta.version == high.get(name, 0) + 1
            high[name] = meta.version
            kept = model["versions"] + [meta.version]
            labelled = set(model["labels"].values())
            cut = max(len(kept) - model["retain"], 0)
            model["versions"] = [v for v in kept[:cut] if v in labelled] + kept[cut:]
        assert numbers(store, name) == model["versions"]
        assert store.get_model(name).labels == model["labels"]
