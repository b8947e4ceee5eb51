"""Scenario 3: graceful vs forced stop.

SIGTERM during a job: the job completes, nothing new is claimed, the worker exits 0.
A second SIGTERM (or `worker stop --force`): the job's process group is killed and the job
goes back on the retry path. SIGTERM while idle: the worker is gone in well under a second.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import time

from helpers import wait_until
from relhelpers import (alive, executions, jobs, query, read_pid, record, runs, signal_pending,
                        spawn_worker, wchan, worker_log_text, worker_ready)

from queuectl.paths import Paths


def _noticed_stop(home, job_id: str) -> bool:
    return f"job {job_id}: stop requested" in worker_log_text(home)


def test_sigterm_during_job_lets_it_finish_and_exits_0(cli, home, workers, tmp_path):
    out, go = tmp_path / "executions", tmp_path / "go"
    cli("add", "--id", "long", record(out, f"while [ ! -e {go} ]; do sleep 0.02; done; echo finished"))
    cli("add", "--id", "after", record(out))
    worker = spawn_worker(home, workers)
    wait_until(lambda: executions(out), timeout=30, message="the long job to start")
    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: _noticed_stop(home, "long"), timeout=30, message="the worker to notice SIGTERM")
    assert worker.poll() is None, "the worker must not exit while its job runs"
    go.touch()
    assert worker.wait(timeout=30) == 0
    final = jobs(home)
    assert final["long"]["state"] == "completed" and final["long"]["attempts"] == 1
    assert final["after"]["state"] == "pending" and final["after"]["attempts"] == 0
    assert [e[0] for e in executions(out)] == ["long"]
    assert not (Paths(home).workers_dir / f"{worker.pid}.json").exists()


def test_second_sigterm_kills_the_job_group_and_retries_it(cli, home, workers, tmp_path):
    out, child = tmp_path / "executions", tmp_path / "child.pid"
    cli("add", "--id", "stuck", record(out, f"sleep 300 & echo $! > {child}; wait"))
    worker = spawn_worker(home, workers)
    grandchild = wait_until(lambda: read_pid(child), timeout=30, message="the job's child to start")
    shell = executions(out)[0][2]
    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: _noticed_stop(home, "stuck"), timeout=30, message="the first SIGTERM handled")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    wait_until(lambda: not alive(shell) and not alive(grandchild), timeout=10,
               message="the job's process group to be gone")
    job = jobs(home)["stuck"]
    assert job["state"] == "failed" and job["attempts"] == 1, job
    assert "forced" in job["last_error"]
    assert runs(home)[("stuck", 1)] == [job["last_error"]]
    (run_at,), = query(home, "SELECT run_at FROM jobs WHERE id = 'stuck'")
    assert run_at > time.time(), "a killed job waits its backoff before the next attempt"


def test_worker_stop_force_kills_the_job_group_and_retries_it(cli, home, workers, tmp_path):
    out, child = tmp_path / "executions", tmp_path / "child.pid"
    cli("add", "--id", "stuck", record(out, f"sleep 300 & echo $! > {child}; wait"))
    [pid] = workers.start(1)
    grandchild = wait_until(lambda: read_pid(child), timeout=30, message="the job's child to start")
    shell = executions(out)[0][2]
    result = workers.stop("--force")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not alive(pid) and not alive(shell) and not alive(grandchild), timeout=10,
               message="worker and job group gone")
    job = jobs(home)["stuck"]
    assert job["state"] == "failed" and "forced" in job["last_error"], job
    assert len(executions(out)) == 1


def test_sigterm_while_idle_exits_within_a_second(cli, home, workers):
    cli("init-db")
    worker = spawn_worker(home, workers)
    wait_until(lambda: worker_ready(home, worker.pid), timeout=30, message="worker ready")
    wait_until(lambda: "select" in wchan(worker.pid) or "poll" in wchan(worker.pid), timeout=30,
               message="worker idle in select()")
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0
    assert time.monotonic() - started < 1.0


def test_sigterm_while_recording_a_result_leaves_no_job_claimed(cli, home, workers, tmp_path):
    """The stop lands while the worker commits job A's result (which also claims the next job
    B in the same transaction): B must go back to pending, not stay 'processing' for a
    worker that is gone."""
    out, go = tmp_path / "executions", tmp_path / "go"
    cli("add", "--id", "a", record(out, f"while [ ! -e {go} ]; do sleep 0.02; done"))
    cli("add", "--id", "b", record(out))
    worker = spawn_worker(home, workers)
    wait_until(lambda: executions(out), timeout=30, message="job a to start")
    shell = executions(out)[0][2]
    lock = sqlite3.connect(str(Paths(home).db), isolation_level=None, timeout=30)
    try:
        lock.execute("BEGIN IMMEDIATE")     # the worker's result commit must wait for us
        go.touch()
        wait_until(lambda: not alive(shell), timeout=30, message="job a to exit")
        wait_until(lambda: "nanosleep" in wchan(worker.pid), timeout=30,
                   message="the worker to be retrying its commit")
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: not signal_pending(worker.pid, signal.SIGTERM), timeout=10,
                   message="SIGTERM delivered")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert worker.wait(timeout=30) == 0
    final = jobs(home)
    assert final["a"]["state"] == "completed"
    assert final["b"]["state"] == "pending" and final["b"]["attempts"] == 0, final["b"]
    assert [e[0] for e in executions(out)] == ["a"]
    (worker_id,), = query(home, "SELECT worker_id FROM jobs WHERE id = 'b'")
    assert worker_id is None
