"""Workers on many hosts, on both backends: QUEUECTL_HOST, the worker registry (status from
any host, stop --all-hosts), fencing when the database is unreachable, and the stored tail
that `logs` prints on a host without the log file.

Several "hosts" share this machine: each has its own QUEUECTL_HOME and QUEUECTL_HOST, and
all share one queue (QUEUECTL_DB: the PostgreSQL schema of the test, or one SQLite file).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from helpers import kill_everything_of, run_queuectl, wait_until

from queuectl import executor, worker_launcher
from queuectl.errors import StorageError
from queuectl.models import Queue
from queuectl.paths import Paths
from queuectl.store import open_store


@pytest.fixture
def shared_db(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """One queue for every home of the test: the PG schema, or one SQLite file."""
    if backend == "sqlite":
        monkeypatch.setenv("QUEUECTL_DB", str(tmp_path / "shared.db"))
    return os.environ["QUEUECTL_DB"]


class Host:
    """One simulated host: a home and a host name; runs queuectl as that host."""

    def __init__(self, name: str, home: Path) -> None:
        self.name, self.home = name, home
        self.env = {"QUEUECTL_HOST": name}

    def run(self, *args: str, ok: bool = True):
        saved = os.environ.get("QUEUECTL_HOST")
        os.environ["QUEUECTL_HOST"] = self.name
        try:
            result = run_queuectl(*args, home=self.home)
        finally:
            if saved is None:
                os.environ.pop("QUEUECTL_HOST", None)
            else:
                os.environ["QUEUECTL_HOST"] = saved
        if ok:
            assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
        return result

    def start(self, count: int) -> List[int]:
        out = self.run("worker", "start", "--count", str(count)).stdout
        line = [ln for ln in out.splitlines() if "PIDs:" in ln][0]
        return [int(p) for p in line.split("PIDs:")[1].replace(",", " ").split()]

    def status(self) -> List[Dict[str, Any]]:
        return json.loads(self.run("worker", "status", "--json").stdout)


@pytest.fixture
def hosts(shared_db: str, tmp_path: Path):
    made: List[Host] = []

    def make(name: str) -> Host:
        host = Host(name, tmp_path / f"home-{name}")
        made.append(host)
        return host
    yield make
    for host in made:
        kill_everything_of(host.home)


def test_host_override_names_workers_and_limits_pid_checks(monkeypatch):
    monkeypatch.setenv("QUEUECTL_HOST", "elsewhere")
    assert worker_launcher.worker_id_for(123, 456) == "elsewhere:123:456"
    assert worker_launcher.host_name() == "elsewhere"
    dead = 2 ** 22 + 17  # above any pid_max default: certainly no such process
    assert worker_launcher.worker_alive(f"elsewhere:{dead}:1") is False  # ours: PID checked
    assert worker_launcher.worker_alive(f"far-away:{dead}:1") is True   # only its lease tells


def test_registry_rows_beat_stop_and_are_forgotten(store):
    clock = {"now": 1000.0}
    queue = Queue(store, clock=lambda: clock["now"])
    queue.register_worker("a:1:1", "a", 1, 999.0, "detached")
    queue.register_worker("b:2:2", "b", 2, 999.0, "detached")
    assert [(r["worker_id"], r["gone"]) for r in queue.registry()] == [("a:1:1", False), ("b:2:2", False)]
    assert queue.request_stop() == ["a:1:1", "b:2:2"]
    assert queue.worker_beat("a:1:1", "a", 1, 999.0, "detached") == 1
    assert queue.request_stop(force=True) and queue.worker_beat("a:1:1", "a", 1, 999.0, "detached") == 2
    queue.request_stop()  # a graceful request never lowers a forced one
    assert queue.worker_beat("a:1:1", "a", 1, 999.0, "detached") == 2
    clock["now"] += queue.worker_gone_after() + 1  # b stopped beating; a beats on
    queue.worker_beat("a:1:1", "a", 1, 999.0, "detached")
    assert [(r["worker_id"], r["gone"]) for r in queue.registry()] == [("a:1:1", False), ("b:2:2", True)]
    assert queue.request_stop() == ["a:1:1"]  # the gone are not asked
    clock["now"] += 2 * queue.worker_gone_after()
    queue.worker_beat("a:1:1", "a", 1, 999.0, "detached")  # forgets rows gone long ago
    assert [r["worker_id"] for r in queue.registry()] == ["a:1:1"]
    queue.forget_workers(["a:1:1"])
    assert queue.registry() == []
    # A row forgotten while its worker was unreachable is written again by its next beat.
    assert queue.worker_beat("c:3:3", "c", 3, 999.0, "foreground") == 0
    assert [(r["host"], r["mode"]) for r in queue.registry()] == [("c", "foreground")]


def test_status_shows_every_host_and_stop_all_hosts_stops_them(hosts):
    a, b = hosts("a"), hosts("b")
    a_pids, b_pids = a.start(1), b.start(2)
    seen = wait_until(lambda: (lambda rows: rows if len(rows) == 3 else None)(a.status()), timeout=15,
                      message="both hosts' workers in a's worker status")
    assert sorted((r["host"], r["pid"]) for r in seen) == sorted(
        [("a", a_pids[0])] + [("b", pid) for pid in b_pids])
    assert all(r["state"] == "idle" for r in seen)
    table = a.run("worker", "status").stdout
    assert table.splitlines()[0].split()[:3] == ["HOST", "PID", "STATE"] and "\nb " in table
    assert "Workers: 3 running on 2 hosts" in a.run("status").stdout

    # Plain `worker stop` stays on its host: b's workers are not b's to a.
    assert "Stopped: 1" in a.run("worker", "stop").stdout
    wait_until(lambda: sorted(r["host"] for r in b.status()) == ["b", "b"], timeout=10,
               message="a's worker gone from the registry")
    out = a.run("worker", "stop", "--all-hosts", "--wait", "15").stdout
    assert "for 2 worker(s) on 1 host(s): b" in out and "Stopped: 2" in out, out
    assert not [pid for pid in b_pids if executor.pid_alive(pid)]
    assert a.status() == [] and b.status() == []


def test_a_silent_worker_of_another_host_shows_as_gone_then_is_forgotten(hosts):
    a = hosts("a")
    s = open_store(Paths(a.home))
    try:
        queue = Queue(s)
        queue.register_worker("far:99:1", "far", 99, time.time() - 1000, "detached")
        with s.transaction():
            s.beat_worker("far:99:1", time.time() - 500)
    finally:
        s.close()
    assert [(r["host"], r["state"]) for r in a.status()] == [("far", "gone")]
    assert "0 running" in a.run("status").stdout
    assert a.status() == []  # forgotten once shown


def test_a_worker_that_cannot_renew_its_lease_kills_its_run_before_the_lease_ends(
        home, queue, mocker, tmp_path, monkeypatch):
    """Fencing, in-process: every heartbeat raises; the run (a process group) is killed
    while the lease lasts, and its late result is dropped once the job was recovered."""
    from queuectl.jobspec import parse_job
    from queuectl.worker import Worker

    # run_job sets these in os.environ (a worker's own); undone at teardown so that later
    # tests' processes do not look like this job's run to recovery.
    for name in ("QUEUECTL_JOB_ID", "QUEUECTL_ATTEMPT"):
        monkeypatch.setenv(name, "unset-by-teardown")

    queue.config_set("lease_seconds", 2)
    marker = tmp_path / "child-pid"
    queue.enqueue([parse_job({"id": "long", "command": f"sleep 60 & echo $! > {marker}; wait"},
                             now=time.time(), default_cwd=str(tmp_path))])
    paths = Paths(home)
    worker = Worker(paths)
    worker._sig_r, _w = os.pipe()
    worker.listener = queue.store.listen()
    worker.queue = queue
    worker.worker_id = worker_launcher.worker_id_for(os.getpid(), executor.process_start_time(os.getpid()))
    paths.job_logs_dir.mkdir(parents=True, exist_ok=True)
    job = queue.claim(worker.worker_id)
    mocker.patch.object(queue, "heartbeat", side_effect=StorageError("database unavailable: cut"))
    try:
        began = time.time()
        outcome = worker._execute(job)
        took = time.time() - began
    finally:
        worker.listener.close()
        os.close(worker._sig_r)
        os.close(_w)
    assert "database was unreachable until the lease ran out" in outcome.error
    assert time.time() < job["lease_until"] and took < 2.0  # killed before the lease ended
    child = int(marker.read_text())
    wait_until(lambda: not executor.pid_alive(child), timeout=3, message="the background child killed too")
    # Meanwhile (the lease lapsed) another host recovers the job; the late result is dropped.
    wait_until(lambda: time.time() > job["lease_until"] + 0.05, timeout=5)
    assert queue.recover(lambda _w: True) == {"long": "failed"}
    states, _ = queue.settle([(job, outcome)], worker.worker_id)
    assert states == ["lost"]
    assert queue.get("long")["last_error"] == "worker died (lease expired)"


def test_logs_on_another_host_print_the_stored_tail_and_say_where_the_log_is(hosts):
    a, b = hosts("a"), hosts("b")
    big = "python3 -c \"import sys; [print('line', i) for i in range(20000)]\""  # ~200 KB
    a.run("add", "--id", "big", big)
    a.run("add", "--id", "small", "echo hello from a")
    a.start(1)
    assert a.run("wait", "big", "small", "--timeout", "30").returncode == 0
    a.run("worker", "stop")
    log_a = Paths(a.home).job_log("small")

    here = a.run("logs", "small")  # on its own host: the file, as ever
    assert "hello from a" in here.stdout and "=== queuectl job small attempt 1" in here.stdout
    there = b.run("logs", "small")
    assert there.stdout == "hello from a\n"
    assert f"a:{log_a}" in there.stderr and "kept in the database" in there.stderr
    assert f"log file:    a:{log_a}" in b.run("show", "small").stdout
    assert json.loads(b.run("show", "small", "--json").stdout)["log_file"] == f"a:{log_a}"

    tail = b.run("logs", "big").stdout  # the last 64 KiB (db_tail_bytes), cut at a line
    assert tail.startswith("…line ") and tail.endswith("line 19999\n")
    assert 60_000 < len(tail.encode()) <= 65536 + 3
    assert b.run("logs", "big", "--tail", "2").stdout == "line 19998\nline 19999\n"
    assert len(b.run("show", "big").stdout) < 6000  # show prints only the last 4 KiB of it
    assert "attempt 1 is in the log at" not in b.run("logs", "big", "--attempt", "1").stderr
    refused = b.run("logs", "big", "--attempt", "2", ok=False)
    assert refused.returncode == 1 and f"a:{Paths(a.home).job_log('big')}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    a.run("config", "set", "db_tail_bytes", "100")
    a.run("add", "--id", "trimmed", big)
    a.start(1)
    assert a.run("wait", "trimmed", "--timeout", "30").returncode == 0
    assert len(b.run("logs", "trimmed").stdout.encode()) <= 104
