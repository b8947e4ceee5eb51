"""Helpers shared by tests/ and tests/reliability/ (import as ``from helpers import ...``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

try:  # imported now: a test may hide it (sys.modules) to check the missing-driver message
    import psycopg
except ImportError:  # pragma: no cover - the [pg] tests then skip (or fail under CI)
    psycopg = None

from queuectl.models import Queue
from queuectl.paths import Paths
from queuectl.store import open_store


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def run_queuectl(*args: str, home: Path, input: Optional[str] = None,
                 timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real command in a child process (what a user's shell does)."""
    env = dict(os.environ, QUEUECTL_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "queuectl.cli", *args], input=input,
                          capture_output=True, text=True, env=env, timeout=timeout)


@contextmanager
def spawn_queuectl(*args: str, home: Path, stdout: int = subprocess.DEVNULL) -> Iterator[subprocess.Popen]:
    """A long-running queuectl command (attached workers, logs --follow) that is always ended."""
    env = dict(os.environ, QUEUECTL_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "queuectl.cli", *args], stdout=stdout,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Workers:
    """Start real detached workers for a test and guarantee they are gone afterwards."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.paths = Paths(home)
        self.pids: List[int] = []

    def start(self, count: int = 1, *extra: str) -> List[int]:
        result = run_queuectl("worker", "start", "--count", str(count), *extra, home=self.home)
        assert result.returncode == 0, result.stderr
        line = [ln for ln in result.stdout.splitlines() if "PIDs:" in ln][0]
        pids = [int(p) for p in line.split("PIDs:")[1].replace(",", " ").split()]
        self.pids.extend(pids)
        return pids

    def stop(self, *extra: str) -> subprocess.CompletedProcess:
        return run_queuectl("worker", "stop", *extra, home=self.home)

    def alive(self) -> List[int]:
        from queuectl.executor import pid_alive

        return [pid for pid in self.pids if pid_alive(pid)]

    def cleanup(self) -> None:
        from queuectl.executor import pid_alive

        for pid in self.pids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        kill_everything_of(self.home)


def kill_everything_of(home: Path) -> None:
    """SIGKILL every process (workers, jobs, their children) whose environment names ``home``."""
    marker = f"QUEUECTL_HOME={home}".encode()
    me = os.getpid()
    for _ in range(3):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    env = handle.read().split(b"\0")
            except OSError:
                continue
            if marker in env:
                try:
                    os.kill(int(entry), signal.SIGKILL)
                    found = True
                except (ProcessLookupError, PermissionError):
                    pass
        if not found:
            return
        time.sleep(0.05)


def job_state(home: Path, job_id: str) -> Optional[str]:
    s = open_store(Paths(home))
    try:
        row = s.get(job_id)
        return row["state"] if row else None
    finally:
        s.close()


def counts(home: Path) -> dict:
    s = open_store(Paths(home))
    try:
        return Queue(s).counts()
    finally:
        s.close()


PG_TABLES = ("jobs", "job_deps", "job_runs", "config", "meta", "schedules", "schedule_skips")
PG_DSN = os.environ.get("QUEUECTL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def pg_url(schema: str) -> str:
    return f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}schema={schema}"


def drop_pg_schema(schema: str) -> None:
    """End the connections of queuectl processes on this schema, then drop it."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE application_name = %s AND pid <> pg_backend_pid()", (f"queuectl:{schema}",))
        conn.execute("SET lock_timeout = '20s'")
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def dump_db(home: Path) -> str:
    """A canonical dump of the database, for byte-for-byte 'nothing changed' checks
    (on PostgreSQL when QUEUECTL_DB names it: every row of every table, in key order)."""
    import sqlite3

    url = os.environ.get("QUEUECTL_DB", "")
    if url.startswith(("postgresql://", "postgres://")):
        from queuectl.pg_store import parse_url

        dsn, schema = parse_url(url)
        with psycopg.connect(dsn) as conn:
            if not conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",)).fetchone()[0]:
                return ""
            return "\n".join(f"{table}: {row!r}" for table in PG_TABLES
                             for row in conn.execute(f"SELECT * FROM {schema}.{table} ORDER BY 1, 2"))
    db = Paths(home).db
    if not db.exists():
        return ""
    conn = sqlite3.connect(str(db))
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def show_json(cli, job_id: str) -> dict:
    """``queuectl show ID --json`` through the in-process CLI fixture."""
    import json

    return json.loads(cli("show", job_id, "--json").stdout)


def make_dead(queue: Queue, job_id: str, worker_id: str = "host:1:1") -> None:
    """Run the job's attempts to exhaustion in-process (no worker needed)."""
    from queuectl.executor import Outcome

    queue.config_set("backoff_base", "0")
    while queue.get(job_id)["state"] != "dead":
        job = queue.claim(worker_id)
        assert job is not None and job["id"] == job_id
        queue.finish(job, Outcome(1, "exit code 1", "boom\n"), worker_id)


def in_threads(target: Callable[[int], None], count: int, timeout: float = 120) -> List[BaseException]:
    """Run ``target(n)`` for n in range(count) in threads at once (concurrent claimers,
    purgers, enqueuers on connections of their own); the exceptions they raised."""
    errors: List[BaseException] = []

    def run(n: int) -> None:
        try:
            target(n)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"threads still running after {timeout} s"
    return errors
