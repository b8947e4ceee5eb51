"""Alert hooks (config on_failure / on_dead): what they are given, and that one that hangs,
fails or prints without end never holds up or breaks a worker."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from helpers import wait_until

from queuectl import alerts, executor
from queuectl.jobspec import parse_job
from queuectl.paths import Paths

JOB = {"id": "j1", "attempts": 2, "command": "make backup", "grp": "backups"}


@pytest.fixture
def hooks(tmp_path: Path):
    made = alerts.Hooks(tmp_path)
    yield made
    for run in made.running:  # a test that failed may leave one behind
        try:
            os.killpg(run.proc.pid, 9)
        except ProcessLookupError:
            pass
        run.proc.wait()


def settle(hooks: alerts.Hooks, timeout: float = 20) -> None:
    def done() -> bool:
        hooks.poll()
        return not hooks.running and not hooks.waiting

    wait_until(done, timeout=timeout, interval=0.05, message="the hooks to end")


def test_a_hook_gets_the_job_in_its_environment(hooks: alerts.Hooks, tmp_path: Path) -> None:
    out = tmp_path / "envs"
    out.mkdir()
    # One file per hook run: two hooks run at once, and their appends to one file may mix.
    dump = (f"python3 -c 'import json,os; print(json.dumps({{k: v for k, v in os.environ.items() "
            f"if k.startswith(\"QUEUECTL_\")}}))' > {out}/$QUEUECTL_EVENT-$$.json")

    def dumped() -> list:
        return [json.loads(path.read_text()) for path in sorted(out.iterdir())]
    hooks.job_settled({"on_failure": dump, "on_dead": dump}, JOB, "exit code 7", "dead")
    settle(hooks)
    seen = sorted(dumped(), key=lambda env: env["QUEUECTL_EVENT"])
    assert [env["QUEUECTL_EVENT"] for env in seen] == ["on_dead", "on_failure"]
    for env in seen:
        assert env["QUEUECTL_JOB_ID"] == "j1" and env["QUEUECTL_JOB_STATE"] == "dead"
        assert env["QUEUECTL_ATTEMPT"] == "2" and env["QUEUECTL_ERROR"] == "exit code 7"
        assert env["QUEUECTL_COMMAND"] == "make backup" and env["QUEUECTL_GROUP"] == "backups"
        assert env["QUEUECTL_HOME"] == str(tmp_path)
    # A plain failure (retries left) fires on_failure only; completed jobs fire nothing.
    hooks.job_settled({"on_failure": dump, "on_dead": dump}, JOB, "exit code 7", "failed")
    hooks.job_settled({"on_failure": dump, "on_dead": dump}, JOB, None, "completed")
    settle(hooks)
    assert len(dumped()) == 3


def test_a_hanging_hook_is_killed_at_its_timeout_without_waiting(hooks: alerts.Hooks, mocker,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    mocker.patch.object(alerts, "HOOK_TIMEOUT", 0.5)
    began = time.monotonic()
    hooks.job_settled({"on_dead": "echo going to sleep; sleep 60 & sleep 60"}, JOB, "e", "dead")
    assert time.monotonic() - began < 5  # started, not waited for
    (run,) = hooks.running
    with caplog.at_level(logging.INFO, logger="queuectl.worker"):
        settle(hooks)
    assert "alert hook on_dead (job j1) timed out after 0.5s and was killed; output: going to sleep" \
        in caplog.text
    wait_until(lambda: not executor.pid_alive(run.proc.pid), message="the hook reaped")
    # The whole group went, the background sleep too.
    wait_until(lambda: not any(_in_group(run.proc.pid)), message="the hook's group gone")


def _in_group(pgid: int):
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    yield int(entry)
            except ProcessLookupError:
                pass


def test_failing_and_chatty_hooks_are_logged_bounded(hooks: alerts.Hooks,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="queuectl.worker"):
        hooks.job_settled({"on_failure": "echo cannot reach pager >&2; exit 3"}, JOB, "e", "failed")
        hooks.job_settled({"on_dead": "head -c 5000000 /dev/zero | tr '\\0' x"}, JOB, "e", "dead")
        settle(hooks)
    assert "alert hook on_failure (job j1) failed with status 3 after" in caplog.text
    assert "output: cannot reach pager" in caplog.text
    (chatty,) = [r.getMessage() for r in caplog.records if "on_dead" in r.getMessage()]
    assert "done in" in chatty and f"[... {5000000 - alerts.OUTPUT_KEPT} more bytes not logged]" in chatty
    assert len(chatty) < alerts.OUTPUT_KEPT + 200


def test_hooks_run_a_few_at_a_time_and_excess_is_dropped(hooks: alerts.Hooks, mocker,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    mocker.patch.object(alerts, "MAX_WAITING", 3)
    with caplog.at_level(logging.INFO, logger="queuectl.worker"):
        for i in range(alerts.MAX_RUNNING + 5):
            hooks.job_settled({"on_dead": "sleep 0.2"}, dict(JOB, id=f"j{i}"), "e", "dead")
            assert len(hooks.running) <= alerts.MAX_RUNNING
        assert len(hooks.running) == alerts.MAX_RUNNING and len(hooks.waiting) == 3
        settle(hooks)
    done = [r for r in caplog.records if "done in" in r.getMessage()]
    assert len(done) == alerts.MAX_RUNNING + 3
    logged = [int(r.getMessage().split(": ")[1].split()[0]) for r in caplog.records
              if "dropped" in r.getMessage()]
    assert logged == [1]  # the first drop at once; the next within DROPS_LOG_EVERY is counted
    assert hooks.dropped == 1  # ... and logged with the next poll after it


def test_hook_settings_are_strings(cli) -> None:
    assert "on_dead = notify-send dead" in cli("config", "set", "on_dead", "notify-send dead").stdout
    values = json.loads(cli("config", "list", "--json").stdout)
    assert values["on_dead"] == "notify-send dead" and values["on_failure"] is None
    assert "on_dead = none" in cli("config", "set", "on_dead", "none").stdout
    bad = cli("config", "set", "on_failure", "x" * 5000, ok=False)
    assert bad.exit_code == 1 and "at most 4096 characters" in bad.stderr
    assert json.loads(cli("config", "get", "on_failure", "--json").stdout) == {"on_failure": None}


def test_a_hanging_hook_does_not_hold_up_the_worker(home: Path, queue, workers, tmp_path: Path) -> None:
    out = tmp_path / "alerts.txt"
    queue.config_set("max_retries", 0)
    queue.config_set("on_dead", f'echo "$QUEUECTL_JOB_ID $QUEUECTL_JOB_STATE $QUEUECTL_ERROR" >> {out}; '
                                "sleep 60")
    spec: Dict[str, Any] = {"id": "bad", "command": "exit 4"}
    queue.enqueue([parse_job(spec, now=queue.clock(), default_cwd="/")])
    (pid,) = workers.start(1)
    wait_until(lambda: out.exists() and out.read_text(), timeout=20, message="the hook ran")
    assert out.read_text() == "bad dead exit code 4\n"
    queue.enqueue([parse_job({"id": f"ok{i}", "command": "true"}, now=queue.clock(), default_cwd="/")
                   for i in range(5)])
    wait_until(lambda: queue.counts()["completed"] == 5, timeout=20,
               message="jobs done while the hook hangs")
    stop = workers.stop()
    assert "Stopped: 1" in stop.stdout, stop.stdout + stop.stderr  # not held by the hook


def test_a_job_recovery_moves_to_the_dlq_fires_on_dead(home: Path, queue, tmp_path: Path, mocker) -> None:
    """A worker killed mid-run, no retries left: the worker that recovers the job fires it."""
    queue.config_set("on_dead", "true")
    queue.enqueue([parse_job({"id": "lost", "command": "sleep 9"}, now=queue.clock(), default_cwd="/")])
    job = queue.claim("vm:1:1")
    with queue.store.transaction():  # what recovery does to it, in short
        queue.store.update_job("lost", {"state": "dead", "last_error": "worker died (process gone)"},
                               states=("processing",))
    fired = mocker.patch.object(alerts.Hooks, "job_settled")
    alerts.job_recovered(Paths(home), queue, "lost", "dead")
    (call,) = fired.call_args_list
    settings, seen, error, state = call.args
    assert (seen["id"], seen["attempts"], error, state) == ("lost", job["attempts"],
                                                            "worker died (process gone)", "dead")
