"""The supervisor with real processes: workers SIGKILLed (replaced, no job lost), the
supervisor SIGKILLed (workers run on, the next one adopts them), workers that die at once
(back-off, no fork storm), scale/stop/status through it, the foreground `supervise`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from helpers import counts, run_queuectl, wait_until

from queuectl import executor, supervisor
from queuectl.jobspec import parse_job
from queuectl.paths import Paths


def state(home: Path) -> Optional[Dict[str, Any]]:
    return supervisor.find(Paths(home))


def live_workers(home: Path) -> List[int]:
    from queuectl import worker_launcher

    return sorted(w.pid for w in worker_launcher.list_workers(Paths(home), clean=False)
                  if not w.stopping)


def full_house(home: Path, count: int, without: tuple = ()) -> Optional[List[int]]:
    """The supervisor's workers once it runs ``count`` of them, none of ``without``."""
    found = state(home)
    if found is None or len(found["workers"]) != count or set(found["workers"]) & set(without):
        return None
    if live_workers(home) != sorted(found["workers"]):
        return None
    return found["workers"]


def start_supervised(home: Path, count: int) -> int:
    result = run_queuectl("worker", "start", "--count", str(count), "--supervise", home=home)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split("(PID ")[1].split(")")[0])
    wait_until(lambda: full_house(home, count), timeout=20, message=f"{count} supervised workers")
    return pid


def supervisor_log(home: Path) -> str:
    return Path(supervisor.log_path(Paths(home))).read_text()


# SQLite only: the supervisor never opens the database, and the recovery of a killed worker's
# job is tested on both backends elsewhere (tests/test_hosts_pg.py, tests/reliability/).
@pytest.mark.sqlite_only
def test_killed_workers_are_replaced_and_no_job_is_lost(home: Path, queue) -> None:
    pid = start_supervised(home, 2)
    killed: List[int] = []
    ids: List[str] = []
    for round_ in range(2):  # each round: a worker killed in the middle of a job
        batch = [f"r{round_}-{i}" for i in range(10)]
        queue.enqueue([parse_job({"id": job_id, "command": "sleep 0.2"}, now=queue.clock(),
                                 default_cwd="/") for job_id in batch])
        ids += batch
        def busy_worker() -> Optional[int]:
            pids = [int(job["worker_id"].split(":")[1]) for job in queue.processing()]
            return next((p for p in pids if p not in killed and executor.pid_alive(p)), None)

        victim = wait_until(busy_worker, timeout=20, message="a busy worker")
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        wait_until(lambda: full_house(home, 2, without=tuple(killed)), timeout=10,
                   message="the killed worker replaced")
    wait_until(lambda: queue.counts()["completed"] == len(ids), timeout=60, message="every job done")
    assert queue.counts()["dead"] == 0
    log = supervisor_log(home)
    for victim in killed:
        assert f"worker {victim} killed by signal SIGKILL" in log
    assert state(home)["restarts"] == 2
    status = run_queuectl("status", home=home).stdout
    assert f"Supervisor: PID {pid}, keeping 2 worker(s) (2 running, 2 restart(s))" in status
    assert "killed by signal SIGKILL" in status
    rows = json.loads(run_queuectl("worker", "status", "--json", home=home).stdout)
    assert sorted(r["mode"] for r in rows) == ["supervised", "supervised"]

    # `worker start` while it runs asks it for more; `worker scale` changes the count in place.
    assert "asked it for 3 worker(s)" in run_queuectl("worker", "start", home=home).stdout
    wait_until(lambda: full_house(home, 3), timeout=10, message="3 workers")
    assert "3 -> 1 worker(s)" in run_queuectl("worker", "scale", "1", home=home).stdout
    wait_until(lambda: full_house(home, 1), timeout=10, message="1 worker")
    assert state(home)["pid"] == pid  # no restart
    assert state(home)["restarts"] == 2  # stopped on request: not deaths

    # A stop through the database (a maintenance window) is not undone by the supervisor.
    alone = full_house(home, 1)
    assert run_queuectl("worker", "stop", "--all-hosts", home=home).returncode == 0
    wait_until(lambda: full_house(home, 0) == [], timeout=20, message="the stop obeyed")
    assert state(home)["wanted"] == 0 and not executor.pid_alive(alone[0])
    assert "stopped on request" in supervisor_log(home)
    assert "0 -> 2 worker(s)" in run_queuectl("worker", "scale", "2", home=home).stdout  # back
    wait_until(lambda: full_house(home, 2), timeout=20, message="2 workers again")

    stop = run_queuectl("worker", "stop", home=home)
    assert "Stopped: supervisor and " in stop.stdout, stop.stdout + stop.stderr  # 1, or 2 if
    # one scaled away is still on its way out
    assert state(home) is None and live_workers(home) == []
    assert not executor.pid_alive(pid)


@pytest.mark.sqlite_only  # process handling only; the job path is the test above's, on both
def test_a_killed_supervisor_leaves_workers_running_and_the_next_adopts_them(home: Path) -> None:
    first = start_supervised(home, 2)
    workers = full_house(home, 2)
    result = run_queuectl("add", "--id", "long", "sleep 1.5", home=home)
    assert result.returncode == 0
    wait_until(lambda: counts(home)["processing"], timeout=20, message="the job running")
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not executor.pid_alive(first), message="the supervisor gone")
    assert live_workers(home) == workers  # still running, the job too
    assert state(home) is None

    second = start_supervised(home, 2)
    assert state(home)["adopted"] == workers and full_house(home, 2) == workers
    again = run_queuectl("worker", "start", "--supervise", home=home)
    assert again.returncode == 1 and "a supervisor already runs" in again.stderr
    # An adopted worker that dies (the idle one: the job runs on) is replaced by a child of
    # the new supervisor.
    busy = json.loads(run_queuectl("show", "long", "--json", home=home).stdout)["worker_id"]
    idle = next(pid for pid in workers if f":{pid}:" not in busy)
    os.kill(idle, signal.SIGKILL)
    wait_until(lambda: full_house(home, 2, without=(idle,)), timeout=10,
               message="the adopted worker replaced")
    wait_until(lambda: counts(home)["completed"] == 1, timeout=30, message="the job done")
    # ... which ran once: the supervisor's crash interrupted nothing.
    assert json.loads(run_queuectl("show", "long", "--json", home=home).stdout)["attempts"] == 1

    stop = run_queuectl("worker", "stop", home=home)
    assert "Stopped: supervisor and 2 worker(s)" in stop.stdout, stop.stdout + stop.stderr
    assert live_workers(home) == [] and not executor.pid_alive(second)


@pytest.fixture
def foreground_supervisor(home: Path, tmp_path: Path):
    """The supervisor in the foreground (``queuectl supervise ARGS``, as systemd runs it, or
    ``python -m queuectl.supervisor ARGS``), its stderr and its workers' logs to one file."""
    out = tmp_path / "supervise.err"
    procs: List[subprocess.Popen] = []

    def start(*args: str, module: bool = False) -> subprocess.Popen:
        env = dict(os.environ, QUEUECTL_HOME=str(home))
        argv = ["-m", "queuectl.supervisor", "--home", str(home), "--foreground"] if module \
            else ["-m", "queuectl.cli", "supervise"]
        with open(out, "ab") as err:
            proc = subprocess.Popen([sys.executable, *argv, *args], stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err, env=env)
        procs.append(proc)
        return proc

    start.log = out  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.sqlite_only  # process handling only
def test_workers_that_die_at_once_are_backed_off(home: Path, foreground_supervisor) -> None:
    assert run_queuectl("init-db", home=home).returncode == 0
    # A worker given a bad option exits at once with status 1 (as one whose database is
    # gone or whose install is broken would), every time.
    proc = foreground_supervisor("--count", "2", "--backoff-base", "bogus", module=True)
    found = wait_until(lambda: (state(home) or {}).get("backoff") and
                       state(home)["backoff"]["quick_deaths"] >= 4 and state(home),
                       timeout=30, message="the back-off")
    text = foreground_supervisor.log.read_text()  # type: ignore[attr-defined]
    # Without a back-off two workers dying within half a second are started again and again;
    # with it, each quick death after the second waits 1 s, 2 s, 4 s ... and starts one.
    assert text.count(" started\n") - 1 <= found["backoff"]["quick_deaths"] + 2, text
    assert found["last_exit"]["status"] == "exit status 1"
    assert "invalid value 'bogus' for backoff_base" in text  # the workers' log, same stderr
    assert "quick deaths in a row: next start in" in text
    # The next start waits its turn: the 5th death comes no sooner than the 2 s delay after
    # the 4th (minus slack for our polling), where a fork storm would have had several.
    seen_at, starts = time.monotonic(), text.count(" started\n")
    wait_until(lambda: state(home)["backoff"]["quick_deaths"] >= 5, timeout=30, message="a 5th")
    assert time.monotonic() - seen_at >= 1.5
    assert foreground_supervisor.log.read_text().count(" started\n") == starts + 1
    for command in (("status",), ("worker", "status")):
        shown = run_queuectl(*command, home=home).stdout
        assert "BACKING OFF: " in shown and "exit status 1" in shown, shown
    assert "back-off" in json.dumps(run_queuectl("status", "--json", home=home).stdout) or \
        json.loads(run_queuectl("status", "--json", home=home).stdout)["supervisor"]["backoff"]

    # `worker scale` (say, after fixing the cause) ends the back-off: the next start is now.
    assert "2 -> 2 worker(s)" in run_queuectl("worker", "scale", "2", home=home).stdout
    wait_until(lambda: "back-off cleared by request" in foreground_supervisor.log.read_text(),
               message="the back-off cleared")

    # SIGTERM (systemd's stop) ends it cleanly, exit 0.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert live_workers(home) == [] and state(home) is None


@pytest.mark.sqlite_only
def test_supervise_in_the_foreground_logs_to_its_stderr_and_sigterm_lets_the_job_finish(
        home: Path, foreground_supervisor) -> None:
    assert run_queuectl("add", "--id", "slow", "sleep 1", home=home).returncode == 0
    proc = foreground_supervisor("--count", "1")
    (worker,) = wait_until(lambda: full_house(home, 1), timeout=20, message="a worker")
    assert state(home)["pid"] == proc.pid  # `supervise` execs the supervisor: one process
    wait_until(lambda: f"worker[{worker}] INFO worker " in foreground_supervisor.log.read_text(),
               message="the worker's start in the supervisor's stderr")
    assert not Paths(home).worker_log(worker).exists()  # the journal, not logs/, under systemd
    again = run_queuectl("supervise", home=home)
    assert again.returncode == 1 and "a supervisor already runs" in again.stderr

    wait_until(lambda: counts(home)["processing"], timeout=20, message="the job running")
    proc.send_signal(signal.SIGTERM)  # systemctl stop
    wait_until(lambda: (state(home) or {}).get("stopping"), timeout=10, message="stopping shown")
    assert proc.wait(timeout=30) == 0
    shown = json.loads(run_queuectl("show", "slow", "--json", home=home).stdout)
    assert (shown["state"], shown["attempts"]) == ("completed", 1)
    assert not executor.pid_alive(worker)
