"""Scenario 7: storage faults give one clear error line, never a traceback, never a changed file.

A home in a read-only directory (really read-only even for root: a read-only bind mount),
a home whose parent is a file, corrupted DB files, a DB from a newer queuectl, and
another program's SQLite file.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import sqlite3
import subprocess

import pytest

from helpers import run_queuectl

from queuectl.paths import Paths

PAGE = 4096


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _seeded_db(cli, home) -> bytes:
    """A real queuectl DB with 300 jobs, checkpointed so queue.db alone holds everything."""
    lines = "".join(json.dumps({"command": "echo " + "x" * 200}) + "\n" for _ in range(300))
    cli("enqueue", "--file", "-", input=lines)
    gc.collect()  # close the in-process CLI's connection
    conn = sqlite3.connect(str(Paths(home).db))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return Paths(home).db.read_bytes()


def _assert_clear_error(result, *words):
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    assert any(w in lines[0] for w in words), lines[0]


@contextlib.contextmanager
def _read_only(directory):
    """Make ``directory`` read-only for real. As root, permission bits do not stop writes,
    so use a read-only bind mount of the directory onto itself (or chattr +i as a
    fallback); as a normal user, chmod is enough."""
    directory = str(directory)
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        try:
            yield "chmod"
        finally:
            os.chmod(directory, 0o755)
        return
    bound = subprocess.run(["mount", "--bind", directory, directory], capture_output=True).returncode == 0
    if bound:
        try:
            ro = subprocess.run(["mount", "-o", "remount,bind,ro", directory], capture_output=True)
            assert ro.returncode == 0, ro.stderr
            yield "read-only bind mount"
        finally:
            for _ in range(20):
                if subprocess.run(["umount", directory], capture_output=True).returncode == 0:
                    break
            else:
                subprocess.run(["umount", "-l", directory], capture_output=True)
        return
    attr = subprocess.run(["chattr", "+i", directory], capture_output=True)
    assert attr.returncode == 0, f"cannot make {directory} read-only: {attr.stderr}"
    try:
        yield "chattr +i"
    finally:
        subprocess.run(["chattr", "-i", directory], capture_output=True)


def test_home_in_a_read_only_directory(cli, home):
    _seeded_db(cli, home)
    before = _sha(Paths(home).db)
    with _read_only(home):
        with pytest.raises(OSError):
            (home / "probe").write_text("x")  # really read-only, even for root
        for args in (["add", "true"], ["enqueue", '{"command": "true"}'], ["config", "set", "max_retries", "5"],
                     ["worker", "start"], ["status"], ["list"]):
            result = run_queuectl(*args, home=home)
            if args[0] in ("status", "list") and result.returncode == 0:
                continue  # reading a read-only queue may work; writing may not
            _assert_clear_error(result, "read-only", "readonly", "cannot open", "Read-only", "cannot create")
    assert _sha(Paths(home).db) == before
    assert not any(Paths(home).workers_dir.glob("*.json")) if Paths(home).workers_dir.exists() else True


def test_home_whose_parent_is_a_file(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    home = blocker / "qhome"
    for args in (["status"], ["add", "true"], ["worker", "start"], ["init-db"]):
        _assert_clear_error(run_queuectl(*args, home=home), "Not a directory", "cannot create")
    assert blocker.read_text() == "a file where a directory should be"


CORRUPTIONS = {
    "garbage header": lambda b: os.urandom(100) + b[100:],
    "garbage pages": lambda b: b[:3 * PAGE] + os.urandom(4 * PAGE) + b[7 * PAGE:],
    "zeroed tail": lambda b: b[:2 * PAGE] + bytes(len(b) - 2 * PAGE),
    "truncated": lambda b: b[:PAGE + 1000],
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupted_db_is_reported_and_left_alone(cli, home, kind):
    good = _seeded_db(cli, home)
    Paths(home).db.write_bytes(CORRUPTIONS[kind](good))
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(Paths(home).db) + suffix)
    before = _sha(Paths(home).db)
    for args in (["status"], ["add", "true"], ["list", "--limit", "0"], ["show", "150"]):
        result = run_queuectl(*args, home=home)
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
        if args[0] in ("status", "add"):  # these touch every page of the jobs table or write
            _assert_clear_error(result, "not a valid queuectl database")
        elif result.returncode != 0:
            _assert_clear_error(result, "not a valid queuectl database")
    assert _sha(Paths(home).db) == before, "a corrupted DB must never be written to"


def test_db_from_a_newer_queuectl_is_refused_and_untouched(cli, home):
    _seeded_db(cli, home)
    conn = sqlite3.connect(str(Paths(home).db))
    conn.execute("PRAGMA user_version = 99")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before = _sha(Paths(home).db)
    for args in (["status"], ["add", "true"], ["list"], ["config", "set", "max_retries", "2"],
                 ["worker", "start"], ["dlq", "retry", "--all"]):
        _assert_clear_error(run_queuectl(*args, home=home), "newer")
    assert _sha(Paths(home).db) == before
    assert not Paths(home).workers_dir.exists() or not any(Paths(home).workers_dir.glob("*.json"))


def test_another_programs_sqlite_file_is_refused_and_untouched(home):
    home.mkdir(parents=True)
    conn = sqlite3.connect(str(Paths(home).db))
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('alice')")
    conn.commit()
    conn.close()
    before = _sha(Paths(home).db)
    for args in (["status"], ["add", "true"], ["init-db"]):
        _assert_clear_error(run_queuectl(*args, home=home), "another program")
    assert _sha(Paths(home).db) == before
    conn = sqlite3.connect(str(Paths(home).db))
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["users"]
    conn.close()
