"""Live web dashboard: one static page plus a small JSON API, served by the standard library.

Why http.server: the page polls a handful of cheap queries every couple of seconds for one
or a few operators; a thread per request over SQLite in WAL mode is plenty, and it keeps
queuectl free of run-time dependencies. Each request opens its own store (sqlite3
connections are never shared between threads) and closes it before the thread ends.

Security model (see ``Handler._refuse``):
- reads (GET /api/...) are open on a loopback bind; on any other bind they need the token;
- actions are POSTs that need the token in the ``X-Queuectl-Token`` header. A custom header
  cannot be sent cross-origin without a CORS preflight, which this server never grants;
  on top of that, requests whose ``Origin`` is not this server or whose ``Sec-Fetch-Site`` is
  not same-origin are refused, so a foreign web page cannot act even if it guessed the token;
- on a loopback bind the ``Host`` header must be a loopback name (defeats DNS rebinding);
- a bind to a non-loopback address is refused unless the operator chose a token.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import shlex
import signal
import socket
import time
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from queuectl import __version__, joblog, worker_launcher
from queuectl.errors import Conflict, InvalidInput, NotFound, QueueError, StorageError
from queuectl.models import Queue
from queuectl.paths import Paths
from queuectl.schedules import Schedules
from queuectl.store import INTERNAL_COLUMNS, open_store

TOKEN_HEADER = "X-Queuectl-Token"
MIN_TOKEN_LENGTH = 8
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_BODY = 64 * 1024
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
WILDCARDS = {"", "0.0.0.0", "::"}

STATIC = {  # URL path -> (file in queuectl/static, content type); nothing else is served
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_ERROR_STATUS = {NotFound: HTTPStatus.NOT_FOUND, Conflict: HTTPStatus.CONFLICT,
                 InvalidInput: HTTPStatus.BAD_REQUEST, StorageError: HTTPStatus.SERVICE_UNAVAILABLE}


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP literals; anything else may be reachable by others."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token(host: str, token: Optional[str]) -> str:
    """The token to use: the given one, or a fresh random one on a loopback bind.

    A non-loopback bind without an explicit token is refused: a token that only the
    server's terminal knows would make the page unusable from the other machines anyway,
    and a forgotten ``--host 0.0.0.0`` should not silently expose the queue.
    """
    if token is not None:
        token = token.strip()
        if len(token) < MIN_TOKEN_LENGTH:
            raise InvalidInput(f"--token must be at least {MIN_TOKEN_LENGTH} characters")
        return token
    if not is_loopback(host):
        raise InvalidInput(f"--host {host} is not a loopback address: anyone who can reach it could "
                           "see your jobs; pass --token T (or set QUEUECTL_DASHBOARD_TOKEN) to allow it")
    return secrets.token_urlsafe(24)


def public_job(job: Dict[str, Any], with_output: bool = True) -> Dict[str, Any]:
    """A job as the page sees it: command decoded and printable, internal columns dropped."""
    out = {k: v for k, v in job.items() if k not in INTERNAL_COLUMNS}
    if "grp" in job:
        out["group"] = job["grp"]
    command = job.get("command")
    if job.get("argv") and isinstance(command, str):
        command = json.loads(command)
        out["command"] = command
    out["command_text"] = shlex.join(command) if isinstance(command, list) else command
    if not with_output:
        out.pop("output_tail", None)
    return out


def worker_rows(paths: Paths, queue: Queue) -> List[Dict[str, Any]]:
    """Every host's workers; neither stale PID files nor gone registry rows are cleaned:
    a GET changes nothing."""
    return worker_launcher.worker_rows(paths, queue.processing, clean=False, registry=queue)


def live_output(paths: Paths, job_id: str) -> str:
    """The running attempt's output so far (bounded tail of the log, from its last header)."""
    return joblog.running_output(paths.job_log(job_id), job_id)


def static_file(name: str) -> bytes:
    """A page asset shipped as package data (works for editable and regular installs)."""
    return (resources.files("queuectl") / "static" / name).read_bytes()


class DashboardServer(ThreadingHTTPServer):
    """One thread per request (HTTP/1.0, no keep-alive: nothing lingers at shutdown)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], paths: Paths, token: str,
                 log: Optional[Callable[[str], None]] = None, token_chosen: bool = False) -> None:
        host = address[0]
        if ":" in host.strip("[]"):
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), address[1]), Handler)
        self.paths = paths
        self.token = token
        self.host = host.strip("[]")
        self.loopback = is_loopback(self.host)
        self.open_reads = self.loopback  # elsewhere every /api/ request needs the token
        self.token_chosen = token_chosen  # the operator's own token, not one we printed
        self.log = log or (lambda message: None)

    def server_bind(self) -> None:
        """Like HTTPServer's, minus its reverse-DNS lookup of the host (slow on some networks)."""
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def wildcard(self) -> bool:
        """Bound to every address (0.0.0.0 or ::): not something a browser can open."""
        return self.host in WILDCARDS

    @property
    def url(self) -> str:
        """A URL a browser on this machine can open (a wildcard bind is reached on loopback)."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def remote_url(self) -> Optional[str]:
        """For a wildcard bind: the URL other machines use (this host's name), else None."""
        if not self.wildcard:
            return None
        return f"http://{socket.gethostname()}:{self.port}/"


def make_server(paths: Paths, host: str = "127.0.0.1", port: int = 8420, token: Optional[str] = None,
                log: Optional[Callable[[str], None]] = None) -> DashboardServer:
    """Check the bind policy, then bind (port 0 = an ephemeral port; see ``server.url``)."""
    return DashboardServer((host, port), paths, check_token(host, token), log,
                           token_chosen=token is not None)


def run(server: DashboardServer) -> None:
    """Serve until Ctrl-C or SIGTERM, then close the socket."""
    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()


METRICS_PATH = "/metrics"  # Prometheus text format; a read like /api/ (token off loopback)


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = f"queuectl-dashboard/{__version__}"

    def version_string(self) -> str:
        return self.server_version

    # -- plumbing -------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet: a poll every 2 s would flood the terminal. Errors go to server.log."""

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = HTTPStatus.OK) -> None:
        body = json.dumps(data, default=str).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    @contextmanager
    def _queue(self) -> Iterator[Queue]:
        paths = self.server.paths
        store = open_store(paths, "cli")
        try:
            yield Queue(store)
        finally:
            store.close()

    def _refuse(self, path: str, write: bool) -> Optional[str]:
        """Why this request must be refused (403), or None."""
        server = self.server
        host = (self.headers.get("Host") or "").strip()
        name = urlsplit(f"//{host}").hostname or ""
        if server.loopback and name not in LOOPBACK_NAMES | {server.host}:
            return "unexpected Host header (use the URL printed by queuectl dashboard)"
        if not (write or path.startswith("/api/") or path == METRICS_PATH):
            return None  # the page itself holds no data
        fetch_site = self.headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return f"cross-site request refused (Sec-Fetch-Site: {fetch_site})"
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            return "cross-site request refused (Origin does not match this dashboard)"
        if write or not server.open_reads:
            given = self.headers.get(TOKEN_HEADER) or ""
            bearer = self.headers.get("Authorization") or ""
            if not given and path == METRICS_PATH and bearer.startswith("Bearer "):
                given = bearer[len("Bearer "):].strip()  # what Prometheus' bearer_token sends
            if not hmac.compare_digest(given.encode(), server.token.encode()):
                where = ("the token given with --token or QUEUECTL_DASHBOARD_TOKEN" if server.token_chosen
                         else "the token printed at start-up")
                return f"missing or wrong {TOKEN_HEADER} header ({where})"
        return None

    def _dispatch(self, write: bool) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        try:
            reason = self._refuse(path, write)
            if reason:
                raise HttpError(HTTPStatus.FORBIDDEN, reason)
            if write:
                self._post(path)
            elif path.startswith("/api/"):
                self._get_api(path, parse_qs(parts.query))
            elif path == METRICS_PATH:
                from queuectl import metrics

                with self._queue() as queue:
                    body = metrics.render(queue.metrics_snapshot()).encode("utf-8")
                self._send(HTTPStatus.OK, body, "text/plain; version=0.0.4; charset=utf-8")
            elif path in STATIC:
                name, content_type = STATIC[path]
                self._send(HTTPStatus.OK, static_file(name), content_type)
            else:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        except HttpError as exc:
            self._json({"error": str(exc)}, exc.status)
        except QueueError as exc:
            status = next((s for kind, s in _ERROR_STATUS.items() if isinstance(exc, kind)),
                          HTTPStatus.BAD_REQUEST)
            self._json({"error": str(exc)}, status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug: answer, log, keep serving
            self.server.log(f"dashboard: error on {self.command} {path}: {type(exc).__name__}: {exc}")
            self._json({"error": f"internal error: {type(exc).__name__}"},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch(write=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(write=False)

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._json({"error": "bad Content-Length"}, HTTPStatus.BAD_REQUEST)
            return
        if length > MAX_BODY:
            self._json({"error": "request body too large"}, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return
        if length:
            self.rfile.read(length)  # actions take no body; read it so the client sees our answer
        self._dispatch(write=True)

    def _not_allowed(self) -> None:
        # Also answers CORS preflights: no Access-Control-Allow-* ever, so browsers block.
        self._json({"error": f"method {self.command} not allowed"}, HTTPStatus.METHOD_NOT_ALLOWED)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    # -- API ------------------------------------------------------------------------------
    def _get_api(self, path: str, query: Dict[str, List[str]]) -> None:
        paths = self.server.paths
        with self._queue() as queue:
            if path == "/api/status":
                counts = queue.counts()
                paused = queue.paused_since()
                self._json({"jobs": counts, "total": sum(counts.values()), "paused": paused is not None,
                            "paused_since": paused, "workers": worker_rows(paths, queue),
                            # Without the job template: its --env values are not for every reader.
                            "schedules": [{k: v for k, v in row.items() if k != "job"}
                                          for row in Schedules(queue).list()],
                            "groups": queue.groups(), "version": __version__, "now": time.time()})
            elif path == "/api/workers":
                self._json({"workers": worker_rows(paths, queue)})
            elif path == "/api/jobs":
                self._json(self._jobs(queue, query))
            elif path.startswith("/api/jobs/") and path.count("/") == 3:
                job_id = unquote(path[len("/api/jobs/"):])
                info = queue.details(job_id)
                job = public_job(info, with_output=False)
                job["output"] = (live_output(paths, job_id) if info["state"] == "processing"
                                 else info["output_tail"] or "")
                log_file = paths.job_log(job_id)
                job["log_file"] = None if joblog.pruned(info, log_file) else str(log_file)
                self._json(job)
            else:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")

    @staticmethod
    def _jobs(queue: Queue, query: Dict[str, List[str]]) -> Dict[str, Any]:
        """Newest first (what an operator looks for); ``more`` says whether older ones exist."""
        states = [s for value in query.get("state", []) for s in value.split(",") if s]
        raw_limit = (query.get("limit") or [str(DEFAULT_LIMIT)])[-1]
        try:
            limit = int(raw_limit)
        except ValueError:
            raise InvalidInput(f"limit must be a number, not {raw_limit!r}") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}")
        jobs = queue.list(states, limit + 1)
        more = len(jobs) > limit
        jobs = jobs[1:] if more else jobs
        jobs.reverse()
        return {"jobs": [public_job(j, with_output=False) for j in jobs], "more": more,
                "limit": limit, "states": states}

    def _post(self, path: str) -> None:
        with self._queue() as queue:
            if path == "/api/pause":
                queue.pause()
                self._json({"ok": True, "paused": True})
            elif path == "/api/resume":
                queue.resume()
                self._json({"ok": True, "paused": False})
            elif path.startswith("/api/jobs/") and path.count("/") == 4:
                job_id, action = path[len("/api/jobs/"):].rsplit("/", 1)
                job_id = unquote(job_id)
                if action == "retry":
                    queue.retry([job_id])
                    self._json({"ok": True, "id": job_id, "result": "pending"})
                elif action == "cancel":
                    result = queue.cancel([job_id])
                    self._json({"ok": True, "id": job_id, "result": result[job_id]})
                else:
                    raise HttpError(HTTPStatus.NOT_FOUND, f"no such action: {action}")
            else:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
