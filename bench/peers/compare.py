"""Side-by-side benchmark of propserve and MLServer 1.7.1 serving the same model's predictions.

    python3 bench/peers/setup_mlserver.py                # once: MLServer's own venv
    .venv/bin/python bench/peers/compare.py              # a table (a few minutes)
    .venv/bin/python bench/peers/compare.py --quick      # about a minute
    .venv/bin/python bench/peers/compare.py --json       # one JSON object per line
    .venv/bin/python bench/peers/compare.py --cases oip  # only the cases of one set

Both servers run as child processes on loopback, each a single process computing with one
BLAS thread, and do the same work per prediction: model A = [784 -> 512 relu -> 256 relu ->
10 softmax], float32, three dense layers in NumPy.

- propserve: ``python -m propserve serve`` with a temporary store; model A created through
  the gRPC client from its spec (seed 0).
- MLServer: ``mlserver start`` from .venv-mlserver (at the repository root) with the
  custom runtime bench/peers/mlserver_runtime.py, weights of the same shapes from a .npz
  this script writes (random, so the numbers differ from propserve's; the work does not),
  ``parallel_workers`` 0 (inference in the server's own process), debug (per-request
  access logs) off.

Cases: single-row and 256-row predictions at concurrency 1, 8 and 64, in two sets (--cases;
both by default). ``v1``: each server's own best API, on each transport:

- ``rest``: propserve ``POST /v1/models/a/predict`` with {"inputs": nested JSON numbers}
  against MLServer's Open Inference Protocol ``POST /v2/models/a/infer`` with
  {"inputs": [{"name", "shape", "datatype": "FP32", "data": flat JSON numbers}]};
- ``grpc``: propserve.v1 ``ModelService/Predict`` (raw float32 bytes) against
  ``inference.GRPCInferenceService/ModelInfer`` (values in ``raw_input_contents``, or with
  --mlserver-grpc typed in ``fp32_contents``); MLServer's requests are made by its own
  protobuf modules in its venv (bench/peers/mlserver_requests.py).

``oip``: the Open Inference Protocol on both servers, each sent the very same bytes:

- ``oip-rest``: ``POST /v2/models/a/infer`` with the JSON body above;
- ``oip-bin``: propserve's ``/v2`` infer with the binary tensor data extension (the
  ``Inference-Header-Content-Length`` header, a JSON header, the rows' raw float32 bytes;
  outputs asked as binary too), against MLServer's JSON of ``oip-rest`` in the same turns:
  MLServer 1.7.1's REST server reads only JSON bodies (its ``--binary-data`` belongs to its
  ``mlserver infer`` client), so it gets no binary case; the run sends it the binary body once
  and reports its answer;
- ``oip-grpc``: ``ModelInfer`` with the values in ``raw_input_contents``, serialized by
  propserve's generated messages (propserve.oip, the protocol's wire format).

Single-row REST goes through wrk where installed, else (and for 256 rows) asyncio keep-alive
connections; gRPC requests go as pre-serialized bytes through one grpc.aio channel per server.

Every case alternates its sides turn by turn (the order flips each turn), so that the
host's noise hits all alike. Each request is checked once beforehand (status, output shape).

Figures, per case and server: req/s (completed requests over the turns' wall time), p50 and
p99 latency in ms (per request, as the client sees it; wrk's are the median of its turns'),
and the client's and the server's CPU microseconds per request. Per case, propserve/MLServer:
``x req/s`` (above 1: propserve serves more) and ``x p50`` (below 1: propserve answers
sooner). Every load is bounded in requests and time, and every child is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench import load, procs, report
from bench.common import BLAS_THREADS, DIMS_A, SPEC_A
from bench.load import Budget, Request, Sample
from bench.payloads import (
    INFER_METHOD,
    PREDICT_METHOD,
    binary_outputs,
    infer_path,
    make_oip_payloads,
    make_payloads,
    predict_path,
    rows_of,
)
from propserve.clients import AsyncGrpcClient

HERE = Path(__file__).resolve().parent
MLSERVER_VENV = HERE.parent.parent / ".venv-mlserver"
MODEL = "a"
ROWS = (1, 256)
CONCURRENCY = (1, 8, 64)
SERVERS = ("propserve", "mlserver")
#: The sides of each transport's cases: (side, server, request kind). A side named other
#: than its server is reported in a row of its own against the server it is measured beside.
TRANSPORTS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "rest": (("propserve", "propserve", "v1-rest"), ("mlserver", "mlserver", "oip-json")),
    "grpc": (("propserve", "propserve", "v1-grpc"), ("mlserver", "mlserver", "ml-grpc")),
    "oip-rest": (
        ("propserve", "propserve", "oip-json"),
        ("mlserver", "mlserver", "oip-json"),
        ("oip-bin", "propserve", "oip-bin"),
    ),
    "oip-grpc": (("propserve", "propserve", "oip-grpc"), ("mlserver", "mlserver", "oip-grpc")),
}
CASE_SETS: dict[str, tuple[str, ...]] = {"v1": ("rest", "grpc"), "oip": ("oip-rest", "oip-grpc")}
CASE_SETS["all"] = CASE_SETS["v1"] + CASE_SETS["oip"]
#: The runtime's file, copied beside model-settings.json, which MLServer imports it from.
RUNTIME_FILE = HERE / "mlserver_runtime.py"
RUNTIME = "mlserver_runtime.DenseMLP"


@dataclass(frozen=True)
class Plan:
    budgets: dict[int, Budget]  # by rows
    alternations: int


QUICK = Plan({1: Budget(6000, 2.0, 20), 256: Budget(64, 1.5, 2)}, alternations=1)
FULL = Plan({1: Budget(20000, 2.0, 100), 256: Budget(400, 3.0, 4)}, alternations=3)


@dataclass
class Target:
    """One server under test: its process and what each case sends it."""

    name: str
    child: procs.Child
    requests: dict[tuple[str, int], Request]  # by (request kind, rows)
    channel: grpc.aio.Channel | None = field(default=None)


# -- MLServer ------------------------------------------------------------------------------


def write_weights(path: Path) -> None:
    """Random weights of model A's shapes (He-scaled, zero biases) as W0, b0, W1, b1, ..."""
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(DIMS_A)):
        scale = np.sqrt(2.0 / n_in)
        arrays[f"W{i}"] = (rng.standard_normal((n_in, n_out)) * scale).astype(np.float32)
        arrays[f"b{i}"] = np.zeros(n_out, dtype=np.float32)
    np.savez(path, **arrays)


def write_mlserver_config(folder: Path, ports: dict[str, int]) -> None:
    """settings.json and models/a/model-settings.json for ``mlserver start folder``."""
    model = folder / "models" / MODEL
    model.mkdir(parents=True)
    write_weights(model / "weights.npz")
    shutil.copy(RUNTIME_FILE, model / RUNTIME_FILE.name)
    settings = {
        "host": "127.0.0.1",
        "http_port": ports["rest_port"],
        "grpc_port": ports["grpc_port"],
        "metrics_port": ports["metrics_port"],
        "parallel_workers": 0,
        "debug": False,
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    model_settings = {
        "name": MODEL,
        "implementation": RUNTIME,
        "parameters": {"uri": "./weights.npz"},
    }
    (model / "model-settings.json").write_text(json.dumps(model_settings, indent=2))


def http_call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a new connection: (status, headers in lower case, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        sent = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        answer = {key.lower(): value for key, value in response.getheaders()}
        return response.status, answer, response.read()
    finally:
        conn.close()


def start_mlserver(venv: Path, work: Path) -> procs.Child:
    """MLServer on loopback ports chosen here, ready once model A answers ready."""
    folder = work / "mlserver"
    ports = {name: procs.free_port() for name in ("rest_port", "grpc_port", "metrics_port")}
    write_mlserver_config(folder, ports)

    def ready() -> dict[str, int] | None:
        try:
            status, _, _ = http_call(ports["rest_port"], "GET", f"/v2/models/{MODEL}/ready")
        except OSError:
            return None
        return ports if status == 200 else None

    env = {
        "OPENBLAS_NUM_THREADS": str(BLAS_THREADS),
        "OMP_NUM_THREADS": str(BLAS_THREADS),
    }
    command = [str(venv / "bin" / "mlserver"), "start", str(folder)]
    return procs.spawn("mlserver", command, work, env, ready=ready, cwd=folder)


def mlserver_grpc_requests(venv: Path, work: Path, raw: bool) -> dict[int, bytes]:
    """Serialized ModelInferRequests by rows, made by MLServer's own protobuf modules."""
    inputs = work / "inputs.npz"
    arrays: dict[str, Any] = {f"rows_{rows}": rows_of(rows) for rows in ROWS}
    np.savez(inputs, **arrays)
    out = work / "infer-requests"
    out.mkdir()
    command = [
        str(venv / "bin" / "python"),
        str(HERE / "mlserver_requests.py"),
        MODEL,
        str(inputs),
        str(out),
        *(["--raw"] if raw else []),
    ]
    subprocess.run(command, check=True, timeout=120)
    return {rows: (out / f"rows_{rows}.bin").read_bytes() for rows in ROWS}


def requests_of(
    kinds: set[str], mlserver_grpc: dict[int, bytes] | None
) -> dict[tuple[str, int], Request]:
    """The requests of ``kinds`` by (kind, rows): the same rows in every kind."""
    requests: dict[tuple[str, int], Request] = {}
    for rows in ROWS:
        own, oip = make_payloads(MODEL, rows), make_oip_payloads(MODEL, rows)
        made = {
            "v1-rest": Request("rest", predict_path(MODEL), own.rest),
            "v1-grpc": Request("grpc", PREDICT_METHOD, own.grpc),
            "oip-json": Request("rest", infer_path(MODEL), oip.rest),
            "oip-bin": Request("rest", infer_path(MODEL), oip.binary, oip.binary_header),
            "oip-grpc": Request("grpc", INFER_METHOD, oip.grpc),
        }
        if mlserver_grpc is not None:
            made["ml-grpc"] = Request("grpc", INFER_METHOD, mlserver_grpc[rows])
        requests.update({(kind, rows): made[kind] for kind in kinds})
    return requests


# -- checks and load -----------------------------------------------------------------------


def output_shape(path: str, reply: dict[str, Any]) -> tuple[int, ...]:
    if path.startswith("/v1/"):
        return tuple(np.asarray(reply["outputs"]).shape)
    return tuple(reply["outputs"][0]["shape"])


async def check_request(target: Target, kind: str, rows: int, request: Request) -> None:
    """One request; raises unless it answers (rows, 10) float32 outputs."""
    what = f"{target.name} {kind} {rows} rows"
    # float32 outputs: at least rows x 10 x 4 bytes, whatever the encoding
    least = rows * DIMS_A[-1] * 4
    if request.transport == "grpc":
        assert target.channel is not None
        stub: Any = target.channel.unary_unary(request.target)
        reply = await stub(request.body, timeout=30)
        if len(reply) < least:
            raise RuntimeError(f"{what}: a {len(reply)}-byte answer")
        return
    port = target.child.ports["rest_port"]
    status, headers, body = http_call(port, "POST", request.target, request.body, request.headers)
    if status != 200:
        raise RuntimeError(f"{what}: HTTP {status}: {body[:300]!r}")
    length = headers.get("inference-header-content-length")
    if length is None:
        shape = output_shape(request.target, orjson.loads(body))
    else:
        head, data = binary_outputs(body, int(length))
        outputs: Any = head["outputs"]
        shape = tuple(outputs[0]["shape"])
        if len(data) != least:
            raise RuntimeError(f"{what}: {len(data)} bytes of binary outputs")
    if shape != (rows, DIMS_A[-1]):
        raise RuntimeError(f"{what} answered shape {shape}")


async def check(target: Target) -> None:
    """One request of every case."""
    for (kind, rows), request in target.requests.items():
        await check_request(target, kind, rows, request)


def probe_binary(port: int) -> str:
    """A server's answer to a single-row binary infer body, in words."""
    request = requests_of({"oip-bin"}, None)[("oip-bin", 1)]
    try:
        status, _, body = http_call(port, "POST", request.target, request.body, request.headers)
    except OSError as exc:
        return f"no answer ({exc})"
    text = body[:160].decode("utf-8", "replace").replace("\n", " ")
    return f"HTTP {status}: {text}"


async def turn(
    target: Target,
    kind: str,
    rows: int,
    conc: int,
    budget: Budget,
    wrk: str | None,
    work: Path,
) -> Sample:
    child = target.child
    await procs.quiesce(child.pid)
    request = target.requests[(kind, rows)]
    return await load.request_load(
        request,
        child.pid,
        child.ports["rest_port"],
        target.channel,
        conc,
        budget,
        wrk if rows == 1 else None,
        work,
    )


async def run_cases(
    plan: Plan, transports: tuple[str, ...], targets: list[Target], wrk: str | None, work: Path
) -> list[dict[str, Any]]:
    by_name = {target.name: target for target in targets}
    results = []
    for transport in transports:
        sides = TRANSPORTS[transport]
        for rows in ROWS:
            for conc in CONCURRENCY:
                samples: dict[str, list[Sample]] = {side: [] for side, _, _ in sides}
                for i in range(plan.alternations):
                    share = plan.budgets[rows].share(plan.alternations, first=i == 0)
                    for side, server, kind in sides if i % 2 == 0 else sides[::-1]:
                        sample = await turn(by_name[server], kind, rows, conc, share, wrk, work)
                        samples[side].append(sample)
                stats = {side: load.summarize(load.merge(s)) for side, s in samples.items()}
                theirs = stats["mlserver"]
                for side, _, _ in sides:
                    if side == "mlserver":
                        continue
                    ours = stats[side]
                    results.append(
                        {
                            "transport": transport if side == "propserve" else side,
                            "rows": rows,
                            "concurrency": conc,
                            "propserve": ours,
                            "mlserver": theirs,
                            "ratio_throughput": _ratio(ours["throughput"], theirs["throughput"]),
                            "ratio_p50": _ratio(ours["p50_s"], theirs["p50_s"]),
                        }
                    )
    return results


def _ratio(ours: float, theirs: float) -> float | None:
    return ours / theirs if theirs else None


async def benchmark(
    args: argparse.Namespace, work: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    plan = QUICK if args.quick else FULL
    venv = args.mlserver_venv
    if not (venv / "bin" / "mlserver").exists():
        raise SystemExit(f"no MLServer in {venv}: run python3 bench/peers/setup_mlserver.py")
    wrk = None if args.rest_client == "asyncio" else shutil.which("wrk")
    if args.rest_client == "wrk" and wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    transports = CASE_SETS[args.cases]
    kinds = {name: set[str]() for name in SERVERS}
    for transport in transports:
        for _, name, kind in TRANSPORTS[transport]:
            kinds[name].add(kind)
    mlserver_grpc = None
    if "ml-grpc" in kinds["mlserver"]:
        mlserver_grpc = mlserver_grpc_requests(venv, work, raw=args.mlserver_grpc == "raw")
    children: list[procs.Child] = []
    targets: list[Target] = []
    mlserver_binary = None
    try:
        server = procs.start_server(work, BLAS_THREADS)
        children.append(server)
        async with AsyncGrpcClient(f"127.0.0.1:{server.ports['grpc_port']}") as client:
            await client.create_model(MODEL, SPEC_A)
        mlserver = start_mlserver(venv, work)
        children.append(mlserver)
        targets = [
            Target("propserve", server, requests_of(kinds["propserve"], None)),
            Target("mlserver", mlserver, requests_of(kinds["mlserver"], mlserver_grpc)),
        ]
        for target in targets:
            target.channel = load.grpc_channel(target.child.ports["grpc_port"])
            await asyncio.wait_for(target.channel.channel_ready(), 10)
            await check(target)
        if "oip-bin" in kinds["propserve"]:
            mlserver_binary = probe_binary(mlserver.ports["rest_port"])
        results = await run_cases(plan, transports, targets, wrk, work)
    finally:
        for target in targets:
            if target.channel is not None:
                await target.channel.close()
        for child in reversed(children):
            child.stop()
    info = report.machine()
    info.update(
        mlserver_numpy=_venv_numpy(venv),
        rest_client="wrk (1 row), asyncio keep-alive (256 rows)" if wrk else "asyncio keep-alive",
        mlserver_grpc=args.mlserver_grpc,
        mlserver_binary=mlserver_binary,
        cases=args.cases,
        blas_threads=BLAS_THREADS,
        alternations=plan.alternations,
        quick=args.quick,
    )
    return info, results


def _venv_numpy(venv: Path) -> str:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import numpy; print(numpy.__version__)"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip()


# -- the table -----------------------------------------------------------------------------


COLUMNS = [
    report.Column("transport", 9, report.cell_of("transport"), left=True),
    report.Column("rows", 4, report.cell_of("rows")),
    report.Column("conc", 4, report.cell_of("concurrency")),
    report.Column("ps req/s", 9, report.cell_in("propserve", "throughput", report.rate)),
    report.Column("ps p50", 8, report.cell_in("propserve", "p50_s", report.ms)),
    report.Column("ps p99", 8, report.cell_in("propserve", "p99_s", report.ms)),
    report.Column("ml req/s", 9, report.cell_in("mlserver", "throughput", report.rate)),
    report.Column("ml p50", 8, report.cell_in("mlserver", "p50_s", report.ms)),
    report.Column("ml p99", 8, report.cell_in("mlserver", "p99_s", report.ms)),
    report.Column("x req/s", 7, report.cell_of("ratio_throughput", report.ratio)),
    report.Column("x p50", 7, report.cell_of("ratio_p50", report.ratio)),
    report.Column("ps srv us", 9, report.cell_in("propserve", "server_cpu_per_req_s", report.us)),
    report.Column("ml srv us", 9, report.cell_in("mlserver", "server_cpu_per_req_s", report.us)),
    report.Column("errors", 6, lambda r: f"{r['propserve']['errors']}/{r['mlserver']['errors']}"),
]


def print_results(info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(report.machine_line(info) + f"; MLServer's numpy {info['mlserver_numpy']}")
    print(
        f"propserve (ps) vs MLServer 1.7.1 (ml), model A float32, {info['blas_threads']} BLAS "
        f"thread each; REST load: {info['rest_client']}; MLServer gRPC values: "
        f"{info['mlserver_grpc']}; {info['alternations']} alternating turns per case"
    )
    report.print_table(COLUMNS, results)
    print(
        "(latencies in ms; srv us: server CPU per request; x req/s and x p50: propserve over "
        "MLServer;\n errors: propserve/MLServer)"
    )
    if info["mlserver_binary"] is not None:
        print(
            "(oip-bin: propserve with binary tensors against MLServer's JSON (oip-rest) in the "
            "same turns;\n MLServer's answer to the binary body: "
            f"{info['mlserver_binary']})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short cases (about a minute)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--cases",
        choices=tuple(CASE_SETS),
        default="all",
        help="v1: each server's own API; oip: the Open Inference Protocol on both (default all)",
    )
    parser.add_argument(
        "--rest-client",
        choices=("auto", "wrk", "asyncio"),
        default="auto",
        help="REST load generator for single rows (auto: wrk when installed)",
    )
    parser.add_argument(
        "--mlserver-grpc",
        choices=("raw", "typed"),
        default="raw",
        help="MLServer's gRPC request values: raw_input_contents or fp32_contents",
    )
    parser.add_argument(
        "--mlserver-venv",
        type=Path,
        default=MLSERVER_VENV,
        help="MLServer's virtual environment (default: .venv-mlserver at the repository root)",
    )
    args = parser.parse_args(argv)
    import uvloop  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="propserve-peers-") as tmp:
        info, results = uvloop.run(benchmark(args, Path(tmp)))
    if args.json:
        report.print_json_lines(info, results)
    else:
        print_results(info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
