"""One small process that keeps N workers of a home alive on this host.

Run as ``python -m queuectl.supervisor --home DIR --count N``: ``queuectl worker start
--supervise`` starts it detached, ``queuectl supervise`` execs it in the foreground (systemd).

- A worker that dies is replaced at once (the loop wakes on SIGCHLD), its exit status logged.
  One that stops cleanly on another's request (SIGTERM by hand, ``worker stop --all-hosts``)
  is not: the wanted count goes down by one instead.
- A worker that dies within FAST_EXIT of its start is a crash loop in the making: after
  FREE_RESTARTS such deaths in a row, starts are spaced 1 s, 2 s, 4 s ... up to BACKOFF_MAX,
  one worker per try, until one lives FAST_EXIT; ``status`` shows the back-off.
- SIGTERM/SIGINT: SIGTERM every worker (each finishes its job), wait for all, exit 0. A second
  signal, or SIGUSR1, forces (SIGUSR1 to the workers: running jobs are killed and retried).
- SIGHUP: re-read the wanted count (``worker scale N`` writes it, then signals) and end a
  back-off: the next start is tried at once.
- Adoption: detached workers it did not start (its predecessor was SIGKILLed, or ``worker
  start`` started them) are counted and watched by PID; when one dies it is replaced by a
  child. Workers attached to a terminal (``queuectl worker``) are left alone.
  Nothing is interrupted by a supervisor restart.

Its state (PID, wanted count, workers, restarts, back-off) is ``supervisor.json`` in the home,
rewritten on every change; one supervisor per home, enforced by a lock on ``supervisor.lock``.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from queuectl import executor, logfiles, worker_launcher
from queuectl.paths import Paths, private_dir, private_file

MODULE = "queuectl.supervisor"
TICK = 0.5            # seconds between checks when no signal wakes the loop
FAST_EXIT = 5.0       # a worker that dies sooner than this after its start counts toward back-off
FREE_RESTARTS = 2     # quick deaths in a row replaced at once (an operator's kill, an OOM)
BACKOFF_FIRST = 1.0   # then starts are this far apart, doubled after each quick death
BACKOFF_MAX = 60.0
DEAD_LOGS_KEPT = 20   # logs of dead workers kept (the newest); older ones are deleted

log = logging.getLogger("queuectl.supervisor")


def state_path(paths: Paths) -> "os.PathLike[str]":
    return paths.home / "supervisor.json"


def want_path(paths: Paths) -> "os.PathLike[str]":
    return paths.home / "supervisor.want"


def log_path(paths: Paths) -> "os.PathLike[str]":
    return paths.logs_dir / "supervisor.log"


def _write_json(path: "os.PathLike[str]", data: Dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with os.fdopen(private_file(tmp, os.O_WRONLY | os.O_TRUNC), "w") as handle:
        handle.write(json.dumps(data))
    os.replace(tmp, path)


def find(paths: Paths) -> Optional[Dict[str, Any]]:
    """The running supervisor's state for this home, or None (no state file, or its PID is
    dead or now another program's: then the file is stale and ignored)."""
    try:
        state = json.loads(open(state_path(paths)).read())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        return None
    pid = state["pid"]
    if not executor.pid_matches(pid, state.get("start")) or MODULE not in executor.process_cmdline(pid):
        return None
    return state


def set_wanted(paths: Paths, count: int) -> None:
    """Ask the running supervisor for ``count`` workers (it re-reads on SIGHUP)."""
    _write_json(want_path(paths), {"count": count})
    state = find(paths)
    if state is not None:
        os.kill(state["pid"], signal.SIGHUP)


def read_wanted(paths: Paths) -> Optional[int]:
    try:
        count = json.loads(open(want_path(paths)).read()).get("count")
    except (OSError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) and 0 <= count <= 256 else None


def start_detached(paths: Paths, count: int, options: List[str], wait: float = 10.0) -> int:
    """Start a supervisor in its own session (log: logs/supervisor.log) and return its PID
    once it has written its state, so the next ``worker status`` shows it."""
    import subprocess

    private_dir(paths.logs_dir)
    argv = [sys.executable, "-m", MODULE, "--home", str(paths.home), "--count", str(count), *options]
    env = dict(os.environ, QUEUECTL_HOME=str(paths.home))
    with os.fdopen(private_file(log_path(paths), os.O_WRONLY | os.O_APPEND), "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, cwd=str(paths.home), env=env)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and proc.poll() is None:
        state = find(paths)
        if state is not None and state["pid"] == proc.pid:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.returncode = 0  # never waited on again; keeps Popen.__del__ quiet
    else:
        raise RuntimeError(f"the supervisor exited at once (status {proc.returncode}); "
                           f"see {log_path(paths)}")
    return proc.pid


def stop(paths: Paths, wait: float, force: bool = False) -> "tuple[Optional[int], bool]":
    """SIGTERM (or SIGUSR1 with ``force``) the supervisor and wait up to ``wait`` seconds for
    it to stop its workers and exit. Returns (its pid or None, whether it exited)."""
    state = find(paths)
    if state is None:
        return None, True
    pid = state["pid"]
    try:
        os.kill(pid, signal.SIGUSR1 if force else signal.SIGTERM)
    except ProcessLookupError:
        return pid, True
    deadline = time.monotonic() + max(wait, 0)
    while executor.pid_matches(pid, state.get("start")):
        if time.monotonic() >= deadline:
            return pid, False
        time.sleep(0.05)
    return pid, True


def describe_status(code: Optional[int]) -> str:
    if code is None:
        return "exited, status unknown (adopted: not its child)"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def backoff_delay(quick_deaths: int) -> float:
    """Seconds before the next start after ``quick_deaths`` quick deaths in a row."""
    if quick_deaths <= FREE_RESTARTS:
        return 0.0
    return min(BACKOFF_FIRST * 2 ** (quick_deaths - FREE_RESTARTS - 1), BACKOFF_MAX)


@dataclass
class Child:
    pid: int
    start: Optional[int]          # /proc start time: a PID reused by another program is not it
    started: float                # monotonic
    proc: Any = None              # our subprocess.Popen; None for an adopted worker
    stopping: bool = False        # asked to stop (scale down, shutdown): its exit is expected


class Supervisor:
    def __init__(self, paths: Paths, count: int, options: List[str], foreground: bool) -> None:
        self.paths = paths
        self.wanted = count
        self.options = options
        self.foreground = foreground
        self.children: Dict[int, Child] = {}
        self.stop_level = 0        # 1: graceful stop asked, 2: forced
        self.reload = False
        self.restarts = 0          # workers started to replace one that died
        self.owed = 0              # deaths not replaced yet
        self.adopted: List[int] = []
        self.streak = 0            # fast deaths in a row
        self.last_death = 0.0      # monotonic time of the last unexpected death
        self.next_start = 0.0      # monotonic: no start before this (back-off)
        self.last_exit: Optional[Dict[str, Any]] = None
        self._state_written: Optional[str] = None

    # -- signals ----------------------------------------------------------------------------
    def _install_signals(self) -> None:
        self._sig_r, sig_w = os.pipe()
        for fd in (self._sig_r, sig_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)

        def on_stop(signum: int, _frame: Any) -> None:
            self.stop_level = min(self.stop_level + 1, 2)

        def on_force(signum: int, _frame: Any) -> None:
            self.stop_level = 2

        def on_hup(signum: int, _frame: Any) -> None:
            self.reload = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGUSR1, on_force)
        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select

    def _sleep(self, timeout: float) -> None:
        if self.stop_level or self.reload:
            return
        ready, _, _ = select.select([self._sig_r], [], [], max(timeout, 0))
        if ready:
            try:
                while os.read(self._sig_r, 4096):
                    pass
            except BlockingIOError:
                pass

    # -- main ------------------------------------------------------------------------------
    def run(self) -> int:
        paths = self.paths
        private_dir(paths.home)
        lock_fd = private_file(paths.home / "supervisor.lock", os.O_RDWR)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = find(paths)
            log.error("another supervisor runs for %s%s; not starting a second one", paths.home,
                      f" (pid {other['pid']})" if other else "")
            return 1
        self._install_signals()
        self.started_at = time.time()
        _write_json(want_path(paths), {"count": self.wanted})
        log.info("supervisor started (pid %d, home %s): keeping %d worker(s)", os.getpid(),
                 paths.home, self.wanted)
        self._adopt()
        try:
            while not self.stop_level:
                self._reap()
                if self.reload:
                    self.reload = False
                    self._reload()
                self._converge()
                self._write_state()
                self._sleep(self._next_wake())
            self._shutdown()
        finally:
            try:
                os.unlink(state_path(paths))
            except FileNotFoundError:
                pass
            os.close(lock_fd)
        log.info("supervisor stopped")
        return 0

    def _adopt(self) -> None:
        """Take charge of the live workers already running for this home."""
        for info in worker_launcher.list_workers(self.paths):
            if info.stopping or info.mode == "foreground":
                continue  # finishing their job on request, or someone's terminal's: not ours
            _host, pid, start = worker_launcher.parse_worker_id(info.worker_id)
            self.children[pid] = Child(pid, start, time.monotonic() - max(time.time() - info.started_at, 0))
        self.adopted = sorted(self.children)
        if self.children:
            log.info("adopted %d running worker(s): %s", len(self.children),
                     ", ".join(map(str, sorted(self.children))))

    def _reload(self) -> None:
        count = read_wanted(self.paths)
        if count is not None and count != self.wanted:
            log.info("scaling from %d to %d worker(s)", self.wanted, count)
            self.wanted = count
        if self.streak > FREE_RESTARTS:  # `worker scale` after fixing the cause: try at once
            log.info("back-off cleared by request")
        self.streak, self.next_start = 0, 0.0

    def _alive(self, child: Child) -> "tuple[bool, Optional[int]]":
        if child.proc is not None:
            code = child.proc.poll()
            return code is None, code
        return executor.pid_matches(child.pid, child.start), None

    def _reap(self) -> None:
        now = time.monotonic()
        for pid, child in list(self.children.items()):
            alive, code = self._alive(child)
            if alive:
                continue
            del self.children[pid]
            # A worker removes its PID file when it stops cleanly; one killed leaves it behind.
            clean = code == 0 if child.proc is not None else \
                not os.path.exists(worker_launcher.pid_file(self.paths, pid))
            worker_launcher.remove_pid_file(self.paths, pid)
            lived = now - child.started
            if child.stopping:
                log.info("worker %d stopped (%s)", pid, describe_status(code))
                continue
            if clean:
                # Stopped on someone else's request (a SIGTERM by hand, `worker stop
                # --all-hosts`): keep one fewer rather than undo what they asked.
                self.wanted = max(self.wanted - 1, 0)
                _write_json(want_path(self.paths), {"count": self.wanted})
                log.info("worker %d stopped on request (%s, not by this supervisor): now keeping "
                         "%d worker(s); 'queuectl worker scale N' sets the count again", pid,
                         describe_status(code), self.wanted)
                continue
            self.owed += 1
            self.last_exit = {"pid": pid, "status": describe_status(code), "at": time.time(),
                              "lived": round(lived, 3)}
            if lived < FAST_EXIT:
                self.streak += 1
                self.last_death = now
            else:
                self.streak = 0
            delay = backoff_delay(self.streak)
            self.next_start = max(self.next_start, now + delay)
            log.warning("worker %d %s after %.1fs; %s", pid, describe_status(code), lived,
                        "replacing it" if not delay else
                        f"{self.streak} quick deaths in a row: next start in {delay:g}s")
            self._prune_logs()
        if self.streak and any(c.started > self.last_death and now - c.started >= FAST_EXIT
                               for c in self.children.values()):
            log.info("a worker has lived %gs: back-off over", FAST_EXIT)
            self.streak, self.next_start = 0, 0.0

    def _converge(self) -> None:
        running = [c for c in self.children.values() if not c.stopping]
        if len(running) > self.wanted:
            for child in sorted(running, key=lambda c: c.started, reverse=True)[:len(running) - self.wanted]:
                self._signal(child, signal.SIGTERM)
            return
        missing = self.wanted - len(running)
        if missing <= 0 or time.monotonic() < self.next_start:
            return
        backing_off = self.streak > FREE_RESTARTS
        for _ in range(1 if backing_off else missing):  # backing off: one probe at a time
            try:
                proc = worker_launcher.spawn(self.paths, self.options, mode="supervised",
                                             log_to_file=not self.foreground)
            except OSError as exc:
                log.error("could not start a worker: %s", exc)
                self.next_start = time.monotonic() + BACKOFF_FIRST
                return
            self.children[proc.pid] = Child(proc.pid, executor.process_start_time(proc.pid),
                                            time.monotonic(), proc)
            if self.owed:
                self.owed -= 1
                self.restarts += 1
            log.info("worker %d started", proc.pid)
        if backing_off:
            self.next_start = time.monotonic() + backoff_delay(self.streak)

    def _signal(self, child: Child, sig: int) -> None:
        child.stopping = True
        worker_launcher.mark_stopping(self.paths, child.pid)
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def _next_wake(self) -> float:
        wake = TICK
        if self.next_start and len(self.children) < self.wanted:
            wake = min(wake, self.next_start - time.monotonic())
        return wake

    def _shutdown(self) -> None:
        """Stop every worker and wait for all; a second signal (or SIGUSR1) forces."""
        level = 0
        log.info("stopping %d worker(s)%s", len(self.children), " (forced)" if self.stop_level > 1 else "")
        while self.children:
            if self.stop_level > level:
                level = self.stop_level
                sig = signal.SIGUSR1 if level > 1 else signal.SIGTERM
                for child in self.children.values():
                    self._signal(child, sig)
            self._write_state()
            self._reap()
            self._sleep(0.2 if any(c.proc is None for c in self.children.values()) else TICK)

    def _write_state(self) -> None:
        now = time.monotonic()
        backoff = None
        if self.streak > FREE_RESTARTS:
            backoff = {"quick_deaths": self.streak,
                       "next_start_in": round(max(self.next_start - now, 0.0), 1)}
        state = {"pid": os.getpid(), "start": executor.process_start_time(os.getpid()),
                 "started_at": self.started_at, "home": str(self.paths.home),
                 "foreground": self.foreground, "wanted": self.wanted,
                 "workers": sorted(c.pid for c in self.children.values() if not c.stopping),
                 "stopping_workers": sorted(c.pid for c in self.children.values() if c.stopping),
                 "stopping": bool(self.stop_level), "restarts": self.restarts,
                 "adopted": self.adopted,
                 "last_exit": self.last_exit, "backoff": backoff}
        key = json.dumps({**state, "backoff": backoff and backoff["quick_deaths"]})
        if key == self._state_written and not backoff:
            return
        _write_json(state_path(self.paths), state)
        self._state_written = key

    def _prune_logs(self) -> None:
        """Keep the logs of the DEAD_LOGS_KEPT most recently dead workers (crash reasons),
        delete older ones, so a home under a long-running supervisor stays bounded."""
        live = {str(pid) for pid in self.children}
        dead: Dict[str, float] = {}
        try:
            names = os.listdir(self.paths.logs_dir)
        except OSError:
            return
        for name in names:
            if not name.startswith("worker-") or ".log" not in name:
                continue
            pid = name[len("worker-"):].split(".", 1)[0]
            if pid in live or not pid.isdigit() or executor.pid_alive(int(pid)):
                continue
            try:
                mtime = os.stat(self.paths.logs_dir / name).st_mtime
            except OSError:
                continue
            dead[pid] = max(dead.get(pid, 0.0), mtime)
        for pid in sorted(dead, key=dead.get, reverse=True)[DEAD_LOGS_KEPT:]:
            for name in names:
                if name == f"worker-{pid}.log" or name.startswith(f"worker-{pid}.log."):
                    try:
                        os.unlink(self.paths.logs_dir / name)
                    except OSError:
                        pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--home", help="queuectl home (default: $QUEUECTL_HOME or ~/.queuectl)")
    parser.add_argument("--count", type=int, default=1, help="workers to keep alive")
    parser.add_argument("--foreground", action="store_true",
                        help="workers log to our stderr (a terminal, the journal), not logs/")
    parser.add_argument("--backoff-base", help="passed on to every worker")
    parser.add_argument("--log-jobs", action="store_true", help="passed on to every worker")
    args = parser.parse_args(argv)
    paths = Paths(args.home)
    logfiles.setup("supervisor", None if args.foreground else log_path(paths))
    if not 0 <= args.count <= 256:
        log.error("--count must be from 0 to 256, got %d", args.count)
        return 2
    options = (["--backoff-base", args.backoff_base] if args.backoff_base is not None else []) + \
        (["--log-jobs"] if args.log_jobs else [])
    return Supervisor(paths, args.count, options, args.foreground).run()


if __name__ == "__main__":
    sys.exit(main())
