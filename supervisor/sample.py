"""Sample videos and a small Range-capable HTTP server, for the demo, tests and benchmarks.

Python's http.server ignores Range requests, and ffmpeg seeking over HTTP relies on them
(without them it reads from the start up to the point it seeks to), so this server answers
``Range: bytes=a-b`` with 206. It binds to loopback.
Run it on its own: ``python -m supervisor.sample serve DIR [PORT]`` prints the port it got.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def make_video(path: str, seconds: float = 10.0, *, size: str = "320x240", rate: int = 25,
               gop: int = 25, audio: bool = True, bitrate: str = "",
               ffmpeg: str = "ffmpeg") -> str:
    """A test-pattern H.264 (+AAC) MP4 with a keyframe every ``gop`` frames."""
    cmd = [ffmpeg, "-v", "error", "-nostdin", "-y",
           "-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-g", str(gop), "-pix_fmt", "yuv420p"]
    if bitrate:  # a test pattern compresses to almost nothing; force a realistic size
        cmd += ["-b:v", bitrate, "-minrate", bitrate, "-maxrate", bitrate, "-bufsize", bitrate]
    if audio:
        cmd += ["-c:a", "aac", "-shortest"]
    cmd += ["-movflags", "+faststart", path]
    subprocess.run(cmd, check=True)
    return path


class PacedWriter:
    """A write-only file that counts what goes through it, paced to ``rate`` bytes/s (0: as
    fast as it goes); ``on_write(n)`` hears of every write. With a small socket send buffer,
    this imitates a remote server on loopback (tests and benchmarks)."""

    def __init__(self, out: BinaryIO, rate: float = 0.0,
                 on_write: Callable[[int], None] | None = None) -> None:
        self.out = out
        self.rate = rate
        self.on_write = on_write
        self.count = 0
        self.free_at = time.monotonic()  # when the "link" has sent the last write

    def write(self, data: bytes) -> int:
        written = self.out.write(data)
        self.count += len(data)
        if self.on_write is not None:
            self.on_write(len(data))
        if self.rate:
            # Like a link: each write takes its size / rate after the previous one, and time
            # spent blocked (the client not reading) is not made up for with a burst.
            now = time.monotonic()
            self.free_at = max(self.free_at, now) + len(data) / self.rate
            if self.free_at > now:
                time.sleep(self.free_at - now)
        return written

    def flush(self) -> None:
        self.out.flush()


class RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range support; quiet unless something goes wrong."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def send_head(self):  # type: ignore[override]
        self._range: tuple[int, int] | None = None
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if header is None or not os.path.isfile(path):
            return super().send_head()
        match = _RANGE.match(header.strip())
        size = os.path.getsize(path)
        if not match or (not match.group(1) and not match.group(2)):
            return super().send_head()
        if match.group(1):
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else size - 1
        else:
            start, end = max(0, size - int(match.group(2))), size - 1
        end = min(end, size - 1)
        if start > end or start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        fh = open(path, "rb")  # noqa: SIM115 - closed by copyfile's caller
        fh.seek(start)
        self._range = (start, end)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        # as real servers do: what caches and If-Range compare
        modified = int(os.fstat(fh.fileno()).st_mtime)
        self.send_header("Last-Modified", self.date_time_string(modified))
        self.end_headers()
        return fh

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        # A client that seeks hangs up once it has what it needs: that is not an error.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._copy(source, outputfile)

    def _copy(self, source, outputfile) -> None:
        if getattr(self, "_range", None) is None:
            shutil.copyfileobj(source, outputfile)
            return
        start, end = self._range  # type: ignore[misc]
        remaining = end - start + 1
        while remaining > 0:
            chunk = source.read(min(65536, remaining))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)

    def end_headers(self) -> None:
        if getattr(self, "_range", None) is None:
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def start_server(directory: str, host: str = "127.0.0.1", port: int = 0) -> _Server:
    """Serve ``directory`` in a background thread; ``server.server_address`` has the port."""

    def handler(*args, **kwargs):
        return RangeRequestHandler(*args, directory=directory, **kwargs)

    server = _Server((host, port), handler)
    threading.Thread(target=server.serve_forever, name="sample-http", daemon=True).start()
    return server


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        server = _Server(("127.0.0.1", int(argv[2]) if len(argv) > 2 else 0),
                         lambda *a, **k: RangeRequestHandler(*a, directory=argv[1], **k))
        print(server.server_address[1], flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
        return 0
    print("usage: python -m supervisor.sample serve DIR [PORT]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
