"""Leases and heartbeats: a worker that freezes (SIGSTOP) loses its job once the lease runs
out; another worker kills the orphaned run, records it as "worker died (lease expired)" and
runs the job again. When the frozen worker thaws, its stale result is dropped: the job
completes exactly once, and the only extra execution is the recorded, interrupted one.
"""
from __future__ import annotations

import signal
from collections import Counter

from helpers import wait_until
from relhelpers import (alive, enqueue_file, executions, holds_write_lock, jobs, proc_state, query,
                        record, runs, spawn_worker, state_counts, worker_log_text)


def test_frozen_worker_loses_its_lease_and_the_job_runs_again_once(cli, home, workers, tmp_path):
    out = tmp_path / "executions"
    cli("config", "set", "lease_seconds", "2")
    cli("config", "set", "backoff_base", "0")
    # Attempt 1 hangs; any later attempt finishes at once.
    cli("add", "--id", "j", record(out, '[ "$QUEUECTL_ATTEMPT" -gt 1 ] || sleep 300'))
    frozen = spawn_worker(home, workers)
    wait_until(lambda: query(home, "SELECT job_pid FROM jobs WHERE id = 'j'")[0][0], timeout=30,
               message="the first heartbeat to record the job's pid")
    first_shell = executions(out)[0][2]
    frozen.send_signal(signal.SIGSTOP)
    try:
        rescuer = spawn_worker(home, workers)
        wait_until(lambda: jobs(home)["j"]["state"] == "completed", timeout=30, interval=0.1,
                   message="another worker to recover and complete the job")
        assert not alive(first_shell), "the orphaned first run must be killed, not left running"
    finally:
        frozen.send_signal(signal.SIGCONT)
    wait_until(lambda: "job j: result dropped" in worker_log_text(home), timeout=30,
               message="the thawed worker to drop its stale result")
    job = jobs(home)["j"]
    assert job["state"] == "completed" and job["attempts"] == 2, job
    assert runs(home)[("j", 1)] == ["worker died (lease expired)"]
    assert runs(home)[("j", 2)] == [None]
    assert Counter(a for _, a, _ in executions(out)) == Counter({1: 1, 2: 1})
    # The thawed worker notices it lost the job, drops its result and keeps serving.
    cli("add", "--id", "after", record(out))
    wait_until(lambda: jobs(home)["after"]["state"] == "completed", timeout=30, message="next job")
    job = jobs(home)["j"]
    assert job["state"] == "completed" and job["attempts"] == 2 and job["last_error"] is None, job
    assert frozen.poll() is None and rescuer.poll() is None


def test_orphan_of_a_worker_killed_in_the_jobs_first_second_is_killed_before_the_rerun(
        cli, home, workers, tmp_path):
    """The worker dies before its first heartbeat recorded the job's pid: recovery must still
    find and kill the orphaned run, or two copies of the job would run side by side."""
    out = tmp_path / "executions"
    cli("config", "set", "backoff_base", "0")
    cli("add", "--id", "j", record(out, '[ "$QUEUECTL_ATTEMPT" -gt 1 ] || sleep 300'))
    doomed = spawn_worker(home, workers)
    wait_until(lambda: executions(out), timeout=30, message="attempt 1 to start")
    first_shell = executions(out)[0][2]
    assert query(home, "SELECT job_pid FROM jobs WHERE id = 'j'")[0][0] is None
    doomed.kill()                       # the worker only: its job lives on as an orphan
    doomed.wait()
    spawn_worker(home, workers)
    wait_until(lambda: jobs(home)["j"]["state"] == "completed", timeout=30, interval=0.1,
               message="another worker to recover and complete the job")
    assert runs(home)[("j", 1)] == ["worker died (process gone)"]
    assert not alive(first_shell), "attempt 1 still runs next to attempt 2"


def test_a_worker_frozen_while_holding_claimed_jobs_loses_them_and_none_runs_twice(
        cli, home, workers, tmp_path, report):
    """Instant jobs are claimed eight at a time. Freeze the worker while it holds some that
    it has not started (and results it has not written down): when its lease runs out,
    another worker records the finished ones from their logs and sends the rest to the retry
    path. A frozen worker may wake up and start a job it claimed (it might have been frozen
    right before the start), so its unstarted claims count as interrupted attempts: whatever
    it does after thawing, no attempt runs twice and every extra run is on record."""
    out = tmp_path / "executions"
    cli("config", "set", "lease_seconds", "2")
    cli("config", "set", "backoff_base", "0")
    cli("enqueue", "--file", str(enqueue_file(tmp_path / "jobs.jsonl", [record(out)] * 3000)))
    frozen = spawn_worker(home, workers)
    held = 0
    for _ in range(200):  # freeze it at a moment it holds jobs it has not started
        wait_until(lambda: executions(out), timeout=30, message="the worker to start")
        frozen.send_signal(signal.SIGSTOP)
        wait_until(lambda: proc_state(frozen.pid) == "T", message="the worker to stop")
        # Not inside a transaction: frozen there it would stop every writer (SQLite's write
        # lock), which is a limit of any SQLite queue, not what this test is about.
        if not holds_write_lock(frozen.pid):
            held = query(home, "SELECT count(*) FROM jobs WHERE state = 'processing' AND "
                               "worker_id LIKE ?", (f"%:{frozen.pid}:%",))[0][0]
            if held >= 3:
                break
        frozen.send_signal(signal.SIGCONT)
    assert held >= 3, "never caught the worker holding claimed jobs"
    try:
        spawn_worker(home, workers)
        wait_until(lambda: state_counts(home)["completed"] == 3000, timeout=60, interval=0.2,
                   message="the rescuer to settle the frozen worker's jobs and run the rest")
    finally:
        frozen.send_signal(signal.SIGCONT)
    cli("add", "--id", "after", record(out))  # the thawed worker keeps serving
    wait_until(lambda: jobs(home)["after"]["state"] == "completed", timeout=30, message="next job")
    final = jobs(home)
    per_attempt = Counter((job_id, attempt) for job_id, attempt, _ in executions(out))
    assert [k for k, n in per_attempt.items() if n > 1] == [], "an attempt ran twice"
    assert all(job["state"] == "completed" for job in final.values())
    history = runs(home)
    for (job_id, attempt) in per_attempt:  # every other run is on record as interrupted
        if attempt != final[job_id]["attempts"]:
            assert history[(job_id, attempt)] == ["worker died (lease expired)"], (job_id, attempt)
    logs = worker_log_text(home)
    interrupted = sum(e == ["worker died (lease expired)"] for e in history.values())
    report(f"frozen while holding {held} claimed jobs: {logs.count('it had finished')} recorded "
           f"from their logs, {interrupted} sent to the retry path, "
           f"{len(per_attempt) - len(final)} executions besides each job's final one")
    assert logs.count("it had finished") + interrupted == held
    assert "it had not started" not in logs, "a frozen worker's claims are never handed back"
    assert frozen.poll() is None
