"""A per-job Range relay: ffmpeg reads a remote source in place, through the address guard.

ffmpeg seeking on an HTTP URL (``-ss`` before ``-i``) reads the index and then only the
bytes of the clip, with Range requests (``bytes=0-``, then ``bytes=N-``): for 10 s of a long
source that is a few megabytes instead of the whole file. Handing ffmpeg the source URL
itself would lose what ``source`` guarantees: every redirect hop checked against the address
guard, the connection made to the address that was checked (no DNS rebinding), reads with a
stall timeout, the job's deadline and ``max_source_bytes``; and ffmpeg could not read a
Cloud Storage object, whose requests need the client's credentials.

The source is a ``source.Remote``: an http(s) URL, or a Cloud Storage object's media link
with the headers that authorize each request (worker.gcs). Both are read the same way.

So ffmpeg gets ``http://127.0.0.1:<port>/source`` instead, served by this relay in the
worker, and runs with ``http_proxy`` pointing here, with a per-job password (in its
environment, not its argv, which any local user can read). Every http request ffmpeg makes
therefore reaches the relay: those for the source (``Range: bytes=N-``) each become one
request to the source through ``source.open_url``, whose body is passed on as it arrives;
any other URL a crafted input might name is refused. What goes wrong upstream is recorded
as the job's failure (``error``): ffmpeg only sees a failed read, and would otherwise report
a network fault as a broken video.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import http.client
import logging
import os
import re
import secrets
import select
import socket
import threading
import time
from typing import ClassVar
from urllib.parse import urlsplit

from . import source
from .context import FetchLimits, Identity, JobContext
from .errors import JobFailed, Permanent, Transient

log = logging.getLogger(__name__)

CHUNK = 32 * 1024
SEND_BUFFER = 16 * 1024
MAX_HEAD = 16 * 1024  # ffmpeg's requests are a few hundred bytes
# Bytes a job may read beyond twice the source (see ``_pass_on``): the fixed costs of a short
# source, whose index and preroll are read by every process of a cut (smart cut's ffprobe
# and three inputs, then an encode when its join fails).
REREAD_SLACK = 4 << 20
MAX_REQUESTS = 8  # at once; ffmpeg makes one per input, two while it seeks (smart cut: 3 inputs)
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy",
                    "NO_PROXY", "all_proxy", "ALL_PROXY")


class Relay:
    """Serves one remote source to one ffmpeg on 127.0.0.1 for the length of a clip.

    ffmpeg starts at once; its first request (``bytes=0-``) is also the question whether
    the server seeks. A 206 answer is passed on and tells the source's size; anything else
    (a server that ignores Range answers 200 with the whole file) makes the relay answer
    ffmpeg 503 and keep that answer (``whole``) for the pipeline to download from: no
    request is spent on asking, and nothing waits for an answer before ffmpeg starts.
    """

    def __init__(self, remote: source.Remote, ctx: JobContext) -> None:
        self.remote = remote
        self.origin = remote.url  # the job's URL (or the object's media link)
        self.source_url = remote.url  # where it redirects to, once the first answer came
        self.size: int | None = None  # known from the first 206
        # a strong ETag, else Last-Modified: sent as If-Range. Not for a source whose URL
        # names one version (a Cloud Storage generation): any answer is of that version.
        self.validator = ""
        self.no_ranges = False  # the server does not seek: download instead
        self.whole: source.Answer | None = None
        # the address guard is for hosts a job names, not for the operator's endpoint
        self.limits = ctx.limits if remote.guarded else FetchLimits(
            ctx.limits.connect_timeout, ctx.limits.stall_timeout, ctx.limits.max_bytes, True)
        self.deadline = ctx.deadline
        self.error: JobFailed | None = None
        self.bytes_in = 0
        self.last_activity = time.monotonic()  # when bytes last came from the source
        self.requests = 0
        self.refused = 0
        self._token = secrets.token_urlsafe(18)
        self._credentials = b"Basic " + base64.b64encode(f"relay:{self._token}".encode())
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._active = 0  # requests being answered
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._accepter = threading.Thread(target=self._accept, name="relay", daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        """What ffmpeg is told to read. No secret in it: ffmpeg's argv is public (ps)."""
        return f"http://{self.address}/source"

    def ffmpeg_env(self) -> dict[str, str]:
        """ffmpeg's environment: every http request it makes goes through this relay, as a
        proxy that wants a password (the token). ffmpeg sends it once asked (407), and an
        environment is readable by the same user only: other local users get nothing."""
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
        env["http_proxy"] = f"http://relay:{self._token}@{self.address}"
        return env

    def fail(self, exc: JobFailed) -> None:
        """Record what went wrong upstream; the first failure is the job's."""
        with self._lock:
            if self.error is None and not self._closed:
                self.error = exc

    @property
    def identity(self) -> Identity | None:
        """What the source is, as far as the reads told (for the source cache)."""
        if self.remote.identity is not None:
            return self.remote.identity
        return None if self.size is None else Identity(self.size, self.validator)

    def take_whole(self) -> source.Answer | None:
        """The server's 200 answer with the whole file, for the caller to read and close."""
        with self._lock:
            whole, self.whole = self.whole, None
        return whole

    def close(self) -> None:
        """Stop serving: unblocks every transfer (ffmpeg has exited or been killed)."""
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        whole = self.take_whole()
        if whole is not None:
            source.discard(*whole)
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
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
            threading.Thread(target=self._handle, args=(conn,), name="relay-request",
                             daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with self._track(conn):
            try:
                if self._closed:
                    return
                conn.settimeout(self.limits.stall_timeout)
                # Little read-ahead on loopback: what ffmpeg has not read yet stays at the
                # source, so hanging up to seek elsewhere wastes little of the transfer.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                client = _Client(conn)
                if client.read_request():
                    self._answer(client)
            except OSError:
                pass  # ffmpeg went away (or was killed) mid-request
            except Exception as exc:  # a bug here must not pass for a broken video
                if not self._closed:
                    log.exception("range relay: unexpected error")
                    self.fail(Transient("internal_error", f"range relay: {exc}"))
            finally:
                with contextlib.suppress(OSError):
                    conn.close()

    @contextlib.contextmanager
    def _track(self, sock: socket.socket | None):  # type: ignore[no-untyped-def]
        """Keep ``sock`` where close() can shut it down."""
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

    def _answer(self, client: _Client) -> None:
        if client.method != "GET":
            client.reply(400)
            return
        if not hmac.compare_digest(client.proxy_authorization.encode(), self._credentials):
            client.reply(407, {"Proxy-Authenticate": 'Basic realm="clip-supervisor relay"'})
            return
        with self._lock:
            self._active += 1
            busy = self._active > MAX_REQUESTS
        try:
            if busy:  # ffmpeg has one request open, two while it seeks
                client.reply(503)
                return
            self._authorized(client)
        finally:
            with self._lock:
                self._active -= 1

    def _authorized(self, client: _Client) -> None:
        if not self.is_ours(client.target):
            with self._lock:
                self.refused += 1
            log.warning("range relay: refused a request for %.200s (the source names "
                        "another URL)", client.target)
            client.reply(403)
            return
        match = _RANGE.match(client.range or "bytes=0-")
        first, last = (int(match[1]), int(match[2]) if match[2] else None) if match else (0, 0)
        if match is None or (last is not None and last < first):
            client.reply(416, {"Content-Range": f"bytes */{self.size or 0}"})
            return
        self.serve(client, first, last)

    def is_ours(self, target: str) -> bool:
        """The one path served; a proxy-style absolute URL must also name this relay."""
        parts = urlsplit(target)
        if parts.scheme and (parts.scheme != "http" or parts.netloc != self.address):
            return False
        return parts.path == "/source"

    def serve(self, out: _Client, first: int, last: int | None) -> None:
        """Answer one ffmpeg request for bytes ``first``-``last`` from the source."""
        if self.no_ranges:
            out.reply(503)
            return
        if self.size is not None and first >= self.size:
            out.reply(416, {"Content-Range": f"bytes */{self.size}"})
            return
        opened = self._request(first, last)
        if opened is None:
            out.reply(502)
            return
        conn, resp, final = opened
        if self.size is None and not self._first_answer(conn, resp, final, first):
            out.reply(503)  # ffmpeg gives up; the pipeline downloads (no_ranges)
            return
        self._pass_on(conn, resp, out, first, last)

    def _request(self, first: int, last: int | None,
                 ) -> tuple[source.PinnedConnection, http.client.HTTPResponse, str] | None:
        """Ask the source for ``first``-``last``; None once the failure is recorded."""
        wanted = {"Range": f"bytes={first}-{'' if last is None else last}"}
        if self.validator:
            wanted["If-Range"] = self.validator
        with self._lock:
            if self._closed:
                return None
            self.requests += 1
        connected: list[socket.socket] = []

        def on_connect(sock: socket.socket) -> None:
            # close() must be able to cut a source that dribbles its headers
            connected.append(sock)
            with self._lock:
                self._sockets.add(sock)
                closed = self._closed
            if closed:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        url = self.source_url
        try:
            headers = {**self.remote.headers(), **wanted} if self.remote.headers else wanted
            opened = source.open_url(url, self.limits, self.deadline, None, headers,
                                     on_connect)
            if opened[1].status in (401, 403, 404, 410) and url != self.origin:
                # A redirect's target can expire (signed CDN links): ask the job's URL again
                source.discard(*opened[:2])
                url = self.origin
                opened = source.open_url(url, self.limits, self.deadline, None, headers,
                                         on_connect)
                self.source_url = opened[2]
            return opened
        except JobFailed as exc:
            self.fail(exc)
        except (OSError, http.client.HTTPException) as exc:
            self.fail(Transient("fetch_failed", f"cannot fetch {url}: {exc}"))
        finally:
            with self._lock:  # from here on, _pass_on tracks the socket it reads
                self._sockets.difference_update(connected)
        return None

    def _first_answer(self, conn: source.PinnedConnection, resp: http.client.HTTPResponse,
                      final: str, first: int) -> bool:
        """Learn from the source's first answer whether it seeks, and its size; False when
        ffmpeg cannot read it through the relay (then ``no_ranges``, or ``error``)."""
        try:
            self._check(resp, final, ok=(200, 206, 416))
        except JobFailed as exc:  # 404, 403, 5xx...: the job's failure, as for a download
            source.discard(conn, resp)
            self.fail(exc)
            return False
        got = source.content_range(resp) if resp.status == 206 else None
        if got is None or got[0] != first:
            with self._lock:
                self.no_ranges = True
                # a 200 is the whole file: the pipeline downloads from it (unless over)
                keep = resp.status == 200 and not self._closed
                if keep:
                    self.whole = (conn, resp)
            if not keep:  # 416 (an empty file) or a vague 206: the pipeline downloads
                source.discard(conn, resp)  # it with a request of its own
            return False
        known = self.remote.identity
        failed: JobFailed | None = None
        if got[2] > self.limits.max_bytes:
            failed = Permanent("source_too_large",
                               f"{got[2]} bytes > max_source_bytes {self.limits.max_bytes}")
        elif known is not None and got[2] != known.size:
            failed = Transient("source_changed", f"{final} is {got[2]} bytes now; it was "
                               f"{known.size} when the job began")
        if failed is not None:
            source.discard(conn, resp)
            self.fail(failed)
            return False
        with self._lock:
            self.size, self.source_url = got[2], final
            self.validator = source.validator(resp) if known is None else ""
        return True

    def _check(self, resp: http.client.HTTPResponse, url: str, ok: tuple[int, ...]) -> None:
        """source.check_status, except that for a source whose URL names one version, a
        404 means that version is gone (replaced, or deleted), which may pass."""
        if self.remote.identity is not None and resp.status in (404, 410):
            raise Transient("source_changed", f"HTTP {resp.status} from {url}: the version "
                            "being read is gone")
        source.check_status(resp, url, ok)

    def _pass_on(self, conn: source.PinnedConnection, resp: http.client.HTTPResponse,
                 out: _Client, first: int, last: int | None) -> None:
        """Send ffmpeg bytes ``first``-``last`` (or to the end). A source may answer with
        less than was asked (some servers cap each answer): ask again for the rest, within
        the same answer to ffmpeg."""
        size = self.size
        assert size is not None
        end = size - 1 if last is None else min(last, size - 1)
        pos, answered = first, False
        while True:
            span, finished, stop = None, False, pos
            try:
                with self._track(conn.live_sock):
                    if conn.live_sock is not None:
                        conn.live_sock.settimeout(self.limits.stall_timeout)
                    span = self._span(resp, pos, last)
                    if span is None:  # 416, though pos < size (serve saw to that)
                        raise Transient("source_changed", f"{self.source_url} has no bytes "
                                        f"from {pos} any more; it had {size}")
                    if not answered:
                        out.reply(206, {"Content-Range": f"bytes {first}-{end}/{size}"},
                                  end - first + 1)
                        answered = True
                    stop = min(span[1], end)  # never more than ffmpeg was promised
                    with _HangUpWatch(out.connection, conn.live_sock) as hung_up:
                        finished = self._pump(resp, out, pos, stop - pos + 1, hung_up)
            except JobFailed as exc:
                self.fail(exc)
                if not answered:
                    out.reply(502)
                return
            finally:
                # whatever the source has not sent yet is not wanted: stop it (_HangUpWatch)
                source.close(conn, resp, reset=not (span and finished and stop == span[1]))
            pos = stop + 1
            if not finished or pos > end or _gone(out.connection):
                return
            opened = self._request(pos, last)  # the rest of what ffmpeg asked for
            if opened is None:
                return
            conn, resp, _ = opened

    def _pump(self, resp: http.client.HTTPResponse, out: _Client, first: int, length: int,
              hung_up: threading.Event) -> bool:
        """Pass the body on; True once all of it went through."""
        url = self.source_url
        passed = 0
        while passed < length:
            if self._closed:  # the job is over (or aborted: the pipeline closes the relay)
                return False
            if time.monotonic() > self.deadline:
                self.fail(Transient("timeout", f"reading {url} exceeded the job timeout"))
                return False
            try:
                chunk = resp.read1(min(CHUNK, length - passed))
            except TimeoutError:
                self.fail(Transient("stalled", f"no bytes from {url} for "
                                    f"{self.limits.stall_timeout:g} s"))
                return False
            except (OSError, http.client.HTTPException) as exc:
                if not (self._closed or hung_up.is_set()):
                    self.fail(Transient("fetch_failed", f"reading {url} failed: {exc}"))
                return False
            if not chunk:
                if not hung_up.is_set():
                    self.fail(Transient("fetch_failed", f"{url} ended after {passed} of "
                                        f"{length} bytes from offset {first}"))
                return False
            self.last_activity = time.monotonic()
            with self._lock:
                self.bytes_in += len(chunk)
                total = self.bytes_in
            # The size was checked against max_source_bytes; seeks may read parts again,
            # but reading the source over twice is not clipping: a download does better.
            if total > 2 * (self.size or 0) + REREAD_SLACK:
                self.fail(Transient("excessive_reads", f"read {total} bytes of a {self.size}-"
                                    f"byte source from {url} and still not done"))
                return False
            try:
                out.write(chunk)
            except OSError:
                return False  # ffmpeg hung up: it seeks elsewhere, or has what it needs
            passed += len(chunk)
        return True

    def _span(self, resp: http.client.HTTPResponse, pos: int,
              last: int | None) -> tuple[int, int] | None:
        """The bytes (first, last) the source is sending, which must start at ``pos``; None
        for a 416 (nothing there). Raises the job's failure for anything else."""
        url, size = self.source_url, self.size
        assert size is not None
        wanted = f"bytes={pos}-{'' if last is None else last}"
        if resp.status == 416:
            return None
        self._check(resp, url, ok=(200, 206))
        if resp.status == 206:
            got = source.content_range(resp)
            if got is None or got[0] != pos or got[2] != size or not got[0] <= got[1] < size:
                raise Transient("source_changed", f"{url} answered {wanted} with "
                                f"Content-Range {resp.getheader('Content-Range')!r}; "
                                f"the source is {size} bytes")
            return got[0], got[1]
        # 200: the whole file. Fine only from the start and if it is still the same file.
        length = resp.getheader("Content-Length") or ""
        if pos != 0 or length != str(size) or (
                self.validator and source.validator(resp) != self.validator):
            raise Transient("source_changed", f"{url} answered {wanted} with the whole "
                            f"file: it changed, or stopped serving ranges")
        return 0, size - 1


class _HangUpWatch:
    """Closes the source's connection the moment ffmpeg hangs up on the relay.

    ffmpeg hangs up to seek elsewhere or when it has what it needs. The transfer loop would
    only notice at its next write, a chunk (and, with a paced server, milliseconds) later,
    while the source keeps sending: bytes that are paid for and thrown away. A thread waits
    for the end of ffmpeg's side and shuts the source's socket down at once.
    """

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.hung_up = threading.Event()
        self._done_r, self._done_w = socket.socketpair()
        self._thread = threading.Thread(target=self._watch, name="relay-hangup", daemon=True)

    def __enter__(self) -> threading.Event:
        self._thread.start()
        return self.hung_up

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._done_w.send(b"x")
        self._thread.join(5)
        self._done_r.close()
        self._done_w.close()

    def _watch(self) -> None:
        poller = select.poll()  # not select(): it fails on descriptors past 1023
        poller.register(self.client, select.POLLIN)
        poller.register(self._done_r, select.POLLIN)
        try:
            ready = {fd for fd, _ in poller.poll()}
        except (OSError, ValueError):
            return
        if self._done_r.fileno() in ready or not _gone(self.client):
            return
        self.hung_up.set()
        if self.upstream is not None:
            with contextlib.suppress(OSError):
                # Closed with a reset rather than a FIN: a FIN lets the source go on sending
                # (one more write succeeds before it learns); a reset stops it at once.
                self.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, source.RESET)
                self.upstream.shutdown(socket.SHUT_RDWR)


def _gone(sock: socket.socket) -> bool:
    """True when ffmpeg has closed its side (it sends nothing else on this connection)."""
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


class _Client:
    """ffmpeg's side of one relay connection: its request, and the answer written back.

    ffmpeg sends one small GET per connection (``Connection: close``): reading the head and
    picking out the target and the Range header is all the parsing needed, far cheaper
    than http.server's (an email parser per request).
    """

    REASONS: ClassVar[dict[int, str]] = {
        206: "Partial Content", 200: "OK", 400: "Bad Request", 403: "Forbidden",
        407: "Proxy Authentication Required", 416: "Range Not Satisfiable",
        502: "Bad Gateway", 503: "Service Unavailable"}

    def __init__(self, sock: socket.socket) -> None:
        self.connection = sock
        self.method = self.target = ""
        self.range = self.proxy_authorization = ""

    def read_request(self) -> bool:
        """Read the request head; False if ffmpeg sent none (or nonsense)."""
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.connection.recv(4096)
            if not chunk or len(head) > MAX_HEAD:
                return False
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return False
        self.method, self.target = parts[0], parts[1]
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "range":
                self.range = value.strip()
            elif name == "proxy-authorization":
                self.proxy_authorization = value.strip()
        return True

    def reply(self, status: int, headers: dict[str, str] | None = None,
              length: int = 0) -> None:
        fields = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                  **(headers or {}), "Content-Length": str(length), "Connection": "close"}
        head = f"HTTP/1.1 {status} {self.REASONS.get(status, 'Error')}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in fields.items()) + "\r\n"
        self.connection.sendall(head.encode("latin-1"))

    def write(self, data: bytes) -> None:
        self.connection.sendall(data)
