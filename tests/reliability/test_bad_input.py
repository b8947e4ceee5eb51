"""Scenario 6: 100+ bad inputs through the real `queuectl` process.

Each case runs in its own copy of a seeded home, in parallel, and must: exit 1 (Click usage
errors: 2), print exactly one line on stderr and nothing on stdout, show no traceback, and
leave the database unchanged — the same SQL dump and the same bytes on disk.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

from helpers import dump_db, wait_until
from relhelpers import jobs

from queuectl.cli import cli as cli_group
from queuectl.paths import Paths

BIG = "9" * 400


def _job(**fields) -> str:
    return json.dumps({"command": "true", **fields})


CASES = [
    # malformed JSON / wrong shape
    *[(["enqueue", text], 1) for text in (
        "", "{", "}", "[", "{'command': 'x'}", "{command: x}", '{"command": "x",}', "nul",
        '{"command": "x"} trailing', "NaN", "true", '"echo hi"', "7", "[]", "[1]", "[[]]", "{}",
        '{"command": "x", "command": 5}')],
    # commands: empty, whitespace, wrong types, NUL
    *[(["enqueue", json.dumps({"command": c})], 1) for c in (
        "", " ", "\n\t ", [], [""], ["  ", "x"], [1], ["ls", None], {}, 5, None, True, "a\u0000b")],
    # wrong types and out-of-range numbers
    *[(["enqueue", _job(**{field: value})], 1) for field, values in (
        ("priority", ["high", 1.5, True, [], 10 ** 12, -10 ** 12, float("inf")]),
        ("max_retries", [-1, "3", 2.5, 10 ** 9, False, {}]),
        ("timeout", [0, -1, "soon", [5], 10 ** 12, True, "-5s"]),
        ("delay", [-1, "later", [], 10 ** 12, "1 fortnight"]),
        ("run_at", ["tomorrow", "2030-02-30T00:00:00Z", -1, 1e20, True, [], "", "   ", "nan"]),
        ("cwd", ["", 5, "/no/such/dir", "/etc/passwd"]),
        ("after", [5, {"a": 1}, ["ghost"], ["../x"], [None]]),
        ("unique_key", ["", 5, "a\nb", "k" * 201]),
        ("state", ["completed", "dead", 5]),
        ("attempts", [2, -1, "0"]),
    ) for value in values],
    # unknown fields
    *[(["enqueue", _job(**{name: 1})], 1) for name in ("cmd", "Command", "retries", "timeout_s", "")],
    # ids: reserved, path-like, control characters, too long, wrong type, duplicates
    *[(["enqueue", _job(id=job_id)], 1) for job_id in (
        "a/b", "../x", "..", "a..b", "/abs", "a\nb", "a\rb", "tab\tid", "", " ", "with space",
        "-leading", "ä", "x" * 10_000, 5, ["x"], "123", "dup")],
    (["enqueue", json.dumps([{"command": "true", "id": "twin"}, {"command": "true", "id": "twin"}])], 1),
    (["enqueue", json.dumps([{"command": "true"}, {"command": ""}])], 1),
    (["enqueue", json.dumps({"command": "true", "id": "me", "after": ["me"]})], 1),
    (["enqueue", _job(after=["dead1"])], 1),
    (["enqueue", _job(run_at=2_000_000_000, delay=5)], 1),
    # batch files and how enqueue is called
    (["enqueue", "--file", "bad-line.jsonl"], 1),
    (["enqueue", "--file", "dup-late.jsonl"], 1),
    (["enqueue", "--file", "not-utf8.jsonl"], 1),
    (["enqueue", "--file", "missing.jsonl"], 1),
    (["enqueue", "--file", "-", "<", '{"command": "a"}\n{"command": "b"'], 1),
    (["enqueue", "--file", "-", "<", ""], 1),
    (["enqueue"], 1),
    (["enqueue", _job(), "--file", "bad-line.jsonl"], 1),
    (["enqueue", "--if-exists", "maybe", _job()], 2),
    (["enqueue", "--bogus", _job()], 2),
    # add
    (["add"], 2),
    (["add", ""], 1),
    (["add", "  "], 1),
    (["add", "x", "--priority", "abc"], 2),
    (["add", "x", "--priority", BIG], 1),
    (["add", "x", "--max-retries", "1.5"], 2),
    (["add", "x", "--max-retries", "-1"], 1),
    (["add", "x", "--timeout", "-1"], 1),
    (["add", "x", "--timeout", "0"], 1),
    (["add", "x", "--delay", "abc"], 1),
    (["add", "x", "--run-at", "nope"], 1),
    (["add", "x", "--id", "../etc"], 1),
    (["add", "x", "--id", ""], 1),
    (["add", "x", "--id", "a\nb"], 1),
    (["add", "x", "--id", "dup"], 1),
    (["add", "x", "--after", "ghost"], 1),
    (["add", "x", "--cwd", "/no/such"], 1),
    (["add", "x", "--unique-key", ""], 1),
    # unknown jobs, bad ids, wrong states
    *[([*verb, job_id], 1) for verb in (["show"], ["logs"], ["cancel"], ["retry"], ["dlq", "retry"],
                                        ["wait"]) for job_id in ("ghost", "../etc")],
    (["show", "x" * 10_000], 1),
    (["dlq", "retry", "dup"], 1),
    (["dlq", "retry", "done"], 1),
    (["dlq", "retry", "dead1", "ghost"], 1),
    (["requeue", "dup"], 1),
    (["retry", "dup"], 1),
    (["retry", "done"], 1),
    (["cancel", "done"], 1),
    (["cancel", "dead1"], 1),
    (["logs", "done", "--attempt", "99"], 1),
    (["dlq", "retry"], 1),
    (["dlq", "retry", "--all", "dead1"], 1),
    (["wait"], 1),
    (["wait", "dup", "--timeout", "soon"], 1),
    (["list", "--state", "bogus"], 2),
    (["list", "--limit", "-1"], 1),
    (["list", "--limit", "many"], 2),
    (["purge", "--state", "pending"], 2),
    (["purge", "--state", "completed", "--older-than", "ages"], 1),
    (["purge"], 2),
    # config keys and values
    *[(["config", verb, *args], 1) for verb, args in (
        ("get", ["nope"]), ("set", ["nope", "1"]), ("unset", ["nope"]), ("set", ["", "1"]),
        ("set", ["max_retries", "-1"]), ("set", ["max_retries", "2.5"]), ("set", ["max_retries", "lots"]),
        ("set", ["max_retries", BIG]), ("set", ["backoff_base", "-2"]), ("set", ["backoff_base", "nan"]),
        ("set", ["backoff_base", "inf"]), ("set", ["backoff_max", "1e99"]), ("set", ["job_timeout", "-3"]),
        ("set", ["job_timeout", "soon"]), ("set", ["poll_interval", "0"]), ("set", ["lease_seconds", "1"]),
        ("set", ["lease_seconds", "true"]))],
    (["config", "set", "max_retries"], 2),
    # workers and the group itself
    (["worker", "start", "--count", "0"], 1),
    (["worker", "start", "--count", "1000"], 1),
    (["worker", "start", "--count", "x"], 2),
    (["worker", "start", "--backoff-base", "-1"], 1),
    (["worker", "stop", "--wait", "soon"], 2),
    (["nosuchcommand"], 2),
    (["--bogus"], 2),
]


def _seed(cli, home, workers, tmp_path):
    """A home with a pending, a completed and a dead job and a config value, checkpointed."""
    cli("add", "--id", "dup", "--delay", "1h", "sleep 1")
    cli("add", "--id", "done", "true")
    cli("add", "--id", "dead1", "--max-retries", "0", "false")
    cli("config", "set", "backoff_base", "3")
    workers.start(1)
    wait_until(lambda: jobs(home)["done"]["state"] == "completed" and jobs(home)["dead1"]["state"] == "dead",
               timeout=30, message="seed jobs to finish")
    assert workers.stop().returncode == 0
    wait_until(lambda: not workers.alive(), timeout=30, message="seed worker to exit")
    gc.collect()  # close the in-process CLI's connections first
    conn = sqlite3.connect(str(Paths(home).db))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _files(where):
    (where / "bad-line.jsonl").write_text(_job() + "\n" + _job(priority="high") + "\n")
    (where / "dup-late.jsonl").write_text("".join(_job(id=f"ok{i}") + "\n" for i in range(30))
                                          + _job(id="dup") + "\n")
    (where / "not-utf8.jsonl").write_bytes(b'{"command": "caf\xe9"}\n')


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _problems(code, exit_code, stdout, stderr, case_home, reference_dump, reference_bytes):
    problems = []
    lines = stderr.splitlines()
    if exit_code != code:
        problems.append(f"exit {exit_code}, expected {code}")
    if len(lines) != 1 or not lines[0].strip():
        problems.append(f"{len(lines)} stderr lines")
    if "Traceback" in stderr + stdout or "internal error" in stderr:
        problems.append("traceback/internal error")
    if stdout:
        problems.append(f"stdout: {stdout[:80]!r}")
    if dump_db(case_home) != reference_dump:
        problems.append("DB dump changed")
    if _digest(Paths(case_home).db) != reference_bytes:
        problems.append("DB file bytes changed")
    return problems


def test_bad_inputs_one_line_exit_code_no_traceback_db_unchanged(cli, home, workers, tmp_path,
                                                                 monkeypatch):
    """Every case in-process (fast, through Click's runner), every 4th also as a real process."""
    assert len(CASES) >= 100
    _seed(cli, home, workers, tmp_path)
    reference_dump = dump_db(home)
    reference_bytes = _digest(Paths(home).db)
    files = tmp_path / "files"
    files.mkdir()
    _files(files)
    monkeypatch.chdir(files)

    def prepare(index, real):
        argv, code = CASES[index]
        stdin = None
        if "<" in argv:
            argv, stdin = argv[:argv.index("<")], argv[argv.index("<") + 1]
        case_home = tmp_path / f"case{index}{'-real' if real else ''}"
        case_home.mkdir()
        shutil.copyfile(Paths(home).db, Paths(case_home).db)  # WAL checkpointed: the file is all
        return argv, code, stdin, case_home

    def report(argv, problems, stderr):
        shown = " ".join(a if len(a) < 30 else a[:27] + "..." for a in argv)
        return f"queuectl {shown!r}: {'; '.join(problems)} | {stderr[:300]!r}"

    def run_real(index):
        argv, code, stdin, case_home = prepare(index, True)
        proc = subprocess.run([sys.executable, "-m", "queuectl.cli", *argv], input=stdin,
                              capture_output=True, text=True, cwd=files, timeout=120,
                              env=dict(os.environ, QUEUECTL_HOME=str(case_home)))
        problems = _problems(code, proc.returncode, proc.stdout, proc.stderr, case_home,
                             reference_dump, reference_bytes)
        return report(argv, problems, proc.stderr) + " (real process)" if problems else None

    with ThreadPoolExecutor(max_workers=3) as pool:
        real = pool.map(run_real, range(0, len(CASES), 4))
        failures = []
        for index in range(len(CASES)):
            argv, code, stdin, case_home = prepare(index, False)
            result = cli.runner.invoke(cli_group, argv, input=stdin, env={"QUEUECTL_HOME": str(case_home)})
            stderr = result.stderr
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                stderr += "".join(traceback.format_exception(result.exception))
            problems = _problems(code, result.exit_code, result.stdout, stderr, case_home,
                                 reference_dump, reference_bytes)
            if problems:
                failures.append(report(argv, problems, stderr))
        failures += [f for f in real if f]
    assert failures == [], f"{len(failures)} failures in {len(CASES)} cases:\n" + "\n".join(failures)
