"""The committed protobuf/gRPC code is what scripts/generate_protos.py makes from proto/,
with the grpc packages it was made by kept at one release."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRPC_PACKAGES = ("grpcio", "grpcio-tools", "grpcio-health-checking", "grpcio-reflection")


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_protos.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        "the generated code under propserve/v1/ differs from what proto/ makes; run "
        f"scripts/generate_protos.py\n{result.stdout}{result.stderr}"
    )


def test_generated_code_is_complete() -> None:
    generated = {p.name for p in (ROOT / "propserve" / "v1").iterdir() if p.is_file()}
    assert {
        "model_service_pb2.py",
        "model_service_pb2.pyi",
        "model_service_pb2_grpc.py",
        "model_service_pb2_grpc.pyi",
    } <= generated


def test_grpc_packages_share_one_release() -> None:
    versions = {name: metadata.version(name) for name in GRPC_PACKAGES}
    assert len(set(versions.values())) == 1, versions


def test_generated_code_matches_the_grpc_runtime() -> None:
    """The generated stubs name the grpcio they were made for; the runtime must be it."""
    text = (ROOT / "propserve" / "v1" / "model_service_pb2_grpc.py").read_text()
    line = next(line for line in text.splitlines() if line.startswith("GRPC_GENERATED_VERSION"))
    generated = line.split("=", 1)[1].strip().strip("'\"")
    assert generated == metadata.version("grpcio")


def test_protobuf_runtime_is_not_older_than_protoc() -> None:
    """protoc's gencode refuses an older runtime at import; check the pair explicitly."""
    text = (ROOT / "propserve" / "v1" / "model_service_pb2.py").read_text()
    marker = "ValidateProtobufRuntimeVersion("
    args = text[text.index(marker) + len(marker) :].split(")", 1)[0]
    parts = [part.strip() for part in args.split(",")]
    gencode = tuple(int(part) for part in parts[1:4])
    runtime = tuple(int(part) for part in metadata.version("protobuf").split(".")[:3])
    assert runtime >= gencode, (runtime, gencode)


def test_the_check_notices_a_stale_file(tmp_path: Path) -> None:
    """The freshness test above can fail: in a copy of the tree with one generated file
    touched, --check exits 1 and names it."""
    import shutil  # noqa: PLC0415 - only here

    for folder in ("proto", "scripts", "propserve"):
        shutil.copytree(
            ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    stale = tmp_path / "propserve" / "v1" / "model_service_pb2.pyi"
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "scripts" / "generate_protos.py"), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "propserve/v1/model_service_pb2.pyi" in result.stdout
