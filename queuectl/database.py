"""SQLite connections, pragmas and the versioned schema (PRAGMA user_version)."""
from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Optional

from queuectl.errors import StorageError
from queuectl.paths import private_dir, private_file

# Each entry migrates schema version i to i+1; never edit a released entry, append a new one.
MIGRATIONS: "list[str]" = [
    """
    CREATE TABLE jobs (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT, -- insertion order; generated ids are str(seq)
        id               TEXT    NOT NULL UNIQUE,
        command          TEXT    NOT NULL,              -- shell string, or JSON array when argv = 1
        argv             INTEGER NOT NULL DEFAULT 0,
        state            TEXT    NOT NULL,
        priority         INTEGER NOT NULL DEFAULT 0,
        attempts         INTEGER NOT NULL DEFAULT 0,
        max_retries      INTEGER,                       -- NULL: the config value
        timeout          REAL,                          -- NULL: the config value
        cwd              TEXT,
        run_at           REAL    NOT NULL,
        created_at       REAL    NOT NULL,
        updated_at       REAL    NOT NULL,
        started_at       REAL,
        finished_at      REAL,
        worker_id        TEXT,
        lease_until      REAL,
        job_pid          INTEGER,
        job_pid_start    INTEGER,
        exit_code        INTEGER,
        last_error       TEXT,
        output_tail      TEXT,
        unique_key       TEXT,
        deps_left        INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    -- The claim path: runnable jobs in claim order; completed rows are not in it at all,
    -- so claiming stays O(log n) however many finished jobs the table holds.
    CREATE INDEX jobs_ready ON jobs(priority DESC, run_at, seq)
        WHERE state IN ('pending', 'failed') AND deps_left = 0;
    CREATE INDEX jobs_state ON jobs(state, seq);
    CREATE UNIQUE INDEX jobs_unique_key ON jobs(unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('pending', 'failed', 'processing');
    CREATE TABLE job_deps (
        dep_id TEXT NOT NULL,
        job_id TEXT NOT NULL,
        PRIMARY KEY (dep_id, job_id)
    ) WITHOUT ROWID;
    CREATE INDEX job_deps_job ON job_deps(job_id);
    CREATE TABLE job_runs (
        job_id      TEXT NOT NULL,
        attempt     INTEGER NOT NULL,
        worker_id   TEXT,
        started_at  REAL,
        finished_at REAL,
        exit_code   INTEGER,
        error       TEXT
    );
    CREATE INDEX job_runs_job ON job_runs(job_id);
    CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    """,
    # Version 2: fewer pages written per job (issue 4). Completed jobs, the bulk of the table,
    # leave jobs_state (counts of them come from count(*)), and a successful final attempt
    # is no longer copied into job_runs: the jobs row itself is that run's record.
    """
    DROP INDEX jobs_state;
    -- '!=' and not an IN list: SQLite evaluates this for every row written, and an IN
    -- list made bulk inserts 40 % slower.
    CREATE INDEX jobs_state ON jobs(state, seq) WHERE state != 'completed';
    DELETE FROM job_runs WHERE rowid IN (
        SELECT r.rowid FROM job_runs r JOIN jobs j ON j.id = r.job_id
        WHERE j.state = 'completed' AND r.attempt = j.attempts AND r.error IS NULL);
    """,
    # Version 3 (the "Polish" issue): a job runs with the environment of the command that
    # enqueued it, each distinct environment stored once (envs.digest: sha256 of its
    # canonical JSON); attempt numbers never restart: retry_base is the attempts count at
    # the last dlq retry (the retry budget and backoff count attempts - retry_base).
    """
    CREATE TABLE envs (
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        digest TEXT NOT NULL UNIQUE,
        vars   TEXT NOT NULL,               -- JSON object {name: value}
        inherit INTEGER NOT NULL DEFAULT 0  -- 1: vars go over the worker's own environment
    );
    ALTER TABLE jobs ADD COLUMN env_id INTEGER;          -- NULL: the worker's own environment
    ALTER TABLE jobs ADD COLUMN retry_base INTEGER NOT NULL DEFAULT 0;
    """,
    # Workers on many hosts (issue "Scale-out"): a registry every worker writes at start,
    # beats every few seconds and removes at a clean exit, so any host can list them and ask
    # them to stop; and where a job's full log lives ("host:path"), since logs stay on the
    # host that ran the attempt.
    """
    CREATE TABLE workers (
        worker_id      TEXT    PRIMARY KEY,             -- host:pid:start
        host           TEXT    NOT NULL,
        pid            INTEGER NOT NULL,
        started_at     REAL    NOT NULL,
        heartbeat_at   REAL    NOT NULL,
        mode           TEXT    NOT NULL DEFAULT '',
        stop_requested INTEGER NOT NULL DEFAULT 0       -- 1 graceful, 2 forced
    ) WITHOUT ROWID;
    ALTER TABLE jobs ADD COLUMN log_location TEXT;
    """,
    # Schedules (issue 13): recurring jobs fired by the workers. next_at is the next slot not
    # yet handled; the firing transaction claims a due row, enqueues its job(s) with ids
    # NAME@<slot> (the unique id is the last guard against a double fire) and moves next_at.
    # schedule_skips: slots that got no job (overlap skip, missed while no worker ran).
    """
    CREATE TABLE schedules (
        name          TEXT    PRIMARY KEY,
        kind          TEXT    NOT NULL,             -- 'cron' or 'every'
        expr          TEXT    NOT NULL,             -- cron expression, or the period as typed (5m)
        tz            TEXT,                         -- IANA zone of a cron schedule
        spec          TEXT    NOT NULL,             -- JSON job spec, as `enqueue` takes it
        env           TEXT,                         -- JSON environment of `schedule add`, or NULL
        catch_up      TEXT    NOT NULL,             -- latest | all | none
        overlap       TEXT    NOT NULL,             -- skip | queue | replace
        paused        INTEGER NOT NULL DEFAULT 0,
        created_at    REAL    NOT NULL,
        next_at       REAL    NOT NULL,             -- epoch of the next slot not yet handled
        last_slot     REAL,
        last_job      TEXT,
        last_fired_at REAL
    ) WITHOUT ROWID;
    -- What every worker asks every second: is any schedule due?
    CREATE INDEX schedules_due ON schedules(next_at) WHERE paused = 0;
    CREATE TABLE schedule_skips (
        name     TEXT    NOT NULL,
        slot_at  REAL    NOT NULL,                  -- first slot skipped
        until_at REAL    NOT NULL,                  -- last slot skipped (= slot_at for one)
        count    INTEGER NOT NULL,
        reason   TEXT    NOT NULL,
        at       REAL    NOT NULL
    );
    CREATE INDEX schedule_skips_name ON schedule_skips(name, at);
    """,
    # Running it as a service (issue 14): retention deletes the oldest finished jobs of a
    # state in small batches through jobs_finished (a range seek, never a scan), and run
    # counters (for /metrics) live in a table of their own, one row set per worker so
    # concurrent workers never write the same row, which retention never touches.
    """
    UPDATE jobs SET finished_at = updated_at
        WHERE finished_at IS NULL AND state IN ('completed', 'dead', 'cancelled');
    CREATE INDEX jobs_finished ON jobs(state, finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE counters (
        shard  TEXT NOT NULL,             -- the worker that counted ('' = folded, gone workers)
        metric TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '',  -- JSON object, sorted keys
        value  REAL NOT NULL,
        PRIMARY KEY (shard, metric, labels)
    ) WITHOUT ROWID;
    """,
    # Capacity (issue 12): every job is in a group (default 'default') that may have a limit
    # on how many of its jobs run at once, and counts as ``slots`` of its worker's slots.
    # groups.running counts the runs of the group that count against its limit (jobs with
    # counted = 1 in state processing); the triggers keep it right on every path a job enters
    # or leaves processing (claim, finish, release, recovery), so no code path can forget it.
    # Claims walk jobs_ready_grp once per open group: a full or paused group costs nothing,
    # however many jobs wait in it.
    """
    ALTER TABLE jobs ADD COLUMN grp TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE jobs ADD COLUMN slots INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN counted INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE groups (
        name     TEXT    PRIMARY KEY,
        parallel INTEGER,                    -- at most this many run at once; NULL: no limit
        running  INTEGER NOT NULL DEFAULT 0, -- runs counted against parallel
        paused   INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    INSERT INTO groups (name) VALUES ('default');
    DROP INDEX jobs_ready;
    CREATE INDEX jobs_ready_grp ON jobs(grp, priority DESC, run_at, seq)
        WHERE state IN ('pending', 'failed') AND deps_left = 0;
    CREATE TRIGGER jobs_group_enter AFTER UPDATE OF state ON jobs
        WHEN NEW.counted = 1 AND NEW.state = 'processing' AND OLD.state != 'processing'
    BEGIN
        UPDATE groups SET running = running + 1 WHERE name = NEW.grp;
    END;
    CREATE TRIGGER jobs_group_leave AFTER UPDATE OF state ON jobs
        WHEN OLD.counted = 1 AND OLD.state = 'processing' AND NEW.state != 'processing'
    BEGIN
        UPDATE groups SET running = running - 1 WHERE name = OLD.grp;
    END;
    ALTER TABLE workers ADD COLUMN capacity INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE workers ADD COLUMN groups TEXT NOT NULL DEFAULT '';  -- comma-separated; '' all
    """,
    # Version 8: waited_on = 1 on every job some dependent waits (or waited) for, set when
    # that dependent is enqueued; a finished run releases dependents only then, so the
    # common job without any pays no dependents statement (on PostgreSQL a round trip).
    """
    ALTER TABLE jobs ADD COLUMN waited_on INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET waited_on = 1 WHERE id IN (SELECT dep_id FROM job_deps);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

BUSY_DEADLINE = 60.0  # seconds a writer keeps retrying a busy database before giving up


def is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def _describe(path: Path, exc: BaseException) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return (f"{path} is not a valid queuectl database ({text}); "
                "move it aside or point QUEUECTL_HOME elsewhere")
    if "readonly" in text or "read-only" in text:
        return f"database {path} is read-only ({text}); check the permissions of it and its directory"
    if "unable to open" in text:
        return f"cannot open database {path} ({text}); check that its directory exists and is writable"
    return f"database {path}: {text}"


class Database:
    """One SQLite connection in autocommit mode; writes go through ``transaction()``.

    We keep SQLite's own busy handler off (it sleeps at least 1 ms per collision) and retry
    ``BEGIN IMMEDIATE`` ourselves with sub-millisecond jittered sleeps: under contention
    this is what keeps many workers fast, and no "database is locked" escapes to a user.
    """

    def __init__(self, path: "str | os.PathLike[str]", durable: bool = True) -> None:
        self.path = Path(path)
        try:
            private_dir(self.path.parent)
            if not self.path.exists():
                # SQLite gives the -wal and -shm files the mode of the database file.
                os.close(private_file(self.path))
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise StorageError(f"cannot create directory {self.path.parent}: {reason}") from None
        try:
            self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=0,
                                        check_same_thread=False)
            # FULL makes an acknowledged enqueue survive power loss; workers use NORMAL:
            # a lost state change after power loss only means a job runs again.
            # This pragma loads the schema, i.e. reads the file: with timeout=0 a fresh
            # connection can hit a transient SQLITE_BUSY (WAL header being rewritten by a
            # writer), so it gets the same retry as every other read.
            sync = "PRAGMA synchronous=" + ("FULL" if durable else "NORMAL")
            self._retry_read(lambda: self.conn.execute(sync))
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StorageError(_describe(self.path, exc)) from None
        self._in_txn = False
        self.wake_pending = False  # a wake() inside the open transaction, rung after COMMIT
        self.on_commit_wake: "Optional[Callable[[], None]]" = None

    def _migrate(self) -> None:
        version = self._retry_read(lambda: self.conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"database {self.path} has schema version {version}, newer than this queuectl "
                f"supports ({SCHEMA_VERSION}); upgrade queuectl (the file was not modified)")
        if version == SCHEMA_VERSION:
            return
        self._refuse_foreign(version)  # before journal_mode=WAL, which already writes the file
        self._retry_read(lambda: self.conn.execute("PRAGMA journal_mode=WAL").fetchone())
        self._begin()
        try:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            self._refuse_foreign(version)
            for index in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[index]):
                    self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def _refuse_foreign(self, version: int) -> None:
        """Version 0 with tables in it is some other program's SQLite file: never add ours."""
        if version != 0:
            return
        names = [row[0] for row in self._retry_read(lambda: self.conn.execute(
            "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' LIMIT 4").fetchall())]
        if names:
            raise StorageError(
                f"{self.path} is an SQLite file of another program (tables: {', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}), not a queuectl database; it was not modified. "
                "Point QUEUECTL_HOME elsewhere")

    def _begin(self) -> None:
        deadline = time.monotonic() + BUSY_DEADLINE
        delay = 0.0001
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.01)

    def _retry_read(self, fn):
        """Run a read, retrying while busy; any other database error (corrupt file, I/O
        error) becomes one clear StorageError instead of escaping as a raw sqlite3 error."""
        deadline = time.monotonic() + BUSY_DEADLINE
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() > deadline:
                    raise StorageError(_describe(self.path, exc)) from None
            except sqlite3.DatabaseError as exc:
                raise StorageError(_describe(self.path, exc)) from None
            time.sleep(0.001 * (0.5 + random.random()))

    def transaction(self) -> "Transaction":
        """A short write transaction; nests by joining the outer one."""
        return Transaction(self)

    def read(self, sql: str, params: "tuple | list" = ()) -> "list[tuple]":
        try:
            return self._retry_read(lambda: self.conn.execute(sql, params).fetchall())
        except sqlite3.DatabaseError as exc:
            raise StorageError(_describe(self.path, exc)) from None

    def vacuum(self, deadline: float = 5.0) -> bool:
        """VACUUM, then truncate the WAL so the file really shrinks; retried while busy for
        up to ``deadline`` seconds, then given up (best effort: True if it ran)."""
        end = time.monotonic() + deadline
        while True:
            try:
                self.conn.execute("VACUUM")
                break
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() > end:
                    return False
            time.sleep(0.01 * (0.5 + random.random()))
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError:
            pass  # a reader holds the WAL: it is truncated at a later checkpoint
        return True

    def close(self) -> None:
        self.conn.close()


def _statements(script: str) -> "list[str]":
    parts: "list[str]" = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            parts.append(buf.strip())
            buf = ""
    return [p for p in parts if p]


class Transaction:
    """``with db.transaction():`` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception.

    A class rather than @contextmanager because it is on every job's path (finish + claim).
    """

    __slots__ = ("db", "joined")

    def __init__(self, db: Database) -> None:
        self.db = db
        self.joined = False

    def __enter__(self) -> sqlite3.Connection:
        db = self.db
        if db._in_txn:
            self.joined = True
            return db.conn
        try:
            db._begin()
        except sqlite3.DatabaseError as exc:
            raise StorageError(_describe(db.path, exc)) from None
        db._in_txn = True
        return db.conn

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], _tb: Any) -> bool:
        if self.joined:
            return False
        db = self.db
        db._in_txn = False
        wake, db.wake_pending = db.wake_pending, False
        if exc is not None:
            try:
                db.conn.execute("ROLLBACK")
            except sqlite3.DatabaseError:
                pass  # a corrupt file can refuse even this; the transaction is abandoned anyway
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError):
                raise StorageError(_describe(db.path, exc)) from None  # e.g. malformed page
            return False
        try:
            db.conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise StorageError(_describe(db.path, exc)) from None
        if wake and db.on_commit_wake is not None:
            db.on_commit_wake()
        return False
