"""Every command through Click's CliRunner, including the forms earlier designs documented."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import dump_db, make_dead, show_json

from queuectl.executor import Outcome

W = "host:1:1"


show = show_json


@pytest.mark.sqlite_only  # checks the SQLite file
# -- init ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["init-db", "initdb"])
def test_init_db_is_idempotent_and_prints_path(cli, home, name):
    first = cli(name)
    db = home / "queue.db"
    assert str(db) in first.stdout and db.exists()
    cli("add", "--id", "keep", "true")
    before = dump_db(home)
    again = cli(name)
    assert str(db) in again.stdout
    assert dump_db(home) == before


@pytest.mark.sqlite_only  # checks the SQLite file
def test_any_command_creates_the_db(cli, home):
    assert not (home / "queue.db").exists()
    cli("status")
    assert (home / "queue.db").exists()


# -- add / enqueue -------------------------------------------------------------------------------
def test_add_seed_example_with_priority_and_run_at(cli):
    result = cli("add", "echo 'Hello World'", "--priority", "10", "--run-at", "2030-01-01T00:00:00Z")
    assert result.stdout == "Enqueued job 1\n"
    job = show(cli, "1")
    assert job["command"] == "echo 'Hello World'"
    assert job["priority"] == 10 and job["run_at"] == 1893456000.0 and job["state"] == "pending"


def test_add_with_several_args_keeps_each_argument(cli):
    cli("add", "--id", "p", "--", "printf", "%s\n", "a b", "it's")
    assert show(cli, "p")["command"] == "printf '%s\n' 'a b' 'it'\"'\"'s'"


def test_add_all_options(cli, tmp_path):
    cli("add", "--id", "base", "true")
    before = time.time()
    cli("add", "x", "--id", "full", "--max-retries", "5", "--delay", "5m", "--timeout", "2h",
        "--cwd", str(tmp_path), "--after", "base", "--unique-key", "k1", "-p", "3")
    job = show(cli, "full")
    assert job["max_retries"] == 5 and job["timeout"] == 7200 and job["cwd"] == str(tmp_path)
    assert job["after"] == ["base"] and job["unique_key"] == "k1" and job["priority"] == 3
    assert before + 300 <= job["run_at"] <= time.time() + 300


def test_cwd_defaults_to_the_callers_directory(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli("add", "--id", "here", "pwd")
    assert show(cli, "here")["cwd"] == str(tmp_path)


def test_enqueue_json_generated_and_given_ids(cli):
    assert cli("enqueue", '{"command": "echo a"}').stdout == "Enqueued job 1\n"
    assert cli("enqueue", '{"id": "job1", "command": "sleep 2"}').stdout == "Enqueued job job1\n"
    assert cli("enqueue", '{"command": "echo b"}').stdout == "Enqueued job 3\n"


def test_enqueue_argv_list(cli):
    cli("enqueue", '{"id": "argv", "command": ["echo", "a b", "$HOME"], "timeout": 5}')
    job = show(cli, "argv")
    assert job["command"] == ["echo", "a b", "$HOME"] and job["timeout"] == 5


def test_enqueue_legacy_record_fields_accepted(cli):
    cli("enqueue", '{"id": "job1", "command": "sleep 2", "state": "pending", "attempts": 0, '
        '"max_retries": 3, "created_at": "2025-11-04T10:30:00Z", "updated_at": "2025-11-04T10:30:00Z"}')
    assert show(cli, "job1")["max_retries"] == 3


def test_enqueue_json_array_is_one_batch(cli):
    result = cli("enqueue", '[{"command": "true", "id": "a1"}, {"command": "false", "id": "a2"}]')
    assert result.stdout.startswith("Enqueued 2 jobs")
    assert [j["id"] for j in json.loads(cli("list", "--json").stdout)] == ["a1", "a2"]


def test_enqueue_file_jsonl(cli, home, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"command": f"echo {i}", "id": f"j{i}"}) + "\n"
                            for i in range(200)) + "\n# a comment\n\n")
    result = cli("enqueue", "--file", str(path))
    assert result.stdout == "Enqueued 200 jobs: j0 … j199\n"
    assert json.loads(cli("status", "--json").stdout)["jobs"]["pending"] == 200


def test_enqueue_file_stdin(cli):
    text = '{"command": "echo a"}\n{"command": "echo b", "priority": 2}\n'
    assert cli("enqueue", "--file", "-", input=text).stdout.startswith("Enqueued 2 jobs")
    assert cli("enqueue", "-f", "-", input='[{"command": "echo c"}]').stdout == "Enqueued job 3\n"
    assert show(cli, "2")["priority"] == 2


def test_enqueue_file_is_one_transaction(cli, store, mocker):
    """All rows go through one transaction (one BEGIN), not one per job."""
    spy = mocker.spy(type(store), "transaction")  # the backend's own, whichever it is
    text = "".join(json.dumps({"command": "true"}) + "\n" for _ in range(50))
    cli("enqueue", "--file", "-", input=text)
    assert spy.call_count == 1
    assert len(store.list_jobs()) == 50


# -- list / show / status ------------------------------------------------------------------------
def test_list_state_json_and_dlq(cli, queue):
    cli("add", "--id", "ok", "true")
    cli("add", "--id", "bad", "--max-retries", "0", "false")
    cli("add", "--id", "later", "--delay", "1h", "true")
    job = queue.claim(W)
    queue.finish(job, Outcome(0, None, ""), W)
    make_dead(queue, "bad")

    pending = json.loads(cli("list", "--state", "pending", "--json").stdout)
    assert [j["id"] for j in pending] == ["later"]
    assert pending[0]["command"] == "true" and "seq" not in pending[0]

    dlq = cli("list", "--dlq")
    assert "bad" in dlq.stdout and "exit code 1" in dlq.stdout and "later" not in dlq.stdout
    assert "bad" in cli("dlq", "list").stdout
    assert [j["id"] for j in json.loads(cli("dlq", "list", "--json").stdout)] == ["bad"]
    both = json.loads(cli("list", "-s", "completed", "-s", "dead", "--json").stdout)
    assert [j["id"] for j in both] == ["ok", "bad"]
    assert "No jobs in state cancelled." in cli("list", "--state", "cancelled").stdout
    assert "ok" in cli("ls").stdout


def test_list_limit_shows_newest(cli):
    cli("enqueue", "--file", "-", input="".join('{"command": "true"}\n' for _ in range(5)))
    result = cli("list", "--limit", "2", "--json")
    assert [j["id"] for j in json.loads(result.stdout)] == ["4", "5"]
    assert "--limit 0" in cli("list", "--limit", "2").stderr
    assert len(json.loads(cli("list", "--limit", "0", "--json").stdout)) == 5


def test_show_text_and_json(cli, queue):
    cli("add", "--id", "s", "--max-retries", "2", "echo hi")
    queue.config_set("backoff_base", "0")
    job = queue.claim(W)
    queue.finish(job, Outcome(3, "exit code 3", "partial output\n"), W)
    data = show(cli, "s")
    assert data["state"] == "failed" and data["attempts"] == 1 and data["exit_code"] == 3
    assert data["last_error"] == "exit code 3" and data["output_tail"] == "partial output\n"
    assert data["runs"][0]["attempt"] == 1 and data["log_file"].endswith("logs/jobs/s.log")
    text = cli("show", "s").stdout
    for fragment in ("state:       failed", "attempts:    1 (max retries 2)", "exit code:   3",
                     "last error:  exit code 3", "next run:", "partial output"):
        assert fragment in text, fragment


def test_status_json_and_text(cli, queue):
    cli("add", "true")
    cli("add", "true")
    queue.claim(W)
    data = json.loads(cli("status", "--json").stdout)
    assert data["jobs"] == {"pending": 1, "processing": 1, "completed": 0, "failed": 0, "dead": 0,
                            "cancelled": 0}
    assert data["total"] == 2 and data["paused"] is False and data["workers"] == []
    text = cli("status").stdout
    assert "Queue: running" in text and "Workers: 0 running" in text
    assert "pending" in text and "dead (DLQ)" in text


# -- DLQ and retries -----------------------------------------------------------------------------
def test_requeue_alias_and_dlq_retry(cli, queue):
    cli("add", "--id", "d", "--max-retries", "1", "false")
    make_dead(queue, "d")
    assert show(cli, "d")["attempts"] == 2
    assert "back to pending" in cli("requeue", "d").stdout
    job = show(cli, "d")
    # Attempt numbers go on (schema v3); the retry budget starts afresh from retry_base.
    assert job["state"] == "pending" and job["attempts"] == 2 and job["retry_base"] == 2
    make_dead(queue, "d")
    cli("dlq", "retry", "d")
    assert show(cli, "d")["state"] == "pending"


def test_dlq_retry_all(cli, queue):
    for name in ("x", "y"):
        cli("add", "--id", name, "--max-retries", "0", "false")
        make_dead(queue, name)
    cli("add", "--id", "p", "true")
    assert "2 jobs moved" in cli("dlq", "retry", "--all").stdout
    assert json.loads(cli("status", "--json").stdout)["jobs"]["pending"] == 3
    assert "empty" in cli("dlq", "retry", "--all").stdout


def test_retry_failed_job_runs_now(cli, queue):
    cli("add", "--id", "f", "false")
    job = queue.claim(W)
    queue.config_set("backoff_base", "1000")
    queue.finish(job, Outcome(1, "exit code 1", ""), W)
    assert show(cli, "f")["run_at"] > time.time() + 100
    cli("retry", "f")
    job = show(cli, "f")
    assert job["state"] == "pending" and job["run_at"] <= time.time() and job["attempts"] == 1


# -- config --------------------------------------------------------------------------------------
def test_config_list_get_set_unset(cli):
    listing = cli("config", "list").stdout
    for key in ("max_retries = 3", "backoff_base = 2", "backoff_max = 3600", "job_timeout = none",
                "poll_interval = 1"):
        assert key in listing
    assert cli("config", "get").stdout == listing  # get without key = list
    assert cli("config", "set", "default_max_retries", "5").stdout == "max_retries = 5\n"
    assert cli("config", "get", "max_retries").stdout == "max_retries = 5\n"
    assert cli("config", "get", "default_max_retries").stdout == "max_retries = 5\n"
    assert cli("config", "set", "worker_poll_interval", "0.5").stdout == "poll_interval = 0.5\n"
    cli("config", "set", "job_timeout", "30")
    data = json.loads(cli("config", "list", "--json").stdout)
    assert data["max_retries"] == 5 and data["poll_interval"] == 0.5 and data["job_timeout"] == 30
    assert json.loads(cli("config", "get", "backoff_base", "--json").stdout) == {"backoff_base": 2.0}
    cli("config", "unset", "max_retries")
    assert cli("config", "get", "max_retries").stdout == "max_retries = 3  (default)\n"


def test_unknown_config_key_lists_all_valid_keys(cli):
    result = cli("config", "set", "retries", "3", ok=False)
    assert result.exit_code == 1
    for key in ("max_retries", "backoff_base", "backoff_max", "job_timeout", "poll_interval"):
        assert key in result.stderr


def test_config_set_reports_the_range(cli):
    result = cli("config", "set", "backoff_base", "-1", ok=False)
    assert result.exit_code == 1 and "from 0 to 1000" in result.stderr


# -- workers without workers, help, entry points --------------------------------------------------
def test_worker_status_and_stop_with_no_workers(cli):
    assert "No running workers." in cli("worker", "status").stdout
    assert json.loads(cli("worker", "status", "--json").stdout) == []
    assert "No running workers." in cli("worker", "stop").stdout


COMMANDS = [
    [], ["init-db"], ["initdb"], ["enqueue"], ["add"], ["worker"], ["worker", "start"],
    ["worker", "stop"], ["worker", "status"], ["status"], ["list"], ["show"], ["dlq"],
    ["dlq", "list"], ["dlq", "retry"], ["requeue"], ["retry"], ["logs"], ["wait"], ["cancel"],
    ["pause"], ["resume"], ["purge"], ["config"], ["config", "list"], ["config", "get"],
    ["config", "set"], ["config", "unset"],
]


@pytest.mark.sqlite_only  # checks the SQLite file
@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a) or "queuectl")
def test_every_command_has_help(cli, home, argv):
    result = cli(*argv, "--help")
    assert result.stdout.startswith("Usage: ")
    assert not (home / "queue.db").exists(), "--help must not create the database"


@pytest.mark.parametrize("argv", [["enqueue"], ["add"], ["worker"], ["list"], ["dlq"], ["logs"],
                                  ["wait"], ["purge"], ["config"]], ids=lambda a: a[0])
def test_help_has_examples(cli, argv):
    assert "Examples:" in cli(*argv, "--help").stdout


def test_version(cli):
    assert cli("--version").stdout.startswith("queuectl, version ")


@pytest.mark.parametrize("module", ["queuectl.cli", "queuectl"])
def test_python_dash_m(home, module):
    env = dict(os.environ, QUEUECTL_HOME=str(home))
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "enqueue" in result.stdout and "worker" in result.stdout
    result = subprocess.run([sys.executable, "-m", module, "add", "--id", "m", "echo hi"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and result.stdout == "Enqueued job m\n", result.stderr
