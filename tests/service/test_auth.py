"""Bearer tokens and roles: parsing token lists, and authorising an operation."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest

from propserve.service.auth import REQUIRED_ROLE, Authenticator, load_tokens, parse_tokens
from propserve.service.errors import InvalidArgument, PermissionDenied, Unauthenticated

PREDICT = "p" * 16
TRAIN = "t" * 20
ADMIN = "a-long-admin-token-0123456789"

OPERATIONS = {
    "predict": [
        "GetModel",
        "ListModels",
        "ListVersions",
        "Predict",
        "Evaluate",
        "ExportWeights",
        "GetHistory",
        "WatchHistory",
        "ModelInfer",
        "RepositoryIndex",
    ],
    "train": ["TrainStep", "Train", "SaveVersion"],
    "admin": [
        "CreateModel",
        "DeleteModel",
        "UpdateModel",
        "SetLabel",
        "RemoveLabel",
        "Rollback",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    ],
}


@pytest.fixture
def authenticator() -> Authenticator:
    return Authenticator({PREDICT: "predict", TRAIN: "train", ADMIN: "admin"})


def test_parse_tokens() -> None:
    text = f"""
        # comment line
        {PREDICT}=predict
        {TRAIN} = train   # trailing comment
        {ADMIN}=predict+admin;{"x" * 16}=train+predict
    """
    assert parse_tokens(text) == {
        PREDICT: "predict",
        TRAIN: "train",
        ADMIN: "admin",
        "x" * 16: "train",
    }
    assert parse_tokens("") == {}
    assert parse_tokens("  # nothing\n;;\n") == {}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (PREDICT, "look like"),
        (f"{PREDICT}=", "look like"),
        ("=admin", "look like"),
        (f"{PREDICT}=root", "unknown role"),
        (f"{PREDICT}=predict+superuser", "unknown role"),
        ("short=admin", "at least 16"),
    ],
)
def test_parse_tokens_refuses_malformed_entries(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_tokens(text)


def test_load_tokens_merges_inline_and_file(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text(f"{TRAIN}=train\n{PREDICT}=admin\n")
    assert load_tokens(f"{PREDICT}=predict", file) == {PREDICT: "admin", TRAIN: "train"}
    assert load_tokens(None, None) == {}
    with pytest.raises(InvalidArgument, match="cannot read tokens file"):
        load_tokens(None, tmp_path / "missing")


def test_every_operation_needs_a_known_role() -> None:
    assert {op: role for role, ops in OPERATIONS.items() for op in ops} == REQUIRED_ROLE


def test_roles_are_ordered(authenticator: Authenticator) -> None:
    tokens = {"predict": PREDICT, "train": TRAIN, "admin": ADMIN}
    ranks = ["predict", "train", "admin"]
    for have in ranks:
        for need, operations in OPERATIONS.items():
            for operation in operations:
                header = f"Bearer {tokens[have]}"
                if ranks.index(have) >= ranks.index(need):
                    principal = authenticator.authorize(header, operation)
                    assert principal is not None
                    assert principal.role == have
                    assert principal.name == tokens[have][:6]
                else:
                    with pytest.raises(PermissionDenied, match=f"needs the role '{need}'"):
                        authenticator.authorize(header, operation)


def test_unknown_operations_need_admin(authenticator: Authenticator) -> None:
    with pytest.raises(PermissionDenied):
        authenticator.authorize(f"Bearer {TRAIN}", "SomethingNew")
    assert authenticator.authorize(f"Bearer {ADMIN}", "SomethingNew") is not None


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (None, "missing bearer token"),
        ("", "missing bearer token"),
        (PREDICT, "must be 'Bearer <token>'"),
        (f"Basic {PREDICT}", "must be 'Bearer <token>'"),
        ("Bearer", "must be 'Bearer <token>'"),
        ("Bearer    ", "must be 'Bearer <token>'"),
        ("Bearer not-a-known-token-at-all", "unknown bearer token"),
        (f"Bearer {PREDICT}x", "unknown bearer token"),
        (f"Bearer {PREDICT[:-1]}", "unknown bearer token"),
        (f"Bearer {PREDICT.upper()}", "unknown bearer token"),
    ],
)
def test_bad_credentials(authenticator: Authenticator, header: str | None, match: str) -> None:
    with pytest.raises(Unauthenticated, match=match):
        authenticator.authorize(header, "Predict")


def test_scheme_is_case_insensitive_and_whitespace_tolerated(authenticator: Authenticator) -> None:
    for header in (f"bearer {PREDICT}", f"BEARER {PREDICT}", f"  Bearer   {PREDICT}  "):
        principal = authenticator.authorize(header, "Predict")
        assert principal is not None
        assert principal.role == "predict"


def test_no_tokens_means_no_authentication() -> None:
    open_door = Authenticator({})
    assert not open_door.enabled
    assert open_door.authorize(None, "DeleteModel") is None
    assert open_door.authorize("Bearer whatever", "CreateModel") is None
    assert Authenticator({PREDICT: "predict"}).enabled


def test_tokens_are_compared_in_constant_time(
    authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert authenticator.authorize(f"Bearer {TRAIN}", "Predict") is not None
    # Every known token is compared (no early exit on a match), each with compare_digest.
    assert sorted(a for a, _ in calls) == sorted(t.encode() for t in (PREDICT, TRAIN, ADMIN))
    assert all(b == TRAIN.encode() for _, b in calls)
    calls.clear()
    with pytest.raises(Unauthenticated):
        authenticator.authorize("Bearer nobody-knows-this-token", "Predict")
    assert len(calls) == 3
