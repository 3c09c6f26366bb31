"""supervisor.sample's Range-capable HTTP server, instrumented for the benchmarks.

``python -m bench.rangeserver DIR [--rate BYTES_PER_SECOND]`` (from the repository root)
prints its port, then serves DIR on 127.0.0.1 like ``python -m supervisor.sample serve DIR``,
plus:

- ``GET /__stats``: JSON ``{"bytes", "requests": [{"path", "range", "status", "bytes",
  "seconds"}], "active", "trickling"}``; bytes are body bytes handed to the kernel (what a
  CDN bills), counted even when the client hangs up before reading them all; a request is
  listed once it has ended (``active`` counts those still being served);
- ``GET /__reset``: forget the counts;
- ``GET /trickle/NAME``: NAME's headers at once, then one KiB every 0.25 s until the client
  leaves: a fetch that keeps a worker busy (and its message in flight) for as long as needed.

``--rate`` makes it behave like a remote server: each response is paced to that many bytes
per second, and its socket's send buffer is kept small (64 KiB). On loopback, unpaced, the
kernel's socket buffers (megabytes) fill within microseconds, so a client that reads a little
and hangs up is still charged megabytes; over a real network, what is in flight when the
client hangs up is bounded by the link, which pacing imitates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any, BinaryIO

from supervisor.sample import PacedWriter, RangeRequestHandler, _Server

TRICKLE_BYTES = 1024
TRICKLE_INTERVAL = 0.25
PACED_SNDBUF = 64 * 1024


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.active = 0
        self.trickling = 0

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"bytes": sum(r["bytes"] for r in self.requests),
                    "requests": list(self.requests), "active": self.active,
                    "trickling": self.trickling}

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()


class CountingHandler(RangeRequestHandler):
    stats = Stats()
    rate = 0.0  # bytes per second per response; 0 = as fast as loopback goes

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def do_GET(self) -> None:
        if self.path == "/__stats":
            self._json(self.stats.snapshot())
        elif self.path == "/__reset":
            self.stats.reset()
            self._json({"ok": True})
        elif self.path.startswith("/trickle/"):
            self._trickle(self.path[len("/trickle/"):])
        else:
            with self.stats.lock:
                self.stats.active += 1
            try:
                super().do_GET()
            finally:
                with self.stats.lock:
                    self.stats.active -= 1

    def _json(self, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def copyfile(self, source: BinaryIO, outputfile: BinaryIO) -> None:  # type: ignore[override]
        if self.rate:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PACED_SNDBUF)
        counter = PacedWriter(outputfile, self.rate)
        started = time.monotonic()
        try:
            super().copyfile(source, counter)  # a client hanging up early is still counted
        finally:
            with self.stats.lock:
                self.stats.requests.append({
                    "path": self.path, "range": self.headers.get("Range"),
                    "status": getattr(self, "_status", 0), "bytes": counter.count,
                    "seconds": round(time.monotonic() - started, 4)})

    def _trickle(self, name: str) -> None:
        path = self.translate_path("/" + name)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        with self.stats.lock:
            self.stats.trickling += 1
        try:
            with open(path, "rb") as fh:
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(os.path.getsize(path)))
                self.end_headers()
                while chunk := fh.read(TRICKLE_BYTES):
                    self.wfile.write(chunk)
                    time.sleep(TRICKLE_INTERVAL)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self.stats.lock:
                self.stats.trickling -= 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rangeserver")
    parser.add_argument("directory")
    parser.add_argument("--rate", type=float, default=0.0, help="bytes/s per response")
    args = parser.parse_args(argv)
    directory = args.directory
    CountingHandler.rate = args.rate
    server = _Server(("127.0.0.1", 0),
                     lambda *a, **k: CountingHandler(*a, directory=directory, **k))
    print(server.server_address[1], flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
