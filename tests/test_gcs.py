"""Google Cloud Storage: clips stored in, and sources read from, a real emulator.

Each test starts its own gcp-storage-emulator on a loopback port (tests.conftest.GcsEmulator)
and, for the end-to-end ones, runs the real supervisor with STORAGE_EMULATOR_HOST pointing
at it. Outages are real too: the emulator is frozen (SIGSTOP), killed and restarted, and
Redis is paused with CLIENT PAUSE.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import google.auth.exceptions
import pytest
import requests
from google.api_core import exceptions as api_exceptions

import supervisor
from supervisor.sample import make_video
from tests.conftest import ROOT, GcsEmulator, ffprobe_duration, start_with_env, wait_for
from tests.httpd import PACED_SNDBUF
from tests.tcpproxy import TcpProxy
from worker import config as config_mod
from worker import gcs
from worker.errors import Permanent, Transient

BUCKET = "clips"
GS_BASE = f"gs://{BUCKET}/out"
FORMAT_NAMES = {"mp4": "mov,mp4,m4a,3gp,3g2,mj2", "mov": "mov,mp4,m4a,3gp,3g2,mj2",
                "mkv": "matroska,webm", "ts": "mpegts"}


@pytest.fixture
def emulator(tmp_path):
    server = GcsEmulator(str(tmp_path / "gcs")).start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def noisy_video(media_dir) -> str:
    """A 4 s 640x360 video with per-frame noise: ~13 MB, so a whole-video clip is > 8 MiB."""
    path = os.path.join(media_dir, "noisy.mp4")
    if not os.path.exists(path):
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y",
                        "-f", "lavfi", "-i", "testsrc=size=640x360:rate=25:duration=4",
                        "-f", "lavfi", "-i", "sine=frequency=440:duration=4",
                        "-vf", "noise=alls=60:allf=t", "-c:v", "libx264", "-preset",
                        "ultrafast", "-g", "25", "-pix_fmt", "yuv420p", "-c:a", "aac",
                        "-shortest", "-movflags", "+faststart", path], check=True)
    assert os.path.getsize(path) > 9 * 1024 * 1024
    return path


def _gcs_settings(**storage) -> dict:
    return {"storage": {"output_base": GS_BASE, **storage}}


def _run(env, emulator, *extra):
    return start_with_env(env, {"STORAGE_EMULATOR_HOST": emulator.url}, *extra)


def _probe(path: str) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_format",
                          path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["format"]


def _download(emulator, name: str, dest: str) -> str:
    emulator.client().bucket(BUCKET).blob(name).download_to_filename(dest, checksum="crc32c")
    return dest


def _job_field(env, job_id: str, name: str) -> str | None:
    value = env.r.hget(env.keys.job(job_id), name)
    return value.decode() if value is not None else None


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.settings(_gcs_settings(cache_control="public, max-age=60"))
def test_mixed_jobs_are_stored_in_gcs_as_valid_clips_with_type_and_metadata(env, emulator):
    # Given eight jobs: a bare URL and JSON, copy and encode, four containers
    jobs = {}  # id -> (message, mode, format, start, length)
    bare = env.url("ten.mp4") + "?bare=1"
    jobs[hashlib.sha1(bare.encode()).hexdigest()] = (bare, "copy", "mp4", 0, 10.0)
    for i, (mode, fmt) in enumerate([("copy", "mp4"), ("encode", "mp4"), ("copy", "mkv"),
                                     ("encode", "mkv"), ("copy", "mov"), ("encode", "ts"),
                                     ("copy", "ts")]):
        start, length = 1 + i, 2.0 + i % 2
        message = json.dumps({"id": f"g{i}", "url": env.url("twenty.mp4"), "start": start,
                              "duration": length, "mode": mode, "format": fmt})
        jobs[f"g{i}"] = (message, mode, fmt, start, length)
    env.push(*[job[0] for job in jobs.values()])

    # When the supervisor runs them against the emulator
    proc = _run(env, emulator)
    env.wait_finished(len(jobs), timeout=90)
    assert env.stop(proc) == 0

    # Then each is done once and stored as exactly one object under the gs:// base
    assert env.dead_letters() == []
    assert sorted(e["id"] for e in env.done_events()) == sorted(jobs)
    blobs = {b.name: b for b in emulator.client().list_blobs(BUCKET)}
    assert sorted(blobs) == sorted(f"out/{job_id}.{job[2]}" for job_id, job in jobs.items())
    for job_id, (message, mode, fmt, start, length) in jobs.items():
        blob = blobs[f"out/{job_id}.{fmt}"]
        source = message if message == bare else json.loads(message)["url"]
        end = start + length
        assert blob.content_type == gcs.CONTENT_TYPES[fmt]
        assert blob.cache_control == "public, max-age=60"
        assert blob.metadata == {"job_id": job_id, "source": source, "start": f"{start:g}",
                                 "end": f"{end:g}",
                                 "clip_supervisor_version": supervisor.__version__}
        # and its bytes are a valid clip of the right container and duration
        local = _download(emulator, blob.name, os.path.join(env.tmp, f"{job_id}.{fmt}"))
        assert _probe(local)["format_name"] == FORMAT_NAMES[fmt]
        tolerance = 0.15 if mode == "encode" else 1.0  # copy: within one GOP (1 s)
        assert abs(ffprobe_duration(local) - length) <= tolerance, (job_id, mode, fmt)
        assert _job_field(env, job_id, "output") == f"{GS_BASE}/{job_id}.{fmt}"
    log = env.log_text()
    for job_id in jobs:
        assert sum(f"job {job_id} done" in line for line in log.splitlines()) == 1
    assert env.work_leftovers() == []


@pytest.mark.settings(_gcs_settings(upload_chunk_size="256KiB"))
def test_clip_over_8_mib_is_uploaded_in_resumable_chunks(env, emulator, noisy_video):
    # Given a whole-video copy job whose clip is larger than 8 MiB, and 256 KiB chunks
    env.push({"id": "big", "url": env.url("noisy.mp4"), "mode": "copy"})

    proc = _run(env, emulator)
    env.wait_finished(1, timeout=60)
    assert env.stop(proc) == 0

    # Then the object is whole (crc32c checked on download), a valid 4 s clip, and the
    # worker went through the resumable path in 256 KiB chunks
    assert env.dead_letters() == []
    blob = emulator.client().bucket(BUCKET).get_blob("out/big.mp4")
    assert blob.size > 8 * 1024 * 1024
    local = _download(emulator, "out/big.mp4", os.path.join(env.tmp, "big.mp4"))
    assert abs(ffprobe_duration(local) - 4.0) <= 0.1
    assert f"stored {GS_BASE}/big.mp4: {blob.size} bytes, resumable upload in chunks of " \
           "262144" in env.log_text()


@pytest.mark.settings({**_gcs_settings(gcs_connect_timeout=1, gcs_timeout=10,
                                       gcs_retry_deadline=3),
                       "supervisor": {"workers": 1},
                       "job": {"retry_backoff": 1, "max_attempts": 5}})
def test_storage_outage_during_upload_fails_in_time_then_the_retry_succeeds(env, emulator):
    # Given an emulator that stops answering (frozen), and three jobs
    emulator.freeze()
    env.push(*[{"id": f"o{i}", "url": env.url("ten.mp4"), "start": 1, "duration": 2}
               for i in range(3)])
    proc = _run(env, emulator)
    (worker,) = env.wait_workers(proc, 1)

    # When the first job's upload is in flight and the emulator dies
    wait_for(lambda: _job_field(env, "o0", "stage") == "store", 30, what="o0 to upload")
    wait_for(lambda: emulator.worker_connected(worker), 20, what="the upload connection")
    upload_started = time.monotonic()
    emulator.stop()

    # Then that attempt fails as transient within the retry deadline, not the client's 120 s
    wait_for(lambda: _job_field(env, "o0", "reason") == "storage_unavailable", 10,
             interval=0.05, what="o0's upload to fail")
    failed_after = time.monotonic() - upload_started
    assert failed_after <= 3 + 1.5, failed_after
    assert env.dead_letters() == []

    # And when the emulator is back, every job is done once, each object stored once
    emulator.start()
    env.wait_finished(3, timeout=60)
    assert env.stop(proc) == 0
    assert env.dead_letters() == []
    assert sorted(e["id"] for e in env.done_events()) == ["o0", "o1", "o2"]
    assert sorted(b.name for b in emulator.client().list_blobs(BUCKET)) == \
        ["out/o0.mp4", "out/o1.mp4", "out/o2.mp4"]
    local = _download(emulator, "out/o0.mp4", os.path.join(env.tmp, "o0.mp4"))
    assert abs(ffprobe_duration(local) - 2.0) <= 1.0
    assert "job o0 failed (storage_unavailable), attempt 1" in env.log_text()
    print(f"upload-start-to-transient-failure: {failed_after:.2f} s")


@pytest.mark.settings({**_gcs_settings(gcs_timeout=20), "supervisor": {"workers": 1}})
def test_worker_killed_after_upload_before_ack_is_acked_without_clipping_again(env, emulator):
    # Given a job whose upload is held up (emulator frozen) until Redis stops taking writes
    emulator.freeze()
    (raw,) = env.push({"id": "stored-once", "url": env.url("ten.mp4"), "start": 2,
                       "duration": 3})
    proc = _run(env, emulator)
    (worker,) = env.wait_workers(proc, 1)
    wait_for(lambda: _job_field(env, "stored-once", "stage") == "store", 30,
             what="the upload to start")
    wait_for(lambda: emulator.worker_connected(worker), 20, what="the upload connection")
    env.r.execute_command("CLIENT", "PAUSE", 30000, "WRITE")  # the ack will wait
    try:
        # When the upload completes and the worker is SIGKILLed before it could ack
        emulator.thaw()
        bucket = emulator.client().bucket(BUCKET)
        blob = wait_for(lambda: bucket.get_blob("out/stored-once.mp4"), 20,
                        what="the object to appear")
        assert env.holder_of(raw) == worker  # stored, not acked
        os.kill(worker, signal.SIGKILL)
    finally:
        env.r.execute_command("CLIENT", "UNPAUSE")

    # Then the recovered job is acked as already stored: not clipped or uploaded again
    env.wait_finished(1, timeout=30)
    assert env.stop(proc) == 0
    (event,) = env.done_events()
    assert event["id"] == "stored-once" and event["reused"] is True
    assert f":{worker}:" not in event["worker"]
    assert "job stored-once: output gs://clips/out/stored-once.mp4 already stored by an " \
           "earlier attempt" in env.log_text()
    after = bucket.get_blob("out/stored-once.mp4")
    assert after.generation == blob.generation and after.md5_hash == blob.md5_hash
    assert env.dead_letters() == []


@pytest.mark.settings({"job": {"max_source_bytes": "5MiB"},
                       "storage": {"allowed_outputs": "gs://no-such-bucket"}})
def test_gs_source_clips_like_http_and_storage_errors_are_dead_lettered(env, emulator,
                                                                         media_dir,
                                                                         noisy_video):
    # Given a source video in a bucket, and the same video over HTTP
    sources = emulator.client().create_bucket("sources")
    sources.blob("videos/ten.mp4").upload_from_filename(os.path.join(media_dir, "ten.mp4"))
    sources.blob("videos/noisy.mp4").upload_from_filename(noisy_video)
    same = {"start": 2, "duration": 4, "mode": "copy"}
    env.push({"id": "from-gs", "url": "gs://sources/videos/ten.mp4", **same},
             {"id": "from-http", "url": env.url("ten.mp4"), **same},
             {"id": "gs-missing", "url": "gs://sources/videos/nope.mp4"},
             {"id": "gs-no-bucket", "url": "gs://no-such-source-bucket/ten.mp4"},
             {"id": "gs-too-big", "url": "gs://sources/videos/noisy.mp4"},
             {"id": "to-no-bucket", "url": env.url("ten.mp4"), "duration": 1,
              "output": "gs://no-such-bucket/x.mp4"})

    proc = _run(env, emulator)
    env.wait_finished(6, timeout=60)
    assert env.stop(proc) == 0

    # Then the gs:// source gives the very clip the http:// one gives
    assert sorted(e["id"] for e in env.done_events()) == ["from-gs", "from-http"]
    with open(os.path.join(env.out, "from-gs.mp4"), "rb") as a, \
            open(os.path.join(env.out, "from-http.mp4"), "rb") as b:
        assert a.read() == b.read()
    assert abs(ffprobe_duration(os.path.join(env.out, "from-gs.mp4")) - 4) <= 1.0
    # and the failures are dead-lettered at once with a clear reason
    reasons = {d["id"]: (d["reason"], d["attempts"]) for d in env.dead_letters()}
    assert reasons == {"gs-missing": ("not_found", 1), "gs-no-bucket": ("not_found", 1),
                       "gs-too-big": ("source_too_large", 1),
                       "to-no-bucket": ("bucket_not_found", 1)}
    assert env.r.zcard(env.keys.delayed) == 0
    assert "Traceback" not in env.log_text()


@pytest.mark.settings({"supervisor": {"workers": 1}})
def test_a_gs_source_follows_the_cache_rules_and_is_read_again_only_when_it_changes(
        env, emulator, media_dir):
    # Given a source in a bucket, clipped five times
    sources = emulator.client().create_bucket("sources")
    sources.blob("v.mp4").upload_from_filename(os.path.join(media_dir, "ten.mp4"))
    size = os.path.getsize(os.path.join(media_dir, "ten.mp4"))
    url = "gs://sources/v.mp4"
    env.push(*({"id": f"g{i}", "url": url, "start": i, "duration": 3} for i in range(5)))
    proc = _run(env, emulator)
    env.wait_finished(5, timeout=60)
    assert env.stop(proc) == 0
    events = [e for _, e in sorted((e["id"], e) for e in env.done_events())]
    reads = [e["source_read"] for e in events]
    # Then, as an http source: read in place (ranged reads of the object) until that cost
    # its size, then downloaded once and kept; the other clips were cut from the kept copy,
    # after the one metadata request of each job said it is the same object (size and
    # generation)
    n = reads.index("download") if "download" in reads else len(reads)
    assert n >= 1 and reads == ["ranges"] * n + ["download"] + ["cache"] * (4 - n), reads
    assert n < 4, reads
    rented = sum(e["source_bytes"] for e in events[:n])
    assert rented - events[n - 1]["source_bytes"] < size <= rented, (reads, rented, size)
    assert [e["source_bytes"] for e in events[n:]] == [size] + [0] * (4 - n)

    # When the object is replaced (a new generation), the next clip reads the new one
    sources.blob("v.mp4").upload_from_filename(os.path.join(media_dir, "twenty.mp4"))
    env.r.delete(env.keys.done)
    env.push({"id": "after", "url": url, "start": 15, "duration": 3})
    proc = _run(env, emulator)
    env.wait_finished(1, timeout=60)
    assert env.stop(proc) == 0
    (event,) = env.done_events()
    assert event["source_read"] == "ranges", env.dead_letters()
    assert abs(ffprobe_duration(os.path.join(env.out, "after.mp4")) - 3) <= 1.0
    assert "changed since it was kept" in env.log_text()


class _CountingProxy(TcpProxy):
    """A TCP proxy in front of the emulator that counts the bytes the emulator sends, at
    most ``rate`` bytes/s per connection, like a remote link (on loopback, an unpaced
    server fills every buffer on the way before ffmpeg can hang up to seek), as the paced
    answers of tests.httpd do for http sources."""

    def __init__(self, port: int, rate: float) -> None:
        super().__init__("127.0.0.1", port)
        self.rate = rate
        self.served = 0
        self._count = threading.Lock()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        if src.getpeername()[1] == self.target[1]:  # from the emulator to the worker
            # a small send buffer, as tests.httpd's paced answers have: what the worker
            # has not read yet waits at the source, not in loopback's large buffers
            dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PACED_SNDBUF)
            src = _Paced(src, self)  # type: ignore[assignment]
        super()._pump(src, dst)


class _Paced:
    def __init__(self, sock: socket.socket, proxy: _CountingProxy) -> None:
        self.sock = sock
        self.proxy = proxy
        self.started = time.monotonic()
        self.received = 0

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(min(size, 16384))
        self.received += len(data)
        with self.proxy._count:
            self.proxy.served += len(data)
        ahead = self.received / self.proxy.rate - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)
        return data

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


@pytest.fixture(scope="module")
def long_video(media_dir) -> str:
    """60 s of 640x360 at about 1.2 Mbit/s: 8.7 MB, a keyframe every second."""
    path = os.path.join(media_dir, "long-60.mp4")
    if not os.path.exists(path):
        make_video(path, 60, size="640x360", bitrate="1500k")
    return path


class _ConcurrentEmulator(GcsEmulator):
    """The emulator answering each connection in a thread of its own, as Cloud Storage
    does. Its stock server answers one connection at a time: an answer that waits for its
    reader (the relay reads only as fast as ffmpeg does) would hold up ffmpeg's seek, which
    opens its next connection before it closes the one it leaves."""

    def start(self) -> GcsEmulator:
        os.makedirs(self.data_dir, exist_ok=True)
        code = ("import http.server, runpy, sys; "
                "http.server.HTTPServer = http.server.ThreadingHTTPServer; "
                "sys.argv[0] = 'gcp_storage_emulator'; "
                "runpy.run_module('gcp_storage_emulator', run_name='__main__')")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "start", "--host", "127.0.0.1", "--port",
             str(self.port), "--quiet", "--in-memory"], cwd=self.data_dir,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, 20, interval=0.05, what="the storage emulator to answer")
        return self


@pytest.fixture
def concurrent_emulator(tmp_path):
    server = _ConcurrentEmulator(str(tmp_path / "gcs-threaded"), in_memory=True).start()
    yield server
    server.stop()


@pytest.mark.settings({"supervisor": {"workers": 1}, "job": {"cache_max_bytes": "0"}})
def test_a_clip_from_the_middle_of_a_long_gs_source_reads_little_more_than_its_share(
        env, concurrent_emulator, long_video):
    # Given a long source in a bucket, the same file over HTTP (the test server serves
    # media_dir), and an emulator reached through a proxy that counts what it serves
    # (100 Mbit/s per connection)
    emulator = concurrent_emulator
    sources = emulator.client().create_bucket("sources")
    sources.blob("talks/long.mp4").upload_from_filename(long_video)
    size = os.path.getsize(long_video)
    share = size * 10 / 60
    clip = {"start": 25, "duration": 10, "mode": "copy"}
    env.push({"id": "from-gs", "url": "gs://sources/talks/long.mp4", **clip},
             {"id": "from-http", "url": env.url("long-60.mp4"), **clip})

    # When 10 s from its middle are clipped
    with _CountingProxy(emulator.port, rate=12.5e6) as proxy:
        proc = start_with_env(env, {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{proxy.port}"})
        env.wait_finished(2, timeout=60)
        assert env.stop(proc) == 0
        served = proxy.served

    # Then the object was read in ranges: the emulator served at most twice the clip's
    # share (the metadata, the index, the clip's bytes, what was in flight), not all of it
    events = {e["id"]: e for e in env.done_events()}
    assert sorted(events) == ["from-gs", "from-http"], env.dead_letters()
    event = events["from-gs"]
    print(f"gs: {served} bytes served, {served / share:.2f} x the share ({size} in all), "
          f"{event['source_bytes']} read by the relay")
    assert event["source_read"] == "ranges"
    assert event["source_bytes"] <= served <= 2 * share, (served, share, size)
    # and the clip is right: the very clip the same file over HTTP gives, 10 s long
    with open(os.path.join(env.out, "from-gs.mp4"), "rb") as a, \
            open(os.path.join(env.out, "from-http.mp4"), "rb") as b:
        assert a.read() == b.read()
    assert abs(ffprobe_duration(os.path.join(env.out, "from-gs.mp4")) - 10) <= 1.0


@pytest.mark.settings({**_gcs_settings(), "supervisor": {"workers": 1},
                       "job": {"timeout": 8, "retry_backoff": 0.5, "max_attempts": 5}})
def test_an_upload_to_a_frozen_emulator_fails_within_the_jobs_timeout(env, emulator):
    # Given an emulator that accepts connections but never answers (frozen), and Cloud
    # Storage's own bounds far beyond the job's 8 s (60 s per request, 120 s of retries)
    emulator.freeze()
    env.push({"id": "up", "url": env.url("ten.mp4"), "start": 1, "duration": 2})
    pushed = time.monotonic()
    proc = _run(env, emulator)

    # When the job's upload waits for an answer, then the job's timeout ends it: a
    # transient ``timeout``, within the job's 8 s (and the supervisor's start)
    wait_for(lambda: _job_field(env, "up", "reason") == "timeout", 20, interval=0.05,
             what="the upload to time out")
    failed_after = time.monotonic() - pushed
    assert failed_after <= 8 + 3, failed_after
    assert "did not finish within the job's timeout" in (_job_field(env, "up", "error") or "")
    assert env.dead_letters() == []

    # And once the emulator answers again, the retry stores the clip
    emulator.thaw()
    env.wait_finished(1, timeout=60)
    assert env.stop(proc) == 0
    assert [e["id"] for e in env.done_events()] == ["up"]
    assert [b.name for b in emulator.client().list_blobs(BUCKET)] == ["out/up.mp4"]
    print(f"push-to-timeout: {failed_after:.2f} s")


# --- the store on its own, against the emulator -------------------------------------------


@pytest.fixture
def volatile(tmp_path, monkeypatch):
    """An in-memory emulator (a restart loses open sessions), set as this process's endpoint."""
    server = GcsEmulator(str(tmp_path / "gcs-mem"), in_memory=True).start()
    server.create_bucket(BUCKET)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    yield server
    server.stop()


def _storage(**values) -> config_mod.StorageConfig:
    env = {f"CLIP_SUPERVISOR_STORAGE_{k.upper()}": str(v) for k, v in values.items()}
    return config_mod.load(env=env).storage


class _Spy:
    """Records (method, uploadType, body size) of each request the client's session makes."""

    def __init__(self, request, after=None) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self._request = request
        self._after = after
        self.done = False

    def __call__(self, method, url, data=None, **kwargs):
        response = self._request(method, url, data=data, **kwargs)
        kind = "resumable" if "uploadType=resumable" in url else \
            "multipart" if "uploadType=multipart" in url else "other"
        self.calls.append((method, kind, len(data) if isinstance(data, bytes) else 0))
        if self._after is not None:
            self._after(self)
        return response


def test_upload_mode_follows_the_threshold_and_a_lost_session_restarts(volatile, tmp_path,
                                                                         monkeypatch):
    cfg = _storage(upload_chunk_size="256KiB", resumable_threshold="512KiB")
    store = gcs.GcsStore(cfg)
    client = gcs.client_for(cfg)
    small, large = tmp_path / "clip.mp4", tmp_path / "clip.mkv"
    small.write_bytes(os.urandom(300_000))
    large.write_bytes(os.urandom(3 * 262144 + 1000))

    request = client._http.request

    # A clip under the threshold goes up in one multipart request
    spy = _Spy(request)
    monkeypatch.setattr(client._http, "request", spy)
    store.put(str(small), f"gs://{BUCKET}/s.mp4", {"job_id": "s"})
    assert spy.calls == [("POST", "multipart", spy.calls[0][2])]

    # One over it opens a resumable session and sends 256 KiB chunks
    spy = _Spy(request)
    monkeypatch.setattr(client._http, "request", spy)
    store.put(str(large), f"gs://{BUCKET}/l.mkv", {"job_id": "l"})
    assert [c[:2] for c in spy.calls] == [("POST", "resumable")] + [("PUT", "resumable")] * 4
    assert [c[2] for c in spy.calls[1:]] == [262144, 262144, 262144, 1000]

    # When the server restarts mid-upload (the session is gone: 404), the upload starts over
    def restart_after_second_chunk(s: _Spy) -> None:
        if sum(1 for c in s.calls if c[0] == "PUT") == 2 and not s.done:
            s.done = True
            volatile.stop()
            volatile.start()
            volatile.create_bucket(BUCKET)

    spy = _Spy(request, after=restart_after_second_chunk)
    monkeypatch.setattr(client._http, "request", spy)
    store.put(str(large), f"gs://{BUCKET}/r.mkv", {"job_id": "r"})
    initiations = [c for c in spy.calls if c[0] == "POST"]
    assert len(initiations) == 2
    blob = volatile.client().bucket(BUCKET).get_blob("r.mkv")
    assert blob.size == large.stat().st_size and blob.content_type == "video/x-matroska"
    assert blob.download_as_bytes(checksum="crc32c") == large.read_bytes()
    assert blob.metadata["job_id"] == "r"


def test_exists_means_stored_by_this_job(volatile, tmp_path):
    cfg = _storage()
    store = gcs.GcsStore(cfg)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 1000)
    url = f"gs://{BUCKET}/e.mp4"
    assert store.exists(url, "job-a") is False
    store.put(str(clip), url, {"job_id": "job-a"})
    assert store.exists(url, "job-a") is True
    assert store.exists(url, "job-b") is False  # another job's object: not ours to reuse
    assert store.exists("gs://no-such-bucket/e.mp4", "job-a") is False


def test_a_refused_replacement_of_this_jobs_own_object_counts_as_stored(volatile, tmp_path,
                                                                         monkeypatch):
    # Given an object this job already stored, and an account that may create but not
    # replace objects (the emulator has no IAM: its 403 answer is simulated)
    from google.cloud.storage import Blob

    store = gcs.GcsStore(_storage())
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 1000)
    url = f"gs://{BUCKET}/own.mp4"
    store.put(str(clip), url, {"job_id": "mine"})

    def refused(self, *args, **kwargs):
        raise api_exceptions.Forbidden("storage.objects.delete denied")

    monkeypatch.setattr(Blob, "upload_from_file", refused)
    # When the same job uploads again, it is done; another job's upload is dead-lettered
    store.put(str(clip), url, {"job_id": "mine"})
    with pytest.raises(Permanent) as caught:
        store.put(str(clip), url, {"job_id": "other"})
    assert caught.value.reason == "storage_forbidden"
    assert "roles/storage.objectUser" in caught.value.error


def test_the_master_never_loads_the_storage_client():
    # The client is made lazily in a worker; importing the master's modules must not even
    # load the library (its import costs ~0.5 s, and nothing of it belongs before fork).
    code = ("import sys, supervisor.cli, supervisor.master, worker.runner; "
            "print(any(m.startswith('google') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_dead_endpoint_is_a_transient_failure_within_the_deadline(tmp_path, monkeypatch):
    # Given an endpoint where nothing listens
    from tests.conftest import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    store = gcs.GcsStore(_storage(gcs_connect_timeout=1, gcs_timeout=2, gcs_retry_deadline=2))
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 1000)
    started = time.monotonic()
    with pytest.raises(Transient) as caught:
        store.put(str(clip), f"gs://{BUCKET}/x.mp4", {"job_id": "x"})
    assert time.monotonic() - started < 2 + 1.5
    assert caught.value.reason == "storage_unavailable"
    assert "cannot connect" in caught.value.error


# --- pure logic ----------------------------------------------------------------------------


def _response(status: int) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    return response


@pytest.mark.parametrize(("exc", "reading", "reason", "permanent"), [
    (api_exceptions.NotFound("no bucket"), False, "bucket_not_found", True),
    (api_exceptions.NotFound("no object"), True, "not_found", True),
    (api_exceptions.Forbidden("denied"), False, "storage_forbidden", True),
    (api_exceptions.Unauthorized("who"), True, "storage_forbidden", True),
    (api_exceptions.BadRequest("bad"), False, "storage_error", True),
    (api_exceptions.TooManyRequests("slow down"), False, "storage_unavailable", False),
    (api_exceptions.ServiceUnavailable("down"), False, "storage_unavailable", False),
    (api_exceptions.InternalServerError("oops"), True, "storage_unavailable", False),
    (api_exceptions.RetryError("deadline", requests.ConnectionError("refused")), False,
     "storage_unavailable", False),
    (requests.ConnectionError("refused"), False, "storage_unavailable", False),
    (requests.Timeout("slow"), True, "storage_unavailable", False),
    (gcs.InvalidResponse(_response(503), "unavailable"), False, "storage_unavailable", False),
    (gcs.InvalidResponse(_response(403), "forbidden"), False, "storage_forbidden", True),
    (gcs.DataCorruption(_response(200), "crc32c mismatch"), False, "checksum_mismatch", False),
    (google.auth.exceptions.RefreshError("invalid_grant"), False, "storage_credentials",
     True),
])
def test_storage_errors_are_classified(exc, reading, reason, permanent):
    failed = gcs.failure(exc, "gs://b/k", reading=reading)
    assert (failed.reason, failed.permanent) == (reason, permanent)
    assert failed.error.startswith("gs://b/k")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("upload_chunk_size", "1000000", "multiple of 256KiB"),
    ("upload_chunk_size", "0", "size"),
    ("resumable_threshold", "16MiB", "at most 8MiB"),
    ("credentials_file", "/nonexistent/key.json", "no such file"),
    ("credentials_file", "relative.json", "absolute path"),
    ("gcs_retry_deadline", "0", "positive"),
])
def test_bad_storage_settings_fail_at_start_naming_the_key(key, value, message):
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load(env={f"CLIP_SUPERVISOR_STORAGE_{key.upper()}": value})
    assert f"[storage] {key}" in str(caught.value) and message in str(caught.value)


def test_storage_settings_parse():
    cfg = _storage(upload_chunk_size="512KiB", resumable_threshold="1MiB",
                   cache_control="no-store", gcs_retry_deadline="7.5")
    assert (cfg.upload_chunk_size, cfg.resumable_threshold) == (524288, 1048576)
    assert (cfg.cache_control, cfg.gcs_retry_deadline) == ("no-store", 7.5)


def test_a_broken_key_file_dead_letters_with_a_clear_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    key = tmp_path / "key.json"
    key.write_text('{"type": "service_account"}')
    with pytest.raises(Permanent) as caught:
        gcs.client_for(_storage(credentials_file=str(key)))
    assert caught.value.reason == "storage_credentials"
    assert str(key) in caught.value.error


def test_content_types_and_urls():
    assert [gcs.content_type_for(f"/w/job/clip.{f}") for f in ("mp4", "mkv", "webm", "mov",
                                                               "ts")] == \
        ["video/mp4", "video/x-matroska", "video/webm", "video/quicktime", "video/mp2t"]
    assert gcs.split_url("gs://bucket/a/b.mp4") == ("bucket", "a/b.mp4")
    with pytest.raises(Permanent):
        gcs.split_url("gs://bucket")
    assert gcs.version() == supervisor.__version__
