"""Dashboard over real HTTP on 127.0.0.1 (ephemeral port): read API, actions, token and origin checks."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dashboard_support import WORKER, add, http, running_dashboard, seed_jobs
from helpers import dump_db, wait_until

from queuectl import dashboard, joblog
from queuectl.dashboard import TOKEN_HEADER


@pytest.fixture
def server(paths):
    with running_dashboard(paths) as srv:
        yield srv


def url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def post(server, path: str, token=None, **headers: str):
    if token is not None:
        headers[TOKEN_HEADER] = token
    return http(url(server, path), "POST", {k.replace("_", "-"): v for k, v in headers.items()})


# -- read API ----------------------------------------------------------------------------------
def test_status_counts_match_the_database(server, queue):
    seed_jobs(queue)
    status, head, body = http(url(server, "/api/status"))
    assert status == 200 and head["Content-Type"].startswith("application/json")
    assert body["jobs"] == queue.counts()
    assert body["jobs"] == {"pending": 2, "processing": 1, "completed": 2, "failed": 1, "dead": 1,
                            "cancelled": 1}
    assert body["total"] == 8 and body["paused"] is False and body["workers"] == []


def test_jobs_newest_first_filtered_by_state_with_limit(server, queue):
    seed_jobs(queue)
    status, _, body = http(url(server, "/api/jobs?state=pending"))
    assert status == 200
    assert [j["id"] for j in body["jobs"]] == ["thumbs-2", "thumbs-1"] and body["more"] is False
    assert all("output_tail" not in j for j in body["jobs"])  # the list stays light
    _, _, body = http(url(server, "/api/jobs?state=dead,failed"))
    assert {j["id"] for j in body["jobs"]} == {"send-report", "sync-mirror"}
    _, _, body = http(url(server, "/api/jobs?limit=3"))
    assert [j["id"] for j in body["jobs"]] == ["old-cleanup", "thumbs-2", "thumbs-1"] and body["more"] is True
    for bad in ("state=bogus", "limit=0", "limit=x", "limit=1001"):
        status, _, body = http(url(server, f"/api/jobs?{bad}"))
        assert status == 400 and body["error"], bad


def test_job_detail_with_output_tail_and_runs(server, queue):
    seed_jobs(queue)
    status, _, job = http(url(server, "/api/jobs/send-report"))
    assert status == 200
    assert job["state"] == "dead" and job["exit_code"] == 2 and job["last_error"] == "exit code 2"
    assert job["output"] == "smtp: 550 mailbox unavailable\n"
    assert [r["attempt"] for r in job["runs"]] == [1] and job["effective_max_retries"] == 0
    assert job["command_text"] == "mail -s report ops@example.com < report.txt"
    assert job["log_file"].endswith("send-report.log")
    assert http(url(server, "/api/jobs/no-such-job"))[0] == 404
    assert http(url(server, "/api/jobs/..%2Fetc"))[0] == 400


def test_argv_job_is_shown_as_a_shell_line(server, queue):
    add(queue, id="argv-job", command=["printf", "%s\n", "two words"])
    _, _, job = http(url(server, "/api/jobs/argv-job"))
    assert job["command"] == ["printf", "%s\n", "two words"]
    assert job["command_text"] == "printf '%s\n' 'two words'"


def test_running_job_shows_live_output_of_its_current_attempt(server, queue, paths):
    seed_jobs(queue)
    log = paths.job_log("reindex")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(joblog.header("reindex", 1, WORKER, "old") + b"first attempt said this\n"
                    + joblog.header("reindex", 2, WORKER, "sleep 600") + b"indexing 10%\nindexing 20%\n")
    _, _, job = http(url(server, "/api/jobs/reindex"))
    assert job["state"] == "processing"
    assert job["output"] == "$ sleep 600\nindexing 10%\nindexing 20%\n"


def test_a_completed_job_without_a_log_file_says_so_and_one_with_a_file_names_it(server, queue, paths):
    seed_jobs(queue)  # build-docs and backup-db completed; no log files were written
    paths.job_log("backup-db").parent.mkdir(parents=True, exist_ok=True)
    paths.job_log("backup-db").write_bytes(b"dumped\n")
    assert http(url(server, "/api/jobs/build-docs"))[2]["log_file"] is None  # a silent run's, pruned
    assert http(url(server, "/api/jobs/backup-db"))[2]["log_file"] == str(paths.job_log("backup-db"))
    assert http(url(server, "/api/jobs/send-report"))[2]["log_file"] == str(paths.job_log("send-report"))


def test_live_output_skips_the_spools_earlier_sections(server, queue, paths):
    seed_jobs(queue)
    log = paths.job_log("reindex")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(joblog.header("other", 1, WORKER, "true") + joblog.result_line("other", 1, None)
                    + joblog.header("reindex", 1, WORKER, "sleep 600") + b"indexing 10%\n")
    assert http(url(server, "/api/jobs/reindex"))[2]["output"] == "$ sleep 600\nindexing 10%\n"


def test_workers_endpoint_shows_a_real_worker_idle_then_busy(server, cli, workers):
    (pid,) = workers.start(1)
    _, _, body = http(url(server, "/api/workers"))
    assert [(w["pid"], w["state"], w["job"]) for w in body["workers"]] == [(pid, "idle", None)]
    cli("add", "--id", "slow", "sleep", "30")

    def busy():
        rows = http(url(server, "/api/status"))[2]["workers"]
        return rows and rows[0]["state"] == "busy" and rows[0]["job"] == "slow"

    wait_until(busy, timeout=30, message="worker busy with job 'slow' in /api/status")
    assert workers.stop("--force", "--wait", "20").returncode == 0
    wait_until(lambda: not workers.alive(), timeout=30, message="worker exit")


def test_reads_change_nothing_not_even_stale_pid_files(server, queue, paths, home):
    seed_jobs(queue)
    paths.workers_dir.mkdir(parents=True, exist_ok=True)
    stale = paths.workers_dir / "999999.json"
    stale.write_text(json.dumps({"pid": 999999, "start": 1, "started_at": 1.0, "worker_id": "x:999999:1"}))
    before = dump_db(home)
    for path in ("/api/status", "/api/workers", "/api/jobs", "/api/jobs/reindex", "/"):
        assert http(url(server, path))[0] == 200, path
    assert http(url(server, "/api/status"))[2]["workers"] == []
    assert stale.exists() and dump_db(home) == before


# -- actions and their guard ----------------------------------------------------------------
def test_action_without_or_with_wrong_token_is_refused_and_changes_nothing(server, queue, home):
    seed_jobs(queue)
    before = dump_db(home)
    for token in (None, "", "wrong-token-123", server.token + "x", server.token[:-1]):
        for path in ("/api/pause", "/api/jobs/send-report/retry", "/api/jobs/thumbs-1/cancel"):
            status, _, body = post(server, path, token)
            assert status == 403, (path, token)
            assert TOKEN_HEADER in body["error"]
    assert dump_db(home) == before


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"},                      # another local port is another origin
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"},
])
def test_cross_site_request_is_refused_even_with_the_right_token(server, queue, home, headers):
    seed_jobs(queue)
    before = dump_db(home)
    status, _, body = post(server, "/api/pause", server.token, **headers)
    assert status == 403 and "cross-site" in body["error"]
    assert dump_db(home) == before and not queue.paused()


def test_dns_rebinding_host_is_refused_for_page_and_api(server):
    for path in ("/", "/api/status"):
        status, _, body = http(url(server, path), headers={"Host": f"evil.example:{server.port}"})
        assert status == 403 and "Host" in body["error"]
    assert http(url(server, "/api/status"), headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_right_token_from_the_page_applies_pause_and_resume(server, queue):
    origin = f"http://127.0.0.1:{server.port}"
    status, _, body = post(server, "/api/pause", server.token, Origin=origin, Sec_Fetch_Site="same-origin")
    assert status == 200 and body == {"ok": True, "paused": True}
    assert queue.paused()
    assert http(url(server, "/api/status"))[2]["paused"] is True
    assert post(server, "/api/resume", server.token)[0] == 200  # curl-style: no Origin at all
    assert not queue.paused()


def test_retry_dead_and_failed_jobs(server, queue):
    seed_jobs(queue)
    status, _, body = post(server, "/api/jobs/send-report/retry", server.token)
    assert status == 200 and body["id"] == "send-report"
    job = queue.get("send-report")
    # Out of the DLQ: attempt numbers go on, the retry budget starts afresh.
    assert job["state"] == "pending" and job["retry_base"] == job["attempts"]
    assert post(server, "/api/jobs/sync-mirror/retry", server.token)[0] == 200
    job = queue.get("sync-mirror")
    assert job["state"] == "pending" and job["run_at"] <= time.time()
    status, _, body = post(server, "/api/jobs/build-docs/retry", server.token)
    assert status == 409 and "completed" in body["error"]
    assert post(server, "/api/jobs/no-such-job/retry", server.token)[0] == 404


def test_cancel_waiting_and_running_jobs(server, queue):
    seed_jobs(queue)
    status, _, body = post(server, "/api/jobs/thumbs-1/cancel", server.token)
    assert status == 200 and body["result"] == "cancelled"
    assert queue.get("thumbs-1")["state"] == "cancelled"
    status, _, body = post(server, "/api/jobs/reindex/cancel", server.token)
    assert status == 200 and body["result"] == "cancelling"  # its worker kills it
    assert queue.get("reindex")["cancel_requested"] == 1
    status, _, body = post(server, "/api/jobs/build-docs/cancel", server.token)
    assert status == 409 and "already completed" in body["error"]
    assert post(server, "/api/jobs/thumbs-2/explode", server.token)[0] == 404


def test_bad_or_huge_body_is_refused_before_any_action(server, queue):
    import http.client

    for length in ("-5", "abc", str(10 ** 9)):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.putrequest("POST", "/api/pause")
            conn.putheader("Content-Length", length)
            conn.putheader(TOKEN_HEADER, server.token)
            conn.endheaders()
            assert conn.getresponse().status in (400, 413), length
        finally:
            conn.close()
    assert not queue.paused()


def test_unsafe_methods_and_preflight_get_no_cors_grant(server):
    for method in ("OPTIONS", "PUT", "DELETE"):
        status, head, _ = http(url(server, "/api/pause"), method,
                               {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                                "Access-Control-Request-Headers": TOKEN_HEADER})
        assert status == 405
        assert not any(k.lower().startswith("access-control-") for k in head)


def test_non_loopback_server_needs_the_token_for_reads_too(server):
    server.open_reads = False  # what a --host 0.0.0.0 server does; we stay on loopback here
    assert http(url(server, "/api/status"))[0] == 403
    assert http(url(server, "/api/status"), headers={TOKEN_HEADER: server.token})[0] == 200
    assert http(url(server, "/"))[0] == 200  # the page holds no data


# -- the page -----------------------------------------------------------------------------------
def test_page_and_assets_are_served_with_a_strict_policy_and_no_external_urls(server):
    status, head, page = http(url(server, "/"))
    assert status == 200 and head["Content-Type"].startswith("text/html")
    assert b'src="app.js"' in page and b'href="style.css"' in page
    csp = head["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "http" not in csp
    assert head["X-Frame-Options"] == "DENY" and head["X-Content-Type-Options"] == "nosniff"
    for asset, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        status, head, text = http(url(server, asset))
        assert status == 200 and head["Content-Type"].startswith(kind)
        assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{asset} refers to a remote URL"
    assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", page)
    assert b"innerHTML" not in http(url(server, "/app.js"))[2]  # data goes in as text only
    for path in ("/nope", "/../setup.py", "/static/app.js", "/api/nope"):
        assert http(url(server, path))[0] == 404, path


def test_assets_ship_as_package_data():
    for name in ("index.html", "app.js", "style.css"):
        assert dashboard.static_file(name)


# -- start-up policy ---------------------------------------------------------------------------
@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("myhost.example", False),
])
def test_is_loopback(host, loopback):
    assert dashboard.is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "myhost.example"])
def test_cli_refuses_a_non_loopback_host_without_token(cli, home, host):
    result = cli("dashboard", "--host", host, "--port", "0", ok=False)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--token" in result.stderr


def test_cli_reports_a_port_in_use_in_one_line(cli, server):
    result = cli("dashboard", "--port", str(server.port), ok=False)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "in use" in result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_refuses_a_short_token(cli):
    result = cli("dashboard", "--token", "abc", "--port", "0", ok=False)
    assert result.exit_code == 1 and "at least 8" in result.stderr


class LineReader:
    """Lines from a child's stdout with a deadline: select() on the raw fd, our own buffer.

    (A buffered readline() could swallow two lines at once and leave select() waiting.)
    """

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.buffer = b""

    def line(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line from queuectl dashboard in {timeout}s; got {self.buffer!r}")
            if select.select([fd], [], [], min(left, 0.5))[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise AssertionError(f"queuectl dashboard exited ({self.proc.wait()}); got {self.buffer!r}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def start_dashboard(home: Path, *args: str, **env_extra: str) -> subprocess.Popen:
    env = dict(os.environ, QUEUECTL_HOME=str(home), **env_extra)
    if "QUEUECTL_DASHBOARD_TOKEN" not in env_extra:
        env.pop("QUEUECTL_DASHBOARD_TOKEN", None)
    return subprocess.Popen([sys.executable, "-m", "queuectl.cli", "dashboard", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)


def stop(proc: subprocess.Popen) -> None:
    """Always called: the dashboard never outlives its test."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()


def test_cli_serves_on_an_ephemeral_port_and_stops_on_sigterm(home, queue):
    add(queue, id="one", command="true")
    proc = start_dashboard(home, "--port", "0")
    try:
        out = LineReader(proc)
        first = out.line()
        match = re.match(r"Dashboard: (http://127\.0\.0\.1:(\d+)/)#token=(\S+)$", first.strip())
        assert match, first
        base, port, token = match.group(1), int(match.group(2)), match.group(3)
        assert port not in (0, 8420)
        assert token in out.line()
        status, _, body = http(base + "api/status")
        assert status == 200 and body["jobs"]["pending"] == 1
        assert http(base + "api/pause", "POST")[0] == 403
        assert http(base + "api/pause", "POST", {TOKEN_HEADER: token})[0] == 200
        assert queue.paused()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "Press Ctrl-C to stop." in out.line() and "Dashboard stopped." in out.line()
    finally:
        stop(proc)


def test_cli_with_explicit_token_from_the_environment(home):
    proc = start_dashboard(home, "--port", "0", QUEUECTL_DASHBOARD_TOKEN="s3cret-token-for-test")
    try:
        first = LineReader(proc).line()
        assert "s3cret" not in first  # a chosen secret is not echoed into logs
        base = re.search(r"(http://127\.0\.0\.1:\d+/)", first).group(1)
        assert http(base + "api/pause", "POST", {TOKEN_HEADER: "s3cret-token-for-test"})[0] == 200
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)
