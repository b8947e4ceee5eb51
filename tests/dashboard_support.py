"""Helpers for the dashboard tests: a server on an ephemeral loopback port, HTTP calls, seed data."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

from queuectl import dashboard
from queuectl.executor import Outcome
from queuectl.jobspec import parse_job
from queuectl.models import Queue
from queuectl.paths import Paths

WORKER = "test-host:1:1"  # a pretend worker: nothing recovers its job, no process exists


@contextmanager
def running_dashboard(paths: Paths, token: Optional[str] = None) -> Iterator[dashboard.DashboardServer]:
    """A dashboard on 127.0.0.1, random port, served by a thread; always shut down."""
    server = dashboard.make_server(paths, "127.0.0.1", 0, token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="dashboard", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
        assert not thread.is_alive(), "dashboard thread did not stop"


def http(url: str, method: str = "GET", headers: Optional[Dict[str, str]] = None,
         body: Optional[bytes] = None, timeout: float = 30) -> Tuple[int, Dict[str, str], Any]:
    """(status, headers, decoded JSON or raw bytes); HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if method == "POST" and body is None:
        request.data = b""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, dict(exc.headers), exc.read()
    if head.get("Content-Type", "").startswith("application/json"):
        return status, head, json.loads(raw)
    return status, head, raw


def add(queue: Queue, **fields: Any) -> str:
    fields.setdefault("command", "true")
    return queue.enqueue([parse_job(fields, now=queue.clock(), default_cwd="/")])[0].id


def _run_next(queue: Queue, outcome: Optional[Outcome]) -> Dict[str, Any]:
    job = queue.claim(WORKER)
    assert job is not None
    if outcome is not None:
        queue.finish(job, outcome, WORKER)
    return queue.get(job["id"])


def seed_jobs(queue: Queue) -> Dict[str, str]:
    """One or more jobs in every state, made through the models layer: {id: state}."""
    made: Dict[str, str] = {}

    def step(job_id: str, outcome: Optional[Outcome], **fields: Any) -> None:
        add(queue, id=job_id, **fields)
        made[job_id] = _run_next(queue, outcome)["state"]

    step("build-docs", Outcome(0, None, "built 42 pages\n"), command="make docs")
    step("backup-db", Outcome(0, None, "dumped 1.2 GB\nuploaded\n"), command="pg_dump app | gzip > /srv/app.sql.gz")
    step("sync-mirror", Outcome(1, "exit code 1", "rsync: connection refused\n"),
         command="rsync -a mirror:/data /data", max_retries=3)
    step("send-report", Outcome(2, "exit code 2", "smtp: 550 mailbox unavailable\n"),
         command="mail -s report ops@example.com < report.txt", max_retries=0)
    step("reindex", None, command="sleep 600 && ./reindex.sh")
    for job_id, command in (("thumbs-1", "convert a.jpg -resize 50% a-small.jpg"),
                            ("thumbs-2", "convert b.jpg -resize 50% b-small.jpg")):
        add(queue, id=job_id, command=command)
        made[job_id] = "pending"
    add(queue, id="old-cleanup", command="find /tmp -mtime +7 -delete")
    queue.cancel(["old-cleanup"])
    made["old-cleanup"] = "cancelled"
    assert queue.get("sync-mirror")["state"] == "failed" and queue.get("send-report")["state"] == "dead"
    return made
