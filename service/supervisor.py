"""``propserve serve --follow --workers N``: N replica processes sharing the REST and gRPC
ports, so predictions use every core (one process is bound by one interpreter).

This process binds nothing it serves: it reserves both ports (picking them when 0) with
sockets that allow sharing (SO_REUSEPORT), starts N servers with the same settings and
``reuse_port``, and lets go of its reservation once they all listen; the kernel then spreads
new connections over them. It writes the ready file when all N are ready, forwards SIGTERM
and SIGINT to them and waits while they drain, and starts a worker again if one dies.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from propserve.service.config import Settings

log = logging.getLogger("propserve.supervisor")

#: Seconds between looks at the workers.
TICK = 0.05
#: Seconds before a worker that died is started again.
RESTART_DELAY = 1.0


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` servers until SIGTERM or SIGINT; 0 when they all stopped
    cleanly."""
    stopping: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    reserved = [
        _reserve(settings.rest_host, settings.rest_port),
        _reserve(settings.grpc_host, settings.grpc_port),
    ]
    rest_port, grpc_port = (s.getsockname()[1] for s in reserved)
    with tempfile.TemporaryDirectory(prefix="propserve-workers-") as folder:
        ready = [Path(folder) / f"worker-{i}.json" for i in range(settings.workers)]
        env = _environment(settings, rest_port, grpc_port)
        workers = [_start(env, path) for path in ready]
        announced = False
        while not stopping:
            for i, worker in enumerate(workers):
                code = worker.poll()
                if code is None:
                    continue
                if not announced:  # a worker that cannot start: the others would not either
                    log.error("workers.start_failed", extra={"worker": i, "exit_code": code})
                    _stop_all(workers, settings.grace_seconds)
                    return 1
                log.error("workers.exited", extra={"worker": i, "exit_code": code})
                time.sleep(RESTART_DELAY)
                ready[i].unlink(missing_ok=True)
                workers[i] = _start(env, ready[i])
            if not announced and all(path.exists() for path in ready):
                announced = True
                for reservation in reserved:
                    reservation.close()
                _announce(settings, rest_port, grpc_port, workers)
            time.sleep(TICK)
        return _stop_all(workers, settings.grace_seconds)


def _reserve(host: str, port: int) -> socket.socket:
    """A bound (not listening) socket holding ``port`` for the workers to share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reservation = socket.socket(family, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind((host.strip("[]"), port))
    return reservation


def _environment(settings: Settings, rest_port: int, grpc_port: int) -> dict[str, str]:
    """The workers' environment: every setting as its variable (flags included), one worker
    each, the shared ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPSERVE_")}
    env |= {k: v for k, v in os.environ.items() if k == "PROPSERVE_TOKEN"}
    for name in Settings.model_fields:
        value: Any = getattr(settings, name)
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"PROPSERVE_{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    env |= {
        "PROPSERVE_WORKERS": "1",
        "PROPSERVE_REUSE_PORT": "true",
        "PROPSERVE_REST_PORT": str(rest_port),
        "PROPSERVE_GRPC_PORT": str(grpc_port),
    }
    env.pop("PROPSERVE_READY_FILE", None)
    return env


def _start(env: dict[str, str], ready: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "propserve", "serve"]
    return subprocess.Popen(command, env={**env, "PROPSERVE_READY_FILE": str(ready)})


def _announce(
    settings: Settings, rest_port: int, grpc_port: int, workers: list[subprocess.Popen[bytes]]
) -> None:
    pids = [worker.pid for worker in workers]
    log.info(
        "workers.ready",
        extra={"workers": pids, "rest": rest_port, "grpc": grpc_port},
    )
    if settings.ready_file is not None:
        doc = {"pid": os.getpid(), "rest_port": rest_port, "grpc_port": grpc_port, "workers": pids}
        temporary = settings.ready_file.with_name(settings.ready_file.name + ".tmp")
        temporary.write_text(json.dumps(doc))
        os.replace(temporary, settings.ready_file)


def _stop_all(workers: list[subprocess.Popen[bytes]], grace: float) -> int:
    """SIGTERM each worker, wait for them to drain, kill what is left; 0 if all exited 0."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 30
    codes = []
    for worker in workers:
        try:
            codes.append(worker.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            worker.kill()
            codes.append(worker.wait())
    log.info("workers.stopped", extra={"exit_codes": codes})
    # A worker still starting when told to stop ends by the signal itself: not a failure.
    return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1
