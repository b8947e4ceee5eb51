"""Helpers for the reliability suite: counting executions exactly, reading the DB, finding jobs.

Every job in this suite appends ``id attempt pid`` to a file opened with O_APPEND (shell ``>>``),
so a test can tell exactly how many times each attempt of each job really ran.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from queuectl.paths import Paths

PY = sys.executable


def record(out: Path, then: str = "") -> str:
    """A shell job that records this execution, then (optionally) does more."""
    cmd = f'echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $$" >> {out}'
    return f"{cmd}; {then}" if then else cmd


def executions(out: Path) -> List[Tuple[str, int, int]]:
    """(job id, attempt, shell pid) for every recorded execution."""
    if not out.exists():
        return []
    rows = []
    for line in out.read_text().splitlines():
        job_id, attempt, pid = line.split()
        rows.append((job_id, int(attempt), int(pid)))
    return rows


def query(home: Path, sql: str, params: tuple = ()) -> List[tuple]:
    """Read the test's DB directly (read-only), bypassing queuectl."""
    conn = sqlite3.connect(f"file:{Paths(home).db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def jobs(home: Path) -> Dict[str, dict]:
    rows = query(home, "SELECT id, state, attempts, last_error FROM jobs")
    return {r[0]: {"state": r[1], "attempts": r[2], "last_error": r[3]} for r in rows}


def runs(home: Path) -> Dict[Tuple[str, int], List[Optional[str]]]:
    """(job id, attempt) -> errors recorded for it (None = success): job_runs holds every
    attempt except a completed job's last, whose record is the job row itself."""
    found: Dict[Tuple[str, int], List[Optional[str]]] = {}
    for job_id, attempt, error in query(home, "SELECT job_id, attempt, error FROM job_runs UNION ALL "
                                              "SELECT id, attempts, NULL FROM jobs WHERE state = 'completed'"):
        found.setdefault((job_id, attempt), []).append(error)
    return found


def state_counts(home: Path) -> Counter:
    return Counter(dict(query(home, "SELECT state, count(*) FROM jobs GROUP BY state")))


def children_of(pid: int) -> List[int]:
    """Direct children of ``pid`` (live or zombie), from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def proc_state(pid: int) -> Optional[str]:
    """One-letter process state (R, S, Z, ...) or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()[0].decode()


def alive(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and state not in ("Z", "X")


def sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def sigkill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def worker_log_text(home: Path) -> str:
    logs = Paths(home).logs_dir
    if not logs.exists():
        return ""
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker-*.log")))


def enqueue_file(path: Path, commands: List[str], **fields) -> Path:
    import json

    with open(path, "w") as handle:
        for i, command in enumerate(commands):
            handle.write(json.dumps({"command": command, **fields}) + "\n")
    return path


def spawn_worker(home: Path, workers=None, *extra: str):
    """A worker as our own child (so its exit code is ours to read), like `worker start` runs it.

    Registered with the ``workers`` fixture so it is killed even if the test fails.
    """
    import subprocess

    paths = Paths(home)
    paths.logs_dir.mkdir(parents=True, exist_ok=True)
    log = open(paths.logs_dir / f"worker-spawned-{os.getpid()}-{len(os.listdir(paths.logs_dir))}.log", "ab")
    env = dict(os.environ, QUEUECTL_HOME=str(home))
    proc = subprocess.Popen([PY, "-m", "queuectl.worker", "--home", str(home), *extra],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    log.close()
    if workers is not None:
        workers.pids.append(proc.pid)
    return proc


def worker_ready(home: Path, pid: int) -> bool:
    """The worker wrote its PID file and opened its doorbell (it is about to poll for work)."""
    workers_dir = Paths(home).workers_dir
    return (workers_dir / f"{pid}.json").exists() and (workers_dir / f"{pid}.fifo").exists()


def signal_pending(pid: int, signum: int) -> bool:
    """True while ``signum`` is still queued for ``pid`` (not yet delivered to a handler)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            status = handle.read()
    except OSError:
        return False
    bit = 1 << (signum - 1)
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & bit:
            return True
    return False


def holds_write_lock(pid: int) -> bool:
    """True while ``pid`` holds a POSIX write lock (/proc/locks): an SQLite process that has
    one is inside a write transaction, and freezing it there stops every writer."""
    try:
        with open("/proc/locks") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return False
    return any(f[1:4] == ["POSIX", "ADVISORY", "WRITE"] and f[4] == str(pid)
               for f in (line.split() for line in lines) if len(f) > 4)


def wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as handle:
            return handle.read()
    except OSError:
        return ""


def read_pid(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
