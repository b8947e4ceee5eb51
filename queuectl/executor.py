"""Run one job as a child process: its own process group, timeout, output to a file, result.

Also the small process facts other modules need (is this PID still the process we started?).
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from queuectl import joblog

KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL to a job's process group
CAP_EVERY = 1.0   # seconds between a Run's log size checks (max_log_bytes), as run_job's tick
# A Run ticked for any reason checks its size this much early: the checks of a multi-slot
# worker's runs fall together into few wake-ups instead of one wake-up per run and second.
CAP_SLACK = 0.5
_HAS_PIDFD = hasattr(os, "pidfd_open")
# The environment os.environ was last set to (by identity): jobs inherit os.environ, which
# is only rewritten when the next job's environment differs. Passing env= to Popen would
# encode the whole environment again for every job (~1 us a variable, on every job's path).
_applied_env: "Optional[dict]" = None


def use_environment(base: "Optional[dict]", extra: "dict[str, str]") -> None:
    """Make os.environ ``base`` (if given, and not already it) plus ``extra``: what the
    next spawned job sees."""
    global _applied_env
    if base is not None and base is not _applied_env:
        os.environ.clear()
        os.environ.update(base)
        _applied_env = base
    os.environ.update(extra)


@dataclass
class Outcome:
    exit_code: Optional[int]
    error: Optional[str]
    tail: str = ""
    cancelled: bool = False
    duration: float = 0.0
    # Wall-clock times of the run; a worker may record a result a few jobs later (it
    # batches short jobs), and these keep the recorded times those of the run itself.
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    log_location: Optional[str] = None  # "host:path" of the full log (the worker sets it)
    silent: bool = False  # the run wrote nothing to its log (its header and result line aside)
    prune: Optional[str] = None  # a link to a spool the worker removes once this is recorded

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.error is None


# An event handler returns None to keep going, or (reason, cancelled) to kill the job.
Abort = Optional[Tuple[str, bool]]


def spawn(command: str, argv: bool, cwd: Optional[str], out_fd: int) -> subprocess.Popen:
    """Start a job (or the benchmark's ceiling probe) exactly the way workers do."""
    import json

    args = json.loads(command) if argv else command
    return subprocess.Popen(args, shell=not argv, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=out_fd, stderr=out_fd, start_new_session=True, close_fds=True)


def describe_exit(code: int, argv: bool) -> Optional[str]:
    if code == 0:
        return None
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    if code == 127 and not argv:
        return "command not found (exit 127)"
    if code == 126:
        return "command not executable (exit 126)"
    return f"exit code {code}"


def _start_error(exc: OSError, command: str, argv: bool, cwd: Optional[str]) -> str:
    if cwd and not os.path.isdir(cwd):
        return f"failed to start: working directory {cwd} does not exist"
    if argv and isinstance(exc, FileNotFoundError):
        import json

        return f"command not found: {json.loads(command)[0]}"
    return f"failed to start: {exc.strerror or exc}"


def run_job(command: str, argv: bool, cwd: Optional[str], log_path: "str | Path", job_id: str,
            attempt: int, worker_id: str, timeout: Optional[float], env: "dict[str, str]",
            wake_fds: Sequence[int] = (), on_event: Optional[Callable[[bool], Abort]] = None,
            tick: float = 1.0, on_start: Optional[Callable[[subprocess.Popen], None]] = None,
            first_tick: Optional[float] = None, base_env: "Optional[dict]" = None,
            tail_bytes: int = joblog.TAIL_BYTES, max_log_bytes: Optional[int] = None) -> Outcome:
    """Run to completion, calling ``on_event(woken)`` when a wake fd is readable, after
    ``first_tick`` (default ``tick``) and then every ``tick``.

    The log gets the attempt's header before the run and its result line after it: the
    result line is what lets recovery tell a finished run from an interrupted one.
    The job's environment is ``base_env`` (default: this process's) updated with ``env``;
    stdin is /dev/null; cwd is ``cwd`` (default: this process's).
    ``max_log_bytes``: the attempt's output in the log is cut to its head and tail beyond
    this (queuectl/logcap.py), checked every tick and at the end.
    """
    started, started_at = time.monotonic(), time.time()
    fd, offset = joblog.open_for_attempt(log_path, joblog.header(job_id, attempt, worker_id, command))
    cap = None
    if max_log_bytes:
        from queuectl.logcap import OutputCap

        cap = OutputCap(fd, offset, max_log_bytes)
    try:
        use_environment(base_env, env)
        try:
            proc = spawn(command, argv, cwd, fd)
        except OSError as exc:
            message = _start_error(exc, command, argv, cwd)
            os.write(fd, f"queuectl: {message}\n".encode())
            outcome = Outcome(None, message, joblog.tail_of(fd, offset, tail_bytes))
        else:
            try:
                if on_start:
                    on_start(proc)
                abort = _supervise(proc, started, timeout, wake_fds, on_event, tick, first_tick,
                                   cap.check if cap is not None else None)
            except BaseException:
                terminate_group(proc)  # never leave a run unsupervised behind an error
                raise
            code = proc.returncode
            if cap is not None:
                cap.check()
            tail = joblog.tail_of(fd, offset, tail_bytes)
            silent = not tail  # tail_of gives "" exactly when nothing was written
            if abort is not None:
                reason, cancelled = abort
                os.write(fd, f"\nqueuectl: {reason}\n".encode())
                outcome = Outcome(code, reason, tail, cancelled=cancelled)
            else:
                outcome = Outcome(code, describe_exit(code, argv), tail, silent=silent)
        outcome.duration = time.monotonic() - started
        outcome.started_at, outcome.finished_at = started_at, started_at + outcome.duration
        try:
            os.write(fd, joblog.result_line(job_id, attempt, outcome.error))
        except OSError:
            pass  # e.g. disk full: the run is over all the same, and its outcome is known
        return outcome
    finally:
        os.close(fd)


class Run:
    """One job run started without waiting for it: what a multi-slot worker supervises many
    of at once (run_job is the same run, supervised to its end by one call).

    Exactly as run_job: the attempt's header before, its result line after, its own process
    group, stdin /dev/null. ``fileno()`` (a pidfd; -1 without pidfd support: poll ``done()``)
    is readable once the process has exited; ``abort`` SIGTERMs the group and ``tick`` sends
    SIGKILL once the grace period is over, so no call here ever blocks.

    ``max_log_bytes``: as run_job, the attempt's output is cut to its head and tail beyond
    this (queuectl/logcap.py); ``tick`` checks it every CAP_EVERY while the run lasts (the
    check is due in ``next_due``) and ``finish`` once more before reading the tail."""

    def __init__(self, command: str, argv: bool, cwd: Optional[str], log_path: "str | Path",
                 job_id: str, attempt: int, worker_id: str, timeout: Optional[float],
                 env: "dict[str, str]", base_env: "Optional[dict]" = None,
                 tail_bytes: int = joblog.TAIL_BYTES, max_log_bytes: Optional[int] = None) -> None:
        self.job_id, self.attempt, self.argv, self.tail_bytes = job_id, attempt, argv, tail_bytes
        self.started, self.started_at = time.monotonic(), time.time()
        self.deadline = self.started + timeout if timeout else None
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen] = None
        self.pidfd = -1
        self.abort_reason: Abort = None
        self.kill_at: Optional[float] = None
        self.start_error: Optional[str] = None
        self.fd, self.offset = joblog.open_for_attempt(log_path, joblog.header(job_id, attempt,
                                                                               worker_id, command))
        self.cap = None
        self.cap_at: Optional[float] = None  # monotonic time the next size check is due
        if max_log_bytes:
            from queuectl.logcap import OutputCap

            self.cap = OutputCap(self.fd, self.offset, max_log_bytes)
            self.cap_at = self.started + CAP_EVERY
        try:
            use_environment(base_env, env)
            self.proc = spawn(command, argv, cwd, self.fd)
        except OSError as exc:
            self.start_error = _start_error(exc, command, argv, cwd)
            os.write(self.fd, f"queuectl: {self.start_error}\n".encode())
            return
        except BaseException:
            os.close(self.fd)
            raise
        if _HAS_PIDFD:
            try:
                self.pidfd = os.pidfd_open(self.proc.pid)
            except OSError:
                self.pidfd = -1

    def fileno(self) -> int:
        return self.pidfd

    def done(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def abort(self, reason: str, cancelled: bool, kill_now: bool = False) -> None:
        """End the run: SIGTERM its group now, SIGKILL after the grace (at once: fencing)."""
        if self.abort_reason is None:
            self.abort_reason = (reason, cancelled)
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill_now:
            _killpg(self.proc.pid, signal.SIGKILL)
            self.kill_at = time.monotonic()
        elif self.kill_at is None:
            _killpg(self.proc.pid, signal.SIGTERM)
            self.kill_at = time.monotonic() + KILL_GRACE

    def tick(self, now: float) -> None:
        """The timeout, the SIGKILL after an abort's grace period and the log size check."""
        if self.proc is None or self.proc.returncode is not None:
            return
        if self.cap_at is not None and now >= self.cap_at - CAP_SLACK:
            self.cap.check()
            self.cap_at = now + CAP_EVERY
        if self.deadline is not None and now >= self.deadline and self.abort_reason is None:
            self.abort(f"timed out after {self.timeout:g}s", False)
        if self.kill_at is not None and now >= self.kill_at:
            _killpg(self.proc.pid, signal.SIGKILL)
            self.kill_at = now + 1.0  # again a second later if it is still there

    def next_due(self) -> float:
        """Monotonic time by which tick() has something to do (infinity: nothing)."""
        due = [t for t in (self.deadline if self.abort_reason is None else None, self.kill_at,
                           self.cap_at) if t is not None]
        return min(due, default=float("inf"))

    def finish(self) -> Outcome:
        """The outcome of an ended run (done() is True); writes the result line, closes."""
        try:
            if self.proc is None:
                outcome = Outcome(None, self.start_error, joblog.tail_of(self.fd, self.offset, self.tail_bytes))
            else:
                code = self.proc.wait()
                if self.pidfd >= 0:
                    os.close(self.pidfd)
                    self.pidfd = -1
                if self.cap is not None:
                    self.cap.check()
                tail = joblog.tail_of(self.fd, self.offset, self.tail_bytes)
                silent = not tail  # tail_of gives "" exactly when nothing was written
                if self.abort_reason is not None:
                    reason, cancelled = self.abort_reason
                    os.write(self.fd, f"\nqueuectl: {reason}\n".encode())
                    outcome = Outcome(code, reason, tail, cancelled=cancelled)
                else:
                    outcome = Outcome(code, describe_exit(code, self.argv), tail, silent=silent)
            outcome.duration = time.monotonic() - self.started
            outcome.started_at = self.started_at
            outcome.finished_at = self.started_at + outcome.duration
            try:
                os.write(self.fd, joblog.result_line(self.job_id, self.attempt, outcome.error))
            except OSError:
                pass  # e.g. disk full: the run is over all the same, and its outcome is known
            return outcome
        finally:
            os.close(self.fd)


def _supervise(proc: subprocess.Popen, started: float, timeout: Optional[float],
               wake_fds: Sequence[int], on_event: Optional[Callable[[bool], Abort]],
               tick: float, first_tick: Optional[float] = None,
               on_tick: Optional[Callable[[], None]] = None) -> Abort:
    pidfd = os.pidfd_open(proc.pid) if _HAS_PIDFD else None
    try:
        deadline = started + timeout if timeout else None
        next_tick = started + (tick if first_tick is None else first_tick)
        while True:
            now = time.monotonic()
            wait = next_tick - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            woken = False
            if pidfd is not None:
                ready, _, _ = select.select([pidfd, *wake_fds], [], [], max(wait, 0))
                woken = any(fd != pidfd for fd in ready)
            else:
                ready, _, _ = select.select(list(wake_fds), [], [], min(max(wait, 0), 0.01))
                woken = bool(ready)
            if proc.poll() is not None:
                return None
            now = time.monotonic()
            abort: Abort = None
            if deadline is not None and now >= deadline:
                abort = (f"timed out after {timeout:g}s", False)
            elif on_event is not None and (woken or now >= next_tick):
                abort = on_event(woken)
            if now >= next_tick:
                next_tick = now + tick
                if on_tick is not None:
                    on_tick()
            if abort is not None:
                terminate_group(proc)
                return abort
    finally:
        if pidfd is not None:
            os.close(pidfd)


def terminate_group(proc: subprocess.Popen, grace: float = KILL_GRACE) -> None:
    """SIGTERM the job's whole process group, SIGKILL whatever is left after ``grace``."""
    _killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_group(pgid: int) -> None:
    """SIGKILL a job's whole process group at once (fencing: no grace period)."""
    _killpg(pgid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- process identity ------------------------------------------------------------------------
def process_start_time(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (Linux); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_argv(pid: int) -> "list[str]":
    """The argument vector of ``pid`` (empty if gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return []
    return [arg.decode("utf-8", "surrogateescape") for arg in raw.split(b"\0")[:-1]]


def process_cmdline(pid: int) -> str:
    """The command line of ``pid`` as one string (empty if gone or unreadable)."""
    return " ".join(process_argv(pid))


def process_env(pid: int, name: str) -> Optional[str]:
    """One environment variable of ``pid`` as it was at exec time (None if unset/unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode("utf-8", "surrogateescape")
    return None


def process_cwd(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if os.path.isdir("/proc"):
        return process_start_time(pid) is not None  # zombies count as dead
    return True


def pid_matches(pid: int, start: Optional[int]) -> bool:
    """True if ``pid`` is alive and is the same process that had start time ``start``."""
    if not pid_alive(pid):
        return False
    if start is None or not os.path.isdir("/proc"):
        return True
    return process_start_time(pid) == start


def kill_job_run(home: str, job_id: str, attempt: int) -> int:
    """SIGKILL the process groups of whatever still runs ``attempt`` of ``job_id`` of ``home``.

    Every job inherits QUEUECTL_HOME/JOB_ID/ATTEMPT from its worker, and /proc/PID/environ
    shows them even when the job's pid was never recorded; a queuectl worker (which a job
    may have started) is never a target. Returns how many groups were signalled.
    """
    if not os.path.isdir("/proc"):
        return 0
    wanted = {f"QUEUECTL_HOME={home}".encode(), f"QUEUECTL_JOB_ID={job_id}".encode(),
              f"QUEUECTL_ATTEMPT={attempt}".encode()}
    own_group = os.getpgrp()
    groups = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = set(handle.read().split(b"\0"))
            if not wanted <= env or "queuectl.worker" in process_cmdline(pid):
                continue
            groups.add(os.getpgid(pid))
        except (OSError, ProcessLookupError):
            continue
    groups.discard(own_group)
    for pgid in groups:
        if pgid > 1:
            _killpg(pgid, signal.SIGKILL)
    return len(groups)


def kill_orphan_group(pid: int, start: Optional[int]) -> None:
    """Kill a job's process group left behind by a dead worker, if that leader is still it."""
    if start is not None and pid_matches(pid, start):
        _killpg(pid, signal.SIGKILL)
