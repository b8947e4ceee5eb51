"""PostgreSQL backend of the storage seam (queuectl/store.py documents every method).

Many writers at once, so unlike SQLite the database does the arbitration: ids come from a
sequence, uniqueness from unique indexes (a violation becomes ``DuplicateKey``), claims from
``FOR UPDATE SKIP LOCKED`` and wake-ups from LISTEN/NOTIFY (delivered at COMMIT).

The tables live in a schema of their own: ``queuectl``, or the URL's ``schema=NAME`` query
parameter (stripped before connecting), or ``$QUEUECTL_PG_SCHEMA``; the URL wins.
One connection per store, in autocommit mode: reads outside ``transaction()`` never leave a
transaction open, and a broken connection (server restart, network) is reopened by the
next call, so a worker that lives for months survives them.
"""
from __future__ import annotations

import os
import re
import select
import time
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from queuectl import pg_schema
from queuectl.errors import DuplicateKey, StorageError
from queuectl.store import (CLAIM_COLUMNS, NEW_JOB_COLUMNS, SCHEDULE_COLUMNS, SCHEDULE_JOB_COLUMNS,
                            pad_new_job, with_activity)

SCHEMA_ENV = "QUEUECTL_PG_SCHEMA"
DEFAULT_SCHEMA = "queuectl"
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")  # quoted nowhere: keep it a plain identifier
BUSY_DEADLINE = 60.0  # seconds BEGIN keeps retrying an unreachable server... within one call
_COPY_MIN = 64  # rows from which a bulk insert goes through COPY

_READY = "state IN ('pending', 'failed') AND deps_left = 0"
_NOT_PAUSED = "NOT EXISTS (SELECT 1 FROM meta WHERE key = 'paused')"
_OPEN = "paused = 0 AND (parallel IS NULL OR running < parallel)"
# One statement: lock the open groups with a limit (FOR NO KEY UPDATE SKIP LOCKED: a group row
# another claimer or a finishing run holds is skipped, never waited for, so a limit holds
# across claimers and hosts and no claim deadlocks with finishes, which lock the row of a
# finished job's group through the trigger; that group's room is taken by the holder, and
# counted finishes ring the doorbell for the rest) and share-lock
# the groups without one (FOR KEY SHARE: claimers never wait for each other; a `group set`
# waits for them, see set_group_limit); take each open group's first ready rows through its
# own range of jobs_ready_grp (a full or paused group is never scanned), skipping rows another
# claimer holds; keep a limited group's rows within its room, then the first :limit of all,
# and flip them to processing. The trigger counts the limited ones in groups.running.
# The paused flag is read by the same statement. {groups}: the worker's group filter.
_CLAIM_SQL = (
    "WITH lim AS (SELECT name, parallel - running AS room FROM groups WHERE parallel IS NOT NULL "
    f"AND {_OPEN}{{groups}} AND {_NOT_PAUSED} FOR NO KEY UPDATE SKIP LOCKED), "
    f"unl AS (SELECT name FROM groups WHERE parallel IS NULL AND {_OPEN}{{groups}} AND {_NOT_PAUSED} "
    "FOR KEY SHARE), "
    "g AS (SELECT name, room FROM lim UNION ALL SELECT name, NULL FROM unl), "
    "cand AS (SELECT c.seq, c.priority, c.run_at, c.slots, g.room, g.name FROM g CROSS JOIN LATERAL "
    f"(SELECT seq, priority, run_at, slots FROM jobs WHERE grp = g.name AND {_READY} "
    "AND run_at <= %(now)s ORDER BY priority DESC, run_at, seq LIMIT %(limit)s "
    "FOR UPDATE SKIP LOCKED) AS c), "
    "picked AS (SELECT seq, priority, run_at, slots FROM (SELECT cand.*, row_number() OVER "
    "(PARTITION BY name ORDER BY priority DESC, run_at, seq) AS n FROM cand) AS r "
    "WHERE room IS NULL OR n <= room ORDER BY priority DESC, run_at, seq LIMIT %(limit)s)"
    "{fit} "
    "UPDATE jobs AS j SET state = 'processing', attempts = j.attempts + 1, worker_id = %(worker)s, "
    "started_at = %(now)s, finished_at = NULL, lease_until = %(lease)s, updated_at = %(now)s, "
    "job_pid = NULL, job_pid_start = NULL, exit_code = NULL, "
    "counted = CASE WHEN j.grp IN (SELECT name FROM lim) THEN 1 ELSE 0 END "
    "FROM {chosen} AS chosen WHERE j.seq = chosen.seq "
    "RETURNING " + ", ".join(f"j.{c}" for c in CLAIM_COLUMNS))
# Slots: the picked rows while their slots (each at most the worker's) fit in its free ones.
_FIT = (", fit AS (SELECT seq FROM (SELECT seq, sum(least(slots, %(capacity)s)) OVER "
        "(ORDER BY priority DESC, run_at, seq) AS used FROM picked) AS u WHERE used <= %(free)s)")
_HAS_READY_SQL = (
    "SELECT 1 FROM groups g CROSS JOIN LATERAL (SELECT 1 FROM jobs WHERE grp = g.name "
    f"AND {_READY} AND run_at <= %(now)s ORDER BY priority DESC, run_at, seq LIMIT 1) AS c "
    "WHERE g.paused = 0 AND (g.parallel IS NULL OR g.running < g.parallel){groups} "
    f"AND {_NOT_PAUSED} LIMIT 1")
_READY_HEAD_SQL = (
    "SELECT c.priority, c.run_at, c.seq FROM groups g CROSS JOIN LATERAL (SELECT priority, run_at, "
    f"seq FROM jobs WHERE grp = g.name AND {_READY} AND run_at <= %(now)s "
    "ORDER BY priority DESC, run_at, seq LIMIT 1) AS c "
    "WHERE g.paused = 0 AND (g.parallel IS NULL OR g.running < g.parallel){groups} "
    f"AND {_NOT_PAUSED} ORDER BY c.priority DESC, c.run_at, c.seq LIMIT 1")
# A batch of finished runs in one statement: the rows still ours (processing, our worker_id)
# are locked in seq order (as wait_on locks the jobs a new dependent waits for: the two never
# deadlock) and updated; RETURNING gives the waited_on flag of the row as updated, so one that
# waited for a dependent's enqueue to commit sees the flag that enqueue set. The rows are
# found by primary key: "state || ''" keeps the planner off jobs_state, whose generic plan
# walked every entry of 'processing', dead ones included (~260 per batch in a drain).
_RECORD_SQL = (
    "WITH v AS (SELECT * FROM unnest(%(seq)s::bigint[], %(state)s::text[], %(started)s::float8[], "
    "%(finished)s::float8[], %(exit)s::bigint[], %(tail)s::text[], %(error)s::text[], "
    "%(run_at)s::float8[], %(loc)s::text[]) AS v(seq, state, started_at, finished_at, exit_code, "
    "tail, error, run_at, loc)), "
    "t AS (SELECT seq FROM jobs WHERE seq = ANY(%(seq)s::bigint[]) AND state || '' = 'processing' "
    "AND worker_id = %(worker)s ORDER BY seq FOR UPDATE) "
    "UPDATE jobs SET state = v.state, started_at = v.started_at, finished_at = v.finished_at, "
    "updated_at = %(now)s, lease_until = NULL, job_pid = NULL, job_pid_start = NULL, "
    "exit_code = v.exit_code, output_tail = v.tail, last_error = v.error, "
    "run_at = coalesce(v.run_at, jobs.run_at), log_location = coalesce(v.loc, jobs.log_location) "
    "FROM t JOIN v ON v.seq = t.seq WHERE jobs.seq = t.seq RETURNING jobs.seq, jobs.waited_on")
_INSERT_COLUMNS = ("seq", "id", "command", "argv", "state", "priority", "max_retries", "timeout",
                   "cwd", "run_at", "created_at", "updated_at", "unique_key", "deps_left", "env_id",
                   "grp", "slots")
_ENV_GRACE = 3600.0  # seconds an env stays after its last use by an enqueue (see pg_schema v2)
_INSERT_SQL = (f"INSERT INTO jobs ({', '.join(_INSERT_COLUMNS)}) VALUES "
               f"({', '.join(['%s'] * len(_INSERT_COLUMNS))})")
assert len(NEW_JOB_COLUMNS) == 14, "keep _row() in step with NEW_JOB_COLUMNS"
_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)

T = TypeVar("T")


def parse_url(url: str) -> Tuple[str, str]:
    """(DSN to connect with, schema name): ``schema=NAME`` is ours, not libpq's."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = os.environ.get(SCHEMA_ENV) or DEFAULT_SCHEMA
    kept = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            kept.append((key, value))
    if not _SCHEMA_RE.match(schema):
        raise StorageError(f"invalid PostgreSQL schema name {schema!r}: use lowercase letters, "
                           "digits and underscores (at most 41), starting with a letter")
    return urlunsplit(parts._replace(query=urlencode(kept))), schema


def redact(dsn: str) -> str:
    """The DSN without its password (what ``location`` shows)."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = userinfo.split(":", 1)[0] + "@" + host
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _connect(dsn: str, schema: str) -> psycopg.Connection:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    extra: Dict[str, Any] = {}
    if "connect_timeout" not in info:
        extra["connect_timeout"] = 10
    if "keepalives_idle" not in info:  # notice a dead server on an idle worker's connection
        extra.update(keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
    if "application_name" not in info:  # pg_stat_activity shows which queue a session serves
        extra["application_name"] = f"queuectl:{schema}"
    return psycopg.connect(dsn, autocommit=True, **extra)


def drop_schema(url: str, schema: str) -> None:
    """Drop a queue's schema with everything in it (benchmarks and tests clean up with it)."""
    dsn, _ = parse_url(url)
    if not _SCHEMA_RE.match(schema):
        raise StorageError(f"invalid PostgreSQL schema name {schema!r}")
    try:
        with _connect(dsn, schema) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    except psycopg.Error as exc:
        raise StorageError(f"cannot drop schema {schema}: {_first_line(exc)}") from None


class PgStore:
    """Every SQL statement of the PostgreSQL backend lives here (and the schema beside it)."""

    # A transaction costs ~2 ms of round trips, server work and a WAL flush at COMMIT
    # whatever it holds: at 8 jobs that was most of a `true` job's cost, at 32 a fraction
    # (benchmarks/RESULTS.md, 2026-12-02 afternoon).
    batch = 32

    def __init__(self, url: str, role: str = "cli") -> None:
        self.dsn, self.schema = parse_url(url)
        self.role = role
        self.location = f"{redact(self.dsn)} (schema {self.schema})"
        self.channel = f"queuectl_{self.schema}"
        self._conn: Optional[psycopg.Connection] = None
        self._depth = 0          # nesting of transaction(): inner ones join the outer
        self._failed = False     # a statement failed inside the open transaction
        self._wake_pending = False
        self._listeners: List["PgListener"] = []
        self._claims: Dict[Any, str] = {}  # claim SQL per (group filter or not, slots or not)
        # How long BEGIN keeps reconnecting: a worker must get control back within a second
        # (it supervises a run whose lease it cannot renew, and has its own backoff); a CLI
        # command rides out a short server restart.
        self.begin_window = 1.0 if role == "worker" else 5.0
        self._connection()
        self._migrate()

    # -- connection -----------------------------------------------------------------------
    def _unavailable(self, exc: BaseException) -> StorageError:
        return StorageError(f"database unavailable: {_first_line(exc)} ({self.location})")

    def _connection(self) -> psycopg.Connection:
        """The open connection, reopened if it broke (only between transactions)."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if self._depth:
            raise StorageError(f"database unavailable: the connection was lost mid-transaction "
                               f"({self.location}); nothing of it was committed")
        self._drop()
        try:
            conn = _connect(self.dsn, self.schema)
            conn.execute(f"SET search_path TO {self.schema}")
        except psycopg.Error as exc:
            raise self._unavailable(exc) from None
        self._conn = conn
        for listener in self._listeners:  # they lose notifications on the same outages
            listener.revive()
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection may fail, who cares
                pass
            self._conn = None

    def _run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run one statement's worth of work; outside a transaction a lost connection is
        reopened and the (read) tried once more. Driver errors become StorageError."""
        for attempt in range(2):
            conn = self._connection()
            try:
                return fn(conn)
            except pg_errors.UniqueViolation:
                raise
            except psycopg.Error as exc:
                if self._depth:
                    self._failed = True
                    raise self._error(exc) from None
                if attempt == 0 and (conn.broken or conn.closed):
                    self._drop()
                    continue
                raise self._error(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, exc: psycopg.Error) -> StorageError:
        if isinstance(exc, _RETRYABLE):
            return StorageError(f"database busy ({_first_line(exc)}); the change was rolled back, "
                                "try again")
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return self._unavailable(exc)
        return StorageError(f"database error: {_first_line(exc)} ({self.location})")

    def _execute(self, sql: str, params: Any = None) -> psycopg.Cursor:
        return self._run(lambda conn: conn.execute(sql, params))

    def _rows(self, sql: str, params: Any = None) -> List[Tuple[Any, ...]]:
        return self._run(lambda conn: conn.execute(sql, params).fetchall())

    def _dicts(self, sql: str, params: Any = None) -> List[Dict[str, Any]]:
        def run(conn: psycopg.Connection) -> List[Dict[str, Any]]:
            with conn.cursor(row_factory=dict_row) as cur:
                return cur.execute(sql, params).fetchall()
        return self._run(run)

    def _migrate(self) -> None:
        """Create or upgrade the schema; concurrent first users serialize on an advisory
        lock, and a newer schema than this code knows is refused without touching it."""
        version = self._version()
        if version == pg_schema.SCHEMA_VERSION:
            return
        self._refuse_newer(version)
        with self.transaction():
            self._execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"queuectl:{self.schema}",))
            self._execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            version = self._version()
            self._refuse_newer(version)
            if version == 0:
                tables = [r[0] for r in self._rows(
                    "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1 LIMIT 4",
                    (self.schema,))]
                if tables:
                    raise StorageError(
                        f"schema {self.schema} holds tables of another program ({', '.join(tables[:3])}"
                        f"{', ...' if len(tables) > 3 else ''}), not a queuectl queue; it was not "
                        "modified. Name another one with ?schema=NAME in QUEUECTL_DB")
            for index in range(version, pg_schema.SCHEMA_VERSION):
                self._execute(pg_schema.MIGRATIONS[index])
            self._execute("INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) "
                          "DO UPDATE SET value = excluded.value",
                          (pg_schema.VERSION_KEY, str(pg_schema.SCHEMA_VERSION)))

    def _version(self) -> int:
        rows = self._rows("SELECT to_regclass(%s) IS NOT NULL", (f"{self.schema}.meta",))
        if not rows[0][0]:
            return 0
        rows = self._rows("SELECT value FROM meta WHERE key = %s", (pg_schema.VERSION_KEY,))
        return int(rows[0][0]) if rows else 0

    def _refuse_newer(self, version: int) -> None:
        if version > pg_schema.SCHEMA_VERSION:
            raise StorageError(
                f"database {self.location} has schema version {version}, newer than this queuectl "
                f"supports ({pg_schema.SCHEMA_VERSION}); upgrade queuectl (nothing was modified)")

    # -- plumbing -------------------------------------------------------------------------
    def transaction(self) -> ContextManager[Any]:
        return _Transaction(self)

    def wake(self) -> None:
        if self._depth:
            self._wake_pending = True  # NOTIFY is sent just before COMMIT, delivered by it
        else:
            self._execute("SELECT pg_notify(%s, '')", (self.channel,))

    def listen(self) -> "PgListener":
        listener = PgListener(self)
        self._listeners.append(listener)
        return listener

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        self._drop()

    # -- jobs: writes ---------------------------------------------------------------------
    def insert_jobs(self, jobs: Sequence[Sequence[Any]]) -> List[str]:
        if not jobs:
            return []
        seqs = sorted(r[0] for r in self._rows(
            "SELECT nextval('jobs_seq') FROM generate_series(1, %s)", (len(jobs),)))
        rows = [(seq, job[0] if job[0] is not None else str(seq), job[1], job[2], "pending", job[3],
                 job[4], job[5], job[6], job[7], job[8], job[8], job[9], job[10], job[11], job[12],
                 job[13])
                for seq, job in zip(seqs, (pad_new_job(j) if len(j) < 14 else j for j in jobs))]

        def insert(conn: psycopg.Connection) -> None:
            # A savepoint keeps the transaction usable after a duplicate (models retry it).
            with conn.transaction():
                with conn.cursor() as cur:
                    if len(rows) >= _COPY_MIN:
                        with cur.copy(f"COPY jobs ({', '.join(_INSERT_COLUMNS)}) FROM STDIN") as copy:
                            for row in rows:
                                copy.write_row(row)
                    else:
                        cur.executemany(_INSERT_SQL, rows)
        try:
            self._run(insert)
        except pg_errors.UniqueViolation as exc:
            raise _duplicate(exc) from None
        return [row[1] for row in rows]

    def clear_deps(self, job_id: str) -> None:
        self._execute("DELETE FROM job_deps WHERE job_id = %s", (job_id,))

    def env_id_for(self, digest: str, vars_json: str, inherit: bool) -> int:
        return self._rows(
            "INSERT INTO envs (digest, vars, inherit, used_at) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (digest) DO UPDATE SET used_at = EXCLUDED.used_at RETURNING id",
            (digest, vars_json, int(inherit), time.time()))[0][0]

    def get_env(self, env_id: int) -> Optional[Tuple[str, bool]]:
        rows = self._rows("SELECT vars, inherit FROM envs WHERE id = %s", (env_id,))
        return (rows[0][0], bool(rows[0][1])) if rows else None

    def reclaim(self) -> None:
        """Nothing: autovacuum gives dead rows' space back to new rows."""

    def insert_deps(self, pairs: Sequence[Tuple[str, str]]) -> None:
        pairs = list(pairs)
        if pairs:
            self._run(lambda conn: conn.cursor().executemany(
                "INSERT INTO job_deps (dep_id, job_id) VALUES (%s, %s) ON CONFLICT DO NOTHING", pairs))

    def _claim_sql(self, groups: Optional[Sequence[str]], fit: bool) -> str:
        key = (groups is not None, fit)
        sql = self._claims.get(key)
        if sql is None:
            sql = (_CLAIM_SQL.replace("{groups}", " AND name = ANY(%(groups)s)" if groups is not None else "")
                   .replace("{fit}", _FIT if fit else "").replace("{chosen}", "fit" if fit else "picked"))
            self._claims[key] = sql
        return sql

    def claim(self, worker_id: str, now: float, lease_until: float, limit: int = 1,
              groups: Optional[Sequence[str]] = None, free: Optional[int] = None,
              capacity: int = 1) -> List[Dict[str, Any]]:
        if groups is not None and not groups:
            return []
        rows = self._rows(self._claim_sql(groups, free is not None),
                          {"now": now, "limit": limit, "worker": worker_id, "lease": lease_until,
                           "groups": list(groups or ()), "free": free, "capacity": capacity})
        jobs = [dict(zip(CLAIM_COLUMNS, row)) for row in rows]
        if len(jobs) > 1:  # RETURNING follows the update's order, not the claim's
            jobs.sort(key=lambda job: (-job["priority"], job["run_at"], job["seq"]))
        return jobs

    def has_ready(self, now: float, groups: Optional[Sequence[str]] = None) -> bool:
        if groups is not None and not groups:
            return False
        sql = _HAS_READY_SQL.replace("{groups}", " AND g.name = ANY(%(groups)s)" if groups is not None else "")
        return bool(self._rows(sql, {"now": now, "groups": list(groups or ())}))

    def ready_head(self, now: float, groups: Optional[Sequence[str]] = None
                   ) -> Optional[Tuple[int, float, int]]:
        if groups is not None and not groups:
            return None
        sql = _READY_HEAD_SQL.replace("{groups}", " AND g.name = ANY(%(groups)s)" if groups is not None else "")
        rows = self._rows(sql, {"now": now, "groups": list(groups or ())})
        return tuple(rows[0]) if rows else None

    def next_run_at(self, groups: Optional[Sequence[str]] = None) -> Optional[float]:
        if groups is not None and not groups:
            return None
        where = " AND g.name = ANY(%(groups)s)" if groups is not None else ""
        rows = self._rows("SELECT min(j.run_at) FROM groups g JOIN jobs j ON j.grp = g.name "
                          "WHERE g.paused = 0 AND (g.parallel IS NULL OR g.running < g.parallel)"
                          f"{where} AND j.state IN ('pending', 'failed') AND j.deps_left = 0",
                          {"groups": list(groups or ())})
        return rows[0][0] if rows else None

    # -- groups ---------------------------------------------------------------------------
    def ensure_groups(self, names: Sequence[str]) -> None:
        self._execute("INSERT INTO groups (name) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING",
                      (list(names),))

    def set_group_limit(self, name: str, parallel: Optional[int]) -> None:
        self.ensure_groups([name])
        mark = ("UPDATE jobs SET counted = 1 WHERE grp = %s AND state = 'processing' "
                "AND counted = 0")
        marked = 0
        if parallel is not None:
            # Job rows first, then the group row: the order a finishing run locks them in
            # (its row, then, by the trigger, its group's), so the two never deadlock.
            marked = self._execute(mark, (name,)).rowcount
        # FOR UPDATE waits for the claims that share-locked the row (they saw no limit) to
        # commit; the next statement, with a fresh snapshot, then sees their jobs processing
        # and counts them (theirs are uncounted: finishing them never waits for this row).
        # A claim after this sees the limit (and waits for us to commit).
        self._execute("SELECT 1 FROM groups WHERE name = %s FOR UPDATE", (name,))
        if parallel is not None:
            marked += self._execute(mark, (name,)).rowcount
        self._execute("UPDATE groups SET parallel = %s, running = running + %s WHERE name = %s",
                      (parallel, marked, name))

    def set_group_paused(self, name: str, paused: bool) -> None:
        self.ensure_groups([name])
        self._execute("UPDATE groups SET paused = %s WHERE name = %s", (int(paused), name))

    def group_rows(self) -> List[Dict[str, Any]]:
        rows = self._dicts("SELECT name, parallel, running, paused FROM groups ORDER BY name")
        active = self._rows("SELECT grp, state, count(*) FROM jobs WHERE state IN "
                            "('pending', 'failed', 'processing') GROUP BY grp, state")
        return with_activity(rows, active)

    def group_rows_for(self, names: Sequence[str]) -> List[Dict[str, Any]]:
        names = list(names)
        if not names:
            return []
        return self._dicts("SELECT name, parallel, running, paused FROM groups WHERE name = ANY(%s)",
                           (names,))

    def update_job(self, job_id: str, fields: Dict[str, Any], *, states: Sequence[str] = (),
                   worker_id: Optional[str] = None) -> int:
        sets = ", ".join(f"{name} = %s" for name in fields)  # names come from models, not users
        sql = f"UPDATE jobs SET {sets} WHERE id = %s"
        params: List[Any] = [*fields.values(), job_id]
        if states:
            sql += " AND state = ANY(%s)"
            params.append(list(states))
        if worker_id is not None:
            sql += " AND worker_id = %s"
            params.append(worker_id)
        return self._execute(sql, params).rowcount

    def record_outcomes(self, worker_id: str, now: float,
                        rows: Sequence[Tuple[Any, ...]]) -> List[Optional[bool]]:
        if not rows:
            return []
        columns: List[List[Any]] = [[] for _ in range(9)]
        for row in rows:
            for column, value in zip(columns, row):
                column.append(value)
        # Text columns cannot hold NUL; a job may well print one.
        columns[5] = [t.replace("\x00", "\ufffd") if t and "\x00" in t else t for t in columns[5]]
        found = dict(self._rows(_RECORD_SQL, {
            "worker": worker_id, "now": now, "seq": columns[0], "state": columns[1],
            "started": columns[2], "finished": columns[3], "exit": columns[4], "tail": columns[5],
            "error": columns[6], "run_at": columns[7], "loc": columns[8]}))
        return [bool(found[row[0]]) if row[0] in found else None for row in rows]

    def add_run(self, job_id: str, attempt: int, worker_id: Optional[str],
                started_at: Optional[float], finished_at: float, exit_code: Optional[int],
                error: Optional[str]) -> None:
        self._execute(
            "INSERT INTO job_runs (job_id, attempt, worker_id, started_at, finished_at, exit_code, "
            "error) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (job_id, attempt, worker_id, started_at, finished_at, exit_code, error))

    def release_dependents(self, dep_ids: Sequence[str], now: float) -> int:
        # Rows are locked in seq order first: two workers releasing overlapping dependents
        # then queue up on the same row instead of deadlocking.
        return self._execute(
            "WITH t AS (SELECT j.id, (SELECT count(*) FROM job_deps d WHERE d.job_id = j.id "
            "AND d.dep_id = ANY(%(deps)s)) AS n FROM jobs j WHERE j.id IN (SELECT job_id FROM job_deps "
            "WHERE dep_id = ANY(%(deps)s)) AND j.deps_left > 0 AND j.state IN ('pending', 'failed') "
            "ORDER BY j.seq FOR UPDATE OF j) "
            "UPDATE jobs SET updated_at = %(now)s, deps_left = jobs.deps_left - t.n FROM t "
            "WHERE jobs.id = t.id AND jobs.deps_left > 0 AND jobs.state IN ('pending', 'failed')",
            {"deps": list(dep_ids), "now": now}).rowcount

    def delete_jobs(self, ids: Sequence[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        deleted = self._execute("DELETE FROM jobs WHERE id = ANY(%s)", (ids,)).rowcount
        self._execute("DELETE FROM job_runs WHERE job_id = ANY(%s)", (ids,))
        self._execute("DELETE FROM job_deps WHERE job_id = ANY(%s) OR dep_id = ANY(%s)", (ids, ids))
        if deleted:
            self._execute("DELETE FROM envs WHERE used_at < %s AND id NOT IN "
                          "(SELECT env_id FROM jobs WHERE env_id IS NOT NULL)",
                          (time.time() - _ENV_GRACE,))
        return deleted

    def purge_due(self, state: str, before: float, limit: int) -> List[str]:
        # SKIP LOCKED: workers purging at once take disjoint batches, and a row another
        # transaction is changing (a replace re-queueing it) is left for the next batch.
        ids = [r[0] for r in self._rows(
            "WITH doomed AS (SELECT seq FROM jobs WHERE state = %(state)s AND finished_at IS NOT NULL "
            "AND finished_at < %(before)s AND NOT EXISTS (SELECT 1 FROM job_deps d JOIN jobs c "
            "ON c.id = d.job_id WHERE d.dep_id = jobs.id AND c.state IN ('pending', 'failed', "
            "'processing')) ORDER BY finished_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
            "DELETE FROM jobs WHERE seq IN (SELECT seq FROM doomed) AND state = %(state)s RETURNING id",
            {"state": state, "before": before, "limit": limit})]
        if ids:
            self._execute("DELETE FROM job_runs WHERE job_id = ANY(%s)", (ids,))
            self._execute("DELETE FROM job_deps WHERE job_id = ANY(%s) OR dep_id = ANY(%s)", (ids, ids))
        return ids

    def drop_unused_envs(self) -> int:
        return self._execute("DELETE FROM envs WHERE used_at < %s AND id NOT IN "
                             "(SELECT env_id FROM jobs WHERE env_id IS NOT NULL)",
                             (time.time() - _ENV_GRACE,)).rowcount

    # -- jobs: reads ----------------------------------------------------------------------
    def get(self, job_id: str) -> Optional[Dict[str, Any]]:
        rows = self._dicts("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return rows[0] if rows else None

    def states_of(self, ids: Sequence[str]) -> Dict[str, str]:
        ids = list(ids)
        if not ids:
            return {}
        return dict(self._rows("SELECT id, state FROM jobs WHERE id = ANY(%s)", (ids,)))

    def wait_on(self, ids: Sequence[str]) -> Dict[str, str]:
        # Locked in seq order, as a finishing batch locks its rows: the two never deadlock.
        ids = list(ids)
        if not ids:
            return {}
        return dict(self._rows(
            "WITH t AS (SELECT seq FROM jobs WHERE id = ANY(%s) ORDER BY seq FOR UPDATE) "
            "UPDATE jobs SET waited_on = 1 FROM t WHERE jobs.seq = t.seq RETURNING jobs.id, jobs.state",
            (ids,)))

    def active_with_key(self, unique_key: str) -> Optional[str]:
        rows = self._rows("SELECT id FROM jobs WHERE unique_key = %s AND state IN "
                          "('pending', 'failed', 'processing')", (unique_key,))
        return rows[0][0] if rows else None

    def dependents(self, dep_id: str, states: Sequence[str]) -> List[str]:
        rows = self._rows("SELECT j.id FROM job_deps d JOIN jobs j ON j.id = d.job_id "
                          "WHERE d.dep_id = %s AND j.state = ANY(%s) ORDER BY j.seq",
                          (dep_id, list(states)))
        return [r[0] for r in rows]

    def dependencies(self, job_id: str) -> List[str]:
        return [r[0] for r in self._rows("SELECT dep_id FROM job_deps WHERE job_id = %s", (job_id,))]

    def runs(self, job_id: str) -> List[Dict[str, Any]]:
        return self._dicts(
            "SELECT attempt, worker_id, started_at, finished_at, exit_code, error FROM ("
            " SELECT 0 AS k, n AS r, attempt, worker_id, started_at, finished_at, exit_code, error"
            " FROM job_runs WHERE job_id = %s"
            " UNION ALL SELECT 1, 0, attempts, worker_id, started_at, finished_at, exit_code, NULL"
            " FROM jobs WHERE id = %s AND state = 'completed') AS t ORDER BY k, r", (job_id, job_id))

    def processing(self) -> List[Dict[str, Any]]:
        return self._dicts("SELECT id, worker_id, lease_until, job_pid, job_pid_start, attempts, "
                           "started_at, grp, slots, cancel_requested FROM jobs WHERE state = 'processing' ORDER BY seq")

    def cancels_for(self, worker_id: str) -> List[str]:
        # state = 'processing' implies the partial jobs_state index's state <> 'completed'.
        return [r[0] for r in self._rows(
            "SELECT id FROM jobs WHERE state = 'processing' AND worker_id = %s "
            "AND cancel_requested <> 0", (worker_id,))]

    def counts(self, group: Optional[str] = None) -> Dict[str, int]:
        if group is not None:
            return dict(self._rows("SELECT state, count(*) FROM jobs WHERE grp = %s GROUP BY state",
                                   (group,)))
        return dict(self._rows("SELECT state, count(*) FROM jobs GROUP BY state"))

    def list_jobs(self, states: Sequence[str] = (), limit: int = 0,
                  group: Optional[str] = None) -> List[Dict[str, Any]]:
        sql = "SELECT * FROM jobs"
        params: List[Any] = []
        where = []
        if states:
            where.append("state = ANY(%s)")
            params.append(list(states))
        if group is not None:
            where.append("grp = %s")
            params.append(group)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC"
        if limit:
            sql += " LIMIT %s"
            params.append(limit)
        rows = self._dicts(sql, params)
        rows.reverse()
        return rows

    def finished_before(self, states: Sequence[str], before: float) -> List[str]:
        rows = self._rows("SELECT id FROM jobs WHERE state = ANY(%s) "
                          "AND coalesce(finished_at, updated_at) < %s ORDER BY seq",
                          (list(states), before))
        return [r[0] for r in rows]

    def span(self, first_seq: int, last_seq: int) -> Dict[str, Any]:
        rows = self._rows("SELECT count(*) FILTER (WHERE state <> 'completed'), min(started_at), "
                          "max(finished_at) FROM jobs WHERE seq BETWEEN %s AND %s",
                          (first_seq, last_seq))
        left, started, finished = rows[0]
        return {"left": left, "started_at": started, "finished_at": finished}

    def tidy(self) -> None:
        if self._depth:
            raise StorageError("tidy() cannot run inside a transaction")
        for table in ("jobs", "job_runs", "job_deps"):
            self._execute(f"VACUUM ANALYZE {table}")  # autocommit: VACUUM needs its own

    def runs_since(self, since: float) -> List[Dict[str, Any]]:
        return self._dicts(
            "SELECT command, argv, grp, 'completed' AS outcome, started_at, finished_at FROM jobs "
            "WHERE state = 'completed' AND finished_at IS NOT NULL AND finished_at >= %(since)s "
            "UNION ALL SELECT j.command, j.argv, j.grp, CASE WHEN r.error IS NULL THEN 'completed' "
            "WHEN r.error LIKE 'cancelled%%' THEN 'cancelled' ELSE 'failed' END, r.started_at, "
            "r.finished_at FROM job_runs r JOIN jobs j ON j.id = r.job_id "
            "WHERE r.finished_at >= %(since)s", {"since": since})

    # -- counters -------------------------------------------------------------------------
    def add_counts(self, shard: str, deltas: Sequence[Tuple[str, str, float]]) -> None:
        if deltas:  # one statement (keys are distinct: run_deltas sums per key)
            metrics, labels, amounts = zip(*sorted(deltas))
            self._execute(
                "INSERT INTO counters (shard, metric, labels, value) SELECT %s, * FROM "
                "unnest(%s::text[], %s::text[], %s::float8[]) ON CONFLICT (shard, metric, labels) "
                "DO UPDATE SET value = counters.value + excluded.value",
                (shard, list(metrics), list(labels), list(amounts)))

    def counter_totals(self) -> Dict[Tuple[str, str], float]:
        return {(metric, labels): value for metric, labels, value in self._rows(
            "SELECT metric, labels, sum(value) FROM counters GROUP BY metric, labels")}

    def fold_counts(self) -> int:
        # DELETE ... RETURNING: a row a concurrent fold deleted first is not returned here,
        # so its value is added to shard '' once.
        rows = self._rows("DELETE FROM counters WHERE shard <> '' AND shard NOT IN "
                          "(SELECT worker_id FROM workers) RETURNING metric, labels, value")
        self.add_counts("", rows)
        return len(rows)

    # -- worker registry ------------------------------------------------------------------
    def register_worker(self, worker_id: str, host: str, pid: int, started_at: float,
                        mode: str, now: float, capacity: int = 1, groups: str = "") -> None:
        self._execute(
            "INSERT INTO workers (worker_id, host, pid, started_at, heartbeat_at, mode, stop_requested, "
            "capacity, groups) VALUES (%s, %s, %s, %s, %s, %s, 0, %s, %s) ON CONFLICT (worker_id) "
            "DO UPDATE SET host = excluded.host, pid = excluded.pid, started_at = excluded.started_at, "
            "heartbeat_at = excluded.heartbeat_at, mode = excluded.mode, stop_requested = 0, "
            "capacity = excluded.capacity, groups = excluded.groups",
            (worker_id, host, pid, started_at, now, mode, capacity, groups))

    def beat_worker(self, worker_id: str, now: float) -> Optional[int]:
        rows = self._rows("UPDATE workers SET heartbeat_at = %s WHERE worker_id = %s "
                          "RETURNING stop_requested", (now, worker_id))
        return int(rows[0][0]) if rows else None

    def unregister_worker(self, worker_id: str) -> None:
        self._execute("DELETE FROM workers WHERE worker_id = %s", (worker_id,))

    def registered_workers(self) -> List[Dict[str, Any]]:
        return self._dicts("SELECT worker_id, host, pid, started_at, heartbeat_at, mode, stop_requested, "
                           "capacity, groups FROM workers ORDER BY host, started_at, worker_id")

    def forget_workers(self, beaten_before: float) -> int:
        return self._execute("DELETE FROM workers WHERE heartbeat_at < %s", (beaten_before,)).rowcount

    def request_stop(self, level: int, worker_ids: Optional[Sequence[str]] = None) -> int:
        if worker_ids is None:
            return self._execute("UPDATE workers SET stop_requested = greatest(stop_requested, %s)",
                                 (level,)).rowcount
        return self._execute("UPDATE workers SET stop_requested = greatest(stop_requested, %s) "
                             "WHERE worker_id = ANY(%s)", (level, list(worker_ids))).rowcount

    # -- schedules ------------------------------------------------------------------------
    def insert_schedule(self, row: Dict[str, Any]) -> None:
        def insert(conn: psycopg.Connection) -> None:
            with conn.transaction():  # a savepoint: the transaction stays usable after a duplicate
                conn.execute(f"INSERT INTO schedules ({', '.join(SCHEDULE_COLUMNS)}) VALUES "
                             f"({', '.join(['%s'] * len(SCHEDULE_COLUMNS))})",
                             [row[c] for c in SCHEDULE_COLUMNS])
        try:
            self._run(insert)
        except pg_errors.UniqueViolation:
            raise DuplicateKey("schedule", row["name"]) from None

    def update_schedule(self, name: str, fields: Dict[str, Any]) -> int:
        sets = ", ".join(f"{column} = %s" for column in fields)  # names come from models
        return self._execute(f"UPDATE schedules SET {sets} WHERE name = %s",
                             [*fields.values(), name]).rowcount

    def delete_schedule(self, name: str) -> int:
        self._execute("DELETE FROM schedule_skips WHERE name = %s", (name,))
        return self._execute("DELETE FROM schedules WHERE name = %s", (name,)).rowcount

    def get_schedule(self, name: str) -> Optional[Dict[str, Any]]:
        rows = self._dicts("SELECT * FROM schedules WHERE name = %s", (name,))
        return rows[0] if rows else None

    def list_schedules(self) -> List[Dict[str, Any]]:
        return self._dicts("SELECT * FROM schedules ORDER BY name")

    def next_schedule_due(self) -> Optional[float]:
        rows = self._rows("SELECT min(next_at) FROM schedules WHERE paused = 0")
        return rows[0][0] if rows else None

    def claim_due_schedule(self, now: float) -> Optional[Dict[str, Any]]:
        # Under READ COMMITTED a row another firer just committed is re-checked against the
        # WHERE (its new next_at), so a slot it handled is never handled again here.
        rows = self._dicts("SELECT * FROM schedules WHERE paused = 0 AND next_at <= %s "
                           "ORDER BY next_at LIMIT 1 FOR UPDATE SKIP LOCKED", (now,))
        return rows[0] if rows else None

    def add_schedule_skip(self, name: str, slot_at: float, until_at: float, count: int,
                          reason: str, at: float, keep: int) -> None:
        self._execute("INSERT INTO schedule_skips (name, slot_at, until_at, count, reason, at) "
                      "VALUES (%s, %s, %s, %s, %s, %s)", (name, slot_at, until_at, count, reason, at))
        self._execute("DELETE FROM schedule_skips WHERE name = %s AND n NOT IN (SELECT n FROM "
                      "schedule_skips WHERE name = %s ORDER BY at DESC, n DESC LIMIT %s)",
                      (name, name, keep))

    def extend_schedule_skip(self, name: str, ended_at: float, reason: str, until_at: float,
                             at: float) -> int:
        return self._execute("UPDATE schedule_skips SET until_at = %s, count = count + 1, at = %s "
                             "WHERE name = %s AND until_at = %s AND reason = %s",
                             (until_at, at, name, ended_at, reason)).rowcount

    def schedule_skips(self, name: str, limit: int) -> List[Dict[str, Any]]:
        return self._dicts("SELECT slot_at, until_at, count, reason, at FROM schedule_skips "
                           "WHERE name = %s ORDER BY at DESC, n DESC LIMIT %s", (name, limit))

    def jobs_with_prefix(self, prefix: str, limit: int) -> List[Dict[str, Any]]:
        return self._dicts(f"SELECT {', '.join(SCHEDULE_JOB_COLUMNS)} FROM jobs "
                           "WHERE starts_with(id, %s) ORDER BY seq DESC LIMIT %s", (prefix, limit))

    # -- config and flags -----------------------------------------------------------------
    def config_items(self) -> Dict[str, str]:
        return dict(self._rows("SELECT key, value FROM config"))

    def config_set(self, key: str, value: str) -> None:
        self._execute("INSERT INTO config (key, value) VALUES (%s, %s) "
                      "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def config_unset(self, key: str) -> None:
        self._execute("DELETE FROM config WHERE key = %s", (key,))

    def flag(self, key: str) -> Optional[str]:
        rows = self._rows("SELECT value FROM meta WHERE key = %s", (key,))
        return rows[0][0] if rows else None

    def set_flag(self, key: str, value: Optional[str]) -> None:
        if value is None:
            self._execute("DELETE FROM meta WHERE key = %s", (key,))
        else:
            self._execute("INSERT INTO meta (key, value) VALUES (%s, %s) "
                          "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def _duplicate(exc: pg_errors.UniqueViolation) -> DuplicateKey:
    diag = exc.diag
    what = "unique_key" if "unique_key" in (diag.constraint_name or "") else "id"
    match = re.search(r"\)=\((.*)\) already exists", diag.message_detail or "")
    return DuplicateKey(what, match.group(1) if match else None)


class _Transaction:
    """``with store.transaction():`` BEGIN ... COMMIT, or ROLLBACK on an exception; nested
    ones join the outer. A lost connection at BEGIN is reopened and BEGIN retried."""

    __slots__ = ("store", "joined")

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self.joined = False

    def __enter__(self) -> Any:
        store = self.store
        if store._depth:
            self.joined = True
            store._depth += 1
            return store
        deadline = time.monotonic() + store.begin_window
        while True:
            conn = store._connection()
            try:
                conn.execute("BEGIN")
                break
            except psycopg.Error as exc:
                store._drop()
                if time.monotonic() > deadline:
                    raise store._unavailable(exc) from None
                time.sleep(0.1)
        store._depth = 1
        store._failed = False
        store._wake_pending = False
        return store

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], _tb: Any) -> bool:
        store = self.store
        store._depth -= 1
        if self.joined:
            return False
        wake, store._wake_pending = store._wake_pending, False
        failed, store._failed = store._failed, False
        conn = store._conn
        if exc is not None or failed:
            if conn is not None and not conn.closed and not conn.broken:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    store._drop()  # never leave a failed transaction open
            else:
                store._drop()
            if isinstance(exc, psycopg.Error):
                raise store._error(exc) from None
            if exc is None:  # someone swallowed the StorageError of a failed statement
                raise StorageError("database error: a statement of this transaction failed; "
                                   "it was rolled back")
            return False
        if conn is None or conn.closed or conn.broken:
            store._drop()
            raise StorageError(f"database unavailable: the connection was lost before COMMIT "
                               f"({store.location}); the change may not have been saved")
        try:
            # One round trip: the NOTIFY is queued in the transaction and delivered by COMMIT.
            conn.execute(f"NOTIFY {store.channel}; COMMIT" if wake else "COMMIT")
        except psycopg.Error as err:
            if not conn.broken:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    store._drop()
            else:
                store._drop()
            raise store._error(err) from None
        return False


class PgListener:
    """LISTEN on a connection of its own. ``fileno()`` is stable for the listener's life: a
    duplicate of the connection's socket, swapped for a never-readable pipe while the
    connection is down (workers poll every poll_interval anyway), and back once reconnected."""

    RETRY_EVERY = 1.0

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self._pipe_r, self._pipe_w = os.pipe()  # the stand-in: nobody writes to it
        self._fd = os.dup(self._pipe_r)
        self._conn: Optional[psycopg.Connection] = None
        self._next_try = 0.0
        self._connect(raise_errors=True)

    def _connect(self, raise_errors: bool = False) -> None:
        self._next_try = time.monotonic() + self.RETRY_EVERY
        try:
            conn = _connect(self.store.dsn, self.store.schema)
            conn.execute(f"LISTEN {self.store.channel}")
        except psycopg.Error as exc:
            if raise_errors:
                raise self.store._unavailable(exc) from None
            return
        self._conn = conn
        os.dup2(conn.fileno(), self._fd)

    def _broken(self) -> None:
        os.dup2(self._pipe_r, self._fd)
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None

    def revive(self) -> None:
        """Reconnect if down (the store calls this whenever it reconnects itself)."""
        if self._conn is None and self._fd >= 0 and time.monotonic() >= self._next_try:
            self._connect()

    def fileno(self) -> int:
        if self._conn is None:
            self.revive()
        return self._fd

    def drain(self) -> None:
        conn = self._conn
        if conn is None:
            self.revive()
            return
        try:
            pgconn = conn.pgconn
            for _ in range(8):  # an error message and the EOF after it may take two reads
                pgconn.consume_input()
                while pgconn.notifies() is not None:
                    pass
                if pgconn.status != psycopg.pq.ConnStatus.OK:
                    raise psycopg.OperationalError("listen connection lost")
                if not select.select([self._fd], [], [], 0)[0]:
                    return
            raise psycopg.OperationalError("listen connection stays readable")
        except psycopg.Error:
            self._broken()
            self.revive()

    def close(self) -> None:
        if self._fd < 0:
            return
        self._broken()
        for fd in (self._fd, self._pipe_r, self._pipe_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd = -1
        if self in self.store._listeners:
            self.store._listeners.remove(self)
