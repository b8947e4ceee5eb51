"""Scenario 5: what a job does cannot hurt its worker.

200 MB of output does not grow the worker (output goes to a file; only a bounded tail is kept),
a background child left running neither hangs the worker nor leaves zombies, a timeout kills
grandchildren too (even ones ignoring SIGTERM), and non-UTF-8 output is stored and shown safely.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import wait_until
from relhelpers import alive, children_of, jobs, proc_state, read_pid, record, spawn_worker

from queuectl.paths import Paths

MB = 1024 * 1024


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _done(home, job_id):
    return jobs(home).get(job_id, {}).get("state") in ("completed", "failed", "dead")


def test_200mb_of_output_does_not_grow_the_worker(cli, home, workers, tmp_path):
    cli("add", "--id", "warmup", "echo warm")
    worker = spawn_worker(home, workers)
    wait_until(lambda: _done(home, "warmup"), timeout=30, message="warm-up job")
    before = _rss_kb(worker.pid)
    cli("add", "--id", "flood", f"yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {200 * MB}; echo END")
    wait_until(lambda: _done(home, "flood"), timeout=60, interval=0.1, message="the 200 MB job")
    assert jobs(home)["flood"]["state"] == "completed"
    # The log is capped at max_log_bytes (64 MiB): head and tail kept, the middle cut.
    log = Paths(home).job_log("flood")
    assert os.path.getsize(log) <= 64 * MB + 2 * 4096
    with open(log, "rb") as handle:
        data = handle.read()
    assert b"output cut here" in data and data.rstrip().endswith(b"finished: exit 0 ---")
    grown = _rss_kb(worker.pid) - before
    assert grown < 10 * 1024, f"worker RSS grew by {grown} kB"
    assert _rss_kb(worker.pid, "VmHWM") < before + 20 * 1024
    show = subprocess.run([sys.executable, "-m", "queuectl.cli", "show", "flood", "--json"],
                          capture_output=True, env=dict(os.environ, QUEUECTL_HOME=str(home)), timeout=60)
    assert show.returncode == 0
    tail = json.loads(show.stdout)["output_tail"]
    # The database keeps the last db_tail_bytes (64 KiB) for `logs` on other hosts, cut at a line.
    assert tail.endswith("END\n") and 60_000 < len(tail.encode()) <= 65536 + 3


def test_background_child_neither_hangs_the_worker_nor_leaves_zombies(cli, home, workers, tmp_path):
    bg = tmp_path / "bg.pid"
    cli("add", "--id", "spawner", f"sleep 300 & echo $! > {bg}; echo parent done")
    cli("add", "--id", "next", "echo next")
    worker = spawn_worker(home, workers)
    wait_until(lambda: _done(home, "next"), timeout=30, message="the job after the spawner")
    assert jobs(home)["spawner"]["state"] == "completed"
    child = read_pid(bg)
    assert child and alive(child), "the background child was left to run, as the user asked"
    assert [k for k in children_of(worker.pid) if proc_state(k) == "Z"] == [], "zombie children"
    assert worker.poll() is None


def test_timeout_reaches_grandchildren_even_if_they_ignore_sigterm(cli, home, workers, tmp_path):
    kid, grandkid = tmp_path / "kid.pid", tmp_path / "grandkid.pid"
    inner = f"trap '' TERM; sleep 300 & echo \\$! > {grandkid}; wait"
    cli("enqueue", json.dumps({"id": "slow", "timeout": 1, "max_retries": 0,
                               "command": f"sh -c \"{inner}\" & echo $! > {kid}; wait"}))
    workers.start(1)
    pids = wait_until(lambda: read_pid(kid) and read_pid(grandkid) and (read_pid(kid), read_pid(grandkid)),
                      timeout=30, message="child and grandchild started")
    wait_until(lambda: _done(home, "slow"), timeout=30, message="the timeout")
    job = jobs(home)["slow"]
    assert job["state"] == "dead" and "timed out" in job["last_error"], job
    wait_until(lambda: not any(alive(p) for p in pids), timeout=10, message="whole group killed")


def test_non_utf8_output_is_stored_and_shown_safely(cli, home, workers):
    cli("add", "--id", "bytes", r"printf 'caf\351 \377\376 ok\n'; printf '\200\201' >&2")
    workers.start(1)
    wait_until(lambda: _done(home, "bytes"), timeout=30, message="the job")
    env = dict(os.environ, QUEUECTL_HOME=str(home), LC_ALL="C", PYTHONIOENCODING="")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "queuectl.cli", *args], capture_output=True,
                              env=env, timeout=60)

    show = run("show", "bytes")
    assert show.returncode == 0 and b"Traceback" not in show.stderr, show.stderr
    assert "ok" in show.stdout.decode("utf-8", "replace")
    as_json = run("show", "bytes", "--json")
    assert as_json.returncode == 0
    assert "\ufffd" in json.loads(as_json.stdout)["output_tail"]
    logs = run("logs", "bytes")
    assert logs.returncode == 0 and b"caf\xe9 \xff\xfe ok\n" in logs.stdout  # the bytes, untouched
    listed = run("list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["state"] == "completed"
