"""A real headless Chromium for the report tests, driven through chromedriver's W3C WebDriver HTTP API.

Only the standard library: chromedriver is an HTTP server, and the few commands the tests need
(open a page, run a DOM query, read the console log, take a screenshot) are one JSON request each.
The flags keep Chromium offline and quiet (without the background-networking ones it stalls on
refused connections), and every session gets a fresh profile directory.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900",
]
PACKAGES = "Debian packages chromium and chromium-driver (apt-get install -y chromium chromium-driver)"


def find_driver() -> tuple[str, str] | None:
    """(chromedriver, chromium) paths, or None if either is missing."""
    driver = shutil.which("chromedriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    return (driver, browser) if driver and browser else None


class Browser:
    """One chromedriver process with one Chromium session."""

    def __init__(self, driver: str, browser: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.process = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status").get("ready"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError("chromedriver did not start within 30 s")
            time.sleep(0.1)
        options = {"binary": browser, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"]}
        capabilities = {"browserName": "chrome", "goog:chromeOptions": options, "goog:loggingPrefs": {"browser": "ALL"}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:  # WebDriver errors come back as JSON with a message
            raise RuntimeError(f"{method} {path}: {exc.read().decode(errors='replace')[:500]}") from None

    def _session(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, path: Path) -> None:
        self._session("POST", "/url", {"url": path.resolve().as_uri()})

    def run(self, script: str, *args):
        """Run JavaScript in the page (the body of a function; `return` gives the value)."""
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def console(self) -> list[dict]:
        """Browser console entries since the last call (level, message, source)."""
        return self._session("POST", "/se/log", {"type": "browser"})

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """A PNG of the page; with `full_page` the window is first made as tall as the document."""
        if full_page:  # measured at the default size: a document fills at least the window it is shown in
            self._session("POST", "/window/rect", {"width": 1280, "height": 900})
            height = self.run("return document.documentElement.scrollHeight")
            self._session("POST", "/window/rect", {"width": 1280, "height": min(int(height) + 120, 12000)})
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))
        return path

    def close(self) -> None:
        try:
            self._session("DELETE", "")
        finally:
            self.process.terminate()
            self.process.wait(timeout=30)
            shutil.rmtree(self.profile, ignore_errors=True)
