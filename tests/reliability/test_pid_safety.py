"""Scenario 4: PID files are only trusted when they prove the PID is still our worker.

A dead PID, a live process that is not a worker (a `sleep 300` we start), a real worker of
another QUEUECTL_HOME, and junk files: `worker status` ignores and removes them, and
`worker stop` (graceful or --force) never signals those processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from helpers import kill_everything_of, run_queuectl, wait_until
from relhelpers import spawn_worker, worker_ready

from queuectl.executor import process_start_time
from queuectl.paths import Paths


def _forge(home, pid: int, start=None, name=None) -> "os.PathLike[str]":
    workers_dir = Paths(home).workers_dir
    workers_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "start": start, "started_at": time.time(), "mode": "detached",
              "worker_id": f"{os.uname().nodename}:{pid}:{start or 0}"}
    path = workers_dir / (name or f"{pid}.json")
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def stranger(home):
    """A live process that is not a queuectl worker; it must survive everything."""
    proc = subprocess.Popen(["sleep", "300"], env=dict(os.environ, QUEUECTL_HOME=str(home)))
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("stop_args", [(), ("--force",)])
def test_dead_and_foreign_pids_are_cleaned_and_never_signalled(cli, home, stranger, stop_args):
    cli("init-db")
    dead = subprocess.Popen(["true"])
    dead.wait()
    files = [
        _forge(home, dead.pid, start=12345),                                  # dead PID
        _forge(home, stranger.pid, start=process_start_time(stranger.pid)),   # alive, not a worker
        _forge(home, stranger.pid, start=None, name="99999.json"),            # no start time
        _forge(home, 1, start=process_start_time(1)),                         # init
        _forge(home, os.getpid(), start=process_start_time(os.getpid())),     # the caller itself
    ]
    junk = Paths(home).workers_dir / "junk.json"
    junk.write_text("{not json")
    files.append(junk)

    status = run_queuectl("worker", "status", home=home)
    assert status.returncode == 0 and "No running workers" in status.stdout, status
    assert not any(f.exists() for f in files), "stale PID files must be removed"
    files = [_forge(home, stranger.pid, start=process_start_time(stranger.pid)), junk]
    junk.write_text("[1, 2]")
    stop = run_queuectl("worker", "stop", "--wait", "1", *stop_args, home=home)
    assert stop.returncode == 0 and "No running workers" in stop.stdout, stop
    assert stranger.poll() is None, "worker stop signalled a process that is not our worker"
    assert not any(f.exists() for f in files)


def test_a_worker_of_another_home_is_not_ours(cli, home, workers, tmp_path):
    """Copying another home's PID file in (or a PID file left by a reused home directory)
    must not make `worker stop` here stop someone else's worker."""
    cli("init-db")
    other = tmp_path / "other-home"
    foreign = spawn_worker(other)
    try:
        wait_until(lambda: worker_ready(other, foreign.pid), timeout=30, message="other worker ready")
        record = (Paths(other).workers_dir / f"{foreign.pid}.json").read_text()
        Paths(home).workers_dir.mkdir(parents=True, exist_ok=True)
        (Paths(home).workers_dir / f"{foreign.pid}.json").write_text(record)
        status = run_queuectl("worker", "status", "--json", home=home)
        assert status.returncode == 0 and json.loads(status.stdout) == [], status.stdout
        stop = run_queuectl("worker", "stop", "--force", "--wait", "1", home=home)
        assert stop.returncode == 0 and "No running workers" in stop.stdout, stop.stdout
        assert foreign.poll() is None, "stopped a worker that belongs to another QUEUECTL_HOME"
        # ...while its own home still sees and stops it normally.
        own = run_queuectl("worker", "stop", home=other)
        assert own.returncode == 0 and str(foreign.pid) in own.stdout
        assert foreign.wait(timeout=30) == 0
    finally:
        if foreign.poll() is None:
            foreign.kill()
            foreign.wait()
        kill_everything_of(other)


def test_real_workers_are_still_found_and_stopped(cli, home, workers):
    cli("init-db")
    pids = workers.start(2)
    wait_until(lambda: all(worker_ready(home, p) for p in pids), timeout=30, message="workers ready")
    status = run_queuectl("worker", "status", "--json", home=home)
    assert sorted(w["pid"] for w in json.loads(status.stdout)) == sorted(pids)
    assert workers.stop().returncode == 0
    wait_until(lambda: not workers.alive(), timeout=30, message="workers exit")
