"""One worker process: claim → run → record, with heartbeats, recovery and graceful signals.

Run as ``python -m queuectl.worker --home DIR``; ``queuectl worker start`` does that for you.
SIGTERM/SIGINT: finish the current job, then exit 0. A second one, or SIGUSR1: kill the
job's process group, send the job back to the retry path, exit.
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from queuectl import config as cfg
from queuectl import alerts, chores, executor, logfiles, spool, worker_launcher
from queuectl.errors import QueueError
from queuectl.models import WORKER_VARS, Queue
from queuectl.paths import Paths, private_dir
from queuectl.store import open_store

RECOVER_EVERY = 2.0  # seconds between checks for jobs whose worker died
HEARTBEAT_EVERY = 1.0
# Short jobs are claimed and recorded several per transaction (the store's ``batch``: one
# transaction per job was a third of a worker's CPU per `true` on SQLite, and more on
# PostgreSQL). Claimed jobs wait at most HOLD_LIMIT behind a run.
SHORT_JOB = 0.010   # seconds: a run this short lets the next claim take a whole batch
HOLD_LIMIT = 0.020  # seconds: held jobs go back to the queue once a run takes this long
# Seconds the oldest recorded-later result waits at most while held jobs keep a worker busy:
# `wait` and dependents see a short job finish this soon, even in a batch of 32.
RECORD_DELAY = 0.050
# The registry row (every host's `worker status`, `worker stop --all-hosts`) is beaten this
# often, not per job; after a wake-up (a stop request rings it) a beat comes sooner, at most
# every BEAT_GAP, so a request is seen within about a second.
REGISTRY_EVERY = 2.0
BEAT_GAP = 0.25
# Reconnecting after a storage error: wait 1 s, 2 s, 4 s, ... at most this long between tries.
BACKOFF_MAX = 10.0
# Fencing: a run whose lease could not be renewed is killed this long before the lease ends
# (one heartbeat period, plus a heartbeat that itself hangs for up to a second, plus slack),
# so it is gone before another host may recover the job and start it again.
FENCE_MARGIN = 2.5

log = logging.getLogger("queuectl.worker")

RECOVERED = {  # what a recovered job's new state means, for the worker log
    "released": "it had not started; back in the queue",
    "completed": "it had finished; recorded as completed from its log",
    "failed": "returned to the retry path",
    "dead": "no retries left; moved to the DLQ",
    "cancelled": "cancelled, as requested",
}


class Worker:
    capacity = 1  # slots: jobs run at once (queuectl.slot_worker runs more)

    def __init__(self, paths: Paths, overrides: Optional[Dict[str, Any]] = None,
                 foreground: bool = False, log_jobs: bool = False, mode: str = "detached",
                 groups: Optional[List[str]] = None) -> None:
        self.paths = paths
        self.mode = "foreground" if foreground else mode
        self.groups = groups  # the groups served (None: every group)
        self.overrides = overrides or {}
        self.foreground = foreground
        # One line per started and completed job: ~100 us per job through logging, a fifth
        # of a worker's CPU per short job, so detached workers only do it when asked.
        self.log_jobs = foreground or log_jobs
        self.pid = os.getpid()
        self.stop_requests = 0
        self.force = False
        self.held: Deque[Dict[str, Any]] = deque()  # claimed, not started yet (claim order)
        self.done: List[Tuple[Dict[str, Any], executor.Outcome]] = []  # ran, not recorded yet
        self.batch = 1  # jobs the next claim may take
        self.batch_size = 1  # ... while runs are short: the store's batch (set in run())
        self._done_since: Optional[float] = None  # monotonic time the oldest of self.done ended
        self.own_env: Dict[str, str] = dict(os.environ)  # run() takes it again, with QUEUECTL_HOME
        self.envs: Dict[Any, Dict[str, str]] = {None: self.own_env}
        self.host = worker_launcher.host_name()
        self._next_beat = 0.0   # monotonic time of the next registry beat
        self._last_beat = 0.0
        self._stop_level = 0    # the stop level last seen in the registry
        self._outage_since: Optional[float] = None  # storage unreachable since (monotonic)
        self._outage_tries = 0
        # News (a pause, a lowered group limit) came while jobs were held: none of them may
        # start until they are handed back (a failed hand-back is tried again first).
        self._hand_back_due = False
        # Where runs' logs start (queuectl/spool.py); set in run(), None: a file per run.
        self.spools: Optional[spool.Spools] = None

    # -- signals --------------------------------------------------------------------------
    def _on_stop(self, signum: int, _frame: Any) -> None:
        self.stop_requests += 1
        if self.stop_requests > 1:
            self.force = True

    def _on_force(self, signum: int, _frame: Any) -> None:
        self.stop_requests += 1
        self.force = True

    @property
    def stopping(self) -> bool:
        return self.stop_requests > 0

    def _install_signals(self) -> None:
        self._sig_r, sig_w = os.pipe()
        os.set_blocking(self._sig_r, False)
        os.set_blocking(sig_w, False)
        signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_force)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _drain(self) -> None:
        try:
            while os.read(self._sig_r, 4096):
                pass
        except BlockingIOError:
            pass
        self.listener.drain()
        try:
            self.queue.settings(fresh=True)  # a wake-up may be a config change: it applies now
        except QueueError:
            pass  # a lost connection wakes us too; the cached settings do until it is back
        # ... or a stop request through the registry: beat soon to see it.
        self._next_beat = min(self._next_beat, self._last_beat + BEAT_GAP)

    # -- main loop ------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        paths = self.paths
        for directory in (paths.workers_dir, paths.job_logs_dir):
            private_dir(directory)
        record = worker_launcher.write_pid_file(paths, self.pid, self.mode)
        self.worker_id = record["worker_id"]
        self.started_at, self.mode = float(record["started_at"]), str(record["mode"])
        os.environ["QUEUECTL_HOME"] = str(paths.home)  # every job sees it (set once, not per job)
        self.own_env = dict(os.environ)  # jobs enqueued without a captured environment get this
        self.envs: Dict[Any, Dict[str, str]] = {None: self.own_env}
        store = open_store(paths, "worker")
        self.listener = store.listen()
        self.batch_size = store.batch
        self.queue = Queue(store, overrides=self.overrides)
        self.queue.serve_groups = self.groups
        self.chores = chores.for_worker(self.queue, paths)
        spool.sweep(paths.spool_dir, worker_launcher.worker_alive)
        self.spools = spool.Spools(paths.spool_dir, self.worker_id)
        log.info("worker %s started (pid %d, db %s%s%s)", self.worker_id, self.pid, store.location,
                 f", {self.capacity} slots" if self.capacity > 1 else "",
                 f", groups {','.join(self.groups)}" if self.groups is not None else "")
        try:
            self._loop()
        finally:
            try:
                self.queue.unregister_worker(self.worker_id)
            except QueueError:
                pass  # its row goes stale and is shown as gone, then forgotten
            self.listener.close()
            self.spools.close()
            worker_launcher.remove_pid_file(paths, self.pid)
            store.close()
            log.info("worker %d stopped", self.pid)
        return 0

    def _loop(self) -> None:
        next_recovery = 0.0
        while not self.stopping:
            try:
                if self._outage_since is not None:
                    self._beat_registry(due=False)  # the probe: raises while still unreachable
                    self._back_online()
                else:
                    self._beat_registry()
                if self.stopping:
                    break
                if time.monotonic() >= next_recovery:
                    self._recover()
                    next_recovery = time.monotonic() + RECOVER_EVERY
                chores.run_due(self.chores)
                job = self._next_job()
                if job is None:
                    self._wait_for_work(next_recovery)
                    continue
                if self.stopping:  # claimed as the stop arrived: hand it back, unrun
                    self.held.appendleft(job)
                    break
                self._run(job)
            except QueueError as exc:  # storage trouble: say so once, back off, keep going
                self._sleep(self._unreachable(exc))
            except Exception:  # never let one bad job or bug kill the worker
                log.exception("unexpected error in worker loop")
                self._sleep(1.0)
        # Record what ran and hand back what never started, so a graceful stop neither
        # strands a job in 'processing' nor burns one of its attempts.
        self._settle(release=True, tries=10)

    def _run(self, job: Dict[str, Any]) -> None:
        try:
            outcome = self._execute(job)
        except Exception as exc:  # noqa: BLE001 - e.g. the log cannot be written (disk full)
            # This attempt is over (run_job never leaves a run behind): record it as
            # failed so it is retried as a NEW attempt, never re-run as this one.
            log.exception("job %s: attempt %d could not be run", job["id"], job["attempts"])
            outcome = executor.Outcome(None, f"worker error: {type(exc).__name__}: {exc}")
        self._add_done(job, outcome)
        # Only a run that happened counts as short: a worker error (say, a full disk) is not
        # a reason to claim eight jobs at once.
        ran = outcome.finished_at is not None
        self.batch = self.batch_size if ran and outcome.duration < SHORT_JOB else 1

    def _add_done(self, job: Dict[str, Any], outcome: executor.Outcome) -> None:
        """A finished run whose result is recorded later (with the next claim, or once
        _record_due)."""
        if not self.done:
            self._done_since = time.monotonic()
        self.done.append((job, outcome))

    def _record_due(self) -> bool:
        """Whether the oldest unrecorded result has waited RECORD_DELAY."""
        return bool(self.done) and time.monotonic() - self._done_since >= RECORD_DELAY

    def _next_job(self) -> Optional[Dict[str, Any]]:
        """The next claimed job, claiming (and recording finished runs) when none is held."""
        if self._claim_lapsing() or self._hand_back_due:
            self._settle(release=True)  # hand them all back
        elif self.held and self._record_due():
            self._settle()  # results wait no longer than this, however many jobs are held
        if not self.held and (self.done or self.queue.has_ready()):
            self._settle(claim=self.batch)
            while not self.held and self.queue.has_ready():  # another worker was faster
                self._settle(claim=self.batch)
        if not self.held:
            self.batch = 1  # idle: the first claim after a pause is one job, fair to idle peers
            return None
        return self.held.popleft()

    def _claim_lapsing(self) -> bool:
        """Whether the held jobs' claim is half gone (were we frozen?): they go back then."""
        return bool(self.held) and (self.held[0]["lease_until"] - time.time()
                                    < self.queue.settings()["lease_seconds"] / 2)

    def _settle(self, claim: int = 0, release: bool = False, tries: int = 30,
                free: Optional[int] = None) -> None:
        """Record finished runs, hand back held jobs (``release``) and claim up to ``claim``
        more, all in one transaction. Storage errors are retried: a result is not dropped
        while this worker lives (if it gives up, recovery reads the result from the log)."""
        done, back = self.done, list(self.held) if release else []
        if release and not back:
            self._hand_back_due = False  # nothing held: nothing to hand back
        if not (done or back or claim):
            return
        for attempt in range(tries):
            try:
                states, claimed = self.queue.settle(done, self.worker_id, release=back,
                                                    claim=0 if self.stopping else claim,
                                                    free=free, capacity=self.capacity)
                break
            except QueueError as exc:
                if attempt == 0:  # once per outage, not once per try
                    self._unreachable(exc, f" (could not record the results of "
                                           f"{len(done) + len(back)} job(s))")
                if attempt + 1 < tries:
                    time.sleep(min(0.1 * (attempt + 1), 2.0))
        else:
            if tries > 1:  # one try (mid-run) is simply repeated later
                log.error("giving up on %d job(s); recovery will settle them from their logs",
                          len(done) + len(back))
                if any(outcome.prune is not None for _, outcome in done):
                    self.spools.retire_all()  # those logs stay: no later run may write after them
                self.done = []
                self._done_since = None
                if release:
                    self.held.clear()
                    self._hand_back_due = False
            return
        self.done = []
        self._done_since = None
        if release:
            self.held.clear()
            self._hand_back_due = False
        self.held.extend(claimed)
        for (job, outcome), state in zip(done, states):
            if outcome.prune is not None:
                if state == "completed":
                    spool.prune(outcome.prune)
                else:  # its result did not count (lost): a rerun may append to the link
                    self.spools.retire_all()
            self._log_outcome(job, outcome, state)
        for job, state in zip(back, states[len(done):]):
            if state != "lost":
                log.info("job %s: not started; %s", job["id"],
                         "returned to the queue" if state == "released" else state)

    def _beat_registry(self, due: bool = True) -> None:
        """Renew our registry row every REGISTRY_EVERY (``due=False``: now) and act on a stop
        asked through the database: 1 as SIGTERM, 2 as SIGUSR1."""
        now = time.monotonic()
        if due and now < self._next_beat:
            return
        self._last_beat, self._next_beat = now, now + REGISTRY_EVERY
        level = self.queue.worker_beat(self.worker_id, self.host, self.pid, self.started_at, self.mode,
                                       self.capacity)
        if level > self._stop_level:
            self._stop_level = level
            log.info("stop requested through the database%s", " (forced)" if level >= 2 else "")
            self.stop_requests = max(self.stop_requests, 1)
            if level >= 2:
                self.force = True

    def _unreachable(self, exc: Exception, doing: str = "") -> float:
        """Note a storage error (logged once per outage, not per try; ``doing`` says what
        failed); the seconds to wait before the next try: 1, 2, 4, ... up to BACKOFF_MAX."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._outage_tries = 0
            log.error("database unavailable%s: %s; retrying (every %g s at most) until it is back",
                      doing, _strip_prefix(str(exc)), BACKOFF_MAX)
        delay = min(2.0 ** self._outage_tries, BACKOFF_MAX)
        self._outage_tries += 1
        return delay

    def _back_online(self) -> None:
        if self._outage_since is not None:
            log.warning("database reachable again after %.1fs", time.monotonic() - self._outage_since)
            self._outage_since = None
            self._outage_tries = 0

    def _recover(self) -> None:
        found = worker_launcher.recover_dead_workers_jobs(self.queue, self.paths, self.worker_id)
        for job_id, state in found.items():
            log.warning("job %s: its worker died; %s", job_id, RECOVERED.get(state, state))
            alerts.job_recovered(self.paths, self.queue, job_id, state)

    def _wait_for_work(self, next_recovery: float) -> None:
        settings = self.queue.settings()
        now = time.monotonic()
        timeout = min(settings["poll_interval"], max(next_recovery - now, 0.0),
                      max(self._next_beat - now, 0.0), max(chores.next_due(self.chores) - now, 0.0))
        if not self.queue.paused():
            due = self.queue.next_run_at()
            if due is not None:
                timeout = min(timeout, max(due - time.time(), 0.001))
        self._sleep(timeout)

    def _sleep(self, timeout: float) -> None:
        """Wait for a doorbell, a signal or the timeout, whichever comes first."""
        if self.stopping:
            return
        ready, _, _ = select.select([self.listener.fileno(), self._sig_r], [], [], timeout)
        if ready:
            self._drain()

    # -- one job --------------------------------------------------------------------------
    ENV_CACHE = 64  # distinct stored environments a worker keeps at hand

    def _environment(self, env_id: Optional[int]) -> Dict[str, str]:
        """The environment a job runs with: the stored one of its enqueuer (fetched once per
        id), with QUEUECTL_HOME and QUEUECTL_DB always this worker's (QUEUECTL_JOB_ID and
        QUEUECTL_ATTEMPT are added per run)."""
        env = self.envs.get(env_id)
        if env is not None:
            return env
        found = self.queue.environment(env_id)
        if found is None:  # gone (cannot happen while its job exists): the worker's own
            env = self.own_env
        else:
            stored, inherit = found
            env = dict(self.own_env) if inherit else {}
            env.update(stored)
            for name in WORKER_VARS:
                env.pop(name, None)
                if name in self.own_env:
                    env[name] = self.own_env[name]
        if len(self.envs) > self.ENV_CACHE:
            self.envs = {None: self.own_env}
        self.envs[env_id] = env
        return env

    def _execute(self, job: Dict[str, Any]) -> executor.Outcome:
        queue = self.queue
        started = {"proc": None, "pid_sent": False, "last_beat": time.monotonic()}
        if self.log_jobs:
            log.info("job %s: attempt %d started: %s", job["id"], job["attempts"], job["command"])

        def on_start(proc: Any) -> None:
            started["proc"] = proc

        def on_event(woken: bool) -> executor.Abort:
            if woken:
                self._drain()
            if (self.held or self.done) and (not woken or self._news()):
                # This run is not short after all (a tick: woken is False), or there is news
                # (a pause, a job that comes before the ones held): the jobs claimed after it
                # go back, where idle workers can take them, and the results of the runs
                # before it are written down now, not after it. Not on any other wake-up: a
                # hand-back rings every worker, so with more workers than cores (runs take
                # longer) hand-backs set each other off in a cascade (8 workers lost ~15 %
                # of 2 workers' throughput).
                try:
                    self._settle(release=True, tries=1)
                except Exception:  # noqa: BLE001 - a bookkeeping bug must not kill the run
                    log.exception("job %s: could not hand back the jobs claimed after it", job["id"])
            if self.stopping and not self.force and not started.get("stop_noted"):
                started["stop_noted"] = True  # logged here, not in the handler: not signal-safe
                log.info("job %s: stop requested; letting it finish (signal again to kill it)", job["id"])
            if self.force:
                return ("worker stopped (forced); job killed", False)
            now = time.monotonic()
            if now - started["last_beat"] >= HEARTBEAT_EVERY:
                started["last_beat"] = now
                pid = pid_start = None
                proc = started["proc"]
                if proc is not None and not started["pid_sent"]:
                    pid, pid_start = proc.pid, executor.process_start_time(proc.pid)
                    started["pid_sent"] = True
                try:
                    ours, cancel = queue.heartbeat(job, self.worker_id, pid, pid_start)
                except QueueError as exc:
                    # Disk full, I/O error, database unreachable...: keep supervising the run
                    # (abandoning it would leave it unwatched and get the same attempt started
                    # again) while our lease lasts; then kill it (fencing), because another
                    # host may recover the job and start it again once the lease is over.
                    self._unreachable(exc, f" (job {job['id']}: heartbeat failed; still running "
                                           "it while its lease lasts)")
                    if pid is not None:
                        started["pid_sent"] = False  # send the pid again with the next beat
                    if time.time() >= job["lease_until"] - min(FENCE_MARGIN, self.queue.settings()
                                                               ["lease_seconds"] / 2):
                        proc = started["proc"]
                        if proc is not None:  # SIGKILL now: no grace period past our lease
                            executor.kill_group(proc.pid)
                        log.warning("job %s: lease ran out while the database was unreachable; "
                                    "run killed (its result will not count)", job["id"])
                        return ("lease lost: the database was unreachable until the lease ran "
                                "out; this run was killed", False)
                    ours, cancel = True, False
                else:
                    self._back_online()
                if not ours:
                    return ("lease lost: the job was recovered elsewhere; this run was killed", False)
                try:
                    self._beat_registry()
                except QueueError:
                    pass  # the job's own heartbeat above tells whether storage is reachable
                chores.run_due(self.chores)  # schedules and retention go on during long runs
            elif woken:
                try:
                    cancel = queue.cancel_requested(job["id"])
                except QueueError:
                    cancel = False  # asked again at the next heartbeat
            else:
                cancel = False
            if cancel:
                return ("cancelled by user while running", True)
            return None

        base_env = self._environment(job.get("env_id"))
        settings = queue.settings()
        env = {"QUEUECTL_JOB_ID": job["id"], "QUEUECTL_ATTEMPT": str(job["attempts"])}
        log_path = self.paths.job_log_name(job["id"])
        linked = self._link_log(log_path, job["id"])
        try:
            outcome = executor.run_job(job["command"], bool(job["argv"]), job["cwd"], log_path,
                                       job["id"], job["attempts"], self.worker_id, queue.job_timeout(job),
                                       env, wake_fds=(self.listener.fileno(), self._sig_r),
                                       on_event=on_event, tick=HEARTBEAT_EVERY, on_start=on_start,
                                       first_tick=HOLD_LIMIT if self.held or self.done else None,
                                       tail_bytes=settings["db_tail_bytes"],
                                       max_log_bytes=settings["max_log_bytes"],
                                       base_env=base_env)
        except BaseException:
            self._keep_or_prune(linked, None, log_path)
            raise
        self._keep_or_prune(linked, outcome, log_path)
        outcome.log_location = f"{self.host}:{log_path}"  # logs stay here; others are told where
        return outcome

    def _link_log(self, log_path: str, job_id: str) -> Optional[spool.Spool]:
        """The spool a run's new log is linked to (None: the log is a file of its own)."""
        if self.spools is None:
            return None
        linked = self.spools.take()
        if linked.attach(log_path, job_id):
            return linked
        self.spools.give(linked)
        return None

    def _keep_or_prune(self, linked: Optional[spool.Spool], outcome: Optional[executor.Outcome],
                       log_path: str) -> None:
        """After a run whose log is linked to a spool (its log closed; ``outcome`` None: it
        raised): a silent completed run's link goes once its result is recorded (``prune``),
        any other keeps it as its log."""
        if linked is None:
            return
        if outcome is None:
            linked.retire()
        elif not linked.keeps(outcome.silent and outcome.ok):
            outcome.prune = log_path
        self.spools.give(linked)

    def _news(self) -> bool:
        """After a wake-up mid-run: is the queue paused, is a held job's group paused or over
        its (lowered) limit, or does a job overtake ours? If so the held jobs must go back
        before any of them starts (``_hand_back_due``), even if this hand-back fails."""
        try:
            news = self.queue.paused() or bool(self.held and (
                self.queue.closed_groups(self.held) or self.queue.overtakes(self.held[0])))
        except QueueError:
            return False
        if news and self.held:
            self._hand_back_due = True
        return news

    def _log_outcome(self, job: Dict[str, Any], outcome: executor.Outcome, state: str) -> None:
        alerts.job_settled(self.paths, self.queue.settings(), job, outcome, state)
        if state == "completed":
            if self.log_jobs:
                log.info("job %s: completed in %.3fs (attempt %d)", job["id"], outcome.duration,
                         job["attempts"])
            return
        took = f"{outcome.duration:.3f}s"
        if state == "failed":
            log.warning("job %s: failed in %s (attempt %d): %s; will retry", job["id"], took,
                        job["attempts"], outcome.error)
        elif state == "dead":
            log.warning("job %s: failed (attempt %d): %s; moved to the DLQ", job["id"],
                        job["attempts"], outcome.error)
        elif state == "lost":
            log.warning("job %s: result dropped; the job was recovered by another worker", job["id"])
        else:
            log.info("job %s: %s (%s)", job["id"], state, outcome.error)


def _strip_prefix(text: str) -> str:
    return text[len("database unavailable: "):] if text.startswith("database unavailable: ") else text


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m queuectl.worker")
    parser.add_argument("--home", help="queuectl home (default: $QUEUECTL_HOME or ~/.queuectl)")
    parser.add_argument("--backoff-base", help="override backoff_base for this worker")
    parser.add_argument("--foreground", action="store_true", help="attached to a terminal; logs every job")
    parser.add_argument("--log-jobs", action="store_true", help="log every job's start and completion")
    parser.add_argument("--supervised", action="store_true", help="started by queuectl's supervisor")
    parser.add_argument("--concurrency", type=int, default=1, help="slots: jobs run at once")
    parser.add_argument("--groups", help="comma-separated groups to serve (default: all)")
    args = parser.parse_args(argv)
    logfiles.setup("worker", Paths(args.home).worker_log(os.getpid()))
    try:
        overrides = ({"backoff_base": cfg.parse_value("backoff_base", args.backoff_base)}
                     if args.backoff_base is not None else {})
        groups = [g for g in args.groups.split(",") if g] if args.groups is not None else None
        options = dict(foreground=args.foreground, log_jobs=args.log_jobs, groups=groups,
                       mode="supervised" if args.supervised else "detached")
        if args.concurrency > 1:
            from queuectl.slot_worker import SlotWorker

            return SlotWorker(Paths(args.home), overrides, capacity=args.concurrency, **options).run()
        return Worker(Paths(args.home), overrides, **options).run()
    except QueueError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
