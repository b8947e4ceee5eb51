"""Bad input through the CLI: one line on stderr, exit 1 (usage errors 2), DB unchanged."""
from __future__ import annotations

import json
import re

import pytest

from helpers import dump_db

LONG_ID = "x" * 10_000

# (argv, expected exit code, a word the one-line message must contain)
BAD_INPUTS = [
    # -- enqueue: JSON shape ------------------------------------------------------------------
    (["enqueue", "not json"], 1, "malformed JSON"),
    (["enqueue", "{\"command\": \"x\""], 1, "malformed JSON"),
    (["enqueue", "{}"], 1, "command"),
    (["enqueue", "null"], 1, "object"),
    (["enqueue", "\"echo hi\""], 1, "object"),
    (["enqueue", "42"], 1, "object"),
    (["enqueue", "[]"], 1, "no jobs"),
    (["enqueue", '[{"command": "true"}, 5]'], 1, "job 2"),
    (["enqueue", '[{"command": "true"}, {"command": ""}]'], 1, "job 2"),
    # -- enqueue: command ---------------------------------------------------------------------
    (["enqueue", '{"command": ""}'], 1, "empty"),
    (["enqueue", '{"command": "   "}'], 1, "empty"),
    (["enqueue", '{"command": 42}'], 1, "command"),
    (["enqueue", '{"command": true}'], 1, "command"),
    (["enqueue", '{"command": {"a": 1}}'], 1, "command"),
    (["enqueue", '{"command": []}'], 1, "command"),
    (["enqueue", '{"command": ["ls", 1]}'], 1, "command"),
    (["enqueue", '{"command": [" "]}'], 1, "empty"),
    (["enqueue", '{"command": "a\\u0000b"}'], 1, "NUL"),
    (["enqueue", '{"command": null}'], 1, "command"),
    # -- enqueue: fields and types ------------------------------------------------------------
    (["enqueue", '{"command": "x", "bogus": 1}'], 1, "unknown field"),
    (["enqueue", '{"command": "x", "Priority": 1}'], 1, "unknown field"),
    (["enqueue", '{"command": "x", "priority": "high"}'], 1, "priority"),
    (["enqueue", '{"command": "x", "priority": 1.5}'], 1, "priority"),
    (["enqueue", '{"command": "x", "priority": true}'], 1, "priority"),
    (["enqueue", '{"command": "x", "priority": 1e12}'], 1, "priority"),
    (["enqueue", '{"command": "x", "max_retries": -1}'], 1, "max_retries"),
    (["enqueue", '{"command": "x", "max_retries": "3"}'], 1, "max_retries"),
    (["enqueue", '{"command": "x", "max_retries": 100000}'], 1, "max_retries"),
    (["enqueue", '{"command": "x", "timeout": 0}'], 1, "timeout"),
    (["enqueue", '{"command": "x", "timeout": -5}'], 1, "timeout"),
    (["enqueue", '{"command": "x", "timeout": "soon"}'], 1, "timeout"),
    (["enqueue", '{"command": "x", "timeout": [1]}'], 1, "timeout"),
    (["enqueue", '{"command": "x", "timeout": 1e12}'], 1, "timeout"),
    (["enqueue", '{"command": "x", "run_at": "yesterday"}'], 1, "run_at"),
    (["enqueue", '{"command": "x", "run_at": "2030-13-45T00:00:00Z"}'], 1, "run_at"),
    (["enqueue", '{"command": "x", "run_at": -5}'], 1, "run_at"),
    (["enqueue", '{"command": "x", "run_at": true}'], 1, "run_at"),
    (["enqueue", '{"command": "x", "run_at": 1e300}'], 1, "run_at"),
    (["enqueue", '{"command": "x", "run_at": 2000000000, "delay": 5}'], 1, "run_at"),
    (["enqueue", '{"command": "x", "delay": -1}'], 1, "delay"),
    (["enqueue", '{"command": "x", "delay": "later"}'], 1, "delay"),
    (["enqueue", '{"command": "x", "cwd": "/no/such/dir/anywhere"}'], 1, "cwd"),
    (["enqueue", '{"command": "x", "cwd": ""}'], 1, "cwd"),
    (["enqueue", '{"command": "x", "cwd": 7}'], 1, "cwd"),
    (["enqueue", '{"command": "x", "state": "completed"}'], 1, "state"),
    (["enqueue", '{"command": "x", "attempts": 3}'], 1, "attempts"),
    (["enqueue", '{"command": "x", "unique_key": ""}'], 1, "unique_key"),
    (["enqueue", '{"command": "x", "unique_key": 5}'], 1, "unique_key"),
    (["enqueue", '{"command": "x", "after": "nope"}'], 1, "nope"),
    (["enqueue", '{"command": "x", "after": 5}'], 1, "after"),
    (["enqueue", '{"command": "x", "id": "me", "after": ["me"]}'], 1, "itself"),
    # -- enqueue: ids -------------------------------------------------------------------------
    (["enqueue", '{"command": "x", "id": "dup"}'], 1, "already exists"),
    (["enqueue", '[{"command": "x", "id": "twin"}, {"command": "y", "id": "twin"}]'], 1, "twin"),
    (["enqueue", '{"command": "x", "id": "a/b"}'], 1, "id"),
    (["enqueue", '{"command": "x", "id": ".."}'], 1, "id"),
    (["enqueue", '{"command": "x", "id": "a..b"}'], 1, "id"),
    (["enqueue", '{"command": "x", "id": "a\\nb"}'], 1, "id"),
    (["enqueue", '{"command": "x", "id": ""}'], 1, "id"),
    (["enqueue", '{"command": "x", "id": "with space"}'], 1, "id"),
    (["enqueue", json.dumps({"command": "x", "id": LONG_ID})], 1, "id"),
    (["enqueue", '{"command": "x", "id": 5}'], 1, "id"),
    (["enqueue", '{"command": "x", "id": "123"}'], 1, "reserved"),
    # -- enqueue: how it is called ------------------------------------------------------------
    (["enqueue"], 1, "JSON"),
    (["enqueue", '{"command": "x"}', "--file", "jobs.jsonl"], 1, "JSON"),
    (["enqueue", "--file", "/no/such/jobs.jsonl"], 1, "cannot read"),
    (["enqueue", "--if-exists", "bogus", '{"command": "x"}'], 2, "--if-exists"),
    # -- add ----------------------------------------------------------------------------------
    (["add"], 2, "COMMAND"),
    (["add", ""], 1, "empty"),
    (["add", "   "], 1, "empty"),
    (["add", "x", "--priority", "abc"], 2, "--priority"),
    (["add", "x", "--max-retries", "many"], 2, "--max-retries"),
    (["add", "x", "--max-retries", "-2"], 1, "max_retries"),
    (["add", "x", "--run-at", "garbage"], 1, "run_at"),
    (["add", "x", "--run-at", "2030-01-01T00:00:00Z", "--delay", "5"], 1, "run_at"),
    (["add", "x", "--delay", "-5"], 1, "delay"),
    (["add", "x", "--delay", "5 parsecs"], 1, "delay"),
    (["add", "x", "--timeout", "0"], 1, "timeout"),
    (["add", "x", "--timeout", "forever"], 1, "timeout"),
    (["add", "x", "--id", "bad id"], 1, "id"),
    (["add", "x", "--id", "dup"], 1, "already exists"),
    (["add", "x", "--after", "nope"], 1, "nope"),
    (["add", "x", "--after", "dup,ghost"], 1, "ghost"),
    (["add", "x", "--cwd", "/no/such/dir"], 1, "cwd"),
    (["add", "x", "--if-exists", "maybe"], 2, "--if-exists"),
    # -- other commands that must refuse without writing -------------------------------------
    (["show", "ghost"], 1, "ghost"),
    (["show", "../etc"], 1, "id"),
    (["logs", "ghost"], 1, "ghost"),
    (["cancel", "ghost"], 1, "ghost"),
    (["retry", "ghost"], 1, "ghost"),
    (["retry", "dup"], 1, "pending"),
    (["dlq", "retry", "dup"], 1, "not dead"),
    (["dlq", "retry", "ghost"], 1, "ghost"),
    (["dlq", "retry"], 1, "--all"),
    (["requeue", "dup"], 1, "not dead"),
    (["wait", "ghost"], 1, "ghost"),
    (["wait"], 1, "--all"),
    (["wait", "dup", "--timeout", "soon"], 1, "--timeout"),
    (["list", "--state", "bogus"], 2, "--state"),
    (["list", "--limit", "-1"], 1, "--limit"),
    (["purge", "--state", "pending"], 2, "--state"),
    (["purge", "--state", "completed", "--older-than", "ages"], 1, "--older-than"),
    (["config", "get", "nope"], 1, "valid keys"),
    (["config", "set", "nope", "1"], 1, "valid keys"),
    (["config", "set", "max_retries", "-1"], 1, "max_retries"),
    (["config", "set", "max_retries", "2.5"], 1, "max_retries"),
    (["config", "set", "max_retries", "lots"], 1, "max_retries"),
    (["config", "set", "backoff_base", "-2"], 1, "backoff_base"),
    (["config", "set", "backoff_max", "1e99"], 1, "backoff_max"),
    (["config", "set", "poll_interval", "0"], 1, "poll_interval"),
    (["config", "set", "job_timeout", "-3"], 1, "job_timeout"),
    (["config", "unset", "nope"], 1, "valid keys"),
    (["worker", "start", "--count", "0"], 1, "--count"),
    (["nosuchcommand"], 2, "nosuchcommand"),
]


def _ids(case):
    return " ".join(a if len(a) < 40 else a[:37] + "..." for a in case[0])


@pytest.fixture
def seeded(cli, home, tmp_path, monkeypatch):
    """A DB with one pending job 'dup' (and config) so 'nothing changed' means something."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.jsonl").write_text('{"command": "true"}\n')
    cli("add", "--id", "dup", "--delay", "1h", "sleep 1")
    cli("config", "set", "backoff_base", "3")
    return dump_db(home)


@pytest.mark.parametrize("argv,code,word", BAD_INPUTS, ids=[_ids(c) for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_code_and_db_unchanged(cli, home, seeded, argv, code, word):
    result = cli(*argv, ok=False)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    message = lines[0]
    # our errors say "error: …"; Click's usage errors keep Click's "Error: …" (exit 2)
    assert message.startswith("error: " if code == 1 else "Error: "), message
    assert word.lower() in message.lower(), message
    assert result.stdout == ""
    assert dump_db(home) == seeded


def test_long_id_is_shortened_in_the_message(cli, home, seeded):
    result = cli("enqueue", json.dumps({"command": "x", "id": LONG_ID}), ok=False)
    assert result.exit_code == 1
    assert len(result.stderr) < 400


def test_bad_file_line_is_named_and_nothing_written(cli, home, seeded, tmp_path):
    lines = [json.dumps({"command": f"echo {i}", "id": f"f{i}"}) for i in range(5)]
    lines.insert(3, '{"command": "x", "priority": "high"}')
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("enqueue", "--file", str(tmp_path / "bad.jsonl"), ok=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: line 4:")
    assert "priority" in result.stderr
    assert dump_db(home) == seeded


def test_malformed_json_line_is_named(cli, home, seeded):
    text = '{"command": "a"}\n\n# comment\n{"command": "b"\n{"command": "c"}\n'
    result = cli("enqueue", "--file", "-", input=text, ok=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: line 4: malformed JSON")
    assert dump_db(home) == seeded


def test_duplicate_id_late_in_file_rolls_back_everything(cli, home, seeded):
    text = "".join(json.dumps({"command": "true", "id": f"ok{i}"}) + "\n" for i in range(50))
    text += json.dumps({"command": "true", "id": "dup"}) + "\n"
    result = cli("enqueue", "--file", "-", input=text, ok=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: line 51:") and "dup" in result.stderr
    assert dump_db(home) == seeded


@pytest.mark.parametrize("command", ["echo hi", "  spaced  ", "x" * 1000])
def test_plain_command_fast_path_matches_the_general_path(command):
    """parse_job has a fast path for {"command": ...}; it must normalize exactly like the
    general path, which an explicit default field forces."""
    from queuectl.jobspec import parse_job

    fast = parse_job({"command": command}, now=1000.0, default_cwd="/tmp")
    general = parse_job({"command": command, "priority": 0}, now=1000.0, default_cwd="/tmp")
    assert fast == general


@pytest.mark.parametrize("command", ["", "   ", "a\0b", 5, None, ["echo"]])
def test_fast_path_leaves_bad_or_unusual_commands_to_the_general_path(command):
    from queuectl.errors import InvalidInput
    from queuectl.jobspec import parse_job

    try:
        fast = parse_job({"command": command}, now=1000.0, default_cwd="/tmp")
    except InvalidInput as exc:
        with pytest.raises(InvalidInput, match=re.escape(str(exc))):
            parse_job({"command": command, "priority": 0}, now=1000.0, default_cwd="/tmp")
    else:
        assert fast == parse_job({"command": command, "priority": 0}, now=1000.0, default_cwd="/tmp")
