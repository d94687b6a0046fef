"""The committed protobuf/gRPC code is what scripts/generate_protos.py makes from proto/, and
it runs on the oldest protobuf and grpcio the package accepts."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def _floor(requirement_prefix: str) -> tuple[int, ...]:
    """The lower bound of one of the package's own dependencies, from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = next(d for d in project["dependencies"] if d.startswith(requirement_prefix + ">="))
    return _version(spec.split(">=", 1)[1].split(",", 1)[0])


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3])


def _gencode(path: Path) -> tuple[int, ...]:
    text = path.read_text()
    marker = "ValidateProtobufRuntimeVersion("
    args = text[text.index(marker) + len(marker) :].split(")", 1)[0]
    return tuple(int(part.strip()) for part in args.split(",")[1:4])


def test_gencode_is_no_newer_than_the_oldest_protobuf_supported() -> None:
    """protoc's gencode refuses an older runtime at import, so the protobuf floor a user can
    install (tritonclient and KServe pin protobuf 6) must be at least the gencode: the
    generator's version is chosen for the floor, not the other way round."""
    floor = _floor("protobuf")
    for path in sorted((ROOT / "propserve").rglob("*_pb2.py")):
        assert _gencode(path) <= floor, (path.name, _gencode(path), floor)
    assert floor[0] == 6, "tritonclient and KServe run on protobuf 6"


def test_generated_stubs_run_on_the_oldest_grpcio_supported() -> None:
    """The generated stubs refuse a grpcio older than the one named in them."""
    for path in sorted((ROOT / "propserve").rglob("*_pb2_grpc.py")):
        line = next(
            line for line in path.read_text().splitlines() if line.startswith("GRPC_GENERATED")
        )
        generated = _version(line.split("=", 1)[1].strip().strip("'\""))
        assert generated <= _floor("grpcio"), (path.name, generated)


def test_protobuf_runtime_is_not_older_than_protoc() -> None:
    runtime = _version(metadata.version("protobuf"))
    for path in sorted((ROOT / "propserve").rglob("*_pb2.py")):
        assert runtime >= _gencode(path), (path.name, runtime)


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
