"""propserve: a model server whose models keep learning.

Everything imports from this one namespace: ``propserve.clients`` (the Python clients),
``propserve.engine`` (the NumPy networks), ``propserve.service`` (the server, with the
``server`` extra), ``propserve.wire`` (the contract both sides share) and ``propserve.v1``
(the generated gRPC code).
"""

from __future__ import annotations

from pathlib import Path

# A source checkout keeps engine/, service/ and clients/ beside this folder, where the wheel
# puts them inside it (pyproject.toml's package-dir): let them import as propserve.* from
# there too, so the tree runs without being installed.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "proto" / "propserve").is_dir() and (_checkout / "service").is_dir():
    __path__.append(str(_checkout))
del _checkout, Path
