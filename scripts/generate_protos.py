"""Regenerate the committed gRPC/protobuf Python code from proto/.

    .venv/bin/python scripts/generate_protos.py            # rewrite propserve/v1/*_pb2*.py[i]
    .venv/bin/python scripts/generate_protos.py --check    # exit 1 if the committed code is stale

Output goes to the ``propserve`` package's generated folders (``propserve/v1/``), shared by
the server and the clients; the package's other files are hand-written. Messages get .pyi
stubs from protoc; services get them from mypy-protobuf's plugin.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = "propserve"


def generate(out: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    subprocess.run(command, check=True)
    for folder in (p for p in (out / PACKAGE).rglob("*") if p.is_dir()):
        (folder / "__init__.py").touch()
    # The generated folders (one per proto package, e.g. propserve/v1) are this script's;
    # the rest of the propserve package is hand-written.
    return sorted(p.relative_to(out) for p in (out / PACKAGE).rglob("*/*") if p.is_file())


def generated_folders(files: list[Path]) -> list[Path]:
    """The package's folders the script owns: the first level below it holding ``files``."""
    return sorted({Path(*f.parts[:2]) for f in files})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if args.check:
            committed = sorted(
                p.relative_to(ROOT)
                for folder in generated_folders(files)
                for p in (ROOT / folder).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            )
            stale = [
                str(f)
                for f in files
                if not (ROOT / f).exists()
                or not filecmp.cmp(Path(tmp) / f, ROOT / f, shallow=False)
            ]
            stale += [str(f) for f in committed if f not in files]
            if stale:
                print("stale generated code (run scripts/generate_protos.py):", *stale, sep="\n  ")
                return 1
            return 0
        for folder in generated_folders(files):
            shutil.rmtree(ROOT / folder, ignore_errors=True)
        for f in files:
            (ROOT / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / f, ROOT / f)
        print(*files, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
