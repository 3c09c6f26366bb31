"""Host faults the first round of issue 13 missed, found by an adversarial review.

- An ffmpeg that is there but cannot run (a shared library missing, a binary for another
  machine, a crash on every run) is the host's fault: the host pauses, the queue is not
  dead-lettered; a one-off crash on a healthy host stays an ordinary, counted retry.
- A full or read-only ``allowed_outputs`` root (or a separate mount below ``output_base``)
  is the host's fault like a full ``output_base``.
- A source that announces no length is measured as it is written: it stops before
  work_dir drops below the floor every job needs, and is that job's failure
  (``source_too_large_for_disk``), not a full disk that pauses the host.
- The supervisor removes a killed worker's part file by walking from its output root
  without following links, as the store itself writes it.

The faults are real: small tmpfs mounts (root), shell scripts as ffmpeg, a loopback server
that sends chunked answers, a store process killed midway.
"""

from __future__ import annotations

import glob
import http.server
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from supervisor.recovery import clean_worker_dir
from tests import test_host_faults as host_faults
from tests.conftest import ROOT, wait_for
from tests.httpd import TestServer
from tests.test_host_faults import (
    MiB,
    _jobs,
    _listen,
    _paused,
    _resumed,
    _run,
    fill,
    make_config,
    remount,
)
from worker import config as config_mod
from worker import health, source
from worker.context import FetchLimits, JobContext
from worker.errors import Transient
from worker.health import MIN_FREE_BYTES, probe
from worker.media import InputReport, failure
from worker.storage import PENDING_FILE
from worker.wake import Waker

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
NO_LIBRARY = ("ffmpeg: error while loading shared libraries: libavdevice.so.59: cannot open "
              "shared object file: No such file or directory")

tmpfs = host_faults.tmpfs  # the fixture: a small tmpfs, unmounted at the end
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts tmpfs: needs root")


@pytest.fixture(autouse=True)
def _fresh_health(monkeypatch) -> None:
    """The probe's memory (ffmpeg's last clean run, folders at fault) starts empty."""
    monkeypatch.setattr(health, "_suspects", [], raising=False)
    monkeypatch.setattr(health, "_ffmpeg_ran", {}, raising=False)


def _script(path: str, body: str) -> str:
    """An executable shell script at ``path``, replaced in one step (a worker may be
    running the old one)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".new", "w") as fh:
        fh.write("#!/bin/sh\n" + body)
    os.chmod(path + ".new", 0o755)
    os.replace(path + ".new", path)
    return path


def _counted(path: str, body: str) -> str:
    """A script that counts its runs in ``path``.count, then runs ``body``."""
    count = shlex.quote(path + ".count")
    return _script(path, f"echo x >>{count}\n{body}")


def _runs(path: str) -> int:
    try:
        with open(path + ".count") as fh:
            return len(fh.read().split())
    except FileNotFoundError:
        return 0


# --- 1. an ffmpeg that is there but cannot run ----------------------------------------------


def test_the_loaders_word_is_ffmpeg_broken_not_a_failure_of_the_job():
    # Given ffmpeg's run that the loader ended (exit 127) before ffmpeg said a word
    report = InputReport.parse(NO_LIBRARY.encode())
    found = failure(127, report, NO_LIBRARY, ended=False, start=0, source="/w/source")
    # Then it is ffmpeg's fault, one that pauses a host (worker.health.HOST_REASONS)
    assert isinstance(found, Transient) and found.reason == "ffmpeg_broken"
    assert found.reason in health.HOST_REASONS
    # And an exit 127 of a wrapper whose own command is gone stays ffmpeg_failed
    said = "/opt/wrapper: 2: /usr/bin/python9: not found"
    assert failure(127, InputReport.parse(said.encode()), said, ended=False,
                   start=0).reason == "ffmpeg_failed"  # type: ignore[union-attr]


@pytest.mark.parametrize(("body", "said"), [
    (f"echo {shlex.quote(NO_LIBRARY)} >&2\nexit 127\n",
     "-version: exit 127: ffmpeg: error while loading shared libraries"),
    ("kill -SEGV $$\n", "-version: killed by SIGSEGV"),
    ("exec sleep 60\n", "-version did not end within 0.5 s"),
], ids=["no-library", "crash", "hangs"])
def test_an_ffmpeg_that_does_not_run_fails_the_probe(tmp_path, monkeypatch, body, said):
    # Given an ffmpeg that is there and executable, but cannot run
    monkeypatch.setattr(health, "FFMPEG_TIMEOUT", 0.5)
    ffmpeg = _script(str(tmp_path / "bin" / "ffmpeg"), body)
    cfg = make_config(str(tmp_path / "work"), str(tmp_path / "out"), ffmpeg=ffmpeg)
    # When the host is probed, it is at fault, and says why
    started = time.monotonic()
    reason, error = probe(cfg, str(tmp_path / "work")) or ("", "")
    assert reason == "ffmpeg_broken" and said in error and ffmpeg in error, error
    assert time.monotonic() - started < 5


def test_another_machines_binary_fails_the_probe(tmp_path):
    ffmpeg = str(tmp_path / "ffmpeg")
    with open(ffmpeg, "wb") as fh:
        fh.write(b"\x7fELF\x02\x01\x01" + b"\0" * 200)  # an ELF header of nothing
    os.chmod(ffmpeg, 0o755)
    cfg = make_config(str(tmp_path / "work"), str(tmp_path / "out"), ffmpeg=ffmpeg)
    reason, error = probe(cfg, str(tmp_path / "work")) or ("", "")
    assert reason == "ffmpeg_broken" and "Exec format error" in error, error


def test_a_clean_ffmpeg_run_is_trusted_a_minute_but_not_after_ffmpeg_failed(tmp_path):
    # Given a working ffmpeg that counts its runs
    ffmpeg = _counted(str(tmp_path / "bin" / "ffmpeg"), f'exec {FFMPEG} "$@"\n')
    work = str(tmp_path / "work")
    cfg = make_config(work, str(tmp_path / "out"), ffmpeg=ffmpeg)
    assert probe(cfg, work, reason="disk_full") is None
    assert _runs(ffmpeg) == 1
    # When the host is probed again for a failure of the disk: the clean run vouches for it
    assert probe(cfg, work, reason="output_not_writable") is None
    assert _runs(ffmpeg) == 1
    # When ffmpeg breaks a moment later and a job fails because of it: it runs again, and
    # the host is at fault at once
    _counted(ffmpeg, f"echo {shlex.quote(NO_LIBRARY)} >&2\nexit 127\n")
    assert (probe(cfg, work, reason="ffmpeg_failed") or ("",))[0] == "ffmpeg_broken"
    # and a failed run vouches for nothing: the next probe runs it again, whatever the reason
    assert (probe(cfg, work, reason="disk_full") or ("",))[0] == "ffmpeg_broken"
    assert _runs(ffmpeg) == 3


@pytest.mark.settings({"job": {"max_attempts": 2}})
def test_an_ffmpeg_missing_a_library_pauses_the_host_instead_of_dead_lettering_the_queue(
        env, tmp_path):
    # Given a supervisor whose ffmpeg cannot load a shared library (a half-done upgrade):
    # every run ends at once with the loader's exit 127
    ffmpeg = _script(str(tmp_path / "bin" / "ffmpeg"),
                     f"echo {shlex.quote(NO_LIBRARY)} >&2\nexit 127\n")
    env.settings["job"]["ffmpeg"] = ffmpeg
    port = _listen(env)
    proc = env.start()
    env.wait_workers(proc, 2)
    # When jobs come
    env.push(*_jobs(env, "nolib", 6))
    # Then the host pauses, saying why, and no job is dead-lettered
    _paused(env, port, "ffmpeg_broken")
    assert "error while loading shared libraries" in env.log_text()
    # When ffmpeg works again, the host resumes by itself and every job ends done
    _script(ffmpeg, f'exec {shlex.quote(FFMPEG)} "$@"\n')
    _resumed(env, port, 6)
    assert "host fault cleared (ffmpeg_broken)" in env.log_text()
    assert env.stop(proc) == 0


# --- 2. a full or read-only allowed_outputs root, a mount below output_base ----------------


@needs_root
def test_the_probe_checks_the_folder_the_failed_output_goes_to(tmpfs, tmp_path):
    # Given output_base with room, and an allowed_outputs root on a small full file system
    work = str(tmp_path / "work")
    out = str(tmp_path / "out")
    shared = tmpfs("shared", 32 * MiB)
    cfg = config_mod.load(None, env={}, overrides={
        "job.work_dir": work, "storage.output_base": f"file://{out}",
        "storage.allowed_outputs": f"file://{shared}"})
    filler = fill(shared, 0)
    output = f"file://{shared}/clips/a.mp4"
    # Then a probe for a job that stores there finds the host at fault
    reason, error = probe(cfg, work, output=output) or ("", "")
    assert reason == "disk_full" and f"output folder {shared}" in error, error
    # and so does every later probe, without a job (a paused worker's), until it has room
    assert (probe(cfg, work) or ("",))[0] == "disk_full"
    os.unlink(filler)
    assert probe(cfg, work) is None
    assert probe(cfg, work) is None and health._suspects == []
    # And a probe for an output of output_base does not look there
    fill(shared, 0)
    assert probe(cfg, work, output=f"file://{out}/b.mp4") is None


@needs_root
def test_a_read_only_mount_below_output_base_is_the_jobs_fault_a_full_one_the_hosts(
        tmpfs, tmp_path):
    # Given output_base with a separate file system mounted below it, gone read-only
    out = tmpfs("out", 32 * MiB)
    below = os.path.join(out, "archive")
    os.makedirs(below)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", below], check=True)
    try:
        os.makedirs(os.path.join(below, "2024"))
        remount(below, "ro")
        cfg = make_config(str(tmp_path / "work"), out)
        # Then a job storing there does not find the host at fault: a read-only mount below
        # the root may be an operator's snapshot, and a producer naming it must not pause
        # every host in turn (the job is retried and dead-lettered as usual)
        assert probe(cfg, str(tmp_path / "work"), output=f"file://{below}/2024/x/a.mp4") is None
        # but once it is writable and full, the host is at fault, naming the deepest folder
        remount(below, "rw")
        fill(below, 0)
        assert probe(cfg, str(tmp_path / "work"), output=f"file://{below}/2024/x/a.mp4")[:1] == (
            "disk_full",)
        # while output_base itself is fine
        health._suspects.clear()
        assert probe(cfg, str(tmp_path / "work"), output=f"file://{out}/a.mp4") is None
    finally:
        subprocess.run(["umount", "-l", below], check=False)


@needs_root
@pytest.mark.settings({"job": {"max_attempts": 2}})
def test_a_full_allowed_outputs_root_pauses_the_host_until_it_has_room(tmpfs, env):
    # Given a supervisor that may also write to a small shared file system
    shared = tmpfs("shared", 32 * MiB)
    env.settings["storage"]["allowed_outputs"] = f"file://{shared}"
    port = _listen(env)
    proc = env.start()
    env.wait_workers(proc, 2)
    # When that file system is full, and jobs store there
    filler = fill(shared, 0)
    jobs = [{**job, "output": f"file://{shared}/{job['id']}.mp4"}
            for job in _jobs(env, "shared", 4)]
    env.push(*jobs)
    # Then the host pauses; no job is dead-lettered
    _paused(env, port, "disk_full")
    assert shared in env.log_text()
    # When space is freed, the host resumes and every job is stored there
    os.unlink(filler)
    _resumed(env, port, 4)
    assert sorted(os.listdir(shared)) == sorted(f"{job['id']}.mp4" for job in jobs)
    assert env.stop(proc) == 0


# --- 3. a source that announces no length -----------------------------------------------------


class _Chunked(http.server.BaseHTTPRequestHandler):
    """GET /zeros/BYTES: that many zero bytes; GET /file/NAME: a file of ``directory``; both
    in chunked transfer coding, so without a Content-Length."""

    protocol_version = "HTTP/1.1"
    directory = ""
    sent: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802
        kind, _, arg = self.path.strip("/").partition("/")
        if kind == "zeros":
            pieces: Iterator[bytes] = (b"\0" * 65536 for _ in range(int(arg) // 65536))
        else:
            with open(os.path.join(self.directory, arg), "rb") as fh:
                data = fh.read()
            pieces = (data[i:i + 65536] for i in range(0, len(data), 65536))
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for piece in pieces:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.sent[self.path] = self.sent.get(self.path, 0) + len(piece)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def chunked(media_dir) -> Iterator[tuple[str, dict[str, int]]]:
    """(base url, bytes sent per path) of a loopback server of chunked answers."""
    handler = type("Handler", (_Chunked,), {"directory": media_dir, "sent": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.sent
    finally:
        server.shutdown()
        server.server_close()


class _LowestFree:
    """The least free space seen on a file system while it runs (sampled every ms)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.lowest = shutil.disk_usage(folder).free
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.lowest = min(self.lowest, shutil.disk_usage(self.folder).free)

    def __enter__(self) -> _LowestFree:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@needs_root
def test_a_source_without_a_length_stops_before_the_disk_is_full(tmpfs, chunked, tmp_path):
    base, sent = chunked
    # Given a work_dir with 18 MiB free: 2 MiB beyond the floor every job keeps
    work = tmpfs("work", 48 * MiB)
    cfg = make_config(work, str(tmp_path / "out"), range_requests="false",
                      cache_max_bytes="0")
    filler = fill(work, MIN_FREE_BYTES + 2 * MiB)
    # When a small source comes without a length, it is clipped as before
    _run(cfg, f"{base}/file/ten.mp4")
    assert os.listdir(tmp_path / "out") == ["room.mp4"]
    # When a 120 MB source comes without a length, on a disk with 32 MiB free
    os.unlink(filler)
    fill(work, 32 * MiB)
    with _LowestFree(work) as seen, pytest.raises(Transient) as failed:
        _run(cfg, f"{base}/zeros/{120 * 1000 * 1000}")
    # Then it stops before the disk drops below the floor, as the job's failure (counted),
    # not as the host's full disk
    assert failed.value.reason == "source_too_large_for_disk", failed.value
    assert failed.value.reason not in health.HOST_REASONS
    assert "without announcing its length" in failed.value.error
    assert seen.lowest >= MIN_FREE_BYTES, seen.lowest
    assert sent[f"/zeros/{120 * 1000 * 1000}"] < 40 * MiB
    assert os.listdir(os.path.join(work, "w-test")) == []


@needs_root
@pytest.mark.settings({"supervisor": {"workers": 1},
                       "job": {"max_attempts": 2, "range_requests": "false"}})
def test_a_huge_source_without_a_length_is_dead_lettered_and_the_host_runs_on(
        tmpfs, env, chunked):
    base, _ = chunked
    # Given a supervisor whose work_dir is a 48 MiB file system
    work = tmpfs("work", 48 * MiB)
    env.work = env.settings["job"]["work_dir"] = work
    port = _listen(env)
    proc = env.start()
    env.wait_workers(proc, 1)
    # When a 120 MB source without a length comes among good jobs
    huge = {"id": "huge", "url": f"{base}/zeros/{120 * 1000 * 1000}", "duration": 1}
    good = _jobs(env, "good", 3)
    env.push(good[0], huge, *good[1:])
    env.wait_finished(4, timeout=60)
    # Then it alone is dead-lettered, for its size, after its attempts; the host never paused
    assert [(d["id"], d["reason"], d["attempts"]) for d in env.dead_letters()] == [
        ("huge", "source_too_large_for_disk", 2)]
    assert sorted(e["id"] for e in env.done_events()) == sorted(j["id"] for j in good)
    assert "host fault" not in env.log_text()
    assert port and env.stop(proc) == 0


@needs_root
def test_an_announced_length_is_taken_on_disk_before_the_bytes_arrive(tmpfs, tmp_path):
    # Given a 20 MiB source whose server announces its length and sends it slowly
    folder = tmp_path / "sources"
    folder.mkdir()
    with open(folder / "twenty.bin", "wb") as fh:
        fh.truncate(20 * MiB)
    server = TestServer(str(folder))
    work = tmpfs("work", 48 * MiB)
    dest = os.path.join(work, "source")
    before = shutil.disk_usage(work).free
    stop = threading.Event()
    limits = FetchLimits(connect_timeout=5, stall_timeout=5, max_bytes=1 << 30,
                         allow_private=True)
    ctx = JobContext(time.monotonic() + 30, limits, Waker(), should_abort=stop.is_set)
    failed: list[BaseException] = []

    def fetch() -> None:
        try:
            source.fetch_http(server.url("twenty.bin", slow=10), dest, ctx)
        except BaseException as exc:  # noqa: BLE001 - told to the test
            failed.append(exc)

    thread = threading.Thread(target=fetch)
    thread.start()
    try:
        # When its download has begun
        wait_for(lambda: os.path.exists(dest) and os.path.getsize(dest) > 0, 10,
                 what="the download to begin")
        # Then the whole length is taken from the free space already (another worker's
        # room check, or a download of unannounced length, cannot count it as free)
        free, size = shutil.disk_usage(work).free, os.path.getsize(dest)
        assert size < 10 * MiB and free <= before - 20 * MiB, (before, free, size)
    finally:
        stop.set()
        thread.join(10)
        server.close()
    assert [type(exc).__name__ for exc in failed] == ["Aborted"]


# --- 4. a killed worker's part file -------------------------------------------------------------


_STORE = """
import sys
from worker.storage import LocalStore
worker_dir, root, source, target = sys.argv[1:]
LocalStore(worker_dir, [root]).put(source, "file://" + target, {})
"""


def _killed_mid_copy(work: str, root: str, target: str) -> tuple[str, str]:
    """Store a clip the way a worker does, across file systems, and SIGKILL the process
    while it copies (its source is a FIFO nobody writes): (its folder, the part file)."""
    worker_dir = os.path.join(work, "w-1")
    os.makedirs(worker_dir)
    source = os.path.join(worker_dir, "clip.mp4")
    os.mkfifo(source)
    proc = subprocess.Popen([sys.executable, "-c", _STORE, worker_dir, root, source, target],
                            cwd=ROOT)
    try:
        pattern = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.*.part")
        (part,) = wait_for(lambda: glob.glob(pattern), 10, what="the part file")
        assert os.path.exists(os.path.join(worker_dir, PENDING_FILE))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    return worker_dir, part


@needs_root
def test_a_killed_workers_part_file_is_removed(tmpfs, tmp_path):
    # Given a worker killed while it copied a clip into an output root on another disk
    out = tmpfs("out", 32 * MiB)
    worker_dir, part = _killed_mid_copy(str(tmp_path / "work"), out,
                                        os.path.join(out, "day", "clip.mp4"))
    # When the supervisor cleans up after it, the part file goes with the worker's folder
    clean_worker_dir(worker_dir)
    assert not os.path.exists(part) and not os.path.exists(worker_dir)
    assert os.listdir(os.path.join(out, "day")) == []


@needs_root
def test_a_link_planted_in_the_output_tree_cannot_steer_the_part_file_cleanup(
        tmpfs, tmp_path, caplog):
    # Given a worker killed while it copied a clip into out/day/, and a user who can write
    # to out/ who then swaps day/ for a link to a folder of theirs holding a file of the
    # part file's name (or anyone's file, reached through it)
    out = tmpfs("out", 32 * MiB)
    worker_dir, part = _killed_mid_copy(str(tmp_path / "work"), out,
                                        os.path.join(out, "day", "clip.mp4"))
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / os.path.basename(part)).write_text("not the supervisor's to delete")
    os.rename(os.path.join(out, "day"), os.path.join(out, "day.old"))
    os.symlink(victim, os.path.join(out, "day"))
    # When the supervisor (root) cleans up after the worker
    clean_worker_dir(worker_dir)
    # Then the file the link leads to is untouched: the link is not followed
    assert (victim / os.path.basename(part)).read_text() == "not the supervisor's to delete"
    assert not os.path.exists(worker_dir)
    assert "left in place" in caplog.text
