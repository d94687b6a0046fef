"""Create MLServer's own virtual environment for bench/peers/compare.py; idempotent.

    python3 bench/peers/setup_mlserver.py     # makes .venv-mlserver at the repository root

MLServer gets a venv of its own because its pins (protobuf, fastapi, starlette, uvicorn)
differ from propserve's. A venv that already has the pinned versions is left as it is. It
lives outside bench/, whose every .py file tests/clients/test_isolation.py reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

VENV = Path(__file__).resolve().parent.parent.parent / ".venv-mlserver"
PINS = {
    "mlserver": "1.7.1",
    # NOTE: with a newer uvloop, MLServer 1.7.1's worker process dies at start.
    "uvloop": "0.21.0",
}


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def installed(env: Path) -> dict[str, str | None]:
    """The versions of the pinned packages in ``env`` (None: missing)."""
    script = (
        "import importlib.metadata as m, json, sys\n"
        "def version(name):\n"
        "    try:\n"
        "        return m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(json.dumps({n: version(n) for n in sys.argv[1:]}))\n"
    )
    done = subprocess.run(
        [str(python_of(env)), "-c", script, *PINS],
        check=True,
        capture_output=True,
        text=True,
    )
    versions: dict[str, str | None] = json.loads(done.stdout)
    return versions


def main() -> int:
    if not python_of(VENV).exists():
        print(f"creating {VENV}")
        venv.create(VENV, with_pip=True, clear=True)
    if installed(VENV) == PINS:
        print(f"{VENV}: mlserver {PINS['mlserver']} is installed")
        return 0
    requirements = [f"{name}=={version}" for name, version in PINS.items()]
    print(f"installing {' '.join(requirements)} into {VENV}")
    subprocess.run(
        [str(python_of(VENV)), "-m", "pip", "install", "--quiet", *requirements], check=True
    )
    found = installed(VENV)
    if found != PINS:
        print(f"{VENV}: expected {PINS}, found {found}", file=sys.stderr)
        return 1
    subprocess.run([str(VENV / "bin" / "mlserver"), "--version"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
