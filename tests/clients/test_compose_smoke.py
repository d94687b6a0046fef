"""scripts/compose-smoke.sh says in one line what is missing when it has no usable Python,
before it touches docker (its PATH here has no docker at all, so nothing can start)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compose-smoke.sh"


def run(python: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(python), "HOME": str(python.parent)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("which", ["missing", "without the clients"])
def test_no_usable_python_is_one_line_with_a_hint(tmp_path: Path, which: str) -> None:
    if which == "missing":
        python = tmp_path / "nowhere" / "python"
    else:
        venv = tmp_path / "bare"
        made = subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        python = venv / "bin" / "python"
    done = run(python)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"FAIL  no usable Python at {python} (it needs propserve's clients): run python3 -m "
        f"venv .venv && .venv/bin/pip install -e . in {ROOT}, or set PYTHON=/path/to/python",
        "0 passed, 1 failed",
    ]


def test_the_scripts_python_imports_the_clients_by_their_installed_name() -> None:
    bare = re.compile(r"^\s*(from|import)\s+(engine|service|clients)\b", re.MULTILINE)
    text = SCRIPT.read_text()
    assert "from propserve.clients import" in text
    assert bare.findall(text) == []
