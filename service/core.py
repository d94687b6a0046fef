"""The transport-free core: models, their live heads, versions, training and prediction.

Both adapters (gRPC and REST) call these methods and nothing else; the core speaks numpy
arrays and plain data, raises the typed errors of service.errors, and knows no transport.

Concurrency
-----------
Methods are synchronous and thread-safe; the adapters run heavy ones in worker threads.
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
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from propserve.engine import (
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
    forward,
)
from propserve.service.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from propserve.service.metrics import Metrics
from propserve.service.store import ModelRecord, ModelStore, VersionMeta
from propserve.service.store.records import check_name

log = logging.getLogger("propserve.core")


@dataclass(frozen=True)
class Limits:
    """What one request or model may ask for."""

    max_rows: int = 65536
    max_params: int = 50_000_000
    max_elements: int = 1 << 26


@dataclass(frozen=True)
class ModelInfo:
    name: str
    spec: dict[str, Any]
    settings: dict[str, Any]
    labels: dict[str, int]
    head_step: int
    latest_version: int | None
    unsaved_steps: int
    parameter_count: int
    created_at: float
    last_loss: float | None


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    step: int
    created_at: float
    parent: int | None
    metrics: dict[str, float]
    sha256: str
    size_bytes: int
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Prediction:
    """Outputs (batch, outputs), the version that answered (None: the head) and its step."""

    outputs: NDArray[Any]
    version: int | None
    step: int


@dataclass(frozen=True)
class PredictQuery:
    """One validated prediction request (see :meth:`Core.prepare_predict`): the model, the
    version asked for (None: the head), the inputs in the model's dtype and, for a version,
    its weights. Queries with the same ``key`` can share a forward pass."""

    model: _Model
    version: int | None
    x: NDArray[Any]
    weights: tuple[ModelSpec, Params] | None
    ready: bool = True

    @property
    def key(self) -> tuple[_Model, int | None]:
        return (self.model, self.version)

    @property
    def rows(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class StepOutcome:
    step: int
    loss: float
    accuracy: float | None
    batch_size: int
    saved_version: int | None


class _Model:
    """A model's live state in the server. Fields other than ``network`` change only under
    ``lock``; ``network`` is replaced (never mutated) by a rollback."""

    def __init__(
        self,
        record: ModelRecord,
        spec: ModelSpec,
        network: Network,
        parent: int | None,
        last_loss: float | None,
    ) -> None:
        self.record = record
        self.spec = spec
        self.network = network
        self.parent = parent
        self.latest = parent
        self.last_loss = last_loss
        self.unsaved = 0
        # True when the head differs from the newest saved version without unsaved steps
        # (after a rollback to an older version): shutdown saves it so a restart resumes here.
        self.detached = False
        self.deleted = False
        self.lock = threading.Lock()


def _engine_error(exc: EngineError, what: str = "") -> Exception:
    prefix = f"{what}: " if what else ""
    if isinstance(exc, SpecError):
        return InvalidArgument(f"invalid spec: {exc}")
    if isinstance(exc, InputError):
        return InvalidArgument(f"{prefix}{exc}")
    if isinstance(exc, DivergedError):
        return FailedPrecondition(f"{prefix}{exc}")
    if isinstance(exc, StateError):
        return DataLoss(f"{prefix}{exc}")
    return InvalidArgument(f"{prefix}{exc}")


class Core:
    """Models served and trained by this server, over one model store."""

    def __init__(
        self,
        store: ModelStore,
        *,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
        default_settings: Mapping[str, int] | None = None,
        version_cache: int = 8,
    ) -> None:
        self.store = store
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self._default_settings = dict(default_settings or {})
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int], tuple[ModelSpec, Params]] = OrderedDict()
        self._cache_size = version_cache
        self._closing = False
        for record in store.list_models():
            try:
                self._models[record.name] = self._load(record)
            except Exception:
                log.exception("model.load_failed model=%s", record.name)

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
                            "model.saved_on_shutdown model=%s version=%d step=%d",
                            meta.model,
                            meta.version,
                            meta.step,
                        )
                    except Exception:
                        log.exception("model.save_on_shutdown_failed model=%s", model.record.name)
        self.store.close()

    # -- models ------------------------------------------------------------------------

    def create_model(
        self, name: str, spec: Any, settings: Mapping[str, Any] | None = None
    ) -> ModelInfo:
        self._check_open()
        check_name(name)
        try:
            # The parameter limit is the server's (ResourceExhausted), not the spec's validity.
            parsed = ModelSpec.from_dict(spec, max_params=2**63 - 1)
        except SpecError as exc:
            raise _engine_error(exc) from None
        if parsed.n_params > self.limits.max_params:
            raise ResourceExhausted(
                f"the spec's {parsed.n_params:,} parameters exceed the limit "
                f"of {self.limits.max_params:,} per model on this server"
            )
        network = Network(parsed)
        with self._lock:
            record = self.store.create_model(
                name, parsed.to_dict(), self._default_settings | dict(settings or {})
            )
            model = self._models[name] = _Model(record, parsed, network, None, None)
        self.metrics.step.labels(name).set(0)
        self.metrics.versions.labels(name).set(0)
        log.info("model.created model=%s params=%d", name, parsed.n_params)
        return self._info(model)

    def get_model(self, name: str) -> ModelInfo:
        return self._info(self._model(name))

    def parameter_count(self, name: str) -> int:
        """The model's number of parameters (cheap; for sizing work before doing it)."""
        return self._model(name).spec.n_params

    def list_models(self) -> list[ModelInfo]:
        with self._lock:
            models = sorted(self._models.values(), key=lambda m: m.record.name)
        return [self._info(m) for m in models]

    def delete_model(self, name: str) -> None:
        self._check_open()
        model = self._model(name)
        with model.lock:
            self.store.delete_model(name)
            model.deleted = True
            with self._lock:
                self._models.pop(name, None)
                for key in [k for k in self._cache if k[0] == name]:
                    del self._cache[key]
        self.metrics.forget_model(name)
        log.info("model.deleted model=%s", name)

    def update_settings(self, name: str, settings: Mapping[str, Any]) -> ModelInfo:
        self._check_open()
        model = self._model(name)
        with model.lock:
            model.record = self.store.update_settings(name, dict(settings))
        return self._info(model)

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
        query = self.prepare_predict(name, inputs, version=version, label=label, load=True)
        result = self.predict_batch([query])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def prepare_predict(
        self,
        name: str,
        inputs: NDArray[Any],
        *,
        version: int | None = None,
        label: str | None = None,
        load: bool = False,
    ) -> PredictQuery:
        """A validated prediction request, ready for :meth:`predict_batch`.

        Everything that can be wrong with one request is found here, so that a batch of
        queries fails only for reasons they share. A saved version not in memory is read from
        disk only when ``load`` is true; otherwise the query comes back with ``ready`` false
        and must be prepared again with ``load=True`` (off the event loop)."""
        self._check_open()
        model = self._model(name)
        self._check_rows(inputs)
        if version is not None and label is not None:
            raise InvalidArgument("give a version or a label, not both")
        if label is not None:
            version = self._label_version(model, label)
        try:
            x = check_inputs(model.spec, inputs)
        except InputError as exc:
            raise _engine_error(exc) from None
        if version is None:
            return PredictQuery(model, None, x, None)
        weights = self._version_params(model, version) if load else self._cached(model, version)
        return PredictQuery(model, version, x, weights, ready=weights is not None)

    def predict_batch(self, queries: list[PredictQuery]) -> list[Prediction | Exception]:
        """One forward pass for queries with the same model and source (the head or one
        version); each gets its own rows back, or its own error. They all see one snapshot
        of the weights."""
        first = queries[0]
        model = first.model
        if first.weights is None:
            if not first.ready:
                raise ValueError("a query for a version not in memory; prepare it with load=True")
            if model.deleted:
                gone = NotFound(f"model {model.record.name!r} was deleted")
                return [gone for _ in queries]
            spec, params = model.spec, model.network.params
        else:
            spec, params = first.weights
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

    def train_step(
        self,
        name: str,
        inputs: NDArray[Any],
        targets: NDArray[Any],
        *,
        learning_rate: float | None = None,
        on_start: Callable[[], object] | None = None,
    ) -> StepOutcome:
        """One step on the head. Bad input or a diverging step changes nothing. ``on_start``:
        see :meth:`engine.Network.train_step`."""
        self._check_open()
        model = self._model(name)
        self._check_rows(inputs)
        with model.lock:
            self._check_alive(model)
            try:
                result = model.network.train_step(
                    inputs, targets, lr=learning_rate, on_start=on_start
                )
            except DivergedError as exc:
                self.metrics.refused_steps.labels(name).inc()
                log.warning("model.step_refused model=%s reason=%r", name, str(exc))
                raise _engine_error(exc) from None
            except EngineError as exc:
                raise _engine_error(exc) from None
            model.unsaved += 1
            model.last_loss = result.loss
            saved = None
            every = int(model.record.settings.get("autosave_every", 0))
            if every and result.step % every == 0:
                saved = self._save_locked(model).version
        rows = int(inputs.shape[0])
        self.metrics.training_samples.labels(name).inc(rows)
        self.metrics.training_steps.labels(name).inc()
        self.metrics.step.labels(name).set(result.step)
        self.metrics.last_loss.labels(name).set(result.loss)
        return StepOutcome(result.step, result.loss, result.accuracy, rows, saved)

    # -- versions and labels -----------------------------------------------------------

    def save_version(self, name: str) -> VersionInfo:
        self._check_open()
        model = self._model(name)
        with model.lock:
            self._check_alive(model)
            meta = self._save_locked(model)
            return self._version_info(model, meta)

    def list_versions(self, name: str) -> list[VersionInfo]:
        model = self._model(name)
        return [self._version_info(model, meta) for meta in self.store.list_versions(name)]

    def set_label(self, name: str, label: str, version: int) -> ModelInfo:
        self._check_open()
        model = self._model(name)
        with model.lock:
            model.record = self.store.set_label(name, label, version)
        log.info("label.set model=%s label=%s version=%d", name, label, version)
        return self._info(model)

    def remove_label(self, name: str, label: str) -> ModelInfo:
        self._check_open()
        model = self._model(name)
        with model.lock:
            model.record = self.store.remove_label(name, label)
        log.info("label.removed model=%s label=%s", name, label)
        return self._info(model)

    def rollback(
        self, name: str, *, version: int | None = None, label: str | None = None
    ) -> ModelInfo:
        """Reset the head to a saved version: weights, optimizer state and step. Training
        continues from there, and the next saved version records it as parent."""
        self._check_open()
        model = self._model(name)
        if (version is None) == (label is None):
            raise InvalidArgument("rollback needs exactly one of version or label")
        with model.lock:
            self._check_alive(model)
            target = self._label_version(model, label) if label is not None else version
            assert target is not None
            meta, network = self._load_version(model, target)
            model.network = network
            model.parent = meta.version
            model.unsaved = 0
            model.detached = meta.version != model.latest
            model.last_loss = meta.metrics.get("loss")
        self.metrics.step.labels(name).set(network.step)
        log.info("model.rolled_back model=%s version=%d step=%d", name, meta.version, meta.step)
        return self._info(model)

    # -- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("the server is shutting down")

    def _check_rows(self, inputs: Any) -> None:
        rows = inputs.shape[0] if isinstance(inputs, np.ndarray) and inputs.ndim else 0
        if rows > self.limits.max_rows:
            raise ResourceExhausted(
                f"{rows:,} rows in one request; the limit is {self.limits.max_rows:,}"
            )

    @staticmethod
    def _check_alive(model: _Model) -> None:
        if model.deleted:
            raise NotFound(f"model {model.record.name!r} was deleted")

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            check_name(name)
            raise NotFound(f"model {name!r} not found")
        return model

    def _load(self, record: ModelRecord) -> _Model:
        """A model's head from its newest verifiable version, or fresh from its spec."""
        spec = ModelSpec.from_dict(record.spec, max_params=self.limits.max_params)
        latest = self.store.latest_version(record.name)
        if latest is None:
            network, parent, loss = Network(spec), None, None
        else:
            _, data = self.store.load_version(record.name, latest.version)
            network = Network.from_bytes(data, max_params=self.limits.max_params)
            parent, loss = latest.version, latest.metrics.get("loss")
        self.metrics.step.labels(record.name).set(network.step)
        self.metrics.versions.labels(record.name).set(len(self.store.list_versions(record.name)))
        log.info("model.loaded model=%s version=%s step=%d", record.name, parent, network.step)
        return _Model(record, spec, network, parent, loss)

    def _label_version(self, model: _Model, label: str) -> int:
        version = model.record.labels.get(label)
        if version is None:
            check_name(label, "label")
            raise NotFound(f"model {model.record.name!r} has no label {label!r}")
        return version

    def _load_version(self, model: _Model, version: int) -> tuple[VersionMeta, Network]:
        meta, data = self.store.load_version(model.record.name, version)
        try:
            network = Network.from_bytes(data, max_params=self.limits.max_params)
        except StateError as exc:
            raise DataLoss(
                f"model {model.record.name!r} version {version} cannot be loaded: {exc}"
            ) from None
        return meta, network

    def _cached(self, model: _Model, version: int) -> tuple[ModelSpec, Params] | None:
        """A saved version's weights if they are in memory (marked as recently used)."""
        key = (model.record.name, version)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
            return cached

    def _version_params(self, model: _Model, version: int) -> tuple[ModelSpec, Params]:
        cached = self._cached(model, version)
        if cached is not None:
            return cached
        key = (model.record.name, version)
        _, network = self._load_version(model, version)
        entry = (network.spec, network.params)
        if self._cache_size:
            with self._lock:
                self._cache[key] = entry
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return entry

    def _save_locked(self, model: _Model) -> VersionMeta:
        name = model.record.name
        state = model.network.to_bytes()
        metrics = (
            {}
            if model.last_loss is None or not math.isfinite(model.last_loss)
            else {"loss": model.last_loss}
        )
        meta = self.store.save_version(
            name, state, step=model.network.step, parent=model.parent, metrics=metrics
        )
        model.parent = model.latest = meta.version
        model.unsaved = 0
        model.detached = False
        self.metrics.versions.labels(name).set(len(self.store.list_versions(name)))
        log.info(
            "version.saved model=%s version=%d step=%d bytes=%d",
            name,
            meta.version,
            meta.step,
            meta.size_bytes,
        )
        return meta

    def _version_info(self, model: _Model, meta: VersionMeta) -> VersionInfo:
        labels = tuple(sorted(k for k, v in model.record.labels.items() if v == meta.version))
        return VersionInfo(
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

    def _info(self, model: _Model) -> ModelInfo:
        record = model.record
        return ModelInfo(
            record.name,
            dict(record.spec),
            dict(record.settings),
            dict(record.labels),
            model.network.step,
            model.latest,
            model.unsaved,
            model.spec.n_params,
            record.created_at,
            model.last_loss,
        )
