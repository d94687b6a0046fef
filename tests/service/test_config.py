"""Server settings: defaults, PROPSERVE_* environment variables, validators, and the
loopback detection that decides whether the server may run without tokens."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from propserve.service.auth import Authenticator
from propserve.service.config import Settings, describe, is_loopback, unknown_variables
from propserve.service.errors import FailedPrecondition
from propserve.service.server import _check_exposure


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: start every test without PROPSERVE_* variables."""
    import os  # noqa: PLC0415 - only here

    for key in list(os.environ):
        if key.startswith("PROPSERVE_"):
            monkeypatch.delenv(key)


def test_defaults_are_safe() -> None:
    settings = Settings()
    assert settings.store == Path("models")
    assert (settings.rest_host, settings.rest_port) == ("127.0.0.1", 8000)
    assert (settings.grpc_host, settings.grpc_port) == ("127.0.0.1", 50051)
    assert settings.tokens is None
    assert settings.tokens_file is None
    assert settings.insecure is False
    assert settings.tls_cert is None
    assert settings.loopback_only


def test_every_field_is_documented() -> None:
    undocumented = [n for n, f in Settings.model_fields.items() if not f.description]
    assert undocumented == []


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROPSERVE_STORE", str(tmp_path / "s"))
    monkeypatch.setenv("PROPSERVE_REST_PORT", "0")
    monkeypatch.setenv("PROPSERVE_GRPC_HOST", "::1")
    monkeypatch.setenv("PROPSERVE_MAX_ROWS", "12")
    monkeypatch.setenv("PROPSERVE_INSECURE", "true")
    monkeypatch.setenv("PROPSERVE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("PROPSERVE_TOKENS", "secret-token-0123456789=admin")
    settings = Settings()
    assert settings.store == tmp_path / "s"
    assert settings.rest_port == 0
    assert settings.grpc_host == "::1"
    assert settings.max_rows == 12
    assert settings.insecure is True
    assert settings.log_level == "debug"
    assert settings.tokens is not None
    assert settings.tokens.get_secret_value() == "secret-token-0123456789=admin"
    assert "secret-token" not in repr(settings)


def test_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPSERVE_MAX_PARAMS", "100")
    assert Settings().max_params == 100
    assert Settings(max_params=200).max_params == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rest_port", -1),
        ("grpc_port", 65536),
        ("max_message_bytes", 1023),
        ("max_rows", 0),
        ("max_params", 0),
        ("default_retain", 0),
        ("default_autosave_every", -1),
        ("version_cache", -1),
        ("grace_seconds", -0.5),
        ("blas_threads", 0),
        ("log_level", "verbose"),
        ("no_such_setting", 1),
    ],
)
def test_validators(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_bad_environment_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPSERVE_MAX_ROWS", "many")
    with pytest.raises(ValidationError, match="max_rows"):
        Settings()


def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        Settings(tls_cert=tmp_path / "cert.pem")
    with pytest.raises(ValidationError, match="go together"):
        Settings(tls_key=tmp_path / "key.pem")
    both = Settings(tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem")
    assert both.tls_key == tmp_path / "key.pem"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("[::]", False),
        ("192.0.2.10", False),
        ("198.51.100.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_loopback_only_needs_both_transports_on_loopback() -> None:
    assert Settings(rest_host="::1", grpc_host="localhost").loopback_only
    assert not Settings(rest_host="0.0.0.0").loopback_only
    assert not Settings(grpc_host="0.0.0.0").loopback_only


def test_exposure_beyond_loopback_needs_tokens_or_insecure() -> None:
    wide = Settings(rest_host="0.0.0.0")
    with pytest.raises(FailedPrecondition, match="beyond loopback"):
        _check_exposure(wide, Authenticator({}))
    _check_exposure(wide, Authenticator({"0123456789abcdef": "admin"}))
    _check_exposure(Settings(rest_host="0.0.0.0", insecure=True), Authenticator({}))
    _check_exposure(Settings(), Authenticator({}))


def test_unknown_variables_are_the_prefixed_names_of_no_setting() -> None:
    environ = {
        "PROPSERVE_REST_PORT": "1",
        "PROPSERVE_REST_POTR": "1",  # misspelt
        "PROPSERVE_TOKEN": "the clients' own",
        "PROPSERVE_": "",
        "HOME": "/root",
        "propserve_lowercase": "not ours",
    }
    assert unknown_variables(environ) == ["PROPSERVE_", "PROPSERVE_REST_POTR"]


def test_describe_names_each_setting_and_never_quotes_a_secret() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(rest_port="abc", log_level="loud", tokens=12345678901)
    lines = describe(refused.value).splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("rest_port (PROPSERVE_REST_PORT): ") and "(got 'abc')" in lines[0]
    assert lines[1].startswith("tokens (PROPSERVE_TOKENS): ")
    assert "12345678901" not in describe(refused.value)
    assert lines[2] == (
        "log_level (PROPSERVE_LOG_LEVEL): log_level must be debug, info, warning or error "
        "(got 'loud')"
    )

    with pytest.raises(ValidationError) as refused:
        Settings(tls_cert=Path("cert.pem"))
    assert describe(refused.value) == "tls_cert and tls_key go together"


def test_every_setting_is_a_serve_flag_with_its_help() -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    shown = subprocess.run(
        [sys.executable, "-m", "propserve", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "1000", "PATH": ""},
    ).stdout
    # Each option's entry: its line and the help that follows, up to the next option.
    entries = {
        entry.split()[0].rstrip(","): " ".join(entry.split())
        for entry in re.split(r"\n(?=  -)", shown.split("options:", 1)[1])
        if entry.strip()
    }
    for name, field in Settings.model_fields.items():
        entry = entries["--" + name.replace("_", "-")]
        assert f"[PROPSERVE_{name.upper()}]" in entry, entry
        assert " ".join(str(field.description).split())[:30] in entry, entry


def test_a_flag_wins_over_its_variable(tmp_path: Path) -> None:
    import argparse  # noqa: PLC0415

    from propserve.service.cli import add_serve  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers(), "test")
    args = parser.parse_args(["serve", "--rest-port", "9", "--no-tune-heap"])
    overrides = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    assert overrides == {"rest_port": 9, "tune_heap": False}
