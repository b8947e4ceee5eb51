"""The CLI side of the "Polish" issue: strict `add` parsing, -q/--json, notes, logs --tail,
purge --dry-run, wait --scheduled, Ctrl-C, show wording, table widths, dashboard start-up,
running from a checkout without click."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import dump_db, run_queuectl, show_json, spawn_queuectl, wait_until

from queuectl.cli import NO_WORKERS_NOTE, PAUSED_NOTE
from queuectl.executor import Outcome

W = "host:1:1"
ROOT = Path(__file__).resolve().parent.parent


job = show_json


def ids(cli) -> list:
    return [j["id"] for j in json.loads(cli("list", "--json").stdout)]


# -- 1. add parses options strictly ----------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["add", "echo hi", "--timout", "30m"],
    ["add", "--timout", "30m", "echo hi"],
    ["add", "echo hi", "--timout=30m"],
])
def test_add_unknown_option_is_a_usage_error_and_enqueues_nothing(cli, home, argv):
    cli("init-db")
    before = dump_db(home)
    result = cli(*argv, ok=False)
    assert result.exit_code == 2
    assert "No such option: --timout" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert dump_db(home) == before


def test_add_documented_forms_with_options_after_the_command(cli):
    cli("add", "sleep 2", "--max-retries", "5")
    cli("add", "echo 'Urgent!'", "--priority", "10")
    cli("add", "echo later", "--run-at", "2025-12-01T10:00:00Z")
    assert job(cli, "1")["command"] == "sleep 2" and job(cli, "1")["max_retries"] == 5
    assert job(cli, "2")["command"] == "echo 'Urgent!'" and job(cli, "2")["priority"] == 10
    assert job(cli, "3")["command"] == "echo later" and job(cli, "3")["run_at"] == 1764583200.0


def test_add_everything_after_double_dash_is_the_command_verbatim(cli):
    cli("add", "--id", "r", "--", "rsync", "-a", "--delete", "--timeout", "3", "/a", "/b")
    data = job(cli, "r")
    assert data["command"] == "rsync -a --delete --timeout 3 /a /b" and data["timeout"] is None


def test_add_lone_dash_and_negative_numbers_inside_a_command_are_fine(cli):
    cli("add", "--id", "neg", "echo -5 -x", "--priority", "-1")
    cli("add", "--id", "dash", "cat", "-")
    assert job(cli, "neg")["command"] == "echo -5 -x" and job(cli, "neg")["priority"] == -1
    assert job(cli, "dash")["command"] == "cat -"


# -- 2. -q / --json ----------------------------------------------------------------------------
def test_add_quiet_and_json(cli):
    assert cli("add", "-q", "true").stdout == "1\n"
    assert cli("add", "true", "--quiet").stdout == "2\n"
    assert json.loads(cli("add", "--json", "true").stdout) == {"id": "3", "created": True}
    cli("add", "--id", "k1", "--unique-key", "k", "sleep 1")
    skipped = cli("add", "--unique-key", "k", "--if-exists", "skip", "--json", "true")
    assert json.loads(skipped.stdout) == {"id": "k1", "created": False}
    quiet = cli("add", "--unique-key", "k", "--if-exists", "skip", "-q", "true")
    assert quiet.stdout == "k1\n"


def test_add_default_output_unchanged(cli):
    assert cli("add", "true").stdout == "Enqueued job 1\n"


def test_enqueue_quiet_and_json(cli):
    assert cli("enqueue", "-q", '{"command": "true"}').stdout == "1\n"
    assert cli("enqueue", "-q", '[{"command": "a"}, {"command": "b"}]').stdout == "2\n3\n"
    text = '{"command": "x", "unique_key": "u"}\n{"command": "y", "unique_key": "u"}\n{"command": "z"}\n'
    data = json.loads(cli("enqueue", "--json", "--if-exists", "skip", "--file", "-", input=text).stdout)
    assert data == {"ids": ["4", "5"], "created": 2, "skipped": ["4"]}
    assert json.loads(cli("enqueue", "--json", '{"command": "w"}').stdout) == \
        {"ids": ["6"], "created": 1, "skipped": []}


# -- 5. notes: no workers, paused --------------------------------------------------------------
def test_add_and_enqueue_note_when_no_worker_runs_stderr_only(cli):
    for argv in (["add", "true"], ["add", "-q", "true"], ["add", "--json", "true"],
                 ["enqueue", '{"command": "true"}'], ["enqueue", "--json", '{"command": "true"}']):
        result = cli(*argv)
        assert result.stderr == NO_WORKERS_NOTE + "\n", argv
        assert "note" not in result.stdout
    assert NO_WORKERS_NOTE == "note: no workers are running; start them with: queuectl worker start"


def test_paused_note_and_no_note_with_a_live_worker(cli, workers):
    workers.start(1)
    assert cli("add", "true").stderr == ""
    cli("pause")
    assert cli("add", "-q", "true").stderr == PAUSED_NOTE + "\n"
    assert PAUSED_NOTE == "note: the queue is paused; 'queuectl resume' to continue"


def test_worker_start_while_paused_says_so_and_starts(cli, home, workers):
    cli("pause")
    result = run_queuectl("worker", "start", home=home)
    assert result.returncode == 0 and "Started 1 worker(s)" in result.stdout
    workers.pids.extend(int(p) for p in result.stdout.split("PIDs:")[1].split("\n")[0].split(","))
    assert PAUSED_NOTE in result.stderr and NO_WORKERS_NOTE not in result.stderr
    assert wait_until(workers.alive)


def test_wait_notes_when_nothing_runs(cli):
    cli("add", "--id", "w", "true")
    cli("pause")
    result = cli("wait", "w", "--timeout", "0.1", ok=False)
    assert result.exit_code == 2
    assert NO_WORKERS_NOTE in result.stderr and PAUSED_NOTE in result.stderr


def test_notes_do_not_import_the_launcher_when_no_worker_exists(home):
    """`add` start-up is benchmarked: with no PID file the check costs one listdir."""
    code = ("import sys; from queuectl.cli import main; sys.argv = ['queuectl', 'add', '-q', 'true']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('launcher' if 'queuectl.worker_launcher' in sys.modules else 'lean', file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, QUEUECTL_HOME=str(home)), timeout=60)
    assert result.stdout == "1\n" and result.stderr.endswith("lean\n"), result.stderr


def test_logs_follow_notes_when_no_worker_runs(cli, home):
    cli("add", "--id", "f", "true")
    with spawn_queuectl("logs", "f", "--follow", home=home) as proc:
        line = proc.stderr.readline()
        assert line == NO_WORKERS_NOTE + "\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130


# -- 3. logs --tail ----------------------------------------------------------------------------
def write_log(paths, job_id: str, attempts: int = 2, lines: int = 5) -> None:
    from queuectl import joblog

    with open(paths.job_log(job_id), "wb") as handle:
        for attempt in range(1, attempts + 1):
            handle.write(joblog.header(job_id, attempt, W, "seq"))
            handle.write("".join(f"a{attempt} line {i}\n" for i in range(lines)).encode())
            handle.write(joblog.result_line(job_id, attempt, "exit code 1"))


def test_logs_tail_whole_log_and_one_attempt(cli, queue, paths):
    cli("add", "--id", "t", "seq")
    queue.claim(W)
    paths.job_logs_dir.mkdir(parents=True, exist_ok=True)
    write_log(paths, "t")
    assert cli("logs", "t", "--tail", "2").stdout == \
        "a2 line 4\n--- queuectl job t attempt 2 finished: exit code 1 ---\n"
    assert cli("logs", "t", "-n", "3", "--attempt", "1").stdout == \
        "a1 line 3\na1 line 4\n--- queuectl job t attempt 1 finished: exit code 1 ---\n"
    whole = cli("logs", "t").stdout
    assert cli("logs", "t", "--tail", "1000").stdout == whole
    assert cli("logs", "t", "--tail", "0").stdout == ""


def test_read_last_lines_reads_from_the_end_across_blocks(tmp_path):
    from queuectl import joblog

    path = tmp_path / "log"
    data = b"".join(b"line %d\n" % i for i in range(5000)) + b"no newline"
    path.write_bytes(data)
    for count in (0, 1, 2, 700, 4999, 5001, 9999):
        text, offset = joblog.read_last_lines(path, count, block=97)
        assert text == joblog.tail_lines(data, count) and data[offset:] == text, count
    assert joblog.tail_lines(data, 2) == b"line 4999\nno newline"


def test_logs_follow_with_tail_starts_there_and_exits_0_when_completed(cli, home, workers):
    cli("add", "--id", "lf", "seq 1 50")
    workers.start(1)
    assert wait_until(lambda: cli("show", "lf", "--json").stdout.count('"completed"'))
    result = run_queuectl("logs", "lf", "--follow", "--tail", "2", home=home)
    assert result.returncode == 0
    assert result.stdout == "50\n--- queuectl job lf attempt 1 finished: exit 0 ---\n"


# -- 6. logs --follow exit codes, Ctrl-C, wait --all / --scheduled -----------------------------
def test_logs_follow_exits_1_when_the_job_ends_dead(cli, home, workers):
    cli("add", "--id", "bad", "--max-retries", "0", "echo oops; exit 3")
    workers.start(1)
    result = run_queuectl("logs", "bad", "--follow", home=home)
    assert result.returncode == 1 and "oops" in result.stdout
    assert "job bad ended dead" in result.stderr


def test_logs_follow_of_a_cancelled_job_exits_1(cli):
    cli("add", "--id", "c", "true")
    cli("cancel", "c")
    result = cli("logs", "c", "--follow", ok=False)
    assert result.exit_code == 1 and "cancelled" in result.stderr


def test_ctrl_c_in_wait_exits_130_without_aborted(cli, home):
    cli("add", "--id", "never", "true")
    with spawn_queuectl("wait", "never", home=home) as proc:
        assert proc.stderr.readline().startswith("note:")  # it is in its loop now
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        rest = proc.stderr.read()
    assert "Aborted" not in rest and "Traceback" not in rest


def test_wait_all_leaves_out_jobs_scheduled_later(cli, queue):
    cli("add", "--id", "now", "true")
    cli("add", "--id", "later", "--delay", "1h", "true")
    cli("add", "--id", "later2", "--delay", "2h", "true")
    job = queue.claim(W)
    queue.finish(job, Outcome(0, None, ""), W)
    result = cli("wait", "--all", "--json")
    assert json.loads(result.stdout)["jobs"] == {}
    assert "2 job(s) scheduled later" in result.stderr and "--scheduled" in result.stderr
    assert "in 59m" in result.stderr or "in 1h" in result.stderr
    text = cli("wait", "--all")
    assert "Nothing to wait for" in text.stdout
    timed = cli("wait", "--all", "--scheduled", "--timeout", "0.1", "--json", ok=False)
    assert timed.exit_code == 2
    assert json.loads(timed.stdout)["jobs"] == {"later": "pending", "later2": "pending"}


def test_wait_all_still_waits_for_failed_jobs_in_backoff(cli, queue):
    cli("add", "--id", "f", "false")
    queue.config_set("backoff_base", "1000")
    job = queue.claim(W)
    queue.finish(job, Outcome(1, "exit code 1", ""), W)
    result = cli("wait", "--all", "--timeout", "0.1", "--json", ok=False)
    assert result.exit_code == 2 and json.loads(result.stdout)["jobs"] == {"f": "failed"}


def test_scheduled_needs_all(cli):
    result = cli("wait", "x-1", "--scheduled", ok=False)
    assert result.exit_code == 1 and "--all" in result.stderr


# -- 9. logs of a job that has not run ---------------------------------------------------------
def test_logs_of_a_job_that_has_not_run_yet(cli):
    cli("add", "--id", "p", "true")
    result = cli("logs", "p")
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr == "job p has not run yet (pending)\n"
    assert cli("logs", "p", "--tail", "5").stderr == "job p has not run yet (pending)\n"
    cli("cancel", "p")
    assert cli("logs", "p").stderr == "job p never ran (cancelled)\n"


# -- 4. purge --dry-run ------------------------------------------------------------------------
def test_purge_dry_run_lists_and_deletes_nothing(cli, queue, home, paths):
    for name in ("c1", "c2", "p1"):
        cli("add", "--id", name, "true")
    for _ in range(2):
        done = queue.claim(W)
        queue.finish(done, Outcome(0, None, ""), W)
    paths.job_logs_dir.mkdir(parents=True, exist_ok=True)
    paths.job_log("c1").write_text("output\n")
    before = dump_db(home)
    result = cli("purge", "--state", "completed", "--dry-run")
    assert result.stdout == "c1\nc2\n"
    assert "Would purge 2 job(s)" in result.stderr and "nothing deleted" in result.stderr
    assert dump_db(home) == before and paths.job_log("c1").exists()
    assert cli("purge", "--state", "completed", "--older-than", "1d", "-n").stdout == ""
    assert cli("purge", "--state", "completed").stdout == "Purged 2 job(s).\n"
    assert not paths.job_log("c1").exists()


# -- 7. show wording -----------------------------------------------------------------------------
def test_show_finished_job_no_longer_says_cancel_requested(cli, queue):
    cli("add", "--id", "run", "sleep 100")
    running = queue.claim(W)
    cli("cancel", "run", "--wait", "0")
    assert "processing (cancel requested)" in cli("show", "run").stdout
    queue.finish(running, Outcome(-15, "cancelled while running", "", cancelled=True), W)
    text = cli("show", "run").stdout
    assert "state:       cancelled\n" in text and "cancel requested" not in text


def test_show_signal_exit_codes_as_names_json_keeps_the_integer(cli, queue):
    cli("add", "--id", "sig", "--max-retries", "1", "kill $$")
    queue.config_set("backoff_base", "0")
    first = queue.claim(W)
    queue.finish(first, Outcome(-15, None, ""), W)
    second = queue.claim(W)
    queue.finish(second, Outcome(-9, "killed by SIGKILL", ""), W)
    text = cli("show", "sig").stdout
    # Not the raw "-9" anywhere but in paths (the log's path may hold pytest-9x, 2026-12-...).
    shown = "\n".join(line for line in text.splitlines() if "/" not in line)
    assert "exit code:   killed by SIGKILL" in shown and "-9" not in shown
    runs = shown.split("runs:")[1]
    assert "killed by SIGTERM" in runs and "-15" not in runs
    data = job(cli, "sig")
    assert data["exit_code"] == -9 and [r["exit_code"] for r in data["runs"]] == [-15, -9]


# -- 8. tables fit the terminal ------------------------------------------------------------------
LONG = "echo " + "x" * 150 + " && echo done"


@pytest.mark.parametrize("columns", [60, 80, 132])
def test_list_fits_columns_and_wide_prints_everything(cli, queue, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    cli("add", "--id", "long", LONG)
    cli("add", "--id", "short", "true")
    lines = cli("list").stdout.splitlines()
    assert all(len(line) <= columns for line in lines), lines
    assert "…" in lines[1] and lines[1].split()[-1].startswith("xxx")
    assert lines[2].endswith("true")
    wide = cli("list", "--wide").stdout
    assert LONG in wide and "…" not in wide
    assert json.loads(cli("list", "--json").stdout)[0]["command"] == LONG


def test_not_a_terminal_defaults_to_80_columns(cli, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    cli("add", "--id", "long", LONG)
    lines = cli("list").stdout.splitlines()
    assert max(len(line) for line in lines) == 80


def test_dlq_list_cuts_command_and_error(cli, queue, monkeypatch):
    monkeypatch.setenv("COLUMNS", "90")
    cli("add", "--id", "d", "--max-retries", "0", LONG)
    job_ = queue.claim(W)
    queue.finish(job_, Outcome(1, "exit code 1: " + "e" * 100, ""), W)
    for argv in (["dlq", "list"], ["list", "--dlq"]):
        lines = cli(*argv).stdout.splitlines()
        assert "LAST ERROR" in lines[0] and all(len(line) <= 90 for line in lines), lines
        assert lines[1].count("…") == 2
    wide = cli("dlq", "list", "--wide").stdout
    assert LONG in wide and "e" * 100 in wide


def test_worker_status_fits_and_wide(cli, queue, workers, monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    long_id = "job-" + "i" * 60
    go = Path(str(workers.paths.home)) / "go"
    cli("add", "--id", long_id, f"while [ ! -e {go} ]; do sleep 0.02; done")
    workers.start(1)
    try:
        assert wait_until(lambda: "busy" in cli("worker", "status").stdout)
        lines = cli("worker", "status").stdout.splitlines()
        assert all(len(line) <= 50 for line in lines) and "…" in lines[1], lines
        assert long_id in cli("worker", "status", "--wide").stdout
        assert json.loads(cli("worker", "status", "--json").stdout)[0]["job"] == long_id
    finally:
        go.touch()


# -- 10. dashboard -------------------------------------------------------------------------------
def test_dashboard_port_in_use_is_one_line_suggesting_port_0(cli, home):
    import socket as sock

    holder = sock.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        result = run_queuectl("dashboard", "--port", str(port), home=home, timeout=30)
    finally:
        holder.close()
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"port {port}" in result.stderr and "--port 0" in result.stderr


def test_dashboard_help_and_readme_give_the_token_minimum(cli):
    from queuectl.cli import DASHBOARD_MIN_TOKEN
    from queuectl.dashboard import MIN_TOKEN_LENGTH

    assert DASHBOARD_MIN_TOKEN == MIN_TOKEN_LENGTH
    help_text = " ".join(cli("dashboard", "--help").stdout.split())
    assert f"at least {MIN_TOKEN_LENGTH} characters" in help_text
    assert f"at least {MIN_TOKEN_LENGTH} characters" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("host, shown", [("0.0.0.0", "http://127.0.0.1:"), ("::", "http://[::1]:")])
def test_dashboard_on_every_address_prints_a_url_a_browser_can_open(home, host, shown):
    import socket as sock

    if host == "::" and not sock.has_ipv6:
        pytest.skip("no IPv6")
    env = dict(os.environ, QUEUECTL_HOME=str(home), QUEUECTL_DASHBOARD_TOKEN="s3cret-token-here")
    proc = subprocess.Popen([sys.executable, "-m", "queuectl.cli", "dashboard", "--host", host,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        first = proc.stdout.readline()
        if not first:
            pytest.skip(f"cannot bind {host} here: {proc.stderr.read().strip()}")
        second = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert first.startswith("Dashboard: " + shown) and "0.0.0.0" not in first, first
    assert second.startswith("From other machines: http://") and sock.gethostname() in second


def test_403_names_the_token_the_user_chose(paths):
    from dashboard_support import http, running_dashboard
    from queuectl.dashboard import TOKEN_HEADER

    with running_dashboard(paths, token="chosen-by-me") as server:
        status, _, body = http(f"http://127.0.0.1:{server.port}/api/pause", "POST",
                               {TOKEN_HEADER: "wrong-token"})
    assert status == 403 and "--token" in body["error"] and "printed" not in body["error"]
    with running_dashboard(paths) as server:
        status, _, body = http(f"http://127.0.0.1:{server.port}/api/pause", "POST")
    assert status == 403 and "printed at start-up" in body["error"]


def test_page_labels_the_order_and_links_each_job():
    from queuectl.dashboard import static_file

    page = static_file("index.html").decode()
    script = static_file("app.js").decode()
    assert "newest first" in page.lower()
    assert '"#job="' in script and "hashchange" in script
    assert "jobLink(j.id)" in script  # the job list's ids are links too
    assert "printed by queuectl dashboard" not in page + script


# -- 11. ./queuectl.py without click -------------------------------------------------------------
BLOCK_CLICK = """
import runpy, sys
class NoClick:
    def find_spec(self, name, path=None, target=None):
        if name == "click" or name.startswith("click."):
            raise ModuleNotFoundError("No module named 'click'", name="click")
        return None
sys.meta_path.insert(0, NoClick())
sys.argv = [sys.argv[1], "status"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_checkout_script_without_click_says_how_to_install_it(home):
    result = subprocess.run([sys.executable, "-c", BLOCK_CLICK, str(ROOT / "queuectl.py")],
                            capture_output=True, text=True, cwd=str(ROOT), timeout=60,
                            env=dict(os.environ, QUEUECTL_HOME=str(home)))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "queuectl needs the 'click' package: pip install .  (or pip install click)\n"
    assert not (home / "queue.db").exists()


def test_checkout_script_with_click_still_runs(home):
    result = subprocess.run([sys.executable, str(ROOT / "queuectl.py"), "add", "-q", "true"],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, QUEUECTL_HOME=str(home)))
    assert result.returncode == 0 and result.stdout == "1\n", result.stderr


# -- 12. README install works under PEP 668 ------------------------------------------------------
def test_readme_install_makes_a_venv_first_and_keeps_the_ci_commands():
    text = (ROOT / "README.md").read_text()
    install = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    venv = "python3 -m venv ~/.venv/queuectl && . ~/.venv/queuectl/bin/activate && pip install ."
    assert venv in install and "pipx install ." in install
    assert install.index(venv) < install.index("pip install . && bash demo_script.sh")
    assert "pip install -e '.[test]' && pytest" in install
    for flag in ("--quiet", "--json", "--tail", "--dry-run", "--wide", "--scheduled", "130",
                 "No such option", "note: no workers are running", "#job=ID"):
        assert flag in text, flag
