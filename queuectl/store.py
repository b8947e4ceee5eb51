"""The storage seam: what the models layer needs from a database, and the factory that picks
a backend from ``QUEUECTL_DB``.

No driver is imported here. A backend moves rows; every rule (lifecycle, retries, leases,
dependencies) stays in models. What a backend owns because it cannot be done safely above it:
- id and sequence allocation (``insert_jobs`` returns the ids),
- uniqueness (a duplicate id or active unique key raises ``DuplicateKey`` at insert time),
- wake-ups (``wake`` inside a transaction is delivered at COMMIT; ``listen`` gives a worker
  a file descriptor to select on),
- busy/serialization retries and mapping driver errors to ``StorageError``.

Updates that take ``states``/``worker_id`` guards are what make concurrent recoverers and
late results safe on any backend: they change a row only if it is still what the caller saw.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ContextManager, Dict, List, Optional, Protocol, Sequence, Tuple

from queuectl.errors import StorageError

if TYPE_CHECKING:  # pragma: no cover
    from queuectl.paths import Paths

DB_ENV = "QUEUECTL_DB"
ROLES = ("cli", "worker", "reader")

# A new job as models hand it to insert_jobs: a tuple in this order (tuples, not dicts: a
# bulk enqueue builds 100k of them). ``id`` None means "allocate one" (str of its sequence).
# ``env_id`` (schema v3) is an id from ``env_id_for`` or None (the worker's own environment).
# ``grp`` and ``slots`` (schema v5): the job's group (its row must exist: ``ensure_groups``)
# and how many of its worker's slots it takes; a tuple of the first 12 columns means
# group 'default' and 1 slot (``pad_new_job``).
NEW_JOB_COLUMNS = ("id", "command", "argv", "priority", "max_retries", "timeout", "cwd", "run_at",
                   "created_at", "unique_key", "deps_left", "env_id", "grp", "slots")
_NEW_JOB_DEFAULTS = (None,) * 12 + ("default", 1)


def pad_new_job(job: Sequence[Any]) -> Tuple[Any, ...]:
    """A NEW_JOB_COLUMNS tuple from one that may stop before grp and slots."""
    return (*job, *_NEW_JOB_DEFAULTS[len(job):])


# The columns of a claimed job (what a worker needs to run and finish it).
CLAIM_COLUMNS = ("seq", "id", "command", "argv", "cwd", "state", "priority", "run_at", "attempts",
                 "max_retries", "timeout", "worker_id", "started_at", "lease_until", "env_id",
                 "retry_base", "grp", "slots", "counted")
# Columns of a job row that are bookkeeping, never shown to users (--json, the dashboard).
INTERNAL_COLUMNS = frozenset(("seq", "argv", "job_pid_start", "grp", "counted", "waited_on"))
# A schedule row (queuectl/schedules.py holds the rules; the backends only move these).
SCHEDULE_COLUMNS = ("name", "kind", "expr", "tz", "spec", "env", "catch_up", "overlap", "paused",
                    "created_at", "next_at", "last_slot", "last_job", "last_fired_at")
# What `schedule show` lists of a schedule's recent jobs.
SCHEDULE_JOB_COLUMNS = ("id", "state", "attempts", "created_at", "started_at", "finished_at",
                        "exit_code", "last_error")


class Listener(Protocol):
    """The worker's end of wake-ups."""

    def fileno(self) -> int:
        """Readable when someone called ``wake()`` (and committed) since the last drain."""

    def drain(self) -> None:
        """Consume pending wake-ups so the descriptor stops being readable."""

    def close(self) -> None: ...


class Store(Protocol):
    """Every method a backend implements. Writes run inside ``transaction()``; reads anywhere."""

    location: str  # what to show a user: a file path, or a DSN without its password
    # How many short jobs a worker claims, and records, per transaction: what this backend's
    # fixed cost per transaction makes worth holding back from idle peers.
    batch: int

    # -- plumbing --------------------------------------------------------------------------
    def transaction(self) -> ContextManager[Any]:
        """The only write path: one short transaction, nested calls join the outer one.
        Retries busy/serialization failures; raises StorageError for anything else."""

    def wake(self) -> None:
        """Wake idle workers once the current transaction commits (at once outside one)."""

    def listen(self) -> Listener:
        """Subscribe this process to wake-ups (workers)."""

    def close(self) -> None: ...

    # -- jobs: writes ----------------------------------------------------------------------
    def insert_jobs(self, jobs: Sequence[Tuple[Any, ...]]) -> List[str]:
        """Insert tuples in NEW_JOB_COLUMNS order, allocating sequence numbers (and ids where
        None) in order; returns the ids. DuplicateKey on an existing id or active unique key."""

    def insert_deps(self, pairs: Sequence[Tuple[str, str]]) -> None:
        """(dep_id, job_id): job_id waits for dep_id."""

    def clear_deps(self, job_id: str) -> None:
        """Forget what ``job_id`` waits for (its edges as a dependent; those of jobs waiting
        for it stay). Used when ``add --if-exists replace`` re-queues a finished job."""

    def env_id_for(self, digest: str, vars_json: str, inherit: bool) -> int:
        """The id of the stored environment with this digest (models hash vars and inherit),
        inserting (vars_json, inherit) if it is new: ``vars_json`` is a JSON object
        {name: value}; ``inherit`` means the vars go over the worker's own environment
        instead of being the whole of it. Inside a transaction; one call per distinct
        environment of an enqueue, never one per job."""

    def get_env(self, env_id: int) -> Optional[Tuple[str, bool]]:
        """(vars_json, inherit) of a stored environment (workers cache it per id), or None."""

    def claim(self, worker_id: str, now: float, lease_until: float, limit: int = 1,
              groups: Optional[Sequence[str]] = None, free: Optional[int] = None,
              capacity: int = 1) -> List[Dict[str, Any]]:
        """Up to ``limit`` ready jobs (CLAIM_COLUMNS), now processing with attempts + 1, in
        claim order (priority desc, run_at, seq); none while the queue is paused.
        Concurrent claimers never get the same job.

        Groups: only jobs of ``groups`` (None: every group); none of a paused group; of a
        group with a limit at most ``parallel - running`` (race-free across claimers; those
        claims get counted = 1). Each open group's ready jobs are read through its own index
        range, so a full or paused group is never scanned. ``free``: the claimed jobs'
        slots (each at most ``capacity``) add up to at most this; claim order is kept, so a
        big job at the head is waited for, not overtaken."""

    def has_ready(self, now: float, groups: Optional[Sequence[str]] = None) -> bool:
        """Cheap probe so idle workers only open a write transaction when work is due
        (a job ``claim`` could take: paused and full groups do not count)."""

    def ready_head(self, now: float, groups: Optional[Sequence[str]] = None
                   ) -> Optional[Tuple[int, float, int]]:
        """(priority, run_at, seq) of the job ``claim`` would take first, or None (a read):
        a busy worker asks whether a new job should overtake the ones it holds."""

    def next_run_at(self, groups: Optional[Sequence[str]] = None) -> Optional[float]:
        """Earliest run_at of a waiting job whose dependencies are done (for the idle
        timeout), in the open groups among ``groups``."""

    # -- groups ----------------------------------------------------------------------------
    def ensure_groups(self, names: Sequence[str]) -> None:
        """Create the rows of groups that have none (no limit, not paused); in the enqueue's
        transaction, once per distinct group."""

    def set_group_limit(self, name: str, parallel: Optional[int]) -> None:
        """Set (None: remove) a group's limit, creating its row. Running jobs of the group
        not yet counted against a limit become counted, race-free with claims and finishes,
        so the limit holds for runs started before it was set too."""

    def set_group_paused(self, name: str, paused: bool) -> None:
        """Pause (claims skip the group) or resume one group, creating its row."""

    def group_rows(self) -> List[Dict[str, Any]]:
        """Every group row (name, parallel, running, paused) with its jobs: ``waiting``
        (pending or failed) and ``processing`` (running now, counted or not), by name."""

    def group_rows_for(self, names: Sequence[str]) -> List[Dict[str, Any]]:
        """The rows (name, parallel, running, paused) of these groups, by primary key (no
        job is read): a worker holding claimed jobs asks after a wake-up whether their
        groups were paused or their limits lowered meanwhile."""

    def update_job(self, job_id: str, fields: Dict[str, Any], *, states: Sequence[str] = (),
                   worker_id: Optional[str] = None) -> int:
        """Update one job if it is still in one of ``states`` and owned by ``worker_id``;
        returns the number of rows changed (0 or 1)."""

    def record_outcomes(self, worker_id: str, now: float,
                        rows: Sequence[Tuple[Any, ...]]) -> List[Optional[bool]]:
        """Finished runs' results, each if its job is still ours (processing, our worker_id):
        one statement for a whole batch (on PostgreSQL one round trip, not one per job).

        ``rows``: (seq, state, started_at, finished_at, exit_code, tail, error, run_at,
        log_location); run_at None keeps the old value, and so does log_location ("host:path"
        of the full log, where `logs` on another host sends the user: the database only has
        ``tail``). Returns per row None if it was not ours (the result is dropped), else
        whether dependents may wait for the job (its waited_on flag, as of the update)."""

    def add_run(self, job_id: str, attempt: int, worker_id: Optional[str],
                started_at: Optional[float], finished_at: float, exit_code: Optional[int],
                error: Optional[str]) -> None: ...

    def release_dependents(self, dep_ids: Sequence[str], now: float) -> int:
        """Each waiting job depending on any of ``dep_ids`` has that many dependencies fewer."""

    def delete_jobs(self, ids: Sequence[str]) -> int:
        """Delete jobs with their runs and dependency edges; returns how many jobs went.
        Environments no job uses any more may go too (the backend's choice)."""

    def purge_due(self, state: str, before: float, limit: int) -> List[str]:
        """Retention: delete up to ``limit`` jobs in ``state`` (a finished one) that finished
        before ``before``, oldest first, with their runs and edges, by the jobs_finished index
        (never a scan); a job that a waiting or running job depends on stays. Returns the
        deleted ids. Concurrent callers never delete a job twice nor fail on each other's
        work. Unused environments are left for ``drop_unused_envs`` (that check scans)."""

    def drop_unused_envs(self) -> int:
        """Delete environments no job refers to any more (a scan: call it rarely)."""

    def reclaim(self) -> None:
        """After a purge, outside any transaction: give freed space back to the system if it
        is worth it (SQLite: VACUUM when most pages are free; PostgreSQL: nothing, or VACUUM).
        Best effort: never raises for a busy database."""

    # -- jobs: reads -----------------------------------------------------------------------
    def get(self, job_id: str) -> Optional[Dict[str, Any]]:
        """The whole row (every column of the jobs table) or None."""

    def states_of(self, ids: Sequence[str]) -> Dict[str, str]: ...

    def wait_on(self, ids: Sequence[str]) -> Dict[str, str]:
        """States of the jobs a dependent about to be enqueued (or revived) will wait for,
        inside its transaction. Marks them waited_on, so their finish releases dependents,
        and holds their rows until COMMIT on a backend of concurrent writers: a finish
        cannot commit between this read and the dependent's edges, or the dependent would
        wait for a job already recorded as completed, forever."""

    def active_with_key(self, unique_key: str) -> Optional[str]:
        """Id of the waiting or running job holding ``unique_key``."""

    def dependents(self, dep_id: str, states: Sequence[str]) -> List[str]: ...

    def dependencies(self, job_id: str) -> List[str]: ...

    def runs(self, job_id: str) -> List[Dict[str, Any]]:
        """Every recorded attempt, oldest first; a completed job's last run is its own row."""

    def processing(self) -> List[Dict[str, Any]]:
        """Running jobs (id, worker_id, lease_until, job_pid, job_pid_start, attempts,
        started_at, grp, slots, cancel_requested), oldest first."""

    def cancels_for(self, worker_id: str) -> List[str]:
        """Ids of ``worker_id``'s processing jobs whose cancel was asked: what a multi-slot
        worker asks on every wake-up and heartbeat, so only the processing entries of the
        jobs_state index are read (``processing`` returns every running job's row)."""

    def counts(self, group: Optional[str] = None) -> Dict[str, int]:
        """Jobs per state (states with none may be missing), from one snapshot; of one
        group only when ``group`` is given."""

    def list_jobs(self, states: Sequence[str] = (), limit: int = 0,
                  group: Optional[str] = None) -> List[Dict[str, Any]]:
        """Newest ``limit`` jobs (0 = all) in the given states (and ``group``), oldest first."""

    def finished_before(self, states: Sequence[str], before: float) -> List[str]: ...

    def span(self, first_seq: int, last_seq: int) -> Dict[str, Any]:
        """Progress of the jobs with seq in [first_seq, last_seq] (a bulk enqueue's ids are
        its seqs): ``left`` not completed, earliest ``started_at``, latest ``finished_at``.
        By primary key, cheap enough to poll (benchmarks, progress probes)."""

    def tidy(self) -> None:
        """Reclaim dead rows and index entries and refresh the planner's statistics, as the
        database's own housekeeping eventually does, now: after a bulk change (benchmarks fill
        the table with 10^5 finished jobs at once). PostgreSQL: VACUUM ANALYZE; SQLite: ANALYZE."""

    def runs_since(self, since: float) -> List[Dict[str, Any]]:
        """Every run that ended at or after ``since`` (command, argv, outcome: completed,
        failed or cancelled, started_at, finished_at), for ``stats``: completed jobs by the
        jobs_finished index, other runs from job_runs."""

    # -- counters (monotonic: retention never touches them) --------------------------------
    # Each writer adds to rows of its own ``shard`` (its worker id), so concurrent workers
    # never update the same row; rows of workers that are gone are folded into shard ''.
    def add_counts(self, shard: str, deltas: Sequence[Tuple[str, str, float]]) -> None:
        """Add each (metric, labels, amount) to this shard's rows, inside a transaction."""

    def counter_totals(self) -> Dict[Tuple[str, str], float]:
        """{(metric, labels): sum over every shard}."""

    def fold_counts(self) -> int:
        """Move the rows of shards that are no registered worker into shard '' (sums kept:
        concurrent folds never count a row twice); returns how many rows were folded."""

    # -- worker registry (every host's workers; local ones also have PID files) -------------
    # A worker registers at start, beats every few seconds and unregisters at a clean exit.
    # Rows of workers that died without unregistering are shown as gone once their beat is
    # old and then forgotten; the rules (how old is gone) live in models.
    def register_worker(self, worker_id: str, host: str, pid: int, started_at: float,
                        mode: str, now: float, capacity: int = 1, groups: str = "") -> None:
        """Insert or replace this worker's row (stop_requested cleared); ``capacity`` is its
        slots, ``groups`` the groups it serves (comma-separated, '' every group)."""

    def beat_worker(self, worker_id: str, now: float) -> Optional[int]:
        """Renew the row's heartbeat_at; returns its stop_requested (0 none, 1 graceful,
        2 forced), or None when there is no row (forgotten while unreachable: register again)."""

    def unregister_worker(self, worker_id: str) -> None: ...

    def registered_workers(self) -> List[Dict[str, Any]]:
        """Every row (worker_id, host, pid, started_at, heartbeat_at, mode, stop_requested,
        capacity, groups), ordered by host, then started_at."""

    def forget_workers(self, beaten_before: float) -> int:
        """Delete the rows whose last heartbeat is older than ``beaten_before``."""

    def request_stop(self, level: int, worker_ids: Optional[Sequence[str]] = None) -> int:
        """Set stop_requested = ``level`` (1 graceful, 2 forced; never lowered) on every row, or
        on ``worker_ids``; returns how many rows were asked. Call ``wake()`` as well so idle
        workers notice at once."""

    # -- schedules (recurring jobs; rules in queuectl/schedules.py) -------------------------
    def insert_schedule(self, row: Dict[str, Any]) -> None:
        """A new schedule (a value for every SCHEDULE_COLUMNS name); DuplicateKey("schedule")
        when the name is taken."""

    def update_schedule(self, name: str, fields: Dict[str, Any]) -> int:
        """Change some SCHEDULE_COLUMNS of one schedule; returns the rows changed (0 or 1)."""

    def delete_schedule(self, name: str) -> int:
        """Delete a schedule and its skip records (its jobs stay); returns 0 or 1."""

    def get_schedule(self, name: str) -> Optional[Dict[str, Any]]: ...

    def list_schedules(self) -> List[Dict[str, Any]]:
        """Every schedule, by name."""

    def next_schedule_due(self) -> Optional[float]:
        """Earliest next_at of a schedule that is not paused: one indexed read, what every
        worker asks every second, so an idle queue with schedules costs next to nothing."""

    def claim_due_schedule(self, now: float) -> Optional[Dict[str, Any]]:
        """Inside a transaction: the unpaused schedule with the earliest next_at <= now,
        locked until COMMIT, skipping rows another transaction holds (PostgreSQL:
        FOR UPDATE SKIP LOCKED; on SQLite BEGIN IMMEDIATE already excludes other writers)."""

    def add_schedule_skip(self, name: str, slot_at: float, until_at: float, count: int,
                          reason: str, at: float, keep: int) -> None:
        """Record ``count`` slots from ``slot_at`` to ``until_at`` that got no job, keeping only
        the newest ``keep`` records of this schedule."""

    def extend_schedule_skip(self, name: str, ended_at: float, reason: str, until_at: float,
                             at: float) -> int:
        """Add one slot (``until_at``) to the record of this schedule that ends at
        ``ended_at`` with this ``reason``; returns the rows changed (0: add a record instead)."""

    def schedule_skips(self, name: str, limit: int) -> List[Dict[str, Any]]:
        """Newest ``limit`` skip records (slot_at, until_at, count, reason, at), newest first."""

    def jobs_with_prefix(self, prefix: str, limit: int) -> List[Dict[str, Any]]:
        """Newest ``limit`` jobs (SCHEDULE_JOB_COLUMNS) whose id starts with ``prefix``,
        newest first: a schedule's jobs are ``NAME@...``."""

    # -- config and flags ------------------------------------------------------------------
    def config_items(self) -> Dict[str, str]: ...

    def config_set(self, key: str, value: str) -> None: ...

    def config_unset(self, key: str) -> None: ...

    def flag(self, key: str) -> Optional[str]: ...

    def set_flag(self, key: str, value: Optional[str]) -> None: ...


def with_activity(rows: List[Dict[str, Any]], active: Sequence[Sequence[Any]]) -> List[Dict[str, Any]]:
    """Group rows (name, parallel, running, paused) with their ``waiting`` and ``processing``
    counts from (grp, state, n) rows, by name; a group with jobs but no row is shown too."""
    by_name = {row["name"]: dict(row, paused=bool(row["paused"]), waiting=0, processing=0)
               for row in rows}
    for grp, state, n in active:
        row = by_name.setdefault(grp, {"name": grp, "parallel": None, "running": 0, "paused": False,
                                       "waiting": 0, "processing": 0})
        row["processing" if state == "processing" else "waiting"] += n
    return [by_name[name] for name in sorted(by_name)]


def database_url(paths: "Paths") -> str:
    """Where the queue lives: ``$QUEUECTL_DB``, else the home's SQLite file."""
    return os.environ.get(DB_ENV) or str(paths.db)


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(paths: "Paths", role: str = "cli") -> Store:
    """The backend for this home. ``role``: "cli" (an acknowledged write survives power
    loss), "worker" (a lost state change only means a job runs again) or "reader"."""
    if role not in ROLES:
        raise ValueError(f"unknown store role {role!r}")
    url = database_url(paths)
    if is_postgres(url):
        try:
            from queuectl.pg_store import PgStore
        except ImportError as exc:
            if "psycopg" not in str(exc):
                raise
            raise StorageError("QUEUECTL_DB names a PostgreSQL server, but psycopg is not installed; "
                               "install the extra: pip install 'queuectl[postgres]'") from None
        return PgStore(url, role=role)
    from queuectl.sqlite_store import SqliteStore

    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///") - 1:]  # sqlite:///abs/path -> /abs/path
    elif url.startswith("sqlite://"):
        raise StorageError(f"cannot use {url!r}: write sqlite:///ABSOLUTE/PATH or a plain path")
    return SqliteStore(url, durable=role == "cli", workers_dir=paths.workers_dir)
