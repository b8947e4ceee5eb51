"""A worker with several slots: up to ``capacity`` jobs run at once, each supervised as a
single-slot worker supervises its one job (own process group, timeout, cancel, heartbeat,
lease and fencing, log with header and result line).

One loop waits on every run's pidfd, the doorbell and the signal pipe at once; every
run's lease is renewed in one transaction a second. Graceful stop: no new claims, every run
finishes, held jobs go back unrun. Forced: every run is killed (and goes back to the retry
path).

Short jobs are batched as the single-slot Worker batches them (a transaction per job was
most of a `true`'s cost, ~5 round trips and a commit on PostgreSQL): while runs are short,
a claim takes the free slots plus a prefetch (``self.held``); a slot that frees starts the
next held job at once, without a transaction, if its slots fit (claim order is kept: a
held job that does not fit yet is waited for, not overtaken); results (``self.done``) are
recorded in the transaction of the next claim, when nothing is held any more, or when the
oldest has waited RECORD_DELAY. Held jobs go back to the queue (where other workers take
them) once only runs older than HOLD_LIMIT stand between them and a slot, on news (a pause,
a job that comes before them), a cancel of one of them, a lapsing claim, and on stop.
"""
from __future__ import annotations

import logging
import resource
import select
import time
from typing import Any, Dict, List, Optional, Tuple

from queuectl import chores, executor, spool
from queuectl.errors import QueueError
from queuectl.worker import (FENCE_MARGIN, HEARTBEAT_EVERY, HOLD_LIMIT, RECORD_DELAY, RECOVER_EVERY,
                             SHORT_JOB, Worker)

log = logging.getLogger("queuectl.worker")
NO_PIDFD_POLL = 0.01  # seconds between exit checks where the kernel has no pidfd
# Jobs held beyond the free slots while runs are short: SLOT_PREFETCH per slot, at most
# MAX_PREFETCH, on either backend (not scaled by the store's batch: a run over HOLD_LIMIT
# hands every held job back, one UPDATE each, and larger holds are not measured yet).
SLOT_PREFETCH = 16
MAX_PREFETCH = 64


class SlotWorker(Worker):
    def __init__(self, *args: Any, capacity: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capacity = capacity
        self.runs: Dict[str, Tuple[Dict[str, Any], executor.Run]] = {}  # job id -> (job, run)
        self.used_slots = 0     # the slots of self.runs
        self.prefetch = min(SLOT_PREFETCH * capacity, MAX_PREFETCH)  # held beyond the free slots
        self._short = False     # the last run that ended was short: claims take a prefetch
        self._pids_sent: Dict[str, bool] = {}
        self._linked: Dict[str, Optional[spool.Spool]] = {}  # job id -> its log's spool
        self._want_claim = True
        self._idle = False      # the last claim found less work than there were free slots
        self._forced = False
        self._poller = select.poll()
        self._by_fd: Dict[int, str] = {}  # pidfd -> job id
        self._ready: List[int] = []       # pidfds poll() reported readable
        self._next_tick = float("inf")    # monotonic time a timeout or kill is due

    def _slots(self, job: Dict[str, Any]) -> int:
        return min(job.get("slots") or 1, self.capacity)

    def _loop(self) -> None:
        _raise_fd_limit(2 * self.capacity + 64)  # a log and a pidfd per run
        poller = self._poller
        wake_fds = (self.listener.fileno(), self._sig_r)
        for fd in wake_fds:
            poller.register(fd, select.POLLIN)
        next_recovery = 0.0
        next_heartbeat = time.monotonic() + HEARTBEAT_EVERY
        while not (self.stopping and not self.runs):
            try:
                if self._outage_since is not None:
                    self._beat_registry(due=False)
                    self._back_online()
                else:
                    self._beat_registry()
                if self.force and not self._forced:
                    self._forced = True
                    for job, run in self.runs.values():
                        run.abort("worker stopped (forced); job killed", False)
                    self._next_tick = 0.0
                now = time.monotonic()
                if now >= next_recovery:
                    self._recover()
                    next_recovery = time.monotonic() + RECOVER_EVERY
                chores.run_due(self.chores)
                self._collect()
                self._fill()
                now = time.monotonic()
                if now >= next_heartbeat:
                    next_heartbeat = now + HEARTBEAT_EVERY
                    self._heartbeat()
                timeout = self._timeout(next_heartbeat, next_recovery)
                self._ready = []
                woken = False
                for fd, _ in poller.poll(max(timeout, 0.0) * 1000):
                    if fd in wake_fds:
                        woken = True
                    else:
                        self._ready.append(fd)
                if woken:
                    self._drain()
                    self._want_claim = True
                    self._check_cancels()
                    if self.held and self._news():  # a pause, or a job that comes first
                        self._hand_back()
            except QueueError as exc:
                self._sleep_unless_running(self._unreachable(exc))
            except Exception:  # never let one bad job or bug kill the worker
                log.exception("unexpected error in worker loop")
                self._sleep_unless_running(1.0)
        self._settle(release=True, tries=10)

    # -- claims, held jobs and results ------------------------------------------------------
    def _fill(self) -> None:
        """Start held jobs in the free slots; claim (recording the results in the same
        transaction) once none is held; record results that waited long enough; hand held
        jobs back when they would wait behind long runs. Every transaction here is one try:
        a retry loop would leave the runs unsupervised; what is not done now is done at the
        next event."""
        if self.stopping:  # no new claims; what is held goes back unrun
            if self.held or self.done:
                self._settle(release=True, tries=1)
            return
        if self._claim_lapsing() or self._hand_back_due:
            self._hand_back()
        self._start_held()
        if self.held:
            if self._blocked():
                self._hand_back()
            elif self._record_due():
                self._settle(tries=1)
            if self.held:
                return
        free = self.capacity - self.used_slots
        want = free + self.prefetch if self._short else free
        if want > 0 and self._want_claim:
            self._want_claim = False
            if self.done or self.queue.has_ready():
                self._settle(claim=want, free=want, tries=1)
                self._idle = sum(self._slots(job) for job in self.held) < want
                self._start_held()
            else:
                self._idle = True
        elif self.done:  # nothing to claim for (every slot busy with runs that are not short)
            self._settle(tries=1)

    def _blocked(self) -> bool:
        """Whether the next held job can only start once a run older than HOLD_LIMIT ends:
        then the held jobs go back, where idle workers take them."""
        need = self._slots(self.held[0])
        free = self.capacity - self.used_slots
        if need <= free:
            return False
        now = time.monotonic()
        # A run whose process already ended frees its slots at the next turn: not long.
        young = sum(self._slots(job) for job, run in self.runs.values()
                    if now - run.started < HOLD_LIMIT or run.done())
        return free + young < need

    def _hand_back(self) -> None:
        """Held jobs back to the queue, the results so far recorded (one transaction); claims
        take no prefetch until a run is short again."""
        self._short = False
        self._settle(release=True, tries=1)

    def _add_done(self, job: Dict[str, Any], outcome: executor.Outcome) -> None:
        super()._add_done(job, outcome)
        self._want_claim = True

    # -- runs -----------------------------------------------------------------------------
    def _start_held(self) -> None:
        """Start held jobs, in claim order, while the next one's slots fit in the free ones;
        none while news says they must go back first (a paused group, say)."""
        while (not self._hand_back_due and self.held
               and self._slots(self.held[0]) <= self.capacity - self.used_slots):
            job = self.held.popleft()
            if self.log_jobs:
                log.info("job %s: attempt %d started: %s", job["id"], job["attempts"], job["command"])
            log_path = self.paths.job_log_name(job["id"])
            settings = self.queue.settings()
            linked = self._link_log(log_path, job["id"])
            try:
                run = executor.Run(job["command"], bool(job["argv"]), job["cwd"], log_path, job["id"],
                                   job["attempts"], self.worker_id, self.queue.job_timeout(job),
                                   {"QUEUECTL_JOB_ID": job["id"], "QUEUECTL_ATTEMPT": str(job["attempts"])},
                                   base_env=self._environment(job.get("env_id")),
                                   tail_bytes=settings["db_tail_bytes"],
                                   max_log_bytes=settings["max_log_bytes"])
            except Exception as exc:  # noqa: BLE001 - e.g. the log cannot be written (disk full)
                self._keep_or_prune(linked, None, log_path)
                log.exception("job %s: attempt %d could not be run", job["id"], job["attempts"])
                self._add_done(job, executor.Outcome(None, f"worker error: {type(exc).__name__}: {exc}"))
                continue
            self.runs[job["id"]] = (job, run)
            self._linked[job["id"]] = linked
            self.used_slots += self._slots(job)
            self._pids_sent[job["id"]] = False
            self._next_tick = min(self._next_tick, run.next_due())
            if run.proc is None:  # it could not start: over at once
                self._end(job["id"])
            elif run.fileno() >= 0:
                self._by_fd[run.fileno()] = job["id"]
                self._poller.register(run.fileno(), select.POLLIN)

    def _collect(self) -> None:
        """End the runs whose process exited; send due SIGTERMs (timeouts) and SIGKILLs.
        With pidfds only the runs poll() reported are looked at, not all of them."""
        for fd in self._ready:
            job_id = self._by_fd.get(fd)
            if job_id is not None and self.runs[job_id][1].done():
                self._end(job_id)
        self._ready = []
        now = time.monotonic()
        polling = any(run.fileno() < 0 for _, run in self.runs.values())
        if now >= self._next_tick or polling:
            self._next_tick = float("inf")
            for job_id, (_, run) in list(self.runs.items()):
                run.tick(now)
                if run.fileno() < 0 and run.done():
                    self._end(job_id)
                else:
                    self._next_tick = min(self._next_tick, run.next_due())

    def _end(self, job_id: str) -> None:
        job, run = self.runs.pop(job_id)
        self.used_slots -= self._slots(job)
        self._pids_sent.pop(job_id, None)
        if run.fileno() >= 0:
            self._poller.unregister(run.fileno())
            del self._by_fd[run.fileno()]
        log_path = self.paths.job_log_name(job_id)
        linked = self._linked.pop(job_id, None)
        try:
            outcome = run.finish()
        except Exception as exc:  # noqa: BLE001
            log.exception("job %s: attempt %d could not be finished", job["id"], job["attempts"])
            outcome = executor.Outcome(None, f"worker error: {type(exc).__name__}: {exc}")
            self._keep_or_prune(linked, None, log_path)
        else:
            self._keep_or_prune(linked, outcome, log_path)
        outcome.log_location = f"{self.host}:{log_path}"
        # As Worker._run: only a run that happened counts as short (a worker error, say a
        # full disk, is no reason to claim a prefetch).
        self._short = outcome.finished_at is not None and outcome.duration < SHORT_JOB
        self._add_done(job, outcome)

    def _heartbeat(self) -> None:
        """Renew every run's lease in one transaction; kill the runs that are no longer ours
        or were cancelled; past the lease with storage unreachable, kill all (fencing)."""
        if not self.runs:
            return
        jobs = [job for job, _ in self.runs.values()]
        pids: Dict[str, Tuple[int, Optional[int]]] = {}
        for job, run in self.runs.values():
            if not self._pids_sent.get(job["id"]) and run.proc is not None:
                pids[job["id"]] = (run.proc.pid, executor.process_start_time(run.proc.pid))
        try:
            found = self.queue.heartbeat_many(jobs, self.worker_id, pids)
        except QueueError as exc:
            self._unreachable(exc, f" (heartbeat of {len(jobs)} running job(s) failed; still "
                                   "running them while their leases last)")
            margin = min(FENCE_MARGIN, self.queue.settings()["lease_seconds"] / 2)
            for job, run in list(self.runs.values()):
                if time.time() >= job["lease_until"] - margin:
                    log.warning("job %s: lease ran out while the database was unreachable; "
                                "run killed (its result will not count)", job["id"])
                    run.abort("lease lost: the database was unreachable until the lease ran out; "
                              "this run was killed", False, kill_now=True)
            return
        self._back_online()
        for job_id in pids:
            self._pids_sent[job_id] = True
        for job_id, (ours, cancel) in found.items():
            entry = self.runs.get(job_id)
            if entry is None:
                continue
            if not ours:
                entry[1].abort("lease lost: the job was recovered elsewhere; this run was killed", False)
            elif cancel:
                entry[1].abort("cancelled by user while running", True)
        self._next_tick = 0.0  # an abort's SIGKILL is due later: tick() schedules it

    def _check_cancels(self) -> None:
        if not (self.runs or self.held):
            return
        try:
            cancels = self.queue.cancels_for(self.worker_id)
        except QueueError:
            return  # asked again at the next heartbeat
        if any(job["id"] in cancels for job in self.held):
            self._hand_back()  # a held one is cancelled, not started (the rest are claimed again)
        for job_id in cancels:
            entry = self.runs.get(job_id)
            if entry is not None:
                entry[1].abort("cancelled by user while running", True)
                self._next_tick = 0.0

    # -- waiting --------------------------------------------------------------------------
    def _timeout(self, next_heartbeat: float, next_recovery: float) -> float:
        now = time.monotonic()
        due = min(next_heartbeat, next_recovery, self._next_beat, chores.next_due(self.chores),
                  self._next_tick)
        if any(run.fileno() < 0 and run.proc is not None for _, run in self.runs.values()):
            due = min(due, now + NO_PIDFD_POLL)
        if self.done:  # the results wait RECORD_DELAY at most
            due = min(due, self._done_since + RECORD_DELAY)
        if self.held:  # the next held job does not fit yet: look again when a run turns long
            due = min([due] + [run.started + HOLD_LIMIT for _, run in self.runs.values()
                               if run.started + HOLD_LIMIT > now])
        timeout = due - now
        if self.stopping or self.held or self.capacity - self.used_slots <= 0:
            return timeout
        if self._want_claim:
            return 0.0
        # Free slots: wait for a doorbell, a run's end or the idle timeout; when no work was
        # found, the idle timeout ends at the next job that becomes due (read only then: it
        # is a query, not worth making per job).
        idle = self.queue.settings()["poll_interval"]
        if self._idle and not self.queue.paused():
            at = self.queue.next_run_at()
            # One due already was not claimable (its slots do not fit yet): a run's end
            # wakes us for it, not a busy loop.
            if at is not None and at > time.time():
                idle = min(idle, at - time.time())
        if timeout > idle:
            self._want_claim = True  # after the idle timeout: look for work again
            timeout = idle
        return timeout

    def _sleep_unless_running(self, delay: float) -> None:
        """Back off after a storage error, but keep the runs supervised meanwhile: their
        exits, timeouts and heartbeats (which kill them once their lease is over: fencing)."""
        end = time.monotonic() + delay
        next_heartbeat = time.monotonic() + HEARTBEAT_EVERY
        while time.monotonic() < end:
            self._ready = [fd for fd, _ in self._poller.poll(0) if fd in self._by_fd]
            self._collect()
            if self.stopping and not self.runs:
                return
            if time.monotonic() >= next_heartbeat:
                next_heartbeat = time.monotonic() + HEARTBEAT_EVERY
                self._heartbeat()
            time.sleep(min(0.05, max(end - time.monotonic(), 0)))


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open-file limit to %d; many slots may fail to start", wanted)
