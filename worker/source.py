"""Fetching a job's source video into the job's folder.

HTTP(S) is spoken with http.client rather than urllib so that every hop of a redirect chain
can be checked against the address guard and connected to the very address that was checked
(no second DNS lookup an attacker could answer differently). Reads have a stall timeout, the
whole fetch a deadline, and the body a size cap, so a hostile or broken server costs a
bounded amount of time and disk.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from .errors import Aborted, Permanent, Transient
from .wake import Waker

CHUNK = 256 * 1024
MAX_REDIRECTS = 5
USER_AGENT = "clip-supervisor/0.1"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPAT = ipaddress.IPv6Network("::/96")


@dataclass(frozen=True)
class FetchLimits:
    connect_timeout: float
    stall_timeout: float
    max_bytes: int
    allow_private: bool


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
    """Connects to an address decided in advance, whatever ``host`` resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, address, timeout)
        self._tls = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.host)


def _open(url: str, limits: FetchLimits, deadline: float | None = None,
          waker: Waker | None = None) -> tuple[http.client.HTTPConnection,
                                               http.client.HTTPResponse]:
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise Permanent("scheme_not_allowed", f"redirected to a {scheme!r} url")
        port = parts.port or (443 if scheme == "https" else 80)
        address = resolve(parts.hostname or "", port, limits.allow_private)
        cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        conn = cls(parts.hostname or "", port, address, limits.connect_timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        resp = _exchange(conn, target, deadline, waker)
        if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
            url = urljoin(url, resp.getheader("Location"))
            conn.close()
            continue
        return conn, resp
    raise Permanent("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")


def _exchange(conn: http.client.HTTPConnection, target: str, deadline: float | None,
              waker: Waker | None) -> http.client.HTTPResponse:
    """Send the request and read the status line and headers, within the job's deadline.

    A server can dribble its headers a byte at a time, each within the socket timeout: a
    timer shuts the socket down at the deadline, and a QUIT wakes it (worker.wake).
    """
    conn.connect()
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
                                                 "Accept-Encoding": "identity"})
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


def _check_status(resp: http.client.HTTPResponse, url: str) -> None:
    status = resp.status
    if status == 200:
        return
    text = f"HTTP {status} {resp.reason} from {url}"
    if status in (404, 410):
        raise Permanent("not_found", text)
    if status in (401, 403):
        raise Permanent("forbidden", text)
    if status in (408, 425, 429) or status >= 500:
        raise Transient("source_unavailable", text)
    raise Permanent("http_error", text)


def fetch_http(url: str, dest: str, limits: FetchLimits, deadline: float,
               should_abort: Callable[[], bool], waker: Waker) -> int:
    """Download ``url`` into ``dest``; return the number of bytes."""
    try:
        conn, resp = _open(url, limits, deadline, waker)
    except (Permanent, Transient):
        raise
    except (OSError, http.client.HTTPException) as exc:
        if should_abort():
            raise Aborted() from None
        raise Transient("fetch_failed", f"cannot fetch {url}: {exc}") from None
    try:
        _check_status(resp, url)
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > limits.max_bytes:
            raise Permanent("source_too_large",
                            f"Content-Length {length} > max_source_bytes {limits.max_bytes}")
        if conn.sock is not None:
            conn.sock.settimeout(limits.stall_timeout)
        total = 0
        with open(dest, "wb") as out, waker.watching(conn.sock):
            while True:
                if should_abort():
                    raise Aborted()
                if time.monotonic() > deadline:
                    raise Transient("timeout", f"fetching {url} exceeded the job timeout")
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
                out.write(chunk)
        if should_abort():
            raise Aborted()
        if length and length.isdigit() and total != int(length):
            raise Transient("fetch_failed", f"{url}: got {total} of {length} bytes")
        return total
    except (OSError, http.client.HTTPException) as exc:
        if should_abort():
            raise Aborted() from None
        raise Transient("fetch_failed", f"reading {url} failed: {exc}") from None
    finally:
        conn.close()


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
