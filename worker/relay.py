"""A per-job Range relay: ffmpeg reads a remote source in place, through the address guard.

ffmpeg seeking on an HTTP URL (``-ss`` before ``-i``) reads the index and then only the
bytes of the clip, with Range requests (FIELD-NOTES): for 10 s of a long source that is a
few megabytes instead of the whole file. Handing ffmpeg the source URL itself would lose
what ``source`` guarantees: every redirect hop checked against the address guard, the
connection made to the address that was checked (no DNS rebinding), reads with a stall
timeout, the job's deadline and ``max_source_bytes``.

So ffmpeg gets ``http://127.0.0.1:<port>/<token>/source`` instead, served by this relay in
the worker. Each request ffmpeg makes (``Range: bytes=N-``) becomes one request to the
source through ``source.open_url``, whose body is passed on as it arrives. ffmpeg also runs
with ``http_proxy`` pointing here, so any other http URL a crafted input might name reaches
the relay too, and is refused. What goes wrong upstream is recorded as the job's failure
(``error``): ffmpeg only sees a failed read, and would otherwise report a network fault as
a broken video.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from . import source
from .errors import JobFailed, Permanent, Transient

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
SEND_BUFFER = 64 * 1024
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy",
                    "NO_PROXY", "all_proxy", "ALL_PROXY")


class Relay:
    """Serves one RangeSource to one ffmpeg on 127.0.0.1 for the length of a clip."""

    def __init__(self, src: source.RangeSource, limits: source.FetchLimits, deadline: float,
                 should_abort: Callable[[], bool]) -> None:
        self.source = src
        self.limits = limits
        self.deadline = deadline
        self.should_abort = should_abort
        self.error: JobFailed | None = None
        self.bytes_in = 0
        self.requests = 0
        self.refused = 0
        self._token = secrets.token_urlsafe(18)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._accepter = threading.Thread(target=self._accept, name="relay", daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"http://{self.address}/{self._token}/source"

    def ffmpeg_env(self) -> dict[str, str]:
        """ffmpeg's environment: every http request it makes goes through this relay."""
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
        env["http_proxy"] = f"http://{self.address}"
        return env

    def fail(self, exc: JobFailed) -> None:
        """Record what went wrong upstream; the first failure is the job's."""
        with self._lock:
            if self.error is None and not self._closed:
                self.error = exc

    def close(self) -> None:
        """Stop serving: unblocks every transfer (ffmpeg has exited or been killed)."""
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accepter.join(5)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving -------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
            threading.Thread(target=self._handle, args=(conn, peer), name="relay-request",
                             daemon=True).start()

    def _handle(self, conn: socket.socket, peer: tuple) -> None:
        with self._track(conn):
            try:
                _Handler(conn, peer, self)
            except Exception as exc:  # a bug here must not pass for a broken video
                if not self._closed:
                    log.exception("range relay: unexpected error")
                    self.fail(Transient("internal_error", f"range relay: {exc}"))
            finally:
                with contextlib.suppress(OSError):
                    conn.close()

    @contextlib.contextmanager
    def _track(self, sock: socket.socket | None):  # type: ignore[no-untyped-def]
        if sock is None:
            yield
            return
        with self._lock:
            self._sockets.add(sock)
        try:
            yield
        finally:
            with self._lock:
                self._sockets.discard(sock)

    def is_ours(self, target: str) -> bool:
        """The one path served; a proxy-style absolute URL must also name this relay."""
        parts = urlsplit(target)
        if parts.scheme and (parts.scheme != "http" or parts.netloc != self.address):
            return False
        return parts.path == f"/{self._token}/source"

    def serve(self, out: _Handler, first: int, last: int | None) -> None:
        """Answer one ffmpeg request for bytes ``first``-``last`` from the source."""
        size = self.source.size
        if first >= size:
            out.reply(416, {"Content-Range": f"bytes */{size}"})
            return
        wanted = f"bytes={first}-{'' if last is None else last}"
        headers = {"Range": wanted}
        if self.source.validator:
            headers["If-Range"] = self.source.validator
        with self._lock:
            self.requests += 1
        try:
            conn, resp, _ = source.open_url(self.source.url, self.limits, self.deadline,
                                            None, headers)
        except JobFailed as exc:
            self.fail(exc)
            out.reply(502)
            return
        except (OSError, http.client.HTTPException) as exc:
            self.fail(Transient("fetch_failed", f"cannot fetch {self.source.url}: {exc}"))
            out.reply(502)
            return
        try:
            with self._track(conn.live_sock):
                if conn.live_sock is not None:
                    conn.live_sock.settimeout(self.limits.stall_timeout)
                self._pass_on(resp, out, first, wanted)
        finally:
            conn.close()

    def _pass_on(self, resp: http.client.HTTPResponse, out: _Handler, first: int,
                 wanted: str) -> None:
        url, size = self.source.url, self.source.size
        try:
            length = self._check(resp, first, wanted)
        except JobFailed as exc:
            self.fail(exc)
            out.reply(502)
            return
        if length is None:  # 416: nothing there
            out.reply(416, {"Content-Range": f"bytes */{size}"})
            return
        out.reply(206, {"Content-Range": f"bytes {first}-{first + length - 1}/{size}"},
                  length)
        passed = 0
        while passed < length:
            if self._closed or self.should_abort():
                return
            if time.monotonic() > self.deadline:
                self.fail(Transient("timeout", f"reading {url} exceeded the job timeout"))
                return
            try:
                chunk = resp.read1(CHUNK)
            except TimeoutError:
                self.fail(Transient("stalled", f"no bytes from {url} for "
                                    f"{self.limits.stall_timeout:g} s"))
                return
            except (OSError, http.client.HTTPException) as exc:
                if not self._closed:
                    self.fail(Transient("fetch_failed", f"reading {url} failed: {exc}"))
                return
            if not chunk:
                self.fail(Transient("fetch_failed", f"{url} ended after {passed} of "
                                    f"{length} bytes from offset {first}"))
                return
            with self._lock:
                self.bytes_in += len(chunk)
                total = self.bytes_in
            if total > self.limits.max_bytes:
                self.fail(Permanent("source_too_large", f"read more than max_source_bytes "
                                    f"{self.limits.max_bytes} from {url}"))
                return
            try:
                out.wfile.write(chunk)
            except OSError:
                return  # ffmpeg hung up: it seeks elsewhere, or has what it needs
            passed += len(chunk)

    def _check(self, resp: http.client.HTTPResponse, first: int, wanted: str) -> int | None:
        """The number of bytes the source is sending from ``first`` (None: none, 416)."""
        url, size = self.source.url, self.source.size
        if resp.status == 416:
            return None
        source.check_status(resp, url, ok=(200, 206))
        if resp.status == 206:
            got = source.content_range(resp)
            if got is None or got[0] != first or got[2] != size or got[1] < got[0]:
                raise Transient("source_changed", f"{url} answered {wanted} with "
                                f"Content-Range {resp.getheader('Content-Range')!r}; "
                                f"the source is {size} bytes")
            return got[1] - got[0] + 1
        # 200: the whole file. Fine only from the start and if it is still the same file.
        length = resp.getheader("Content-Length") or ""
        if first != 0 or length != str(size) or (
                self.source.validator and source.validator(resp) != self.source.validator):
            raise Transient("source_changed", f"{url} answered {wanted} with the whole "
                            f"file: it changed, or stopped serving ranges")
        return size


class _Handler(http.server.BaseHTTPRequestHandler):
    """One ffmpeg request. Constructed with the relay as its ``server``; handles at once."""

    server: Relay  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"
    server_version = "clip-supervisor-relay"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.limits.stall_timeout
        # Little read-ahead on loopback: what ffmpeg has not read yet stays at the source
        # (or in flight), so hanging up to seek elsewhere wastes little of the transfer.
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        super().setup()

    def do_GET(self) -> None:  # noqa: N802
        self.close_connection = True
        relay = self.server
        if not relay.is_ours(self.path):
            with relay._lock:
                relay.refused += 1
            log.warning("range relay: refused a request for %.200s (the source names "
                        "another URL)", self.path)
            self.reply(403)
            return
        match = _RANGE.match((self.headers.get("Range") or "bytes=0-").strip())
        if match is None:
            self.reply(416, {"Content-Range": f"bytes */{relay.source.size}"})
            return
        first, last = int(match[1]), int(match[2]) if match[2] else None
        relay.serve(self, first, last)

    def reply(self, status: int, headers: dict[str, str] | None = None,
              length: int = 0) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("range relay: " + format, *args)
