"""The tests' loopback HTTP server: the Range-capable sample server plus a few behaviours.

    /NAME                 the file, with Range support
    /slow/SECONDS/NAME    the file, spread over SECONDS (a job that is surely mid-fetch)
    /stall/BYTES/NAME     BYTES of the file, then silence while the connection stays open
    /trickle/NAME         a few bytes every 0.2 s, forever (Content-Length says the file's size)
    /dribble              response headers one byte every 0.2 s, for ever
    /status/CODE          an empty answer with that HTTP status
    /flaky/N/KEY/NAME     503 for the first N requests (counted per KEY), then the file
    /redirect?to=URL      302 to URL
    /norange/NAME         the file, ignoring Range (always 200 and the whole file)
    /paced/RATE/KEY/NAME  the file, with Range support, each answer paced to RATE bytes/s
                          through a small send buffer (a remote server's behaviour on a
                          real link); the body bytes sent are counted per KEY (``sent``)
    /vanish/KEY/NAME      the file for the first request (counted per KEY), then 404
    /cut/KEY/NAME         the file for the first request, then answers whose body stops
                          after 64 KiB, the connection closed
    /stallrange/KEY/NAME  the file for the first request, then 64 KiB and silence
    /capped/BYTES/NAME    the file, each Range answer cut to at most BYTES (as some CDNs do)
    /expiring/KEY/NAME    302 to /once/KEY/NAME, a URL that works for one request only
    /overlong/NAME        Range answers that claim 100 bytes (Content-Range) and send 200
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

from supervisor.sample import _RANGE, PacedWriter, RangeRequestHandler, _Server

PACED_SNDBUF = 64 * 1024
CUT_BYTES = 64 * 1024


class Handler(RangeRequestHandler):
    stop_event: threading.Event
    counts: dict[str, int]
    sent: dict[str, int]
    ranges: dict[str, list[str | None]]
    lock: threading.Lock
    _paced: tuple[float, str] | None = None

    def _empty(self, status: int, **headers: str) -> None:
        """An answer with no body."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _count(self, key: str) -> int:
        """How many requests KEY had before this one (and count this one)."""
        with self.lock:
            seen = self.counts.get(key, 0)
            self.counts[key] = seen + 1
            self.ranges.setdefault(key, []).append(self.headers.get("Range"))
        return seen

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        segments = parts.path.strip("/").split("/")
        if segments[0] == "status" and len(segments) == 2:
            self._empty(int(segments[1]))
            return
        if segments[0] == "dribble":
            try:
                for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"x" * 60000:
                    if self.stop_event.wait(0.2):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if segments[0] == "redirect":
            self._empty(302, Location=parse_qs(parts.query)["to"][0])
            return
        if segments[0] == "flaky" and len(segments) == 4:
            with self.lock:
                seen = self.counts.get(segments[2], 0)
                self.counts[segments[2]] = seen + 1
            if seen < int(segments[1]):
                self._empty(503)
                return
            self.path = "/" + segments[3]
        elif segments[0] == "paced" and len(segments) == 4:
            self._count(segments[2])
            self._paced = (float(segments[1]), segments[2])
            self.path = "/" + segments[3]
        elif segments[0] == "vanish" and len(segments) == 3:
            if self._count(segments[1]):
                self._empty(404)
                return
            self.path = "/" + segments[2]
        elif segments[0] in ("cut", "stallrange") and len(segments) == 3:
            if self._count(segments[1]) and self.headers.get("Range"):
                self._break_range(segments[0], segments[2])
                return
            self.path = "/" + segments[2]
        elif segments[0] == "capped" and len(segments) == 3:
            match = _RANGE.match((self.headers.get("Range") or "").strip())
            if match and match.group(1):
                size = os.path.getsize(os.path.join(self.directory, segments[2]))
                first = int(match.group(1))
                last = int(match.group(2)) if match.group(2) else size - 1
                del self.headers["Range"]
                self.headers["Range"] = f"bytes={first}-{min(last, first + int(segments[1]) - 1)}"
            self.path = "/" + segments[2]
        elif segments[0] == "expiring" and len(segments) == 3:
            self._empty(302, Location=f"/once/{segments[1]}-{self._count(segments[1])}/"
                                      f"{segments[2]}")
            return
        elif segments[0] == "once" and len(segments) == 3:
            if self._count(segments[1]):
                self._empty(403)
                return
            self.path = "/" + segments[2]
        elif segments[0] == "overlong" and len(segments) == 2 and self.headers.get("Range"):
            self._overlong(segments[1])
            return
        elif segments[0] == "norange" and len(segments) == 2:
            self._trickle("whole", 0, segments[1])
            return
        elif segments[0] in ("slow", "stall") and len(segments) == 3:
            self._trickle(segments[0], float(segments[1]), segments[2])
            return
        elif segments[0] == "trickle" and len(segments) == 2:
            self._trickle("trickle", 0, segments[1])
            return
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        if self._paced is None:
            super().copyfile(source, outputfile)
            return
        rate, key = self._paced
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PACED_SNDBUF)
        super().copyfile(source, PacedWriter(outputfile, rate, lambda n: self._sent(key, n)))

    def _sent(self, key: str, n: int) -> None:
        with self.lock:
            self.sent[key] = self.sent.get(key, 0) + n

    def _overlong(self, name: str) -> None:
        path = os.path.join(self.directory, name)
        size = os.path.getsize(path)
        match = _RANGE.match(self.headers["Range"].strip())
        first = int(match.group(1) or 0) if match else 0
        with open(path, "rb") as fh:
            fh.seek(first)
            data = fh.read(200)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{min(first + 99, size - 1)}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(data)

    def _break_range(self, kind: str, name: str) -> None:
        """A 206 that promises the range asked for and breaks its promise."""
        path = os.path.join(self.directory, name)
        size = os.path.getsize(path)
        match = _RANGE.match(self.headers["Range"].strip())
        first = int(match.group(1) or 0) if match else 0
        last = int(match.group(2)) if match and match.group(2) else size - 1
        with open(path, "rb") as fh:
            fh.seek(first)
            data = fh.read(min(CUT_BYTES, last - first + 1))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        try:
            self.wfile.write(data)
            self.wfile.flush()
            if kind == "stallrange":
                self.stop_event.wait(120)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _trickle(self, kind: str, amount: float, name: str) -> None:
        path = os.path.join(self.directory, name)
        with open(path, "rb") as fh:
            data = fh.read()
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            if kind == "whole":
                self.wfile.write(data)
                return
            if kind == "trickle":
                offset = 0
                while not self.stop_event.wait(0.2) and offset < len(data):
                    self.wfile.write(data[offset:offset + 16])
                    self.wfile.flush()
                    offset += 16
                return
            if kind == "stall":
                self.wfile.write(data[: int(amount)])
                self.wfile.flush()
                self.stop_event.wait(120)
                return
            steps = max(1, int(amount * 20))
            size = len(data) // steps + 1
            for i in range(steps):
                if self.stop_event.is_set():
                    return
                self.wfile.write(data[i * size:(i + 1) * size])
                self.wfile.flush()
                time.sleep(amount / steps)
        except (BrokenPipeError, ConnectionResetError):
            pass


class TestServer:
    __test__ = False

    def __init__(self, directory: str) -> None:
        stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.ranges: dict[str, list[str | None]] = {}
        bound = type("BoundHandler", (Handler,), {
            "stop_event": stop, "counts": self.counts, "sent": self.sent,
            "ranges": self.ranges, "lock": threading.Lock()})

        def handler(*args, **kwargs):
            return bound(*args, directory=directory, **kwargs)

        self._stop = stop
        self.server = _Server(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        self.directory = directory
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str, slow: float = 0) -> str:
        if slow:
            return f"http://127.0.0.1:{self.port}/slow/{slow:g}/{name}"
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
