"""End to end with real detached workers: real processes, real SQLite file, polled deadlines."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import counts, run_queuectl, spawn_queuectl, wait_until

from queuectl.executor import pid_alive


def state_of(queue, job_id: str) -> str:
    return queue.get(job_id)["state"]


def read_pid(path: Path) -> int:
    """The PID a job wrote to ``path`` (polls until the file is complete)."""
    def ready():
        text = path.read_text() if path.exists() else ""
        return int(text) if text.endswith("\n") else None
    return wait_until(ready, message=f"pid in {path.name}")


def test_success(cli, queue, workers, home):
    cli("add", "--id", "ok", "echo hello; echo oops >&2")
    workers.start(1)
    wait_until(lambda: state_of(queue, "ok") == "completed", message="job completed")
    job = queue.get("ok")
    assert job["attempts"] == 1 and job["exit_code"] == 0 and job["last_error"] is None
    assert job["started_at"] <= job["finished_at"]
    assert "hello" in job["output_tail"] and "oops" in job["output_tail"]
    assert cli("logs", "ok").stdout.count("=== queuectl job ok attempt 1") == 1
    status = json.loads(cli("status", "--json").stdout)
    assert status["jobs"]["completed"] == 1 and len(status["workers"]) == 1
    assert status["workers"][0]["state"] == "idle"


def test_retry_then_dlq(cli, queue, workers):
    cli("config", "set", "backoff_base", "0")
    cli("add", "--id", "bad", "--max-retries", "2", "echo try $QUEUECTL_ATTEMPT; exit 3")
    cli("add", "--id", "missing", "--max-retries", "0", "no_such_command_queuectl_test")
    workers.start(1)
    wait_until(lambda: state_of(queue, "bad") == "dead" and state_of(queue, "missing") == "dead",
               message="both jobs dead")
    bad = queue.details("bad")
    assert bad["attempts"] == 3 and bad["exit_code"] == 3 and bad["last_error"] == "exit code 3"
    assert [r["attempt"] for r in bad["runs"]] == [1, 2, 3]
    log = cli("logs", "bad").stdout
    assert [f"try {n}" in log for n in (1, 2, 3)] == [True] * 3
    missing = queue.get("missing")
    assert missing["attempts"] == 1 and "command not found" in missing["last_error"]
    assert "bad" in cli("dlq", "list").stdout and "missing" in cli("list", "--dlq").stdout
    # and back from the DLQ: it runs again with a fresh budget, as attempt 2 (numbers go on)
    cli("dlq", "retry", "missing")
    wait_until(lambda: len(queue.details("missing")["runs"]) == 2 and state_of(queue, "missing") == "dead",
               message="dead again")
    assert queue.get("missing")["attempts"] == 2
    assert [r["attempt"] for r in queue.details("missing")["runs"]] == [1, 2]


def test_backoff_delays_are_respected_by_workers(cli, queue, workers):
    cli("config", "set", "backoff_base", "1.3")
    cli("add", "--id", "slow", "--max-retries", "1", "false")
    workers.start(1)
    wait_until(lambda: state_of(queue, "slow") == "failed", message="first failure")
    job = queue.get("slow")
    assert abs(job["run_at"] - (job["finished_at"] + 1.3)) < 0.01
    wait_until(lambda: state_of(queue, "slow") == "dead", message="dead")
    first, second = queue.details("slow")["runs"]
    assert second["started_at"] >= first["finished_at"] + 1.3 - 0.001, (first, second)


def test_three_workers_run_900_jobs_each_exactly_once(cli, workers, home, tmp_path):
    out = tmp_path / "ran.txt"
    total = 900
    lines = "".join(json.dumps({"id": f"job-{i}", "command": f"echo $QUEUECTL_JOB_ID >> {out}"}) + "\n"
                    for i in range(total))
    cli("enqueue", "--file", "-", input=lines)
    workers.start(3)
    wait_until(lambda: counts(home)["completed"] == total, timeout=90, interval=0.1,
               message=f"{total} jobs completed")
    seen = Counter(out.read_text().split())
    assert len(seen) == total and set(seen.values()) == {1}, seen.most_common(3)
    assert set(seen) == {f"job-{i}" for i in range(total)}
    jobs = json.loads(cli("list", "--limit", "0", "--json").stdout)
    assert {j["attempts"] for j in jobs} == {1}
    assert len({j["worker_id"] for j in jobs}) >= 2, "the work was not shared between workers"
    assert counts(home)["processing"] == 0


def test_priority_order_with_one_worker(cli, workers, tmp_path):
    out = tmp_path / "order.txt"
    plan = [("low-a", 0), ("high", 10), ("neg", -3), ("mid", 5), ("low-b", 0), ("top", 99)]
    for job_id, prio in plan:
        cli("add", "--id", job_id, "--priority", str(prio), f"echo {job_id} >> {out}")
    workers.start(1)
    wait_until(lambda: out.exists() and len(out.read_text().split()) == len(plan), message="all ran")
    assert out.read_text().split() == ["top", "high", "mid", "low-a", "low-b", "neg"]


def test_run_at_and_delay_are_honoured(cli, queue, workers, tmp_path):
    out = tmp_path / "when.txt"
    workers.start(1)
    cli("add", "--id", "delayed", "--delay", "1", f"date +%s.%N > {out}")
    run_at = queue.get("delayed")["run_at"]
    cli("add", "--id", "at", "--run-at", f"{run_at + 0.3:.3f}", "true")
    cli("add", "--id", "now", "true")
    wait_until(lambda: state_of(queue, "now") == "completed", message="undelayed job done")
    wait_until(lambda: state_of(queue, "at") == "completed", message="delayed jobs done")
    assert float(out.read_text()) >= run_at
    assert queue.get("delayed")["started_at"] >= run_at
    assert queue.get("at")["started_at"] >= run_at + 0.3


def test_timeout_kills_the_job_and_its_children(cli, queue, workers, tmp_path):
    child = tmp_path / "child.pid"
    cli("add", "--id", "hang", "--timeout", "1", "--max-retries", "0",
        f"sleep 60 & echo $! > {child}; sleep 60")
    workers.start(1)
    pid = read_pid(child)
    assert pid_alive(pid)
    wait_until(lambda: state_of(queue, "hang") == "dead", timeout=15, message="timed out → dead")
    job = queue.get("hang")
    assert job["last_error"] == "timed out after 1s"
    assert job["finished_at"] - job["started_at"] < 10
    wait_until(lambda: not pid_alive(pid), message="the job's child is gone")
    assert "timed out" in cli("logs", "hang").stdout


def test_config_job_timeout_applies_when_job_has_none(cli, queue, workers):
    cli("config", "set", "job_timeout", "0.5")
    cli("add", "--id", "t", "--max-retries", "0", "sleep 30")
    cli("add", "--id", "own", "--timeout", "20", "--max-retries", "0", "sleep 0.8")
    workers.start(2)
    wait_until(lambda: state_of(queue, "t") == "dead" and state_of(queue, "own") == "completed",
               timeout=15, message="config timeout kills t; own timeout lets own finish")
    assert "timed out after 0.5s" == queue.get("t")["last_error"]


def test_graceful_stop_lets_running_job_finish(cli, queue, workers):
    cli("add", "--id", "inflight", "sleep 2; echo finished")
    cli("add", "--id", "next", "--priority", "-1", "true")
    pids = workers.start(1)
    wait_until(lambda: state_of(queue, "inflight") == "processing", message="job running")
    result = workers.stop("--wait", "30")
    assert result.returncode == 0, result.stderr
    assert "Stopped: 1" in result.stdout
    job = queue.get("inflight")
    assert job["state"] == "completed" and "finished" in job["output_tail"]
    assert state_of(queue, "next") == "pending", "a stopping worker must not claim new work"
    assert not pid_alive(pids[0])
    assert "No running workers." in cli("worker", "status").stdout
    assert not list(Path(os.environ["QUEUECTL_HOME"], "workers").glob("*.json"))


def test_sigterm_worker_exits_zero_after_its_job(cli, queue, home):
    """The worker as our own child, so its exit status can be read."""
    cli("add", "--id", "inflight", "sleep 2")
    proc = subprocess.Popen([sys.executable, "-m", "queuectl.worker", "--home", str(home)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: state_of(queue, "inflight") == "processing", message="job running")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert state_of(queue, "inflight") == "completed"
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_persistence_across_worker_restart(cli, queue, workers, home):
    cli("add", "--id", "first", "echo one")
    workers.start(2)
    wait_until(lambda: state_of(queue, "first") == "completed", message="first done")
    assert workers.stop().returncode == 0
    wait_until(lambda: not workers.alive(), message="workers gone")
    for i in range(5):
        cli("add", "--id", f"later-{i}", f"echo {i}")
    # a fresh process sees what the stopped workers left
    status = json.loads(run_queuectl("status", "--json", home=home).stdout)
    assert status["jobs"]["completed"] == 1 and status["jobs"]["pending"] == 5
    assert status["workers"] == []
    workers.start(1)
    wait_until(lambda: counts(home)["completed"] == 6, message="all done after restart")
    assert "one" in queue.get("first")["output_tail"]
    assert queue.get("first")["attempts"] == 1


def test_sigkilled_worker_job_is_recovered(cli, queue, workers, tmp_path):
    attempts = tmp_path / "attempts.txt"
    child = tmp_path / "child.pid"
    cli("config", "set", "backoff_base", "0")
    cli("add", "--id", "victim",
        f"echo $QUEUECTL_ATTEMPT >> {attempts}; "
        f"if [ $QUEUECTL_ATTEMPT -lt 2 ]; then sleep 60 & echo $! > {child}; wait; fi")
    first = workers.start(1)[0]
    wait_until(lambda: queue.get("victim")["job_pid"], message="job running with its pid recorded")
    orphan = read_pid(child)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not pid_alive(first), message="worker dead")
    assert state_of(queue, "victim") == "processing"  # nobody has noticed yet
    workers.start(1)
    wait_until(lambda: state_of(queue, "victim") == "completed", timeout=20, message="recovered")
    details = queue.details("victim")
    assert details["attempts"] == 2
    assert "worker died" in details["runs"][0]["error"]
    assert details["runs"][1]["exit_code"] == 0
    assert attempts.read_text().split() == ["1", "2"]
    wait_until(lambda: not pid_alive(orphan), message="the dead worker's job killed")


def test_worker_start_background_flag_and_status(cli, queue, workers, tmp_path):
    go = tmp_path / "go"
    cli("add", "--id", "busy-job", f"while [ ! -e {go} ]; do sleep 0.02; done")
    pids = workers.start(2, "--background")  # accepted from earlier designs; detached anyway
    assert len(pids) == 2
    wait_until(lambda: state_of(queue, "busy-job") == "processing", message="job running")
    rows = json.loads(cli("worker", "status", "--json").stdout)
    assert sorted(r["pid"] for r in rows) == sorted(pids)
    busy = [r for r in rows if r["state"] == "busy"]
    assert len(busy) == 1 and busy[0]["job"] == "busy-job" and busy[0]["uptime"] >= 0
    assert queue.get("busy-job")["worker_id"] == busy[0]["worker_id"]
    text = cli("worker", "status").stdout
    assert "busy" in text and "idle" in text and str(pids[0]) in text
    go.touch()
    wait_until(lambda: state_of(queue, "busy-job") == "completed", message="done")


def test_attached_workers_with_backoff_override(cli, queue, home):
    """`queuectl worker -n 2 --backoff-base 3`: attached, per-run backoff, Ctrl-C stops cleanly."""
    cli("add", "--id", "flop", "--max-retries", "1", "false")
    cli("add", "--id", "fine", "echo fine")
    with spawn_queuectl("worker", "-n", "2", "--backoff-base", "3", home=home) as proc:
        wait_until(lambda: state_of(queue, "flop") == "failed" and state_of(queue, "fine") == "completed",
                   timeout=20, message="first failure recorded")
        job = queue.get("flop")
        assert abs(job["run_at"] - job["finished_at"] - 3.0) < 0.01  # 3 ** 1, not config's 2 ** 1
        wait_until(lambda: _catches(proc.pid, signal.SIGTERM), message="launcher forwards signals")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "job fine: attempt 1 started" in err and "completed" in err
        assert "Traceback" not in err
        assert "No running workers." in cli("worker", "status").stdout


def test_worker_start_foreground(cli, queue, home):
    cli("add", "--id", "fg", "echo fg")
    with spawn_queuectl("worker", "start", "--foreground", home=home) as proc:
        wait_until(lambda: state_of(queue, "fg") == "completed", message="foreground worker ran it")
        wait_until(lambda: _catches(proc.pid, signal.SIGTERM), message="launcher forwards signals")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


@pytest.mark.parametrize("log_jobs", [False, True])
def test_detached_workers_log_each_job_only_with_log_jobs(cli, queue, workers, home, log_jobs):
    cli("add", "--id", "fine", "true")
    cli("add", "--id", "broken", "--max-retries", "0", "exit 3")
    [pid] = workers.start(1, *(["--log-jobs"] if log_jobs else []))
    wait_until(lambda: state_of(queue, "fine") == "completed" and state_of(queue, "broken") == "dead",
               message="both jobs ran")
    log = Path(home, "logs", f"worker-{pid}.log")
    wait_until(lambda: "job broken: failed" in log.read_text(), message="failure logged")
    text = log.read_text()
    assert ("job fine: completed in" in text) == log_jobs
    assert ("job fine: attempt 1 started" in text) == log_jobs


def _catches(pid: int, signum: int) -> bool:
    with open(f"/proc/{pid}/status") as handle:
        mask = next(int(line.split()[1], 16) for line in handle if line.startswith("SigCgt:"))
    return bool(mask & (1 << (signum - 1)))


def test_attached_workers_stopped_while_starting_exit_0(home):
    """SIGTERM forwarded before a worker installed its handler still means a clean stop."""
    with spawn_queuectl("worker", "-n", "2", home=home) as proc:
        wait_until(lambda: _catches(proc.pid, signal.SIGTERM), message="launcher forwards signals")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


def test_frozen_worker_loses_its_lease_and_its_late_result_is_dropped(cli, queue, workers, home, tmp_path):
    attempts = tmp_path / "attempts.txt"
    cli("config", "set", "lease_seconds", "2")
    cli("config", "set", "backoff_base", "0")
    cli("add", "--id", "stuck",
        f"echo $QUEUECTL_ATTEMPT >> {attempts}; if [ $QUEUECTL_ATTEMPT -lt 2 ]; then sleep 60; fi")
    frozen = workers.start(1)[0]
    job_pid = wait_until(lambda: queue.get("stuck")["job_pid"], message="job pid recorded")
    os.kill(frozen, signal.SIGSTOP)
    try:
        workers.start(1)
        wait_until(lambda: state_of(queue, "stuck") == "completed", timeout=30, message="recovered by lease")
        details = queue.details("stuck")
        assert details["attempts"] == 2 and "lease expired" in details["runs"][0]["error"]
        wait_until(lambda: not pid_alive(job_pid), message="the frozen worker's job was killed")
    finally:
        os.kill(frozen, signal.SIGCONT)
    log = Path(home, "logs", f"worker-{frozen}.log")
    wait_until(lambda: "result dropped" in log.read_text(), message="thawed worker drops its result")
    assert state_of(queue, "stuck") == "completed" and len(queue.details("stuck")["runs"]) == 2
    assert attempts.read_text().split() == ["1", "2"]
    assert frozen in workers.alive(), "the thawed worker carries on"
