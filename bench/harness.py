"""What every benchmark shares: a private redis-server, the instrumented Range-capable HTTP
server, clip-supervisor run as a real subprocess, cached sample media, process clean-up, and
the one result line each benchmark prints.

Absolute times on a shared 2-core machine are noise, so every benchmark measures a floor in
the same run and reports a ratio against it. Everything binds to 127.0.0.1; every process a
benchmark starts is started here (``spawn``) and killed at exit, whatever happens.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import psutil
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
CACHE = os.path.join(BENCH, ".cache")
RESULTS = os.path.join(BENCH, "results")
if ROOT not in sys.path:  # supervisor.sample (stdlib only) makes the sample videos
    sys.path.insert(0, ROOT)

_PROCS: list[subprocess.Popen] = []
_TMPDIRS: list[str] = []
_LOAD_AT_START = os.getloadavg()


# --- where things are ----------------------------------------------------------------------


def clip_venv() -> str:
    """The virtual environment clip-supervisor is installed in (its own, as the README asks).

    ``CLIP_VENV`` wins; else the repository's ``.venv`` made by scripts/setup.sh.
    """
    venv = os.environ.get("CLIP_VENV") or os.path.join(ROOT, ".venv")
    if not os.path.exists(os.path.join(venv, "bin", "clip-supervisor")):
        raise SystemExit(f"no clip-supervisor in {venv}: run bench/setup.sh, or set CLIP_VENV "
                         "to a virtual environment where the package is installed")
    return venv


def clip_supervisor_bin() -> str:
    return os.path.join(clip_venv(), "bin", "clip-supervisor")


def clip_python() -> str:
    """The interpreter (and so the redis-py) clip-supervisor runs with: floors use it too."""
    return os.path.join(clip_venv(), "bin", "python")


def bench_bin(name: str) -> str:
    """A console script of the bench venv (rq, celery, dramatiq, py-spy)."""
    return os.path.join(os.path.dirname(sys.executable), name)


# --- processes -----------------------------------------------------------------------------


def tmpdir(tag: str) -> str:
    path = tempfile.mkdtemp(prefix=f"clipbench-{tag}-")
    _TMPDIRS.append(path)
    return path


def site(tmp: str, files: dict[str, str]) -> str:
    """``tmp/www``, serving ``files`` (name in the URL -> file, linked): for HttpServer."""
    www = os.path.join(tmp, "www")
    os.makedirs(www)
    for name, path in files.items():
        os.symlink(path, os.path.join(www, name))
    return www


def spawn(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str = ROOT,
          log: str | None = None, stdout: Any = None) -> subprocess.Popen:
    """Start a process in its own session (so its whole group can be killed) and track it.
    Its output goes to ``log`` (or nowhere); ``stdout`` overrides where standard output goes.
    """
    with contextlib.ExitStack() as stack:
        err: Any = stack.enter_context(open(log, "ab")) if log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})},
                                stdin=subprocess.DEVNULL,
                                stdout=stdout if stdout is not None else err, stderr=err,
                                start_new_session=True)
    _PROCS.append(proc)
    return proc


def wait_exit(proc: subprocess.Popen, timeout: float) -> float:
    """Block in waitpid until ``proc`` exits (Popen.wait with a timeout polls, with sleeps of
    up to 50 ms: too coarse here); a timer kills its group after ``timeout`` seconds.
    Returns the seconds waited."""
    started = time.monotonic()
    watchdog = threading.Timer(timeout, kill_group, args=(proc,))
    watchdog.start()
    try:
        proc.wait()
    finally:
        watchdog.cancel()
    elapsed = time.monotonic() - started
    if elapsed >= timeout:
        raise RuntimeError(f"{proc.args!r} did not exit within {timeout:g} s")
    return elapsed


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def cleanup() -> None:
    """Kill everything we started: process groups, then any process still naming one of our
    temporary folders (ffmpeg runs in a session of its own), then remove the folders."""
    for proc in reversed(_PROCS):
        kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    _PROCS.clear()
    if _TMPDIRS:
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if any(d in cmd for d in _TMPDIRS):
                with contextlib.suppress(psutil.Error):
                    p.kill()
    for path in _TMPDIRS:
        shutil.rmtree(path, ignore_errors=True)
    _TMPDIRS.clear()


def _on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


atexit.register(cleanup)
signal.signal(signal.SIGTERM, _on_term)
signal.signal(signal.SIGHUP, _on_term)


def family(pid: int) -> list[psutil.Process]:
    """A process and all its descendants."""
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(procs: Iterable[psutil.Process]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes, and of the children they have reaped
    (a worker's ffmpeg and ffprobe are counted once the worker has waited for them)."""
    user = system = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
    return user, system


def cpu_total(procs: Iterable[psutil.Process]) -> float:
    return sum(cpu_seconds(procs))


def children_cpu() -> float:
    """CPU seconds of the harness's own reaped children (e.g. an xargs and its ffmpegs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def freeze(procs: Iterable[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.suspend()


def thaw(procs: Iterable[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.resume()


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.01,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_done(r: redis.Redis, keys: dict[str, str], n: int, timeout: float,
              what: str = "jobs") -> list[dict[str, Any]]:
    """Wait for ``n`` completion events and take them off ``{prefix}:done`` (oldest first).

    Blocks in BLMOVE instead of polling: a harness asking Redis every few milliseconds
    takes CPU from the very workers it times (on 2 cores, ~6 % of one during a clip run).
    A dead letter raises at once."""
    seen = keys["done"] + ":bench-taken"
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(events) < n:
        raw = r.blmove(keys["done"], seen, 1.0, "RIGHT", "LEFT")
        if raw is not None:
            events.append(json.loads(raw))
            continue
        if r.llen(keys["dead"]):
            raise RuntimeError(f"dead letters: {r.lrange(keys['dead'], 0, -1)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Redis ---------------------------------------------------------------------------------


class RedisServer:
    """A private redis-server on a free loopback port (never the system one on 6379)."""

    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        os.makedirs(workdir, exist_ok=True)
        self.proc = spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no", "--dir", workdir,
                           "--loglevel", "warning"])
        self.r = redis.Redis.from_url(self.url, socket_timeout=10)
        wait_until(self._ping, 10, what="redis-server to answer")

    def _ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    def blocked_clients(self, command: str | None = None) -> int:
        """Clients blocked in a command right now (e.g. workers idle in BLMOVE)."""
        clients = self.r.client_list()
        return sum(1 for c in clients if "b" in c.get("flags", "")
                   and (command is None or c.get("cmd") == command))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def keys(prefix: str = "clips") -> dict[str, str]:
    """clip-supervisor's key names, as a producer sees them (worker.keys makes them: stdlib
    only, so the bench's own interpreter imports it)."""
    from worker.keys import Keys

    k = Keys(prefix)
    return {name: getattr(k, name) for name in
            ("queue", "retry", "delayed", "workers", "attempts", "done", "dead")} | {
        "processing": k.processing(""), "job": k.job("")}


# --- the HTTP server -----------------------------------------------------------------------


class HttpServer:
    """bench.rangeserver in a subprocess: supervisor.sample's Range-capable server, counting
    the bytes it sends per request. A subprocess so that its work is not charged to (nor
    slowed by) the harness's interpreter."""

    def __init__(self, directory: str, rate: float = 0.0) -> None:
        self.proc = spawn([sys.executable, "-m", "bench.rangeserver", directory,
                           "--rate", str(rate)], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.isdigit():
            raise RuntimeError(f"bench.rangeserver did not start: {line!r}")
        self.port = int(line)
        self.base = f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.base}{path}", timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        """{"requests": [{"path", "range", "status", "bytes", "seconds"}], "bytes", ...},
        once every response has ended (a client that hung up is noticed at the next write)."""
        deadline = time.monotonic() + 5
        while True:
            stats = self._get("/__stats")
            if stats["active"] == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.01)

    def reset(self) -> None:
        self._get("/__reset")


# --- clip-supervisor -----------------------------------------------------------------------


class Supervisor:
    """``clip-supervisor run --config <tmp conf>`` as a subprocess, on a private Redis."""

    def __init__(self, tmp: str, redis_url: str, workers: int, *, prefix: str = "clips",
                 log_level: str = "", **sections: dict[str, Any]) -> None:
        os.makedirs(tmp, exist_ok=True)
        self.tmp = tmp
        self.workers = workers
        self.prefix = prefix
        self.keys = keys(prefix)
        self.out = os.path.join(tmp, "out")
        self.log = os.path.join(tmp, "supervisor.log")
        self.settings: dict[str, dict[str, Any]] = {
            # log_level "" leaves the daemon's default (info), as an operator would
            "supervisor": {"workers": workers, "logfile": self.log}
            | ({"log_level": log_level} if log_level else {}),
            "redis": {"url": redis_url, "prefix": prefix},
            "job": {"work_dir": os.path.join(tmp, "work"), "allow_private_networks": "true",
                    "done_max": 1_000_000},
            "storage": {"output_base": f"file://{self.out}"},
        }
        for section, values in sections.items():
            self.settings.setdefault(section, {}).update(values)
        self.conf = os.path.join(tmp, "clip-supervisor.conf")
        with open(self.conf, "w") as fh:
            for section, values in self.settings.items():
                fh.write(f"[{section}]\n")
                for key, value in values.items():
                    fh.write(f"{key} = {value}\n")
        self.r = redis.Redis.from_url(redis_url, socket_timeout=10)
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 30) -> Supervisor:
        self.proc = spawn([clip_supervisor_bin(), "run", "--config", self.conf],
                          log=os.path.join(self.tmp, "supervisor.out"))
        wait_until(self.ready, ready_timeout, what=f"{self.workers} registered workers")
        return self

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        try:
            return sorted(c.pid for c in psutil.Process(self.proc.pid).children()
                          if c.status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return []

    def ready(self) -> bool:
        """Every worker forked and registered in Redis (so about to fetch)."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"clip-supervisor exited early; see {self.log}")
        pids = self.worker_pids()
        registered = {json.loads(v).get("pid") for v in self.r.hvals(self.keys["workers"])}
        return len(pids) == self.workers and set(pids) <= registered

    def holder(self, message: bytes) -> int | None:
        """pid of the worker whose processing list holds ``message`` (SCAN: harness only)."""
        for key in self.r.scan_iter(match=self.keys["processing"] + "*"):
            if message in self.r.lrange(key, 0, -1):
                return int(key.decode().rsplit(":", 2)[1])
        return None

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM the master and wait for it; returns the seconds it took."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        wait_exit(self.proc, timeout)
        return time.monotonic() - started

    def log_text(self) -> str:
        try:
            with open(self.log) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""


# --- media ---------------------------------------------------------------------------------


def media(name: str, seconds: float, size: str, bitrate: str = "", gop: int = 25) -> str:
    """A generated H.264+AAC MP4 (faststart), cached under bench/.cache across runs."""
    from supervisor.sample import make_video

    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, name)
    if not os.path.exists(path):
        note(f"generating {name} ({seconds:g} s {size}); cached for later runs")
        partial = path + ".partial.mp4"
        make_video(partial, seconds, size=size, gop=gop, bitrate=bitrate)
        os.replace(partial, path)
    return path


SOURCE_720P = ("src-60s-720p.mp4", 60, "1280x720", "3M")
SOURCE_LONG = ("long-10min-240p.mp4", 600, "320x240", "400k")


# --- statistics and output -----------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def note(message: str) -> None:
    """Progress and diagnostics: standard error, so standard output is the result line."""
    print(message, file=sys.stderr, flush=True)


def emit(name: str, line: str, data: dict[str, Any]) -> None:
    """Print the benchmark's one result line and keep the details in bench/results/."""
    os.makedirs(RESULTS, exist_ok=True)
    module = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    command = " ".join(["bench/.venv/bin/python", "-m", f"bench.{module}", *sys.argv[1:]])
    record = {"name": name, "line": line, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": command,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(),
                          # 1-minute load average when the benchmark started and ended: the
                          # machine is shared, and a busy one makes every figure noisier.
                          "loadavg_start": _LOAD_AT_START[0],
                          "loadavg_end": os.getloadavg()[0]},
              "data": data}
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as fh:
        json.dump(record, fh, indent=2)
    print(line, flush=True)
