"""Start the real server (``propserve serve``) in a child process on ephemeral loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT = 60.0


@dataclass
class ServerProcess:
    """A running ``propserve serve``; stop it with :meth:`stop` (SIGTERM) or :meth:`kill`."""

    store: Path
    process: subprocess.Popen[bytes]
    rest_port: int
    grpc_port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start_server(
    store: Path,
    *,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    log_dir: Path | None = None,
) -> ServerProcess:
    """Start a server on ports 0 (the OS picks) with ``store``; wait until it is ready."""
    log_dir = log_dir or store.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    ready = log_dir / f"ready-{time.monotonic_ns()}.json"
    log_path = ready.with_suffix(".log")
    child_env = {
        **os.environ,
        "PROPSERVE_REST_PORT": "0",
        "PROPSERVE_GRPC_PORT": "0",
        "PROPSERVE_STORE": str(store),
        "PROPSERVE_READY_FILE": str(ready),
        "PROPSERVE_GRACE_SECONDS": "5",
        **(env or {}),
    }
    command = [sys.executable, "-m", "propserve", "serve", *(args or [])]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=Path(__file__).resolve().parents[2],
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}:\n{log_path.read_text(errors='replace')}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(
                f"server not ready in {START_TIMEOUT}s:\n{log_path.read_text(errors='replace')}"
            )
        time.sleep(0.02)
    info: dict[str, Any] = json.loads(ready.read_text())
    return ServerProcess(store, process, info["rest_port"], info["grpc_port"], log_path, env or {})


def serve_once(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``propserve serve`` expecting it to refuse to start (bounded by a timeout), with
    its store at ``folder/store`` and its ready file at ``folder/ready.json`` unless ``env``
    says otherwise; tokens come only from ``env``."""
    child_env = {
        **os.environ,
        "PROPSERVE_STORE": str(folder / "store"),
        "PROPSERVE_REST_PORT": "0",
        "PROPSERVE_GRPC_PORT": "0",
        "PROPSERVE_READY_FILE": str(folder / "ready.json"),
        **env,
    }
    for key in ("PROPSERVE_TOKENS", "PROPSERVE_TOKENS_FILE", "PROPSERVE_INSECURE"):
        if key not in env:
            child_env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "propserve", "serve"],
        env=child_env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
