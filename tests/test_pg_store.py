"""What only the PostgreSQL backend has to prove: many writers at once (ids, unique keys,
claims), a migration race, NOTIFY at COMMIT, reconnects, and the missing-driver message."""
from __future__ import annotations

import os
import random
import select
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List

import pytest

from helpers import in_threads

from queuectl import pg_schema
from queuectl.errors import Conflict, DuplicateKey, StorageError
from queuectl.jobspec import parse_job
from queuectl.models import Queue
from queuectl.paths import Paths
from queuectl.store import open_store

pytestmark = pytest.mark.pg_only
W = "host:1:1"


def spec(**fields: Any) -> Dict[str, Any]:
    return parse_job({"command": "true", **fields}, now=time.time(), default_cwd="/tmp")


def url() -> str:
    return os.environ["QUEUECTL_DB"]


def new_store(role: str = "cli"):
    from queuectl.pg_store import PgStore

    return PgStore(url(), role=role)


def terminate_sessions(store, listener: bool = False) -> None:
    """Kill the server side of a store's connections, as a server restart would."""
    import psycopg

    from helpers import PG_DSN

    pids = [store._conn.info.backend_pid]
    if listener:
        pids = [l._conn.info.backend_pid for l in store._listeners]
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.1)


def test_location_hides_the_password(backend):
    from queuectl.pg_store import parse_url, redact

    dsn, schema = parse_url("postgresql://bob:s3cret@db.example:5433/q?schema=work&sslmode=require")
    assert schema == "work" and "schema" not in dsn and "sslmode=require" in dsn
    assert "s3cret" not in redact(dsn) and redact(dsn).startswith("postgresql://bob@db.example:5433/q")
    with pytest.raises(StorageError, match="invalid PostgreSQL schema"):
        parse_url("postgresql://h/db?schema=Robert'); DROP")


def test_duplicates_are_refused_by_the_database(store):
    with store.transaction():
        store.insert_jobs([("a", "true", 0, 0, None, None, "/", 1.0, 1.0, "k", 0, None)])
    for job, what in ((("a", "true", 0, 0, None, None, "/", 1.0, 1.0, None, 0, None), "id"),
                      ((None, "true", 0, 0, None, None, "/", 1.0, 1.0, "k", 0, None), "unique_key")):
        with pytest.raises(DuplicateKey) as info:
            with store.transaction():
                store.insert_jobs([job])
        assert info.value.what == what
    with store.transaction():  # a duplicate leaves the transaction usable (savepoint)
        with pytest.raises(DuplicateKey):
            store.insert_jobs([("a", "true", 0, 0, None, None, "/", 1.0, 1.0, None, 0, None)])
        store.insert_jobs([("b", "true", 0, 0, None, None, "/", 1.0, 1.0, None, 0, None)])
    assert sorted(store.states_of(["a", "b"])) == ["a", "b"]


def test_concurrent_enqueues_of_one_id_one_wins_the_other_gets_a_conflict(store):
    for round_ in range(10):
        job_id = f"same-{round_}"
        barrier = threading.Barrier(2)
        results: List[str] = []

        def enqueue() -> None:
            s = new_store()
            try:
                barrier.wait()
                Queue(s).enqueue([spec(id=job_id)])
                results.append("ok")
            except Conflict as exc:
                assert job_id in str(exc) or "concurrent" in str(exc), exc
                results.append("conflict")
            finally:
                s.close()

        threads = [threading.Thread(target=enqueue) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == ["conflict", "ok"], results
    assert Queue(store).counts()["pending"] == 10


def test_concurrent_claimers_never_get_the_same_job(store):
    total = 2000
    Queue(store).enqueue([spec() for _ in range(total)])
    claimed: List[List[str]] = [[] for _ in range(4)]

    def claimer(n: int) -> None:
        s = new_store("worker")
        rng = random.Random(n)
        try:
            while True:
                with s.transaction():
                    jobs = s.claim(f"host:{n}:1", time.time(), time.time() + 60, rng.randint(1, 8))
                if not jobs:
                    if not s.has_ready(time.time()):
                        return
                    continue
                claimed[n].extend(j["id"] for j in jobs)
        finally:
            s.close()

    errors = in_threads(claimer, 4)
    assert not errors, errors
    every = [job_id for ids in claimed for job_id in ids]
    assert len(every) == len(set(every)) == total
    assert all(ids for ids in claimed), "every claimer should have got some work"
    assert Queue(store).counts()["processing"] == total


def test_claim_honours_order_and_pause_in_one_statement(store):
    q = Queue(store, clock=lambda: 100.0)
    q.enqueue([spec(run_at=50.0), spec(priority=5, run_at=60.0), spec(run_at=40.0)])
    with store.transaction():
        store.set_flag("paused", "1")
        assert store.claim(W, 100.0, 200.0, 8) == []
        store.set_flag("paused", None)
        jobs = store.claim(W, 100.0, 200.0, 8)
    assert [(j["priority"], j["run_at"]) for j in jobs] == [(5, 60.0), (0, 40.0), (0, 50.0)]
    assert {j["state"] for j in jobs} == {"processing"} and {j["attempts"] for j in jobs} == {1}


def test_a_migration_race_creates_the_schema_once(backend):
    code = ("import sys; from queuectl.pg_store import PgStore; s = PgStore(sys.argv[1]); "
            "print(s.flag('schema_version')); s.close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, url()], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(pg_schema.SCHEMA_VERSION)}


def test_a_newer_schema_is_refused_untouched(store):
    with store.transaction():
        store.set_flag("schema_version", "99")
    with pytest.raises(StorageError, match="schema version 99, newer than this queuectl"):
        new_store()
    assert store.flag("schema_version") == "99"


def test_another_programs_schema_is_refused(store):
    import psycopg

    from helpers import PG_DSN, drop_pg_schema

    other = f"qtest_other_{os.getpid()}"
    try:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {other}")
            conn.execute(f"CREATE TABLE {other}.invoices (n int)")
        from queuectl.pg_store import PgStore

        with pytest.raises(StorageError, match="tables of another program"):
            PgStore(url().rsplit("=", 1)[0] + "=" + other)
    finally:
        drop_pg_schema(other)


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_notify_wakes_a_listener_only_after_commit(store):
    waker = new_store()
    listener = store.listen()
    try:
        assert not _readable(listener.fileno(), 0.1)
        with waker.transaction():
            waker.wake()
            assert not _readable(listener.fileno(), 0.3), "woken before COMMIT"
        assert _readable(listener.fileno(), 5.0), "not woken after COMMIT"
        listener.drain()
        assert not _readable(listener.fileno(), 0.1), "drain left it readable"
        waker.wake()  # outside a transaction: at once
        assert _readable(listener.fileno(), 5.0)
        listener.drain()
        with pytest.raises(RuntimeError):
            with waker.transaction():
                waker.wake()
                raise RuntimeError("rolled back")
        assert not _readable(listener.fileno(), 0.3), "a rolled back wake-up was delivered"
    finally:
        listener.close()
        waker.close()


def test_a_lost_connection_is_reopened_by_the_next_call(store):
    q = Queue(store)
    q.enqueue([spec(id="x")])
    terminate_sessions(store)
    assert store.get("x")["state"] == "pending"  # a read: reopened and retried
    terminate_sessions(store)
    q.enqueue([spec(id="y")])  # BEGIN on a dead connection: reopened
    assert store.states_of(["x", "y"]) == {"x": "pending", "y": "pending"}
    with pytest.raises(StorageError, match="database unavailable"):
        with store.transaction():
            store.get("x")
            terminate_sessions(store)
            store.get("y")
    assert store._depth == 0 and store.get("y")  # nothing left open; usable again


def test_a_lost_listen_connection_comes_back(store):
    listener = store.listen()
    fd = listener.fileno()
    try:
        terminate_sessions(store, listener=True)
        assert _readable(fd, 2.0)  # EOF on the socket
        listener.drain()  # must not raise; reconnects
        assert listener.fileno() == fd
        deadline = time.monotonic() + 5
        while listener._conn is None and time.monotonic() < deadline:
            time.sleep(0.2)
            listener.fileno()
        assert not _readable(fd, 0.1)
        store.wake()
        assert _readable(fd, 5.0), "the reconnected listener is not woken"
    finally:
        listener.close()


def test_without_psycopg_the_message_is_one_line(backend, home, monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    monkeypatch.delitem(sys.modules, "queuectl.pg_store", raising=False)
    with pytest.raises(StorageError, match=r"pip install 'queuectl\[postgres\]'"):
        open_store(Paths(home))
    result = cli("status", ok=False)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "psycopg is not installed" in result.stderr
