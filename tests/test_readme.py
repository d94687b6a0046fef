"""The README stays true: its commands are CI's, and every setting is documented."""

from __future__ import annotations

from pathlib import Path

from propserve.service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    commands = [line.strip() for line in README.splitlines() if line.startswith("    python3")]
    serve, test = commands[:2]
    assert serve.endswith("propserve serve")
    assert test.endswith("python -m pytest")
    assert test in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = [
        name for name in Settings.model_fields if f"`PROPSERVE_{name.upper()}`" not in README
    ]
    assert not missing, f"README lacks settings {missing}"
