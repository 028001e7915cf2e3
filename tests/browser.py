"""Headless Debian Chromium, driven by Selenium through Debian's chromedriver, for the
browser peer's tests. Nothing here downloads a browser or a driver: where either is
missing, the tests that need them skip and say why (CI installs both, see .ci/run)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from processes import ROOT

APP = ROOT / "peer" / "browser"
WORDS = ROOT / "peer" / "words" / "eff_large.txt"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# Chromium's own network traffic (updates, sync, safe browsing) has nowhere to go here,
# and as root it needs --no-sandbox.
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-features=Translate,MediaRouter",
)


@functools.cache
def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install {package})"
    return None


@contextlib.contextmanager
def chromium(downloads: Path | None = None, *, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A fresh headless Chromium (own empty profile); downloads land in ``downloads``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if downloads is not None:
        options.add_experimental_option("prefs", {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        })
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_script_timeout(120)
        if downloads is not None:
            driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                                   {"behavior": "allow", "downloadPath": str(downloads)})
        yield driver
    finally:
        driver.quit()


class ScriptError(AssertionError):
    pass


def run_js(driver: Any, body: str, *args: Any) -> Any:
    """Run ``body`` as an async function in the page (``args`` as ``args``) and return
    its result, which must be JSON-serialisable; a throw becomes ScriptError."""
    script = (
        "const done = arguments[arguments.length - 1];"
        "const args = JSON.parse(arguments[0]);"
        f"(async () => {{ {body} }})()"
        ".then(value => done({ok: JSON.stringify(value === undefined ? null : value)}),"
        " error => done({error: String(error && error.stack || error)}));"
    )
    outcome = driver.execute_async_script(script, json.dumps(list(args)))
    if "error" in outcome:
        raise ScriptError(outcome["error"])
    return json.loads(outcome["ok"])


class _AppHandler(http.server.SimpleHTTPRequestHandler):
    """The app's folder, as the relay serves it, for tests of its modules alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(APP), **kwargs)

    def translate_path(self, path: str) -> str:
        if path.split("?", 1)[0] == "/words.txt":
            return str(WORDS)
        return super().translate_path(path)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


_AppHandler.extensions_map = {**_AppHandler.extensions_map, ".js": "text/javascript"}


@contextlib.contextmanager
def app_server() -> Iterator[str]:
    """A plain HTTP server of the app's files on loopback; yields its origin."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AppHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
