"""Job lifecycle rules: enqueue, claim, finish, retry/backoff, DLQ, cancel, recovery, purge.

Everything here is a function of (store, clock); no SQL, no processes, no printing.
"""
from __future__ import annotations

import json
import time
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional,
                    Sequence)

from queuectl import config as cfg
from queuectl import metrics
from queuectl.errors import Conflict, DuplicateKey, InvalidInput, NotFound, QueueError
from queuectl.jobspec import DEFAULT_GROUP, WORKER_VARS, validate_group, validate_id

if TYPE_CHECKING:  # pragma: no cover
    from queuectl.store import Store

STATES = ("pending", "processing", "completed", "failed", "dead", "cancelled")
WAITING = ("pending", "failed")             # may still be claimed
ACTIVE = ("pending", "failed", "processing")
TERMINAL = ("completed", "dead", "cancelled")
GONE_MIN = 10.0  # seconds: the shortest silence after which a registered worker counts as gone


def backoff_delay(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait before the next run after ``attempts`` runs: min(base**attempts, cap)."""
    try:
        delay = float(base) ** attempts
    except OverflowError:
        return float(cap)
    return min(delay, float(cap))


class Enqueued(NamedTuple):
    """One result per submitted job (a NamedTuple: 100k of them are built per bulk enqueue,
    a third faster than a dataclass)."""

    id: str
    created: bool  # False when --if-exists skip found an active job with the same id or unique key
    replaced: bool = False  # True when --if-exists replace re-queued a finished job with this id


class _Envs:
    """The environments of one enqueue: the enqueuer's (when capture_env is on) with each
    job's explicit variables over it, stored once per distinct environment (one lookup per
    distinct environment, not per job)."""

    def __init__(self, store: "Store", captured: Optional[Mapping[str, str]], capture: bool) -> None:
        self.store = store
        self.inherit = not capture or captured is None  # vars go over the worker's own env
        self.base: Dict[str, str] = {} if self.inherit else {
            k: v for k, v in captured.items() if k not in WORKER_VARS}  # type: ignore[union-attr]
        self.ids: Dict[Any, Optional[int]] = {}

    def id_for(self, explicit: Optional[Dict[str, str]]) -> Optional[int]:
        key = tuple(sorted(explicit.items())) if explicit else None
        found = self.ids.get(key, -1)
        if found != -1:
            return found
        merged = {**self.base, **explicit} if explicit else self.base
        env_id: Optional[int] = None
        if merged:
            import hashlib

            text = json.dumps(merged, sort_keys=True, separators=(",", ":"))
            digest = hashlib.sha256((("1" if self.inherit else "0") + text).encode(
                "utf-8", "surrogatepass")).hexdigest()
            env_id = self.store.env_id_for(digest, text, self.inherit)
        self.ids[key] = env_id
        return env_id


class Queue:
    """The queue's rules over one store (any backend behind queuectl/store.py)."""

    def __init__(self, store: "Store", *, clock: Callable[[], float] = time.time,
                 overrides: Optional[Dict[str, Any]] = None) -> None:
        self.store = store
        self.clock = clock
        self.overrides = overrides or {}
        self._settings: Optional[Dict[str, Any]] = None
        self._settings_at = 0.0
        # A worker's groups (None: every group): what its claims and idle probes look at.
        self.serve_groups: Optional[List[str]] = None

    # -- configuration --------------------------------------------------------------------
    def settings(self, fresh: bool = False) -> Dict[str, Any]:
        """Effective settings, re-read at most once a second (workers call this per job)."""
        now = time.monotonic()
        if fresh or self._settings is None or now - self._settings_at > 1.0:
            try:
                self._settings = cfg.effective(self.store.config_items(), self.overrides)
            except QueueError:
                if self._settings is None:
                    raise
                # Unreachable storage: a worker supervising a run needs its lease length
                # now; the settings it had do until they can be read again.
            self._settings_at = now
        return self._settings

    def config_set(self, key: str, raw: Any) -> "tuple[str, Any]":
        name = cfg.canonical_key(key)
        value = cfg.parse_value(name, raw)
        with self.store.transaction():
            self.store.config_set(name, cfg.encode(value))
            self.store.wake()  # running workers re-read settings when woken
        self._settings = None
        return name, value

    def config_get(self, key: str) -> "tuple[str, Any]":
        name = cfg.canonical_key(key)
        return name, self.settings(fresh=True)[name]

    def config_unset(self, key: str) -> str:
        name = cfg.canonical_key(key)
        with self.store.transaction():
            self.store.config_unset(name)
            self.store.wake()
        self._settings = None
        return name

    # -- enqueue --------------------------------------------------------------------------
    def _envs(self, env: Optional[Mapping[str, str]]) -> _Envs:
        return _Envs(self.store, env, bool(self.settings()["capture_env"]))

    def enqueue(self, specs: Sequence[Dict[str, Any]], *, if_exists: str = "error",
                env: Optional[Mapping[str, str]] = None) -> List[Enqueued]:
        """Insert validated specs (see jobspec.parse_job) in ONE transaction: all or nothing.

        An error about spec i carries ``index = i`` so a caller can name the input line.
        The checks below give the friendly messages; the store's insert is the arbiter. When
        a concurrent enqueue wins a race for an id or unique key (a multi-writer backend),
        the transaction is run again and the checks then see the winner.
        ``env``: the enqueuer's environment (captured unless config capture_env is false);
        None runs the jobs with the worker's environment.
        """
        now = self.clock()
        for attempt in range(3):
            try:
                with self.store.transaction():
                    results = self._enqueue_locked(specs, now, if_exists, self._envs(env))
                    if any(r.created for r in results):
                        self.store.wake()
                return results
            except DuplicateKey as exc:
                if attempt == 2:  # checks and store still disagree: say what the store said
                    raise Conflict(f"cannot enqueue: {exc} (taken by a concurrent enqueue)") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def enqueue_chunks(self, chunks: Iterable[Sequence[Dict[str, Any]]], *, if_exists: str = "error",
                       env: Optional[Mapping[str, str]] = None,
                       on_results: Optional[Callable[[List[Enqueued]], None]] = None) -> int:
        """A bulk enqueue that streams: chunks of specs, all in ONE transaction (all or
        nothing), so memory does not grow with the number of jobs. ``on_results`` gets each
        chunk's results as it is inserted (they are only real once this returns). An error
        about a job carries ``index`` within the chunk being inserted, which is the chunk
        the iterator yielded last. Returns how many specs there were.
        """
        now = self.clock()
        total = created = 0
        try:
            with self.store.transaction():
                envs = self._envs(env)
                for chunk in chunks:
                    if not chunk:
                        continue
                    results = self._enqueue_locked(chunk, now, if_exists, envs)
                    total += len(chunk)
                    created += sum(1 for r in results if r.created)
                    if on_results is not None:
                        on_results(results)
                if not total:
                    raise InvalidInput("no jobs given")
                if created:
                    self.store.wake()
        except DuplicateKey as exc:  # a concurrent writer won a race (multi-writer backends)
            raise Conflict(f"cannot enqueue: {exc} (taken by a concurrent enqueue)") from None
        return total

    def _enqueue_locked(self, specs: Sequence[Dict[str, Any]], now: float,
                        if_exists: str, envs: _Envs) -> List[Enqueued]:
        store = self.store
        groups = {s.get("group", DEFAULT_GROUP) for s in specs}
        if groups != {DEFAULT_GROUP}:  # 'default' always has its row
            store.ensure_groups(sorted(groups))
        user_ids = [s["id"] for s in specs if s["id"] is not None]
        existing = store.states_of(user_ids) if user_ids else {}
        seen: Dict[str, int] = {}
        keys_in_batch: Dict[str, str] = {}
        dep_ids = {d for s in specs for d in s["after"]}
        dep_states = store.wait_on(sorted(dep_ids)) if dep_ids else {}
        if not user_ids and not dep_ids and all(s["unique_key"] is None and not s.get("env")
                                                for s in specs):
            return self._enqueue_plain(specs, now, envs.id_for(None))
        rows: List[tuple] = []
        waits: List["tuple[int, List[str]]"] = []  # (row index, ids it waits for)
        # Per spec: (created, row index) or (False, id of the active job holding its key);
        # a key held earlier in this batch is a row index too: ids are known after the insert.
        slots: List["tuple[bool, Any]"] = []
        replace: List["tuple[Dict[str, Any], int, Optional[int]]"] = []
        for index, spec in enumerate(specs):
            deps_left = 0
            env_id = envs.id_for(spec.get("env"))
            if spec["id"] is not None or spec["unique_key"] is not None or spec["after"]:
                # Plain jobs (the common bulk case) have nothing to check and skip this.
                try:
                    holder, deps_left = self._check_new(spec, existing, seen, keys_in_batch,
                                                        dep_states, if_exists)
                except (Conflict, NotFound, InvalidInput) as exc:
                    exc.index = index  # type: ignore[attr-defined]
                    raise
                if holder is not None:  # --if-exists skip: report the active job instead
                    slots.append((False, holder))
                    continue
                if spec["id"] is not None and spec["id"] in existing:  # --if-exists replace
                    seen[spec["id"]] = index
                    if spec["unique_key"] is not None:
                        keys_in_batch[spec["unique_key"]] = spec["id"]
                    replace.append((spec, deps_left, env_id))
                    slots.append((True, spec["id"]))
                    continue
            row = len(rows)
            if spec["id"] is not None:
                seen[spec["id"]] = index
            key = spec["unique_key"]
            if key is not None:
                keys_in_batch[key] = spec["id"] if spec["id"] is not None else row
            if spec["after"]:
                waits.append((row, spec["after"]))
            rows.append((spec["id"], spec["command"], spec["argv"], spec["priority"],
                         spec["max_retries"], spec["timeout"], spec["cwd"], spec["run_at"], now,
                         key, deps_left, env_id, spec.get("group", DEFAULT_GROUP), spec.get("slots", 1)))
            slots.append((True, row))
        for spec, deps_left, env_id in replace:
            self._replace_locked(spec, deps_left, env_id, now)
        ids = store.insert_jobs(rows) if rows else []
        if waits:
            store.insert_deps([(dep, ids[row]) for row, after in waits for dep in after])
        replaced = {spec["id"] for spec, _, _ in replace}
        return [Enqueued(ids[ref], created) if isinstance(ref, int)
                else Enqueued(ref, created, created and ref in replaced) for created, ref in slots]

    def _replace_locked(self, spec: Dict[str, Any], deps_left: int, env_id: Optional[int],
                        now: float) -> None:
        """``--if-exists replace``: a finished job gets the new command and options and runs
        again under its id, keeping its run history; its attempt numbers go on (the retry
        budget starts afresh, as after dlq retry)."""
        old = self.store.get(spec["id"])
        assert old is not None and old["state"] in TERMINAL
        if old["state"] == "completed" and old["attempts"]:
            # A completed job's last run is recorded in its own row, which is about to change.
            self.store.add_run(old["id"], old["attempts"], old["worker_id"], old["started_at"],
                               old["finished_at"] or old["updated_at"], old["exit_code"], None)
        self.store.clear_deps(old["id"])
        if spec["after"]:
            self.store.insert_deps([(dep, old["id"]) for dep in spec["after"]])
        changed = self.store.update_job(old["id"], {
            "command": spec["command"], "argv": spec["argv"], "priority": spec["priority"],
            "max_retries": spec["max_retries"], "timeout": spec["timeout"], "cwd": spec["cwd"],
            "run_at": spec["run_at"], "unique_key": spec["unique_key"], "deps_left": deps_left,
            "env_id": env_id, "grp": spec.get("group", DEFAULT_GROUP), "slots": spec.get("slots", 1),
            "state": "pending", "retry_base": old["attempts"], "updated_at": now,
            "started_at": None, "finished_at": None, "worker_id": None, "lease_until": None,
            "job_pid": None, "job_pid_start": None, "exit_code": None, "last_error": None,
            "output_tail": None, "cancel_requested": 0}, states=(old["state"],))
        if not changed:  # purged (retention) or changed since it was read: check again
            raise DuplicateKey(f"job {old['id']!r} changed while it was being replaced")

    def _enqueue_plain(self, specs: Sequence[Dict[str, Any]], now: float,
                       env_id: Optional[int]) -> List[Enqueued]:
        """The bulk case (no ids, unique keys or dependencies: nothing to check) without the
        general loop's bookkeeping: it halves the Python time of a 100k-job enqueue."""
        ids = self.store.insert_jobs([
            (None, s["command"], s["argv"], s["priority"], s["max_retries"], s["timeout"], s["cwd"],
             s["run_at"], now, None, 0, env_id, s.get("group", DEFAULT_GROUP), s.get("slots", 1))
            for s in specs])
        return [Enqueued(job_id, True) for job_id in ids]

    def _check_new(self, spec: Dict[str, Any], existing: Dict[str, str], seen: Dict[str, int],
                   keys_in_batch: Dict[str, str], dep_states: Dict[str, str],
                   if_exists: str) -> "tuple[Optional[str], int]":
        """Duplicate id, unique key and dependency checks for one new job.

        Returns (id of the active job holding its unique key when skipping, dependencies left).
        """
        job_id = spec["id"]
        if job_id is not None and job_id in seen:
            raise Conflict(f"job {job_id!r} already exists (earlier in this batch)")
        if job_id is not None and job_id in existing:
            state = existing[job_id]
            if if_exists == "skip" and state in ACTIVE:
                return job_id, 0
            if if_exists == "replace":
                if state in ACTIVE:
                    raise Conflict(f"job {job_id!r} is {state}; --if-exists replace only replaces a "
                                   "finished (completed, dead or cancelled) job")
            else:
                raise Conflict(f"job {job_id!r} already exists ({state})"
                               + ("; --if-exists replace re-queues a finished job under its id"
                                  if state in TERMINAL else ""))
        key = spec["unique_key"]
        if key is not None:
            holder: Any = keys_in_batch.get(key)  # an id, or the row index of a generated one
            if holder is None:
                holder = self.store.active_with_key(key)
            if holder is not None and holder != job_id:
                if if_exists == "skip":
                    return holder, 0
                shown = "an earlier job of this batch" if isinstance(holder, int) else f"active job {holder!r}"
                raise Conflict(f"unique key {key!r} is held by {shown}")
        deps_left = 0
        for dep in spec["after"]:
            state = "pending" if dep in seen else dep_states.get(dep)
            if state is None:  # retention may have deleted a finished one: never assume it ran
                raise NotFound(f"unknown job {dep!r} in after (never added, or finished and "
                               "purged since; see config keep_completed)")
            if state in ("dead", "cancelled"):
                raise Conflict(f"job {dep!r} in after is {state}; the new job could never run")
            if state != "completed":
                deps_left += 1
        return None, deps_left

    # -- worker side ----------------------------------------------------------------------
    def paused(self) -> bool:
        return self.store.flag("paused") is not None

    def has_ready(self) -> bool:
        return self.store.has_ready(self.clock(), self.serve_groups)

    def next_run_at(self) -> Optional[float]:
        return self.store.next_run_at(self.serve_groups)

    def overtakes(self, job: Dict[str, Any]) -> bool:
        """Whether a ready job comes before ``job`` (one claimed, not started) in claim order."""
        head = self.store.ready_head(self.clock(), self.serve_groups)
        return head is not None and (-head[0], head[1], head[2]) < (-job["priority"], job["run_at"], job["seq"])

    def closed_groups(self, jobs: Iterable[Dict[str, Any]]) -> "set[str]":
        """The groups of ``jobs`` (claimed, not started) that must not start them now:
        paused, or running more than their limit (claimed jobs already count as running:
        the limit was lowered after the claim). One read by primary key."""
        names = sorted({job.get("grp") or DEFAULT_GROUP for job in jobs})
        return {row["name"] for row in self.store.group_rows_for(names)
                if row["paused"] or (row["parallel"] is not None and row["running"] > row["parallel"])}

    def claim(self, worker_id: str) -> Optional[Dict[str, Any]]:
        with self.store.transaction():
            jobs = self._claim_locked(worker_id, 1)
        return jobs[0] if jobs else None

    def _claim_locked(self, worker_id: str, limit: int, free: Optional[int] = None,
                      capacity: int = 1) -> List[Dict[str, Any]]:
        # The store's claim returns nothing while the "paused" flag is set (same statement),
        # and respects groups (paused, limits, the worker's serve_groups) and slots (``free``).
        now = self.clock()
        return self.store.claim(worker_id, now, now + self.settings()["lease_seconds"], limit,
                                self.serve_groups, free, capacity)

    def _release_locked(self, job: Dict[str, Any], worker_id: str, now: float) -> str:
        """Undo the claim of a job that never started: back to the state and attempt count
        it had, so the claim leaves no trace. One cancelled meanwhile is cancelled instead
        (going back would let it be claimed again). 'lost' if it is no longer ours."""
        current = self.store.get(job["id"])
        if not current or current["state"] != "processing" or current["worker_id"] != worker_id:
            return "lost"
        fields: Dict[str, Any] = {"attempts": current["attempts"] - 1, "worker_id": None,
                                  "started_at": None, "lease_until": None, "updated_at": now}
        if current["cancel_requested"]:
            state = "cancelled"
            fields.update(last_error="cancelled by user before it started", finished_at=now)
        else:
            # Whether it had run since its last (re)start: then it was waiting for a retry.
            state = "failed" if current["attempts"] - (current.get("retry_base") or 0) > 1 else "pending"
            self.store.wake()
        fields["state"] = state
        self.store.update_job(job["id"], fields, states=("processing",), worker_id=worker_id)
        if state == "cancelled":
            self._cascade_cancel(job["id"], state, now)
            return state
        return "released"

    def job_timeout(self, job: Dict[str, Any]) -> Optional[float]:
        return job["timeout"] if job["timeout"] is not None else self.settings()["job_timeout"]

    def finish(self, job: Dict[str, Any], outcome: Any, worker_id: str,
               claim_next: bool = False) -> "tuple[str, Optional[Dict[str, Any]]]":
        """Record one run's outcome and, in the same transaction, claim the next job.

        Returns (new state of the finished job or 'lost', next job or None). 'lost' means
        the job was taken from us (lease expired and recovered) and the result is dropped.
        """
        states, claimed = self.settle(((job, outcome),), worker_id, claim=1 if claim_next else 0)
        return states[0], (claimed[0] if claimed else None)

    def settle(self, results: Sequence["tuple[Dict[str, Any], Any]"], worker_id: str, *,
               release: Sequence[Dict[str, Any]] = (), claim: int = 0,
               free: Optional[int] = None, capacity: int = 1
               ) -> "tuple[List[str], List[Dict[str, Any]]]":
        """A worker's bookkeeping in ONE short transaction: record finished runs, hand back
        claimed jobs it will not start, and claim up to ``claim`` more.

        Returns (the new state of each result, then of each released job ('released', or
        'cancelled' if a cancel came first, or 'lost'), the jobs claimed). A transaction
        per job is most of a short job's cost; batching several is what lets a worker keep
        up with the machine's process spawning rate.
        """
        now = self.clock()
        with self.store.transaction():
            states = self._finish_locked(results, worker_id, now)
            counted = [(state, o.started_at if o.started_at is not None else job["started_at"],
                        o.finished_at if o.finished_at is not None else now, job["run_at"])
                       for (job, o), state in zip(results, states) if state != "lost"]
            if counted:  # in the same transaction: counted once, exactly when recorded
                self.store.add_counts(worker_id, metrics.run_deltas(counted))
            states += [self._release_locked(job, worker_id, now) for job in release]
            if any(job.get("counted") for job, _ in results):
                self.store.wake()  # a slot of a limited group is free: idle workers may take it
            claimed = self._claim_locked(worker_id, claim, free, capacity) if claim else []
        return states, claimed

    def _finish_locked(self, results: Sequence["tuple[Dict[str, Any], Any]"], worker_id: str,
                       now: float) -> List[str]:
        """Record finished runs (one store call for all); each one's new state, or 'lost'."""
        rows, states = [], []
        for job, outcome in results:
            run_at = None
            if outcome.cancelled:
                state, error = "cancelled", outcome.error or "cancelled while running"
            elif outcome.ok:
                state, error = "completed", None
            else:
                failure = self._failure_fields(job, outcome.error, now)
                state, error, run_at = failure["state"], failure["last_error"], failure.get("run_at")
            started = outcome.started_at if outcome.started_at is not None else job["started_at"]
            finished = outcome.finished_at if outcome.finished_at is not None else now
            rows.append((job["seq"], state, started, finished, outcome.exit_code, outcome.tail, error,
                         run_at, getattr(outcome, "log_location", None)))
            states.append(state)
        flags = self.store.record_outcomes(worker_id, now, rows) if rows else []
        released = []  # completed jobs some dependent waits for: one statement for all
        for index, ((job, outcome), row, waited) in enumerate(zip(results, rows, flags)):
            if waited is None:
                states[index] = "lost"
            elif states[index] == "completed":  # a completed job's row is its last run's record
                if waited:
                    released.append(job["id"])
            else:
                self.store.add_run(job["id"], job["attempts"], worker_id, row[2], row[3],
                                   outcome.exit_code, row[6])
                self._after_state_change(job["id"], states[index], now)
        if released:
            self._release_dependents(released, now)
        return states

    def _failure_fields(self, job: Dict[str, Any], error: str, now: float) -> Dict[str, Any]:
        settings = self.settings()
        max_retries = job["max_retries"] if job["max_retries"] is not None else settings["max_retries"]
        used = job["attempts"] - (job.get("retry_base") or 0)  # runs since the last dlq retry
        if used > max_retries:
            return {"state": "dead", "last_error": error}
        delay = backoff_delay(used, settings["backoff_base"], settings["backoff_max"])
        return {"state": "failed", "last_error": error, "run_at": now + delay}

    def _after_state_change(self, job_id: str, state: str, now: float) -> None:
        if state == "completed":
            self._release_dependents([job_id], now)
        elif state in ("dead", "cancelled"):
            self._cascade_cancel(job_id, state, now)

    def _release_dependents(self, job_ids: Sequence[str], now: float) -> None:
        if self.store.release_dependents(job_ids, now):
            self.store.wake()

    def _cascade_cancel(self, job_id: str, state: str, now: float) -> None:
        todo = [(job_id, state)]
        while todo:
            dep, dep_state = todo.pop()
            for child in self.store.dependents(dep, WAITING):
                reason = f"dependency {dep!r} is {dep_state}"
                if self.store.update_job(child, {"state": "cancelled", "last_error": reason,
                                                 "finished_at": now, "updated_at": now},
                                         states=WAITING):
                    todo.append((child, "cancelled"))

    def heartbeat(self, job: Dict[str, Any], worker_id: str, pid: Optional[int] = None,
                  pid_start: Optional[int] = None) -> "tuple[bool, bool]":
        """Renew our lease. Returns (still ours, cancel requested)."""
        now = self.clock()
        fields: Dict[str, Any] = {"lease_until": now + self.settings()["lease_seconds"]}
        if pid is not None:
            fields.update(job_pid=pid, job_pid_start=pid_start)
        with self.store.transaction():
            ours = bool(self.store.update_job(job["id"], fields, states=("processing",),
                                              worker_id=worker_id))
        if ours:  # the lease as last renewed: a worker that can no longer renew it stops there
            job["lease_until"] = fields["lease_until"]
        return ours, ours and self.cancel_requested(job["id"])

    def heartbeat_many(self, jobs: Sequence[Dict[str, Any]], worker_id: str,
                       pids: Mapping[str, "tuple[int, Optional[int]]"]) -> Dict[str, "tuple[bool, bool]"]:
        """heartbeat for every run of a multi-slot worker in ONE transaction (``pids``: the
        (pid, start) to record, by job id). Returns {job id: (still ours, cancel requested)}."""
        now = self.clock()
        lease = now + self.settings()["lease_seconds"]
        ours: Dict[str, bool] = {}
        with self.store.transaction():
            for job in jobs:
                fields: Dict[str, Any] = {"lease_until": lease}
                if job["id"] in pids:
                    fields["job_pid"], fields["job_pid_start"] = pids[job["id"]]
                ours[job["id"]] = bool(self.store.update_job(job["id"], fields, states=("processing",),
                                                             worker_id=worker_id))
        for job in jobs:
            if ours[job["id"]]:
                job["lease_until"] = lease
        cancels = self.cancels_for(worker_id) if any(ours.values()) else set()
        return {job_id: (mine, mine and job_id in cancels) for job_id, mine in ours.items()}

    def cancels_for(self, worker_id: str) -> "set[str]":
        """Ids of this worker's running jobs whose cancel was asked (one read for all, of
        this worker's cancelled runs only: a multi-slot worker asks on every wake-up)."""
        return set(self.store.cancels_for(worker_id))

    def cancel_requested(self, job_id: str) -> bool:
        row = self.store.get(job_id)
        return bool(row and row["cancel_requested"])

    def recover(self, worker_alive: Callable[[str], bool],
                kill_orphan: Optional[Callable[[int, Optional[int]], None]] = None,
                kill_run: Optional[Callable[[str, int], None]] = None,
                run_result: Optional[Callable[[str, int, str], "tuple[bool, bool, Optional[str]]"]] = None,
                interrupted: Optional[Callable[[str, int], None]] = None,
                local: Optional[Callable[[str], bool]] = None) -> Dict[str, str]:
        """Settle the jobs whose worker died (process gone or lease expired).

        Before a job goes back, its abandoned run is killed so two runs never overlap:
        ``kill_orphan(pid, start)`` by the pid the heartbeat recorded, and
        ``kill_run(job_id, attempt)`` by identity, for runs whose pid was never recorded
        (the worker died within the job's first second) or whose leader already exited.
        ``run_result(job_id, attempt, worker_id)`` -> (started, finished, error) is what the
        run left in its log: a claim that never started goes back as if never made (when its
        worker is gone), and a run that finished before its worker could record it (a worker
        records short jobs a few at a time) gets its real result instead of running again.
        Otherwise the job returns to the retry path as "worker died": that run is recorded as
        ending at its last heartbeat (lease_until - lease_seconds), when it was last known to
        run, and ``interrupted(job_id, attempt)`` closes its log.
        ``local(worker_id)`` says whether a worker ran on this host: a recorded pid means
        nothing on another host, so ``kill_orphan`` is only used for local ones.
        Returns {job id: what became of it}: its new state, or "released" (never started).
        """
        now = self.clock()
        recovered: Dict[str, str] = {}
        alive: Dict[str, bool] = {}  # a worker holds up to 8 claims: ask /proc once per worker
        for row in self.store.processing():
            worker_id = row["worker_id"] or ""
            if worker_id not in alive:
                alive[worker_id] = worker_alive(worker_id)
            gone = not alive[worker_id]
            if gone:
                reason = "worker died (process gone)"
            elif row["lease_until"] is not None and row["lease_until"] < now:
                reason = "worker died (lease expired)"
            else:
                continue
            if kill_orphan and row["job_pid"] and (local is None or local(worker_id)):
                kill_orphan(row["job_pid"], row["job_pid_start"])
            if kill_run:
                kill_run(row["id"], row["attempts"])
            started, finished, error = (run_result(row["id"], row["attempts"], row["worker_id"])
                                        if run_result else (True, False, None))
            cut: Optional["tuple[str, int]"] = None
            with self.store.transaction():
                job = self.store.get(row["id"])
                if not job or job["state"] != "processing" or job["worker_id"] != row["worker_id"]:
                    continue
                if not started and gone:
                    # Only a worker that is gone can be trusted never to start it: a frozen
                    # one past its lease may still wake up and do so, which must then count
                    # as an attempt of its own (below), never as a second run of this one.
                    recovered[job["id"]] = self._release_locked(job, row["worker_id"], now)
                    continue
                exit_code = None
                ended = now
                if not finished and job["lease_until"] is not None:
                    beat = job["lease_until"] - self.settings()["lease_seconds"]
                    ended = min(now, max(beat, job["started_at"] or beat))
                if job["cancel_requested"]:
                    fields = {"state": "cancelled", "last_error": "cancelled (its worker died)"}
                elif finished and error is None:
                    fields, exit_code = {"state": "completed", "last_error": None}, 0
                else:
                    fields = self._failure_fields(job, error if finished else reason, now)
                fields.update(finished_at=ended, updated_at=now, lease_until=None, job_pid=None,
                              job_pid_start=None, exit_code=exit_code)
                if self.store.update_job(job["id"], fields, states=("processing",),
                                         worker_id=row["worker_id"]):
                    if fields["state"] != "completed":
                        self.store.add_run(job["id"], job["attempts"], job["worker_id"],
                                           job["started_at"], ended, None, fields["last_error"])
                    if not finished:
                        cut = (job["id"], job["attempts"])
                    self.store.add_counts("", metrics.run_deltas(
                        [(fields["state"], job["started_at"], ended, job["run_at"])]))
                    self._after_state_change(job["id"], fields["state"], now)
                    recovered[job["id"]] = fields["state"]
                    self.store.wake()
            if cut is not None and interrupted is not None:  # after COMMIT: it is settled now
                interrupted(*cut)
        return recovered

    def environment(self, env_id: Optional[int]) -> "Optional[tuple[Dict[str, str], bool]]":
        """A stored environment: ({name: value}, inherit: over the worker's own or not)."""
        if env_id is None:
            return None
        found = self.store.get_env(env_id)
        if found is None:
            return None
        return json.loads(found[0]), found[1]

    # -- worker registry ------------------------------------------------------------------
    def worker_gone_after(self) -> float:
        """Seconds without a registry beat after which a worker counts as gone: three leases
        (a worker beats every few seconds), never under GONE_MIN so a slow beat is no death."""
        return max(3 * self.settings()["lease_seconds"], GONE_MIN)

    def register_worker(self, worker_id: str, host: str, pid: int, started_at: float,
                        mode: str, capacity: int = 1) -> None:
        with self.store.transaction():
            self.store.register_worker(worker_id, host, pid, started_at, mode, self.clock(),
                                       capacity, ",".join(self.serve_groups or ()))

    def worker_beat(self, worker_id: str, host: str, pid: int, started_at: float,
                    mode: str, capacity: int = 1) -> int:
        """Renew our registry row (re-creating it if it was forgotten during an outage) and
        forget the rows of workers gone long ago; returns the stop level asked of us."""
        now = self.clock()
        with self.store.transaction():
            level = self.store.beat_worker(worker_id, now)
            if level is None:
                self.store.register_worker(worker_id, host, pid, started_at, mode, now, capacity,
                                           ",".join(self.serve_groups or ()))
                level = 0
            self.store.forget_workers(now - 2 * self.worker_gone_after())
        return level

    def unregister_worker(self, worker_id: str) -> None:
        with self.store.transaction():
            self.store.unregister_worker(worker_id)

    def registry(self) -> List[Dict[str, Any]]:
        """Every registered worker, each with ``gone``: its beat is older than
        worker_gone_after (a worker on another host is dead only when it stops beating)."""
        cutoff = self.clock() - self.worker_gone_after()
        return [dict(row, gone=row["heartbeat_at"] < cutoff) for row in self.store.registered_workers()]

    def forget_workers(self, worker_ids: Sequence[str]) -> None:
        """Drop the rows of workers known to be gone (a dead PID on this host, a stale beat)."""
        if worker_ids:
            with self.store.transaction():
                for worker_id in worker_ids:
                    self.store.unregister_worker(worker_id)

    def request_stop(self, force: bool = False) -> List[str]:
        """Ask every live registered worker, on every host, to stop (as SIGTERM would; forced:
        as SIGUSR1). They see it at their next beat or wake-up; returns the ids asked."""
        ids = [row["worker_id"] for row in self.registry() if not row["gone"]]
        with self.store.transaction():
            self.store.request_stop(2 if force else 1, ids)
            self.store.wake()
        return ids

    # -- operator side --------------------------------------------------------------------
    def get(self, job_id: str) -> Dict[str, Any]:
        validate_id(job_id, new=False)
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}")
        return job

    def details(self, job_id: str) -> Dict[str, Any]:
        """A job with its dependencies, run history and effective retry/timeout settings."""
        job = self.get(job_id)
        settings = self.settings()
        info = dict(job)
        info["command"] = json.loads(job["command"]) if job["argv"] else job["command"]
        info["effective_max_retries"] = (job["max_retries"] if job["max_retries"] is not None
                                         else settings["max_retries"])
        info["effective_timeout"] = self.job_timeout(job)
        info["after"] = self.store.dependencies(job_id)
        info["runs"] = self.store.runs(job_id)
        return info

    def states(self, ids: Sequence[str]) -> Dict[str, str]:
        return self.store.states_of(list(ids))

    def counts(self, group: Optional[str] = None) -> Dict[str, int]:
        found = self.store.counts(validate_group(group) if group is not None else None)
        return {state: found.get(state, 0) for state in STATES}

    def list(self, states: Sequence[str] = (), limit: int = 0,
             group: Optional[str] = None) -> List[Dict[str, Any]]:
        for state in states:
            if state not in STATES:
                raise InvalidInput(f"unknown state {state!r}; valid states: {', '.join(STATES)}")
        return self.store.list_jobs(states, limit, validate_group(group) if group is not None else None)

    # -- groups ---------------------------------------------------------------------------
    def set_group_limit(self, name: str, parallel: Optional[int]) -> None:
        """At most ``parallel`` jobs of the group run at once, over every worker and host
        (None: no limit). Lowering it stops new starts until fewer run; none is killed."""
        validate_group(name)
        if parallel is not None and not (1 <= parallel <= 1_000_000):
            raise InvalidInput(f"--parallel must be from 1 to 1000000, got {parallel}")
        with self.store.transaction():
            self.store.set_group_limit(name, parallel)
            self.store.wake()  # a raised limit lets idle workers start more now

    def pause_group(self, name: str, paused: bool = True) -> None:
        validate_group(name)
        with self.store.transaction():
            self.store.set_group_paused(name, paused)
            self.store.wake()

    def groups(self) -> List[Dict[str, Any]]:
        """Groups worth showing (with a limit, paused, with jobs waiting or running, or
        'default'): name, parallel, paused, running (processing now), waiting."""
        shown = []
        for row in self.store.group_rows():
            if (row["name"] == DEFAULT_GROUP or row["parallel"] is not None or row["paused"]
                    or row["waiting"] or row["processing"]):
                shown.append({"name": row["name"], "parallel": row["parallel"],
                              "paused": row["paused"], "running": row["processing"],
                              "waiting": row["waiting"]})
        return shown

    def processing(self) -> List[Dict[str, Any]]:
        return self.store.processing()

    def _load(self, ids: Iterable[str]) -> List[Dict[str, Any]]:
        return [self.get(job_id) for job_id in dict.fromkeys(ids)]

    def dlq_retry(self, ids: Sequence[str] = (), all_dead: bool = False) -> List[str]:
        """Dead jobs back to pending with a fresh retry budget; all or nothing."""
        return self.dlq_retry_report(ids, all_dead)[0]

    def dlq_retry_report(self, ids: Sequence[str] = (), all_dead: bool = False
                         ) -> "tuple[List[str], List[str]]":
        """dlq_retry, and the jobs revived with them: those cancelled only because a retried
        job died (recursively). Returns (retried ids, revived ids)."""
        now = self.clock()
        with self.store.transaction():
            jobs = self.store.list_jobs(("dead",)) if all_dead else self._load(ids)
            for job in jobs:
                if job["state"] != "dead":
                    raise Conflict(f"job {job['id']!r} is {job['state']}, not dead; "
                                   "only jobs in the DLQ can be retried with dlq retry")
                self._requeue(job, now, reset_attempts=True)
            revived = self._revive_dependents([job["id"] for job in jobs], now)
            if jobs:
                self.store.wake()
        return [job["id"] for job in jobs], revived

    def retry(self, ids: Sequence[str]) -> List[str]:
        """Run failed (waiting) jobs now; dead jobs are requeued as by dlq retry."""
        return self.retry_report(ids)[0]

    def retry_report(self, ids: Sequence[str]) -> "tuple[List[str], List[str]]":
        """retry, and the dependents revived with the dead jobs among them."""
        now = self.clock()
        with self.store.transaction():
            jobs = self._load(ids)
            for job in jobs:
                if job["state"] not in ("failed", "dead"):
                    raise Conflict(f"job {job['id']!r} is {job['state']}; only failed or dead jobs "
                                   "can be retried")
                self._requeue(job, now, reset_attempts=job["state"] == "dead")
            revived = self._revive_dependents([j["id"] for j in jobs if j["state"] == "dead"], now)
            self.store.wake()
        return [job["id"] for job in jobs], revived

    def _revive_dependents(self, retried: Sequence[str], now: float) -> List[str]:
        """Jobs cancelled by the cascade of a retried job's death ("dependency 'X' is dead",
        or "... is cancelled" for X revived here) go back to waiting, with deps_left counted
        afresh. One that still waits for another dead or cancelled job stays cancelled
        (it is looked at again if that one is revived too), and so does one whose unique
        key an active job holds now."""
        back = set(retried)
        revived: List[str] = []
        todo = list(retried)
        while todo:
            parent = todo.pop(0)
            for child_id in self.store.dependents(parent, ("cancelled",)):
                child = self.store.get(child_id)
                if child is None or child["state"] != "cancelled" or child_id in back:
                    continue
                error = child["last_error"] or ""
                if not any(error in (f"dependency {dep!r} is dead", f"dependency {dep!r} is cancelled")
                           for dep in back):
                    continue
                deps = self.store.dependencies(child_id)
                states = self.store.wait_on(deps)
                if any(states.get(dep) in ("dead", "cancelled") for dep in deps):
                    continue
                key = child["unique_key"]
                if key is not None and self.store.active_with_key(key) is not None:
                    continue
                left = sum(1 for dep in deps if dep in states and states[dep] != "completed")
                self.store.update_job(child_id, {
                    "state": "pending" if child["attempts"] - child["retry_base"] == 0 else "failed",
                    "deps_left": left, "run_at": now, "updated_at": now, "finished_at": None,
                    "last_error": None}, states=("cancelled",))
                back.add(child_id)
                revived.append(child_id)
                todo.append(child_id)
        return revived

    def _requeue(self, job: Dict[str, Any], now: float, reset_attempts: bool) -> None:
        key = job["unique_key"]
        if key is not None and job["state"] == "dead":
            holder = self.store.active_with_key(key)
            if holder is not None:
                raise Conflict(f"unique key {key!r} is held by active job {holder!r}")
        fields: Dict[str, Any] = {"state": "pending", "run_at": now, "updated_at": now,
                                  "finished_at": None}
        if reset_attempts:  # attempt numbers go on; the retry budget starts afresh
            fields["retry_base"] = job["attempts"]
        self.store.update_job(job["id"], fields, states=(job["state"],))

    def cancel(self, ids: Sequence[str]) -> Dict[str, str]:
        """Waiting jobs become cancelled now; running ones are flagged and killed by their worker."""
        now = self.clock()
        result: Dict[str, str] = {}
        with self.store.transaction():
            jobs = self._load(ids)
            for job in jobs:
                if job["state"] in TERMINAL:
                    raise Conflict(f"job {job['id']!r} is already {job['state']}")
            for job in jobs:
                if job["state"] == "processing":
                    self.store.update_job(job["id"], {"cancel_requested": 1, "updated_at": now},
                                          states=("processing",))
                    result[job["id"]] = "cancelling"
                else:
                    self.store.update_job(job["id"], {"state": "cancelled", "finished_at": now,
                                                      "updated_at": now,
                                                      "last_error": "cancelled by user"},
                                          states=WAITING)
                    self._cascade_cancel(job["id"], "cancelled", now)
                    result[job["id"]] = "cancelled"
            if "cancelling" in result.values():
                self.store.wake()  # the running job's worker kills it now, not at its next beat
        return result

    def pause(self) -> None:
        with self.store.transaction():
            if self.store.flag("paused") is None:
                self.store.set_flag("paused", str(self.clock()))
            self.store.wake()  # workers hand back jobs they claimed but have not started

    def resume(self) -> None:
        with self.store.transaction():
            self.store.set_flag("paused", None)
            self.store.wake()

    def paused_since(self) -> Optional[float]:
        value = self.store.flag("paused")
        return float(value) if value is not None else None

    def purge_candidates(self, states: Sequence[str], older_than: float = 0.0) -> List[str]:
        """The ids ``purge`` would delete now, deleting nothing (for ``purge --dry-run``)."""
        self._check_purge_states(states)
        return self.store.finished_before(states, self.clock() - older_than)

    @staticmethod
    def _check_purge_states(states: Sequence[str]) -> None:
        for state in states:
            if state not in TERMINAL:
                raise InvalidInput(f"purge only removes {', '.join(TERMINAL)} jobs, not {state!r}")

    def purge_due(self, limit: int) -> List[str]:
        """Retention: delete up to ``limit`` finished jobs older than their state's keep_*
        setting, oldest first, in one short transaction per state (see Store.purge_due:
        what a waiting job depends on stays). Returns the deleted ids (their logs are the
        caller's)."""
        settings, now = self.settings(), self.clock()
        deleted: List[str] = []
        for state in TERMINAL:
            keep = settings["keep_" + state]
            if keep is None or len(deleted) >= limit:
                continue
            with self.store.transaction():
                deleted += self.store.purge_due(state, now - keep, limit - len(deleted))
        return deleted

    def tidy(self) -> int:
        """Rare housekeeping beside retention: fold the counter rows of workers gone into one
        set, and delete environments no job uses (a scan). Returns the rows folded."""
        with self.store.transaction():
            folded = self.store.fold_counts()
            self.store.drop_unused_envs()
        return folded

    def metrics_snapshot(self) -> Dict[str, Any]:
        """What /metrics shows (queuectl/metrics.py renders it): job counts, counter totals,
        workers busy and idle, the age of the longest-waiting due job, the groups (as
        ``group list``: running, waiting, limit, paused)."""
        now = self.clock()
        live = [w["worker_id"] for w in self.registry() if not w["gone"]]
        running = {row["worker_id"] for row in self.store.processing()}
        busy = sum(1 for worker_id in live if worker_id in running)
        due = self.store.next_run_at()
        return {"jobs": self.counts(), "counters": self.store.counter_totals(),
                "workers_busy": busy, "workers_idle": len(live) - busy,
                "oldest_waiting_age": max(0.0, now - due) if due is not None else 0.0,
                "paused": self.paused(), "groups": self.groups()}

    def runs_since(self, since: float) -> List[Dict[str, Any]]:
        """Runs that ended at or after ``since`` (for ``stats``; purged jobs are not in it)."""
        return self.store.runs_since(since)

    def purge(self, states: Sequence[str], older_than: float = 0.0) -> List[str]:
        """Delete finished jobs (never waiting or running ones); returns the deleted ids."""
        self._check_purge_states(states)
        cutoff = self.clock() - older_than
        with self.store.transaction():
            ids = self.store.finished_before(states, cutoff)
            self.store.delete_jobs(ids)
        if ids:
            self.store.reclaim()  # give the freed space back when it is most of the file
        return ids
