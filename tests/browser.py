"""Headless Chromium driven over the DevTools protocol, for front-end tests.

    with Chromium(find_chromium(), profile_dir) as page:
        page.navigate("http://127.0.0.1:8188")
        page.wait_for("!!window.app", timeout=120, what="the app")
        page.evaluate("1 + 1")                      # awaits promises, returns JSON-able values
        page.screenshot(Path("shot.png"))

Only the Debian `chromium` package (or another Chromium already on PATH) is used; nothing is
downloaded. `chromium_or_skip()` skips a test when no browser is installed, and fails it instead
when CI=true, where tools/setup.sh is expected to have installed one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import websocket  # websocket-client

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
# Flags known to work on these headless, GPU-less machines (see the shared host notes).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--autoplay-policy=no-user-gesture-required", "--disable-renderer-backgrounding",
         "--disable-background-timer-throttling", "--disable-backgrounding-occluded-windows")


class BrowserError(RuntimeError):
    """Chromium did not start, went away, or a page script threw."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def chromium_or_skip() -> str:
    """The browser's path; skips the test without one (fails it under CI=true)."""
    import pytest

    path = find_chromium()
    reason = None
    if path is None:
        reason = ("no Chromium found (looked for /usr/bin/chromium, chromium, chromium-browser); "
                  "install Debian's package: run `bash tools/setup.sh` as root, or `apt-get install chromium`")
    else:
        try:
            probe = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=60)
            if probe.returncode != 0 or "chrom" not in probe.stdout.lower():
                reason = f"{path} --version failed (rc {probe.returncode}): {(probe.stdout + probe.stderr)[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as err:
            reason = f"{path} does not run: {err}"
    if reason is not None:
        if in_ci():
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return path


def image_stats(path: Path, box: tuple[int, int, int, int] | None = None) -> dict:
    """Size, per-channel standard deviation (mean of RGB) and colour count of a PNG, or of a crop."""
    from PIL import Image, ImageStat

    with Image.open(path) as im:
        rgb = im.convert("RGB")
        size = rgb.size
        if box is not None:
            rgb = rgb.crop(box)
        stat = ImageStat.Stat(rgb)
        colors = rgb.getcolors(maxcolors=1 << 20)
    return {"size": size, "std": sum(stat.stddev) / 3, "mean": sum(stat.mean) / 3,
            "colors": len(colors) if colors is not None else 1 << 20}


class Chromium:
    """One headless browser with one page, driven over its DevTools websocket."""

    def __init__(self, executable: str, profile_dir: Path, width: int = 1920, height: int = 1200,
                 startup_timeout: float = 90.0):
        self.executable = executable
        self.profile_dir = Path(profile_dir)
        self.width, self.height = width, height
        self.startup_timeout = startup_timeout
        self.events: list[dict] = []  # every protocol event received, in order
        self._proc: subprocess.Popen | None = None
        self._ws: websocket.WebSocket | None = None
        self._next_id = 0
        self.log_path = self.profile_dir.parent / f"{self.profile_dir.name}-chromium.log"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Chromium":
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.profile_dir / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        cmd = [self.executable, *FLAGS, f"--window-size={self.width},{self.height}",
               f"--user-data-dir={self.profile_dir}", "--remote-debugging-port=0", "about:blank"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        port = None
        while port is None:
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with code {self._proc.returncode}\n{self.log_tail()}")
            lines = port_file.read_text().split() if port_file.exists() else []
            if lines and lines[0].isdigit():
                port = int(lines[0])
            elif time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"chromium opened no debugging port in {self.startup_timeout}s\n{self.log_tail()}")
            else:
                time.sleep(0.1)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise BrowserError("chromium listed no page target")
            time.sleep(0.2)
        self._ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30,
                                               suppress_origin=True)
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        return self

    def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close(timeout=2)
            except (OSError, websocket.WebSocketException):
                pass
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        # Renderer and helper processes of this browser share its session (process group).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "Chromium":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "--- chromium log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ protocol
    def call(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        """Send one command and return its result; events that arrive meanwhile go to .events."""
        if self._ws is None:
            raise BrowserError("browser is not running")
        self._next_id += 1
        call_id = self._next_id
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"{method}: no answer in {timeout}s")
            self._ws.settimeout(remaining)
            try:
                msg = json.loads(self._ws.recv())
            except websocket.WebSocketTimeoutException:
                raise BrowserError(f"{method}: no answer in {timeout}s") from None
            except (OSError, websocket.WebSocketException) as err:
                raise BrowserError(f"{method}: connection lost ({err})\n{self.log_tail()}") from None
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str, timeout: float = 60.0):
        """Value of a page expression (a promise is awaited); a thrown error raises BrowserError."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"page script failed: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str, interval: float = 0.1,
                 diagnose: str | None = None):
        """Poll a page expression until it is truthy; returns that value.

        On a timeout the error names `what`, the last value, the value of `diagnose` (a page
        expression describing the state) and the last console lines.
        """
        deadline = time.monotonic() + timeout
        value = None
        while True:
            try:
                value = self.evaluate(expression, timeout=max(5.0, deadline - time.monotonic()))
            except BrowserError as err:
                if time.monotonic() > deadline:
                    raise BrowserError(f"timed out after {timeout}s waiting for {what}: {err}") from None
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                state = ""
                if diagnose:
                    try:
                        state = f"page state: {self.evaluate(diagnose, timeout=10)!r}\n"
                    except BrowserError as err:
                        state = f"page state unavailable: {err}\n"
                raise BrowserError(f"timed out after {timeout}s waiting for {what} (last value {value!r})\n"
                                   + state + "\n".join(self.console()[-20:]))
            time.sleep(interval)

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def screenshot(self, path: Path) -> Path:
        import base64

        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False},
                         timeout=120)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    # ------------------------------------------------------------------ page output
    def console(self, since: int = 0) -> list[str]:
        """Console calls, uncaught exceptions and browser log entries as text lines."""
        lines = []
        for event in self.events[since:]:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled":
                args = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
                lines.append(f"console.{params.get('type')}: {' '.join(args)}")
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text", "")
                lines.append(f"exception: {text} ({details.get('url', '')})")
            elif method == "Log.entryAdded":
                entry = params.get("entry", {})
                lines.append(f"log.{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}")
        return lines
