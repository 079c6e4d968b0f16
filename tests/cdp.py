"""A minimal Chrome DevTools Protocol client for the browser tests: headless Chromium driven
over ``--remote-debugging-pipe`` (file descriptors 3 and 4, NUL-separated JSON), so no
websocket package and no debugging port are needed. Collects console errors and uncaught
exceptions, evaluates JavaScript, takes full-page screenshots.

    with Browser(tmp_path / "profile") as browser:
        page = browser.open("file:///.../dashboard.html")
        page.wait_for("document.querySelectorAll('.main-svg').length > 0")
        page.screenshot(tmp_path / "dashboard.png")
        assert page.errors() == []
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
    # Plotly's parallel coordinates draw with WebGL: with --disable-gpu that is SwiftShader,
    # which Chromium now only enables on request.
    "--enable-unsafe-swiftshader",
]


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process; ``open(url)`` gives a :class:`Page` (a new tab)."""

    def __init__(self, profile_dir: Path, *, window: tuple[int, int] = (1400, 1000), timeout_s: float = 60.0) -> None:
        self.profile_dir = Path(profile_dir)
        self.window = window
        self.timeout_s = timeout_s
        self._id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self.pages: list[Page] = []  # open tabs
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Browser":
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()

        def wire_fds() -> None:  # Chromium reads commands from fd 3 and writes replies to fd 4
            # move both ends out of the way first: either may itself be fd 3 or 4
            high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)  # dup2 copies are inheritable; the pipe's own fds close on exec
            os.dup2(high_w, 4)

        self._log = open(self.profile_dir / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile_dir}", "--remote-debugging-pipe",
             f"--window-size={self.window[0]},{self.window[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=wire_fds, close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        self._out, self._in = to_child_w, from_child_r
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            self.send("Browser.close", timeout_s=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._out, self._in):
            os.close(fd)
        self._log.close()

    # -- protocol ---------------------------------------------------------------------------
    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
             timeout_s: float | None = None) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            reply = self._read(deadline)
            if reply is None:
                raise CDPError(f"{method}: no reply within {timeout_s or self.timeout_s} s")
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _read(self, deadline: float) -> dict[str, Any] | None:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._in], [], [], left)
            if ready:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise CDPError(f"Chromium exited (status {self.proc.poll()}); see {self.profile_dir / 'chromium.log'}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def pump(self, seconds: float) -> None:
        """Reads events for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (event := self._read(deadline)) is not None:
            if "method" in event:
                self.events.append(event)

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, target)
        self.pages.append(page)
        for domain in ("Page", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.window[0], "height": self.window[1], "deviceScaleFactor": 1, "mobile": False})
        page.navigate(url)
        return page


class Page:
    def __init__(self, browser: Browser, session: str, target: str) -> None:
        self.browser, self.session, self.target = browser, session, target

    def close(self) -> None:
        """Closes the tab (the browser stays)."""
        self.browser.send("Target.closeTarget", {"targetId": self.target})
        self.browser.pages.remove(self)

    def send(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session, **kw)

    def _events(self, method: str) -> list[dict[str, Any]]:
        return [e["params"] for e in self.browser.events if e.get("sessionId") == self.session and e["method"] == method]

    def navigate(self, url: str, *, timeout_s: float = 60.0) -> None:
        loaded = len(self._events("Page.loadEventFired"))
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigate {url}: {result['errorText']}")
        deadline = time.monotonic() + timeout_s
        while len(self._events("Page.loadEventFired")) == loaded:
            if time.monotonic() > deadline:
                raise CDPError(f"navigate {url}: no load event within {timeout_s} s")
            self.browser.pump(0.2)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError(f"evaluate: {result['exceptionDetails'].get('text')} in {expression[:80]!r}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout_s: float = 60.0) -> Any:
        """Polls a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f"timed out after {timeout_s} s waiting for {expression[:120]!r}")
            self.browser.pump(0.25)

    def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = base64.b64decode(self.send("Page.captureScreenshot", params)["data"])
        Path(path).write_bytes(data)
        return Path(path)

    def errors(self) -> list[str]:
        """Console errors, failed assertions, uncaught exceptions and browser log errors."""
        out = []
        for p in self._events("Runtime.consoleAPICalled"):
            if p["type"] in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                                   for a in p.get("args", [])))
        for p in self._events("Runtime.exceptionThrown"):
            d = p["exceptionDetails"]
            out.append(f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}".strip())
        for p in self._events("Log.entryAdded"):
            if p["entry"]["level"] == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        return out

    def warnings(self) -> list[str]:
        return [" ".join(str(a.get("value", "")) for a in p.get("args", []))
                for p in self._events("Runtime.consoleAPICalled") if p["type"] == "warning"] + \
               [p["entry"].get("text", "") for p in self._events("Log.entryAdded") if p["entry"]["level"] == "warning"]


def available() -> bool:
    return Path(CHROMIUM).is_file() and shutil.which(CHROMIUM) is not None
