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
# (Imported through a link, as editable installs may, the folder itself is added first.)
_here = Path(__file__).resolve().parent
_checkout = _here.parent
if (_checkout / "proto" / "propserve").is_dir() and (_checkout / "service").is_dir():
    __path__ += [str(folder) for folder in (_here, _checkout) if str(folder) not in __path__]
del _here, _checkout, Path
