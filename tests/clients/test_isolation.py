"""clients/ speaks only the wire: it imports nothing from service/ or engine/.

Two proofs: a child process in which those packages cannot be imported at all imports every
module of clients/ and builds each client; and a static look at every import in clients/.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("service", "engine")

CHILD = r"""
import asyncio, importlib, importlib.abc, json, pkgutil, sys

FORBIDDEN = ("service", "engine")

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"{name} is off limits to clients/")
        return None

sys.meta_path.insert(0, Refuse())
for name in list(sys.modules):
    if name.split(".")[0] in FORBIDDEN:
        del sys.modules[name]

# The guard works: the forbidden packages really are unimportable here.
for name in FORBIDDEN:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} was importable: the guard does not work")

import clients

modules = ["clients"]
for info in pkgutil.walk_packages(clients.__path__, "clients."):
    importlib.import_module(info.name)
    modules.append(info.name)

from clients import AsyncGrpcClient, AsyncRestClient, GrpcClient, RestClient

with GrpcClient("127.0.0.1:1", token="t" * 16, timeout=1.0):
    pass
with RestClient("http://127.0.0.1:1", token="t" * 16, timeout=1.0):
    pass

async def build():
    async with AsyncGrpcClient("127.0.0.1:1"), AsyncRestClient("http://127.0.0.1:1"):
        pass

asyncio.run(build())
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
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
        "clients." + path.stem
        for path in (ROOT / "clients").glob("*.py")
        if path.stem != "__init__"
    }
    assert expected <= set(report["modules"]), sorted(expected - set(report["modules"]))


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute module an import statement in ``path`` names, with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
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


def test_no_import_in_clients_names_service_or_engine() -> None:
    files = sorted((ROOT / "clients").rglob("*.py"))
    assert len(files) >= 5, files
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in files
        for line, module in _imports(path)
        if module.split(".")[0] in FORBIDDEN
    ]
    assert offending == []
    # The check sees imports at all (it would not pass vacuously).
    assert any(m == "grpc" for _, m in _imports(ROOT / "clients" / "grpc_client.py"))


def test_the_static_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom engine.network import forward\n"
        "def f():\n    import service.core\n    importlib.import_module('engine')\n"
    )
    modules = [m for _, m in _imports(sample) if m.split(".")[0] in FORBIDDEN]
    assert modules == ["engine.network", "service.core", "engine"]
