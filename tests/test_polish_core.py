"""The model/storage side of the "Polish" issue: what a job sees (captured environment),
permissions, orphans, worker scale, monotonic attempts, reviving cascades, --if-exists
replace, config durations, streaming bulk enqueue, reclaiming space after purge."""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import dump_db, make_dead, run_queuectl, show_json, wait_until

from queuectl.executor import Outcome
from queuectl.paths import Paths

W = "host:1:1"


job, run_dead = show_json, make_dead


def log_of(home: Path, job_id: str) -> str:
    return Paths(home).job_log(job_id).read_text()


# -- 1. what a job sees ------------------------------------------------------------------------
def test_a_job_runs_with_the_environment_of_its_enqueuer(home, workers, tmp_path):
    env = dict(os.environ, QUEUECTL_HOME=str(home), TARGET="/mnt/nas")
    add = [sys.executable, "-m", "queuectl.cli", "add"]
    subprocess.run([*add, "--id", "t", 'echo "T=$TARGET"'], env=env, check=True, capture_output=True)
    subprocess.run([*add, "--id", "x", "--env", "TARGET=over", "--env", "B=2", 'echo "T=$TARGET B=$B"'],
                   env=env, check=True, capture_output=True)
    subprocess.run([*add, "--id", "ids", "--cwd", str(tmp_path), "--",
                    "sh", "-c", 'echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $QUEUECTL_HOME $(pwd)"; '
                    "cat; echo stdin=$?"], env=env, check=True, capture_output=True)
    workers.start(1)  # the worker's own environment has no TARGET
    assert run_queuectl("wait", "t", "x", "ids", home=home).returncode == 0
    assert "T=/mnt/nas\n" in log_of(home, "t")
    assert "T=over B=2\n" in log_of(home, "x")
    assert f"ids 1 {home} {tmp_path}\nstdin=0\n" in log_of(home, "ids")


@pytest.mark.sqlite_only  # counts rows with SQL; the store methods are the same on both
def test_each_distinct_environment_is_stored_once(cli, home, monkeypatch):
    monkeypatch.setenv("TARGET", "a")
    cli("enqueue", "--file", "-", input="".join('{"command": "true"}\n' for _ in range(500)))
    cli("add", "true")
    cli("add", "--env", "K=1", "true")
    cli("add", "--env", "K=1", "true")
    monkeypatch.setenv("QUEUECTL_JOB_ID", "from-the-enqueuer")  # never captured
    cli("add", "true")
    conn = sqlite3.connect(Paths(home).db)
    try:
        assert conn.execute("SELECT count(*) FROM envs").fetchone()[0] == 2
        assert conn.execute("SELECT count(DISTINCT env_id) FROM jobs").fetchone()[0] == 2
        stored = [json.loads(v) for (v,) in conn.execute("SELECT vars FROM envs")]
    finally:
        conn.close()
    assert all(e["TARGET"] == "a" and "QUEUECTL_JOB_ID" not in e and "QUEUECTL_HOME" not in e
               for e in stored)


def test_capture_env_false_runs_jobs_with_the_workers_environment(cli, home, workers, monkeypatch):
    cli("config", "set", "capture_env", "false")
    monkeypatch.setenv("TARGET", "enqueuer")
    cli("add", "--id", "plain", 'echo "T=$TARGET"')
    cli("add", "--id", "explicit", "--env", "B=2", 'echo "T=$TARGET B=$B P=${PATH:+set}"')
    monkeypatch.delenv("TARGET")
    workers.start(1)
    assert run_queuectl("wait", "plain", "explicit", home=home).returncode == 0
    assert "T=\n" in log_of(home, "plain")
    assert "T= B=2 P=set\n" in log_of(home, "explicit")  # over the worker's env: PATH stays


@pytest.mark.parametrize("args,message", [
    (["--env", "NOEQUALS"], "NAME=VALUE"),
    (["--env", "=v"], "invalid environment variable name"),
    (["--env", "QUEUECTL_JOB_ID=7"], "set by the worker"),
])
def test_bad_env_is_one_line_and_changes_nothing(cli, home, args, message):
    cli("init-db")
    before = dump_db(home)
    result = cli("add", *args, "true", ok=False)
    assert result.exit_code == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert dump_db(home) == before


@pytest.mark.parametrize("env", ['{"A": 1}', '{"A=B": "x"}', '["A"]', '{"A": "x\\u0000y"}'])
def test_bad_json_env_is_refused(cli, home, env):
    cli("init-db")
    before = dump_db(home)
    result = cli("enqueue", f'{{"command": "true", "env": {env}}}', ok=False)
    assert result.exit_code == 1 and "env" in result.stderr.lower()
    assert dump_db(home) == before


def test_json_env_is_merged_over_the_captured_one(cli, queue, monkeypatch):
    monkeypatch.setenv("KEEP", "k")
    cli("enqueue", '{"id": "j", "command": "true", "env": {"A": "1"}}')
    stored, inherit = queue.environment(queue.get("j")["env_id"])
    assert stored["A"] == "1" and stored["KEEP"] == "k" and not inherit


# -- 5. attempt numbers never restart -----------------------------------------------------------
def test_attempts_go_on_after_dlq_retry_and_the_budget_resets(cli, queue):
    cli("add", "--id", "d", "--max-retries", "1", "false")
    run_dead(queue, "d")
    assert queue.get("d")["attempts"] == 2
    cli("dlq", "retry", "d")
    claimed = queue.claim(W)
    assert claimed["attempts"] == 3  # the next number, not 1
    assert queue.finish(claimed, Outcome(1, "exit code 1"), W)[0] == "failed"  # budget is fresh
    claimed = queue.claim(W)
    assert claimed["attempts"] == 4
    assert queue.finish(claimed, Outcome(1, "exit code 1"), W)[0] == "dead"
    assert [r["attempt"] for r in job(cli, "d")["runs"]] == [1, 2, 3, 4]


def test_logs_attempt_names_one_run_after_dlq_retry(cli, home, workers, queue):
    cli("config", "set", "backoff_base", "0")
    cli("add", "--id", "d", "--max-retries", "0", 'echo "run $QUEUECTL_ATTEMPT"; exit 1')
    workers.start(1)
    assert run_queuectl("wait", "d", home=home).returncode == 1
    cli("dlq", "retry", "d")
    wait_until(lambda: queue.get("d")["state"] == "dead", message="d dead again")
    text = log_of(home, "d")
    assert text.count("attempt 1 started") == 1 and text.count("attempt 2 started") == 1
    assert "run 2" in cli("logs", "d", "--attempt", "2").stdout
    assert "run 1" not in cli("logs", "d", "--attempt", "2").stdout


# -- 6. dlq retry revives the cascade -----------------------------------------------------------
def test_dlq_retry_revives_the_jobs_cancelled_because_it_died(cli, queue):
    cli("add", "--id", "a", "--max-retries", "0", "false")
    cli("add", "--id", "b", "--after", "a", "true")
    cli("add", "--id", "c", "--after", "b", "true")
    cli("add", "--id", "other", "true")
    cli("add", "--id", "d", "--after", "c,other", "true")
    cli("cancel", "other")  # d is cancelled now, because of 'other': a's retry cannot revive it
    run_dead(queue, "a")
    assert [queue.get(j)["state"] for j in "bcd"] == ["cancelled"] * 3
    assert queue.get("b")["last_error"] == "dependency 'a' is dead"
    result = cli("dlq", "retry", "a")
    assert "2 dependent job(s)" in result.stdout
    assert queue.get("b")["state"] == "pending" and queue.get("b")["deps_left"] == 1
    assert queue.get("c")["state"] == "pending" and queue.get("c")["deps_left"] == 1
    assert queue.get("d")["state"] == "cancelled"  # still waits for the cancelled 'other'


def test_a_pipeline_failed_half_way_resumes_with_one_command(cli, queue):
    cli("add", "--id", "s1", "true")
    cli("add", "--id", "s2", "--after", "s1", "--max-retries", "0", "false")
    cli("add", "--id", "s3", "--after", "s1,s2", "true")
    claimed = queue.claim(W)
    queue.finish(claimed, Outcome(0, None), W)  # s1 completed
    run_dead(queue, "s2")
    assert queue.get("s3")["state"] == "cancelled"
    cli("dlq", "retry", "s2")
    s3 = queue.get("s3")
    assert s3["state"] == "pending" and s3["deps_left"] == 1 and s3["last_error"] is None
    queue.finish(queue.claim(W), Outcome(0, None), W)  # s2 completes now
    assert queue.get("s3")["deps_left"] == 0
    assert queue.claim(W)["id"] == "s3"


# -- 7. reusing a fixed id ---------------------------------------------------------------------
def test_if_exists_skip_with_an_active_id(cli):
    cli("add", "--id", "nightly", "sleep 1")
    result = cli("add", "--id", "nightly", "--if-exists", "skip", "true")
    assert "Existing job nightly" in result.stdout
    assert job(cli, "nightly")["command"] == "sleep 1"
    assert cli("enqueue", "--if-exists", "skip", '{"id": "nightly", "command": "x"}').exit_code == 0


def test_if_exists_replace_requeues_a_finished_job_keeping_history(cli, queue):
    cli("add", "--id", "nightly", "./backup.sh")
    queue.finish(queue.claim(W), Outcome(0, None), W)
    result = cli("add", "--id", "nightly", "--if-exists", "replace", "--priority", "5", "./backup2.sh")
    assert "Requeued job nightly" in result.stdout
    info = job(cli, "nightly")
    assert (info["state"], info["command"], info["priority"], info["attempts"]) == \
        ("pending", "./backup2.sh", 5, 1)
    assert [r["attempt"] for r in info["runs"]] == [1]  # the completed run is kept
    claimed = queue.claim(W)
    assert claimed["attempts"] == 2 and claimed["command"] == "./backup2.sh"
    conflict = cli("add", "--id", "nightly", "--if-exists", "replace", "true", ok=False)
    assert conflict.exit_code == 1 and "processing" in conflict.stderr
    assert "Traceback" not in conflict.stderr


def test_if_exists_replace_of_an_active_job_is_a_conflict_and_changes_nothing(cli, home):
    cli("add", "--id", "x", "true")
    before = dump_db(home)
    result = cli("enqueue", "--if-exists", "replace", '{"id": "x", "command": "false"}', ok=False)
    assert result.exit_code == 1 and "pending" in result.stderr
    assert dump_db(home) == before
    assert cli("add", "--id", "new", "--if-exists", "replace", "true").stdout == "Enqueued job new\n"


# -- 8. config accepts what add accepts ---------------------------------------------------------
def test_config_takes_durations_and_refuses_zero_timeouts(cli, home):
    assert cli("config", "set", "job_timeout", "5m").stdout == "job_timeout = 300.0\n"
    assert cli("config", "set", "lease_seconds", "1m").stdout == "lease_seconds = 60.0\n"
    before = dump_db(home)
    for key, value in (("job_timeout", "0"), ("backoff_base", "0.5")):
        result = cli("config", "set", key, value, ok=False)
        assert result.exit_code == 1 and key in result.stderr
    assert dump_db(home) == before
    assert cli("add", "--timeout", "0", "true", ok=False).exit_code == 1
    result = cli("worker", "start", "--backoff-base", "0.5", ok=False)
    assert result.exit_code == 1 and "backoff" in result.stderr


def test_config_list_marks_only_unstored_keys_as_default(cli):
    cli("config", "set", "max_retries", "3")  # equal to the default, but stored
    lines = cli("config", "list").stdout.splitlines()
    assert "max_retries = 3" in lines
    assert "backoff_base = 2.0  (default)" in lines
    assert "capture_env = true  (default)" in lines


def test_config_set_applies_to_a_running_worker_at_once(cli, home, workers, queue):
    workers.start(1)
    cli("add", "--id", "warm", "true")  # the worker has read its settings
    wait_until(lambda: queue.get("warm")["state"] == "completed", message="warm-up job")
    cli("config", "set", "max_retries", "0")
    cli("add", "--id", "f", "exit 1")
    wait_until(lambda: queue.get("f")["state"] in ("dead", "failed"), message="f ran")
    assert queue.get("f")["state"] == "dead" and queue.get("f")["attempts"] == 1


# -- 9. bulk enqueue streams ---------------------------------------------------------------------
def _peak_rss_kb(home: Path, jobs_file: Path) -> int:
    """ru_maxrss of one `queuectl enqueue --file` run in a fresh parent (RUSAGE_CHILDREN is
    the largest child that parent waited for, i.e. this one)."""
    code = ("import os, resource, subprocess, sys\n"
            f"r = subprocess.run([sys.executable, '-m', 'queuectl.cli', 'enqueue', '-q', '--file', {str(jobs_file)!r}],"
            f" env=dict(os.environ, QUEUECTL_HOME={str(home)!r}), stdout=subprocess.DEVNULL)\n"
            "assert r.returncode == 0\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True).stdout)


def test_bulk_enqueue_memory_does_not_grow_with_the_file(tmp_path):
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    line = '{"command": "echo a fairly ordinary command line of some length"}\n'
    small.write_text(line * 50_000)
    big.write_text(line * 200_000)
    rss_small = _peak_rss_kb(tmp_path / "h1", small)
    rss_big = _peak_rss_kb(tmp_path / "h2", big)
    # Before streaming, 150k more lines cost ~150 MB (a list of dicts, then of tuples).
    assert rss_big - rss_small < 15_000, (rss_small, rss_big)


def test_streamed_bulk_enqueue_is_still_all_or_nothing_and_names_the_line(cli, home, backend):
    cli("init-db")
    before = dump_db(home)
    text = '{"command": "true"}\n' * 25_000 + '{"command": "true", "priority": "x"}\n'
    result = cli("enqueue", "--file", "-", input=text, ok=False)
    assert result.exit_code == 1 and "line 25001: " in result.stderr
    text = '{"command": "true"}\n' * 15_000 + '{"id": "dup", "command": "a"}\n' * 2
    result = cli("enqueue", "--file", "-", input=text, ok=False)
    assert result.exit_code == 1 and "line 15002: " in result.stderr and "dup" in result.stderr
    assert dump_db(home) == before
    out = cli("enqueue", "--json", "--file", "-", input='{"command": "true"}\n' * 12_000).stdout
    data = json.loads(out)
    # Ids are unique and increasing, not gapless: a PostgreSQL sequence is not rolled back
    # with the failed enqueues above (SQLite's max+1 is).
    first = 1 if backend == "sqlite" else int(data["ids"][0])
    assert data["created"] == 12_000 and data["ids"][0] == str(first)
    assert data["ids"][-1] == str(first + 11_999)
    assert data["skipped"] == []


# -- 10. purging reclaims disk space ------------------------------------------------------------
@pytest.mark.sqlite_only  # a file that shrinks; PostgreSQL's autovacuum reuses the space
def test_purge_of_most_jobs_shrinks_the_database_file(cli, home, queue):
    filler = "echo " + "x" * 2000
    cli("enqueue", "--file", "-", input="".join(json.dumps({"command": filler}) + "\n"
                                                 for _ in range(3000)))
    cli("add", "--id", "keep", "true")
    queue.cancel([str(i) for i in range(1, 3001)])
    db = Paths(home).db
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = db.stat().st_size
    assert before > 6_000_000
    assert "Purged 3000 job(s)" in cli("purge", "--state", "cancelled").stdout
    after = db.stat().st_size
    assert after < before / 4, (before, after)
    assert queue.get("keep")["state"] == "pending"
    assert cli("add", "true").stdout == "Enqueued job 3002\n"  # purged numbers are never reused


# -- 2. permissions ---------------------------------------------------------------------------------
@pytest.mark.sqlite_only  # the database files and FIFOs are SQLite's; logs are the same on both
@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_everything_queuectl_creates_is_private_whatever_the_umask(home, workers, umask):
    old = os.umask(umask)
    try:
        assert run_queuectl("add", "--id", "s", "echo secret", home=home).returncode == 0
        pids = workers.start(1)
        assert run_queuectl("wait", "s", home=home).returncode == 0
        paths = Paths(home)
        wait_until(lambda: (paths.workers_dir / f"{pids[0]}.fifo").exists(), message="the FIFO")
        files = [paths.db, Path(f"{paths.db}-wal"), Path(f"{paths.db}-shm"), paths.job_log("s"),
                 paths.worker_log(pids[0]), paths.workers_dir / f"{pids[0]}.json",
                 paths.workers_dir / f"{pids[0]}.fifo"]
        modes = {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
        assert set(modes.values()) == {"0o600"}, modes
        for directory in (home, paths.workers_dir, paths.logs_dir, paths.job_logs_dir):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    finally:
        os.umask(old)


# -- 3. orphans visible --------------------------------------------------------------------------
def test_a_job_whose_worker_died_is_shown_as_orphaned_then_recovered(cli, home, workers, queue, tmp_path):
    cli("config", "set", "lease_seconds", "2")
    started = tmp_path / "started"
    cli("add", "--id", "o", f"touch {started}; sleep 60")
    pid = workers.start(1)[0]
    wait_until(started.exists, message="the job to start")
    assert json.loads(cli("show", "o", "--json").stdout)["worker_alive"] is True
    assert json.loads(cli("status", "--json").stdout)["orphaned"] == 0
    wait_until(lambda: queue.get("o")["job_pid"], message="the first heartbeat")
    beat = queue.get("o")["lease_until"] - 2
    os.kill(pid, 9)
    wait_until(lambda: not workers.alive(), message="the worker to die")
    info = json.loads(cli("show", "o", "--json").stdout)
    assert info["state"] == "processing" and info["worker_alive"] is False
    assert json.loads(cli("status", "--json").stdout)["orphaned"] == 1
    assert "worker gone" in cli("show", "o").stdout and "worker gone" in cli("status").stdout
    cli("config", "set", "max_retries", "0")
    cli("cancel", "o")  # recovers it now (its worker is gone), as any worker would
    wait_until(lambda: queue.get("o")["state"] == "cancelled", message="recovery")
    run = job(cli, "o")["runs"][-1]
    assert abs(run["finished_at"] - beat) < 0.5, (run, beat)  # its last heartbeat, not now
    assert log_of(home, "o").endswith("--- queuectl job o attempt 1 interrupted: worker died ---\n")
    assert json.loads(cli("show", "o", "--json").stdout)["worker_alive"] is None


# -- 4. worker start / scale / stopping --------------------------------------------------------
def test_worker_scale_and_stopping(cli, home, workers, queue, tmp_path):
    workers.start(1)
    result = run_queuectl("worker", "start", "--count", "1", home=home)
    workers.pids.extend(int(p) for p in result.stdout.split("PIDs:")[1].split()[0].split(","))
    assert "1 worker(s) already running; starting 1 more (2 in all" in result.stdout
    result = run_queuectl("worker", "scale", "3", home=home)
    assert result.returncode == 0 and "(2 -> 3 running)" in result.stdout
    workers.pids.extend(int(p) for p in result.stdout.split("PIDs:")[1].split("(")[0].replace(",", " ").split())
    wait_until(lambda: len(json.loads(cli("worker", "status", "--json").stdout)) == 3, message="3 workers")
    go = tmp_path / "go"
    cli("add", "--id", "long", f"while [ ! -e {go} ]; do sleep 0.05; done")
    wait_until(lambda: queue.get("long")["state"] == "processing", message="long to start")
    busy = queue.get("long")["worker_id"]
    rows = json.loads(cli("worker", "status", "--json").stdout)
    busy_pid = [r["pid"] for r in rows if r["worker_id"] == busy][0]
    # Scale down to 0: every worker is asked to stop; the busy one finishes its job first.
    result = run_queuectl("worker", "scale", "0", home=home)
    assert "Asked 3 worker(s) to stop" in result.stdout
    wait_until(lambda: [r["pid"] for r in json.loads(cli("worker", "status", "--json").stdout)]
               == [busy_pid], message="the idle workers to exit")
    row = json.loads(cli("worker", "status", "--json").stdout)[0]
    assert row["state"] == "stopping"
    assert "stopping" in cli("worker", "status").stdout
    assert "0 worker(s) running already" in run_queuectl("worker", "scale", "0", home=home).stdout
    go.touch()
    wait_until(lambda: not workers.alive(), message="the busy worker to finish and exit")
    assert queue.get("long")["state"] == "completed"
