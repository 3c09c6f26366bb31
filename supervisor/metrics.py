"""The master's HTTP listener (``[metrics] listen``): ``/metrics``, ``/healthz``, and the
dashboard (``supervisor.dashboard``) on every other path.

Counters live in the processes that count (workers count jobs, the master counts restarts)
and are summed here at scrape time by prometheus-client's multiprocess collector, from
memory-mapped files in a private folder in memory (``/dev/shm``): never on work_dir's disk,
where a full file system would make the first write to a new page of such a file kill its
process with SIGBUS, a worker included, at the very moment the host should pause calmly.
That folder must be named in
``PROMETHEUS_MULTIPROC_DIR`` before prometheus-client is first imported, so ``prepare()``
runs before the master (and through it the worker code) is imported, and this module
imports prometheus-client only inside functions.

Queue depths are not counters of ours: they are read from Redis at scrape time. The
server runs in a thread of the master; the master loop never waits on it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil

from worker.config import Config
from worker.queue import REDIS_ERRORS, JobQueue, connect

from .dashboard import MAX_BODY, Dashboard, Request

log = logging.getLogger("clip-supervisor.metrics")
LOOP_STALE_AFTER = 5.0  # seconds without a master loop turn before /healthz says 503
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request


METRICS_PREFIX = "clip-supervisor-metrics-"


def prepare(config: Config) -> str | None:
    """Make this master's multiprocess folder and name it in the environment; returns it,
    or None when metrics are off. The folder is made by ``mkdtemp`` (a fresh name, mode
    0700: nobody can plant it beforehand even in a world-writable place), removed at exit;
    those of masters that died without removing theirs are swept first."""
    if not config.metrics.listen:
        return None
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else tempfile.gettempdir()
    _sweep(base)
    folder = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-", dir=base)
    me = os.getpid()
    # Only the master removes it: a forked worker inherits this hook but leaves by _exit.
    atexit.register(lambda: os.getpid() == me and shutil.rmtree(folder, ignore_errors=True))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    return folder


def _sweep(base: str) -> None:
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            if not entry.name.startswith(METRICS_PREFIX):
                continue
            pid = entry.name[len(METRICS_PREFIX):].partition("-")[0]
            with contextlib.suppress(OSError, ValueError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() \
                        and not psutil.pid_exists(int(pid)):
                    shutil.rmtree(entry.path, ignore_errors=True)


def worker_exited(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        from worker import promsafe

        multiprocess.mark_process_dead(pid)
        promsafe.retire(pid)  # its counts into the sums: not a file per worker ever run


class _QueueCollector:
    """Queue depths and worker counts, read from Redis when Prometheus scrapes."""

    def __init__(self, queue: JobQueue, live_workers: Callable[[], int]) -> None:
        self.queue = queue
        self.live_workers = live_workers

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("clip_redis_up", "1 when Redis answered this scrape.")
        depth = GaugeMetricFamily("clip_queue_length", "Messages in each list of the queue.",
                                  labels=["queue"])
        fleet = GaugeMetricFamily("clip_workers_registered",
                                  "Workers registered in Redis, all hosts.")
        try:
            depths, registry = self.queue.overview()
        except REDIS_ERRORS:
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            for label, value in depths.items():
                depth.add_metric([label], value)
            yield depth
            fleet.add_metric([], len(registry))
            yield fleet
        alive = GaugeMetricFamily("clip_workers_alive", "Worker processes of this supervisor.")
        alive.add_metric([], self.live_workers())
        yield alive


class MetricsServer:
    def __init__(self, config: Config, loop_tick: Callable[[], float],
                 live_workers: Callable[[], int]) -> None:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        host, _, port = config.metrics.listen.rpartition(":")
        self.queue = JobQueue(connect(config, socket_timeout=2.0), config)
        self.host_id = config.host_id
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(_QueueCollector(self.queue, live_workers))  # type: ignore[arg-type]
        server = self
        # The dashboard (supervisor/dashboard.py) answers every other path on this listener.
        self.dashboard = Dashboard(self.queue, config.metrics.auth_token, host.strip("[]"))

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT  # a client that stops sending does not hold a thread
            server_version = "clip-supervisor"
            sys_version = ""

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry),
                               "text/plain; version=0.0.4; charset=utf-8")
                elif path == "/healthz":
                    ok, text = server.health(loop_tick())
                    self._send(200 if ok else 503, text.encode() + b"\n", "text/plain")
                else:
                    self._dashboard(b"")

            def do_POST(self) -> None:  # noqa: N802
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY:
                    self.close_connection = True
                    self._send(413, b'{"error": "body too large"}\n', "application/json")
                    return
                try:
                    body = self.rfile.read(length)
                except TimeoutError:  # announced more than it sent
                    self.close_connection = True
                    return
                self._dashboard(body)

            def do_PUT(self) -> None:  # noqa: N802
                self._dashboard(b"")

            do_DELETE = do_PATCH = do_PUT

            def _dashboard(self, body: bytes) -> None:
                answer = server.dashboard.handle(Request(
                    self.command, self.path, self.headers, self.client_address[0], body))
                self._send(answer.status, answer.body, answer.ctype, answer.headers)

            def _send(self, status: int, body: bytes, ctype: str,
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics, health and dashboard on http://%s:%d/ (dashboard actions %s)",
                 *self.address[:2], "enabled" if self.dashboard.token else "off: read-only")

    def health(self, last_tick: float) -> tuple[bool, str]:
        age = time.monotonic() - last_tick
        if age > LOOP_STALE_AFTER:
            return False, f"master loop stalled for {age:.1f} s"
        fatal = self.dashboard.fatal_slots()  # slots that gave up starting: no Redis needed
        if fatal:
            return False, "fatal: " + "; ".join(
                f"worker slot {f['slot']} failed to start {f['failures']} times in a row "
                f"(last: {f['last_failure']}); fix the cause, then send HUP or TTIN"
                for f in fatal)
        try:
            self.queue.ping()
            paused = self.paused_workers()
        except REDIS_ERRORS as exc:
            return False, f"redis unreachable: {exc}"
        if paused:
            # A host that cannot run jobs (full or read-only disk, no ffmpeg) is unhealthy
            # even though it runs: its workers take nothing until the fault clears.
            info = paused[0]
            return False, f"paused: {info.get('fault')} ({info.get('fault_error') or ''})"
        return True, "ok"

    def paused_workers(self) -> list[dict[str, Any]]:
        """The registry entries of this host's live workers that report a host fault,
        oldest fault first."""
        registry = self.queue.registered_workers()
        mine = [(wid, info) for wid, info in sorted(registry.items())
                if info.get("host") == self.host_id and info.get("fault")]
        if not mine:
            return []
        # A heartbeat gone: a dead worker's last words.
        alive = self.queue.heartbeats_alive([wid for wid, _ in mine])
        paused = [info for wid, info in mine if alive[wid]]
        return sorted(paused, key=lambda info: float(info.get("fault_since") or 0))

    def close_in_child(self) -> None:
        """A forked worker must not keep the listening socket open."""
        os.close(self.httpd.fileno())

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
