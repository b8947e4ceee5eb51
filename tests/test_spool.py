"""Spools: runs' logs start as links to their worker slot's spool file (queuectl/spool.py),
and every reader keeps only its job's part of a log (queuectl/joblog.py)."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path
import pytest

from helpers import job_state, show_json, spawn_queuectl, wait_until
from queuectl import joblog, spool, worker_launcher
from queuectl.executor import Outcome, pid_alive
from queuectl.jobspec import parse_job

W = "host:1:1"


def section(job_id: str, attempt: int = 1, output: bytes = b"", error=None, worker: str = W) -> bytes:
    return (joblog.header(job_id, attempt, worker, "cmd") + output
            + joblog.result_line(job_id, attempt, error))


# -- Spool: links, leases, rotation ----------------------------------------------------------
def test_runs_share_a_spool_until_one_must_keep_its_log(tmp_path):
    logs = tmp_path / "jobs"
    logs.mkdir()
    spools = spool.Spools(tmp_path / "spool", W)
    one = spools.take()
    assert one.attach(str(logs / "a.log"), "j") and one.attach(str(logs / "b.log"), "j")
    assert os.path.samefile(logs / "a.log", logs / "b.log")  # one inode, two names
    assert not one.keeps(silent=True)  # nobody writes to it: a's link may go
    assert one.keeps(silent=False)  # b printed: kept, and the spool retired
    assert not os.path.exists(one.path)
    assert one.attach(str(logs / "c.log"), "j")
    assert not os.path.samefile(logs / "b.log", logs / "c.log")  # nothing is written after b


def test_a_process_still_writing_keeps_the_log(tmp_path):
    sp = spool.Spool(str(tmp_path / "s"))
    log = tmp_path / "a.log"
    assert sp.attach(str(log), "j")
    writer = os.open(log, os.O_WRONLY | os.O_APPEND)  # a daemon the job left behind, say
    try:
        assert sp.keeps(silent=True)
    finally:
        os.close(writer)
    assert log.exists() and not os.path.exists(sp.path)


def test_a_job_with_a_log_already_appends_to_it(tmp_path):
    sp = spool.Spool(str(tmp_path / "s"))
    log = tmp_path / "a.log"
    log.write_bytes(b"attempt 1\n")
    assert not sp.attach(str(log), "j")
    assert log.read_bytes() == b"attempt 1\n" and sp.runs == 0


def test_an_earlier_attempts_log_still_shared_with_a_spool_is_made_private_first(tmp_path):
    """Its result was not recorded (a lapsed claim) and its worker went on running other
    jobs on that spool: the rerun elsewhere must append after the job's own part."""
    old_spool = tmp_path / "other-worker.0"
    old_spool.write_bytes(section("a", 1) + section("b"))
    log = tmp_path / "a.log"
    os.link(old_spool, log)
    assert not spool.Spool(str(tmp_path / "s")).attach(str(log), "a")
    assert log.read_bytes() == section("a", 1) and os.stat(log).st_nlink == 1
    assert old_spool.read_bytes() == section("a", 1) + section("b")  # the other worker's, as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log", "other-worker.0", "s"]


def test_a_spool_is_started_afresh_every_rotate_jobs_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "ROTATE_JOBS", 3)
    sp = spool.Spool(str(tmp_path / "s"))
    names = [tmp_path / f"{i}.log" for i in range(4)]
    assert all(sp.attach(str(n), "j") for n in names)
    assert os.path.samefile(names[0], names[2]) and not os.path.samefile(names[2], names[3])


def test_without_hard_links_every_run_gets_a_file_of_its_own(tmp_path, mocker):
    sp = spool.Spool(str(tmp_path / "s"))
    mocker.patch("os.link", side_effect=PermissionError(1, "Operation not permitted"))
    assert not sp.attach(str(tmp_path / "a.log"), "j") and not sp.usable
    assert not sp.attach(str(tmp_path / "b.log"), "j")


def test_sweep_removes_dead_workers_spools_only(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir()
    for name in ("h:1:1.0", "h:1:1.1", "h.example:2:2.0"):
        (directory / name).write_bytes(b"")
    kept_log = tmp_path / "kept.log"
    os.link(directory / "h:1:1.0", kept_log)
    assert spool.sweep(directory, lambda worker_id: worker_id == "h.example:2:2") == 2
    assert sorted(os.listdir(directory)) == ["h.example:2:2.0"]
    assert kept_log.exists()  # a run's log outlives its spool's name


def test_a_host_name_with_a_slash_still_names_a_file_in_the_spool_directory(tmp_path):
    spools = spool.Spools(tmp_path / "spool", "a/b:1:1")
    assert os.path.dirname(spools.take().path) == str(tmp_path / "spool")


# -- readers: a job's own part of a shared log -------------------------------------------------
def test_own_span_skips_other_jobs_sections_before_and_after():
    data = section("x") + section("a", output=b"out\n") + section("a", 2) + section("y") + section("z")
    start, end = joblog.own_span(data, "a")
    assert data[start:end] == section("a", output=b"out\n") + section("a", 2)
    assert joblog.own_span(data, "b") == (len(data), len(data))  # only other jobs: none of it
    assert joblog.own_span(b"no headers here\n", "a") == (0, 16)  # a window inside one's output
    # A job's own output that looks like another job's header is output while it runs.
    trick = section("a", output=joblog.header("y", 1, W, "cmd"))
    assert joblog.own_span(trick, "a") == (0, len(trick))


def test_own_start_reads_blocks_across_a_boundary(monkeypatch):
    monkeypatch.setattr(joblog, "SCAN_BLOCK", 7)
    data = section("x") * 5 + section("a", output=b"mine\n")
    assert joblog.own_start(io.BytesIO(data), "a") == len(section("x") * 5)
    assert joblog.own_start(io.BytesIO(section("x")), "a") == len(section("x"))
    assert joblog.own_start(io.BytesIO(b"plain\n"), "a") == 0


def test_logs_tail_of_a_large_log_stops_at_its_job(tmp_path, monkeypatch):
    monkeypatch.setattr(joblog, "WHOLE_BYTES", 10)
    log = tmp_path / "a.log"
    log.write_bytes(section("x") + section("a", output=b"one\ntwo\n"))
    text, offset = joblog.read_last_lines(log, 100, block=16, job_id="a")
    assert text == section("a", output=b"one\ntwo\n")
    assert offset == len(section("x"))
    assert joblog.read_last_lines(log, 2, job_id="a")[0].startswith(b"two\n")


def test_attempt_status_matches_the_job_in_a_spool(tmp_path):
    log = tmp_path / "a.log"
    log.write_bytes(section("x", error="exit code 3") + joblog.header("a", 1, W, "cmd"))
    assert joblog.attempt_status(log, 1, W, "a") == (True, None)  # a's run has no result yet
    assert joblog.attempt_status(log, 1, W, "x") == (True, "exit code 3")
    assert joblog.attempt_status(log, 1, W, "b") == (False, None)


def test_attempts_and_read_attempt_count_only_the_jobs_own_sections(tmp_path):
    log = tmp_path / "a.log"
    log.write_bytes(section("x") + section("a", error="exit code 1") + section("a", 2, b"ok\n")
                    + section("y"))
    assert [n for n, _ in joblog.attempts(log, "a")] == [1, 2]
    assert joblog.read_attempt(log, 2, "a") == section("a", 2, b"ok\n")
    assert joblog.read_attempt(log, None, "a") == section("a", error="exit code 1") + section("a", 2, b"ok\n")


def test_own_stream_passes_partial_lines_and_ends_at_the_next_job():
    stream = joblog.OwnStream("a")
    out = stream.feed(section("a")[:20])
    out += stream.feed(section("a")[20:] + b"prog")  # after its result: held until whole
    assert out == section("a")
    assert stream.feed(b"ress\n") == b"progress\n"  # a stray writer's line, once complete
    assert stream.feed(section("b") + section("a", 2)) == b""  # another job: the end
    assert stream.flush() == b""
    live = joblog.OwnStream("a")
    assert live.feed(joblog.header("a", 1, W, "cmd") + b"half a li").endswith(b"half a li")
    assert live.feed(b"ne\n") == b"ne\n"  # while running, output passes as it comes


def test_own_stream_passes_a_stray_writers_long_line_whole():
    stream = joblog.OwnStream("a")
    long_line = b"x" * (3 * joblog.OwnStream.LINE_MAX) + b"\n"
    out = stream.feed(section("a") + long_line[:5000])
    out += stream.feed(long_line[5000:] + b"tail")
    assert out + stream.flush() == section("a") + long_line + b"tail"


def test_running_output_reads_from_the_jobs_last_header(tmp_path):
    log = tmp_path / "a.log"
    log.write_bytes(section("x", output=b"not mine\n") + section("a", error="exit code 1")
                    + joblog.header("a", 2, W, "cmd") + b"mine\n")
    assert joblog.running_output(log, "a") == "$ cmd\nmine\n"


# -- real workers ----------------------------------------------------------------------------
def finished(home: Path, *ids: str) -> bool:
    return all(job_state(home, i) in ("completed", "dead", "failed") for i in ids)


@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_silent_runs_keep_no_file_and_logs_still_shows_them(cli, home, workers, concurrency):
    cli("add", "--id", "s1", "true")
    cli("add", "--id", "loud", "echo hello; echo oops >&2")
    cli("add", "--id", "s2", "true")
    cli("add", "--id", "bad", "exit 3", "--max-retries", "0")
    workers.start(1, "--concurrency", concurrency)
    wait_until(lambda: finished(home, "s1", "loud", "s2", "bad"), timeout=30, message="all ran")
    jobs = home / "logs" / "jobs"
    wait_until(lambda: not (jobs / "s1.log").exists() and not (jobs / "s2.log").exists(),
               message="silent runs' links removed once recorded")
    for job_id in ("s1", "s2"):
        out = cli("logs", job_id).stdout
        assert out.startswith(f"=== queuectl job {job_id} attempt 1 started ")
        assert out.endswith(f"$ true\n--- queuectl job {job_id} attempt 1 finished: exit 0 ---\n")
        assert cli("logs", job_id, "--tail", "1").stdout == \
            f"--- queuectl job {job_id} attempt 1 finished: exit 0 ---\n"
        assert cli("logs", job_id, "--attempt", "1").stdout == out
        assert cli("logs", job_id, "--follow").stdout == out
        assert show_json(cli, job_id)["log_file"] is None
        assert "none: the run printed nothing" in cli("show", job_id).stdout
    wrong = cli("logs", "s1", "--attempt", "2", ok=False)
    assert wrong.exit_code != 0 and "no logged attempt 2" in wrong.stderr
    loud = cli("logs", "loud").stdout
    assert loud.startswith("=== queuectl job loud attempt 1 started ")  # nothing of s1's
    assert "hello\n" in loud and "oops\n" in loud and "queuectl job s" not in loud
    assert cli("logs", "loud", "--tail", "2").stdout.startswith("oops\n")
    bad = cli("logs", "bad").stdout
    assert bad.startswith("=== queuectl job bad ") and "finished: exit code 3" in bad
    assert "queuectl job s" not in bad and (jobs / "bad.log").exists()
    assert show_json(cli, "loud")["log_file"] == str(jobs / "loud.log")
    workers.stop("--wait", "30")
    wait_until(lambda: not workers.alive(), message="worker stopped")
    assert os.listdir(home / "logs" / "spool") == []  # a stopped worker leaves no spool names


def test_a_run_that_leaves_a_writer_behind_keeps_its_log(cli, home, workers):
    flag = home.parent / "go"
    cli("add", "--id", "bg", f"(while [ ! -e {flag} ]; do sleep 0.05; done; echo late) &")
    cli("add", "--id", "next", "true")
    workers.start(1)
    wait_until(lambda: finished(home, "bg", "next"), timeout=30, message="both ran")
    flag.touch()
    log = home / "logs" / "jobs" / "bg.log"
    wait_until(lambda: log.exists() and b"late\n" in log.read_bytes(), message="the late line")
    assert "late\n" in cli("logs", "bg").stdout
    assert "queuectl job next" not in cli("logs", "bg").stdout  # no later run wrote after it


def test_follow_of_a_pending_job_that_runs_silently_prints_its_header_and_result(cli, home, workers):
    cli("add", "--id", "f1", "true")
    with spawn_queuectl("logs", "--follow", "f1", home=home, stdout=subprocess.PIPE) as proc:
        workers.start(1)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.startswith("=== queuectl job f1 attempt 1 started ")
    assert out.endswith("--- queuectl job f1 attempt 1 finished: exit 0 ---\n")


def test_follow_of_a_running_job_stops_at_its_own_end(cli, home, workers):
    flag = home.parent / "go"
    cli("add", "--id", "slow", f"echo begun; while [ ! -e {flag} ]; do sleep 0.05; done; echo done")
    for i in range(5):
        cli("add", "--id", f"after{i}", "true")
    workers.start(1)
    wait_until(lambda: job_state(home, "slow") == "processing", message="slow runs")
    with spawn_queuectl("logs", "--follow", "slow", home=home, stdout=subprocess.PIPE) as proc:
        flag.touch()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "begun\n" in out and out.endswith("done\n--- queuectl job slow attempt 1 finished: exit 0 ---\n")
    assert "after" not in out


def test_a_killed_workers_runs_are_recovered_from_their_spool_links(cli, home, workers):
    cli("config", "set", "backoff_base", "0")
    for i in range(3):
        cli("add", "--id", f"s{i}", "true")
    flag = home.parent / "once"
    # The first attempt hangs; the retry (after recovery) finds the flag and exits at once.
    cli("add", "--id", "hang", f"if [ -e {flag} ]; then true; else touch {flag}; sleep 60; fi")
    pid = workers.start(1)[0]
    wait_until(lambda: flag.exists(), timeout=30, message="hang's first attempt runs")
    spools = home / "logs" / "spool"
    assert os.listdir(spools)  # its log is a link to the worker's spool
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), message="worker dead")
    workers.start(1)
    wait_until(lambda: job_state(home, "hang") == "completed", timeout=60, message="hang rerun")
    out = cli("logs", "hang").stdout
    assert out.startswith("=== queuectl job hang attempt 1 started ")
    assert "attempt 1 interrupted: worker died" in out
    assert out.endswith("--- queuectl job hang attempt 2 finished: exit 0 ---\n")
    assert "queuectl job s" not in out
    assert all(job_state(home, f"s{i}") == "completed" for i in range(3))
    assert not any(name.startswith(f"{worker_launcher.host_name()}:{pid}:") for name in os.listdir(spools)), \
        "the dead worker's spool names were swept"


def test_follow_ends_while_other_runs_still_append_to_the_spool(cli, queue, paths, monkeypatch):
    """A silent run's link is the spool until it is removed: `logs --follow` opened on it
    must end at its job's end, however busy the spool stays (here: another run's section
    arrives before every read)."""
    from queuectl import cli as cli_module

    queue.enqueue([parse_job({"id": "a", "command": "true"}, now=time.time(), default_cwd="/")])
    queue.finish(queue.claim(W), Outcome(0, None), W)
    log = paths.job_log("a")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(section("a"))

    class BusySpool(io.BytesIO):
        reads = 0

        def read(self, *args):
            BusySpool.reads += 1
            assert BusySpool.reads < 100, "--follow kept reading a spool other runs append to"
            where = self.tell()
            self.seek(0, io.SEEK_END)
            self.write(section(f"b{BusySpool.reads}"))
            self.seek(where)
            return super().read(*args)

    monkeypatch.setattr(cli_module, "open", lambda *_args: BusySpool(log.read_bytes()), raising=False)
    assert cli("logs", "--follow", "a").stdout == section("a").decode()
