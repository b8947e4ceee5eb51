"""The dashboard in a real headless Chromium: live counts, actions, output, no cross-site writes.

Skipped when no Chromium is installed ($QUEUECTL_CHROMIUM, PATH, /usr/bin/chromium), unless QUEUECTL_REQUIRE_BROWSER=1 (CI), which turns the
missing browser into a failure. Screenshots land in tmp_path, and also in
$QUEUECTL_SCREENSHOT_DIR when that is set (for CI artifacts).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chromium_cdp import Chromium, find_chromium, processes_using
from dashboard_support import add, running_dashboard, seed_jobs
from helpers import wait_until

# A real browser per test is the costly part; the dashboard's store calls run on both
# backends in test_dashboard.py.
pytestmark = pytest.mark.sqlite_only

REQUIRE_BROWSER = os.environ.get("QUEUECTL_REQUIRE_BROWSER", "") not in ("", "0")
STATES = ("pending", "processing", "completed", "failed", "dead", "cancelled")
DEADLINE = 60  # seconds; generous: two cores shared with other test runs


@pytest.fixture
def browser(tmp_path: Path):
    binary = find_chromium()
    if binary is None:
        reason = "headless Chromium not found (install the Debian package 'chromium')"
        if REQUIRE_BROWSER:
            pytest.fail(reason + "; QUEUECTL_REQUIRE_BROWSER=1 makes a missing browser a failure")
        pytest.skip(reason)
    profile = tmp_path / "chromium-profile"
    chromium = Chromium(binary, profile, tmp_path / "chromium.log")
    try:
        chromium.open_page()
        yield chromium
    finally:
        chromium.close()
        leftover = processes_using(str(profile))
        assert not leftover, f"browser processes left behind: {leftover}"


@pytest.fixture
def server(paths):
    with running_dashboard(paths) as srv:
        yield srv


def shown_counts(browser: Chromium):
    """The numbers on the page, once it has loaded data at least once."""
    return browser.evaluate(
        "document.body && document.body.dataset.loaded ? Object.fromEntries("
        f"{list(STATES)!r}.map(s => [s, Number(document.getElementById('count-' + s).textContent)]))"
        " : null")


def wait_for_counts(browser: Chromium, queue, message: str) -> None:
    wait_until(lambda: shown_counts(browser) == queue.counts(), timeout=DEADLINE, interval=0.2,
               message=f"{message}: page shows {shown_counts(browser)}, DB has {queue.counts()}")


def click(browser: Chromium, selector: str) -> None:
    assert browser.evaluate(f"(() => {{ const e = document.querySelector({selector!r});"
                            " if (!e) return false; e.click(); return true; })()"), selector


def save_screenshot(browser: Chromium, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    data = browser.screenshot(target)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a rendered page, not blank
    extra = os.environ.get("QUEUECTL_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(target, Path(extra) / name)
    return target


def test_page_tracks_the_database_live_and_acts_with_the_token(browser, server, queue, tmp_path):
    seed_jobs(queue)
    add(queue, id="html-job", command="echo '<img src=x onerror=alert(1)><b>bold</b>'")
    browser.navigate(f"http://127.0.0.1:{server.port}/#token={server.token}")
    wait_for_counts(browser, queue, "first load")
    assert browser.evaluate("location.hash") == ""  # the token left the address bar
    browser.evaluate("window.sameDocument = true")

    # Live: new jobs show up without a reload.
    for n in range(3):
        add(queue, id=f"late-{n}", command="true")
    wait_for_counts(browser, queue, "after enqueueing 3 jobs")
    assert browser.evaluate("window.sameDocument === true"), "the page reloaded"

    # Job commands are text, never markup.
    assert browser.evaluate("document.querySelector('#jobs-table img, #jobs-table b') === null")
    assert "<b>bold</b>" in browser.evaluate("document.getElementById('jobs-table').textContent")

    # Job detail with its output tail.
    click(browser, '#jobs-table tbody tr[data-id="backup-db"]')
    wait_until(lambda: "uploaded" in browser.evaluate("document.getElementById('detail-output').textContent"),
               timeout=DEADLINE, interval=0.2, message="output tail of backup-db in the detail panel")
    save_screenshot(browser, tmp_path, "dashboard.png")

    # DLQ retry from the page: a real same-origin POST with the token.
    click(browser, '#dlq-table button[data-retry="send-report"]')
    wait_until(lambda: queue.get("send-report")["state"] == "pending", timeout=DEADLINE,
               message="send-report back to pending")
    job = queue.get("send-report")
    assert job["retry_base"] == job["attempts"]  # a fresh retry budget; attempt numbers go on
    wait_for_counts(browser, queue, "after DLQ retry")

    # Pause and resume from the header button.
    click(browser, "#pause-toggle")
    wait_until(queue.paused, timeout=DEADLINE, message="queue paused by the page")
    wait_until(lambda: "PAUSED" in browser.evaluate("document.getElementById('queue-state').textContent"),
               timeout=DEADLINE, interval=0.2, message="paused badge")
    click(browser, "#pause-toggle")
    wait_until(lambda: not queue.paused(), timeout=DEADLINE, message="queue resumed by the page")

    # Cancel a pending job from its detail panel.
    click(browser, '#jobs-table tbody tr[data-id="thumbs-1"]')
    wait_until(lambda: browser.evaluate("!document.getElementById('detail-cancel').hidden "
                                        "&& document.getElementById('detail-id').textContent === 'thumbs-1'"),
               timeout=DEADLINE, interval=0.2, message="cancel button for thumbs-1")
    click(browser, "#detail-cancel")
    wait_until(lambda: queue.get("thumbs-1")["state"] == "cancelled", timeout=DEADLINE,
               message="thumbs-1 cancelled by the page")
    wait_for_counts(browser, queue, "after cancel")
    assert browser.page_errors() == []  # no script error, no CSP violation


def detail_id(browser: Chromium) -> str:
    return browser.evaluate("document.body && document.body.dataset.loaded ? document.getElementById('detail-id').textContent : ''")


def test_each_job_has_a_link_of_its_own(browser, server, queue):
    """#job=ID opens that job's details; the ids in the list are such links; a token in the
    same fragment is taken and dropped, the job stays in the address bar."""
    seed_jobs(queue)
    base = f"http://127.0.0.1:{server.port}"
    browser.navigate(f"{base}/#job=backup-db")
    wait_until(lambda: detail_id(browser) == "backup-db", timeout=DEADLINE, interval=0.2,
               message="#job=backup-db opens its details")
    link = "document.querySelector('#jobs-table tbody tr[data-id=\"thumbs-1\"] a')"
    # The details pane and the job list are fetched separately: wait for the row itself.
    href = wait_until(lambda: browser.evaluate(f"{link} && {link}.getAttribute('href')"),
                      timeout=DEADLINE, interval=0.2, message="the job list to show thumbs-1")
    assert href == "#job=thumbs-1"
    click(browser, '#jobs-table tbody tr[data-id="thumbs-1"] a')
    wait_until(lambda: detail_id(browser) == "thumbs-1", timeout=DEADLINE, interval=0.2,
               message="the link opens thumbs-1")
    assert browser.evaluate("location.hash") == "#job=thumbs-1"
    browser.navigate(f"{base}/index.html#token={server.token}&job=backup-db")
    wait_until(lambda: detail_id(browser) == "backup-db", timeout=DEADLINE, interval=0.2,
               message="token and job in one fragment")
    assert browser.evaluate("location.hash") == "#job=backup-db"
    assert browser.evaluate("document.getElementById('token-status').textContent") == "actions enabled"
    assert "newest first" in browser.evaluate("document.querySelector('.jobs-panel h2').textContent")
    assert browser.page_errors() == []


def test_without_the_token_the_page_is_read_only(browser, server, queue):
    seed_jobs(queue)
    browser.navigate(f"http://127.0.0.1:{server.port}/")
    wait_for_counts(browser, queue, "first load")
    assert browser.evaluate("!document.getElementById('token-form').hidden")
    click(browser, '#dlq-table button[data-retry="send-report"]')
    wait_until(lambda: "token" in browser.evaluate("document.getElementById('message').textContent"),
               timeout=DEADLINE, interval=0.2, message="a message asking for the token")
    assert queue.get("send-report")["state"] == "dead"


class _ForeignSite(BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args) -> None:
        pass


def test_a_foreign_page_cannot_act_even_knowing_the_token(browser, server, queue):
    """Another origin on this machine (a different port) tries every way a page can POST."""
    seed_jobs(queue)
    target = f"http://127.0.0.1:{server.port}"
    page = f"""<!doctype html><body>
<iframe name="sink"></iframe>
<form id="f" method="post" action="{target}/api/jobs/send-report/retry" target="sink"></form>
<script>
window.results = null;
const token = {server.token!r};
document.querySelector('iframe').addEventListener('load', () => {{ window.formDone = true; }});
Promise.all([
  fetch("{target}/api/pause", {{method: "POST", headers: {{"X-Queuectl-Token": token}}}})
    .then(r => "answered " + r.status, e => "blocked"),
  fetch("{target}/api/pause", {{method: "POST", mode: "no-cors", body: "x"}})
    .then(r => "sent (" + r.type + ")", e => "blocked"),
]).then(r => {{ window.results = r; document.getElementById('f').submit(); }});
</script></body>"""
    handler = type("Foreign", (_ForeignSite,), {"page": page.encode()})
    foreign = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=foreign.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        browser.navigate(f"http://localhost:{foreign.server_address[1]}/")
        results = wait_until(lambda: browser.evaluate("window.results"), timeout=DEADLINE,
                             interval=0.2, message="the foreign page's fetches")
        wait_until(lambda: browser.evaluate("window.formDone === true"), timeout=DEADLINE,
                   interval=0.2, message="the foreign form POST")
    finally:
        foreign.shutdown()
        foreign.server_close()
        thread.join(timeout=30)
    # With the custom header the browser needs a CORS preflight, which we never grant;
    # the simple no-cors POST does reach us and is refused (Origin/Sec-Fetch-Site).
    assert results == ["blocked", "sent (opaque)"]
    assert not queue.paused()
    assert queue.get("send-report")["state"] == "dead"


@pytest.mark.parametrize("require, outcome, code", [("", "1 skipped", 0), ("1", "1 error", 1)])
def test_missing_browser_skips_or_fails_as_ci_demands(tmp_path, require, outcome, code):
    """Without a browser the tests skip with a reason; QUEUECTL_REQUIRE_BROWSER=1 fails them."""
    env = dict(os.environ, QUEUECTL_CHROMIUM=str(tmp_path / "no-such-chromium"),
               QUEUECTL_REQUIRE_BROWSER=require, QUEUECTL_HOME=str(tmp_path / "qhome"))
    node = f"{__file__}::test_without_the_token_the_page_is_read_only[sqlite]"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", node],
                            capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert outcome in result.stdout and result.returncode == code, result.stdout + result.stderr
    assert "headless Chromium not found" in result.stdout
    if require:
        assert "QUEUECTL_REQUIRE_BROWSER=1" in result.stdout
