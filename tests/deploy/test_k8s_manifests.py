"""deploy/k8s/ holds manifests a cluster accepts and that run one writer and its replicas.

Every YAML document there is validated offline: the Kubernetes kinds with kubernetes-validate
against the newest Kubernetes it ships schemas for (strict: an unknown field is refused), the
Kustomization against the fields it may hold. Then what matters to propserve: one writer (a
StatefulSet of one pod, never two at once) mounts the store read-write; the replicas run
`--follow`, mount the same claim read-only, name the writer and are scaled by the autoscaler;
every flag and variable is one `propserve serve --help` lists; each Service selects its own
pods; the Ingresses send predictions to the replicas and every other call to the writer, by
the paths the APIs use; the probes ask /readyz and /healthz; no token is written down. Copies
with a wrong type or an unknown field are refused, so the validation is shown to bite.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from tests.deploy.test_kserve_manifests import (
    ROOT,
    Document,
    environment,
    known_options,
    kubernetes_problems,
    load_documents,
    serve_flags,
)

DEPLOY = ROOT / "deploy" / "k8s"
DOCUMENTS = load_documents(DEPLOY)
#: The workloads, by name; each runs one container, `propserve serve`.
WRITER = "propserve-writer"
REPLICA = "propserve-replica"
#: The image's user and group (the Dockerfile's).
IMAGE_USER = 10001

#: What a Kustomization in this folder may hold: its resources, and the image that
#: `kustomize edit set image` names.
KUSTOMIZATION_SCHEMA: Document = {
    "type": "object",
    "required": ["apiVersion", "kind", "resources"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "resources": {
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]*\.yaml$"},
        },
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    name: {"type": "string"} for name in ("name", "newName", "newTag", "digest")
                },
            },
        },
    },
}

#: gRPC methods: propserve.v1.ModelService's from its proto, and the Open Inference Protocol's.
MODEL_SERVICE = "propserve.v1.ModelService"
MODEL_SERVICE_METHODS = re.findall(
    r"^\s*rpc\s+(\w+)\s*\(",
    (ROOT / "proto" / "propserve" / "v1" / "model_service.proto").read_text(),
    re.MULTILINE,
)
OIP_SERVICE = "inference.GRPCInferenceService"
OIP_METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
)


def problems(doc: Document) -> list[str]:
    """Why `kubectl apply -k` would refuse the document; empty when it would accept it."""
    if not isinstance(doc.get("apiVersion"), str) or not isinstance(doc.get("kind"), str):
        return ["apiVersion and kind must be strings"]
    if doc["apiVersion"].startswith("kustomize.config.k8s.io/"):
        validator = jsonschema.Draft202012Validator(KUSTOMIZATION_SCHEMA)
        return [
            f"{'.'.join(map(str, error.path)) or '(root)'}: {error.message}"
            for error in validator.iter_errors(doc)
        ]
    return kubernetes_problems(doc)


def _all(kind: str) -> list[Document]:
    return [doc for _, doc in DOCUMENTS if doc.get("kind") == kind]


def _only(kind: str, name: str | None = None) -> Document:
    (found,) = [doc for doc in _all(kind) if name in (None, doc.get("metadata", {}).get("name"))]
    return found


def _workloads() -> list[Document]:
    return [doc for _, doc in DOCUMENTS if doc["kind"] in {"Deployment", "StatefulSet"}]


def _workload(name: str) -> Document:
    (found,) = [doc for doc in _workloads() if doc["metadata"]["name"] == name]
    return found


def _pod(workload: Document) -> Document:
    pod: Document = workload["spec"]["template"]["spec"]
    return pod


def _container(workload: Document) -> Document:
    container: Document
    (container,) = _pod(workload)["containers"]
    return container


def _container_port(container: Document, port: int | str) -> int:
    """The container port a probe or a Service's targetPort names (by name or number)."""
    if isinstance(port, int):
        assert port in [entry["containerPort"] for entry in container["ports"]]
        return port
    (number,) = [entry["containerPort"] for entry in container["ports"] if entry["name"] == port]
    assert isinstance(number, int)
    return number


def _cpus(quantity: str | int) -> Fraction:
    text = str(quantity)
    return Fraction(text[:-1]) / 1000 if text.endswith("m") else Fraction(text)


def _store_volume(workload: Document) -> tuple[Document, Document]:
    """The workload's claim volume and its mount: the store."""
    pod = _pod(workload)
    (volume,) = [entry for entry in pod["volumes"] if "persistentVolumeClaim" in entry]
    (mount,) = [
        entry for entry in _container(workload)["volumeMounts"] if entry["name"] == volume["name"]
    ]
    return volume, mount


def _service_for(workload: Document) -> Document:
    """The one Service that selects the workload's pods."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    (service,) = [
        doc for doc in _all("Service") if doc["spec"]["selector"].items() <= labels.items()
    ]
    return service


# --- what a cluster accepts ------------------------------------------------------------------


@pytest.mark.parametrize(("where", "doc"), DOCUMENTS, ids=[where for where, _ in DOCUMENTS])
def test_every_document_validates(where: str, doc: Document) -> None:
    assert problems(doc) == [], where
    if doc["kind"] != "Kustomization":
        assert doc["metadata"].get("name"), where
        # The set goes to whatever namespace it is applied in.
        assert "namespace" not in doc["metadata"], where


def test_the_kustomization_holds_every_manifest_and_no_namespace() -> None:
    kustomization = _only("Kustomization")
    others = sorted(
        path.name for path in DEPLOY.glob("*.yaml") if path.name != "kustomization.yaml"
    )
    assert sorted(kustomization["resources"]) == others
    assert "namespace" not in kustomization
    names = [(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCUMENTS if "metadata" in doc]
    assert len(names) == len(set(names)), "two documents of one kind share a name"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize built in)")
def test_kubectl_builds_the_kustomization_unchanged() -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    built = [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]

    def canonical(docs: list[Any]) -> list[str]:
        return sorted(json.dumps(doc, sort_keys=True) for doc in docs)

    assert canonical(built) == canonical([d for _, d in DOCUMENTS if d["kind"] != "Kustomization"])


# --- one writer, many replicas ---------------------------------------------------------------


def test_the_writer_is_a_stateful_set_of_one_pod_and_the_only_writer() -> None:
    writer = _workload(WRITER)
    assert writer["kind"] == "StatefulSet"
    spec = writer["spec"]
    assert spec["replicas"] == 1
    # The replacement starts once the old pod is gone, on updates too.
    assert spec["podManagementPolicy"] == "OrderedReady"
    assert spec.get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    # One process writes a store: every other workload is a replica.
    writers = [doc for doc in _workloads() if "--follow" not in serve_flags(_container(doc))]
    assert writers == [writer]
    # Nothing scales it.
    assert WRITER not in [
        hpa["spec"]["scaleTargetRef"]["name"] for hpa in _all("HorizontalPodAutoscaler")
    ]


def test_the_writer_mounts_the_store_read_write() -> None:
    writer = _workload(WRITER)
    volume, mount = _store_volume(writer)
    claim = _only("PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert not volume["persistentVolumeClaim"].get("readOnly", False)
    assert not mount.get("readOnly", False)
    assert serve_flags(_container(writer))["--store"] == mount["mountPath"]
    # Pods on many nodes mount it: the writer and every replica.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_replicas_follow_the_store_read_only_and_name_the_writer() -> None:
    replica = _workload(REPLICA)
    assert replica["kind"] == "Deployment"
    container = _container(replica)
    flags = serve_flags(container)
    assert flags["--follow"] == ""  # a switch
    # One CPU requested per worker process.
    workers = int(flags.get("--workers", "1"))
    assert workers >= 1
    assert _cpus(container["resources"]["requests"]["cpu"]) >= workers
    # The writer's claim, read-only on the mount and on the claim.
    volume, mount = _store_volume(replica)
    writer_volume, _ = _store_volume(_workload(WRITER))
    claim = volume["persistentVolumeClaim"]
    assert claim["claimName"] == writer_volume["persistentVolumeClaim"]["claimName"]
    assert claim["readOnly"] is True
    assert mount["readOnly"] is True
    assert flags["--store"] == mount["mountPath"]
    # A refused training call names the writer: its Service, on its REST port.
    url = urlsplit(environment(container)["PROPSERVE_WRITER_URL"]["value"])
    writer_service = _service_for(_workload(WRITER))
    assert url.scheme == "http"
    assert url.hostname == writer_service["metadata"]["name"]
    assert url.port in [p["port"] for p in writer_service["spec"]["ports"] if p["name"] == "http"]
    # The autoscaler sets the count; an apply must not reset it.
    assert "replicas" not in replica["spec"]


def test_the_autoscaler_scales_the_replica_deployment_on_cpu() -> None:
    (hpa,) = _all("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": REPLICA,
    }
    assert 1 <= hpa["spec"].get("minReplicas", 1) < hpa["spec"]["maxReplicas"]
    cpu = [
        metric["resource"]["target"]
        for metric in hpa["spec"]["metrics"]
        if metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    ]
    assert cpu
    assert cpu[0]["type"] == "Utilization"
    assert 0 < cpu[0]["averageUtilization"] <= 100
    # Utilization is measured against the request.
    assert "cpu" in _container(_workload(REPLICA))["resources"]["requests"]


@pytest.mark.parametrize("name", [WRITER, REPLICA])
def test_the_flags_and_variables_are_ones_propserve_serve_has(name: str) -> None:
    known_flags, known_variables = known_options()
    container = _container(_workload(name))
    assert container["command"] == ["propserve"]
    flags = serve_flags(container)
    assert set(flags) <= known_flags, set(flags) - known_flags
    variables = set(environment(container))
    assert variables <= known_variables, variables - known_variables
    # The server listens beyond loopback, where the container's ports say.
    assert flags["--rest-host"] == flags["--grpc-host"] == "0.0.0.0"
    assert int(flags["--rest-port"]) == _container_port(container, "http")
    assert int(flags["--grpc-port"]) == _container_port(container, "grpc")


@pytest.mark.parametrize("name", [WRITER, REPLICA])
def test_each_service_selects_its_own_pods_on_both_ports(name: str) -> None:
    workload = _workload(name)
    service = _service_for(workload)
    assert service["metadata"]["name"] == name
    assert service["spec"]["selector"], "a Service without a selector selects nothing"
    others = [doc for doc in _workloads() if doc is not workload]
    for other in others:
        labels = other["spec"]["template"]["metadata"]["labels"]
        assert not service["spec"]["selector"].items() <= labels.items()
    # The selector is the workload's own.
    assert workload["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    container = _container(workload)
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    for port_name, port in ports.items():
        target = _container_port(container, port.get("targetPort", port["port"]))
        assert target == _container_port(container, port_name)
    # gRPC is HTTP/2 without TLS: what proxies and meshes read from appProtocol.
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"


@pytest.mark.parametrize("name", [WRITER, REPLICA])
def test_the_probes_ask_readyz_and_healthz_on_the_rest_port(name: str) -> None:
    container = _container(_workload(name))
    rest = int(serve_flags(container)["--rest-port"])
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        if probe == "startupProbe" and probe not in container:
            continue
        check = container[probe]["httpGet"]
        assert check["path"] == path, probe
        assert _container_port(container, check["port"]) == rest, probe


def test_tokens_come_from_a_secret_and_none_is_written_down() -> None:
    for workload in _workloads():
        container = _container(workload)
        assert "--tokens" not in serve_flags(container)  # a command line is visible to `ps`
        tokens = environment(container)["PROPSERVE_TOKENS"]
        assert "value" not in tokens
        assert tokens["valueFrom"]["secretKeyRef"]["name"]
        assert tokens["valueFrom"]["secretKeyRef"]["key"]
    assert not _all("Secret")


@pytest.mark.parametrize("name", [WRITER, REPLICA])
def test_the_pods_run_as_the_images_user_without_privileges(name: str) -> None:
    pod = _pod(_workload(name))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_USER
    context = _container(_workload(name))["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # The namespace's Services would add PROPSERVE_<SERVICE>_PORT and the like: variables
    # that look like settings and name none.
    assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize("name", [WRITER, REPLICA])
def test_the_grace_period_covers_the_drain(name: str) -> None:
    workload = _workload(name)
    container = _container(workload)
    grace = float(environment(container)["PROPSERVE_GRACE_SECONDS"]["value"])
    pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    # The writer saves every head with unsaved steps after the drain: leave it room.
    room = 30 if name == WRITER else 5
    assert _pod(workload)["terminationGracePeriodSeconds"] >= pause + grace + room


# --- the Ingresses ---------------------------------------------------------------------------


def _route(path: str) -> tuple[Document, str, str]:
    """Where the Ingresses send a request for `path` (on their host), as Kubernetes defines
    it: an Exact path first, else the longest Prefix matching whole path elements. Returns
    the Ingress, the workload behind the Service and the container port's name."""
    candidates = []
    for ingress in _all("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for entry in rule["http"]["paths"]:
                kind, rule_path = entry["pathType"], entry["path"]
                assert kind in {"Exact", "Prefix"}, f"{rule_path}: {kind} is the controller's own"
                if kind == "Exact" and rule_path == path:
                    candidates.append((1, len(rule_path), ingress, entry["backend"]))
                wanted = [part for part in rule_path.split("/") if part]
                if kind == "Prefix" and path.split("/")[1:][: len(wanted)] == wanted:
                    candidates.append((0, len(rule_path.rstrip("/")), ingress, entry["backend"]))
    assert candidates, f"nothing routes {path}"
    candidates.sort(key=lambda found: found[:2])
    *_, (_, _, ingress, backend) = candidates
    (service,) = [
        doc for doc in _all("Service") if doc["metadata"]["name"] == backend["service"]["name"]
    ]
    wanted_port = backend["service"]["port"]
    (port,) = [
        entry
        for entry in service["spec"]["ports"]
        if entry["name"] == wanted_port.get("name") or entry["port"] == wanted_port.get("number")
    ]
    (workload,) = [
        doc
        for doc in _workloads()
        if service["spec"]["selector"].items()
        <= doc["spec"]["template"]["metadata"]["labels"].items()
    ]
    container = _container(workload)
    number = _container_port(container, port.get("targetPort", port["port"]))
    (port_name,) = [
        entry["name"] for entry in container["ports"] if entry["containerPort"] == number
    ]
    return ingress, workload["metadata"]["name"], port_name


def _speaks_grpc(ingress: Document) -> bool:
    annotations = ingress["metadata"].get("annotations", {})
    return bool(annotations.get("nginx.ingress.kubernetes.io/backend-protocol") == "GRPC")


def test_the_ingresses_are_nginx_ones_with_tls_on_one_host() -> None:
    ingresses = _all("Ingress")
    assert len(ingresses) == 2
    assert [_speaks_grpc(ingress) for ingress in ingresses].count(True) == 1
    for ingress in ingresses:
        assert ingress["spec"]["ingressClassName"] == "nginx"
        hosts = {rule.get("host") for rule in ingress["spec"]["rules"]}
        # nginx speaks HTTP/2, which gRPC needs, only with TLS; tokens travel in headers.
        covered = {host for tls in ingress["spec"]["tls"] for host in tls["hosts"]}
        assert hosts <= covered
        assert all(tls["secretName"] for tls in ingress["spec"]["tls"])


HTTP_ROUTES = {
    "/v2/models/digits/infer": REPLICA,
    "/v2/models/digits/versions/3/infer": REPLICA,
    "/v2/models/digits": REPLICA,
    "/v2/models/digits/ready": REPLICA,
    "/v2/health/ready": REPLICA,
    "/v2": REPLICA,
    "/v2/repository/index": WRITER,
    "/v2/repository/models/digits/load": WRITER,
    "/v2/repository/models/digits/unload": WRITER,
    "/v1/models": WRITER,
    "/v1/models/digits/predict": WRITER,
    "/v1/models/digits/train": WRITER,
    "/v1/models/digits/versions": WRITER,
    "/docs": WRITER,
    "/openapi.json": WRITER,
    "/v20": WRITER,  # a prefix matches whole path elements
}


@pytest.mark.parametrize("path", sorted(HTTP_ROUTES))
def test_http_goes_to_the_replicas_for_the_oip_and_to_the_writer_otherwise(path: str) -> None:
    ingress, workload, port = _route(path)
    assert not _speaks_grpc(ingress), ingress["metadata"]["name"]
    assert (workload, port) == (HTTP_ROUTES[path], "http")


def _grpc_target(service: str, method: str) -> str:
    """Where a method should go: predictions and reads of the protocol to the replicas,
    every change (and the model repository, whose load and unload are admin calls) to the
    writer."""
    if service == MODEL_SERVICE:
        return REPLICA if method == "Predict" else WRITER
    return WRITER if method.startswith("Repository") else REPLICA


GRPC_METHODS = [(MODEL_SERVICE, method) for method in MODEL_SERVICE_METHODS] + [
    (OIP_SERVICE, method) for method in OIP_METHODS
]


def test_the_proto_was_read() -> None:
    assert {"Predict", "TrainStep", "Train", "SaveVersion", "SetLabel"} <= set(
        MODEL_SERVICE_METHODS
    )


@pytest.mark.parametrize(
    ("service", "method"), GRPC_METHODS, ids=[f"{s}/{m}" for s, m in GRPC_METHODS]
)
def test_grpc_predictions_go_to_the_replicas_and_changes_to_the_writer(
    service: str, method: str
) -> None:
    ingress, workload, port = _route(f"/{service}/{method}")
    assert _speaks_grpc(ingress), ingress["metadata"]["name"]
    assert (workload, port) == (_grpc_target(service, method), "grpc")


# --- the validation bites --------------------------------------------------------------------


def _changed(kind: str, name: str | None, change: Callable[[Document], None]) -> Document:
    doc = copy.deepcopy(_only(kind, name))
    change(doc)
    return doc


def _first_container(doc: Document) -> Document:
    container: Document = doc["spec"]["template"]["spec"]["containers"][0]
    return container


def _first_path(doc: Document) -> Document:
    path: Document = doc["spec"]["rules"][0]["http"]["paths"][0]
    return path


BROKEN: dict[str, tuple[str, str | None, Callable[[Document], None]]] = {
    "writer replicas as a string": (
        "StatefulSet",
        WRITER,
        lambda d: d["spec"].update(replicas="1"),
    ),
    "writer container field misspelt": (
        "StatefulSet",
        WRITER,
        lambda d: _first_container(d).update(imagePullPolcy="Always"),
    ),
    "writer probe field misspelt": (
        "StatefulSet",
        WRITER,
        lambda d: _first_container(d)["readinessProbe"]["httpGet"].update(paht="/readyz"),
    ),
    "replica unknown spec field": ("Deployment", REPLICA, lambda d: d["spec"].update(replica=2)),
    "replica mount readOnly as a string": (
        "Deployment",
        REPLICA,
        lambda d: _first_container(d)["volumeMounts"][0].update(readOnly="true"),
    ),
    "replica env value not a string": (
        "Deployment",
        REPLICA,
        lambda d: _first_container(d)["env"].append({"name": "PROPSERVE_WORKERS", "value": 2}),
    ),
    "service port as a string": (
        "Service",
        REPLICA,
        lambda d: d["spec"]["ports"][0].update(port="8000"),
    ),
    "autoscaler target misspelt": (
        "HorizontalPodAutoscaler",
        None,
        lambda d: d["spec"].update(scaleTargetRf=d["spec"]["scaleTargetRef"]),
    ),
    "autoscaler maxReplicas as a string": (
        "HorizontalPodAutoscaler",
        None,
        lambda d: d["spec"].update(maxReplicas="10"),
    ),
    "ingress backend field misspelt": (
        "Ingress",
        "propserve-grpc",
        lambda d: _first_path(d)["backend"].update(servce={}),
    ),
    "ingress paths as a mapping": (
        "Ingress",
        "propserve-http",
        lambda d: d["spec"]["rules"][0]["http"].update(paths={"/": "propserve-writer"}),
    ),
    "claim access modes as a string": (
        "PersistentVolumeClaim",
        None,
        lambda d: d["spec"].update(accessModes="ReadWriteMany"),
    ),
    "metadata field misspelt": (
        "StatefulSet",
        WRITER,
        lambda d: d["metadata"].update(lables={"a": "b"}),
    ),
    "an unknown core kind": (
        "PersistentVolumeClaim",
        None,
        lambda d: d.update(kind="PersistentVolumeClam"),
    ),
    "kustomization resources as a string": (
        "Kustomization",
        None,
        lambda d: d.update(resources="store.yaml"),
    ),
    "kustomization unknown field": (
        "Kustomization",
        None,
        lambda d: d.update(resource=["store.yaml"]),
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_is_refused(case: str) -> None:
    kind, name, change = BROKEN[case]
    assert problems(_only(kind, name)) == []
    assert problems(_changed(kind, name, change)) != []
