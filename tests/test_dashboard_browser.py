"""The real dashboard in a real browser: waitress on loopback, Debian's headless Chromium via selenium.

Logs in, opens the overview, an experiment and the registry, checks that every Plotly chart holds
data, that the console shows no errors and that nothing is fetched from outside the app, and
saves screenshots to docs/screenshots/ for the README.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from abrec.dashboard.app import create_app
from dashboard_seed import EXPERIMENT, PASSWORDS, seed

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]

# Points per chart: the longest data array of each trace, summed over the traces of each plot.
CHART_POINTS_JS = """
return Array.from(document.querySelectorAll('.js-plotly-plot')).map(div => ({
  id: div.id,
  points: (div.data || []).map(t => Math.max(0, ...['x', 'y', 'values'].map(k => (t[k] || []).length)))
                          .reduce((a, b) => a + b, 0),
}));
"""

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def driver():
    if not (CHROMIUM and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs chromium and chromium-driver (apt-get install chromium chromium-driver)")
        pytest.skip("Debian's chromium / chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="abrec-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    from waitress import create_server

    url = f"sqlite:///{tmp_path_factory.mktemp('browser') / 'abrec.db'}"
    seed(url)
    server = create_server(create_app(url, secret_key="browser-test"), host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver, name: str) -> Path:
    """A full-page PNG (window grown to the page, capped) under docs/screenshots/, checked not blank."""
    height = driver.execute_script(
        "return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)")
    # The window is taller than its viewport by the browser's own frame (about 75 px headless).
    driver.set_window_size(1400, min(max(height + 100, 800), 6000))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path))
    try:
        from PIL import Image, ImageStat
    except ImportError:  # without Pillow, a blank page still compresses to almost nothing
        assert path.stat().st_size > 30_000, f"{path} looks blank"
    else:
        with Image.open(path) as image:
            spread = ImageStat.Stat(image.convert("L")).stddev[0]
        assert spread > 10, f"{path} looks blank (pixel standard deviation {spread:.1f})"
    driver.set_window_size(1400, 1000)
    return path


def visit(driver, url: str, min_charts: int) -> list[dict]:
    driver.get(url)
    assert "Log in" not in driver.title, f"{url} bounced to the login page"
    charts = driver.execute_script(CHART_POINTS_JS)
    assert len(charts) >= min_charts, (url, charts)
    empty = [c["id"] for c in charts if c["points"] == 0]
    assert not empty, f"charts without data on {url}: {empty}"
    assert console_errors(driver) == [], url
    return charts


def test_main_pages_in_a_real_browser(driver, base_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base_url + "/")
    assert "/login" in driver.current_url
    driver.find_element(By.NAME, "username").send_keys("editor")
    driver.find_element(By.NAME, "password").send_keys(PASSWORDS["editor"])
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # click() does not wait for the navigation it starts (scrypt makes the login POST take a while).
    WebDriverWait(driver, 30).until(lambda d: "/login" not in d.current_url)
    assert driver.current_url.rstrip("/") == base_url

    visit(driver, base_url + "/", min_charts=0)
    page = driver.find_element(By.TAG_NAME, "main").text
    assert "TRON vs SASRec on the product page" in page and "gru4rec-baseline" in page
    screenshot(driver, "overview")

    charts = visit(driver, f"{base_url}/experiments/{EXPERIMENT}", min_charts=7)
    assert {"chart-lift", "chart-daily-ctr", "chart-novelty", "chart-srm", "chart-power", "chart-latency",
            "chart-fallback"} <= {c["id"] for c in charts}
    assert driver.execute_script("return typeof window.Plotly") == "object"
    screenshot(driver, "experiment")

    visit(driver, base_url + "/registry", min_charts=2)
    screenshot(driver, "registry")

    # Everything the pages loaded came from the app itself: the dashboard works offline.
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(base_url) for r in resources), resources
    assert console_errors(driver) == []
