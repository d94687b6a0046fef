"""The wheel installs one top-level name, ``propserve``; a plain install is the clients alone.

The wheel is built from a copy of the package's sources and installed into a fresh virtual
environment (its dependencies come from the package index), where the clients import, the
``propserve`` command answers, and ``propserve serve`` says in one line what to install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "propserve", "engine", "service", "clients")
#: Distributions of the server's stack, which a plain install must not bring.
SERVER_STACK = ("fastapi", "uvicorn", "pydantic", "pydantic-settings", "prometheus-client")


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, ".",
        cwd=source,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("propserve-*.whl")
    return wheel


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("venv") / "env"
    made = _run(sys.executable, "-m", "venv", folder, cwd=folder.parent)
    assert made.returncode == 0, made.stderr
    installed = _run(folder / "bin" / "python", "-m", "pip", "install", wheel, cwd=folder.parent)
    assert installed.returncode == 0, installed.stderr
    return folder


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    """pyproject.toml lists the packages by hand (the package-dir mapping needs it): a new
    folder left off the list would be missing from the wheel."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {"propserve"}
    for init in (ROOT / "propserve").glob("*/__init__.py"):  # the generated packages
        found.add(f"propserve.{init.parent.name}")
    for folder in ("engine", "service", "clients"):
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join(("propserve", *parts)))
    assert listed == found


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        top_level = archive.read(info).decode().split()
    assert top_level == ["propserve"]
    roots = {name.split("/")[0] for name in names}
    assert roots == {"propserve", info.split("/")[0]}
    for folder in ("engine", "service", "clients", "service/store", "v1", "oip"):
        assert f"propserve/{folder}/__init__.py" in names


def test_a_plain_install_is_the_clients_without_the_server_stack(venv: Path) -> None:
    python = venv / "bin" / "python"
    listed = _run(python, "-m", "pip", "list", "--format=freeze", cwd=venv)
    installed = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert "propserve" in installed
    assert {"numpy", "grpcio", "protobuf", "httpx"} <= installed
    assert installed.isdisjoint(SERVER_STACK), installed & set(SERVER_STACK)

    # Only propserve's own files, under propserve/ (and its command), were written.
    record = _run(python, "-m", "pip", "show", "--files", "propserve", cwd=venv).stdout
    files = record.split("Files:", 1)[1].split()
    assert files
    outside = [f for f in files if f.split("/")[0] not in ("propserve", "..")]
    assert [f for f in outside if not f.startswith("propserve-")] == []

    imported = _run(
        python,
        "-c",
        "from propserve.clients import AsyncGrpcClient, GrpcClient, RestClient; import sys; "
        "print(sorted(m for m in ('engine', 'service', 'clients') if m in sys.modules))",
        cwd=venv,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"
    for bare in ("engine", "service", "clients"):
        assert _run(python, "-c", f"import {bare}", cwd=venv).returncode != 0


def test_the_command_answers_and_serve_names_the_extra(venv: Path) -> None:
    command = venv / "bin" / "propserve"
    shown = _run(command, "--version", cwd=venv)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip().startswith("propserve ")
    refused = _run(command, "serve", cwd=venv)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "pip install 'propserve[server]'" in lines[0]
