"""The operators' web dashboard, on the master's listener next to /metrics and /healthz.

Read side: ``GET /`` (and ``/job/<id>``) is one static page from ``supervisor/static/``
that polls a JSON API: ``/api/stats`` (exactly ``admin.stats``, what ``clip-supervisor
stats --json`` prints), ``/api/recent``, ``/api/throughput``, ``/api/job/<id>``,
``/api/info``, ``/api/slots`` (this master's FATAL worker slots, which only it knows: they
have no worker to register in Redis). Polling rather than server push keeps the server a
plain request/response handler: an open page costs a few small requests a second, never a
thread of its own.

Write side: ``POST /api/dead/retry``, ``/api/dead/retry-all``, ``/api/dead/purge`` and
``/api/job/<id>/cancel``. Each
must carry the ``[metrics] auth_token`` in an ``X-Clip-Token`` header (a custom header, so
a cross-site page can send it only after a CORS preflight that we never answer, and not
``Authorization``, which a proxy's own basic auth may need), a JSON content type (so an
HTML form cannot post it), and, when the browser names them, a same-origin ``Origin`` and
``Sec-Fetch-Site``. Without a configured token the dashboard is read-only. Every action,
done or refused, is logged with the client's address.

When the listener is on loopback, requests must name a loopback host, so a page whose DNS
name is rebound to 127.0.0.1 cannot read the API from an operator's browser.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from worker.job import ID_RE
from worker.protocol import JOB_FIELDS, JobState, Stage
from worker.queue import REDIS_ERRORS, JobQueue

from . import admin

log = logging.getLogger("clip-supervisor.dashboard")

TOKEN_HEADER = "X-Clip-Token"
_CANCEL_PATH = re.compile(r"/api/job/([^/]+)/cancel")
MAX_BODY = 64 * 1024  # an action's JSON body is a few ids
RECENT_LIMIT = 50  # rows of completions and of dead letters the page shows
SEARCH_SCAN = 2000  # newest entries of each list a search by job id looks through
ERROR_TAIL = 400  # characters of a dead letter's error the list shows (the job page: all)
THROUGHPUT_CACHE = 5.0  # seconds; the chart is per minute, the lists may be long

STATIC = {"index.html": "text/html; charset=utf-8",
          "dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}

# The page needs nothing from anywhere else: no inline script or style, no frames, no forms.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class Request:
    method: str
    target: str  # path and query, as sent
    headers: Mapping[str, str]
    client: str  # the peer's address (a proxy's, behind one)
    body: bytes = b""


@dataclass
class Response:
    status: int
    body: bytes
    ctype: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


def _json(status: int, data: Any) -> Response:
    return Response(status, json.dumps(data, ensure_ascii=False).encode("utf-8"))


def _printable(text: str, limit: int = 200) -> str:
    """Client-chosen text for a log line: one line, bounded, no control characters."""
    return re.sub(r"[^\x20-\x7e]", "?", text[:limit])


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(host_header: str) -> str:
    """The name part of a Host header: ``127.0.0.1:9187`` -> 127.0.0.1, ``[::1]:80`` -> ::1."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class Dashboard:
    def __init__(self, queue: JobQueue, auth_token: str, listen_host: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = queue
        self.token = auth_token.encode("utf-8")
        self.loopback_only = _is_loopback(listen_host)
        self.clock = clock
        self._static = {name: resources.files(__package__).joinpath("static", name)
                        .read_bytes() for name in STATIC}
        self._throughput: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()
        # This master's FATAL worker slots (supervisor.master sets it): [{"slot",
        # "failures", "since", "last_failure"}]. /healthz answers 503 while there is one.
        self.fatal_slots: Callable[[], list[dict[str, Any]]] = list
        if self.token and len(self.token) < 16:
            log.warning("[metrics] auth_token is short (%d characters); use a long random "
                        "one, e.g. openssl rand -hex 32", len(self.token))

    # --- routing ---------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        response = self._route(request)
        response.headers = {**SECURITY_HEADERS, **response.headers}
        return response

    def _route(self, request: Request) -> Response:
        parts = urlsplit(request.target)
        path = parts.path
        if self.loopback_only and not _is_loopback(_hostname(request.headers.get("Host", ""))):
            # DNS rebinding: a foreign name that resolves to our loopback address.
            if request.method == "POST":
                log.warning("dashboard: refused %s from %s: foreign Host header %s",
                            _printable(path, 60), request.client,
                            _printable(request.headers.get("Host", ""), 100))
            return _json(403, {"error": "the dashboard answers loopback host names only"})
        try:
            cancel = _CANCEL_PATH.fullmatch(path)
            if request.method == "POST":
                if cancel is not None:
                    return self._action(request, "cancel", unquote(cancel.group(1)))
                if not path.startswith("/api/dead/"):
                    return _json(404 if not path.startswith("/api/") else 405,
                                 {"error": "not an action"})
                return self._action(request, path.removeprefix("/api/dead/"))
            if request.method != "GET":
                return _json(405, {"error": "method not allowed"})
            if path.startswith("/api/dead/") or cancel is not None:
                return _json(405, {"error": "actions are POST only"})
            return self._read(path, parse_qs(parts.query))
        except REDIS_ERRORS as exc:
            return _json(503, {"error": f"redis unreachable: {exc}"})

    def _read(self, path: str, query: dict[str, list[str]]) -> Response:
        if path == "/" or path.startswith("/job/"):
            return Response(200, self._static["index.html"], STATIC["index.html"])
        if path.startswith("/static/") and path.removeprefix("/static/") in STATIC:
            name = path.removeprefix("/static/")
            return Response(200, self._static[name], STATIC[name])
        if path == "/api/stats":
            return _json(200, admin.stats(self.queue))
        if path == "/api/info":
            # The job vocabulary too (worker.protocol): the page names no state of its own.
            return _json(200, {"prefix": self.queue.config.redis.prefix,
                               "actions": bool(self.token), "token_header": TOKEN_HEADER,
                               "job_states": list(JobState), "stages": list(Stage),
                               "job_fields": JOB_FIELDS})
        if path == "/api/slots":
            return _json(200, {"host": self.queue.config.host_id, "fatal": self.fatal_slots()})
        if path == "/api/recent":
            return _json(200, self.recent(query.get("q", [""])[0].strip()))
        if path == "/api/throughput":
            return _json(200, self.throughput())
        if path.startswith("/api/job/"):
            job_id = unquote(path.removeprefix("/api/job/"))
            if not ID_RE.fullmatch(job_id):
                return _json(400, {"error": "not a job id"})
            record = admin.job_record(self.queue, job_id)
            if record is None:
                return _json(404, {"error": f"no job {job_id} in Redis (unknown or expired)"})
            return _json(200, record)
        return _json(404, {"error": "not found"})

    # --- read models -----------------------------------------------------------------------

    def recent(self, search: str = "") -> dict[str, Any]:
        scan = SEARCH_SCAN if search else RECENT_LIMIT
        done = admin.newest_entries(self.queue, "done", limit=RECENT_LIMIT, id_contains=search,
                                    scan_max=scan)
        dead = [self._letter_row(letter) for letter in admin.newest_entries(
            self.queue, "dead", limit=RECENT_LIMIT, id_contains=search, scan_max=scan)]
        return {"q": search, "done": done, "dead": dead}

    @staticmethod
    def _letter_row(letter: dict[str, Any]) -> dict[str, Any]:
        """A dead letter without its message (which may be up to max_message_bytes)."""
        row = {key: letter.get(key) for key in ("id", "reason", "attempts", "time")}
        row["error"] = str(letter.get("error") or "")[-ERROR_TAIL:]
        row["retryable"] = admin.original_message(letter) is not None
        try:
            body = json.loads(letter.get("message", ""))
        except ValueError:
            body = letter.get("message")
        url = body.get("url") if isinstance(body, dict) else body
        row["url"] = str(url)[:500] if url else ""
        return row

    def throughput(self) -> dict[str, Any]:
        with self._lock:
            cached = self._throughput
            if cached is not None and self.clock() - cached[0] < THROUGHPUT_CACHE:
                return cached[1]
        data = admin.throughput(self.queue)
        with self._lock:
            self._throughput = (self.clock(), data)
        return data

    # --- actions ---------------------------------------------------------------------------

    def _action(self, request: Request, action: str, job_id: str = "") -> Response:
        who = request.client
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded:  # told by a proxy, or by anyone: logged as a hint, never trusted
            who += f" (X-Forwarded-For {_printable(forwarded)})"
        if action not in ("retry", "retry-all", "purge", "cancel"):
            return _json(404, {"error": f"unknown action {action[:40]}"})
        try:
            self._check(request)
            body = self._body(request)
        except Refused as exc:
            log.warning("dashboard: refused %s from %s: %s", action, who, exc.why)
            return _json(exc.status, {"error": exc.why})
        if action == "cancel":
            if not ID_RE.fullmatch(job_id):
                return _json(400, {"error": "not a job id"})
            outcome = admin.cancel(self.queue, job_id)
            log.info("dashboard: %s asked to cancel: %s", who,
                     _printable(admin.describe_cancel(job_id, outcome), 300))
            return _json(200, {"id": job_id, "cancelled": outcome.cancelled,
                               "removed": outcome.removed, "running": outcome.running,
                               "state": outcome.state})
        if action == "purge":
            count = admin.purge_dead(self.queue)
            log.info("dashboard: %s purged %d dead letter(s)", who, count)
            return _json(200, {"purged": count})
        ids = None
        if action == "retry":
            ids = body.get("ids")
            if isinstance(body.get("id"), str):
                ids = [body["id"]]
            if not isinstance(ids, list) or not ids or \
                    not all(isinstance(i, str) and len(i) <= 256 for i in ids):
                log.warning("dashboard: refused retry from %s: no ids", who)
                return _json(400, {"error": 'retry takes {"id": ...} or {"ids": [...]}'})
        count, missing = admin.retry_dead(self.queue, ids)
        log.info("dashboard: %s requeued %d dead letter(s) (%s)%s", who, count,
                 "all" if ids is None else _printable(", ".join(ids)),
                 f"; not found: {_printable(', '.join(missing))}" if missing else "")
        return _json(200, {"requeued": count, "missing": missing})

    def _check(self, request: Request) -> None:
        """CSRF and authorization checks, cheapest first; raises Refused."""
        headers = request.headers
        if not self.token:
            raise Refused(403, "read-only: [metrics] auth_token is not set")
        site = headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise Refused(403, f"cross-site request ({_printable(site, 40)})")
        origin = headers.get("Origin")
        if origin is not None and \
                urlsplit(origin).netloc.lower() != headers.get("Host", "").strip().lower():
            raise Refused(403, f"cross-origin request from {_printable(origin, 100)}")
        ctype = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise Refused(415, "actions take Content-Type: application/json")
        given = headers.get(TOKEN_HEADER)
        if not given:
            raise Refused(401, f"missing {TOKEN_HEADER} header")
        if not hmac.compare_digest(given.encode("utf-8"), self.token):
            raise Refused(403, "wrong token")

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        if not request.body.strip():
            return {}
        try:
            body = json.loads(request.body)
        except ValueError as exc:
            raise Refused(400, "the body is not JSON") from exc
        if not isinstance(body, dict):
            raise Refused(400, "the body is not a JSON object")
        return body
