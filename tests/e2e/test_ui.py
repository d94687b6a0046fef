"""The /ui page end to end: its files over plain HTTP, then the page itself in a headless
Chromium against the real server, trained through the real clients.

The browser tests drive Debian's ``chromium`` with its ``chromium-driver`` (``.ci/run``
installs both) through selenium, given the driver's path so that selenium never looks for
one on the network; they are skipped only when either binary is missing. Every check on the
page waits for it to come true (the page polls the API every second or few), with generous
timeouts; no check is on how long anything takes.
"""

from __future__ import annotations

import http.client
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from propserve.clients import GrpcClient, RestClient
from tests.support.server import ServerProcess, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium and chromedriver binaries (Debian: apt-get install chromium "
    "chromium-driver, as .ci/run does)",
)

#: How long a check on the page may wait: generous, for a loaded machine.
WAIT = 60.0

ASSETS = {
    "/ui": "text/html",
    "/ui/": "text/html",
    "/ui/index.html": "text/html",
    "/ui/app.js": "text/javascript",
    "/ui/style.css": "text/css",
}
TOKEN = "ui-admin-token-0123456789"

SPEC: dict[str, Any] = {
    "input_dim": 6,
    "layers": [{"units": 16, "activation": "tanh"}, {"units": 3, "activation": "softmax"}],
    "loss": "softmax_cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.1},
    "seed": 3,
}
X = np.random.default_rng(5).standard_normal((32, 6)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0)


# -- the files, over plain HTTP ----------------------------------------------------------------


def test_the_page_and_its_files_are_served_with_their_types(server: ServerProcess) -> None:
    for path, media_type in ASSETS.items():
        answer = httpx.get(server.rest_url + path, timeout=30)
        assert answer.status_code == 200, path
        assert answer.headers["content-type"].startswith(media_type), path
        assert answer.content, path
        assert "default-src 'self'" in answer.headers["content-security-policy"]
        assert answer.headers["x-content-type-options"] == "nosniff"
        again = httpx.get(
            server.rest_url + path, headers={"if-none-match": answer.headers["etag"]}, timeout=30
        )
        assert again.status_code == 304, path
        head = httpx.head(server.rest_url + path, timeout=30)
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers["content-length"] == str(len(answer.content)), path


def test_nothing_loads_from_another_origin(server: ServerProcess) -> None:
    for path in ASSETS:
        text = httpx.get(server.rest_url + path, timeout=30).text
        assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]", text, re.IGNORECASE), path
    page = httpx.get(server.rest_url + "/ui", timeout=30).text
    linked = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert sorted(linked) == ["/ui/app.js", "/ui/style.css", "data:,"]  # data:, no favicon


@pytest.mark.parametrize(
    "target",
    [
        "/ui/nope.js",
        "/ui/ui.py",
        "/ui/.keep",
        "/ui/../pyproject.toml",
        "/ui/../../pyproject.toml",
        "/ui/..%2F..%2Fpyproject.toml",
        "/ui/%2e%2e/ui.py",
        "/ui/..%5Cui.py",
        "/ui//etc/passwd",
        "/ui/%2Fetc%2Fpasswd",
        "/ui/app.js%00.html",
    ],
)
def test_other_paths_are_not_found(server: ServerProcess, target: str) -> None:
    # http.client sends the target as written: no client-side clean-up of "..".
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    try:
        connection.request("GET", target)
        answer = connection.getresponse()
        body = answer.read()
    finally:
        connection.close()
    assert answer.status == 404, (target, answer.status, body[:200])
    assert b"[build-system]" not in body and b"root:" not in body and b"import" not in body


# -- the page, in a browser --------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium and chromedriver binaries")
    from selenium import webdriver  # noqa: PLC0415 - only with a browser installed
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1200",
    ):
        options.add_argument(argument)
    # An explicit driver path: selenium's manager (which downloads drivers) never runs.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root: Path = tmp_path_factory.mktemp("secured")
    process = start_server(root / "store", env={"PROPSERVE_TOKENS": f"{TOKEN}=admin"})
    try:
        yield process
    finally:
        process.stop()


def until(driver: Any, condition: Callable[[Any], Any], what: str | Callable[[], str]) -> None:
    """Wait up to WAIT seconds for ``condition(driver)`` to be truthy; else fail saying
    ``what`` (called then, if a function) and what the status line says."""
    from selenium.common.exceptions import (  # noqa: PLC0415 - only with a browser installed
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    wait = WebDriverWait(
        driver, WAIT, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    )
    try:
        wait.until(condition)
    except TimeoutException:
        message = what() if callable(what) else what
        pytest.fail(f"{message} after {WAIT:.0f} s; status line: {read(driver, '#status')!r}")


def read(driver: Any, selector: str, attribute: str | None = None) -> str | None:
    """An element's text (or attribute), read in one script call so that the page's
    re-rendering cannot make it stale; None while there is no such element."""
    value = driver.execute_script(
        "const node = document.querySelector(arguments[0]);"
        "if (!node) return null;"
        "return arguments[1] ? node.getAttribute(arguments[1]) : node.textContent;",
        selector,
        attribute,
    )
    return None if value is None else str(value)


def shows(driver: Any, selector: str, expected: str, attribute: str | None = None) -> None:
    """Wait until ``selector``'s text (or ``attribute``) is ``expected``."""
    until(
        driver,
        lambda d: read(d, selector, attribute) == expected,
        lambda: (
            f"{selector} {attribute or 'text'} is {read(driver, selector, attribute)!r}, "
            f"not {expected!r}"
        ),
    )


def click(driver: Any, selector: str) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    def attempt(d: Any) -> bool:
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True

    until(driver, attempt, f"cannot click {selector}")


def history_points(server: ServerProcess, name: str, every: int) -> int:
    """How many points the API gives for the whole run with ``every``, page by page."""
    count, since = 0, 0
    while True:
        answer = httpx.get(
            f"{server.rest_url}/v1/models/{name}/history",
            params={"since": since, "every": every},
            timeout=30,
        )
        answer.raise_for_status()
        body = answer.json()
        count += len(body["points"])
        if body["next_since"] is None:
            return count
        since = body["next_since"]


def save_screenshot(driver: Any, folder: Path, name: str) -> Path:
    """A PNG of the window, in ``folder`` and in $PROPSERVE_TEST_ARTIFACTS if set."""
    png: bytes = driver.get_screenshot_as_png()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    path = folder / name
    path.write_bytes(png)
    artifacts = os.environ.get("PROPSERVE_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        (Path(artifacts) / name).write_bytes(png)
    return path


@needs_browser
def test_the_page_shows_a_model_its_live_curve_versions_and_labels(
    browser: Any, server: ServerProcess, tmp_path: Path
) -> None:
    name = "ui-curve"
    row = f'#models tr[data-model="{name}"]'
    with GrpcClient(server.grpc_target) as grpc, RestClient(server.rest_url) as rest:
        rest.create_model(name, SPEC)
        grpc.train(name, [(X, Y)] * 25)
        rest.save_version(name)
        model = rest.set_label(name, "stable", 1)

        browser.get(f"{server.rest_url}/ui")
        shows(browser, f"{row} td.head-step", "25")
        assert read(browser, f"{row} td.layers") == "6 → 16 tanh → 3 softmax"
        assert read(browser, f"{row} td.loss") == "softmax_cross_entropy"
        assert read(browser, f"{row} td.latest") == "v1"
        assert model.last_loss is not None
        assert float(read(browser, f"{row} td.last-loss") or "nan") == pytest.approx(
            model.last_loss, rel=1e-3
        )

        click(browser, f"{row} a")
        shows(browser, "#curve svg", "25", "data-points")  # one point a step
        shows(browser, '#versions tr[data-version="1"] td.labels', "stable")
        assert read(browser, '#versions tr[data-version="1"] td.step') == "25"
        assert "last loss" in (read(browser, '#versions tr[data-version="1"] td.metrics') or "")
        shows(browser, '#labels li[data-label="stable"]', "stable → version 1 (step 25)")
        shows(browser, '#curve svg circle.version[data-version="1"]', "1", "data-version")
        for series in ("loss", "accuracy"):
            drawn = read(browser, f"#curve svg polyline.{series}", "points") or ""
            assert len(drawn.split()) == 25, series

        for _ in range(15):  # the curve grows while the page is open
            rest.train_step(name, X, Y)
        shows(browser, "#curve svg", "40", "data-points")
        shows(browser, f"{row} td.head-step", "40")
        shows(browser, '#labels li[data-label="stable"]', "stable → version 1 (step 25)")
        assert read(browser, "#status", "data-state") == "ok"
        save_screenshot(browser, tmp_path, "ui.png")

        rest.rollback(name, label="stable")  # the history is cut back to step 25: so is the curve
        shows(browser, f"{row} td.head-step", "25")
        shows(browser, "#curve svg", "25", "data-points")
        for _ in range(5):
            rest.train_step(name, X, Y)
        shows(browser, "#curve svg", "30", "data-points")


@needs_browser
def test_a_long_run_is_drawn_in_buckets(browser: Any, server: ServerProcess) -> None:
    name = "ui-long"
    steps = 2500
    with GrpcClient(server.grpc_target) as grpc:
        grpc.create_model(name, SPEC)
        grpc.train(name, [(X[:4], Y[:4])] * steps)
    every = math.ceil(steps / 2000)  # the page's first load: at most about 2000 points
    expected = history_points(server, name, every)
    assert expected <= steps / every + 1

    browser.get(f"{server.rest_url}/ui#model={name}")  # a link to the model selects it
    shows(browser, "#curve svg", str(every), "data-every")
    shows(browser, "#curve svg", str(expected), "data-points")


@needs_browser
def test_polling_stops_while_the_tab_is_hidden(browser: Any, server: ServerProcess) -> None:
    name = "ui-hidden"
    with RestClient(server.rest_url) as rest:
        rest.create_model(name, SPEC)
        rest.train_step(name, X, Y)
    browser.get(f"{server.rest_url}/ui#model={name}")
    shows(browser, "#curve svg", "1", "data-points")
    browser.execute_script(
        "window.calls = [];"
        "const fetch = window.fetch;"
        "window.fetch = (path, init) => { window.calls.push(path); return fetch(path, init); };"
        "document.addEventListener('visibilitychange',"
        "  () => window.calls.push(document.visibilityState));"
    )
    page = browser.current_window_handle
    browser.switch_to.new_window("tab")  # another tab in front: the page is hidden
    try:
        time.sleep(3.5)  # more than three polls' time while hidden (a pause, not a check)
    finally:
        browser.close()
        browser.switch_to.window(page)

    def calls() -> list[str]:
        return list(browser.execute_script("return window.calls"))

    until(browser, lambda d: "/v1/models" in calls()[-4:], lambda: f"no poll again: {calls()}")
    log = calls()
    assert "hidden" in log and "visible" in log, log
    hidden = log[log.index("hidden") + 1 : log.index("visible")]
    # At most what one poll begun before the switch still asks; no new poll.
    assert "/v1/models" not in hidden, log
    assert sum("/history" in path for path in hidden) <= 1, log
    assert sum(path.endswith("/versions") for path in hidden) <= 1, log


@needs_browser
def test_with_tokens_the_page_asks_for_one(
    browser: Any, secured: ServerProcess, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.common.keys import Keys  # noqa: PLC0415

    with RestClient(secured.rest_url, token=TOKEN) as rest:
        rest.create_model("ui-secret", SPEC)
    browser.get(f"{secured.rest_url}/ui")
    shows(browser, "#status", "401", "data-status")
    assert "unauthenticated" in (read(browser, "#status") or "")
    assert read(browser, '#models tr[data-model="ui-secret"]') is None

    field = browser.find_element(By.ID, "token")
    field.send_keys("not-a-known-token-at-all" + Keys.ENTER)
    until(
        browser,
        lambda d: "unknown bearer token" in (read(d, "#status") or ""),
        "an unknown token is not refused in the status line",
    )
    field.clear()
    field.send_keys(TOKEN + Keys.ENTER)
    shows(browser, '#models tr[data-model="ui-secret"] td.head-step', "0")
    shows(browser, "#status", "ok", "data-state")
    stored = browser.execute_script("return sessionStorage.getItem('propserve.token')")
    assert stored == TOKEN
    save_screenshot(browser, tmp_path, "ui-token.png")
