"""Several hosts sharing one PostgreSQL queue, and the faults of a networked database: a host
lost mid-drain, a server restart, terminated connections, one host cut off past its lease.

Each "host" is a QUEUECTL_HOME with its own QUEUECTL_HOST on this machine. Jobs record every
execution (job, attempt, host, start/progress/end times) in one shared file, so a test
proves: nothing lost, no attempt run twice, and no two runs of one job overlapping in time.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from helpers import PG_DSN, kill_everything_of, psycopg, wait_until

from test_hosts import Host

pytestmark = pytest.mark.pg_only

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def progress_job(out: Path, steps: int, step: float = 0.1) -> str:
    """A job that writes a start line, a line every ``step`` and an end line, each with the
    time: a killed run's last line is within ``step`` of its death."""
    line = f'echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $QUEUECTL_HOST {{}} $(date +%s.%N)" >> {out}'
    return (f"{line.format('S')}; i=0; while [ $i -lt {steps} ]; do sleep {step}; {line.format('T')}; "
            f"i=$((i+1)); done; {line.format('E')}")


Run = Dict[str, object]


def runs_of(out: Path) -> Dict[Tuple[str, int], Run]:
    """(job, attempt) -> {host, start, last, ended}; fails if one attempt ran twice."""
    runs: Dict[Tuple[str, int], Run] = {}
    starts: Dict[Tuple[str, int], int] = defaultdict(int)
    for line in out.read_text().splitlines():
        job, attempt, host, kind, stamp = line.split()
        key, t = (job, int(attempt)), float(stamp)
        if kind == "S":
            starts[key] += 1
            runs[key] = {"host": host, "start": t, "last": t, "ended": False}
        else:
            runs[key]["last"] = t
            runs[key]["ended"] = runs[key]["ended"] or kind == "E"
    twice = [k for k, n in starts.items() if n > 1]
    assert not twice, f"attempts started twice: {twice}"
    return runs


def assert_no_overlap(runs: Dict[Tuple[str, int], Run]) -> None:
    by_job: Dict[str, List[Run]] = defaultdict(list)
    for (job, _attempt), run in runs.items():
        by_job[job].append(run)
    for job, spans in by_job.items():
        spans.sort(key=lambda r: r["start"])
        for before, after in zip(spans, spans[1:]):
            assert before["last"] < after["start"], f"job {job}: two runs overlap: {before} {after}"


@pytest.fixture
def pg_hosts(backend: str, tmp_path: Path):
    made: List[Host] = []

    def make(name: str, db: Optional[str] = None) -> Host:
        host = Host(name, tmp_path / f"home-{name}")
        if db is not None:
            host.db = db
        made.append(host)
        return host
    yield make
    for host in made:
        kill_everything_of(host.home)


def wait_drained(host: Host, ids: List[str], timeout: float) -> None:
    result = host.run("wait", *ids, "--timeout", f"{timeout:g}s", ok=False)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"


def worker_logs(host: Host) -> str:
    logs = host.home / "logs"
    return "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.log"))


def add_jobs(host: Host, jobs: List[Tuple[str, str]]) -> None:
    import json

    body = "\n".join(json.dumps({"id": job_id, "command": command}) for job_id, command in jobs)
    path = host.home.parent / f"jobs-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_text(body + "\n")
    host.run("enqueue", "--file", str(path))


def start_progress_drain(a: Host, b: Host, out: Path, ids: List[str], steps: int) -> None:
    """Jobs that log each step to ``out``, 2 workers on each host, and the drain under way."""
    a.run("config", "set", "lease_seconds", "10")
    add_jobs(a, [(job_id, progress_job(out, steps)) for job_id in ids])
    a.start(2)
    b.start(2)
    # Every worker registered (it has opened the store), not only the first to claim: a fault
    # that hits a worker still starting up makes it exit, which is not what these tests check.
    wait_until(lambda: len(a.status()) == 4, timeout=30, message="4 workers registered")
    wait_until(lambda: out.exists() and out.read_text().count(" E ") >= 4, timeout=30,
               message="the drain under way")


def assert_each_ran_once(a: Host, out: Path, ids: List[str]) -> None:
    """Every job drained, each executed exactly once, every run ended, no two overlapping."""
    wait_drained(a, ids, timeout=60)
    runs = runs_of(out)
    assert sorted(job for job, _n in runs) == sorted(ids), "each job ran exactly once"
    assert all(run["ended"] for run in runs.values())
    assert_no_overlap(runs)


@pytest.mark.slow
def test_two_hosts_drain_one_queue_and_one_survives_the_other(pg_hosts, tmp_path):
    """1000 jobs (not 5000: the suite's time budget), 4 workers per host; host a is
    SIGKILLed mid-drain and host b finishes everything once a's leases run out."""
    a, b = pg_hosts("a"), pg_hosts("b")
    out = tmp_path / "executions"
    a.run("config", "set", "lease_seconds", "2")
    a.run("config", "set", "backoff_base", "0")
    total = 1000
    add_jobs(a, [(f"j{i}", f'echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $QUEUECTL_HOST" >> {out}; sleep 0.01')
                 for i in range(total)])
    a.start(4)
    b.start(4)
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) > total // 3, timeout=60,
               interval=0.05, message="a third of the drain")
    a_hosts = {line.split()[2] for line in out.read_text().splitlines()}
    assert a_hosts == {"a", "b"}, "both hosts take part"
    kill_everything_of(a.home)  # SIGKILL every worker of host a and its jobs
    wait_drained(b, [f"j{i}" for i in range(total)], timeout=60)

    lines = [tuple(line.split()) for line in out.read_text().splitlines()]
    executed = defaultdict(list)
    for job, attempt, host in lines:
        executed[job].append((int(attempt), host))
    for job, found in executed.items():
        attempts = [n for n, _ in found]
        assert len(set(attempts)) == len(attempts), f"{job}: an attempt ran twice: {found}"
    assert set(executed) == {f"j{i}" for i in range(total)}, "a job was lost"
    import psycopg as pg

    dsn, schema = os.environ["QUEUECTL_DB"].split("?schema=")
    with pg.connect(dsn) as conn:
        states = dict(conn.execute(f"SELECT state, count(*) FROM {schema}.jobs GROUP BY state").fetchall())
        interrupted = conn.execute(f"SELECT job_id, attempt, error FROM {schema}.job_runs").fetchall()
    assert states == {"completed": total}
    assert interrupted, "host a's unfinished runs are recorded as attempts"
    assert all(error == "worker died (lease expired)" for _j, _n, error in interrupted)
    reran = {job for job, found in executed.items() if len(found) > 1}
    # Every job that ran more than once had its earlier run on host a, interrupted.
    interrupted_jobs = {job for job, _n, _e in interrupted}
    assert reran <= interrupted_jobs
    assert all(found[0][1] == "a" for job, found in executed.items() if job in reran)
    assert sum(len(found) for found in executed.values()) - total == len(reran)


def test_terminated_connections_are_reopened_and_nothing_is_lost_or_repeated(pg_hosts, tmp_path):
    a, b = pg_hosts("a"), pg_hosts("b")
    out = tmp_path / "runs"
    ids = [f"t{i}" for i in range(24)]
    start_progress_drain(a, b, out, ids, steps=3)
    schema = os.environ["QUEUECTL_DB"].split("schema=")[1]
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for _ in range(3):
            killed = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE application_name = %s AND pid <> pg_backend_pid()",
                                  (f"queuectl:{schema}",)).fetchone()[0]
            assert killed >= 4  # each worker: its store connection and its listener
            time.sleep(0.7)
    assert_each_ran_once(a, out, ids)
    for host in (a, b):
        text = worker_logs(host)
        outages = text.count("database unavailable")
        assert outages <= 2 * 3 * 2, text  # at most once per outage and worker, not per try
    assert len(a.status()) == 4, "every worker carried on"


class Proxy:
    """TCP forwarding 127.0.0.1:<port> -> the test server; ``cut()`` drops every connection
    and refuses new ones until ``restore()``."""

    def __init__(self, target: Tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.closed = False
        self.pairs: List[Tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                client.close()  # RST: "refused" as far as libpq is concerned
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.open = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    from urllib.parse import urlsplit

    parts = urlsplit(PG_DSN)
    p = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    yield p
    p.close()


def via(url: str, port: int) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    where = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{where}" if len(netloc) == 2 else where))


@pytest.mark.slow
def test_a_host_cut_off_past_its_lease_is_fenced_and_its_late_result_dropped(pg_hosts, proxy, tmp_path,
                                                                             monkeypatch):
    url = os.environ["QUEUECTL_DB"]
    a, b = pg_hosts("a"), pg_hosts("b")
    out = tmp_path / "runs"
    b.run("config", "set", "lease_seconds", "2")
    b.run("config", "set", "backoff_base", "0")
    b.run("add", "--id", "long", progress_job(out, 40))  # 4 s
    monkeypatch.setenv("QUEUECTL_DB", via(url, proxy.port))  # host a reaches the server through it
    a.start(1)
    wait_until(lambda: out.exists() and " T " in out.read_text(), timeout=15, message="a runs the job")
    proxy.cut()
    cut_at = time.time()
    # A CLI command through the cut link: one line, exit 1.
    failed = a.run("status", ok=False)
    assert failed.returncode == 1 and failed.stderr.startswith("error: database unavailable: ")
    assert len(failed.stderr.strip().splitlines()) == 1 and failed.stdout == ""
    monkeypatch.setenv("QUEUECTL_DB", url)
    b.start(1)
    wait_drained(b, ["long"], timeout=30)
    runs = runs_of(out)
    first, second = runs[("long", 1)], runs[("long", 2)]
    assert (first["host"], first["ended"], second["host"], second["ended"]) == ("a", False, "b", True)
    assert first["last"] < cut_at + 2.0, "a's run was killed within its lease"
    assert_no_overlap(runs)
    proxy.restore()  # a gets back; its late result ("lease lost") must not count
    wait_until(lambda: "result dropped" in worker_logs(a), timeout=30, message="a's late result dropped")
    text = worker_logs(a)
    assert "lease ran out while the database was unreachable" in text
    assert text.count("database unavailable") == 1, text  # once per outage, not per try
    assert "database reachable again" in text
    monkeypatch.setenv("QUEUECTL_DB", url)
    job = __import__("json").loads(b.run("show", "long", "--json").stdout)
    assert job["state"] == "completed" and job["attempts"] == 2
    assert [r["error"] for r in job["runs"]] == ["worker died (lease expired)", None]


@pytest.fixture
def own_cluster() -> Iterator[Dict[str, object]]:
    """A throwaway PostgreSQL 15 of our own (the shared one is never restarted)."""
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None or os.geteuid() != 0:
        pytest.skip("needs root, runuser and PostgreSQL 15's initdb to run a private server")
    import tempfile

    # Not under pytest's tmp dir: its parents are root's only (0700), and postgres needs in.
    base = Path(tempfile.mkdtemp(prefix="queuectl-pgtest-", dir="/tmp"))
    shutil.chown(base, "postgres", "postgres")
    data = base / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def as_postgres(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True,
                              text=True, timeout=60)

    done = as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    assert done.returncode == 0, done.stderr
    ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w",
           "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"]
    try:
        done = as_postgres(*ctl, "start")
        assert done.returncode == 0, done.stderr + done.stdout
        yield {"url": f"postgresql://postgres@127.0.0.1:{port}/postgres", "restart":
               lambda: as_postgres(*ctl, "-m", "fast", "restart")}
    finally:
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_workers_ride_out_a_server_restart(pg_hosts, own_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("QUEUECTL_DB", f"{own_cluster['url']}?schema=qtest_restart")
    a, b = pg_hosts("a"), pg_hosts("b")
    out = tmp_path / "runs"
    ids = [f"r{i}" for i in range(20)]
    start_progress_drain(a, b, out, ids, steps=4)
    restarted = own_cluster["restart"]()
    assert restarted.returncode == 0, restarted.stderr
    assert_each_ran_once(a, out, ids)
    for host in (a, b):
        text = worker_logs(host)
        assert text.count("database unavailable") <= 2, text  # once per worker and outage
    assert len(a.status()) == 4
    a.run("worker", "stop", "--all-hosts")
