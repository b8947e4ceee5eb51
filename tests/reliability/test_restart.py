"""Scenario 8: a machine restart half-way through 500 jobs.

Workers are asked to stop, and before they can, everything (workers and jobs) is SIGKILLed,
leaving stale PID files and jobs marked 'processing'. New workers must finish every job;
only runs the crash interrupted may repeat, each on record as "worker died".
"""
from __future__ import annotations

import os
import signal
from collections import Counter

from helpers import kill_everything_of, run_queuectl, wait_until
from relhelpers import enqueue_file, executions, jobs, record, runs, state_counts

JOBS = 500


def test_restart_after_sigkill_of_everything_finishes_all_jobs(cli, home, workers, tmp_path, report):
    out = tmp_path / "executions"
    cli("config", "set", "backoff_base", "0")
    cli("enqueue", "--file", str(enqueue_file(tmp_path / "jobs.jsonl", [record(out, "sleep 0.03")] * JOBS)))
    workers.start(4)
    wait_until(lambda: state_counts(home)["completed"] >= JOBS // 2, timeout=60, interval=0.05,
               message="half the jobs done")
    for pid in workers.alive():                  # asked to stop (SIGTERM, as `worker stop` sends)...
        os.kill(pid, signal.SIGTERM)
    kill_everything_of(home)                     # ...and the power goes out before they can
    at_crash = state_counts(home)
    assert at_crash["completed"] < JOBS, "the queue drained before the crash; nothing was tested"
    assert at_crash["processing"] >= 1, f"no job was mid-run at the crash: {dict(at_crash)}"

    status = run_queuectl("worker", "status", "--json", home=home)   # stale PID files: ignored
    assert status.returncode == 0 and status.stdout.strip() == "[]", status
    workers.start(4)
    wait_until(lambda: state_counts(home)["completed"] == JOBS, timeout=90, interval=0.1,
               message="the new workers to finish every job")
    assert workers.stop().returncode == 0

    final, history = jobs(home), runs(home)
    per_attempt = Counter((job_id, attempt) for job_id, attempt, _ in executions(out))
    assert [k for k, n in per_attempt.items() if n > 1] == []
    assert all((job_id, job["attempts"]) in per_attempt for job_id, job in final.items())
    for job_id, attempt in per_attempt:
        if attempt != final[job_id]["attempts"]:
            errors = history.get((job_id, attempt), [])
            assert len(errors) == 1 and errors[0].startswith("worker died"), (job_id, attempt, errors)
    interrupted = sum(1 for j in final.values() if j["attempts"] > 1)
    report(f"restart: {JOBS} jobs; at the crash {dict(at_crash)}; after restart all completed, "
           f"{interrupted} re-run after 'worker died', {len(per_attempt)} executions")
    assert interrupted <= at_crash["processing"] + 4  # only what was running (or just claimed)
