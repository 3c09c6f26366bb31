"""Hostile and broken inputs, limits and recycling: what a job may cost, and what it may reach.

Every network target here is on loopback: the address guard is proven end to end only with
127.0.0.1, localhost, [::1] and odd spellings of them, which it refuses before connecting.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time

import psutil
import pytest

from supervisor.sample import make_video
from tests.conftest import RedisServer, free_port, wait_for
from worker import source
from worker.errors import Permanent


@pytest.fixture(scope="module")
def big_video(media_dir) -> str:
    path = os.path.join(media_dir, "big.mp4")
    if not os.path.exists(path):
        make_video(path, 10, size="640x360", bitrate="2M")
    assert os.path.getsize(path) > 1_200_000
    return "big.mp4"


def _no_ffmpeg_left(env) -> bool:
    return not [p for p in psutil.process_iter(["name", "cmdline"])
                if p.info["name"] in ("ffmpeg", "ffprobe")
                and env.work in " ".join(p.info["cmdline"] or [])]


@pytest.mark.settings({"job": {"timeout": 3, "stall_timeout": 1, "max_attempts": 2,
                               "retry_backoff": 0.2}})
def test_stalling_and_trickling_sources_are_cut_off_and_others_flow(env, big_video):
    port = env.http.port
    env.push({"id": "stalls", "url": f"http://127.0.0.1:{port}/stall/1000000/{big_video}"},
             {"id": "trickles", "url": f"http://127.0.0.1:{port}/trickle/ten.mp4"},
             *[{"id": f"fine{i}", "url": env.url("ten.mp4"), "duration": 1} for i in range(4)])
    proc = env.start()
    env.wait_finished(6, timeout=60)
    letters = {d["id"]: d for d in env.dead_letters()}
    assert (letters["stalls"]["reason"], letters["stalls"]["attempts"]) == ("stalled", 2)
    assert (letters["trickles"]["reason"], letters["trickles"]["attempts"]) == ("timeout", 2)
    assert sorted(e["id"] for e in env.done_events()) == [f"fine{i}" for i in range(4)]
    assert env.stop(proc) == 0
    assert _no_ffmpeg_left(env) and env.work_leftovers() == []


@pytest.mark.settings({"job": {"allow_private_networks": "false",
                               "allowed_schemes": "http,https"}})
def test_the_address_guard_refuses_loopback_in_every_spelling(env):
    port = env.http.port
    private = {f"p{i}": f"http://{host}:{port}/ten.mp4" for i, host in enumerate(
        ["127.0.0.1", "localhost", "[::1]", "127.1", "0x7f000001", "2130706433",
         "017700000001", "[::ffff:127.0.0.1]"])}
    refused_schemes = {"file": "file:///etc/passwd", "concat": "concat:/etc/passwd|/etc/hosts",
                       "subfile": "subfile,,start,0,end,100,,:/etc/passwd",
                       "data": "data:text/plain,hello"}
    env.push(*[{"id": k, "url": v} for k, v in private.items()],
             *[{"id": k, "url": v} for k, v in refused_schemes.items()])
    proc = env.start()
    env.wait_finished(len(private) + len(refused_schemes), timeout=30)
    reasons = {d["id"]: d["reason"] for d in env.dead_letters()}
    assert {k: reasons[k] for k in private} == {k: "private_address" for k in private}
    assert {reasons[k] for k in refused_schemes} <= {"scheme_not_allowed", "bad_url"}
    assert reasons["file"] == reasons["concat"] == "scheme_not_allowed"
    assert env.stop(proc) == 0


def test_crafted_playlists_cannot_make_ffmpeg_read_local_files(env, media_dir):
    # An HLS playlist and an ffconcat list that point at local files: the demuxer whitelist
    # refuses them before anything is opened.
    secret = os.path.join(media_dir, "ten.mp4")
    with open(os.path.join(media_dir, "evil.m3u8"), "w") as fh:
        fh.write(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{secret}\n#EXT-X-ENDLIST\n")
    with open(os.path.join(media_dir, "evil.ffconcat"), "w") as fh:
        fh.write(f"ffconcat version 1.0\nfile {secret}\n")
    env.push({"id": "hls", "url": env.url("evil.m3u8")},
             {"id": "concat", "url": env.url("evil.ffconcat")})
    proc = env.start()
    env.wait_finished(2, timeout=30)
    letters = {d["id"]: d for d in env.dead_letters()}
    assert letters["hls"]["reason"] == letters["concat"]["reason"] == "not_video"
    assert env.done_events() == []
    assert env.stop(proc) == 0


def test_a_redirect_is_checked_at_every_hop(http, monkeypatch):
    # "public.test" stands for a public host (mapped to loopback here, never resolved by DNS);
    # it redirects to "private.test", which the guard must refuse before connecting.
    real_resolve = source.resolve

    def fake_resolve(host: str, port: int, allow_private: bool) -> str:
        if host == "public.test":
            return "127.0.0.1"
        return real_resolve("127.0.0.1", port, allow_private)

    monkeypatch.setattr(source, "resolve", fake_resolve)
    limits = source.FetchLimits(connect_timeout=2, stall_timeout=2, max_bytes=1 << 30,
                                allow_private=False)
    target = f"http://private.test:{http.port}/ten.mp4"
    with pytest.raises(Permanent) as info:
        source.open_url(f"http://public.test:{http.port}/redirect?to={target}", limits)
    assert info.value.reason == "private_address"
    # and the same chain with the guard lifted is followed to the file
    allowed = source.FetchLimits(2, 2, 1 << 30, allow_private=True)
    conn, resp, final = source.open_url(f"http://public.test:{http.port}/redirect?to={target}",
                                        allowed)
    assert resp.status == 200 and final == target
    conn.close()


class _Echo(http.server.BaseHTTPRequestHandler):
    """/hop/<host>: 302 to the same path on ``host``; /end: 200. Records each request's
    host and Authorization header."""

    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append((self.headers["Host"].split(":")[0], self.headers["Authorization"]))
        port = self.server.server_address[1]
        if self.path.startswith("/hop/"):
            self.send_response(302)
            self.send_header("Location", f"http://{self.path[5:]}:{port}/end")
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_credentials_go_to_the_origin_that_asked_for_them_only(monkeypatch):
    # Given a source whose requests carry a bearer token (a Cloud Storage media link), on a
    # server that redirects, and names that all resolve to 127.0.0.1
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setattr(source, "resolve", lambda host, port, allow: "127.0.0.1")
    limits = source.FetchLimits(2, 2, 1 << 30, allow_private=True)
    port = server.server_address[1]
    try:
        for target in ("same.test", "other.test"):
            _Echo.seen = []
            conn, resp, _ = source.open_url(f"http://same.test:{port}/hop/{target}", limits,
                                            headers={"Authorization": "Bearer secret"})
            source.discard(conn, resp)
            # Then a redirect within the origin keeps the token; one to another host drops it
            want = None if target == "other.test" else "Bearer secret"
            assert _Echo.seen == [("same.test", "Bearer secret"), (target, want)]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("spelling", ["127.1", "0x7f000001", "2130706433", "localhost",
                                      "::1", "::ffff:169.254.169.254", "169.254.169.254"])
def test_odd_spellings_resolve_to_refused_addresses_without_connecting(spelling):
    with pytest.raises(Permanent) as info:
        source.resolve(spelling, 80, allow_private=False)
    assert info.value.reason == "private_address"


@pytest.mark.settings({"supervisor": {"workers": 1, "max_jobs_per_worker": 2}})
def test_max_jobs_per_worker_recycles_the_worker(env):
    env.push(*[{"id": f"r{i}", "url": env.url("ten.mp4"), "duration": 1} for i in range(6)])
    proc = env.start()
    env.wait_finished(6, timeout=60)
    by_worker: dict[str, int] = {}
    for event in env.done_events():
        by_worker[event["worker"]] = by_worker.get(event["worker"], 0) + 1
    assert sorted(by_worker.values()) == [2, 2, 2]
    # The third worker logs its recycling just after its second ack
    wait_for(lambda: env.log_text().count("recycling after 2 jobs") == 3, 10,
             what="three recycling log lines")
    assert env.stop(proc) == 0


# An idle worker's RSS is ~32 MiB: above this limit (so it recycles after every job), yet its
# private memory with ffmpeg's stays far below the hard limit of twice as much.
@pytest.mark.settings({"supervisor": {"workers": 1, "max_worker_memory_mb": 25}})
def test_a_worker_above_its_memory_limit_is_replaced_after_its_job(env):
    env.push(*[{"id": f"m{i}", "url": env.url("ten.mp4"), "duration": 1} for i in range(3)])
    proc = env.start()
    env.wait_finished(3, timeout=60)
    workers = {e["worker"] for e in env.done_events()}
    assert len(workers) == 3  # every job finished, then its worker was replaced
    assert "recycling: RSS" in env.log_text()
    assert "far above max_worker_memory_mb" not in env.log_text()  # soft, not hard
    assert env.stop(proc) == 0


def test_redis_with_a_password(env):
    env.r.config_set("requirepass", "s3cret pass")
    env.r = env.redis.client(password="s3cret pass")
    env.settings["redis"]["url"] = \
        f"redis://:s3cret%20pass@127.0.0.1:{env.redis.port}/0"
    env.push({"id": "auth", "url": env.url("ten.mp4"), "duration": 1})
    proc = env.start()
    env.wait_finished(1, timeout=30)
    assert [e["id"] for e in env.done_events()] == ["auth"]
    assert "s3cret" not in env.log_text()
    assert env.stop(proc) == 0


def test_redis_over_tls(env, tmp_path):
    # A CA and a server certificate for 127.0.0.1, made here; redis-server speaks TLS only.
    ca_key, ca, key, csr, crt = (str(tmp_path / n) for n in
                                 ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt"))
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for cmd in (
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
         "-out", ca, "-days", "1", "-subj", "/CN=test-ca"],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", crt, "-days", "1", "-extfile", str(ext)],
    ):
        subprocess.run(cmd, check=True, capture_output=True)
    port = free_port()
    tls = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port),
                            "--bind", "127.0.0.1", "--tls-cert-file", crt, "--tls-key-file",
                            key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no",
                            "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        server = RedisServer(str(tmp_path))
        server.url, server.port = url, port
        wait_for(server._ping, 10, what="TLS redis-server")
        env.r = server.client()
        env.settings["redis"]["url"] = url
        env.push({"id": "tls", "url": env.url("ten.mp4"), "duration": 1})
        proc = env.start()
        env.wait_finished(1, timeout=30)
        assert [e["id"] for e in env.done_events()] == ["tls"]
        assert env.stop(proc) == 0
    finally:
        tls.terminate()
        tls.wait(10)


@pytest.mark.settings({"supervisor": {"max_worker_memory_mb": 100},
                       "job": {"max_attempts": 2, "retry_backoff": 0.1}})
def test_a_job_far_above_the_memory_limit_is_killed_and_ends_as_poison(env, media_dir):
    # A 1080p re-encode takes ffmpeg ~256 MiB of private memory, far above 2 x 100 MiB.
    path = os.path.join(media_dir, "hd.mp4")
    if not os.path.exists(path):
        make_video(path, 6, size="1920x1080", bitrate="6M")
    env.push({"id": "hog", "url": env.url("hd.mp4"), "mode": "encode"},
             {"id": "small", "url": env.url("ten.mp4"), "duration": 1})
    proc = env.start()
    env.wait_finished(2, timeout=90)
    (letter,) = env.dead_letters()
    assert (letter["id"], letter["reason"], letter["attempts"]) == ("hog", "poison", 2)
    assert [e["id"] for e in env.done_events()] == ["small"]
    assert env.log_text().count("far above max_worker_memory_mb 100: killing it") == 2
    assert env.stop(proc) == 0
    assert _no_ffmpeg_left(env)


@pytest.mark.settings({"job": {"timeout": 2, "stall_timeout": 5, "max_attempts": 1}})
def test_a_server_dribbling_its_headers_is_cut_off_at_the_job_timeout(env):
    started = time.monotonic()
    env.push({"id": "dribble", "url": f"http://127.0.0.1:{env.http.port}/dribble"})
    proc = env.start()
    env.wait_finished(1, timeout=30)
    (letter,) = env.dead_letters()
    assert (letter["id"], letter["reason"]) == ("dribble", "timeout")
    assert time.monotonic() - started < 10
    assert env.stop(proc) == 0
