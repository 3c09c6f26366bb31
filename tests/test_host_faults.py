"""A fault of the host, not of the job: a full or read-only work_dir or output folder, ffmpeg
gone. Such a host stops taking jobs while the fault lasts and resumes by itself; no job is
dead-lettered for it. Free space is measured against the job's real source size.

The faults are real: small tmpfs mounts (run as root) that the tests fill with a file or
remount read-only, and an ffmpeg that disappears from under a running supervisor.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import Env, GcsEmulator, free_port, wait_for
from tests.httpd import TestServer
from worker import config as config_mod
from worker import source
from worker.context import JobContext
from worker.errors import Transient
from worker.health import MIN_FREE_BYTES, probe
from worker.job import parse
from worker.pipeline import Pipeline
from worker.wake import Waker

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts tmpfs: needs root")


# --- real file systems --------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[[str, int], str]]:
    """mount(name, size): a fresh tmpfs of ``size`` bytes at tmp_path/name; all unmounted
    at the end, whatever happened."""
    mounted: list[str] = []

    def mount(name: str, size: int) -> str:
        folder = str(tmp_path / name)
        os.makedirs(folder, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        folder], check=True)
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        # lazily: a process a failed test left behind may still hold a file open there
        subprocess.run(["umount", "-l", folder], check=False)


def fill(folder: str, leave: int) -> str:
    """Take all the free space of ``folder``'s file system but ``leave`` bytes, with one
    file (removing it frees the space at once)."""
    filler = os.path.join(folder, "filler")
    size = shutil.disk_usage(folder).free - leave
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return filler


def remount(folder: str, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", folder], check=True)


def make_config(work: str, out: str, **job: str) -> config_mod.Config:
    overrides = {"job.work_dir": work, "storage.output_base": f"file://{out}",
                 "job.allow_private_networks": "true"}
    overrides.update({f"job.{key}": value for key, value in job.items()})
    return config_mod.load(None, env={}, overrides=overrides)


# --- probe(): the host's own check ----------------------------------------------------------


def test_a_healthy_host_passes_the_probe_and_it_leaves_nothing_behind(tmpfs):
    # Given a work folder and an output folder with room, and ffmpeg on PATH
    work = tmpfs("work", 64 * MiB)
    out = os.path.join(tmpfs("out", 64 * MiB), "clips")  # not there yet: created
    cfg = make_config(work, out)
    worker_dir = os.path.join(work, "w-1")
    os.makedirs(worker_dir)
    # When the host is probed
    started = time.monotonic()
    found = probe(cfg, worker_dir)
    # Then it is fine, quickly, and nothing is left but the output folder it may create
    assert found is None
    assert time.monotonic() - started < 1.0
    assert os.listdir(worker_dir) == [] and os.listdir(out) == []


def test_a_nearly_full_or_full_work_dir_is_disk_full(tmpfs):
    work = tmpfs("work", 32 * MiB)
    out = tmpfs("out", 32 * MiB)
    cfg = make_config(work, out)
    # Given a work folder with less than MIN_FREE_BYTES free (yet room for a small file)
    filler = fill(work, 4 * MiB)
    reason, error = probe(cfg, work) or ("", "")
    assert reason == "disk_full" and "bytes free" in error and work in error
    # Given one with no room at all: the probe's own write fails
    os.unlink(filler)
    fill(work, 0)
    reason, error = probe(cfg, work) or ("", "")
    assert reason == "disk_full" and "No space left on device" in error
    assert [n for n in os.listdir(work) if n.startswith(".probe")] == []


def test_a_read_only_work_dir_or_output_folder_is_not_writable(tmpfs):
    work = tmpfs("work", 32 * MiB)
    out = tmpfs("out", 32 * MiB)
    cfg = make_config(work, out)
    # chmod does not stop root: a read-only mount does
    remount(work, "ro")
    assert probe(cfg, work) == ("work_dir_not_writable",
                                f"work_dir {work}: Read-only file system")
    remount(work, "rw")
    remount(out, "ro")
    assert probe(cfg, work) == ("output_not_writable",
                                f"output folder {out}: Read-only file system")
    remount(out, "rw")
    fill(out, 1 * MiB)
    assert (probe(cfg, work) or ("",))[0] == "disk_full"


def test_a_missing_ffmpeg_is_a_host_fault(tmpfs, tmp_path):
    work = tmpfs("work", 32 * MiB)
    ffmpeg = str(tmp_path / "bin" / "ffmpeg")
    cfg = make_config(work, str(tmp_path / "out"), ffmpeg=ffmpeg)
    assert probe(cfg, work) == ("ffmpeg_missing", f"ffmpeg {ffmpeg} does not exist")
    os.makedirs(os.path.dirname(ffmpeg))
    with open(ffmpeg, "w") as fh:
        fh.write("#!/bin/sh\n")
    assert probe(cfg, work) == ("ffmpeg_missing", f"ffmpeg {ffmpeg} is not executable")
    os.chmod(ffmpeg, 0o755)
    assert probe(cfg, work) is None
    cfg = make_config(work, str(tmp_path / "out"), ffmpeg="no-such-ffmpeg-h4")
    assert (probe(cfg, work) or ("",))[0] == "ffmpeg_missing"


# --- the pipeline: free space against the source's real size --------------------------------


@pytest.fixture
def sources(tmp_path) -> Iterator[TestServer]:
    """A loopback server of our own, for sources of chosen sizes (not videos: the room
    check happens before a byte of them is written, let alone clipped)."""
    folder = tmp_path / "sources"
    folder.mkdir()
    for name, size in (("six.bin", 6 * MiB), ("forty.bin", 40 * MiB)):
        with open(folder / name, "wb") as fh:
            fh.truncate(size)
    server = TestServer(str(folder))
    yield server
    server.close()


def _run(cfg: config_mod.Config, url: str) -> None:
    raw = f'{{"id": "room", "url": "{url}", "duration": 1}}'.encode()
    worker_dir = os.path.join(cfg.job.work_dir, "w-test")
    os.makedirs(worker_dir, exist_ok=True)
    pipeline = Pipeline(cfg, worker_dir, Waker(), lambda: False, lambda stage, at_once: None,
                        lambda percent, speed: None)
    pipeline.run(parse(raw, cfg), time.monotonic() + 30)


def test_a_small_source_runs_on_a_nearly_full_disk_a_large_one_waits(tmpfs, http, sources,
                                                                     tmp_path):
    # Given a work_dir with 20 MiB free (the issue: every job was refused for want of
    # max_source_bytes, 2 GiB, even a 0.3 MB source), and downloads rather than ranges
    work = tmpfs("work", 48 * MiB)
    cfg = make_config(work, str(tmp_path / "out"), range_requests="false",
                      cache_max_bytes="0")
    fill(work, 20 * MiB)
    # When a job's source is 0.3 MB, it is clipped and stored
    _run(cfg, http.url("ten.mp4"))
    assert os.listdir(tmp_path / "out") == ["room.mp4"]
    # When a source is 6 MiB: 6 + MIN_FREE_BYTES do not fit now: disk_full, before a byte
    # of it is written (filling the disk would fail the other workers' jobs too)
    with pytest.raises(Transient) as failed:
        _run(cfg, sources.url("six.bin"))
    assert failed.value.reason == "disk_full"
    assert f"{6 * MiB + MIN_FREE_BYTES} needed" in failed.value.error
    assert sources.sent.get("/six.bin", 0) < 1 * MiB
    # When a source is larger than the whole file system: no waiting helps, the job's fault
    with pytest.raises(Transient) as failed:
        _run(cfg, sources.url("forty.bin"))
    assert failed.value.reason == "source_too_large_for_disk"
    assert os.listdir(os.path.join(work, "w-test")) == []  # the job's folder went


def test_a_gs_source_is_measured_by_its_object_size_before_the_download(
        tmpfs, tmp_path, monkeypatch):
    # Given a 6 MiB object in a bucket, and a work_dir with 20 MiB free
    emulator = GcsEmulator(str(tmp_path / "gcs"), in_memory=True).start()
    try:
        emulator.create_bucket("sources")
        emulator.client().bucket("sources").blob("six.bin").upload_from_string(
            b"\0" * (6 * MiB))
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        work = tmpfs("work", 48 * MiB)
        cfg = make_config(work, str(tmp_path / "out"), range_requests="false",
                          cache_max_bytes="0")
        fill(work, 20 * MiB)
        # When a job downloads it: disk_full from the object's size, before a byte is
        # written
        with pytest.raises(Transient) as failed:
            _run(cfg, "gs://sources/six.bin")
        assert failed.value.reason == "disk_full"
        assert f"{6 * MiB + MIN_FREE_BYTES} needed" in failed.value.error
    finally:
        emulator.stop()


def test_a_disk_that_fills_during_a_download_is_disk_full_not_a_failed_fetch(tmpfs, sources):
    # Given a download whose length was not checked against the free space (as when a
    # server sends none), into a file system with 2 MiB free
    work = tmpfs("work", 16 * MiB)
    fill(work, 2 * MiB)
    limits = source.FetchLimits(connect_timeout=5, stall_timeout=5, max_bytes=1 << 30,
                                allow_private=True)
    # When the disk fills up midway, it is the host's failure, named so
    with pytest.raises(Transient) as failed:
        source.fetch_http(sources.url("six.bin"), os.path.join(work, "source"),
                          JobContext(time.monotonic() + 30, limits, Waker()))
    assert failed.value.reason == "disk_full"
    assert "No space left on device" in failed.value.error


def test_an_unwritable_job_folder_is_the_hosts_failure(tmpfs, http, tmp_path):
    work = tmpfs("work", 32 * MiB)
    cfg = make_config(work, str(tmp_path / "out"))
    os.makedirs(os.path.join(work, "w-test"))
    remount(work, "ro")
    with pytest.raises(Transient) as failed:
        _run(cfg, http.url("ten.mp4"))
    assert failed.value.reason == "work_dir_not_writable"


# --- the real supervisor: a faulty host steps back and comes back by itself ---------------


def _healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


@contextlib.contextmanager
def _browser() -> Iterator[Any]:
    """A page in Debian's headless Chromium (as tests/test_dashboard.py drives it)."""
    from playwright.sync_api import sync_playwright  # the test extra (setup.cfg)

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update"])
        try:
            page = chromium.new_page()
            page.set_default_timeout(15000)
            yield page
        finally:
            chromium.close()


def _listen(env: Env) -> int:
    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    return port


def _jobs(env: Env, prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "url": env.url("ten.mp4"), "duration": 1}
            for i in range(n)]


def _paused(env: Env, port: int, reason: str, timeout: float = 30) -> None:
    """Wait until the host says it is paused for ``reason`` (log, /healthz), with not one
    job dead-lettered meanwhile."""
    def paused() -> bool:
        dead = env.dead_letters()
        assert dead == [], f"dead-lettered instead of paused: {dead[0]['reason']}"
        return f"host fault ({reason})" in env.log_text()

    wait_for(paused, timeout, what=f"a worker to pause for {reason}")
    status, text = wait_for(lambda: (lambda h: h if h[0] == 503 else None)(_healthz(port)),
                            10, what="/healthz to say 503")
    assert text.startswith(f"paused: {reason} ("), text


def _resumed(env: Env, port: int, n: int) -> None:
    env.wait_finished(n, timeout=60)
    assert env.dead_letters() == []
    assert len({e["id"] for e in env.done_events()}) == n
    wait_for(lambda: _healthz(port)[0] == 200, 15, what="/healthz to say 200 again")


@pytest.mark.settings({"job": {"max_attempts": 2}})
def test_a_full_work_dir_pauses_the_host_until_space_is_freed(tmpfs, env):
    # Given a supervisor whose work_dir is a small file system with room for small jobs
    work = tmpfs("work", 48 * MiB)
    env.work = env.settings["job"]["work_dir"] = work
    port = _listen(env)
    proc = env.start()
    env.wait_workers(proc, 2)
    env.push(*_jobs(env, "before", 2))
    env.wait_finished(2, timeout=30)
    assert _healthz(port) == (200, "ok\n")
    # When the disk fills up (4 MiB left: below what a host needs to take jobs)
    filler = fill(work, 4 * MiB)
    env.push(*_jobs(env, "full", 6))
    # Then the host steps back: no job is dead-lettered, /healthz fails, the log says why
    _paused(env, port, "disk_full")
    assert env.dead_letters() == []
    assert env.r.llen(env.keys.queue) + env.r.llen(env.keys.retry) + \
        env.r.zcard(env.keys.delayed) >= 4  # at most one in each worker's hands
    assert "fetching paused" in env.log_text()
    # And the dashboard names the host, the reason and since when, until the fault clears
    with _browser() as page:
        page.goto(f"http://127.0.0.1:{port}/")
        banner = page.locator("#faults .fault")
        banner.wait_for()
        text = banner.first.text_content() or ""
        host = env.r.hvals(env.keys.workers)[0]
        assert f"{json.loads(host)['host']} paused since" in text and "disk_full" in text
        assert work in text  # the error names the folder
        states = page.locator("#workers tbody td:nth-child(5)")
        wait_for(lambda: "paused" in states.all_text_contents(), 10, what="a paused worker")
        # When the space is freed, the host resumes by itself and every job ends done
        os.unlink(filler)
        _resumed(env, port, 8)
        page.locator("#faults").wait_for(state="hidden")
    assert "host fault cleared (disk_full)" in env.log_text()
    assert env.stop(proc) == 0


@pytest.mark.settings({"job": {"max_attempts": 2}})
def test_a_read_only_output_folder_pauses_the_host_until_it_is_writable(tmpfs, env):
    out = tmpfs("out", 32 * MiB)
    env.out = out
    env.settings["storage"]["output_base"] = f"file://{out}"
    port = _listen(env)
    proc = env.start()
    env.wait_workers(proc, 2)
    # When the output folder turns read-only (a disk error remounts ext4 so)
    remount(out, "ro")
    env.push(*_jobs(env, "ro", 6))
    _paused(env, port, "output_not_writable")
    assert env.dead_letters() == []
    remount(out, "rw")
    _resumed(env, port, 6)
    assert sorted(os.listdir(out)) == sorted(f"ro{i}.mp4" for i in range(6))
    assert env.stop(proc) == 0


@pytest.mark.settings({"job": {"max_attempts": 2}})
def test_ffmpeg_gone_pauses_the_host_until_it_is_back(env, tmp_path):
    # Given a supervisor whose [job] ffmpeg is a path (start refuses a missing one)
    real = shutil.which("ffmpeg")
    assert real is not None
    ffmpeg = str(tmp_path / "bin" / "ffmpeg")
    os.makedirs(os.path.dirname(ffmpeg))
    os.symlink(real, ffmpeg)
    env.settings["job"]["ffmpeg"] = ffmpeg
    port = _listen(env)
    proc = env.start()
    env.wait_workers(proc, 2)
    # When ffmpeg disappears (an upgrade in progress, a broken mount)
    os.rename(ffmpeg, ffmpeg + ".away")
    try:
        env.push(*_jobs(env, "noff", 4))
        _paused(env, port, "ffmpeg_missing")
        assert env.dead_letters() == []
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.rename(ffmpeg + ".away", ffmpeg)
    # Then, ffmpeg back, every job ends done
    _resumed(env, port, 4)
    assert env.stop(proc) == 0
