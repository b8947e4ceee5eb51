"""Multi-slot workers and group limits with real worker processes, on every backend.

Each job appends "<id> start|end <time>" to one file (lines under PIPE_BUF appended with
O_APPEND do not interleave); the checks replay those events, so they count the processes
that really ran, not what the database believed.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Dict, List, Tuple

from helpers import counts, wait_until

from queuectl.executor import pid_alive


def recording(events: Path, seconds: float) -> str:
    return (f'echo "$QUEUECTL_JOB_ID start $(date +%s.%N)" >> {events}; sleep {seconds}; '
            f'echo "$QUEUECTL_JOB_ID end $(date +%s.%N)" >> {events}')


def read_events(events: Path) -> List[Tuple[float, str, str]]:
    found = []
    for line in events.read_text().splitlines():
        job_id, what, stamp = line.split()
        found.append((float(stamp), what, job_id))
    return sorted(found, key=lambda e: (e[0], e[1] == "start"))  # an end before a start at a tie


def peak(events: List[Tuple[float, str, str]], ids: set) -> int:
    running, top = 0, 0
    for _, what, job_id in events:
        if job_id in ids:
            running += 1 if what == "start" else -1
            top = max(top, running)
    return top


def processing(queue) -> List[dict]:
    return queue.list(("processing",))


def test_a_group_limit_holds_over_three_workers_of_four_slots(cli, queue, workers, tmp_path):
    events = tmp_path / "events"
    cli("group", "set", "g", "--parallel", "2")
    for i in range(10):
        cli("add", "--id", f"g{i}", "--group", "g", recording(events, 0.3))
    for i in range(6):
        cli("add", "--id", f"d{i}", recording(events, 0.3))
    workers.start(3, "--concurrency", "4")
    wait_until(lambda: counts(cli_home(queue))["completed"] == 16, timeout=60, message="all done")
    found = read_events(events)
    assert peak(found, {f"g{i}" for i in range(10)}) == 2, "never more than 2 of g at once"
    assert peak(found, {e[2] for e in found}) >= 4, "the slots ran jobs side by side"
    assert all(queue.get(f"g{i}")["attempts"] == 1 for i in range(10))
    groups = {g["name"]: g for g in queue.groups()}
    assert groups["g"]["running"] == 0 and groups["g"]["waiting"] == 0


def cli_home(queue) -> Path:
    return Path(os.environ["QUEUECTL_HOME"])


def test_lowering_a_limit_while_jobs_run_starts_none_until_below_it(cli, queue, workers, tmp_path):
    events = tmp_path / "events"
    cli("group", "set", "g", "--parallel", "3")
    for i in range(3):
        cli("add", "--id", f"first{i}", "--group", "g", recording(events, 1.5))
    for i in range(2):
        cli("add", "--id", f"later{i}", "--group", "g", "--priority", "-1", recording(events, 0.2))
    workers.start(1, "-c", "4")
    wait_until(lambda: len(processing(queue)) == 3, timeout=20, message="three running")
    cli("group", "set", "g", "--parallel", "1")
    wait_until(lambda: counts(cli_home(queue))["completed"] == 5, timeout=30, message="all done")
    found = read_events(events)
    last_first_end = max(t for t, what, job in found if what == "end" and job.startswith("first"))
    later_starts = [t for t, what, job in found if what == "start" and job.startswith("later")]
    assert min(later_starts) >= last_first_end, "a new one started while 3 ran with limit 1"
    assert peak(found, {"later0", "later1"}) == 1


def test_sigkill_of_a_multi_slot_worker_recovers_every_slot_once(cli, queue, workers, tmp_path):
    cli("config", "set", "backoff_base", "0")
    ids = [f"v{i}" for i in range(3)]
    for job_id in ids:
        cli("add", "--id", job_id, f"echo $QUEUECTL_ATTEMPT >> {tmp_path}/{job_id}; "
            "if [ $QUEUECTL_ATTEMPT -lt 2 ]; then sleep 60; fi")
    first = workers.start(1, "-c", "4")[0]
    wait_until(lambda: all(queue.get(j)["job_pid"] for j in ids), timeout=20,
               message="every slot's job running with its pid recorded")
    orphans = [queue.get(j)["job_pid"] for j in ids]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not pid_alive(first), message="worker dead")
    workers.start(1, "-c", "4")
    wait_until(lambda: all(queue.get(j)["state"] == "completed" for j in ids), timeout=30,
               message="every slot's job recovered and run again")
    for job_id in ids:
        assert (tmp_path / job_id).read_text().split() == ["1", "2"], "each ran once per attempt"
        assert "worker died" in queue.details(job_id)["runs"][0]["error"]
    wait_until(lambda: not any(pid_alive(p) for p in orphans), message="the dead worker's runs killed")


def test_graceful_stop_lets_every_slot_finish(cli, queue, workers):
    for i in range(3):
        cli("add", "--id", f"run{i}", "sleep 1; echo finished")
    cli("add", "--id", "next", "--priority", "-1", "true")
    workers.start(1, "-c", "3")
    wait_until(lambda: len(processing(queue)) == 3, timeout=20, message="all slots busy")
    result = workers.stop("--wait", "30")
    assert result.returncode == 0 and "Stopped: 1" in result.stdout, result.stdout + result.stderr
    for i in range(3):
        job = queue.get(f"run{i}")
        assert job["state"] == "completed" and "finished" in job["output_tail"]
    assert queue.get("next")["state"] == "pending", "a stopping worker claims nothing new"


def test_forced_stop_kills_every_slot(cli, queue, workers):
    for i in range(3):
        cli("add", "--id", f"run{i}", "sleep 60")
    pid = workers.start(1, "-c", "3")[0]
    wait_until(lambda: all(queue.get(f"run{i}")["job_pid"] for i in range(3)), timeout=20,
               message="all slots busy with their pids recorded")
    runs = [queue.get(f"run{i}")["job_pid"] for i in range(3)]
    result = workers.stop("--force", "--wait", "30")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not pid_alive(pid), message="worker gone")
    states: Dict[str, str] = {f"run{i}": queue.get(f"run{i}")["state"] for i in range(3)}
    assert set(states.values()) == {"failed"}, states
    assert "forced" in queue.get("run0")["last_error"]
    assert not any(pid_alive(p) for p in runs)


def test_each_slot_has_its_own_cancel_and_timeout(cli, queue, workers):
    cli("add", "--id", "cancel-me", "sleep 30")
    cli("add", "--id", "too-slow", "--timeout", "0.5", "--max-retries", "0", "sleep 30")
    cli("add", "--id", "fine", "sleep 0.5; echo ok")
    workers.start(1, "-c", "3")
    wait_until(lambda: queue.get("cancel-me")["state"] == "processing", timeout=20, message="running")
    cli("cancel", "cancel-me", "--wait", "0")
    wait_until(lambda: {queue.get(j)["state"] for j in ("cancel-me", "too-slow", "fine")}
               == {"cancelled", "dead", "completed"}, timeout=20, message="each slot's own end")
    assert queue.get("cancel-me")["state"] == "cancelled"
    assert "timed out" in queue.get("too-slow")["last_error"]
    assert "ok" in queue.get("fine")["output_tail"]
