"""Issue 5, day-to-day control (not the dashboard): logs, wait, cancel, pause, purge, deps, unique."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import counts, dump_db, spawn_queuectl, wait_until

from queuectl.executor import Outcome, pid_alive
from queuectl.models import Queue
from queuectl.paths import Paths

W = "host:1:1"


def state_of(queue, job_id: str) -> str:
    return queue.get(job_id)["state"]


def stays(condition, seconds: float, interval: float = 0.05) -> bool:
    """For negative checks ('nothing starts'): the condition holds for the whole period."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(interval)
    return bool(condition())


def read_pid(path: Path) -> int:
    def ready():
        text = path.read_text() if path.exists() else ""
        return int(text) if text.endswith("\n") else None
    return wait_until(ready, message=f"pid in {path.name}")


def gate(tmp_path: Path, name: str = "go") -> "tuple[Path, str]":
    """A file the test creates to let a job continue: deterministic instead of sleeps."""
    path = tmp_path / name
    return path, f"while [ ! -e {path} ]; do sleep 0.02; done"


# -- logs ----------------------------------------------------------------------------------------
def test_logs_and_attempts(cli, queue, workers):
    cli("config", "set", "backoff_base", "0")
    cli("add", "--id", "flaky", "echo run-$QUEUECTL_ATTEMPT; [ $QUEUECTL_ATTEMPT -ge 3 ]")
    workers.start(1)
    wait_until(lambda: state_of(queue, "flaky") == "completed", message="third attempt completes")
    whole = cli("logs", "flaky").stdout
    assert [whole.count(f"run-{n}") for n in (1, 2, 3)] == [1, 1, 1]
    assert whole.index("attempt 1") < whole.index("run-1") < whole.index("attempt 2") < whole.index("run-2")
    second = cli("logs", "flaky", "--attempt", "2").stdout
    assert second.startswith("=== queuectl job flaky attempt 2 ")
    assert "run-2" in second and "run-1" not in second and "run-3" not in second
    assert "run-3" in cli("logs", "flaky", "-a", "3").stdout
    missing = cli("logs", "flaky", "--attempt", "9", ok=False)
    assert missing.exit_code == 1 and "no logged attempt 9" in missing.stderr
    assert "run-" not in cli("logs", "flaky", "--attempt", "9", ok=False).stdout


def test_logs_of_a_job_that_never_ran_is_empty(cli):
    cli("add", "--id", "idle", "--delay", "1h", "true")
    result = cli("logs", "idle")
    assert result.stdout == "" and result.exit_code == 0


def test_logs_follow_streams_until_the_job_ends(cli, queue, workers, home, tmp_path):
    go, wait_for_go = gate(tmp_path)
    cli("add", "--id", "stream", f"echo first-line; {wait_for_go}; echo second-line")
    workers.start(1)
    wait_until(lambda: state_of(queue, "stream") == "processing", message="job running")
    with spawn_queuectl("logs", "stream", "--follow", home=home, stdout=subprocess.PIPE) as follower:
        seen = []
        for line in follower.stdout:
            seen.append(line)
            if "first-line" in line:
                break
        assert any("first-line" in line for line in seen), seen
        assert follower.poll() is None, "follow must keep running while the job runs"
        assert state_of(queue, "stream") == "processing"
        go.touch()
        rest, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err
        assert "second-line" in rest
        assert state_of(queue, "stream") == "completed"


def test_logs_follow_of_a_finished_job_prints_and_exits(cli, queue, workers):
    cli("add", "--id", "done", "echo all-done")
    workers.start(1)
    wait_until(lambda: state_of(queue, "done") == "completed", message="done")
    assert "all-done" in cli("logs", "done", "--follow").stdout


# -- wait ----------------------------------------------------------------------------------------
def test_wait_exit_codes(cli, queue, workers):
    cli("config", "set", "backoff_base", "0")
    cli("add", "--id", "a", "true")
    cli("add", "--id", "b", "echo b")
    cli("add", "--id", "bad", "--max-retries", "1", "false")
    workers.start(2)
    ok = cli("wait", "a", "b", "--timeout", "30")
    assert ok.exit_code == 0 and "All 2 job(s) completed." in ok.stdout
    dead = cli("wait", "a", "bad", "--timeout", "30", ok=False)
    assert dead.exit_code == 1 and "bad (dead)" in dead.stderr
    assert state_of(queue, "bad") == "dead"


def test_wait_timeout_exits_2(cli):
    cli("add", "--id", "later", "--delay", "1h", "true")
    started = time.monotonic()
    result = cli("wait", "later", "--timeout", "0.3", ok=False)
    assert result.exit_code == 2 and "timed out" in result.stderr and "later" in result.stderr
    assert time.monotonic() - started < 10


def test_wait_all_waits_for_every_unfinished_job(cli, queue, workers, tmp_path):
    go, wait_for_go = gate(tmp_path)
    cli("add", "--id", "gate", wait_for_go)
    cli("add", "--id", "after", "true")
    workers.start(2)
    wait_until(lambda: state_of(queue, "gate") == "processing", message="gate running")
    assert cli("wait", "--all", "--timeout", "0.2", ok=False).exit_code == 2
    go.touch()
    result = cli("wait", "--all", "--timeout", "30")
    assert result.exit_code == 0 and counts(Path(os.environ["QUEUECTL_HOME"]))["completed"] == 2
    assert cli("wait", "--all").exit_code == 0  # nothing left to wait for


def test_wait_counts_cancelled_as_not_completed(cli):
    cli("add", "--id", "c", "--delay", "1h", "true")
    cli("cancel", "c")
    result = cli("wait", "c", ok=False)
    assert result.exit_code == 1 and "c (cancelled)" in result.stderr


# -- cancel --------------------------------------------------------------------------------------
def test_cancel_pending_and_failed(cli, queue):
    cli("add", "--id", "p", "--delay", "1h", "true")
    cli("add", "--id", "f", "false")
    job = queue.claim(W)
    queue.finish(job, Outcome(1, "exit code 1", ""), W)
    assert state_of(queue, "f") == "failed"
    result = cli("cancel", "p", "f")
    assert result.stdout == "Job p cancelled\nJob f cancelled\n"
    for job_id in ("p", "f"):
        job = queue.get(job_id)
        assert job["state"] == "cancelled" and job["last_error"] == "cancelled by user"
    assert "cancelled" in cli("list", "--state", "cancelled").stdout
    again = cli("cancel", "p", ok=False)
    assert again.exit_code == 1 and "already cancelled" in again.stderr
    assert "p" not in cli("dlq", "list").stdout, "cancelled is not the DLQ"


def test_cancel_is_all_or_nothing(cli, home):
    cli("add", "--id", "x", "--delay", "1h", "true")
    before = dump_db(home)
    result = cli("cancel", "x", "ghost", ok=False)
    assert result.exit_code == 1 and "ghost" in result.stderr
    assert dump_db(home) == before


def test_cancel_running_job_kills_its_process_group(cli, queue, workers, tmp_path):
    child = tmp_path / "child.pid"
    cli("add", "--id", "runaway", f"sleep 60 & echo $! > {child}; wait")
    cli("add", "--id", "next", "echo next")
    workers.start(1)
    pid = read_pid(child)
    assert state_of(queue, "runaway") == "processing"
    result = cli("cancel", "runaway", "--wait", "30")
    assert result.stdout == "Job runaway cancelled\n"
    job = queue.get("runaway")
    assert job["state"] == "cancelled" and "cancelled" in job["last_error"]
    wait_until(lambda: not pid_alive(pid), message="the job's child is gone")
    wait_until(lambda: state_of(queue, "next") == "completed", message="the worker carries on")
    assert queue.get("runaway")["attempts"] == 1


# -- pause / resume ------------------------------------------------------------------------------
def test_pause_drains_then_resume(cli, queue, workers, tmp_path):
    go, wait_for_go = gate(tmp_path)
    cli("add", "--id", "running", f"{wait_for_go}; echo finished")
    workers.start(1)
    wait_until(lambda: state_of(queue, "running") == "processing", message="job running")
    assert "paused" in cli("pause").stdout.lower()
    cli("pause")  # idempotent
    cli("add", "--id", "queued", "true")
    status = json.loads(cli("status", "--json").stdout)
    assert status["paused"] is True and status["paused_since"] is not None
    assert "PAUSED" in cli("status").stdout
    go.touch()
    wait_until(lambda: state_of(queue, "running") == "completed", message="running job finishes")
    assert stays(lambda: state_of(queue, "queued") == "pending", 0.8), "a job started while paused"
    workers.start(1)  # a new worker must respect the pause too
    assert stays(lambda: state_of(queue, "queued") == "pending", 0.5)
    assert "resumed" in cli("resume").stdout.lower()
    assert json.loads(cli("status", "--json").stdout)["paused"] is False
    wait_until(lambda: state_of(queue, "queued") == "completed", message="runs after resume")


# -- purge ---------------------------------------------------------------------------------------
def test_purge_old_finished_jobs_and_their_logs(cli, home, store):
    from queuectl.jobspec import parse_job

    paths = Paths(home)
    then = time.time() - 10 * 86400
    old = Queue(store, clock=lambda: then)
    old.enqueue([parse_job({"id": name, "command": "true", "max_retries": 0}, now=then, default_cwd="/")
                 for name in ("old-ok", "old-dead", "old-busy", "old-cancelled")])
    old.enqueue([parse_job({"id": "old-pending", "command": "true", "delay": 30 * 86400}, now=then,
                           default_cwd="/")])
    for outcome in (Outcome(0, None, ""), Outcome(1, "exit code 1", "")):
        old.finish(old.claim(W), outcome, W)
    assert old.claim(W)["id"] == "old-busy"  # processing for ten days: still never purged
    old.cancel(["old-cancelled"])
    cli("add", "--id", "new-ok", "true")
    recent = Queue(store)
    new = recent.claim(W)
    assert new["id"] == "new-ok"
    recent.finish(new, Outcome(0, None, ""), W)
    states = {j["id"]: j["state"] for j in recent.list()}
    assert states == {"old-ok": "completed", "old-dead": "dead", "old-busy": "processing",
                      "old-pending": "pending", "old-cancelled": "cancelled", "new-ok": "completed"}
    paths.job_logs_dir.mkdir(parents=True, exist_ok=True)
    for job_id in states:
        paths.job_log(job_id).write_text("log\n")

    def left():
        return {j["id"] for j in json.loads(cli("list", "--limit", "0", "--json").stdout)}

    assert cli("purge", "--state", "completed", "--older-than", "7d").stdout == "Purged 1 job(s).\n"
    assert left() == set(states) - {"old-ok"}
    assert not paths.job_log("old-ok").exists() and paths.job_log("new-ok").exists()

    result = cli("purge", "-s", "dead", "-s", "completed", "-s", "cancelled", "--older-than", "1d")
    assert result.stdout == "Purged 2 job(s).\n"
    assert left() == {"old-busy", "old-pending", "new-ok"}
    assert cli("purge", "--state", "completed").stdout == "Purged 1 job(s).\n"
    assert left() == {"old-busy", "old-pending"}
    for job_id in ("old-busy", "old-pending"):
        assert paths.job_log(job_id).exists()
    for job_id in ("old-ok", "old-dead", "old-cancelled", "new-ok"):
        assert not paths.job_log(job_id).exists()
    assert cli("purge", "--state", "cancelled").stdout == "Purged 0 job(s).\n"


# -- dependencies --------------------------------------------------------------------------------
def test_dependency_chain_runs_in_order(cli, queue, workers, tmp_path):
    out = tmp_path / "chain.txt"
    cli("add", "--id", "a", f"sleep 0.2; echo a >> {out}")
    cli("add", "--id", "b", "--after", "a", f"echo b >> {out}")
    cli("enqueue", json.dumps({"id": "c", "command": f"echo c >> {out}", "after": ["a", "b"],
                               "priority": 100}))
    cli("add", "--id", "free", f"echo free >> {out}")
    workers.start(3)
    result = cli("wait", "c", "--timeout", "30")
    assert result.exit_code == 0
    order = out.read_text().split()
    assert order.index("a") < order.index("b") < order.index("c")
    a, b, c = (queue.get(x) for x in "abc")
    assert b["started_at"] >= a["finished_at"] and c["started_at"] >= b["finished_at"]
    assert "after:" in cli("show", "c").stdout


def test_dependency_failure_cascades_cancel(cli, queue, workers):
    cli("add", "--id", "root", "--max-retries", "0", "exit 4")
    cli("add", "--id", "child", "--after", "root", "true")
    cli("add", "--id", "grandchild", "--after", "child", "true")
    cli("add", "--id", "bystander", "true")
    workers.start(1)
    result = cli("wait", "grandchild", "--timeout", "30", ok=False)
    assert result.exit_code == 1
    assert state_of(queue, "root") == "dead"
    assert queue.get("child")["state"] == "cancelled"
    assert queue.get("child")["last_error"] == "dependency 'root' is dead"
    assert queue.get("grandchild")["last_error"] == "dependency 'child' is cancelled"
    assert queue.get("child")["attempts"] == 0, "a cancelled dependent never ran"
    wait_until(lambda: state_of(queue, "bystander") == "completed", message="others unaffected")


def test_cancelling_a_dependency_cancels_dependents(cli, queue):
    cli("add", "--id", "base", "--delay", "1h", "true")
    cli("add", "--id", "dep", "--after", "base", "true")
    cli("cancel", "base")
    assert queue.get("dep")["last_error"] == "dependency 'base' is cancelled"


def test_unknown_dependency_refused(cli, home):
    cli("add", "--id", "known", "true")
    before = dump_db(home)
    result = cli("add", "--after", "known,ghost", "true", ok=False)
    assert result.exit_code == 1 and "unknown job 'ghost'" in result.stderr
    result = cli("enqueue", '{"command": "true", "after": ["nope"]}', ok=False)
    assert result.exit_code == 1 and "nope" in result.stderr
    assert dump_db(home) == before


def test_dependencies_within_one_batch(cli, queue):
    text = '{"id": "x1", "command": "true"}\n{"id": "x2", "command": "true", "after": ["x1"]}\n'
    cli("enqueue", "--file", "-", input=text)
    assert queue.get("x2")["deps_left"] == 1


# -- unique keys ---------------------------------------------------------------------------------
def test_unique_key_refused_then_skip_prints_existing_id(cli, queue, home):
    assert cli("add", "--unique-key", "nightly", "sleep 1").stdout == "Enqueued job 1\n"
    before = dump_db(home)
    refused = cli("add", "--unique-key", "nightly", "sleep 1", ok=False)
    assert refused.exit_code == 1 and "'1'" in refused.stderr and "nightly" in refused.stderr
    skipped = cli("add", "--unique-key", "nightly", "--if-exists", "skip", "sleep 1")
    assert skipped.exit_code == 0 and skipped.stdout.split()[2] == "1", skipped.stdout
    via_json = cli("enqueue", "--if-exists", "skip", '{"command": "x", "unique_key": "nightly"}')
    assert via_json.stdout.split()[2] == "1"
    assert dump_db(home) == before
    # once the holder finished, the key is free again
    job = queue.claim(W)
    queue.finish(job, Outcome(0, None, ""), W)
    assert cli("add", "--unique-key", "nightly", "sleep 1").stdout == "Enqueued job 2\n"


def test_unique_key_under_concurrent_enqueue(home, queue):
    env = dict(os.environ, QUEUECTL_HOME=str(home))
    queue.settings()  # DB exists before the race: the race is about the key, not the schema
    procs = [subprocess.Popen([sys.executable, "-m", "queuectl.cli", "add", "--unique-key", "one",
                               "--if-exists", "skip", f"echo {n}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for n in range(8)]
    results = [(p.wait(timeout=60), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [code for code, _, _ in results] == [0] * 8, results
    jobs = queue.list()
    assert len(jobs) == 1 and jobs[0]["unique_key"] == "one"
    assert {out.split()[2] for _, out, _ in results} == {jobs[0]["id"]}
    assert sum(out.startswith("Enqueued job") for _, out, _ in results) == 1


def test_unique_key_concurrent_without_skip_exactly_one_wins(home, queue):
    env = dict(os.environ, QUEUECTL_HOME=str(home))
    queue.settings()
    procs = [subprocess.Popen([sys.executable, "-m", "queuectl.cli", "add", "--unique-key", "k", "true"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(8)]
    codes = sorted(p.wait(timeout=60) for p in procs)
    errors = [p.stderr.read() for p in procs]
    for p in procs:
        p.stderr.close()
    assert codes == [0] + [1] * 7, errors
    assert all("Traceback" not in e and "locked" not in e for e in errors)
    assert len(queue.list()) == 1


def test_dlq_retry_refuses_when_unique_key_is_taken(cli, queue):
    cli("add", "--id", "old", "--unique-key", "k", "--max-retries", "0", "false")
    job = queue.claim(W)
    queue.finish(job, Outcome(1, "exit code 1", ""), W)
    cli("add", "--id", "new", "--unique-key", "k", "true")
    result = cli("dlq", "retry", "old", ok=False)
    assert result.exit_code == 1 and "'new'" in result.stderr
    assert state_of(queue, "old") == "dead"


@pytest.mark.parametrize("argv", [["logs"], ["wait"], ["cancel"], ["pause"], ["resume"], ["purge"]])
def test_operate_commands_have_help(cli, argv):
    assert cli(*argv, "--help").stdout.startswith("Usage: ")


# -- scripting and terminals -----------------------------------------------------------------------
def test_wait_json(cli, queue):
    cli("add", "--id", "ok", "true")
    cli("add", "--id", "gone", "--max-retries", "0", "false")
    cli("add", "--id", "later", "--delay", "1h", "true")
    for outcome in (Outcome(0, None, ""), Outcome(1, "exit code 1", "")):
        queue.finish(queue.claim(W), outcome, W)
    done = cli("wait", "ok", "--json")
    assert done.exit_code == 0 and json.loads(done.stdout) == {"jobs": {"ok": "completed"}, "timed_out": False}
    dead = cli("wait", "ok", "gone", "--json", ok=False)
    assert dead.exit_code == 1
    assert json.loads(dead.stdout) == {"jobs": {"ok": "completed", "gone": "dead"}, "timed_out": False}
    late = cli("wait", "ok", "later", "--json", "--timeout", "0.1", ok=False)
    assert late.exit_code == 2
    assert json.loads(late.stdout) == {"jobs": {"ok": "completed", "later": "pending"}, "timed_out": True}
    cli("cancel", "later")
    assert json.loads(cli("wait", "--all", "--json").stdout) == {"jobs": {}, "timed_out": False}


def test_wait_group_waits_for_that_group_only(cli, queue):
    cli("add", "--id", "b1", "--group", "backups", "true")
    cli("add", "--id", "d1", "true")  # another group's job: never run here
    queue.finish(queue.claim(W), Outcome(0, None, ""), W)  # b1, the first in line
    assert state_of(queue, "b1") == "completed" and state_of(queue, "d1") == "pending"
    done = cli("wait", "--group", "backups", "--json", "--timeout", "5")
    assert done.exit_code == 0 and json.loads(done.stdout) == {"jobs": {}, "timed_out": False}
    cli("add", "--id", "b2", "--group", "backups", "true")
    late = cli("wait", "-g", "backups", "--json", "--timeout", "0.1", ok=False)
    assert late.exit_code == 2
    assert json.loads(late.stdout) == {"jobs": {"b2": "pending"}, "timed_out": True}
    both = cli("wait", "--group", "backups", "b2", ok=False)
    assert both.exit_code == 1 and both.stderr.strip() == "error: give job ids or --group, not both"


def run_with_tty_stderr(args, home, input_text=None):
    """Run the real command with stderr on a pseudo-terminal (what a user at a shell sees)."""
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, QUEUECTL_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "queuectl.cli", *args], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=60), out, b"".join(chunks).decode(errors="replace")


def test_bulk_enqueue_progress_bar_only_on_a_tty(cli, home, tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text('{"command": "true"}\n' * 3000)
    quiet = cli("enqueue", "--file", str(path))
    # stderr is not a terminal: no bar, only the note that no worker runs
    assert quiet.stderr.startswith("note: no workers") and quiet.stderr.count("\n") == 1
    assert quiet.stdout.startswith("Enqueued 3000 jobs")
    code, out, err = run_with_tty_stderr(["enqueue", "--file", str(path)], home)
    assert code == 0 and out.startswith("Enqueued 3000 jobs")
    assert "100%" in err, err


def test_wait_shows_progress_on_a_tty(cli, home):
    cli("add", "--id", "w1", "--delay", "1h", "true")
    code, out, err = run_with_tty_stderr(["wait", "w1", "--timeout", "0.2"], home)
    assert code == 2 and "0/1 finished" in err and "timed out" in err
    assert out == ""


def test_shell_completion(home):
    env = dict(os.environ, QUEUECTL_HOME=str(home), _QUEUECTL_COMPLETE="bash_source")
    source = subprocess.run([sys.executable, "-m", "queuectl.cli"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert source.returncode == 0 and "_queuectl_completion" in source.stdout
    env.update(_QUEUECTL_COMPLETE="bash_complete", COMP_WORDS="queuectl wo", COMP_CWORD="1")
    words = subprocess.run([sys.executable, "-m", "queuectl.cli"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert "plain,worker" in words.stdout.splitlines()


def test_logs_follow_continues_through_retries(cli, queue, workers, home, tmp_path):
    go, wait_for_go = gate(tmp_path)
    cli("config", "set", "backoff_base", "1")  # 1 s in 'failed' between the attempts
    cli("add", "--id", "flaky", f"echo try-$QUEUECTL_ATTEMPT; {wait_for_go}; [ $QUEUECTL_ATTEMPT -ge 2 ]")
    workers.start(1)
    wait_until(lambda: state_of(queue, "flaky") == "processing", message="attempt 1 running")
    with spawn_queuectl("logs", "flaky", "-f", home=home, stdout=subprocess.PIPE) as follower:
        for line in follower.stdout:
            if "try-1" in line:
                break
        go.touch()
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err
        assert "attempt 2" in out and "try-2" in out, out
        assert state_of(queue, "flaky") == "completed"


def test_cancel_running_job_whose_worker_died(cli, queue, workers, tmp_path):
    """Nobody is left to kill it: cancel itself kills the orphaned job and finishes at once."""
    child = tmp_path / "child.pid"
    cli("add", "--id", "orphan", f"sleep 60 & echo $! > {child}; wait")
    worker = workers.start(1)[0]
    pid = read_pid(child)
    wait_until(lambda: queue.get("orphan")["job_pid"], message="job pid recorded by a heartbeat")
    os.kill(worker, 9)
    wait_until(lambda: not pid_alive(worker), message="worker gone")
    started = time.monotonic()
    result = cli("cancel", "orphan", "--wait", "20")
    assert result.stdout == "Job orphan cancelled\n"
    assert time.monotonic() - started < 10
    job = queue.get("orphan")
    assert job["state"] == "cancelled" and "worker died" in job["last_error"]
    wait_until(lambda: not pid_alive(pid), message="the orphaned job is killed")
