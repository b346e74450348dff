"""The status page in headless Chromium (Debian's chromium and chromium-driver, driven by Selenium).

A real daemon watches a temporary model repository; the test publishes a new version the way an operator does and
watches the page pick it up, then classifies an image through the page's file box.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import REPO, DaemonThread, running_daemon
from tests.support.repository import DIGIT_LABELS

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (.ci/run installs them: "
                              "apt-get install chromium chromium-driver)"),
    pytest.mark.timeout(300),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(REPO / "models" / "digits", root / "digits")
    return root


@pytest.fixture
def daemon(models: Path) -> Iterator[DaemonThread]:
    with running_daemon(models, http_port=0, settle_s=0.2) as running:
        yield running


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1300,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def text(driver: webdriver.Chrome, selector: str) -> str:
    """The text of the first element matching ``selector`` now ('' if none); immune to the page re-rendering."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
                                 selector)


def wait_for_text(driver: webdriver.Chrome, selector: str, words: str, timeout: float = 60) -> str:
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: words in text(d, selector),
                                                             f"{selector!r} never showed {words!r}")
    return text(driver, selector)


def publish(model_dir: Path, version: int) -> None:
    """Publish a version as operators should: write it next to the model, then rename it into place."""
    staging = model_dir / f".staging-{version}"
    shutil.copytree(model_dir / "1", staging)
    staging.rename(model_dir / str(version))


def test_page_lists_models_shows_a_new_version_and_classifies_a_dropped_image(
        daemon: DaemonThread, models: Path, browser: webdriver.Chrome, tmp_path: Path) -> None:
    assert daemon.daemon is not None
    browser.get(f"http://127.0.0.1:{daemon.daemon.http_port}/")
    digits = 'article[data-model="digits"]'
    assert "serving v1" in wait_for_text(browser, f"{digits} .serving-version", "serving v1")
    assert "default" in text(browser, f"{digits} h3")
    assert "digits v1 READY now serving" in wait_for_text(browser, "#events", "digits v1")
    assert text(browser, "#classify-model") == "digits"

    publish(models / "digits", 2)
    wait_for_text(browser, f"{digits} .serving-version", "serving v2")
    assert "digits v2 READY now serving" in wait_for_text(browser, "#events", "digits v2 READY")

    image, truth = held_out_digits()[0][3], held_out_digits()[1][3]
    path = tmp_path / "digit.png"
    path.write_bytes(png_bytes(image))
    browser.find_element("id", "classify-file").send_keys(str(path))
    summary = wait_for_text(browser, "#classify-result .summary", "digits v2")
    assert "digit.png" in summary and "batch 1" in summary
    labels = browser.execute_script(
        "return [...document.querySelectorAll('#classify-result tr.prediction td.label')].map(e => e.textContent);")
    assert len(labels) == 3 and labels[0] == DIGIT_LABELS[truth]  # the manifest's top_k, best first
    wait_for_text(browser, f'{digits} [data-metric="requests"] b', "1")  # the live statistics counted it
    assert text(browser, f'{digits} [data-metric="p50"] b') != "–"
    screenshot = Path(os.environ.get("CLASSIFYD_SCREENSHOT", tmp_path / "status-page.png"))
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
