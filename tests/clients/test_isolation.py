"""The import rules between the parts, checked on the code itself.

- propserve.clients speaks only the wire: it imports nothing from propserve.service or
  propserve.engine (a child process in which those cannot be imported at all imports every
  module of the clients and builds each client; and a static look at every import).
- propserve.service does not import propserve.clients: the ``propserve`` command composes
  both (propserve/cli.py).
- Nothing imports the folders by their bare names (engine, service, clients): the one
  namespace is propserve.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OFF_LIMITS_TO_CLIENTS = ("propserve.service", "propserve.engine")
BARE = ("engine", "service", "clients")

CHILD = r"""
import asyncio, importlib, importlib.abc, json, pkgutil, sys

FORBIDDEN = ("propserve.service", "propserve.engine")

def forbidden(name):
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if forbidden(name):
            raise ImportError(f"{name} is off limits to the clients")
        return None

sys.meta_path.insert(0, Refuse())

# The guard works: the forbidden packages really are unimportable here.
for name in FORBIDDEN:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} was importable: the guard does not work")

import propserve.clients as clients

modules = ["propserve.clients"]
for info in pkgutil.walk_packages(clients.__path__, "propserve.clients."):
    importlib.import_module(info.name)
    modules.append(info.name)

from propserve.clients import AsyncGrpcClient, AsyncRestClient, GrpcClient, RestClient

with GrpcClient("127.0.0.1:1", token="t" * 16, timeout=1.0):
    pass
with RestClient("http://127.0.0.1:1", token="t" * 16, timeout=1.0):
    pass

async def build():
    async with AsyncGrpcClient("127.0.0.1:1"), AsyncRestClient("http://127.0.0.1:1"):
        pass

asyncio.run(build())
loaded = sorted(m for m in sys.modules if forbidden(m))
print(json.dumps({"modules": modules, "forbidden_loaded": loaded}))
"""


def test_clients_import_and_build_with_service_and_engine_unimportable() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["forbidden_loaded"] == []
    expected = {
        "propserve.clients." + ".".join(path.relative_to(ROOT / "clients").with_suffix("").parts)
        for path in (ROOT / "clients").rglob("*.py")
        if path.stem != "__init__"
    }
    assert expected <= set(report["modules"]), sorted(expected - set(report["modules"]))


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in ``path`` names, with its line; relative imports
    come back with their leading dots."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _offending(folder: str, packages: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module in _imports(path)
        if _within(module, packages)
    ]


def test_no_import_in_clients_names_service_or_engine() -> None:
    assert len(list((ROOT / "clients").rglob("*.py"))) >= 5
    assert _offending("clients", OFF_LIMITS_TO_CLIENTS) == []
    # The check sees imports at all (it would not pass vacuously).
    assert any(m == "grpc" for _, m in _imports(ROOT / "clients" / "grpc_client.py"))


def test_the_server_does_not_import_the_clients() -> None:
    assert _offending("service", ("propserve.clients",)) == []


def test_nothing_imports_the_bare_folder_names_or_relatively() -> None:
    folders = ("engine", "service", "clients", "propserve", "tests", "bench", "scripts")
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "v1" not in path.relative_to(ROOT).parts  # generated
        for line, module in _imports(path)
        if _within(module, BARE) or module.startswith(".")
    ]
    assert offending == []


def test_the_static_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom propserve.engine.network import forward\nfrom . import x\n"
        "def f():\n    import engine.core\n    importlib.import_module('propserve.service')\n"
    )
    modules = [m for _, m in _imports(sample)]
    assert [m for m in modules if _within(m, OFF_LIMITS_TO_CLIENTS)] == [
        "propserve.engine.network",
        "propserve.service",
    ]
    assert [m for m in modules if _within(m, BARE) or m.startswith(".")] == [".", "engine.core"]
