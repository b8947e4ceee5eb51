"""Alert hooks: config ``on_failure`` / ``on_dead`` run a user's command when a job fails or
lands in the DLQ.

A hook must never stand in a worker's way. So it runs detached (its own session and process
group, stdin closed), at most MAX_RUNNING at once per worker (later ones wait in a bounded
line, the excess is dropped and counted), and is never waited for: the worker polls its hooks
from a chore (between claims and from a long run's heartbeat), reads what they print without
blocking (the first OUTPUT_KEPT bytes are kept, the rest counted), kills a hook's whole group
after HOOK_TIMEOUT, and logs how each ended.

The hook's environment is the worker's, plus QUEUECTL_EVENT (on_failure|on_dead),
QUEUECTL_JOB_ID, QUEUECTL_JOB_STATE (failed|dead), QUEUECTL_ATTEMPT, QUEUECTL_ERROR,
QUEUECTL_COMMAND and QUEUECTL_GROUP. A final failure fires both hooks: on_failure (a run
failed) and on_dead.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Mapping, Optional

from queuectl import chores
from queuectl.jobspec import DEFAULT_GROUP

HOOK_TIMEOUT = 30.0     # seconds a hook may run before its process group is SIGKILLed
MAX_RUNNING = 4         # hooks running at once, per worker
MAX_WAITING = 100       # hooks waiting for a slot; more are dropped (and the drops logged)
OUTPUT_KEPT = 2048      # bytes of a hook's output that go to the worker log
ENV_ERROR_MAX = 4096    # QUEUECTL_ERROR/QUEUECTL_COMMAND are cut to this many characters
DROPS_LOG_EVERY = 10.0  # seconds: drops are logged as one count at most this often
POLL_EVERY = 0.2        # seconds between polls while hooks run (none while none do)
EVENTS = {"failed": ("on_failure",), "dead": ("on_failure", "on_dead")}

log = logging.getLogger("queuectl.worker")


@dataclass
class Run:
    event: str
    job_id: str
    proc: "subprocess.Popen[bytes]"
    started: float                  # monotonic
    output: bytearray = field(default_factory=bytearray)
    seen: int = 0                   # bytes read, kept or not
    killed: bool = False


class Hooks:
    """One worker's hook runs: started on settled jobs, polled by a chore."""

    def __init__(self, home: "os.PathLike[str]") -> None:
        self.home = str(home)
        self.running: List[Run] = []
        self.waiting: Deque["tuple[str, str, Dict[str, str]]"] = deque()
        self.dropped = 0  # not logged yet
        self._drops_logged_at = -DROPS_LOG_EVERY
        # Idle (no hook running) the chore is never due, so it costs an idle worker nothing.
        self.chore = chores.Chore("alert hooks", POLL_EVERY, self._tick, next_at=float("inf"))

    def job_settled(self, settings: Mapping[str, Any], job: Mapping[str, Any],
                    error: Optional[str], state: str) -> None:
        """Start (or line up) the hooks configured for a job that ended a run in ``state``."""
        for event in EVENTS.get(state, ()):
            command = settings.get(event)
            if not command:
                continue
            env = {"QUEUECTL_EVENT": event, "QUEUECTL_JOB_ID": str(job["id"]),
                   "QUEUECTL_JOB_STATE": state, "QUEUECTL_ATTEMPT": str(job.get("attempts", "")),
                   "QUEUECTL_ERROR": (error or "")[:ENV_ERROR_MAX],
                   "QUEUECTL_COMMAND": str(job.get("command", ""))[:ENV_ERROR_MAX],
                   "QUEUECTL_GROUP": str(job.get("grp") or DEFAULT_GROUP)}
            if len(self.waiting) >= MAX_WAITING:
                self.dropped += 1
            else:
                self.waiting.append((event, command, env))
        if self.waiting:
            self.poll()

    def _tick(self, _now: float) -> None:
        self.poll()
        if not (self.running or self.waiting or self.dropped):
            self.chore.next_at = float("inf")

    def poll(self) -> None:
        """Read hook output, reap finished hooks, kill overdue ones, start waiting ones."""
        now = time.monotonic()
        for run in list(self.running):
            self._read(run)
            code = run.proc.poll()
            if code is not None:
                self._read(run)
                self._finished(run, code, now)
                self.running.remove(run)
            elif not run.killed and now - run.started > HOOK_TIMEOUT:
                run.killed = True
                try:
                    os.killpg(run.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self.dropped and now >= self._drops_logged_at + DROPS_LOG_EVERY:
            self._drops_logged_at = now
            log.warning("alert hooks: %d hook run(s) dropped: %d already waiting behind %d running",
                        self.dropped, MAX_WAITING, MAX_RUNNING)
            self.dropped = 0
        while self.waiting and len(self.running) < MAX_RUNNING:
            self._start(*self.waiting.popleft())
        if self.running or self.waiting:
            self.chore.next_at = min(self.chore.next_at, now + POLL_EVERY)

    def _start(self, event: str, command: str, extra: Dict[str, str]) -> None:
        env = dict(os.environ)
        env.update(extra)
        env["QUEUECTL_HOME"] = self.home
        try:
            proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, cwd=self.home, env=env)
        except OSError as exc:
            log.warning("alert hook %s (job %s) could not start: %s", event, extra["QUEUECTL_JOB_ID"], exc)
            return
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.running.append(Run(event, extra["QUEUECTL_JOB_ID"], proc, time.monotonic()))

    def _read(self, run: Run, limit: int = 1 << 20) -> None:
        """What the hook printed so far, without blocking (at most ``limit`` bytes a poll: a
        hook printing without end fills its pipe and waits there until its timeout)."""
        pipe = run.proc.stdout
        if pipe is None or pipe.closed:
            return
        read = 0
        while read < limit:
            try:
                chunk = os.read(pipe.fileno(), 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                pipe.close()
                return
            read += len(chunk)
            run.seen += len(chunk)
            room = OUTPUT_KEPT - len(run.output)
            if room > 0:
                run.output += chunk[:room]

    def _finished(self, run: Run, code: int, now: float) -> None:
        if run.proc.stdout is not None and not run.proc.stdout.closed:
            run.proc.stdout.close()  # a background child of the hook may hold it open: not ours
        took = now - run.started
        text = run.output.decode("utf-8", "replace").strip()
        if run.seen > len(run.output):
            text += f" [... {run.seen - len(run.output)} more bytes not logged]"
        said = f"; output: {text}" if text else ""
        if run.killed:
            log.warning("alert hook %s (job %s) timed out after %gs and was killed%s", run.event,
                        run.job_id, HOOK_TIMEOUT, said)
        elif code != 0:
            status = f"signal {-code}" if code < 0 else f"status {code}"
            log.warning("alert hook %s (job %s) failed with %s after %.1fs%s", run.event,
                        run.job_id, status, took, said)
        else:
            log.info("alert hook %s (job %s) done in %.1fs%s", run.event, run.job_id, took, said)


_hooks: Dict[str, Hooks] = {}


def for_home(paths: Any) -> Hooks:
    """This process's hooks for a home (one worker: one home)."""
    key = str(paths.home)
    if key not in _hooks:
        _hooks[key] = Hooks(paths.home)
    return _hooks[key]


def job_settled(paths: Any, settings: Mapping[str, Any], job: Mapping[str, Any],
                outcome: Any, state: str) -> None:
    """The worker's one call, from _log_outcome: fire the hooks for this result, if any."""
    if state in EVENTS and (settings.get("on_failure") or settings.get("on_dead")):
        for_home(paths).job_settled(settings, job, getattr(outcome, "error", None), state)


def job_recovered(paths: Any, queue: Any, job_id: str, state: str) -> None:
    """A dead worker's job settled by recovery (say, moved to the DLQ): the same hooks."""
    from queuectl.errors import NotFound

    settings = queue.settings()
    if state in EVENTS and (settings.get("on_failure") or settings.get("on_dead")):
        try:
            job = queue.get(job_id)
        except NotFound:  # purged meanwhile: nobody left to tell about
            return
        for_home(paths).job_settled(settings, job, job.get("last_error"), state)
