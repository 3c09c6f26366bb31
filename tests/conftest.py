"""Real parts for the tests: redis-server, ffmpeg-made videos, a loopback HTTP server, and
the supervisor run as a real process. Everything binds to 127.0.0.1; waits have deadlines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
import redis

from supervisor.sample import make_video
from tests.httpd import TestServer
from worker.keys import Keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELIVERER_TITLE = "clip-supervisor: webhooks"  # the webhook deliverer's process title

for _tool in ("redis-server", "ffmpeg", "ffprobe"):
    if shutil.which(_tool) is None:
        raise RuntimeError(f"{_tool} is required for the tests (see README: scripts/test.sh)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A private redis-server on a free loopback port, which tests may kill and restart."""

    def __init__(self, workdir: str, appendonly: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        os.makedirs(self.workdir, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--dir", self.workdir,
             "--loglevel", "warning"], stdout=subprocess.DEVNULL)
        wait_for(self._ping, 10, what="redis-server to answer")
        return self

    def _ping(self) -> bool:
        try:
            return bool(self.client(socket_timeout=0.5).ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path / "redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> str:
    """Small generated videos (1 s GOP) and a few files that are not videos."""
    folder = tmp_path_factory.mktemp("media")
    make_video(str(folder / "ten.mp4"), 10)
    make_video(str(folder / "twenty.mp4"), 20)
    (folder / "page.html").write_text("<!doctype html><html><body>not a video</body></html>")
    return str(folder)


@pytest.fixture(scope="session")
def heavy_video(media_dir) -> str:
    """A 12 s 960x540 video at 3 Mbit/s: an encode of it takes a few seconds, long enough to
    watch its progress rise."""
    path = os.path.join(media_dir, "heavy.mp4")
    if not os.path.exists(path):
        make_video(path, 12, size="960x540", bitrate="3M")
    return "heavy.mp4"


@pytest.fixture(scope="session")
def http(media_dir) -> Iterator[TestServer]:
    server = TestServer(media_dir)
    yield server
    server.close()


@dataclass
class Env:
    """Everything one supervisor test needs: config file, Redis, folders, helpers."""

    tmp: str
    redis: RedisServer
    http: TestServer
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = Keys("clips")
        self.out = os.path.join(self.tmp, "out")
        self.work = os.path.join(self.tmp, "work")
        self.log = os.path.join(self.tmp, "supervisor.log")
        self.settings = _merge({
            "supervisor": {"workers": 2, "graceful_timeout": 20, "heartbeat_interval": 0.5,
                           "heartbeat_ttl": 2, "min_uptime": 0.5, "logfile": self.log,
                           "log_level": "debug"},
            "redis": {"url": self.redis.url, "block_timeout": 1},
            # copy unless a test asks for another mode: the daemon's default, smart, costs
            # more processes per clip than most tests are about (tests/test_clips.py and
            # test_smartcut.py cut in smart mode)
            "job": {"work_dir": self.work, "allow_private_networks": "true", "mode": "copy",
                    "retry_backoff": 0.2, "stall_timeout": 20, "timeout": 60},
            "storage": {"output_base": f"file://{self.out}"},
        }, self.settings)
        self.r = self.redis.client()

    @property
    def conf(self) -> str:
        path = os.path.join(self.tmp, "clip-supervisor.conf")
        with open(path, "w") as fh:
            for section, values in self.settings.items():
                fh.write(f"[{section}]\n")
                for key, value in values.items():
                    fh.write(f"{key} = {value}\n")
        return path

    def url(self, name: str, slow: float = 0) -> str:
        return self.http.url(name, slow)

    def push(self, *messages: bytes | str | dict) -> list[bytes]:
        raw = [m if isinstance(m, bytes) else
               (json.dumps(m) if isinstance(m, dict) else m).encode() for m in messages]
        for message in raw:
            self.r.lpush(self.keys.queue, message)
        return raw

    def start(self, *extra: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config",
                                 self.conf, *extra], cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "supervisor", *args, "--config",
                               self.conf], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{args} exited {done.returncode}: {done.stderr}")
        return done

    def workers(self, proc: subprocess.Popen) -> list[int]:
        """The pids of the master's live worker processes. Its other child, the webhook
        deliverer (with ``[notify] secret``), is told apart by its process title, which it
        sets right after the fork, before it connects to Redis (supervisor.webhooks)."""
        try:
            children = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE or \
                        DELIVERER_TITLE in " ".join(child.cmdline()):
                    continue
            except psutil.NoSuchProcess:  # exited between the listing and the look
                continue
            pids.append(child.pid)
        return sorted(pids)

    def wait_workers(self, proc: subprocess.Popen, n: int, timeout: float = 10) -> list[int]:
        """Wait until n workers are registered in Redis (ready to fetch)."""
        def ready() -> list[int] | None:
            pids = self.workers(proc)
            registered = {json.loads(v)["pid"] for v in self.r.hvals(self.keys.workers)}
            return pids if len(pids) == n and set(pids) <= registered else None
        return wait_for(ready, timeout, what=f"{n} registered workers")

    def done_events(self) -> list[dict]:
        return [json.loads(e) for e in self.r.lrange(self.keys.done, 0, -1)]

    def dead_letters(self) -> list[dict]:
        return [json.loads(e) for e in self.r.lrange(self.keys.dead, 0, -1)]

    def finished(self) -> int:
        return self.r.llen(self.keys.done) + self.r.llen(self.keys.dead)

    def wait_finished(self, n: int, timeout: float = 60) -> None:
        wait_for(lambda: self.finished() >= n, timeout, interval=0.05,
                 what=f"{n} finished jobs (have {self.finished()})")

    def processing_lists(self) -> dict[str, list[bytes]]:
        return {k.decode(): self.r.lrange(k, 0, -1)
                for k in self.r.scan_iter(match=self.keys.processing_pattern)}

    def holder_of(self, message: bytes) -> int | None:
        """pid of the worker whose processing list holds ``message``."""
        for key, items in self.processing_lists().items():
            if message in items:
                return int(key.rsplit(":", 2)[1])
        return None

    def wait_in_flight(self, *messages: bytes, timeout: float = 10) -> list[int]:
        """Wait until every message is held by a worker; returns their pids."""
        def holders() -> list[int] | None:
            pids = [self.holder_of(m) for m in messages]
            return pids if all(pids) else None  # type: ignore[return-value]
        return wait_for(holders, timeout, what=f"{len(messages)} job(s) in flight")

    def stop(self, proc: subprocess.Popen, timeout: float = 30) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def work_leftovers(self) -> list[str]:
        """What is left in work_dir but the host's source cache (kept on purpose), and in the
        cache any file still on its way in."""
        names = [n for n in os.listdir(self.work) if n != "cache"]
        cache = os.path.join(self.work, "cache")
        if os.path.isdir(cache):
            names += [f"cache/{n}" for n in os.listdir(cache) if n.startswith(".tmp-")]
        return names

    def log_text(self) -> str:
        try:
            with open(self.log) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait(10)
        # No process of ours may outlive a test (workers, ffmpeg).
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if self.tmp in cmd:
                with _suppress():
                    p.kill()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, psutil.Error))


def _merge(base: dict, extra: dict) -> dict:
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)
    return base


@pytest.fixture
def env(tmp_path, redis_server, http, request) -> Iterator[Env]:
    marker = request.node.get_closest_marker("settings")
    e = Env(str(tmp_path), redis_server, http, settings=marker.args[0] if marker else {})
    yield e
    e.cleanup()


def ffprobe_duration(path: str) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                          "-of", "json", path], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)["format"]["duration"])


@pytest.fixture(scope="session", autouse=True)
def ffmpeg_start_plans() -> None:
    """The host's start plans of ffmpeg and ffprobe (worker.preload), made once before any
    test: the first master on a host spends a second or two making them, which a test's
    wait for its workers is not about. In this process too, so in-process pipelines use
    them as the workers do."""
    from worker import preload

    preload.prepare(["ffmpeg", "ffprobe"])


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "settings(dict): config sections for the env fixture")


# --- Google Cloud Storage (tests/test_gcs.py) -----------------------------------------------


class GcsEmulator:
    """gcp-storage-emulator as a subprocess on a free loopback port.

    A subprocess rather than in-process (its server thread is not a daemon): a test can stop
    it, freeze it (SIGSTOP: connections are accepted by the kernel but never answered),
    and start it again on the same port. With ``in_memory=False`` its data lives under
    ``data_dir``, so a restart keeps buckets and objects as a real outage would; in memory,
    a restart loses everything, open resumable sessions included.
    """

    def __init__(self, data_dir: str, in_memory: bool = False) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.in_memory = in_memory
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> GcsEmulator:
        os.makedirs(self.data_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
               "--port", str(self.port), "--quiet"]
        if self.in_memory:
            cmd.append("--in-memory")
        self.proc = subprocess.Popen(cmd, cwd=self.data_dir,
                                     env={**os.environ, "STORAGE_BASE": self.data_dir},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, 20, interval=0.05, what="the storage emulator to answer")
        return self

    def _answers(self) -> bool:
        import urllib.request

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the storage emulator exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        # SIGKILL: works on a frozen emulator too, and is what an outage looks like.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> Any:
        """A client of our own, pointed at this emulator without touching os.environ."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(name)

    def worker_connected(self, pid: int) -> bool:
        """True when process ``pid`` has a TCP connection open to this emulator."""
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.raddr and c.raddr.port == self.port for c in conns)


def start_with_env(env: Env, extra_env: dict[str, str], *extra: str) -> subprocess.Popen:
    """Like ``env.start()``, with more environment variables for the supervisor and so for
    its workers (e.g. STORAGE_EMULATOR_HOST)."""
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", env.conf,
                             *extra], cwd=ROOT, start_new_session=True,
                            env={**os.environ, **extra_env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env.procs.append(proc)
    return proc


# --- daemons: for tests/test_daemon.py and tests/test_init_script.py -----------------------


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (a daemon a failed test left behind)."""
    try:
        proc = psutil.Process(pid)
        family = [*proc.children(recursive=True), proc]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with _suppress():
            p.kill()


def child_named(pid: int, name: str) -> psutil.Process | None:
    """The child of ``pid`` called ``name``, if any. Children that exit while they are looked
    at (the worker's trial run of its launcher, a probe) are passed over, not an error."""
    for child in psutil.Process(pid).children():
        try:
            if child.name() == name:
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def gone(pid: int) -> bool:
    """True once the process has exited (a zombie waiting for init to reap it counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def daemon_env(env) -> Iterator[Env]:
    """``env`` whose config names a pid file (``env.pidfile``); at the end, whatever process
    still holds that pid file's lock is killed with its children. A daemon's cmdline is its
    process title, so ``env.cleanup`` cannot find it by the test's folder."""
    from supervisor.pidfile import holder

    env.pidfile = os.path.join(env.tmp, "run", "clip-supervisor.pid")
    env.settings["supervisor"]["pidfile"] = env.pidfile
    yield env
    pid = holder(env.pidfile)[1]
    if pid is not None and pid > 0:
        kill_tree(pid)
