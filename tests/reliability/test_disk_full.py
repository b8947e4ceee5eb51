"""Storage fault: the disk fills up while a job runs (home on a 4 MB tmpfs).

The worker cannot renew its lease or write logs for a while. It must keep supervising the
running job (never leave it unsupervised, never start the same attempt a second time), and
once space is back the result is recorded: one execution, completed.
"""
from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from helpers import wait_until
from relhelpers import executions, jobs, record, spawn_worker, worker_log_text


@contextlib.contextmanager
def _tiny_disk(path, size="4m"):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs (run as root): {mounted.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory) -> "os.PathLike[str]":
    """Write zeros until the filesystem refuses even 512 bytes more."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 512):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_disk_full_while_a_job_runs_neither_loses_nor_repeats_it(cli, home, workers, tmp_path):
    out, go = tmp_path / "executions", tmp_path / "go"
    with _tiny_disk(home):
        cli("add", "--id", "j", record(out, f"while [ ! -e {go} ]; do sleep 0.02; done"))
        worker = spawn_worker(home, workers)
        wait_until(lambda: executions(out), timeout=30, message="the job to start")
        filler = _fill(home)
        wait_until(lambda: "disk is full" in worker_log_text(home) or "No space" in worker_log_text(home),
                   timeout=30, message="the worker to hit the full disk")
        os.unlink(filler)
        go.touch()
        wait_until(lambda: jobs(home)["j"]["state"] == "completed", timeout=60, interval=0.1,
                   message="the result to be recorded once space is back")
        assert [(e[0], e[1]) for e in executions(out)] == [("j", 1)]
        assert jobs(home)["j"]["attempts"] == 1
        assert worker.poll() is None
