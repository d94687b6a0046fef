"""deploy/kserve/ holds manifests a cluster accepts and that run propserve as it is.

Every YAML document there is validated offline: core kinds with kubernetes-validate against
the newest Kubernetes it ships schemas for (strict: an unknown field is refused), KServe
kinds against the CRD schemas committed under tests/data/kserve-crds/ (with unknown fields
refused as Kubernetes does, and metadata checked as ObjectMeta). Then what matters to
propserve: the runtime speaks the Open Inference Protocol on the ports KServe expects, its
flags and variables are ones `propserve serve --help` lists, its probes ask the OIP health
paths, no token is written down, and the example InferenceService uses the runtime.
Copies with a wrong type or an unknown field are refused, so the validation is shown to bite.
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

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kserve"
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


def _load() -> list[tuple[str, Document]]:
    documents = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        loaded = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        documents += [(f"{path.name}#{index}", doc) for index, doc in enumerate(loaded)]
    return documents


DOCUMENTS = _load()


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


def _kubernetes_problems(doc: Document) -> list[str]:
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
        return _kubernetes_problems(doc)
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
    return found + _kubernetes_problems(meta)


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
def _serve_help() -> str:
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


def _flags(container: Document) -> dict[str, str]:
    """The container's `propserve serve` flags (`--name=value` or `--name value`)."""
    assert container["command"] == ["propserve"]
    args = container["args"]
    assert args[0] == "serve"
    flags = {}
    rest = iter(args[1:])
    for arg in rest:
        assert arg.startswith("--"), f"{arg!r} is not a flag"
        name, sep, value = arg.partition("=")
        flags[name] = value if sep else next(rest)
    return flags


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
    text = _serve_help()
    known_flags = set(re.findall(r"--[a-z][a-z0-9-]*", text))
    known_variables = set(re.findall(r"\[(PROPSERVE_[A-Z0-9_]+)\]", text))
    assert {"--rest-port", "--grpc-port", "--store"} <= known_flags  # the help was read
    container = _container()
    flags = _flags(container)
    assert set(flags) <= known_flags, set(flags) - known_flags
    variables = {env["name"] for env in container.get("env", [])}
    assert variables <= known_variables, variables - known_variables
    # The server listens where the ports say, beyond loopback, with its store on the mount.
    assert flags["--rest-host"] == flags["--grpc-host"] == "0.0.0.0"
    assert int(flags["--rest-port"]) == _container()["ports"][0]["containerPort"]
    assert int(flags["--grpc-port"]) == _ports()["h2c"]["containerPort"]
    assert (flags["--store"] + "/").startswith(MODEL_MOUNT + "/")


def test_tokens_come_from_a_secret_and_none_is_written_down() -> None:
    container = _container()
    assert "--tokens" not in _flags(container)  # a command line is visible to `ps`
    env = {entry["name"]: entry for entry in container.get("env", [])}
    tokens = env["PROPSERVE_TOKENS"]
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


def test_the_inference_service_gives_the_store_one_writer_and_a_writable_claim() -> None:
    service = _only("InferenceService")
    predictor = service["spec"]["predictor"]
    annotations = service["metadata"]["annotations"]
    # Two ports per container: KServe's Standard mode (Knative takes one).
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    # KServe mounts storage read-only unless told; propserve writes its store.
    assert annotations["storage.kserve.io/readonly"] == "false"
    # One process writes a store, and its lock refuses a second: one pod, never two at once.
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 1
    assert predictor["deploymentStrategy"]["type"] == "Recreate"
    claim = re.fullmatch(r"pvc://([a-z0-9.-]+)(/.*)?", predictor["model"]["storageUri"])
    assert claim, predictor["model"]["storageUri"]
    assert _only("PersistentVolumeClaim")["metadata"]["name"] == claim.group(1)


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
        lambda d: d["metadata"]["annotations"].update({"storage.kserve.io/readonly": False}),
    ),
    "claim field misspelt": (
        "PersistentVolumeClaim",
        lambda d: d["spec"].update(accesModes=["ReadWriteOnce"]),
    ),
    "claim access modes as a string": (
        "PersistentVolumeClaim",
        lambda d: d["spec"].update(accessModes="ReadWriteOnce"),
    ),
    "an unknown KServe version": (
        "ServingRuntime",
        lambda d: d.update(apiVersion="serving.kserve.io/v9"),
    ),
    "an unknown core kind": (
        "PersistentVolumeClaim",
        lambda d: d.update(kind="PersistentVolumeClam"),
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_is_refused(case: str) -> None:
    kind, change = BROKEN[case]
    assert problems(_only(kind)) == []
    assert problems(_changed(kind, change)) != []
