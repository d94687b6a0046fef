"""The docs stay true: the README's commands are CI's, the tables generated from the code are
fresh, every file and link they name exists, and every log event and metric the server emits
is documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from propserve.service.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    commands = [line.strip() for line in README.splitlines() if line.startswith("    python3")]
    serve, test = commands[:2]
    assert serve.endswith("propserve serve")
    assert test.endswith("python -m pytest")
    assert test in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_a_guide_not_a_notebook() -> None:
    assert len(README.splitlines()) <= 250


def test_the_generated_tables_are_fresh() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_docs.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub writes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_local_link_and_anchor_exists(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no anchor {target}"


def test_every_docs_link_in_the_code_exists() -> None:
    links = set()
    for folder in ("service", "engine", "clients", "propserve", "bench", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            links |= set(re.findall(r"docs/([a-z_-]+\.md)#([a-z0-9_-]+)", path.read_text()))
    assert links
    for page, anchor in sorted(links):
        headings = re.findall(r"^#+ (.+)$", (ROOT / "docs" / page).read_text(), re.MULTILINE)
        assert anchor in {_slug(h) for h in headings}, f"docs/{page}#{anchor}"


def test_every_file_the_architecture_names_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(
        re.findall(r"((?:service|engine|clients|propserve|scripts|tests)/[\w/]+\.py)", text)
    )
    assert len(named) > 10
    missing = []
    for path in named:
        candidates = [ROOT / path, ROOT / "service" / path, ROOT / "engine" / path]
        if not any(candidate.exists() for candidate in candidates):
            missing.append(path)
    assert missing == []


def _events_in_code() -> set[str]:
    events = set()
    for path in (ROOT / "service").rglob("*.py"):
        events |= set(re.findall(r'log\.\w+\(\s*"([a-z_]+\.[a-z_.]+)"', path.read_text()))
    return events


def test_every_log_event_is_documented() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    events = _events_in_code()
    assert len(events) > 15
    assert sorted(e for e in events if f"`{e}`" not in operations) == []


def test_every_metric_is_documented() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    families = {
        line.split()[2]
        for line in Metrics().render().decode().splitlines()
        if line.startswith("# TYPE ") and not line.split()[2].endswith("_created")
    }
    assert len(families) >= 10
    undocumented = [
        name
        for name in families
        if f"`{name}`" not in operations and f"`{name}_total`" not in operations
    ]
    assert undocumented == []
