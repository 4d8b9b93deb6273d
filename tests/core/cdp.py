"""A headless Chromium driven over the DevTools protocol on a pipe (no driver, no websocket
library): open a page, collect what its console says, take a screenshot."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

BINARIES = ("chromium-headless-shell", "chromium", "google-chrome")
PROBLEMS = {"Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded"}


def find_browser() -> str | None:
    return next(filter(None, map(shutil.which, BINARIES)), None)


class Browser:
    """Chromium reads protocol messages on its fd 3 and answers on fd 4, each ending in a NUL."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser, commands = os.pipe()
        replies, from_browser = os.pipe()
        # above 4, so that placing them at 3 and 4 in the child never overwrites one with the other
        child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser))

        def at_3_and_4() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=at_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_browser, from_browser, child_in, child_out):
            os.close(fd)
        self._commands = os.fdopen(commands, "wb", buffering=0)
        self._replies = os.fdopen(replies, "rb", buffering=0)
        self._pending = b""
        self._id = 0
        self._session: str | None = None  # the tab opened last
        self.events: list[dict[str, Any]] = []

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._pending:
            chunk = self._replies.read(1 << 16)
            if not chunk:
                raise EOFError("the browser closed its pipe")
            self._pending += chunk
        message, self._pending = self._pending.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        self._commands.write(json.dumps(message).encode() + b"\0")
        while (reply := self._receive()).get("id") != self._id:
            self.events.append(reply)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for(self, method: str) -> None:
        while (event := self._receive()).get("method") != method:
            self.events.append(event)

    def open(self, url: str, screenshot: Path) -> list[dict[str, Any]]:
        """Load ``url`` in a 1200 px wide tab, save a full-page screenshot; return the console's
        messages, uncaught exceptions and failed loads."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.events = []
        session = self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=1200, height=900, deviceScaleFactor=1,
                  mobile=False)
        self.send("Page.navigate", session, url=url)
        self.wait_for("Page.loadEventFired")
        shot = self.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return [event for event in self.events if event.get("method") in PROBLEMS]

    def evaluate(self, expression: str) -> Any:
        """``expression`` in the last opened tab."""
        return self.send("Runtime.evaluate", self._session, expression=expression, returnByValue=True)["result"]["value"]

    def close(self) -> None:
        self.send("Browser.close")
        self.process.wait(timeout=30)
