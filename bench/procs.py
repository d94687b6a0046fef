"""Child processes of the benchmarks: spawning, readiness, stopping by PID, and what /proc
and the server's /metrics say about them (CPU time, resident memory, open files, heap trims,
collector runs)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0

#: Reads a child's ports once it is ready; None while it is not.
ReadyCheck = Callable[[], dict[str, int] | None]


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; always by this child's PID."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def ready_file(path: Path) -> ReadyCheck:
    """The ports in a ready file ({pid, ...ports}) once it exists."""

    def check() -> dict[str, int] | None:
        if not path.exists():
            return None
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "pid"}

    return check


def write_ready(path: Path, ports: dict[str, int]) -> None:
    """Write a ready file atomically: {pid, **ports}."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"pid": os.getpid(), **ports}))
    os.replace(temporary, path)


def spawn(
    name: str,
    command: list[str],
    work: Path,
    env: dict[str, str],
    ready: ReadyCheck | None = None,
    cwd: Path = ROOT,
) -> Child:
    """Start ``command`` with its output in ``work/{name}.log`` and wait until ``ready``
    (default: the ready file ``work/{name}.ready.json``) gives its ports."""
    check = ready or ready_file(work / f"{name}.ready.json")
    log = work / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=cwd
        )
    child = Child(name, process, {}, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while (ports := check()) is None:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready in {START_TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.02)
        child.ports = ports
    except BaseException:
        child.stop()
        raise
    return child


def start_server(
    work: Path,
    blas_threads: int,
    name: str = "server",
    store: Path | None = None,
    env: dict[str, str] | None = None,
) -> Child:
    """propserve (``python -m propserve serve``) on ephemeral loopback ports, its store in
    ``store`` (default ``work/{name}-store``), with the settings in ``env`` besides (e.g.
    PROPSERVE_FOLLOW)."""
    settings = {
        "PROPSERVE_STORE": str(store or work / f"{name}-store"),
        "PROPSERVE_REST_PORT": "0",
        "PROPSERVE_GRPC_PORT": "0",
        "PROPSERVE_REST_HOST": "127.0.0.1",
        "PROPSERVE_GRPC_HOST": "127.0.0.1",
        "PROPSERVE_READY_FILE": str(work / f"{name}.ready.json"),
        "PROPSERVE_GRACE_SECONDS": "5",
        "PROPSERVE_BLAS_THREADS": str(blas_threads),
        **(env or {}),
    }
    return spawn(name, [sys.executable, "-m", "propserve", "serve"], work, settings)


def free_port() -> int:
    """A loopback port free now, for a server that cannot report an ephemeral one (another
    process may take it before the server binds it; the server then fails to start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- /proc -------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    """Open file descriptors (sockets included)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The PIDs of a process's children, their children and so on (from /proc, now)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of its descendants alive now (a supervisor and its
    worker processes)."""
    total = 0.0
    for each in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):  # gone meanwhile
            total += cpu_seconds(each)
    return total


def host_busy_seconds() -> float:
    """CPU seconds the host's processes have spent since boot, all cores together
    (/proc/stat: user, nice and system time; not interrupts, which the kernel may count
    apart from the process they serve, nor idle, I/O wait or steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system = (int(f) for f in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


async def quiesce(pid: int, timeout: float = 30.0, tree: bool = False) -> None:
    """Wait until the process (with ``tree``, it and its descendants together) is idle
    (under 5% of a core over 100 ms), so that one case's backlog does not run into the next;
    bounded by ``timeout``."""
    cpu = tree_cpu_seconds if tree else cpu_seconds
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu(pid)
        await asyncio.sleep(0.1)
        if cpu(pid) - before < 0.005:
            return


# -- the server's /metrics -----------------------------------------------------------------


def scrape(port: int) -> bytes:
    """The server's /metrics. Scrapes are not activity to the server, so reading them does
    not delay a trim."""
    head = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def heap_trims(port: int, metrics: bytes | None = None) -> float | None:
    """The server's propserve_heap_trims_total (None where it does not trim: not glibc),
    from ``metrics`` when given (a scrape), else from a new scrape."""
    text = scrape(port) if metrics is None else metrics
    match = re.search(rb"^propserve_heap_trims_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def gc_pauses(metrics: bytes) -> dict[str, tuple[int, float, int]]:
    """The server's collector runs so far, by generation: (runs, seconds in all, runs over
    10 ms), from propserve_gc_pause_seconds in a scrape."""
    text = metrics.decode()
    runs: dict[str, tuple[int, float, int]] = {}
    for generation in ("0", "1", "2"):
        label = f'generation="{generation}"'
        count = re.search(rf"^propserve_gc_pause_seconds_count{{{label}}} (\S+)$", text, re.M)
        total = re.search(rf"^propserve_gc_pause_seconds_sum{{{label}}} (\S+)$", text, re.M)
        within = re.search(
            rf'^propserve_gc_pause_seconds_bucket{{{label},le="0\.01"}} (\S+)$', text, re.M
        )
        if count and total and within:
            n = int(float(count.group(1)))
            runs[generation] = (n, float(total.group(1)), n - int(float(within.group(1))))
    return runs


async def settled_rss_kib(server: Child) -> int:
    """VmRSS once the server is idle and has handed back the memory the last load freed.

    NOTE: the server trims its heap shortly after its last request; read too early, RSS
    still holds the freed heap. So this waits for the trim counter to move (at most 8 s:
    a trim that came before the first look is not waited for)."""
    await quiesce(server.pid)
    port = server.ports["rest_port"]
    seen = heap_trims(port)
    deadline = time.monotonic() + 8
    while seen is not None and heap_trims(port) == seen and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    await asyncio.sleep(0.25)
    return rss_kib(server.pid)


# -- processes a server starts -------------------------------------------------------------


def started_at(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc's), to tell it from a later
    process given the same PID; None if it is gone (or a zombie: exited, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def stop_tree(child: Child, timeout: float = 15.0) -> list[int]:
    """Stop a server that runs processes of its own (workers): the child as Child.stop does,
    then any of the processes it had started that outlived it, each by its PID (SIGTERM,
    then SIGKILL after ``timeout``). Returns the PIDs that outlived it (none when the server
    stops its own)."""
    started = {pid: started_at(pid) for pid in descendants(child.pid)}
    child.stop()
    left = [pid for pid, at in started.items() if at is not None and started_at(pid) == at]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(started_at(p) == started[p] for p in left):
        time.sleep(0.05)
    for pid in left:
        if started_at(pid) == started[pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return left
