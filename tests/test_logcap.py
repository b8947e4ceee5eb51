"""Job logs capped at max_log_bytes: head and tail kept, the cut marked, recovery unaffected."""
from __future__ import annotations

import os

import pytest

from helpers import job_state, run_queuectl, wait_until

from queuectl import executor, joblog, logcap

CAP = 65536


def write_lines(fd: int, cap: logcap.OutputCap, first: int, last: int, every: int = 400) -> int:
    total = 0
    for i in range(first, last):
        line = f"line {i:06d}\n".encode()
        os.write(fd, line)
        total += len(line)
        if i % every == 0:
            cap.check()
    return total


@pytest.mark.parametrize("in_place", [True, False], ids=["collapse", "copy"])
def test_cut_keeps_head_and_tail_and_counts_what_went(tmp_path, monkeypatch, in_place):
    if not in_place:
        monkeypatch.setattr(logcap, "_fallocate", None)  # as on tmpfs or btrfs
    path = tmp_path / "j.log"
    fd, start = joblog.open_for_attempt(path, joblog.header("j", 1, "h:1:1", "spew"))
    try:
        cap = logcap.OutputCap(fd, start, CAP)
        total = write_lines(fd, cap, 0, 30000)
        cap.check()
        os.write(fd, joblog.result_line("j", 1, None))
    finally:
        os.close(fd)
    data = path.read_bytes()
    if in_place and cap.in_place is False:
        pytest.fail("COLLAPSE_RANGE is unsupported where tmp_path lives; the copy test covers it")
    assert cap.in_place is in_place
    assert len(data) - start <= CAP + logcap.BLOCK
    assert data.startswith(b"=== queuectl job j attempt 1 started") and b"line 000000\n" in data
    assert data.count(logcap.MARK_PREFIX) == 1
    assert data.endswith(b"line 029999\n--- queuectl job j attempt 1 finished: exit 0 ---\n")
    kept = len(data) - start - cap.mark_len - len(joblog.result_line("j", 1, None))
    assert kept + cap.dropped == total
    assert (b"at least" in data) is (not in_place)
    # Recovery reads the end of the log: the result line is found as before.
    assert joblog.attempt_status(path, 1, "h:1:1") == (True, "exit 0")


def assert_cut_once(path, outcome) -> None:
    """``seq 1 60000`` of job r under CAP: head and tail kept, one marker, the result line."""
    data = path.read_bytes()
    assert len(data) <= CAP + 2 * logcap.BLOCK
    assert b"\n1\n2\n3\n" in data and data.count(logcap.MARK_PREFIX) == 1
    assert b"\n60000\n--- queuectl job r attempt 1 finished: exit 0 ---\n" in data
    assert outcome.tail.endswith("60000\n")


def test_a_run_is_cut_while_it_runs_and_at_its_end(tmp_path):
    path = tmp_path / "run.log"
    outcome = executor.run_job("seq 1 30000; sleep 1; seq 30001 60000", False, None, path, "r", 1,
                               "h:1:1", None, {}, tick=0.2, max_log_bytes=CAP)
    assert outcome.error is None
    assert_cut_once(path, outcome)


def test_under_the_cap_nothing_changes(tmp_path):
    path = tmp_path / "small.log"
    outcome = executor.run_job("seq 1 100", False, None, path, "s", 1, "h:1:1", None, {},
                               max_log_bytes=CAP)
    assert outcome.error is None and logcap.MARK_PREFIX not in path.read_bytes()


@pytest.mark.sqlite_only  # the worker's side of it; the cut itself is tested above
def test_logs_shows_the_marker_and_the_end_of_a_capped_job(home, workers):
    assert run_queuectl("config", "set", "max_log_bytes", str(CAP), home=home).returncode == 0
    assert run_queuectl("add", "--id", "big", "seq 1 40000", home=home).returncode == 0
    workers.start(1)
    wait_until(lambda: '"completed"' in run_queuectl("show", "big", "--json", home=home).stdout,
               timeout=30, message="big completed")
    out = run_queuectl("logs", "big", home=home).stdout
    assert "output cut here" in out and out.rstrip().endswith("finished: exit 0 ---")
    assert "\n40000\n" in out and "\n1\n" in out
    assert run_queuectl("logs", "big", "--tail", "2", home=home).stdout.startswith("40000\n")
    bad = run_queuectl("config", "set", "max_log_bytes", "100", home=home)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def run_to_end(run: executor.Run) -> executor.Outcome:
    """Supervise one Run as a multi-slot worker does: wait for its exit or next_due, tick."""
    import select
    import time

    while not run.done():
        wait = min(max(run.next_due() - time.monotonic(), 0.0), 1.0)  # nothing due: inf
        if run.fileno() >= 0:
            select.select([run.fileno()], [], [], wait)
        else:  # no pidfd: poll
            time.sleep(min(wait, 0.01))
        run.tick(time.monotonic())
    return run.finish()


def test_a_multi_slot_run_is_cut_while_it_runs_and_at_its_end(tmp_path):
    path = tmp_path / "run.log"
    run = executor.Run("seq 1 30000; sleep 1.5; seq 30001 60000", False, None, path, "r", 1,
                       "h:1:1", None, {}, max_log_bytes=CAP)
    assert run.next_due() <= run.started + executor.CAP_EVERY, "the size check is due in next_due"
    checks = []
    real_check = run.cap.check
    run.cap.check = lambda: (checks.append(path.stat().st_size), real_check())
    outcome = run_to_end(run)
    assert outcome.error is None
    assert any(size > CAP for size in checks[:-1]), "cut while it ran, not only at the end"
    assert_cut_once(path, outcome)


def test_a_multi_slot_run_without_a_cap_has_nothing_due(tmp_path):
    run = executor.Run("true", False, None, tmp_path / "t.log", "t", 1, "h:1:1", None, {})
    assert run.next_due() == float("inf") and run.cap is None
    assert run_to_end(run).error is None


def test_a_multi_slot_worker_caps_its_runs_logs(home, workers):
    assert run_queuectl("config", "set", "max_log_bytes", str(CAP), home=home).returncode == 0
    assert run_queuectl("add", "--id", "big", "seq 1 30000; sleep 1.5; seq 30001 60000",
                        home=home).returncode == 0
    assert run_queuectl("add", "--id", "small", "seq 1 100", home=home).returncode == 0
    workers.start(1, "--concurrency", "2")
    wait_until(lambda: all(job_state(home, j) == "completed" for j in ("big", "small")),
               timeout=30, message="both completed")
    data = (home / "logs" / "jobs" / "big.log").read_bytes()
    assert len(data) <= CAP + 2 * logcap.BLOCK, len(data)
    assert data.startswith(b"=== queuectl job big attempt 1 started") and b"\n1\n2\n3\n" in data
    assert data.count(logcap.MARK_PREFIX) == 1
    assert data.endswith(b"\n60000\n--- queuectl job big attempt 1 finished: exit 0 ---\n")
    assert logcap.MARK_PREFIX not in (home / "logs" / "jobs" / "small.log").read_bytes()
    out = run_queuectl("logs", "big", home=home).stdout
    assert "output cut here" in out and out.rstrip().endswith("finished: exit 0 ---")
