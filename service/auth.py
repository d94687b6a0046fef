"""Bearer tokens and roles, the same for both transports.

Roles are ordered: ``predict`` may read models and predict; ``train`` may also train and save
versions; ``admin`` may do everything (create, delete, settings, labels, rollback). A token
holds one or more roles. Without any configured token, authentication is off (which the
server permits only on loopback, or with --insecure). Health checks are never authenticated.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from propserve.service.errors import InvalidArgument, PermissionDenied, Unauthenticated

ROLES = ("predict", "train", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}

#: The role each operation needs; both adapters use these operation names.
REQUIRED_ROLE: dict[str, str] = {
    "GetModel": "predict",
    "ListModels": "predict",
    "ListVersions": "predict",
    "Predict": "predict",
    "Evaluate": "predict",
    "ExportWeights": "predict",
    "GetHistory": "predict",
    "WatchHistory": "predict",
    "TrainStep": "train",
    "Train": "train",
    "SaveVersion": "train",
    "CreateModel": "admin",
    "DeleteModel": "admin",
    "UpdateModel": "admin",
    "SetLabel": "admin",
    "RemoveLabel": "admin",
    "Rollback": "admin",
    # The Open Inference Protocol (propserve.service.oip); its health and metadata are open.
    "ModelInfer": "predict",
    "RepositoryIndex": "predict",
    "RepositoryModelLoad": "admin",
    "RepositoryModelUnload": "admin",
}


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a token's name (its first 6 characters) and top role."""

    name: str
    role: str


def parse_tokens(text: str) -> dict[str, str]:
    """'token=role[+role]' entries separated by ';' or newlines -> {token: highest role}."""
    tokens: dict[str, str] = {}
    for raw in text.replace(";", "\n").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        token, sep, roles = line.partition("=")
        token = token.strip()
        names = [r.strip() for r in roles.split("+") if r.strip()]
        if not sep or not token or not names:
            raise InvalidArgument("token entries look like 'token=role' or 'token=role+role'")
        unknown = [r for r in names if r not in _RANK]
        if unknown:
            raise InvalidArgument(f"unknown role(s) {unknown}; roles are {', '.join(ROLES)}")
        if len(token) < 16:
            raise InvalidArgument("tokens must be at least 16 characters long")
        tokens[token] = max(names, key=_RANK.__getitem__)
    return tokens


def load_tokens(inline: str | None, file: Path | None) -> dict[str, str]:
    tokens = parse_tokens(inline) if inline else {}
    if file is not None:
        try:
            tokens |= parse_tokens(file.read_text())
        except OSError as exc:
            raise InvalidArgument(f"cannot read tokens file {file}: {exc.strerror}") from None
    return tokens


class Authenticator:
    """Checks a request's bearer token against the role its operation needs."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = dict(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def authorize(self, authorization: str | None, operation: str) -> Principal | None:
        """``authorization`` is the header value ('Bearer <token>'). Returns the principal
        (None when authentication is off); raises Unauthenticated or PermissionDenied."""
        if not self._tokens:
            return None
        if not authorization:
            raise Unauthenticated("missing bearer token (header 'authorization: Bearer ...')")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization header must be 'Bearer <token>'")
        role = None
        for known, known_role in self._tokens.items():
            # NOTE: constant-time comparison, so timing does not reveal token prefixes.
            if hmac.compare_digest(known.encode(), token.encode()):
                role = known_role
        if role is None:
            raise Unauthenticated("unknown bearer token")
        needed = REQUIRED_ROLE.get(operation, "admin")
        if _RANK[role] < _RANK[needed]:
            raise PermissionDenied(
                f"{operation} needs the role {needed!r}; this token has {role!r}"
            )
        return Principal(token[:6], role)
