"""A worker with several slots: up to ``capacity`` jobs run at once, each supervised as a
single-slot worker supervises its one job (own process group, timeout, cancel, heartbeat,
lease and fencing, log with header and result line).

One loop waits on every run's pidfd, the doorbell and the signal pipe at once; results of
the runs that ended are recorded and free slots filled in one transaction, and every run's
lease is renewed in one transaction a second. Graceful stop: no new claims, every run
finishes. Forced: every run is killed (and goes back to the retry path).
``queuectl.worker.Worker`` (one slot) stays the path of the default, where batching claims
of short jobs is what its speed comes from.
"""
from __future__ import annotations

import logging
import resource
import select
import time
from typing import Any, Dict, List, Optional, Tuple

from queuectl import chores, executor
from queuectl.errors import QueueError
from queuectl.worker import FENCE_MARGIN, HEARTBEAT_EVERY, RECOVER_EVERY, Worker

log = logging.getLogger("queuectl.worker")
NO_PIDFD_POLL = 0.01  # seconds between exit checks where the kernel has no pidfd


class SlotWorker(Worker):
    def __init__(self, *args: Any, capacity: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capacity = capacity
        self.runs: Dict[str, Tuple[Dict[str, Any], executor.Run]] = {}  # job id -> (job, run)
        self._pids_sent: Dict[str, bool] = {}
        self._want_claim = True
        self._idle = False      # the last claim found less work than there were free slots
        self._forced = False
        self._poller = select.poll()
        self._by_fd: Dict[int, str] = {}  # pidfd -> job id
        self._ready: List[int] = []       # pidfds poll() reported readable
        self._next_tick = float("inf")    # monotonic time a timeout or kill is due

    @property
    def used_slots(self) -> int:
        return sum(min(job.get("slots") or 1, self.capacity) for job, _ in self.runs.values())

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
                free = self.capacity - self.used_slots
                if self.done or (free > 0 and self._want_claim and not self.stopping):
                    self._want_claim = False
                    claim = free if free > 0 and not self.stopping else 0
                    if self.done or self.queue.has_ready():
                        # One try: a retry loop here would leave the runs unsupervised;
                        # what is not recorded now is tried again at the next event.
                        self._settle(claim=claim, free=free, tries=1)
                        self._idle = len(self.held) < claim
                    else:
                        self._idle = True
                    self._start_held()
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
            except QueueError as exc:
                self._sleep_unless_running(self._unreachable(exc))
            except Exception:  # never let one bad job or bug kill the worker
                log.exception("unexpected error in worker loop")
                self._sleep_unless_running(1.0)
        self._settle(release=True, tries=10)

    # -- runs -----------------------------------------------------------------------------
    def _start_held(self) -> None:
        if self.stopping and self.held:  # claimed as the stop arrived: hand them back, unrun
            self._settle(release=True, tries=1)
            return
        while self.held:
            job = self.held.popleft()
            if self.log_jobs:
                log.info("job %s: attempt %d started: %s", job["id"], job["attempts"], job["command"])
            log_path = self.paths.job_log_name(job["id"])
            try:
                run = executor.Run(job["command"], bool(job["argv"]), job["cwd"], log_path, job["id"],
                                   job["attempts"], self.worker_id, self.queue.job_timeout(job),
                                   {"QUEUECTL_JOB_ID": job["id"], "QUEUECTL_ATTEMPT": str(job["attempts"])},
                                   base_env=self._environment(job.get("env_id")),
                                   tail_bytes=self.queue.settings()["db_tail_bytes"])
            except Exception as exc:  # noqa: BLE001 - e.g. the log cannot be written (disk full)
                log.exception("job %s: attempt %d could not be run", job["id"], job["attempts"])
                self.done.append((job, executor.Outcome(None, f"worker error: {type(exc).__name__}: {exc}")))
                continue
            self.runs[job["id"]] = (job, run)
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
        self._pids_sent.pop(job_id, None)
        if run.fileno() >= 0:
            self._poller.unregister(run.fileno())
            del self._by_fd[run.fileno()]
        try:
            outcome = run.finish()
        except Exception as exc:  # noqa: BLE001
            log.exception("job %s: attempt %d could not be finished", job["id"], job["attempts"])
            outcome = executor.Outcome(None, f"worker error: {type(exc).__name__}: {exc}")
        outcome.log_location = f"{self.host}:{self.paths.job_log_name(job_id)}"
        self.done.append((job, outcome))
        self._want_claim = True

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
        if not self.runs:
            return
        try:
            cancels = self.queue.cancels_for(self.worker_id)
        except QueueError:
            return  # asked again at the next heartbeat
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
        timeout = due - now
        if self.stopping or self.capacity - self.used_slots <= 0:
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
