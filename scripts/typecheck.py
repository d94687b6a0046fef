"""Type-check the tree as it installs: ``.venv/bin/python scripts/typecheck.py [mypy args]``.

The wheel maps engine/, service/ and clients/ into the propserve package (pyproject.toml's
package-dir); mypy reads packages from folders, so this script builds that layout as a tree
of links under build/typecheck and runs mypy with it first on the search path, over the
propserve package, tests/ and bench/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"
MAPPED = {"engine": "engine", "service": "service", "clients": "clients"}


def link_tree() -> Path:
    """build/typecheck/propserve: links to propserve/'s entries and to the mapped folders."""
    package = TREE / "propserve"
    shutil.rmtree(TREE, ignore_errors=True)
    package.mkdir(parents=True)
    for entry in (ROOT / "propserve").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        (package / name).symlink_to(ROOT / folder, target_is_directory=True)
    return TREE


def main() -> int:
    tree = link_tree()
    env = {**os.environ, "MYPYPATH": str(tree)}
    command = [
        sys.executable,
        "-m",
        "mypy",
        str(tree / "propserve"),
        "tests",
        "bench",
        *sys.argv[1:],
    ]
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
