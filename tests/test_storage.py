"""The SQLite store's own promises: schema migrations, counts and run history stay exact
although completed jobs are kept out of jobs_state and job_runs (schema version 2)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from queuectl import database
from queuectl.executor import Outcome
from queuectl.jobspec import parse_job
from queuectl.models import STATES, Queue
from queuectl.sqlite_store import SqliteStore

W = "host:1:1"


def add(q: Queue, job_id: str) -> None:
    q.enqueue([parse_job({"id": job_id, "command": "true"}, now=q.clock(), default_cwd="/")])


def ground_truth_counts(db: Path) -> dict:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT state, count(*) FROM jobs NOT INDEXED GROUP BY state").fetchall()
    finally:
        conn.close()
    return {state: dict(rows).get(state, 0) for state in STATES}


@pytest.mark.sqlite_only  # the ground truth is a NOT INDEXED scan of the file
def test_counts_match_a_full_scan_in_every_state(paths, store):
    q = Queue(store)
    for n in range(9):
        add(q, f"j{n}")
    for n in range(4):
        q.finish(q.claim(W), Outcome(0, None), W)          # completed
    q.finish(q.claim(W), Outcome(1, "exit code 1"), W)      # failed (will retry)
    q.claim(W)                                              # processing
    q.cancel(["j8"])                                        # cancelled
    q.config_set("max_retries", "0")
    q.finish(q.claim(W), Outcome(1, "exit code 1"), W)      # dead
    assert q.counts() == ground_truth_counts(paths.db)
    assert q.counts()["completed"] == 4 and sum(q.counts().values()) == 9


def test_history_of_a_job_that_failed_then_completed(store):
    q = Queue(store)
    add(q, "flaky")
    q.finish(q.claim(W), Outcome(3, "exit code 3"), W)
    q.retry(["flaky"])
    q.finish(q.claim(W), Outcome(0, None), W)
    runs = q.details("flaky")["runs"]
    assert [(r["attempt"], r["exit_code"], r["error"]) for r in runs] == [(1, 3, "exit code 3"), (2, 0, None)]
    assert runs[1]["worker_id"] == W and runs[1]["started_at"] <= runs[1]["finished_at"]


def test_a_version_1_database_is_migrated_without_doubling_history(tmp_path):
    db = tmp_path / "queue.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(database.MIGRATIONS[0])
    conn.execute("PRAGMA user_version=1")
    conn.execute("INSERT INTO jobs (id, command, state, attempts, run_at, created_at, updated_at, "
                 "started_at, finished_at, worker_id, exit_code) "
                 "VALUES ('old', 'true', 'completed', 2, 0, 0, 0, 5, 6, 'w', 0)")
    conn.execute("INSERT INTO jobs (id, command, state, attempts, run_at, created_at, updated_at) "
                 "VALUES ('waiting', 'true', 'pending', 0, 0, 0, 0)")
    conn.executemany("INSERT INTO job_runs (job_id, attempt, worker_id, started_at, finished_at, "
                     "exit_code, error) VALUES ('old', ?, 'w', ?, ?, ?, ?)",
                     [(1, 1, 2, 1, "exit code 1"), (2, 5, 6, 0, None)])
    conn.close()

    store = SqliteStore(db)
    try:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == database.SCHEMA_VERSION
        runs = store.runs("old")
        assert [(r["attempt"], r["error"]) for r in runs] == [(1, "exit code 1"), (2, None)]
        assert Queue(store).counts() == ground_truth_counts(db)
        assert Queue(store).claim(W)["id"] == "waiting"
    finally:
        store.close()


def test_plain_batches_store_the_same_rows_as_the_general_path(store):
    """Batches without ids, keys or dependencies take a shortcut; it must not drift."""
    q = Queue(store, clock=lambda: 1_800_000_000.0)
    spec = {"command": ["echo", "x"], "priority": 3, "max_retries": 2, "timeout": 9, "delay": 5}
    plain = [parse_job(dict(spec), now=q.clock(), default_cwd="/tmp") for _ in range(2)]
    general = [parse_job(dict(spec), now=q.clock(), default_cwd="/tmp"),
               parse_job({"id": "named", "command": "true"}, now=q.clock(), default_cwd="/tmp")]
    assert [r.id for r in q.enqueue(plain)] == ["1", "2"]
    assert [r.id for r in q.enqueue(general)] == ["3", "named"]
    assert [r.id for r in q.enqueue(plain[:1])] == ["5"]
    rows = {job_id: store.get(job_id) for job_id in ("1", "3", "5")}
    for row in rows.values():
        del row["seq"], row["id"]
    assert rows["1"] == rows["3"] == rows["5"]


def test_tidy_after_a_bulk_change_keeps_every_job_and_the_claim_order(store):
    """tidy() (VACUUM ANALYZE / ANALYZE) runs outside a transaction on both backends and
    changes nothing a user can see; benchmarks call it after filling the table."""
    q = Queue(store)
    for n in range(30):
        add(q, f"j{n}")
    for _ in range(20):
        q.finish(q.claim(W), Outcome(0, None), W)
    before = {job["id"]: job["state"] for job in q.list()}
    store.tidy()
    assert {job["id"]: job["state"] for job in q.list()} == before
    assert q.claim(W)["id"] == "j20"
