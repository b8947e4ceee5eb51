"""Start workers (detached or attached), find them by PID file, stop them with signals.

A PID file is trusted only if the process still has the recorded start time and is running
``queuectl.worker``; anything else is stale and removed, never signalled.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from queuectl import executor, joblog
from queuectl.paths import Paths, private_dir, private_file

WORKER_MODULE = "queuectl.worker"
HOST_ENV = "QUEUECTL_HOST"


def host_name() -> str:
    """This host's name in worker ids: ``$QUEUECTL_HOST``, else the machine's hostname.
    The override lets several "hosts" share one machine (tests, containers sharing a
    hostname); PID checks are only ever made for workers of this name."""
    import socket

    return os.environ.get(HOST_ENV) or socket.gethostname()


def pid_file(paths: Paths, pid: int) -> "os.PathLike[str]":
    return paths.workers_dir / f"{pid}.json"


def worker_id_for(pid: int, start: Optional[int]) -> str:
    return f"{host_name()}:{pid}:{start if start is not None else 0}"


def parse_worker_id(worker_id: str) -> "tuple[str, int, Optional[int]]":
    host, pid, start = worker_id.rsplit(":", 2)
    return host, int(pid), (int(start) or None)


def write_pid_file(paths: Paths, pid: int, mode: str) -> Dict[str, Any]:
    start = executor.process_start_time(pid)
    record = {"pid": pid, "start": start, "started_at": time.time(),
              "worker_id": worker_id_for(pid, start), "mode": mode}
    private_dir(paths.workers_dir)
    target = pid_file(paths, pid)
    tmp = paths.workers_dir / f".{pid}.json.tmp"
    fd = private_file(tmp, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(record))
    os.replace(tmp, target)
    return record


def remove_pid_file(paths: Paths, pid: int) -> None:
    for path in (pid_file(paths, pid), paths.workers_dir / f"{pid}.fifo"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def is_our_worker(record: Dict[str, Any], home: "Optional[os.PathLike[str]]" = None) -> bool:
    """The PID is alive, started when recorded, and is a queuectl worker process — of
    ``home`` when given: a worker of another QUEUECTL_HOME is not ours to signal."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
        return False
    start = record.get("start")
    if os.path.isdir("/proc"):
        if start is None or executor.process_start_time(pid) != start:
            return False
        if WORKER_MODULE not in executor.process_cmdline(pid):
            return False
        if home is None:
            return True
        theirs = worker_home(pid)
        return theirs is not None and os.path.realpath(theirs) == os.path.realpath(home)
    return executor.pid_alive(pid)


def worker_home(pid: int) -> Optional["os.PathLike[str]"]:
    """The home a running worker serves: its --home argument, else its QUEUECTL_HOME, else
    the default; as an absolute path (relative ones resolved against the worker's cwd)."""
    argv = executor.process_argv(pid)
    home: Optional[str] = None
    for i, arg in enumerate(argv):
        if arg == "--home" and i + 1 < len(argv):
            home = argv[i + 1]
        elif arg.startswith("--home="):
            home = arg[len("--home="):]
    if home is None:
        home = executor.process_env(pid, "QUEUECTL_HOME") or None
    if home is None:
        return Paths(os.path.join(os.path.expanduser("~"), ".queuectl")).home
    if not os.path.isabs(home):
        cwd = executor.process_cwd(pid)
        if cwd is None:
            return None
        home = os.path.join(cwd, home)
    return Paths(home).home


@dataclass
class WorkerInfo:
    pid: int
    worker_id: str
    started_at: float
    mode: str
    stopping: bool = False  # asked to stop (SIGTERM sent, recorded in its PID file)


def mark_stopping(paths: Paths, pid: int) -> None:
    """Record in the PID file that this worker was asked to stop (worker status: stopping).
    A worker that exits meanwhile has removed its file: then there is nothing to mark."""
    path = pid_file(paths, pid)
    try:
        record = json.loads(open(path).read())
    except (OSError, ValueError):
        return
    record["stopping_at"] = time.time()
    tmp = paths.workers_dir / f".{pid}.json.stop.tmp"
    with os.fdopen(private_file(tmp, os.O_WRONLY | os.O_TRUNC), "w") as handle:
        handle.write(json.dumps(record))
    if path.exists():
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def list_workers(paths: Paths, clean: bool = True) -> List[WorkerInfo]:
    """Live workers of this home; stale PID files (dead or foreign PIDs) are removed."""
    found: List[WorkerInfo] = []
    try:
        names = sorted(os.listdir(paths.workers_dir))
    except OSError:
        return found
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = paths.workers_dir / name
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            record = {}
        if is_our_worker(record, paths.home):
            found.append(WorkerInfo(record["pid"], str(record.get("worker_id", "")),
                                    float(record.get("started_at") or 0), str(record.get("mode", "")),
                                    bool(record.get("stopping_at"))))
        elif clean:
            try:
                os.unlink(path)
            except OSError:
                pass
            stem = name[:-5]
            try:
                os.unlink(paths.workers_dir / f"{stem}.fifo")
            except OSError:
                pass
    return found


def worker_rows(paths: Paths, processing: Callable[[], List[Dict[str, Any]]],
                clean: bool = True, registry: Optional[Any] = None) -> List[Dict[str, Any]]:
    """Every host's workers with host, idle/busy and current job: the shape of
    ``worker status --json``.

    This host's workers come from their PID files (validated by PID, as ever); with a
    ``registry`` (a models.Queue) the database adds the other hosts' workers, each ``gone``
    once its beat is older than Queue.worker_gone_after. Rows of this host whose PID is dead
    are dropped (and forgotten, with ``clean``), like stale PID files; gone rows of other hosts
    are shown once as state "gone" and forgotten. ``processing`` returns the jobs in state
    processing; it is only called when a worker lives.
    """
    workers = list_workers(paths, clean=clean)
    host = host_name()
    registered = registry.registry() if registry is not None else []
    by_id = {row["worker_id"]: row for row in registered}
    local_ids = {info.worker_id for info in workers}
    entries: List[Dict[str, Any]] = []
    for info in workers:
        row = by_id.get(info.worker_id, {})
        entries.append({"host": host, "pid": info.pid, "started_at": info.started_at,
                        "mode": info.mode, "worker_id": info.worker_id,
                        "heartbeat_at": row.get("heartbeat_at"), "gone": False,
                        "stopping": info.stopping or bool(row.get("stop_requested")),
                        "capacity": row.get("capacity") or 1, "groups": row.get("groups") or ""})
    forget: List[str] = []
    for row in registered:
        if row["worker_id"] in local_ids:
            continue
        if row["host"] == host:  # ours to check by PID (maybe a worker of another home)
            gone = not worker_alive(row["worker_id"])
            if gone:
                forget.append(row["worker_id"])
                continue  # a dead local worker is not shown, as a stale PID file is not
        else:
            gone = row["gone"]
            if gone:
                forget.append(row["worker_id"])
        entries.append({"host": row["host"], "pid": row["pid"], "started_at": row["started_at"],
                        "mode": row["mode"], "worker_id": row["worker_id"],
                        "heartbeat_at": row["heartbeat_at"], "gone": gone,
                        "stopping": bool(row["stop_requested"]),
                        "capacity": row.get("capacity") or 1, "groups": row.get("groups") or ""})
    if clean and forget and registry is not None:
        registry.forget_workers(forget)
    if not entries:
        return []
    busy: Dict[str, List[Dict[str, Any]]] = {}
    if any(not e["gone"] for e in entries):
        for job_row in processing():  # oldest first: a worker's next jobs may be claimed already
            busy.setdefault(job_row["worker_id"], []).append(job_row)
    now = time.time()
    rows = []
    for entry in entries:
        jobs = [] if entry["gone"] else busy.get(entry["worker_id"], [])
        capacity = int(entry["capacity"])
        # A one-slot worker holds its next few short jobs claimed: it runs only the first.
        running = jobs if capacity > 1 else jobs[:1]
        job = running[0] if running else None
        state = ("gone" if entry["gone"] else "stopping" if entry["stopping"] else
                 "busy" if job else "idle")
        rows.append({"host": entry["host"], "pid": entry["pid"], "state": state,
                     "job": job["id"] if job else None, "jobs": [j["id"] for j in running],
                     "slots": capacity,
                     "busy_slots": sum(min(j.get("slots") or 1, capacity) for j in running),
                     "groups": entry["groups"].split(",") if entry["groups"] else None,
                     "uptime": round(now - entry["started_at"], 1), "started_at": entry["started_at"],
                     "heartbeat_at": entry["heartbeat_at"], "mode": entry["mode"],
                     "stopping": entry["stopping"], "worker_id": entry["worker_id"]})
    return rows


def worker_alive(worker_id: str) -> bool:
    """For recovery: False only when we can prove the worker process is gone (same host)."""
    try:
        host, pid, start = parse_worker_id(worker_id)
    except ValueError:
        return False
    if host != host_name():
        return True  # another host: only its lease can tell
    return executor.pid_matches(pid, start) and WORKER_MODULE in (executor.process_cmdline(pid) or WORKER_MODULE)


def recover_dead_workers_jobs(queue: Any, paths: Paths, own_worker_id: Optional[str] = None) -> Dict[str, str]:
    """Settle jobs of dead workers (models.Queue.recover), killing what is left of their runs
    (by the pid their heartbeat recorded, else by the job's identity in /proc) and reading
    how each run ended from its log."""
    def alive(worker_id: str) -> bool:
        return worker_id == own_worker_id or worker_alive(worker_id)

    def kill_run(job_id: str, attempt: int) -> None:
        executor.kill_job_run(str(paths.home), job_id, attempt)

    def run_result(job_id: str, attempt: int, worker_id: str) -> "tuple[bool, bool, Optional[str]]":
        started, result = joblog.attempt_status(paths.job_log(job_id), attempt, worker_id, job_id)
        return started, result is not None, None if result == joblog.OK_RESULT else result

    def interrupted(job_id: str, attempt: int) -> None:
        joblog.append_interrupted(paths.job_log(job_id), job_id, attempt)

    host = host_name()

    def local(worker_id: str) -> bool:
        return worker_id.rsplit(":", 2)[0] == host

    return queue.recover(alive, executor.kill_orphan_group, kill_run, run_result, interrupted,
                         local=local)


def _worker_argv(paths: Paths, options: Sequence[str]) -> List[str]:
    return [sys.executable, "-m", WORKER_MODULE, "--home", str(paths.home), *options]


def _child_env(paths: Paths) -> Dict[str, str]:
    env = dict(os.environ)
    env["QUEUECTL_HOME"] = str(paths.home)
    return env


def spawn(paths: Paths, options: Sequence[str] = (), mode: str = "detached",
          log_to_file: bool = True) -> "subprocess.Popen[bytes]":
    """Start one worker in its own session and write its PID file. Its stderr is
    logs/worker-<pid>.log (``log_to_file``; the worker rotates it), else ours (a terminal,
    or the journal under systemd)."""
    private_dir(paths.workers_dir)
    argv = _worker_argv(paths, [*options, "--supervised"] if mode == "supervised" else options)
    if not log_to_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                close_fds=True, cwd=str(paths.home), env=_child_env(paths))
    else:
        private_dir(paths.logs_dir)
        launch_log = paths.logs_dir / f".worker-starting-{os.getpid()}-{time.monotonic_ns()}.log"
        with os.fdopen(private_file(launch_log, os.O_WRONLY | os.O_APPEND), "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    close_fds=True, cwd=str(paths.home), env=_child_env(paths))
        os.replace(launch_log, paths.worker_log(proc.pid))
    write_pid_file(paths, proc.pid, mode)
    return proc


def start_detached(paths: Paths, count: int, options: Sequence[str] = ()) -> List[int]:
    """Start ``count`` workers in their own sessions and return their PIDs at once."""
    pids = []
    for _ in range(count):
        proc = spawn(paths, options)
        proc.returncode = 0  # never waited on by us; keeps Popen.__del__ from warning
        pids.append(proc.pid)
    return pids


def scale_workers(paths: Paths, count: int, options: Sequence[str] = ()
                  ) -> "tuple[List[int], List[int], int]":
    """Start detached workers, or gracefully stop (SIGTERM) the newest, until ``count`` run
    that are not already stopping. Returns (started pids, signalled pids, how many ran)."""
    running = [w for w in list_workers(paths) if not w.stopping]
    if len(running) < count:
        return start_detached(paths, count - len(running), options), [], len(running)
    stopped = []
    for info in sorted(running, key=lambda w: w.started_at, reverse=True)[:len(running) - count]:
        try:
            mark_stopping(paths, info.pid)
            os.kill(info.pid, signal.SIGTERM)
            stopped.append(info.pid)
        except ProcessLookupError:
            remove_pid_file(paths, info.pid)
    return [], stopped, len(running)


def run_attached(paths: Paths, count: int, options: Sequence[str] = ()) -> int:
    """Run ``count`` workers attached to this terminal; Ctrl-C stops them gracefully, twice forces."""
    procs = [subprocess.Popen(_worker_argv(paths, [*options, "--foreground"]), stdin=subprocess.DEVNULL,
                              start_new_session=True, env=_child_env(paths))
             for _ in range(count)]
    presses = {"n": 0}

    def forward(signum: int, _frame: Any) -> None:
        presses["n"] += 1
        sig = signal.SIGTERM if presses["n"] == 1 else signal.SIGUSR1
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if presses["n"]:
        # A worker still starting up when we forwarded SIGTERM dies of it before its handler
        # exists; it had claimed nothing, so that is a clean stop, not a failure.
        codes = [0 if c == -signal.SIGTERM else c for c in codes]
    return max((abs(c) for c in codes), default=0)


@dataclass
class StopReport:
    signalled: List[int] = field(default_factory=list)
    exited: List[int] = field(default_factory=list)
    running: List[int] = field(default_factory=list)
    killed: List[int] = field(default_factory=list)


def stop_workers(paths: Paths, wait: float = 10.0, force: bool = False) -> StopReport:
    """SIGTERM (graceful) or SIGUSR1 (force: kill the job) every live worker, then wait."""
    report = StopReport()
    sig = signal.SIGUSR1 if force else signal.SIGTERM
    workers = list_workers(paths)
    for info in workers:
        try:
            mark_stopping(paths, info.pid)
            os.kill(info.pid, sig)
            report.signalled.append(info.pid)
        except ProcessLookupError:
            remove_pid_file(paths, info.pid)
    deadline = time.monotonic() + max(wait, 0)
    pending = list(report.signalled)
    while pending:
        pending = [pid for pid in pending if executor.pid_alive(pid)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if force:
        for pid in pending:
            try:
                os.kill(pid, signal.SIGKILL)
                report.killed.append(pid)
            except ProcessLookupError:
                pass
        pending = []
    for pid in report.signalled:
        if pid in pending:
            report.running.append(pid)
        else:
            report.exited.append(pid)
            remove_pid_file(paths, pid)
    return report
