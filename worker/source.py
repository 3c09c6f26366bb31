"""Fetching a job's source video into the job's folder.

HTTP(S) is spoken with http.client rather than urllib so that every hop of a redirect chain
can be checked against the address guard and connected to the very address that was checked
(no second DNS lookup an attacker could answer differently). Reads have a stall timeout, the
whole fetch a deadline, and the body a size cap, so a hostile or broken server costs a
bounded amount of time and disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import ipaddress
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from .context import FetchLimits, Identity, JobContext
from .errors import Aborted, Permanent, Transient
from .health import MIN_FREE_BYTES, is_disk_error, work_dir_failure
from .wake import Waker

CHUNK = 256 * 1024
# A body of unannounced length is written this much at a time at most between two looks at
# the free space (an fstatvfs each: nothing next to the read)
ROOM_STEP = 4 * 1024 * 1024
MAX_REDIRECTS = 5
USER_AGENT = "clip-supervisor/0.1"
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, not a FIN
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPAT = ipaddress.IPv6Network("::/96")


def address_allowed(address: str) -> bool:
    """The SSRF guard's decision: only globally routable unicast addresses are fetched.

    Refuses loopback, RFC 1918, link-local (the 169.254.169.254 metadata server), CGNAT,
    multicast, reserved and unspecified addresses, IPv6 ULA and IPv4-mapped forms of these.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address reach that address: judge the IPv4 one.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and (ip in _NAT64 or ip in _NAT64_LOCAL or ip in _IPV4_COMPAT):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int, allow_private: bool) -> str:
    """Resolve ``host`` and return one address to connect to, refusing guarded ones."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Transient("fetch_failed", f"cannot resolve {host}: {exc.strerror}") from None
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        refused = [a for a in addresses if not address_allowed(a)]
        if refused:
            raise Permanent("private_address",
                            f"{host} resolves to {refused[0]}, a non-public address")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address decided in advance, whatever ``host`` resolves to now.

    ``live_sock`` keeps the socket after http.client drops ``sock`` (it does as soon as a
    response says the connection will close), for timeouts and wake-ups while reading.
    """

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self.live_sock: socket.socket | None = None

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.live_sock = self.sock


PinnedConnection = _PinnedHTTPConnection


class PinnedHTTPSConnection(_PinnedHTTPConnection):
    """``PinnedConnection`` over TLS: the TCP connection goes to the checked address, the
    certificate is verified against ``host``, the name the URL gave (sources and webhooks)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, address, timeout)
        self._tls = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self.live_sock = self._tls.wrap_socket(self.sock,
                                                           server_hostname=self.host)


def open_url(url: str, limits: FetchLimits, deadline: float | None = None,
             waker: Waker | None = None, headers: dict[str, str] | None = None,
             on_connect: Callable[[socket.socket], None] | None = None,
             ) -> tuple[PinnedConnection, http.client.HTTPResponse, str]:
    """GET ``url``, following redirects, each hop checked by the address guard and connected
    to the checked address; return the connection, the response and the final url.
    ``on_connect`` is told of each hop's socket once connected (to shut it from outside)."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise Permanent("scheme_not_allowed", f"redirected to a {scheme!r} url")
        port = parts.port or (443 if scheme == "https" else 80)
        address = resolve(parts.hostname or "", port, limits.allow_private)
        cls = PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        conn = cls(parts.hostname or "", port, address, limits.connect_timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        resp = _exchange(conn, target, deadline, waker, headers, on_connect)
        if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
            url = urljoin(url, resp.getheader("Location"))
            conn.close()
            if headers and urlsplit(url).netloc != parts.netloc:
                # credentials are for the origin that asked for them (as curl and requests
                # do): another host never sees them
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            continue
        return conn, resp, url
    raise Permanent("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")


def _exchange(conn: http.client.HTTPConnection, target: str, deadline: float | None,
              waker: Waker | None, headers: dict[str, str] | None = None,
              on_connect: Callable[[socket.socket], None] | None = None,
              ) -> http.client.HTTPResponse:
    """Send the request and read the status line and headers, within the job's deadline.

    A server can dribble its headers a byte at a time, each within the socket timeout: a
    timer shuts the socket down at the deadline, and a QUIT wakes it (worker.wake).
    """
    conn.connect()
    if on_connect is not None and conn.sock is not None:
        on_connect(conn.sock)
    timer = None
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Transient("timeout", "the job's timeout passed before the source answered")
        timer = threading.Timer(remaining, _shut, args=(conn.sock,))
        timer.daemon = True
        timer.start()
    try:
        with waker.watching(conn.sock) if waker is not None else contextlib.nullcontext():
            conn.request("GET", target, headers={"User-Agent": USER_AGENT,
                                                 "Accept-Encoding": "identity",
                                                 **(headers or {})})
            return conn.getresponse()
    except (OSError, http.client.HTTPException):
        if deadline is not None and time.monotonic() >= deadline:
            raise Transient("timeout", "the source did not answer before the job's "
                            "timeout") from None
        raise
    finally:
        if timer is not None:
            timer.cancel()


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def check_status(resp: http.client.HTTPResponse, url: str,
                 ok: tuple[int, ...] = (200,)) -> None:
    """Raise the job failure that an HTTP status other than ``ok`` means."""
    status = resp.status
    if status in ok:
        return
    text = f"HTTP {status} {resp.reason} from {url}"
    if status in (404, 410):
        raise Permanent("not_found", text)
    if status in (401, 403):
        raise Permanent("forbidden", text)
    if status in (408, 425, 429) or status >= 500:
        raise Transient("source_unavailable", text)
    raise Permanent("http_error", text)


def close(conn: PinnedConnection, resp: http.client.HTTPResponse, reset: bool = False) -> None:
    """Close an answer and its connection (the socket too: http.client may have let go of
    it). ``reset``: the rest of the answer is not wanted; a plain close would let the
    server go on sending into the void for a while."""
    sock = conn.live_sock
    if reset and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    resp.close()
    conn.close()
    if sock is not None:
        sock.close()


def discard(conn: PinnedConnection, resp: http.client.HTTPResponse) -> None:
    """Drop a connection whose answer is not wanted (any more), with a reset."""
    close(conn, resp, reset=True)


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)$")


def content_range(resp: http.client.HTTPResponse) -> tuple[int, int, int] | None:
    """``Content-Range: bytes FIRST-LAST/SIZE`` as numbers, or None when absent or vague."""
    match = _CONTENT_RANGE.match((resp.getheader("Content-Range") or "").strip())
    return None if match is None else (int(match[1]), int(match[2]), int(match[3]))


def validator(resp: http.client.HTTPResponse) -> str:
    etag = resp.getheader("ETag") or ""
    if etag and not etag.startswith("W/"):
        return etag
    return resp.getheader("Last-Modified") or ""


def identify(url: str, ctx: JobContext) -> Identity | None:
    """Ask the source what it is now, with a one-byte range request: its size and validator
    (None if it does not tell both). Failures are the job's, as for a download."""
    try:
        conn, resp, final = open_url(url, ctx.limits, ctx.deadline, ctx.waker,
                                     {"Range": "bytes=0-0"})
    except (OSError, http.client.HTTPException) as exc:
        if ctx.should_abort():
            raise Aborted() from None
        raise Transient("fetch_failed", f"cannot fetch {url}: {exc}") from None
    try:
        check_status(resp, final, ok=(200, 206, 416))
        size: int | None = None
        if resp.status == 206:
            got = content_range(resp)
            size = None if got is None else got[2]
        elif resp.status == 200:
            length = resp.getheader("Content-Length") or ""
            size = int(length) if length.isdigit() else None
        tag = validator(resp)
        return Identity(size, tag) if size is not None and tag else None
    finally:
        discard(conn, resp)


def _identity(resp: http.client.HTTPResponse, total: int) -> Identity | None:
    tag = validator(resp)
    return Identity(total, tag) if tag and resp.getheader("Content-Length") else None


def fetch_http(url: str, dest: str, ctx: JobContext) -> tuple[int, Identity | None]:
    """Download ``url`` into ``dest``; return the number of bytes, and what the source said
    it is (if it told a validator and a length, which the download matched)."""
    try:
        answer = open_url(url, ctx.limits, ctx.deadline, ctx.waker)[:2]
    except (Permanent, Transient):
        raise
    except (OSError, http.client.HTTPException) as exc:
        if ctx.should_abort():
            raise Aborted() from None
        raise Transient("fetch_failed", f"cannot fetch {url}: {exc}") from None
    return download(answer, url, dest, ctx)


Answer = tuple[PinnedConnection, http.client.HTTPResponse]  # an answer whose body is unread


def download(answer: Answer, url: str, dest: str, ctx: JobContext,
             ) -> tuple[int, Identity | None]:
    """Write the body of ``answer`` (a 200) into ``dest``; return the number of bytes and
    the source's identity (see fetch_http). The connection is closed in the end. The job's
    room check (``ctx.room``) is asked for the announced length before the first byte is
    written, and that length is then taken on disk at once (``reserve``). A body of
    unannounced length (chunked, or up to the connection's close) is measured as it comes:
    it stops before work_dir's free space drops below MIN_FREE_BYTES, failing the job as
    ``source_too_large_for_disk``: filling the disk to the last byte would fail the other
    workers' jobs, and pause the host for a job's problem.

    A write that fails (a full or read-only work_dir) is the host's failure, not a failed
    fetch: ``disk_full`` or ``work_dir_not_writable`` (see worker.health)."""
    conn, resp = answer
    limits = ctx.limits
    try:
        check_status(resp, url)
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > limits.max_bytes:
            raise Permanent("source_too_large",
                            f"Content-Length {length} > max_source_bytes {limits.max_bytes}")
        announced = bool(length and length.isdigit())
        if announced:
            ctx.room(int(length))
        if conn.live_sock is not None:
            conn.live_sock.settimeout(limits.stall_timeout)
        total = 0
        allowed = 0  # bytes that may be written before the next look at the free space
        with open(dest, "wb") as out, ctx.waker.watching(conn.live_sock):
            if announced:
                reserve(out.fileno(), int(length))
            while True:
                ctx.check(f"fetching {url}")
                try:
                    chunk = resp.read1(CHUNK)
                except TimeoutError:
                    raise Transient("stalled", f"no bytes from {url} for "
                                    f"{limits.stall_timeout:g} s") from None
                if not chunk:
                    break
                total += len(chunk)
                if total > limits.max_bytes:
                    raise Permanent("source_too_large",
                                    f"more than max_source_bytes {limits.max_bytes}")
                if not announced and total > allowed:
                    allowed = total - len(chunk) + _room_for_more(out.fileno(), ctx, url,
                                                                  total - len(chunk),
                                                                  len(chunk))
                out.write(chunk)
        if ctx.should_abort():
            raise Aborted()
        if length and length.isdigit() and total != int(length):
            raise Transient("fetch_failed", f"{url}: got {total} of {length} bytes")
        return total, _identity(resp, total)
    except (OSError, http.client.HTTPException) as exc:
        if ctx.should_abort():
            raise Aborted() from None
        if isinstance(exc, OSError) and is_disk_error(exc):  # the file's: not a socket errno
            raise work_dir_failure(exc, f"writing {url} into {dest}") from None
        raise Transient("fetch_failed", f"reading {url} failed: {exc}") from None
    finally:
        close(conn, resp)


try:  # Linux fallocate(2), 64-bit offsets
    _libc = ctypes.CDLL(None, use_errno=True)
    _fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
except (OSError, AttributeError):  # not Linux
    _fallocate = None
_KEEP_SIZE = 0x01  # FALLOC_FL_KEEP_SIZE: blocks allocated, the file's size unchanged


def reserve(fd: int, size: int) -> None:
    """Take the ``size`` bytes the room check granted a download at once, in the file
    system's own count (fallocate with the file's size unchanged), rather than as they
    arrive: meanwhile another worker's room check, or a download of unannounced length,
    would count them as free and fill the disk under this one. Where the file system
    cannot (fallocate unsupported), the room check alone stands."""
    if _fallocate is None or size <= 0:
        return
    if _fallocate(fd, _KEEP_SIZE, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):  # taken since the room check: a full disk
            raise OSError(err, os.strerror(err))


def _room_for_more(fd: int, ctx: JobContext, url: str, written: int, wanted: int) -> int:
    """How many more bytes (at most ROOM_STEP, at least ``wanted``) the file ``fd`` may
    grow by and leave MIN_FREE_BYTES free, for the clip and the other jobs; the source cache
    gives way first (``ctx.room``). Else the source is too large for this disk now: that
    job's failure, counted (another host may have room)."""
    def headroom() -> int:
        st = os.fstatvfs(fd)
        return st.f_bavail * st.f_frsize - MIN_FREE_BYTES

    room = headroom()
    if room < ROOM_STEP:
        with contextlib.suppress(Transient):
            ctx.room(ROOM_STEP)  # what the cache can give; its verdict is ours to make
        room = headroom()
    if room < wanted:
        raise Transient("source_too_large_for_disk",
                        f"{url} sent more than {written} bytes without announcing its "
                        f"length, and work_dir has no room for more ({max(room, 0)} bytes "
                        f"free beyond the {MIN_FREE_BYTES} jobs keep free)")
    return min(room, ROOM_STEP)


@dataclass(frozen=True)
class Remote:
    """Where a remote source's bytes are read with HTTP Range requests (worker.relay).

    ``url`` is an http(s) URL: the job's own, or a Cloud Storage object's media link.
    ``identity``, when known before reading (a Cloud Storage object's size and generation),
    is the very version ``url`` reads: an answer of another size, or a 404, means that
    version is gone. ``headers`` are asked for before each request (a bearer token, fresh
    when the last one expired). ``guarded``: the address guard applies, because the job
    named the host; an endpoint the operator configured (Cloud Storage's) is not guarded.
    """

    url: str
    identity: Identity | None = None
    headers: Callable[[], dict[str, str]] | None = None
    guarded: bool = True


class RemoteSource(Protocol):
    """A source that is read over the network: in place through the relay (``remote``),
    confirmed unchanged for the source cache (``identify``), or downloaded whole."""

    url: str  # the job's
    remote: Remote

    def identify(self, ctx: JobContext) -> Identity | None: ...

    def download(self, dest: str, ctx: JobContext, answer: Answer | None = None,
                 ) -> tuple[int, Identity | None]:
        """Download into ``dest``: from ``answer`` if one came (a server that does not
        seek answered the relay with the whole file), else with a request of its own."""
        ...


class HttpSource:
    """An http(s) source: read and confirmed through the address guard (see above)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.remote = Remote(url)

    def identify(self, ctx: JobContext) -> Identity | None:
        return identify(self.url, ctx)

    def download(self, dest: str, ctx: JobContext, answer: Answer | None = None,
                 ) -> tuple[int, Identity | None]:
        if answer is None:
            return fetch_http(self.url, dest, ctx)
        return download(answer, self.url, dest, ctx)


def local_path(url: str, max_bytes: int) -> str:
    """A ``file://`` source (only when allowed in config): used in place, after checks."""
    path = urlsplit(url).path
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise Permanent("not_found", f"{path} does not exist") from None
    except OSError as exc:
        raise Permanent("not_found", f"{path}: {exc.strerror}") from None
    if size > max_bytes:
        raise Permanent("source_too_large", f"{size} bytes > max_source_bytes {max_bytes}")
    return path
