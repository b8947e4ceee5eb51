"""A week under a supervisor, compressed: many short jobs while workers are SIGKILLed.

Retention is on (keep_completed 1 s), as a long-lived home has it. Asserted: every job
ran to completion (nothing lost; its row may be gone since, deleted by retention), no attempt
ran twice and a job ran more than once only when one of its runs was interrupted by a kill
(README, Guarantees), every killed worker replaced, and the database, the job log directory
and the logs of dead workers bounded (retention and the supervisor prune them).
The default tier runs 2000 jobs and 5 kills; with QUEUECTL_SOAK=1, 10^5 jobs and 20 kills
(minutes: `QUEUECTL_SOAK=1 pytest tests/test_soak.py`).
"""
from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import List, Optional

import pytest

from helpers import wait_until
from test_supervisor import full_house, start_supervised, state

from queuectl import executor, supervisor
from queuectl.jobspec import parse_job
from queuectl.paths import Paths

WORKERS = 3


def soak(home: Path, queue, tmp_path: Path, jobs: int, kills: int, timeout: float) -> None:
    trace = tmp_path / "ran.txt"
    queue.config_set("backoff_base", 0)  # an interrupted run is retried at once
    queue.config_set("keep_completed", "1s")  # retention deletes them as they finish
    command = f'echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT" >> {trace}'
    batches = kills + 1  # one batch before each kill, one after the last

    def enqueue(batch: int) -> None:
        """Batch ``batch`` of the jobs, 1000 per transaction."""
        ids = range(jobs * batch // batches, jobs * (batch + 1) // batches)
        for start in range(ids.start, ids.stop, 1000):
            now = queue.clock()
            queue.enqueue([parse_job({"id": f"s{i}", "command": command}, now=now, default_cwd="/")
                           for i in range(start, min(start + 1000, ids.stop))])

    start_supervised(home, WORKERS)
    killed: List[int] = []
    for k in range(kills):
        # Work arrives in batches so that a kill always finds a busy worker, however fast the
        # workers drain and however long a replacement waits out its back-off.
        enqueue(k)

        def busy_worker() -> Optional[int]:
            pids = [int(job["worker_id"].split(":")[1]) for job in queue.processing()]
            return next((p for p in pids if p not in killed and executor.pid_alive(p)), None)

        victim = wait_until(busy_worker, timeout=timeout, interval=0.005, message="a busy worker")
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        # Replaced (after a back-off when kills come faster than supervisor.FAST_EXIT).
        wait_until(lambda: full_house(home, WORKERS, without=tuple(killed)), timeout=90,
                   message=f"kill {k + 1} replaced")
    enqueue(kills)

    def all_done() -> bool:
        counts = queue.counts()
        return counts["pending"] + counts["processing"] + counts["failed"] == 0
    wait_until(all_done, timeout=timeout, interval=0.1, message="every job finished")
    counts = queue.counts()
    assert counts["dead"] == counts["cancelled"] == 0, counts

    runs = Counter(trace.read_text().split("\n")[:-1])  # "id attempt" per run that started
    assert max(runs.values()) == 1, "an attempt ran twice"
    per_job = Counter(line.split()[0] for line in runs)
    assert set(per_job) == {f"s{i}" for i in range(jobs)}
    for job_id, times in per_job.items():
        if times > 1:  # only after an interrupted run, one per kill at most
            errors = [r["error"] or "" for r in queue.store.runs(job_id)]
            # ... as its run history says, unless retention deleted the job already
            assert not errors or any("worker died" in e for e in errors), (job_id, errors)
    assert sum(times - 1 for times in per_job.values()) <= kills
    # Bounded: retention catches up with the finished jobs and their logs.
    logs_dir = Paths(home).job_logs_dir
    wait_until(lambda: queue.counts()["completed"] <= jobs // 10
               and len(os.listdir(logs_dir)) <= jobs // 10, timeout=60,
               message="retention deleted the finished jobs and their logs")
    assert state(home)["restarts"] == kills
    log = Path(supervisor.log_path(Paths(home))).read_text()
    assert all(f"worker {pid} killed by signal SIGKILL" in log for pid in killed)
    worker_logs = {name.split(".")[0] for name in os.listdir(Paths(home).logs_dir)
                   if name.startswith("worker-")}
    assert len(worker_logs) <= supervisor.DEAD_LOGS_KEPT + WORKERS
    pid = state(home)["pid"]
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not executor.pid_alive(pid), timeout=60, message="the supervisor stopped")


@pytest.mark.sqlite_only  # as test_supervisor: the supervisor never opens the database
def test_soak_2000_jobs_5_worker_kills(home: Path, queue, tmp_path: Path) -> None:
    soak(home, queue, tmp_path, jobs=2000, kills=5, timeout=120)


@pytest.mark.slow
@pytest.mark.sqlite_only
@pytest.mark.skipif(not os.environ.get("QUEUECTL_SOAK"),
                    reason="minutes long: run with QUEUECTL_SOAK=1 (the 2000-job soak always runs)")
def test_soak_100k_jobs_20_worker_kills(home: Path, queue, tmp_path: Path) -> None:
    soak(home, queue, tmp_path, jobs=100_000, kills=20, timeout=1800)
