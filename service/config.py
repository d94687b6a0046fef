"""Server settings: one class, read from flags and ``PROPSERVE_*`` environment variables.

Defaults are safe for a laptop: an embedded store in ./models, both transports on loopback,
no TLS, no tokens (which the server allows only on loopback unless ``insecure`` is set).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the server can be told. Each field is also ``PROPSERVE_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="PROPSERVE_", extra="forbid", validate_default=True
    )

    store: Path = Field(Path("models"), description="Folder of the model store (created).")
    rest_host: str = Field("127.0.0.1", description="Address the REST API listens on.")
    rest_port: int = Field(8000, ge=0, le=65535, description="REST port (0: pick a free one).")
    grpc_host: str = Field("127.0.0.1", description="Address the gRPC API listens on.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: pick a free one).")
    tokens: SecretStr | None = Field(
        None,
        description="Bearer tokens and roles, 'token=role[+role];token2=role'. Roles: "
        "predict, train (implies predict), admin (implies all).",
    )
    tokens_file: Path | None = Field(
        None, description="File of tokens, one 'token=role[+role]' per line ('#' comments)."
    )
    insecure: bool = Field(False, description="Allow listening beyond loopback without tokens.")
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain: enables TLS on both transports (with tls_key)."
    )
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert.")
    max_message_bytes: int = Field(
        64 << 20, ge=1024, description="Largest request body (REST) or message (gRPC)."
    )
    max_rows: int = Field(65536, ge=1, description="Most rows in one Predict or TrainStep.")
    batch_rows: int = Field(
        256,
        ge=1,
        description="Most rows in one batched forward pass: concurrent predictions on one "
        "model share a pass (1: no batching).",
    )
    max_queued_rows: int = Field(
        65536,
        ge=1,
        description="Most prediction rows waiting for a forward pass per model; beyond, "
        "RESOURCE_EXHAUSTED / 429 (too busy).",
    )
    max_pending_calls: int = Field(
        256,
        ge=1,
        description="Most calls waiting for a worker thread (training steps, saves, large "
        "predictions); beyond, RESOURCE_EXHAUSTED / 429 (too busy).",
    )
    busy_poll_us: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="After a prediction request, the event loop polls for the next one this "
        "many microseconds before it sleeps, unless worker threads are computing: a core "
        "that sleeps loses its caches. Costs up to this much CPU after each request, and "
        "throughput when clients share the cores (0: off; see docs/operations.md).",
    )
    tune_heap: bool = Field(
        True,
        description="Tune the process's malloc (one arena, fixed thresholds) and hand freed "
        "memory back after each burst of requests (glibc only; see docs/operations.md).",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="Most open REST connections; beyond, new ones are closed at once (and logged).",
    )
    max_header_bytes: int = Field(
        64 << 10,
        ge=1024,
        description="Largest REST request line and header block; beyond, 431 and the "
        "connection is closed.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a REST client may take to send a request's line and headers.",
    )
    keep_alive_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds an idle REST keep-alive connection stays open.",
    )
    max_params: int = Field(50_000_000, ge=1, description="Most parameters in one model.")
    default_retain: int = Field(10, ge=1, description="Versions kept per model unless set.")
    default_autosave_every: int = Field(
        0, ge=0, description="Autosave every N steps unless set per model (0: off)."
    )
    version_cache: int = Field(
        8, ge=0, description="Saved versions kept loaded in memory for Predict."
    )
    history_steps: int = Field(
        1_000_000,
        ge=1,
        description="Training steps of history kept per model (the oldest are compacted away).",
    )
    grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    blas_threads: int | None = Field(
        None,
        ge=1,
        description="BLAS threads per computation (unset: 1; requests run in parallel on "
        "one worker thread per core instead).",
    )
    follow: bool = Field(
        False,
        description="Serve as a read-only replica of the store: follow the versions and labels "
        "its writer saves, answer predictions, refuse training and changes (see "
        "docs/scaling.md).",
    )
    poll_interval: float = Field(
        0.5,
        gt=0,
        le=60,
        description="With follow: seconds between looks at the store for new models, "
        "versions and labels.",
    )
    writer_url: str | None = Field(
        None,
        description="With follow: the writer's address, named when training or a change is "
        "refused.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="With follow: replica processes sharing the REST and gRPC ports, to use "
        "every core.",
    )
    reuse_port: bool = Field(
        False,
        description="Bind the ports with SO_REUSEPORT, shared with other processes (set for "
        "each process of workers).",
    )
    log_level: str = Field("info", description="debug, info, warning or error.")
    ready_file: Path | None = Field(
        None,
        description="When ready, write {pid, rest_port, grpc_port} as JSON here (for "
        "supervisors and tests using port 0).",
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")
        return value.lower()

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.workers > 1 and not self.follow:
            raise ValueError("workers above 1 need follow: one process writes a store")
        return self

    @property
    def max_elements(self) -> int:
        """Elements of one tensor accepted: as many 4-byte numbers as a whole message holds."""
        return max(self.max_message_bytes // 4, 1)

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.rest_host) and is_loopback(self.grpc_host)


#: ``PROPSERVE_*`` variables that are not server settings: the clients' token.
CLIENT_VARIABLES = frozenset({"PROPSERVE_TOKEN"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``PROPSERVE_*`` variables that name no setting: a misspelt one would otherwise be
    ignored without a word."""
    prefix = "PROPSERVE_"
    return sorted(
        name
        for name in environ
        if name.startswith(prefix)
        and name not in CLIENT_VARIABLES
        and name[len(prefix) :].lower() not in Settings.model_fields
    )


def describe(error: ValidationError) -> str:
    """One line per wrong setting, named as the environment names it; the value is quoted
    unless the setting is secret."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if field in Settings.model_fields:
            secret = "SecretStr" in str(Settings.model_fields[field].annotation)
            value = "" if secret or "input" not in item else f" (got {item['input']!r})"
            lines.append(f"{field} (PROPSERVE_{field.upper()}): {message}{value}")
        else:  # a check across settings
            lines.append(message)
    return "\n".join(lines)
