"""docker-compose.replicas.yml and deploy/nginx/ checked without docker.

The compose file: a writer, a replica service that scales and a load balancer; one image for
both servers; the store one named volume, read-only in the replicas; tokens from the
environment; only the balancer publishes ports; every PROPSERVE_* variable and server flag
it uses is a setting. The balancer's nginx.conf is read into its blocks, and each documented
REST route and each gRPC method is matched to a location the way nginx matches (exact,
longest prefix, regular expressions in order) to check where it goes: predictions to the
replicas, everything else to the writer. Then the retries on the replicas' side and none on
the writer's, addresses resolved per request, and the Dockerfile's base image argument.
scripts/compose-scale-smoke.sh runs all of it for real; with an nginx binary on the PATH,
`nginx -t` checks the file's syntax here too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, cast

import pytest
import yaml  # type: ignore[import-untyped]

from propserve.service.config import Settings
from propserve.service.dataplane import DataPlane
from propserve.service.grpc.oip import METHODS as OIP_METHODS
from propserve.service.metrics import Metrics
from propserve.service.rest.app import create_app
from propserve.v1 import model_service_pb2

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.replicas.yml"
NGINX = ROOT / "deploy" / "nginx"
STORE = "/data"
REST_PORT, GRPC_PORT = 8000, 50051
#: Calls that change nothing and that any replica answers; every other call is the writer's.
PREDICTIONS = {"Predict", "ModelInfer", "ModelVersionInfer"}


# -- the compose file ---------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load(COMPOSE.read_text()))


def service(name: str) -> dict[str, Any]:
    return cast(dict[str, Any], compose()["services"][name])


def test_the_services_and_the_one_volume() -> None:
    assert set(compose()["services"]) == {"writer", "replica", "lb"}
    assert set(compose()["volumes"]) == {"propserve-data"}


def test_the_store_is_one_named_volume_read_only_in_the_replicas() -> None:
    assert service("writer")["volumes"] == [f"propserve-data:{STORE}"]
    assert service("replica")["volumes"] == [f"propserve-data:{STORE}:ro"]
    assert "volumes" not in service("lb")


def test_writer_and_replicas_run_one_image() -> None:
    writer, replica = service("writer"), service("replica")
    for key in ("build", "image", "healthcheck", "restart"):
        assert writer[key] == replica[key], key
    assert writer["build"]["context"] == "."
    assert "BASE_IMAGE" in writer["build"]["args"]
    assert "/readyz" in " ".join(writer["healthcheck"]["test"])


def test_the_writer_is_the_plain_server_and_the_replicas_follow() -> None:
    assert "command" not in service("writer")  # the image's: propserve serve
    assert '["propserve", "serve"]' in (ROOT / "Dockerfile").read_text().splitlines()[-1]
    command = service("replica")["command"]
    assert command[:2] == ["propserve", "serve"]
    assert "--follow" in command
    assert command[command.index("--workers") + 1] == "1"
    assert service("replica")["depends_on"]["writer"]["condition"] == "service_healthy"


def test_flags_and_variables_are_settings() -> None:
    fields = set(Settings.model_fields)
    flags = [arg for arg in service("replica")["command"] if arg.startswith("--")]
    assert flags
    for flag in flags:
        assert flag[2:].replace("-", "_") in fields, flag
    for name in ("writer", "replica"):
        variables = service(name)["environment"]
        assert variables
        for variable in variables:
            assert variable.startswith("PROPSERVE_"), variable
            assert variable.removeprefix("PROPSERVE_").lower() in fields, variable


@pytest.mark.parametrize("name", ["writer", "replica"])
def test_servers_take_their_tokens_from_the_environment(name: str) -> None:
    # Both listen beyond loopback inside the network, which needs tokens: compose refuses to
    # start without them rather than a server refusing later.
    tokens = service(name)["environment"]["PROPSERVE_TOKENS"]
    assert tokens.startswith("${PROPSERVE_TOKENS:?"), tokens
    assert "PROPSERVE_INSECURE" not in service(name)["environment"]


def test_only_the_balancer_publishes_ports() -> None:
    for name in ("writer", "replica"):
        assert "ports" not in service(name), name
        assert "container_name" not in service(name), name  # a fixed name cannot scale
    published = [port.rsplit(":", 1)[1] for port in service("lb")["ports"]]
    assert published == [str(REST_PORT), str(GRPC_PORT)]
    for port in service("lb")["ports"]:
        assert port.startswith("${PUBLISH_HOST:-127.0.0.1}:"), port


def test_the_balancer_is_built_from_deploy_nginx() -> None:
    lb = service("lb")
    assert (ROOT / lb["build"]["context"]).resolve() == NGINX
    assert lb["build"]["args"]["BASE_IMAGE"].startswith("${NGINX_BASE_IMAGE:-nginx:")
    assert set(lb["depends_on"]) == {"writer", "replica"}


# -- the Dockerfile -----------------------------------------------------------------------


def test_the_dockerfile_takes_its_base_image_as_an_argument() -> None:
    lines = [line for line in (NGINX / "Dockerfile").read_text().splitlines() if line]
    instructions = [line for line in lines if not line.startswith(("#", " "))]
    base = next(line for line in instructions if line.startswith("ARG BASE_IMAGE="))
    assert re.fullmatch(r"ARG BASE_IMAGE=nginx:[\w.-]+", base), base  # the official image
    first_from = next(i for i, line in enumerate(instructions) if line.startswith("FROM"))
    assert instructions.index(base) < first_from
    assert instructions[first_from] == "FROM ${BASE_IMAGE}"
    assert "COPY nginx.conf /etc/nginx/propserve.conf" in instructions
    command = json.loads(instructions[-1].removeprefix("CMD "))
    assert command[0] == "nginx"
    assert command[command.index("-c") + 1] == "/etc/nginx/propserve.conf"
    assert command[command.index("-g") + 1] == "daemon off;"


# -- nginx.conf, read into blocks ---------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def all(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> Directive:
        (found,) = self.all(name)
        return found


_TOKEN = re.compile(r"""\s+|#[^\n]*|'([^']*)'|"([^"]*)"|([{};])|([^\s{};'"#]+)""")


def parse(text: str) -> Directive:
    """The file as a tree of directives (quotes, comments and blocks; no includes)."""
    root = Directive("main", [], [])
    stack, words = [root], cast(list[str], [])
    for match in _TOKEN.finditer(text):
        single, double, punctuation, bare = match.groups()
        if punctuation == "{":
            opened = Directive(words[0], words[1:], [])
            cast(list[Directive], stack[-1].block).append(opened)
            stack.append(opened)
            words = []
        elif punctuation == "}":
            assert not words, words
            stack.pop()
        elif punctuation == ";":
            cast(list[Directive], stack[-1].block).append(Directive(words[0], words[1:]))
            words = []
        elif single is not None or double is not None or bare is not None:
            words.append(next(w for w in (single, double, bare) if w is not None))
    assert len(stack) == 1 and not words, "unbalanced braces"
    return root


@cache
def http() -> Directive:
    return parse((NGINX / "nginx.conf").read_text()).one("http")


def server(port: int) -> Directive:
    (found,) = [s for s in http().all("server") if s.one("listen").args[0] == str(port)]
    return found


def location(srv: Directive, uri: str) -> Directive:
    """The location nginx picks for ``uri``: an exact match; else the longest prefix if it
    says ``^~``; else the first regular expression that matches; else the longest prefix."""
    prefix: Directive | None = None
    for loc in srv.all("location"):
        if loc.args[0] == "=" and loc.args[1] == uri:
            return loc
        if len(loc.args) == 1 or loc.args[0] == "^~":
            path = loc.args[-1]
            if uri.startswith(path) and (prefix is None or len(path) > len(prefix.args[-1])):
                prefix = loc
    if prefix is not None and prefix.args[0] == "^~":
        return prefix
    for loc in srv.all("location"):
        if loc.args[0] in ("~", "~*"):
            flags = re.IGNORECASE if loc.args[0] == "~*" else 0
            if re.search(loc.args[1], uri, flags):
                return loc
    assert prefix is not None, f"no location for {uri}"
    return prefix


@dataclass
class Request:
    method: str
    uri: str
    variables: dict[str, str] = field(default_factory=dict)

    def value(self, name: str) -> str:
        """A variable as nginx would have it: built in, set in the server, or a map's."""
        builtins = {"request_method": self.method, "uri": self.uri}
        if name in builtins:
            return builtins[name]
        if name in self.variables:
            return self.variables[name]
        (table,) = [m for m in http().all("map") if m.args[1] == f"${name}"]
        source = self.value(table.args[0].removeprefix("$"))
        entries = [(d.name, d.args[0]) for d in table.block or []]
        for key, value in entries:
            if key == source:
                return value
        for key, value in entries:
            if key.startswith("~") and re.search(key[1:], source):
                return value
        return dict(entries)["default"]

    def expand(self, text: str) -> str:
        return re.sub(r"\$(\w+)", lambda m: self.value(m.group(1)), text)


def route(port: int, method: str, uri: str) -> tuple[str, Directive]:
    """(the service a request goes to, its location) in the server listening on ``port``."""
    srv = server(port)
    request = Request(method, uri)
    for directive in srv.all("set"):
        request.variables[directive.args[0].removeprefix("$")] = directive.args[1]
    loc = location(srv, uri)
    (target,) = loc.all("proxy_pass") + loc.all("grpc_pass")
    address = request.expand(target.args[0]).split("://", 1)[1]
    host, _, target_port = address.partition(":")
    assert target_port == str(port), address  # the servers listen where the balancer does
    return host, loc


@cache
def rest_routes() -> list[tuple[str, str, str]]:
    """(method, a path, operation id) of every REST route the server documents."""
    # Listing the routes reads no model: the data plane is never called.
    app = create_app(cast(DataPlane, None), Metrics(), ready=lambda: True, version="0")
    routes = []
    for template, methods in app.openapi()["paths"].items():
        path = re.sub(r"\{[^/]+\}", "m1", template)
        for method, spec in methods.items():
            if isinstance(spec, dict) and "operationId" in spec:
                routes.append((method.upper(), path, str(spec["operationId"])))
    return routes


def grpc_methods() -> list[str]:
    """The path of every gRPC method the server serves besides health and reflection."""
    service_descriptor = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]
    return [f"/propserve.v1.ModelService/{m.name}" for m in service_descriptor.methods] + [
        f"/inference.GRPCInferenceService/{name}" for name in OIP_METHODS
    ]


def expected_rest(method: str, path: str, operation: str) -> str:
    if operation in PREDICTIONS:
        return "replica"
    # The Open Inference Protocol's reads (health, metadata) go to replicas too.
    return "replica" if method == "GET" and (path == "/v2" or path.startswith("/v2/")) else "writer"


def expected_grpc(path: str) -> str:
    service_name, method = path.strip("/").split("/")
    if service_name == "inference.GRPCInferenceService":
        return "writer" if method.startswith("Repository") else "replica"
    return "replica" if method in PREDICTIONS else "writer"


@pytest.mark.parametrize(("method", "path", "operation"), rest_routes())
def test_rest_routes(method: str, path: str, operation: str) -> None:
    host, _ = route(REST_PORT, method, path)
    assert host == expected_rest(method, path, operation), (method, path, operation)


@pytest.mark.parametrize("path", [*grpc_methods(), "/grpc.health.v1.Health/Check"])
def test_grpc_methods(path: str) -> None:
    host, _ = route(GRPC_PORT, "POST", path)
    assert host == expected_grpc(path), path


def test_the_routes_cover_both_sides() -> None:
    rest = {expected_rest(*r) for r in rest_routes()}
    grpc = {expected_grpc(p) for p in grpc_methods()}
    assert rest == grpc == {"replica", "writer"}
    assert {op for _, _, op in rest_routes()} >= PREDICTIONS


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/models/m1/predict/more"),  # not a route: the writer answers 404
        ("POST", "/v1/models/m1/train_step"),
        ("POST", "/v2/repository/index"),
        ("GET", "/metrics"),
    ],
)
def test_near_misses_go_to_the_writer(method: str, path: str) -> None:
    assert route(REST_PORT, method, path)[0] == "writer"


def retries(loc: Directive) -> set[str]:
    (directive,) = loc.all("proxy_next_upstream") + loc.all("grpc_next_upstream")
    return set(directive.args)


@pytest.mark.parametrize(
    ("port", "method", "path"),
    [
        (REST_PORT, "POST", "/v1/models/m1/predict"),
        (REST_PORT, "POST", "/v2/models/m1/infer"),
        (REST_PORT, "POST", "/v2/models/m1/versions/2/infer"),
        (GRPC_PORT, "POST", "/propserve.v1.ModelService/Predict"),
        (GRPC_PORT, "POST", "/inference.GRPCInferenceService/ModelInfer"),
    ],
)
def test_predictions_move_on_to_another_replica(port: int, method: str, path: str) -> None:
    # A POST is sent again only with non_idempotent: predictions change nothing.
    host, loc = route(port, method, path)
    assert host == "replica"
    assert retries(loc) >= {"error", "timeout", "non_idempotent"}
    tries = loc.all("proxy_next_upstream_tries") + loc.all("grpc_next_upstream_tries")
    assert int(tries[0].args[0]) >= 2


@pytest.mark.parametrize(
    ("port", "path"),
    [
        (REST_PORT, "/v1/models/m1/train_step"),
        (GRPC_PORT, "/propserve.v1.ModelService/Train"),
        (GRPC_PORT, "/inference.GRPCInferenceService/RepositoryModelLoad"),
    ],
)
def test_the_writer_is_never_sent_a_call_twice(port: int, path: str) -> None:
    host, loc = route(port, "POST", path)
    assert host == "writer"
    assert retries(loc) == {"off"}


def test_addresses_are_resolved_per_request_by_dockers_dns() -> None:
    (resolver,) = http().all("resolver")
    assert resolver.args[0] == "127.0.0.11"
    valid = next(arg for arg in resolver.args if arg.startswith("valid="))
    assert re.fullmatch(r"valid=[1-5]s", valid), valid
    for srv in http().all("server"):
        for loc in srv.all("location"):
            for target in loc.all("proxy_pass") + loc.all("grpc_pass"):
                # A variable: nginx resolves it when a request comes, not once at start.
                assert re.fullmatch(r"(http|grpc)://\$\w+", target.args[0]), target.args


def test_the_grpc_server_speaks_http2() -> None:
    assert server(GRPC_PORT).one("listen").args == [str(GRPC_PORT), "http2"]
    assert server(REST_PORT).one("listen").args == [str(REST_PORT)]


def test_nginx_accepts_the_file(tmp_path: Path) -> None:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if binary is None:
        pytest.skip("no nginx binary here (scripts/compose-scale-smoke.sh checks it in its image)")
    # Its own temporary folders and pid file, not /tmp's.
    conf = tmp_path / "propserve.conf"
    conf.write_text((NGINX / "nginx.conf").read_text().replace("/tmp/", f"{tmp_path}/"))
    result = subprocess.run(
        [binary, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
