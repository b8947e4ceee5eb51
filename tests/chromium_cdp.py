"""Headless Chromium driven over the DevTools protocol on a pipe (stdlib only, no port opened).

``--remote-debugging-pipe`` makes Chromium read JSON commands on fd 3 and write replies and
events on fd 4, each message ended by a NUL byte. The browser runs in its own session so the
whole process tree can be killed; anything still running with our profile directory on its
command line is killed too, so no browser process outlives a test.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--disable-extensions", "--disable-default-apps", "--mute-audio",
         "--no-default-browser-check", "--password-store=basic", "--use-mock-keychain",
         "--hide-scrollbars"]


def find_chromium() -> Optional[str]:
    """$QUEUECTL_CHROMIUM if set (an unusable path counts as no browser), else PATH, else Debian's."""
    chosen = os.environ.get("QUEUECTL_CHROMIUM")
    if chosen is not None:
        return chosen if chosen and os.access(chosen, os.X_OK) else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def processes_using(profile: str) -> List[int]:
    """PIDs of browser processes started with this (unique, per-test) profile directory.

    Chromium's helpers rewrite their command line into one space-separated string.
    """
    flag = re.compile(re.escape(f"--user-data-dir={profile}".encode()) + rb"(?=[\s\0]|$)")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if flag.search(handle.read()):
                    found.append(int(entry))
        except OSError:
            continue
    return found


class CdpError(Exception):
    pass


class Chromium:
    """One headless browser with one page; use as a context manager."""

    def __init__(self, binary: str, profile: Path, log: Path, width: int = 1360, height: int = 1000) -> None:
        self.profile = str(profile)
        self.width, self.height = width, height
        self._next_id = 0
        self._buffer = b""
        self.events: List[Dict[str, Any]] = []
        self.session: Optional[str] = None
        profile.mkdir(parents=True, exist_ok=True)
        # Move our pipe ends above 10 first, so the dup2 to 3 and 4 below cannot clobber them.
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        hi_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r)
        os.close(from_child_w)
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        argv = [binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "--remote-debugging-pipe", "about:blank"]
        try:
            self.pid = os.posix_spawn(binary, argv, dict(os.environ), setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
                (os.POSIX_SPAWN_DUP2, hi_r, 3),
                (os.POSIX_SPAWN_DUP2, hi_w, 4),
            ])
        finally:
            os.close(hi_r)
            os.close(hi_w)
            os.close(log_fd)
        self._out = to_child_w
        self._in = from_child_r
        self.returncode: Optional[int] = None

    # -- protocol -------------------------------------------------------------------------
    def send(self, method: str, params: Optional[Dict[str, Any]] = None, timeout: float = 60,
             session: bool = True) -> Dict[str, Any]:
        """Send one command and wait for its reply (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: Dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._out, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _receive(self, deadline: float, waiting_for: str) -> Dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CdpError(f"no reply from Chromium to {waiting_for} in time")
            ready, _, _ = select.select([self._in], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise CdpError(f"Chromium closed the pipe (waiting for {waiting_for})")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open_page(self) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def navigate(self, url: str) -> None:
        reply = self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {reply['errorText']}")

    def evaluate(self, expression: str) -> Any:
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise CdpError(f"page script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        path.write_bytes(data)
        return data

    def page_errors(self) -> List[str]:
        """Uncaught exceptions and console errors (a CSP violation shows up here)."""
        found = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                found.append(json.dumps(event["params"]["exceptionDetails"])[:500])
            elif event["method"] == "Log.entryAdded" and event["params"]["entry"]["level"] == "error":
                found.append(event["params"]["entry"]["text"])
            elif (event["method"] == "Runtime.consoleAPICalled"
                  and event["params"]["type"] in ("error", "assert")):
                found.append(json.dumps(event["params"]["args"])[:500])
        return found

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Ask politely, then kill the process group, then anything left using our profile."""
        try:
            if self.returncode is None:
                try:
                    self.send("Browser.close", session=False, timeout=10)
                except (CdpError, OSError):
                    pass
                self._wait(15)
        finally:
            if self.returncode is None:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._wait(30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                left = processes_using(self.profile)
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            for fd in (self._in, self._out):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._in = self._out = -1

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                return
            time.sleep(0.05)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
