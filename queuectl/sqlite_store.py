"""SQLite backend of the storage seam (queuectl/store.py documents every method).

One writer at a time (BEGIN IMMEDIATE) is what lets ids come from ``max(seq) + 1`` and
uniqueness from a plain index; wake-ups are FIFO doorbells rung after COMMIT.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, ContextManager, Iterable, Sequence

from queuectl import wakeup
from queuectl.database import Database
from queuectl.errors import DuplicateKey
from queuectl.paths import private_dir
from queuectl.store import (CLAIM_COLUMNS, NEW_JOB_COLUMNS, SCHEDULE_COLUMNS, SCHEDULE_JOB_COLUMNS,
                            _NEW_JOB_DEFAULTS, with_activity)

# Parameters: the sequence number, then a NEW_JOB_COLUMNS tuple. A missing id is the sequence
# number itself (TEXT affinity stores it as text), so no str() per generated id in Python.
_INSERT_SQL = ("INSERT INTO jobs (seq, id, command, argv, state, priority, max_retries, timeout, cwd, "
               "run_at, created_at, updated_at, unique_key, deps_left, env_id, grp, slots) VALUES "
               "(?1, coalesce(?2, ?1), ?3, ?4, 'pending', ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11, ?12, ?13, "
               "?14, ?15)")
assert len(NEW_JOB_COLUMNS) == 14, "keep _INSERT_SQL in step with NEW_JOB_COLUMNS"
# Queries must repeat the WHERE of a partial index term for term so SQLite may use it.
_READY = "state IN ('pending', 'failed') AND deps_left = 0"
# jobs_state leaves out completed jobs (the bulk of the table): one index write less per job.
_NOT_COMPLETED = "state != 'completed'"
_OPEN_GROUP = "g.paused = 0 AND (g.parallel IS NULL OR g.running < g.parallel)"
# The claim's pick: for each open group (a paused or full one is skipped without reading its
# jobs), its first :limit ready jobs through its own range of jobs_ready_grp (INDEXED BY:
# without statistics the planner would sort every ready row, O(pending) per claim); a group
# with a limit keeps only as many as it has room for; then the first :limit of all, in claim
# order. O(groups * limit * log n). A paused queue has no ready job: the flag is read by the
# same statement, not a second one. {groups}: the worker's group filter, if any.
_PICK_SQL = ("SELECT seq, priority, run_at, slots FROM (SELECT j.seq, j.priority, j.run_at, j.slots, "
             "row_number() OVER (PARTITION BY g.name ORDER BY j.priority DESC, j.run_at, j.seq) AS n, "
             "g.parallel - g.running AS room FROM groups g, jobs j "
             f"WHERE {_OPEN_GROUP}{{groups}} AND NOT EXISTS (SELECT 1 FROM meta WHERE key = 'paused') "
             "AND j.seq IN (SELECT seq FROM jobs INDEXED BY jobs_ready_grp WHERE grp = g.name "
             f"AND {_READY} AND run_at <= :now ORDER BY priority DESC, run_at, seq LIMIT :limit)) "
             "WHERE room IS NULL OR n <= room ORDER BY priority DESC, run_at, seq LIMIT :limit")
# Slots: the picked jobs while their slots (each at most the worker's) fit in its free ones.
_FIT_SQL = ("SELECT seq FROM (SELECT seq, sum(min(slots, :capacity)) OVER "
            "(ORDER BY priority DESC, run_at, seq) AS used FROM ({pick})) WHERE used <= :free")
_CLAIM_UPDATE = ("UPDATE jobs SET state = 'processing', attempts = attempts + 1, worker_id = :worker, "
                 "started_at = :now, finished_at = NULL, lease_until = :lease, updated_at = :now, "
                 "job_pid = NULL, job_pid_start = NULL, exit_code = NULL, "
                 "counted = (SELECT parallel IS NOT NULL FROM groups WHERE name = jobs.grp) "
                 "WHERE seq IN ")
_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
_CHUNK = 500


def _dicts(cursor: sqlite3.Cursor) -> "list[dict[str, Any]]":
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


class SqliteStore:
    """Every SQL statement about jobs, config and flags lives here."""

    # With two workers every transaction starts on a page cache the other one just
    # invalidated; 8 short jobs per transaction made that a small part of a job's cost,
    # and more would only keep work from idle peers (benchmarks/RESULTS.md).
    batch = 8

    def __init__(self, path: "str | os.PathLike[str]", durable: bool = True,
                 workers_dir: "Path | None" = None) -> None:
        self.db = Database(path, durable=durable)
        self.conn = self.db.conn
        self.location = str(self.db.path)
        # Doorbells live beside the PID files; without a workers_dir nobody is woken.
        self.workers_dir = workers_dir if workers_dir is not None else self.db.path.parent / "workers"
        self.db.on_commit_wake = self._ring
        self._picks: "dict[Any, str]" = {}  # claim SQL per (group filter, slots or not)

    # -- plumbing -------------------------------------------------------------------------
    def transaction(self) -> ContextManager[sqlite3.Connection]:
        return self.db.transaction()

    def wake(self) -> None:
        if self.db._in_txn:
            self.db.wake_pending = True  # rung by the transaction after COMMIT
        else:
            self._ring()

    def _ring(self) -> None:
        wakeup.ring(self.workers_dir)

    def listen(self) -> wakeup.Doorbell:
        private_dir(self.workers_dir)
        return wakeup.Doorbell(self.workers_dir)

    def close(self) -> None:
        self.db.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> "list[dict[str, Any]]":
        return self.db._retry_read(lambda: _dicts(self.conn.execute(sql, params)))

    # -- jobs: writes ---------------------------------------------------------------------
    def insert_jobs(self, jobs: Sequence[Sequence[Any]]) -> "list[str]":
        # Inside BEGIN IMMEDIATE nobody else can take these numbers; sqlite_sequence holds the
        # highest ever used, so purged numbers are never handed out again.
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
        first = (row[0] if row else 0) + 1
        try:
            self.conn.executemany(_INSERT_SQL, [(first + i, *job, *_NEW_JOB_DEFAULTS[len(job):])
                                                for i, job in enumerate(jobs)])
        except sqlite3.IntegrityError as exc:
            raise DuplicateKey("unique_key" if "unique_key" in str(exc) else "id") from None
        return [job[0] if job[0] is not None else str(first + i) for i, job in enumerate(jobs)]

    def insert_deps(self, pairs: Iterable[Sequence[str]]) -> None:
        """Pairs of (dep_id, job_id): job_id waits for dep_id."""
        self.conn.executemany("INSERT OR IGNORE INTO job_deps (dep_id, job_id) VALUES (?, ?)", pairs)

    def clear_deps(self, job_id: str) -> None:
        self.conn.execute("DELETE FROM job_deps WHERE job_id = ?", (job_id,))

    def env_id_for(self, digest: str, vars_json: str, inherit: bool) -> int:
        row = self.conn.execute("SELECT id FROM envs WHERE digest = ?", (digest,)).fetchone()
        if row:
            return row[0]
        return self.conn.execute("INSERT INTO envs (digest, vars, inherit) VALUES (?, ?, ?)",
                                 (digest, vars_json, int(inherit))).lastrowid

    def get_env(self, env_id: int) -> "tuple[str, bool] | None":
        rows = self.db.read("SELECT vars, inherit FROM envs WHERE id = ?", (env_id,))
        return (rows[0][0], bool(rows[0][1])) if rows else None

    def _pick_sql(self, groups: "Sequence[str] | None", fit: bool) -> str:
        key = (tuple(groups) if groups is not None else None, fit)
        sql = self._picks.get(key)
        if sql is None:
            sql = _PICK_SQL.replace("{groups}", self._group_where(groups))
            if fit:
                sql = _FIT_SQL.replace("{pick}", sql)
            else:
                sql = f"SELECT seq FROM ({sql})"
            self._picks[key] = sql
        return sql

    @staticmethod
    def _group_where(groups: "Sequence[str] | None") -> str:
        if groups is None:
            return ""
        return f" AND g.name IN ({', '.join(f':g{i}' for i in range(len(groups)))})"

    @staticmethod
    def _params(groups: "Sequence[str] | None", **values: Any) -> "dict[str, Any]":
        if groups is not None:
            values.update((f"g{i}", name) for i, name in enumerate(groups))
        return values

    def claim(self, worker_id: str, now: float, lease_until: float, limit: int = 1,
              groups: "Sequence[str] | None" = None, free: "int | None" = None,
              capacity: int = 1) -> "list[dict[str, Any]]":
        """Up to ``limit`` ready jobs (CLAIM_COLUMNS only), now processing, in claim order;
        none while paused (see the Store protocol for groups and slots)."""
        if groups is not None and not groups:
            return []
        pick = self._pick_sql(groups, free is not None)
        params = self._params(groups, now=now, limit=limit, worker=worker_id, lease=lease_until,
                              free=free, capacity=capacity)
        if _HAS_RETURNING:  # one statement instead of three, on every job's path
            # fetchall, not fetchone: it steps the statement to its end, so it is finished
            # (not merely pending) before COMMIT, whatever the cursor's lifetime.
            rows = self.conn.execute(f"{_CLAIM_UPDATE}({pick}) RETURNING {', '.join(CLAIM_COLUMNS)}",
                                     params).fetchall()
            jobs = [dict(zip(CLAIM_COLUMNS, row)) for row in rows]
        else:
            seqs = [row[0] for row in self.conn.execute(pick, params)]
            if not seqs:
                return []
            marks = ", ".join(f":s{i}" for i in range(len(seqs)))
            params.update((f"s{i}", seq) for i, seq in enumerate(seqs))
            self.conn.execute(f"{_CLAIM_UPDATE}({marks})", params)
            jobs = _dicts(self.conn.execute(
                f"SELECT {', '.join(CLAIM_COLUMNS)} FROM jobs WHERE seq IN ({marks})", params))
        if len(jobs) > 1:  # RETURNING follows the update's order, not the claim's
            jobs.sort(key=lambda job: (-job["priority"], job["run_at"], job["seq"]))
        return jobs

    def has_ready(self, now: float, groups: "Sequence[str] | None" = None) -> bool:
        """Lock-free probe so idle workers only take the write lock when work is due."""
        if groups is not None and not groups:
            return False
        sql, params = self._pick_sql(groups, False), self._params(groups, now=now, limit=1)
        return bool(self.db._retry_read(lambda: self.conn.execute(sql, params).fetchone()))

    def ready_head(self, now: float, groups: "Sequence[str] | None" = None
                   ) -> "tuple[int, float, int] | None":
        if groups is not None and not groups:
            return None
        sql = "SELECT priority, run_at, seq FROM (" + _PICK_SQL.replace("{groups}", self._group_where(groups)) + ")"
        params = self._params(groups, now=now, limit=1)
        row = self.db._retry_read(lambda: self.conn.execute(sql, params).fetchone())
        return tuple(row) if row else None

    def next_run_at(self, groups: "Sequence[str] | None" = None) -> "float | None":
        where = ""
        if groups is not None:
            if not groups:
                return None
            where = f" AND g.name IN ({', '.join('?' * len(groups))})"
        rows = self.db.read(f"SELECT min(j.run_at) FROM groups g, jobs j INDEXED BY jobs_ready_grp "
                            f"WHERE {_OPEN_GROUP}{where} AND j.grp = g.name AND j.{_READY.replace(' AND ', ' AND j.')}",
                            tuple(groups or ()))
        return rows[0][0] if rows else None

    # -- groups ---------------------------------------------------------------------------
    def ensure_groups(self, names: Sequence[str]) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO groups (name) VALUES (?)", [(n,) for n in names])

    def set_group_limit(self, name: str, parallel: "int | None") -> None:
        self.ensure_groups([name])
        marked = 0
        if parallel is not None:  # one writer at a time: nothing runs or ends meanwhile
            marked = self.conn.execute("UPDATE jobs SET counted = 1 WHERE grp = ? AND "
                                       f"{_NOT_COMPLETED} AND state = 'processing' AND counted = 0",
                                       (name,)).rowcount
        self.conn.execute("UPDATE groups SET parallel = ?, running = running + ? WHERE name = ?",
                          (parallel, marked, name))

    def set_group_paused(self, name: str, paused: bool) -> None:
        self.ensure_groups([name])
        self.conn.execute("UPDATE groups SET paused = ? WHERE name = ?", (int(paused), name))

    def group_rows(self) -> "list[dict[str, Any]]":
        rows = self._query("SELECT name, parallel, running, paused FROM groups ORDER BY name")
        active = self.db.read(f"SELECT grp, state, count(*) FROM jobs INDEXED BY jobs_state "
                              f"WHERE {_NOT_COMPLETED} AND state IN ('pending', 'failed', 'processing') "
                              "GROUP BY grp, state")
        return with_activity(rows, active)

    def group_rows_for(self, names: Sequence[str]) -> "list[dict[str, Any]]":
        names = list(names)
        if not names:
            return []
        marks = ", ".join("?" * len(names))
        return self._query(f"SELECT name, parallel, running, paused FROM groups WHERE name IN ({marks})",
                           names)

    def update_job(self, job_id: str, fields: "dict[str, Any]", *, states: Sequence[str] = (),
                   worker_id: "str | None" = None) -> int:
        """Update one job if it is (still) in one of ``states`` and owned by ``worker_id``."""
        sets = ", ".join(f"{name} = ?" for name in fields)
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"
        params: "list[Any]" = [*fields.values(), job_id]
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            params.extend(states)
        if worker_id is not None:
            sql += " AND worker_id = ?"
            params.append(worker_id)
        return self.conn.execute(sql, params).rowcount

    def record_outcomes(self, worker_id: str, now: float,
                        rows: "Sequence[tuple]") -> "list[bool | None]":
        """See Store.record_outcomes: a fixed statement by rowid per run (in-process, a
        statement is microseconds), then one read of the waited_on flags of those recorded."""
        recorded: "list[bool | None]" = []
        for seq, state, started_at, finished_at, exit_code, tail, error, run_at, location in rows:
            count = self.conn.execute(
                "UPDATE jobs SET state = ?, started_at = ?, finished_at = ?, updated_at = ?, "
                "lease_until = NULL, job_pid = NULL, job_pid_start = NULL, exit_code = ?, "
                "output_tail = ?, last_error = ?, run_at = coalesce(?, run_at), "
                "log_location = coalesce(?, log_location) "
                "WHERE seq = ? AND state = 'processing' AND worker_id = ?",
                (state, started_at, finished_at, now, exit_code, tail, error, run_at, location, seq,
                 worker_id)).rowcount
            recorded.append(False if count else None)
        ours = [row[0] for row, flag in zip(rows, recorded) if flag is not None]
        if ours:
            marks = ", ".join("?" * len(ours))
            waited = {seq for (seq,) in self.conn.execute(
                f"SELECT seq FROM jobs WHERE seq IN ({marks}) AND waited_on = 1", ours)}
            recorded = [None if flag is None else row[0] in waited for row, flag in zip(rows, recorded)]
        return recorded

    def add_run(self, job_id: str, attempt: int, worker_id: "str | None", started_at: "float | None",
                finished_at: float, exit_code: "int | None", error: "str | None") -> None:
        self.conn.execute(
            "INSERT INTO job_runs (job_id, attempt, worker_id, started_at, finished_at, exit_code, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job_id, attempt, worker_id, started_at, finished_at, exit_code, error))

    def release_dependents(self, dep_ids: Sequence[str], now: float) -> int:
        """Each job waiting on any of ``dep_ids`` has that many dependencies fewer left."""
        marks = ", ".join("?" * len(dep_ids))
        return self.conn.execute(
            "UPDATE jobs SET updated_at = ?, deps_left = deps_left - (SELECT count(*) FROM job_deps "
            f"WHERE job_id = jobs.id AND dep_id IN ({marks})) "
            f"WHERE id IN (SELECT job_id FROM job_deps WHERE dep_id IN ({marks})) AND deps_left > 0 "
            # '+state': keep the planner on the id index; scanning jobs_state made every
            # finish O(pending) (0.4 ms at 5000 pending, vs 6 us).
            "AND +state IN ('pending', 'failed')", (now, *dep_ids, *dep_ids)).rowcount

    def delete_jobs(self, ids: Sequence[str]) -> int:
        deleted = 0
        for start in range(0, len(ids), _CHUNK):
            chunk = list(ids[start:start + _CHUNK])
            marks = ", ".join("?" * len(chunk))
            deleted += self.conn.execute(f"DELETE FROM jobs WHERE id IN ({marks})", chunk).rowcount
            self.conn.execute(f"DELETE FROM job_runs WHERE job_id IN ({marks})", chunk)
            self.conn.execute(f"DELETE FROM job_deps WHERE job_id IN ({marks})", chunk)
            self.conn.execute(f"DELETE FROM job_deps WHERE dep_id IN ({marks})", chunk)
        if deleted:  # environments no job refers to any more (few rows: one per distinct env)
            self.conn.execute("DELETE FROM envs WHERE id NOT IN "
                              "(SELECT env_id FROM jobs WHERE env_id IS NOT NULL)")
        return deleted

    def purge_due(self, state: str, before: float, limit: int) -> "list[str]":
        rows = self.conn.execute(
            "SELECT seq, id FROM jobs INDEXED BY jobs_finished WHERE state = ? "
            "AND finished_at IS NOT NULL AND finished_at < ? AND NOT EXISTS (SELECT 1 FROM job_deps d "
            "JOIN jobs c ON c.id = d.job_id WHERE d.dep_id = jobs.id AND c.state IN "
            "('pending', 'failed', 'processing')) ORDER BY finished_at LIMIT ?",
            (state, before, min(limit, _CHUNK))).fetchall()
        if not rows:
            return []
        seqs, ids = [r[0] for r in rows], [r[1] for r in rows]
        marks = ", ".join("?" * len(ids))
        self.conn.execute(f"DELETE FROM jobs WHERE seq IN ({marks})", seqs)
        self.conn.execute(f"DELETE FROM job_runs WHERE job_id IN ({marks})", ids)
        self.conn.execute(f"DELETE FROM job_deps WHERE job_id IN ({marks})", ids)
        self.conn.execute(f"DELETE FROM job_deps WHERE dep_id IN ({marks})", ids)
        return ids

    def drop_unused_envs(self) -> int:
        return self.conn.execute("DELETE FROM envs WHERE id NOT IN "
                                 "(SELECT env_id FROM jobs WHERE env_id IS NOT NULL)").rowcount

    def reclaim(self) -> None:
        """VACUUM when at least half of the file's pages are free (and it is over 1 MB).

        Not auto_vacuum: INCREMENTAL only works for files created with it (existing queues
        would need a VACUUM anyway) and adds pointer-map pages to every bulk insert; a purge
        is rare and is where the space is freed, so that is where we give it back.
        """
        pages = self.db.read("PRAGMA page_count")[0][0]
        free = self.db.read("PRAGMA freelist_count")[0][0]
        size = pages * self.db.read("PRAGMA page_size")[0][0]
        if size < 1 << 20 or free * 2 < pages:
            return
        self.db.vacuum()

    # -- jobs: reads ----------------------------------------------------------------------
    def get(self, job_id: str) -> "dict[str, Any] | None":
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def states_of(self, ids: Sequence[str]) -> "dict[str, str]":
        found: "dict[str, str]" = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = list(ids[start:start + _CHUNK])
            marks = ", ".join("?" * len(chunk))
            for job_id, state in self.db.read(f"SELECT id, state FROM jobs WHERE id IN ({marks})", chunk):
                found[job_id] = state
        return found

    def wait_on(self, ids: Sequence[str]) -> "dict[str, str]":
        """See Store.wait_on: the one writer holds the database, no row lock is needed."""
        found: "dict[str, str]" = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = list(ids[start:start + _CHUNK])
            marks = ", ".join("?" * len(chunk))
            self.conn.execute(f"UPDATE jobs SET waited_on = 1 WHERE id IN ({marks}) AND waited_on = 0",
                              chunk)
            found.update(self.conn.execute(f"SELECT id, state FROM jobs WHERE id IN ({marks})", chunk))
        return found

    def active_with_key(self, unique_key: str) -> "str | None":
        rows = self.db.read("SELECT id FROM jobs WHERE unique_key = ? AND state IN "
                            "('pending', 'failed', 'processing')", (unique_key,))
        return rows[0][0] if rows else None

    def dependents(self, dep_id: str, states: Sequence[str]) -> "list[str]":
        marks = ", ".join("?" * len(states))
        rows = self.db.read(
            f"SELECT j.id FROM job_deps d JOIN jobs j ON j.id = d.job_id "
            f"WHERE d.dep_id = ? AND j.state IN ({marks}) ORDER BY j.seq", (dep_id, *states))
        return [r[0] for r in rows]

    def dependencies(self, job_id: str) -> "list[str]":
        return [r[0] for r in self.db.read("SELECT dep_id FROM job_deps WHERE job_id = ?", (job_id,))]

    def runs(self, job_id: str) -> "list[dict[str, Any]]":
        """Every recorded attempt, oldest first; a completed job's last one is its own row."""
        return self._query(
            "SELECT attempt, worker_id, started_at, finished_at, exit_code, error FROM ("
            " SELECT 0 AS k, rowid AS r, attempt, worker_id, started_at, finished_at, exit_code, error"
            " FROM job_runs WHERE job_id = ?"
            " UNION ALL SELECT 1, 0, attempts, worker_id, started_at, finished_at, exit_code, NULL"
            " FROM jobs WHERE id = ? AND state = 'completed') ORDER BY k, r", (job_id, job_id))

    def processing(self) -> "list[dict[str, Any]]":
        return self._query("SELECT id, worker_id, lease_until, job_pid, job_pid_start, attempts, "
                           f"started_at, grp, slots, cancel_requested FROM jobs INDEXED BY jobs_state WHERE {_NOT_COMPLETED} "
                           "AND state = 'processing' ORDER BY seq")

    def cancels_for(self, worker_id: str) -> "list[str]":
        return [r[0] for r in self.db.read(
            f"SELECT id FROM jobs INDEXED BY jobs_state WHERE {_NOT_COMPLETED} AND state = 'processing' "
            "AND worker_id = ? AND cancel_requested != 0", (worker_id,))]

    def counts(self, group: "str | None" = None) -> "dict[str, int]":
        """Jobs per state; completed = all - the rest (they are not in jobs_state), read in
        one statement so both counts come from the same snapshot."""
        if group is not None:  # no index by group: a scan, for `status --group` only
            return dict(self.db.read("SELECT state, count(*) FROM jobs WHERE grp = ? GROUP BY state",
                                     (group,)))
        rows = self.db.read(f"SELECT state, count(*) FROM jobs INDEXED BY jobs_state "
                            f"WHERE {_NOT_COMPLETED} GROUP BY state "
                            "UNION ALL SELECT '', count(*) FROM jobs")
        found = {state: n for state, n in rows if state}
        total = sum(n for state, n in rows if not state)
        completed = total - sum(found.values())
        if completed:
            found["completed"] = completed
        return found

    def list_jobs(self, states: Sequence[str] = (), limit: int = 0,
                  group: "str | None" = None) -> "list[dict[str, Any]]":
        """Newest ``limit`` jobs (0 = all) in the given states, oldest first."""
        sql = "SELECT * FROM jobs"
        params: "list[Any]" = []
        where = []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
            if "completed" not in states:
                where.append(_NOT_COMPLETED)  # lets SQLite use jobs_state
        if group is not None:
            where.append("grp = ?")
            params.append(group)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        rows = self._query(sql, params)
        rows.reverse()
        return rows

    def finished_before(self, states: Sequence[str], before: float) -> "list[str]":
        marks = ", ".join("?" * len(states))
        rows = self.db.read(f"SELECT id FROM jobs WHERE state IN ({marks}) "
                            f"AND coalesce(finished_at, updated_at) < ? ORDER BY seq", (*states, before))
        return [r[0] for r in rows]

    def span(self, first_seq: int, last_seq: int) -> "dict[str, Any]":
        rows = self.db.read("SELECT count(*) - count(CASE WHEN state = 'completed' THEN 1 END), "
                            "min(started_at), max(finished_at) FROM jobs WHERE seq BETWEEN ? AND ?",
                            (first_seq, last_seq))
        left, started, finished = rows[0]
        return {"left": left, "started_at": started, "finished_at": finished}

    def tidy(self) -> None:
        self.conn.execute("ANALYZE")  # SQLite reuses freed pages itself; the statistics are all

    def runs_since(self, since: float) -> "list[dict[str, Any]]":
        return self._query(
            "SELECT command, argv, grp, 'completed' AS outcome, started_at, finished_at "
            "FROM jobs INDEXED BY jobs_finished WHERE state = 'completed' AND finished_at IS NOT NULL "
            "AND finished_at >= ? UNION ALL SELECT j.command, j.argv, j.grp, CASE WHEN r.error IS NULL "
            "THEN 'completed' WHEN r.error LIKE 'cancelled%' THEN 'cancelled' ELSE 'failed' END, "
            "r.started_at, r.finished_at FROM job_runs r JOIN jobs j ON j.id = r.job_id "
            "WHERE r.finished_at >= ?", (since, since))

    # -- counters -------------------------------------------------------------------------
    def add_counts(self, shard: str, deltas: "Sequence[tuple[str, str, float]]") -> None:
        self.conn.executemany(
            "INSERT INTO counters (shard, metric, labels, value) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(shard, metric, labels) DO UPDATE SET value = value + excluded.value",
            [(shard, metric, labels, amount) for metric, labels, amount in sorted(deltas)])

    def counter_totals(self) -> "dict[tuple[str, str], float]":
        return {(metric, labels): value for metric, labels, value in self.db.read(
            "SELECT metric, labels, sum(value) FROM counters GROUP BY metric, labels")}

    def fold_counts(self) -> int:
        rows = self.conn.execute(
            "DELETE FROM counters WHERE shard != '' AND shard NOT IN (SELECT worker_id FROM workers) "
            "RETURNING metric, labels, value").fetchall() if _HAS_RETURNING else self._fold_old()
        if rows:
            self.add_counts("", rows)
        return len(rows)

    def _fold_old(self) -> "list[tuple[str, str, float]]":
        """fold_counts' read-then-delete for SQLite before 3.35 (one writer: no race)."""
        where = "shard != '' AND shard NOT IN (SELECT worker_id FROM workers)"
        rows = self.conn.execute(f"SELECT metric, labels, value FROM counters WHERE {where}").fetchall()
        self.conn.execute(f"DELETE FROM counters WHERE {where}")
        return rows

    # -- worker registry ------------------------------------------------------------------
    def register_worker(self, worker_id: str, host: str, pid: int, started_at: float,
                        mode: str, now: float, capacity: int = 1, groups: str = "") -> None:
        self.conn.execute(
            "INSERT INTO workers (worker_id, host, pid, started_at, heartbeat_at, mode, stop_requested, "
            "capacity, groups) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?) ON CONFLICT(worker_id) DO UPDATE SET "
            "host = excluded.host, pid = excluded.pid, started_at = excluded.started_at, "
            "heartbeat_at = excluded.heartbeat_at, mode = excluded.mode, stop_requested = 0, "
            "capacity = excluded.capacity, groups = excluded.groups",
            (worker_id, host, pid, started_at, now, mode, capacity, groups))

    def beat_worker(self, worker_id: str, now: float) -> "int | None":
        if not self.conn.execute("UPDATE workers SET heartbeat_at = ? WHERE worker_id = ?",
                                 (now, worker_id)).rowcount:
            return None
        row = self.conn.execute("SELECT stop_requested FROM workers WHERE worker_id = ?",
                                (worker_id,)).fetchone()
        return int(row[0]) if row else None

    def unregister_worker(self, worker_id: str) -> None:
        self.conn.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    def registered_workers(self) -> "list[dict[str, Any]]":
        return self._query("SELECT worker_id, host, pid, started_at, heartbeat_at, mode, stop_requested, "
                           "capacity, groups FROM workers ORDER BY host, started_at, worker_id")

    def forget_workers(self, beaten_before: float) -> int:
        return self.conn.execute("DELETE FROM workers WHERE heartbeat_at < ?", (beaten_before,)).rowcount

    def request_stop(self, level: int, worker_ids: "Sequence[str] | None" = None) -> int:
        sql = "UPDATE workers SET stop_requested = max(stop_requested, ?)"
        params: "list[Any]" = [level]
        if worker_ids is not None:
            if not worker_ids:
                return 0
            sql += f" WHERE worker_id IN ({', '.join('?' * len(worker_ids))})"
            params.extend(worker_ids)
        return self.conn.execute(sql, params).rowcount

    # -- schedules ------------------------------------------------------------------------
    def insert_schedule(self, row: "dict[str, Any]") -> None:
        try:
            self.conn.execute(f"INSERT INTO schedules ({', '.join(SCHEDULE_COLUMNS)}) VALUES "
                              f"({', '.join('?' * len(SCHEDULE_COLUMNS))})",
                              [row[c] for c in SCHEDULE_COLUMNS])
        except sqlite3.IntegrityError:
            raise DuplicateKey("schedule", row["name"]) from None

    def update_schedule(self, name: str, fields: "dict[str, Any]") -> int:
        sets = ", ".join(f"{column} = ?" for column in fields)  # names come from models
        return self.conn.execute(f"UPDATE schedules SET {sets} WHERE name = ?",
                                 [*fields.values(), name]).rowcount

    def delete_schedule(self, name: str) -> int:
        self.conn.execute("DELETE FROM schedule_skips WHERE name = ?", (name,))
        return self.conn.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount

    def get_schedule(self, name: str) -> "dict[str, Any] | None":
        rows = self._query("SELECT * FROM schedules WHERE name = ?", (name,))
        return rows[0] if rows else None

    def list_schedules(self) -> "list[dict[str, Any]]":
        return self._query("SELECT * FROM schedules ORDER BY name")

    def next_schedule_due(self) -> "float | None":
        rows = self.db.read("SELECT min(next_at) FROM schedules WHERE paused = 0")
        return rows[0][0] if rows else None

    def claim_due_schedule(self, now: float) -> "dict[str, Any] | None":
        rows = _dicts(self.conn.execute(
            "SELECT * FROM schedules WHERE paused = 0 AND next_at <= ? ORDER BY next_at LIMIT 1",
            (now,)))
        return rows[0] if rows else None

    def add_schedule_skip(self, name: str, slot_at: float, until_at: float, count: int,
                          reason: str, at: float, keep: int) -> None:
        self.conn.execute("INSERT INTO schedule_skips (name, slot_at, until_at, count, reason, at) "
                          "VALUES (?, ?, ?, ?, ?, ?)", (name, slot_at, until_at, count, reason, at))
        self.conn.execute("DELETE FROM schedule_skips WHERE name = ? AND rowid NOT IN (SELECT rowid "
                          "FROM schedule_skips WHERE name = ? ORDER BY at DESC, rowid DESC LIMIT ?)",
                          (name, name, keep))

    def extend_schedule_skip(self, name: str, ended_at: float, reason: str, until_at: float,
                             at: float) -> int:
        return self.conn.execute("UPDATE schedule_skips SET until_at = ?, count = count + 1, at = ? "
                                 "WHERE name = ? AND until_at = ? AND reason = ?",
                                 (until_at, at, name, ended_at, reason)).rowcount

    def schedule_skips(self, name: str, limit: int) -> "list[dict[str, Any]]":
        return self._query("SELECT slot_at, until_at, count, reason, at FROM schedule_skips "
                           "WHERE name = ? ORDER BY at DESC, rowid DESC LIMIT ?", (name, limit))

    def jobs_with_prefix(self, prefix: str, limit: int) -> "list[dict[str, Any]]":
        # A range on the id index (BINARY collation is byte order); LIKE would scan the table.
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return self._query(f"SELECT {', '.join(SCHEDULE_JOB_COLUMNS)} FROM jobs WHERE id >= ? "
                           "AND id < ? ORDER BY seq DESC LIMIT ?", (prefix, upper, limit))

    # -- config and flags -----------------------------------------------------------------
    def config_items(self) -> "dict[str, str]":
        return dict(self.db.read("SELECT key, value FROM config"))

    def config_set(self, key: str, value: str) -> None:
        self.conn.execute("INSERT INTO config (key, value) VALUES (?, ?) "
                          "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def config_unset(self, key: str) -> None:
        self.conn.execute("DELETE FROM config WHERE key = ?", (key,))

    def flag(self, key: str) -> "str | None":
        rows = self.db.read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_flag(self, key: str, value: "str | None") -> None:
        if value is None:
            self.conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                              "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
