"""deploy/kserve/ holds manifests a cluster accepts and that run propserve as it is.

Every YAML document there is validated offline: core kinds with kubernetes-validate against
the newest Kubernetes it ships schemas for (strict: an unknown field is refused), KServe
kinds against the CRD schemas committed under tests/data/kserve-crds/ (with unknown fields
refused as Kubernetes does, and metadata checked as ObjectMeta). Then what matters to
propserve: the runtime speaks the Open Inference Protocol on the ports KServe expects, runs
read-only replicas (`--follow`) that name the writer of deploy/k8s/, its flags and variables
are ones `propserve serve --help` lists, its probes ask the OIP health paths, no token is
written down, and the example InferenceService uses the runtime and scales on the writer's
claim. Copies with a wrong type or an unknown field are refused, so the validation is shown
to bite. tests/deploy/test_k8s_manifests.py reuses the helpers for deploy/k8s/.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kserve"
#: The writer the runtime's replicas follow, and the store's claim.
K8S = ROOT / "deploy" / "k8s"
CRDS = ROOT / "tests" / "data" / "kserve-crds"
#: (apiVersion, kind) of each KServe kind the folder may hold -> its committed CRD schema.
KSERVE_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime.v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.v1beta1.json",
}
KUBERNETES = kubernetes_validate.latest_version()
#: Where KServe mounts a predictor's storageUri.
MODEL_MOUNT = "/mnt/models"

Document = dict[str, Any]


def load_documents(folder: Path) -> list[tuple[str, Document]]:
    """Every YAML document in the folder's *.yaml files, named `file#index`."""
    documents = []
    for path in sorted(folder.glob("*.yaml")):
        loaded = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        documents += [(f"{path.name}#{index}", doc) for index, doc in enumerate(loaded)]
    return documents


DOCUMENTS = load_documents(DEPLOY)


def _only(kind: str) -> Document:
    (found,) = [doc for _, doc in DOCUMENTS if doc.get("kind") == kind]
    return found


def _refuse_unknown_fields(schema: Document) -> Document:
    """A copy of a structural schema that refuses undeclared fields.

    JSON Schema allows properties a schema does not list; Kubernetes drops them from a custom
    resource, and refuses them under strict field validation (kubectl's default). So every
    object that lists its properties gets ``additionalProperties: false``, unless it keeps
    unknown fields. Only the structural part is walked (properties, items,
    additionalProperties), as Kubernetes' pruning does; anyOf and friends only constrain.
    """
    node = dict(schema)
    if "properties" in node:
        node["properties"] = {
            name: _refuse_unknown_fields(sub) for name, sub in node["properties"].items()
        }
        if "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _refuse_unknown_fields(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = _refuse_unknown_fields(node["items"])
    return node


@cache
def _crd_validator(filename: str) -> Any:
    schema = json.loads((CRDS / filename).read_text())
    return jsonschema.Draft202012Validator(_refuse_unknown_fields(schema))


def kubernetes_problems(doc: Document) -> list[str]:
    """Why Kubernetes would refuse a core-kind document (strict); empty when it would not."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path)) or '(root)'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def problems(doc: Document) -> list[str]:
    """Why a cluster would refuse the document; empty when it would accept it."""
    if not isinstance(doc.get("apiVersion"), str) or not isinstance(doc.get("kind"), str):
        return ["apiVersion and kind must be strings"]
    if not doc["apiVersion"].startswith("serving.kserve.io/"):
        return kubernetes_problems(doc)
    filename = KSERVE_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if filename is None:
        return [f"no schema for {doc['apiVersion']} {doc['kind']}"]
    found = [
        f"{'.'.join(map(str, error.path)) or '(root)'}: {error.message}"
        for error in _crd_validator(filename).iter_errors(doc)
    ]
    # A custom resource's metadata is ObjectMeta, which the CRD schema leaves to the API
    # server: check it as the metadata of a core kind.
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")}
    return found + kubernetes_problems(meta)


@pytest.mark.parametrize(("where", "doc"), DOCUMENTS, ids=[where for where, _ in DOCUMENTS])
def test_every_document_validates(where: str, doc: Document) -> None:
    assert problems(doc) == [], where
    assert doc["metadata"].get("name"), where


def test_the_folder_holds_the_runtime_and_an_example_service() -> None:
    assert set(KSERVE_SCHEMAS) <= {(doc["apiVersion"], doc["kind"]) for _, doc in DOCUMENTS}
    names = [(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCUMENTS]
    assert len(names) == len(set(names)), "two documents of one kind share a name"


# --- what matters to propserve ---------------------------------------------------------------


@cache
def serve_help() -> str:
    """`propserve serve --help` as this checkout prints it."""
    done = subprocess.run(
        [sys.executable, "-m", "propserve", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _container() -> Document:
    container: Document
    (container,) = _only("ServingRuntime")["spec"]["containers"]
    assert container["name"] == "kserve-container"
    return container


def known_options() -> tuple[set[str], set[str]]:
    """The flags and the PROPSERVE_* variables that `propserve serve --help` lists."""
    text = serve_help()
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", text))
    variables = set(re.findall(r"\[(PROPSERVE_[A-Z0-9_]+)\]", text))
    assert {"--rest-port", "--grpc-port", "--store"} <= flags  # the help was read
    assert {"PROPSERVE_REST_PORT", "PROPSERVE_STORE"} <= variables
    return flags, variables


def serve_flags(container: Document) -> dict[str, str]:
    """The container's `propserve serve` flags: `--name=value`, `--name value`, or a switch
    (`--name` before another flag or at the end), whose value is ``""``."""
    assert container["command"] == ["propserve"]
    args = container["args"]
    assert args[0] == "serve"
    flags = {}
    rest = args[1:]
    while rest:
        arg, *rest = rest
        assert arg.startswith("--"), f"{arg!r} is not a flag"
        name, sep, value = arg.partition("=")
        if not sep and rest and not rest[0].startswith("--"):
            value, *rest = rest
        assert name not in flags, f"{name} given twice"
        flags[name] = value
    return flags


def environment(container: Document) -> dict[str, Document]:
    """The container's variables by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def _ports() -> dict[str, Document]:
    return {port["name"]: port for port in _container()["ports"]}


def test_the_runtime_speaks_the_open_inference_protocol_on_rest_and_grpc() -> None:
    assert {"v2", "grpc-v2"} <= set(_only("ServingRuntime")["spec"]["protocolVersions"])


def test_http_is_on_8080_first_and_grpc_on_a_port_named_h2c() -> None:
    ports = _container()["ports"]
    # KServe's Service sends its port 80 to the first port; KServe expects HTTP on 8080.
    assert ports[0]["containerPort"] == 8080
    assert ports[0].get("protocol", "TCP") == "TCP"
    assert _ports()["h2c"]["containerPort"] == 8081
    assert _ports()["h2c"].get("protocol", "TCP") == "TCP"


def test_the_flags_and_variables_are_ones_propserve_serve_has() -> None:
    known_flags, known_variables = known_options()
    container = _container()
    flags = serve_flags(container)
    assert set(flags) <= known_flags, set(flags) - known_flags
    variables = set(environment(container))
    assert variables <= known_variables, variables - known_variables
    # The server listens where the ports say, beyond loopback, with its store on the mount.
    assert flags["--rest-host"] == flags["--grpc-host"] == "0.0.0.0"
    assert int(flags["--rest-port"]) == _container()["ports"][0]["containerPort"]
    assert int(flags["--grpc-port"]) == _ports()["h2c"]["containerPort"]
    assert (flags["--store"] + "/").startswith(MODEL_MOUNT + "/")


def test_the_runtime_runs_read_only_replicas_that_name_the_writer() -> None:
    container = _container()
    # A replica never writes the store, so it scales, and KServe may mount it read-only.
    assert serve_flags(container)["--follow"] == ""
    # The writer's URL, named when a replica refuses training: the Service of deploy/k8s/'s
    # writer, on its REST port, in the same namespace.
    url = urlsplit(environment(container)["PROPSERVE_WRITER_URL"]["value"])
    k8s = [doc for _, doc in load_documents(K8S)]
    (writer,) = [doc for doc in k8s if doc["kind"] == "StatefulSet"]
    (service,) = [
        doc for doc in k8s if doc["kind"] == "Service" and doc["metadata"]["name"] == url.hostname
    ]
    assert (
        service["spec"]["selector"].items()
        <= writer["spec"]["template"]["metadata"]["labels"].items()
    )
    assert url.scheme == "http"
    assert url.port in [port["port"] for port in service["spec"]["ports"] if port["name"] == "http"]


def test_tokens_come_from_a_secret_and_none_is_written_down() -> None:
    container = _container()
    assert "--tokens" not in serve_flags(container)  # a command line is visible to `ps`
    tokens = environment(container)["PROPSERVE_TOKENS"]
    assert "value" not in tokens
    assert tokens["valueFrom"]["secretKeyRef"]["name"]
    assert tokens["valueFrom"]["secretKeyRef"]["key"]
    assert not [doc for _, doc in DOCUMENTS if doc["kind"] == "Secret"]


def test_the_probes_ask_the_oip_health_paths_on_the_http_port() -> None:
    container = _container()
    ready = container["readinessProbe"]["httpGet"]
    live = container["livenessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/v2/health/ready", 8080)
    assert (live["path"], live["port"]) == ("/v2/health/live", 8080)
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_the_inference_service_runs_on_the_runtime() -> None:
    runtime = _only("ServingRuntime")
    service = _only("InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    wanted = model["modelFormat"]
    supported = [
        fmt
        for fmt in runtime["spec"]["supportedModelFormats"]
        if fmt["name"] == wanted["name"] and wanted.get("version") in (None, fmt.get("version"))
    ]
    assert supported, f"{wanted} is not among {runtime['spec']['supportedModelFormats']}"
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def test_the_inference_service_scales_replicas_on_the_writers_claim_read_only() -> None:
    service = _only("InferenceService")
    predictor = service["spec"]["predictor"]
    annotations = service["metadata"].get("annotations", {})
    # Two ports per container: KServe's Standard mode (Knative takes one).
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    # KServe mounts storage read-only unless told otherwise; a replica never writes.
    assert annotations.get("storage.kserve.io/readonly", "true") == "true"
    # Replicas share the store: several pods, an autoscaler, old and new side by side.
    assert annotations.get("serving.kserve.io/autoscalerClass", "hpa") != "none"
    assert predictor["maxReplicas"] > predictor.get("minReplicas", 1) >= 1
    assert predictor.get("deploymentStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    # No PROPSERVE_* variables from the namespace's Services (they would name no setting).
    assert predictor["enableServiceLinks"] is False
    # The store is deploy/k8s/'s claim, which its writer writes and many pods mount.
    claim = re.fullmatch(r"pvc://([a-z0-9.-]+)(/.*)?", predictor["model"]["storageUri"])
    assert claim, predictor["model"]["storageUri"]
    (store,) = [doc for _, doc in load_documents(K8S) if doc["kind"] == "PersistentVolumeClaim"]
    assert store["metadata"]["name"] == claim.group(1)
    assert "ReadWriteMany" in store["spec"]["accessModes"]
    assert not [doc for _, doc in DOCUMENTS if doc["kind"] == "PersistentVolumeClaim"]


# --- the validation bites --------------------------------------------------------------------


def _changed(kind: str, change: Callable[[Document], None]) -> Document:
    doc = copy.deepcopy(_only(kind))
    change(doc)
    return doc


def _runtime_container(doc: Document) -> Document:
    container: Document = doc["spec"]["containers"][0]
    return container


BROKEN: dict[str, tuple[str, Callable[[Document], None]]] = {
    "runtime port as a string": (
        "ServingRuntime",
        lambda d: _runtime_container(d)["ports"][0].update(containerPort="8080"),
    ),
    "runtime probe field misspelt": (
        "ServingRuntime",
        lambda d: _runtime_container(d)["readinessProbe"]["httpGet"].update(paht="/v2"),
    ),
    "runtime unknown top-level field": ("ServingRuntime", lambda d: d.update(spek={})),
    "runtime protocolVersions as a string": (
        "ServingRuntime",
        lambda d: d["spec"].update(protocolVersions="v2"),
    ),
    "runtime env value not a string": (
        "ServingRuntime",
        lambda d: _runtime_container(d)["env"].append({"name": "PROPSERVE_X", "value": 1}),
    ),
    "service replicas as a string": (
        "InferenceService",
        lambda d: d["spec"]["predictor"].update(minReplicas="1"),
    ),
    "service storageUri misspelt": (
        "InferenceService",
        lambda d: d["spec"]["predictor"]["model"].update(storageURI="pvc://x"),
    ),
    "service metadata field misspelt": (
        "InferenceService",
        lambda d: d["metadata"].update(lables={"a": "b"}),
    ),
    "service annotation value not a string": (
        "InferenceService",
        lambda d: d["metadata"]["annotations"].update({"storage.kserve.io/readonly": True}),
    ),
    "service autoscaling field misspelt": (
        "InferenceService",
        lambda d: d["spec"]["predictor"]["autoScaling"].update(metric=[]),
    ),
    "service autoscaling target as a string": (
        "InferenceService",
        lambda d: d["spec"]["predictor"]["autoScaling"]["metrics"][0]["resource"]["target"].update(
            averageUtilization="70"
        ),
    ),
    "an unknown KServe version": (
        "ServingRuntime",
        lambda d: d.update(apiVersion="serving.kserve.io/v9"),
    ),
    "an unknown core kind": (
        "InferenceService",
        lambda d: d.update(apiVersion="v1", kind="PersistentVolumeClam"),
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_is_refused(case: str) -> None:
    kind, change = BROKEN[case]
    assert problems(_only(kind)) == []
    assert problems(_changed(kind, change)) != []
