"""The transport-free core: models, their live heads, versions, training and prediction.

The data plane (propserve.service.dataplane) calls these methods and the adapters call the
data plane; the core speaks numpy arrays and the wire's records, raises the typed errors of
propserve.service.errors, and knows no transport, event loop or thread pool.

Concurrency
-----------
Methods are synchronous and thread-safe; the data plane runs heavy ones in worker threads.
Each model has a head (an engine Network) and a writer lock. Training steps, saves,
rollbacks and label moves on one model take its lock, so they are serialised; different
models never contend. Predictions take no lock: they read the head's current immutable
parameter snapshot once and compute with it, so a prediction sees exactly one step's weights
however many steps finish meanwhile.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve import wire
from propserve.engine import (
    CheckedBatch,
    DivergedError,
    EngineError,
    InputError,
    ModelSpec,
    Network,
    Params,
    SpecError,
    StateError,
    all_finite,
    check_inputs,
    evaluate,
    forward,
)
from propserve.engine.onnxgraph import to_onnx
from propserve.engine.weights import export_weights, import_weights
from propserve.service.config import Settings
from propserve.service.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from propserve.service.history import DEFAULT_QUERY_LIMIT as DEFAULT_HISTORY_POINTS
from propserve.service.history import History
from propserve.service.metrics import Metrics
from propserve.service.store import ModelRecord, ModelStore, VersionMeta
from propserve.service.store.records import check_name
from propserve.service.versioncache import VersionCache

log = logging.getLogger("propserve.models")

#: The label a request that names no version is served from, when the model has it (by the
#: Open Inference Protocol's adapters; see docs/api.md#versions).
SERVING_LABEL = "stable"


@dataclass(frozen=True)
class Prediction:
    """Outputs (batch, outputs), the saved version that answered (None: the head) and the
    training step of its weights."""

    outputs: NDArray[Any]
    version: int | None
    step: int


@dataclass(frozen=True)
class PredictQuery:
    """One validated prediction request (see :meth:`Models.prepare_predict`): the model, the
    version asked for (None: the head), the inputs in the model's dtype and, for a version,
    its weights when they are in memory. Queries with the same ``key`` can share a forward
    pass."""

    model: LiveModel
    version: int | None
    x: NDArray[Any]
    weights: tuple[ModelSpec, Params] | None

    @property
    def weights_loaded(self) -> bool:
        """False for a saved version whose weights must be read from disk first."""
        return self.version is None or self.weights is not None

    @property
    def key(self) -> tuple[LiveModel, int | None]:
        return (self.model, self.version)

    @property
    def rows(self) -> int:
        return len(self.x)

    @property
    def multiply_adds(self) -> int:
        """The forward pass's size: rows x parameters."""
        return self.rows * self.model.spec.n_params


@dataclass(frozen=True)
class PreparedStep:
    """A training step's batch validated for its model (see :meth:`Models.prepare_step`)."""

    model: LiveModel
    batch: CheckedBatch


class LiveModel:
    """A model's live state in the server. Fields other than ``network`` change only under
    ``lock``; ``network`` is replaced (never mutated) by a rollback.

    ``latest`` is the newest saved version; ``parent`` the version the head descends from
    (what the next save records); ``unsaved`` the steps since the head was saved or loaded.
    After a rollback to an older version the head differs from ``latest`` without unsaved
    steps: ``detached`` says so, and shutdown saves it so that a restart resumes there."""

    def __init__(
        self,
        record: ModelRecord,
        spec: ModelSpec,
        network: Network | None,
        parent: int | None,
        last_loss: float | None,
        history: History | None = None,
    ) -> None:
        self.record = record
        self.spec = spec
        #: The live head; a read-only replica has none (propserve.service.replica).
        self.network = network
        #: A replica's saved versions held in memory (the newest and those labels name).
        self.pinned: dict[int, tuple[ModelSpec, Params]] = {}
        #: A replica's newest version's step (the writer's is its head's).
        self.served_step = 0
        #: A replica's last look at the model in the store (ModelStore.stamp), and how many.
        self.stamp: tuple[int, ...] | None = None
        self.looks = 0
        self.parent = parent
        self.latest = parent
        self.last_loss = last_loss
        self.unsaved = 0
        self.unsaved_loss_sum = 0.0
        self.unsaved_accuracy_sum = 0.0
        #: The head's training history (propserve.service.history): one record per step.
        self.history = history if history is not None else History()
        self.detached = False
        self.deleted = False
        self.unloaded = False
        self.lock = threading.Lock()

    @property
    def head(self) -> Network:
        """The live head (a writer's model always has one)."""
        if self.network is None:
            raise FailedPrecondition(f"model {self.record.name!r} has no live head here")
        return self.network

    @property
    def step(self) -> int:
        return self.served_step if self.network is None else self.network.step


def to_service_error(exc: EngineError, what: str = "") -> Exception:
    """The service's error for an engine's."""
    prefix = f"{what}: " if what else ""
    if isinstance(exc, SpecError):
        return InvalidArgument(f"invalid spec: {exc}")
    if isinstance(exc, DivergedError):
        return FailedPrecondition(f"{prefix}{exc}")
    if isinstance(exc, StateError):
        return DataLoss(f"{prefix}{exc}")
    return InvalidArgument(f"{prefix}{exc}")


def last_loss(metrics: Mapping[str, float]) -> float | None:
    # Versions saved before "last_loss" was named recorded the same value as "loss".
    return metrics.get("last_loss", metrics.get("loss"))


def _metrics(model: LiveModel) -> dict[str, float]:
    """A version's metrics, named for what they are: ``last_*`` of the last batch, ``mean_*``
    over the steps this version adds (``history_from`` to ``history_to``, its range in the
    model's history)."""
    metrics: dict[str, float] = {}
    if model.last_loss is not None and math.isfinite(model.last_loss):
        metrics["last_loss"] = model.last_loss
        if model.unsaved and math.isfinite(model.unsaved_loss_sum):
            metrics["mean_loss"] = model.unsaved_loss_sum / model.unsaved
    last = model.history.last
    if model.unsaved and last is not None and last.step == model.head.step:
        if last.accuracy is not None:
            metrics["last_accuracy"] = last.accuracy
            metrics["mean_accuracy"] = model.unsaved_accuracy_sum / model.unsaved
        metrics["history_from"] = float(model.head.step - model.unsaved + 1)
        metrics["history_to"] = float(model.head.step)
    return metrics


class Models:
    """Models served and trained by this server, over one model store."""

    def __init__(
        self, store: ModelStore, settings: Settings, metrics: Metrics | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._models: dict[str, LiveModel] = {}
        #: Models unloaded from memory (see :meth:`unload`): their record when unloaded.
        self._unloaded: dict[str, wire.Model] = {}
        self._lock = threading.Lock()
        self._versions = VersionCache(settings.version_cache)
        self._closing = False
        for record in store.list_models():
            try:
                self._models[record.name] = self._load(record)
            except Exception:
                log.exception("model.load_failed", extra={"model": record.name})

    # -- lifecycle ---------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Refuse new work (Unavailable); work already running finishes."""
        self._closing = True

    def close(self) -> None:
        """Save every head with unsaved steps, then close the store."""
        self._closing = True
        for model in list(self._models.values()):
            with model.lock:
                if (model.unsaved or model.detached) and not model.deleted:
                    try:
                        meta = self._save_locked(model)
                        log.info(
                            "model.saved_on_shutdown",
                            extra={"model": meta.model, "version": meta.version, "step": meta.step},
                        )
                    except Exception:
                        log.exception(
                            "model.save_on_shutdown_failed", extra={"model": model.record.name}
                        )
        self.store.close()

    # -- models ------------------------------------------------------------------------

    def create_model(
        self,
        name: str,
        spec: Any,
        settings: Mapping[str, Any] | None = None,
        *,
        weights: bytes | memoryview | None = None,
        layout: str = "propserve",
    ) -> wire.Model:
        """A new model, its head fresh from the spec's seed, or from ``weights`` (a
        safetensors file in ``layout``, docs/weights.md): then saved at once as version 1,
        so a crash cannot lose what was imported."""
        self._check_writable()
        check_name(name)
        try:
            # The parameter limit is the server's (ResourceExhausted), not the spec's validity.
            parsed = ModelSpec.from_dict(spec, max_params=2**63 - 1)
        except SpecError as exc:
            raise to_service_error(exc) from None
        if parsed.n_params > self.settings.max_params:
            raise ResourceExhausted(
                f"the spec's {parsed.n_params:,} parameters exceed the limit "
                f"of {self.settings.max_params:,} per model on this server"
            )
        if weights is None:
            network = Network(parsed)
        else:
            try:  # the engine refuses an unknown layout too
                network = import_weights(parsed, weights, layout=layout)
            except EngineError as exc:
                raise InvalidArgument(f"weights: {exc}") from None
        defaults = {
            "retain": self.settings.default_retain,
            "autosave_every": self.settings.default_autosave_every,
        }
        with self._lock:
            record = self.store.create_model(
                name, parsed.to_dict(), defaults | dict(settings or {})
            )
            history = History(self.settings.history_steps)
            model = LiveModel(record, parsed, network, None, None, history)
            if weights is not None:
                try:
                    self._save_locked(model)
                except Exception:
                    self.store.delete_model(name)
                    raise
            self._models[name] = model
        self.metrics.step.labels(name).set(network.step)
        self.metrics.versions.labels(name).set(0 if model.latest is None else 1)
        log.info(
            "model.created",
            extra={"model": name, "params": parsed.n_params, "imported": weights is not None},
        )
        return self._record(model)

    def get_model(self, name: str) -> wire.Model:
        unloaded = self._unloaded.get(name)
        if unloaded is not None:
            return unloaded
        return self._record(self._model(name))

    def list_models(self) -> list[wire.Model]:
        with self._lock:
            models = [self._record(m) for m in self._models.values()]
            models += self._unloaded.values()
        return sorted(models, key=lambda m: m.name)

    def delete_model(self, name: str) -> None:
        self._check_writable()
        with self._lock:
            unloaded = self._unloaded.pop(name, None)
        if unloaded is not None:
            self.store.delete_model(name)
            log.info("model.deleted", extra={"model": name})
            return
        model = self._model(name)
        with model.lock:
            self.store.delete_model(name)
            model.deleted = True
            with self._lock:
                self._models.pop(name, None)
            self._versions.forget(name)
        self.metrics.forget_model(name)
        log.info("model.deleted", extra={"model": name})

    def update_settings(self, name: str, settings: Mapping[str, Any]) -> wire.Model:
        self._check_writable()
        model = self._model(name)
        with model.lock:
            model.record = self.store.update_settings(name, dict(settings))
        return self._record(model)

    # -- in memory or not ----------------------------------------------------------------

    def is_loaded(self, name: str) -> bool:
        """Whether ``name`` is in memory, ready to predict (NotFound for no such model)."""
        if name in self._unloaded:
            return False
        self._model(name)
        return True

    def unload(self, name: str) -> None:
        """Drop the model's head and cached versions from memory; until :meth:`load_model`,
        calls on it other than reading its record or deleting it answer FailedPrecondition.
        Refused while the head has steps no version holds (they would be lost)."""
        self._check_writable()
        model = self._model(name)
        with model.lock:
            self._check_alive(model)
            if model.unsaved or model.detached:
                what = f"{model.unsaved} unsaved steps" if model.unsaved else "a rolled-back head"
                raise FailedPrecondition(
                    f"model {name!r} has {what}; save a version before unloading it"
                )
            record = self._record(model)
            model.unloaded = True
            with self._lock:
                self._models.pop(name, None)
                self._unloaded[name] = record
            self._versions.forget(name)
        log.info("model.unloaded", extra={"model": name})

    def load_model(self, name: str) -> None:
        """Bring the model into memory: its head (from its newest version) if it was unloaded,
        and the versions its labels name, so the first predictions by them read no disk."""
        self._check_writable()
        if name in self._unloaded:
            model = self._load(self.store.get_model(name))
            with self._lock:
                if self._unloaded.pop(name, None) is not None:
                    self._models[name] = model
            log.info("model.reloaded", extra={"model": name})
        model = self._model(name)
        for version in sorted(set(model.record.labels.values())):
            self._version_weights(model, version)

    def serving_label(self, name: str) -> str | None:
        """The label a request naming no version is served from, if the model has it."""
        return SERVING_LABEL if SERVING_LABEL in self._model(name).record.labels else None

    def has_source(self, name: str, *, version: int | None, label: str | None) -> bool:
        """Whether the loaded model has saved ``version`` or ``label`` (the head: always)."""
        model = self._model(name)
        if label is not None:
            return label in model.record.labels
        if version is None:
            return True
        return any(meta.version == version for meta in self.store.list_versions(name))

    # -- predicting and training -------------------------------------------------------

    def predict(
        self,
        name: str,
        inputs: NDArray[Any],
        *,
        version: int | None = None,
        label: str | None = None,
    ) -> Prediction:
        """Forward pass on the head, on saved ``version``, or on the version ``label`` names."""
        query = self.prepare_predict(name, inputs, version=version, label=label)
        return self.answer(self.load(query))

    def prepare_predict(
        self,
        name: str,
        inputs: NDArray[Any],
        *,
        version: int | None = None,
        label: str | None = None,
    ) -> PredictQuery:
        """A validated prediction request, ready for :meth:`predict_batch`.

        Everything that can be wrong with one request is found here, so that a batch of
        queries fails only for reasons they share. Nothing is read from disk: a saved version
        not in memory comes back with ``weights_loaded`` false (see :meth:`load`)."""
        self._check_open()
        model = self._model(name)
        self._check_rows(inputs)
        problem = wire.source_problem(version, label)
        if problem:
            raise InvalidArgument(problem)
        if version is None and label is None:
            version, label = self._default_source(model)
        if label is not None:
            version = self._label_version(model, label)
        try:
            x = check_inputs(model.spec, inputs)
        except InputError as exc:
            raise to_service_error(exc) from None
        if version is None:
            return PredictQuery(model, None, x, None)
        return PredictQuery(model, version, x, self._in_memory(model, version))

    def load(self, query: PredictQuery) -> PredictQuery:
        """``query`` with its version's weights in memory, read from disk if need be (slow:
        call it off the event loop)."""
        if query.weights_loaded:
            return query
        assert query.version is not None
        weights = self._version_weights(query.model, query.version)
        return PredictQuery(query.model, query.version, query.x, weights)

    def answer(self, query: PredictQuery) -> Prediction:
        """One query's prediction (see :meth:`predict_batch`)."""
        result = self.predict_batch([query])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def predict_batch(self, queries: list[PredictQuery]) -> list[Prediction | Exception]:
        """One forward pass for queries with the same model and source (the head or one
        loaded version); each gets its own rows back, or its own error. They all see one
        snapshot of the weights."""
        first = queries[0]
        model = first.model
        if first.version is None:
            if model.deleted or model.unloaded:
                gone = self._gone(model)
                return [gone for _ in queries]
            spec, params = model.spec, model.head.params
        elif first.weights is not None:
            spec, params = first.weights
        else:
            raise ValueError("a query for a version not in memory: load() it first")
        x = first.x if len(queries) == 1 else np.concatenate([q.x for q in queries])
        outputs = forward(spec, params, x)
        finite = all_finite(outputs)
        results: list[Prediction | Exception] = []
        start = 0
        for query in queries:
            rows = outputs[start : start + query.rows]
            start += query.rows
            if finite or all_finite(rows):
                results.append(Prediction(rows, query.version, params.step))
            else:
                results.append(
                    FailedPrecondition(
                        "the model's outputs overflow for these inputs (not "
                        "finite); check the inputs' scale"
                    )
                )
        answered = sum(len(r.outputs) for r in results if isinstance(r, Prediction))
        if answered:
            self.metrics.predicted(model.record.name, answered, len(x))
        return results

    def evaluate(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        *,
        version: int | None = None,
        label: str | None = None,
    ) -> wire.Evaluation:
        """The loss (and accuracy) on (inputs, targets) of the head, a saved version or the
        version a label names, as a training step would compute it; nothing changes. Slow
        for a version not in memory (reads it): call it off the event loop."""
        query = self.load(self.prepare_predict(name, inputs, version=version, label=label))
        model = query.model
        if query.weights is not None:
            spec, params = query.weights
        else:
            if model.deleted or model.unloaded:
                raise self._gone(model)
            spec, params = model.spec, model.head.params
        try:
            loss, accuracy = evaluate(spec, params, query.x, targets)
        except EngineError as exc:
            raise to_service_error(exc) from None
        if not math.isfinite(loss):
            raise FailedPrecondition(
                "the loss is not finite for these rows; check the inputs' and targets' scale"
            )
        return wire.Evaluation(loss, accuracy, query.rows, params.step, query.version)

    def train_step(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        *,
        learning_rate: float | None = None,
    ) -> wire.StepResult:
        """One step on the head. Bad input or a diverging step changes nothing."""
        return self.apply_step(
            self.prepare_step(name, inputs, targets, learning_rate=learning_rate)
        )

    def prepare_step(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        *,
        learning_rate: float | None = None,
    ) -> PreparedStep:
        """A training step's batch, validated for the model (InvalidArgument otherwise),
        ready for :meth:`apply_step`; nothing changes."""
        self._check_writable()
        model = self._model(name)
        self._check_rows(inputs)
        try:
            batch = model.head.check_batch(inputs, targets, lr=learning_rate)
        except EngineError as exc:
            raise to_service_error(exc) from None
        return PreparedStep(model, batch)

    def apply_step(self, prepared: PreparedStep) -> wire.StepResult:
        """One step on the head with a batch :meth:`prepare_step` accepted. A diverging step
        changes nothing."""
        self._check_writable()
        model = prepared.model
        name = model.record.name
        with model.lock:
            self._check_alive(model)
            try:
                result = model.head.apply(prepared.batch)
            except DivergedError as exc:
                self.metrics.refused_steps.labels(name).inc()
                log.warning("model.step_refused", extra={"model": name, "reason": str(exc)})
                raise to_service_error(exc) from None
            except EngineError as exc:
                raise to_service_error(exc) from None
            model.unsaved += 1
            model.unsaved_loss_sum += result.loss
            if result.accuracy is not None:
                model.unsaved_accuracy_sum += result.accuracy
            model.last_loss = result.loss
            model.history.record(
                result.step,
                result.loss,
                result.accuracy,
                prepared.batch.lr,
                len(prepared.batch.x),
                time.time(),
            )
            saved = None
            every = int(model.record.settings.get("autosave_every", 0))
            if every and result.step % every == 0:
                saved = self._save_locked(model).version
        rows = int(prepared.batch.x.shape[0])
        self.metrics.training_samples.labels(name).inc(rows)
        self.metrics.training_steps.labels(name).inc()
        self.metrics.step.labels(name).set(result.step)
        self.metrics.last_loss.labels(name).set(result.loss)
        return wire.StepResult(result.step, result.loss, result.accuracy, rows, saved)

    # -- versions and labels -----------------------------------------------------------

    def save_version(self, name: str) -> wire.Version:
        self._check_writable()
        model = self._model(name)
        with model.lock:
            self._check_alive(model)
            meta = self._save_locked(model)
            return self._version_record(model, meta)

    def list_versions(self, name: str) -> list[wire.Version]:
        model = self._model(name)
        return [self._version_record(model, meta) for meta in self.store.list_versions(name)]

    def export_weights(
        self, name: str, version: int, *, layout: str = "propserve", format: str = "safetensors"
    ) -> wire.WeightsFile:
        """A saved version's weights as a file (docs/weights.md). The propserve layout's
        safetensors file is the stored file itself; the others are made from it. Slow (reads
        the version): call it off the event loop."""
        problem = wire.source_problem(version, None) or wire.export_problem(layout, format)
        if problem:
            raise InvalidArgument(problem)
        self._check_open()
        model = self._model(name)
        meta, data = self.store.load_version(name, version)
        if format == "safetensors" and layout == "propserve":
            out = data
        else:
            _, network = self._load_version(model, version)
            try:
                if format == "onnx":
                    out = to_onnx(network.spec, network.params, name=f"{name}-v{version}")
                else:
                    out = export_weights(network, layout=layout)
            except ImportError as exc:
                raise FailedPrecondition(f"this server cannot export ONNX: {exc}") from None
        return wire.WeightsFile(name, version, meta.step, format, layout, meta.sha256, out)

    # -- training history --------------------------------------------------------------

    def history(
        self,
        name: str,
        *,
        since: int | None = None,
        until: int | None = None,
        every: int = 1,
        limit: int | None = None,
    ) -> wire.History:
        """The head's training history from ``since`` to ``until`` (both included), one
        point per step or per bucket of ``every`` steps (see History.query), at most
        ``limit`` points (None: DEFAULT_HISTORY_POINTS)."""
        problem = wire.history_problem(since, until, every, limit)
        if problem:
            raise InvalidArgument(problem)
        model = self._model(name)
        part = model.history.query(
            since=since, until=until, every=every, limit=limit or DEFAULT_HISTORY_POINTS
        )
        return wire.History(name, tuple(part.points()), part.next_since)

    def history_end(self, name: str) -> int | None:
        """The last step in the model's history (None: none yet)."""
        return self._model(name).history.last_step

    def set_label(self, name: str, label: str, version: int) -> wire.Model:
        self._check_writable()
        model = self._model(name)
        with model.lock:
            model.record = self.store.set_label(name, label, version)
        log.info("label.set", extra={"model": name, "label": label, "version": version})
        return self._record(model)

    def remove_label(self, name: str, label: str) -> wire.Model:
        self._check_writable()
        model = self._model(name)
        with model.lock:
            model.record = self.store.remove_label(name, label)
        log.info("label.removed", extra={"model": name, "label": label})
        return self._record(model)

    def rollback(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> wire.Model:
        """Reset the head to a saved version: weights, optimizer state and step. Training
        continues from there, and the next saved version records it as parent."""
        self._check_writable()
        model = self._model(name)
        if version is None and label is None:
            raise InvalidArgument("rollback needs a version or a label")
        problem = wire.source_problem(version, label)
        if problem:
            raise InvalidArgument(problem)
        with model.lock:
            self._check_alive(model)
            target = self._label_version(model, label) if label is not None else version
            assert target is not None
            meta, network = self._load_version(model, target)
            model.network = network
            model.parent = meta.version
            model.unsaved = 0
            model.unsaved_loss_sum = model.unsaved_accuracy_sum = 0.0
            model.detached = meta.version != model.latest
            model.last_loss = last_loss(meta.metrics)
            model.history.rewind(meta.step)
        self.metrics.step.labels(name).set(network.step)
        log.info(
            "model.rolled_back",
            extra={"model": name, "version": meta.version, "step": meta.step},
        )
        return self._record(model)

    # -- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("the server is shutting down")

    def _check_writable(self) -> None:
        """Before any change: a read-only replica refuses them all."""
        self._check_open()

    def _default_source(self, model: LiveModel) -> tuple[int | None, str | None]:
        """The (version, label) a prediction naming neither is served from: the head."""
        return None, None

    def _in_memory(self, model: LiveModel, version: int) -> tuple[ModelSpec, Params] | None:
        """A saved version's weights if they are in memory."""
        return self._versions.get(model.record.name, version)

    def _check_rows(self, inputs: Any) -> None:
        rows = inputs.shape[0] if isinstance(inputs, np.ndarray) and inputs.ndim else 0
        if rows > self.settings.max_rows:
            raise ResourceExhausted(
                f"{rows:,} rows in one request; the limit is {self.settings.max_rows:,}"
            )

    @staticmethod
    def _gone(model: LiveModel) -> Exception:
        name = model.record.name
        if model.deleted:
            return NotFound(f"model {name!r} was deleted")
        return FailedPrecondition(f"model {name!r} is not loaded; load it first")

    @classmethod
    def _check_alive(cls, model: LiveModel) -> None:
        if model.deleted or model.unloaded:
            raise cls._gone(model)

    def _model(self, name: str) -> LiveModel:
        model = self._models.get(name)
        if model is None:
            if name in self._unloaded:
                raise FailedPrecondition(f"model {name!r} is not loaded; load it first")
            check_name(name)
            raise NotFound(f"model {name!r} not found")
        return model

    def _load(self, record: ModelRecord) -> LiveModel:
        """A model's head from its newest verifiable version, or fresh from its spec."""
        max_params = self.settings.max_params
        spec = ModelSpec.from_dict(record.spec, max_params=max_params)
        latest = self.store.latest_version(record.name)
        history = self.store.read_history(record.name, limit=self.settings.history_steps)
        if latest is None:
            network, parent, loss = Network(spec), None, None
        else:
            _, data = self.store.load_version(record.name, latest.version)
            network = Network.from_bytes(data, max_params=max_params)
            parent, loss = latest.version, last_loss(latest.metrics)
        self.metrics.step.labels(record.name).set(network.step)
        self.metrics.versions.labels(record.name).set(len(self.store.list_versions(record.name)))
        log.info(
            "model.loaded",
            extra={"model": record.name, "version": parent, "step": network.step},
        )
        # The history follows the head: if the newest version failed and an older one loaded,
        # the steps after it are not the head's.
        history.rewind(network.step)
        return LiveModel(record, spec, network, parent, loss, history)

    def _label_version(self, model: LiveModel, label: str) -> int:
        version = model.record.labels.get(label)
        if version is None:
            check_name(label, "label")
            raise NotFound(f"model {model.record.name!r} has no label {label!r}")
        return version

    def _load_version(self, model: LiveModel, version: int) -> tuple[VersionMeta, Network]:
        meta, data = self.store.load_version(model.record.name, version)
        try:
            network = Network.from_bytes(data, max_params=self.settings.max_params)
        except StateError as exc:
            raise DataLoss(
                f"model {model.record.name!r} version {version} cannot be loaded: {exc}"
            ) from None
        return meta, network

    def _version_weights(self, model: LiveModel, version: int) -> tuple[ModelSpec, Params]:
        name = model.record.name
        cached = self._versions.get(name, version)
        if cached is not None:
            return cached
        _, network = self._load_version(model, version)
        weights = (network.spec, network.params)
        self._versions.put(name, version, weights)
        return weights

    def _save_locked(self, model: LiveModel) -> VersionMeta:
        name = model.record.name
        state = model.head.to_bytes()
        meta = self.store.save_version(
            name, state, step=model.head.step, parent=model.parent, metrics=_metrics(model)
        )
        model.parent = model.latest = meta.version
        model.unsaved = 0
        model.unsaved_loss_sum = model.unsaved_accuracy_sum = 0.0
        model.detached = False
        self._persist_history(model)
        # Retention may have removed versions: they leave memory too, so a prediction by
        # such a version answers NotFound as the store does.
        kept = {version.version for version in self.store.list_versions(name)}
        self._versions.keep_only(name, kept)
        self.metrics.versions.labels(name).set(len(kept))
        log.info(
            "version.saved",
            extra={
                "model": name,
                "version": meta.version,
                "step": meta.step,
                "bytes": meta.size_bytes,
            },
        )
        return meta

    def _persist_history(self, model: LiveModel) -> None:
        """The head's history up to the version just saved, appended to the store. A failure
        is logged, not raised: the version is saved, and the next save writes these
        records too."""
        try:
            self.store.append_history(model.record.name, model.history)
        except Exception as exc:
            log.warning(
                "history.persist_failed", extra={"model": model.record.name, "reason": str(exc)}
            )

    def _version_record(self, model: LiveModel, meta: VersionMeta) -> wire.Version:
        labels = tuple(sorted(k for k, v in model.record.labels.items() if v == meta.version))
        return wire.Version(
            meta.model,
            meta.version,
            meta.step,
            meta.created_at,
            meta.parent,
            dict(meta.metrics),
            meta.sha256,
            meta.size_bytes,
            labels,
        )

    def _record(self, model: LiveModel) -> wire.Model:
        record = model.record
        return wire.Model(
            record.name,
            dict(record.spec),
            dict(record.settings),
            dict(record.labels),
            model.step,
            model.latest,
            model.unsaved,
            model.spec.n_params,
            record.created_at,
            model.last_loss,
        )
