"""Remote sources read in place: ffmpeg seeks through the worker's range relay.

A server that answers Range requests is never downloaded whole: ffmpeg reads the index and
the clip's bytes through worker.relay, which applies the address guard, the stall timeout,
the job's deadline and max_source_bytes to every request. A server that ignores Range is
downloaded as before. What fails upstream is reported as the source's failure, not as a
broken video.
"""

from __future__ import annotations

import base64
import http.client
import os
import subprocess
import threading
import time
from urllib.parse import urlsplit

import pytest

from tests.conftest import ffprobe_duration, wait_for
from worker import media, relay, source
from worker.context import JobContext

LONG_SECONDS = 30
CLIP_START, CLIP_SECONDS = 15, 4
PACE = 40e6  # bytes/s per answer: a fast remote link, so that bytes in flight stay bounded


@pytest.fixture(scope="session")
def long_videos(media_dir) -> dict[str, str]:
    """A 30 s source at 4 Mbit/s (~15 MB), with its index at the front and at the end.

    Noise keeps the bit rate up (a bare test pattern compresses to a few hundred kbit/s), so
    the clip's share is megabytes and the fixed costs (the index, bytes in flight) are
    measured against a realistic size."""
    front = os.path.join(media_dir, "long.mp4")
    end = os.path.join(media_dir, "long-moov-at-end.mp4")
    if not os.path.exists(end):
        subprocess.run([
            "ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
            f"testsrc=size=320x240:rate=25:duration={LONG_SECONDS},noise=alls=30:allf=t+u",
            "-f", "lavfi", "-i", f"sine=frequency=440:duration={LONG_SECONDS}",
            "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p",
            "-b:v", "4M", "-maxrate", "4M", "-bufsize", "4M", "-c:a", "aac", "-shortest",
            "-movflags", "+faststart", front], check=True)
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-i", front, "-c", "copy",
                        end], check=True)
    return {"front": "long.mp4", "end": "long-moov-at-end.mp4"}


def _run(env, job: dict, timeout: float = 60) -> None:
    """Run one job through a real supervisor, to its end."""
    env.push(job)
    proc = env.start()
    env.wait_finished(1, timeout)
    assert env.stop(proc) == 0


@pytest.mark.parametrize("index", ["front", "end"])
def test_a_clip_from_a_long_source_reads_little_more_than_its_share(env, long_videos, index):
    # Given a long source on a server that answers Range requests, index at either end
    name = long_videos[index]
    size = os.path.getsize(os.path.join(env.http.directory, name))
    share = size * CLIP_SECONDS / LONG_SECONDS
    key = f"long-{index}"
    _run(env, {"id": key, "url": f"http://127.0.0.1:{env.http.port}/paced/{PACE:g}/{key}/{name}",
               "start": CLIP_START, "duration": CLIP_SECONDS, "mode": "copy"})

    # Then the clip is right, and it was read with ranges: the server sent at most twice
    # the clip's share of the file (the index, the clip's bytes, what was in flight)
    (event,) = env.done_events()
    assert event["source_read"] == "ranges"
    sent = env.http.sent[key]
    print(f"{key}: {sent} bytes sent, {sent / share:.2f} x the share ({size} total)")
    assert sent <= 2 * share, f"{sent} bytes sent for a share of {share:.0f} ({size} total)"
    assert event["source_bytes"] <= sent
    # no request was spent on asking whether the server seeks: ffmpeg's first read did
    # (its answer, 206, said so), and then it sought into the middle
    ranges = env.http.ranges[key]
    assert ranges[0] == "bytes=0-" and len(ranges) <= 4, ranges
    assert any(r and int(r[6:].split("-")[0]) > size // 4 for r in ranges[1:]), ranges
    clip = os.path.join(env.out, f"{key}.mp4")
    assert CLIP_SECONDS - 0.1 <= ffprobe_duration(clip) <= CLIP_SECONDS + 1.1  # 1 s GOP
    assert f"job {key} done" in env.log_text() and "(ranges, " in env.log_text()


@pytest.mark.parametrize("mode", ["smart", "encode"])
def test_an_exact_clip_from_a_long_source_reads_little_more_than_its_share(env, long_videos,
                                                                            mode):
    # Given a long source whose index is at its end, on a server that answers Range requests
    name = long_videos["end"]
    size = os.path.getsize(os.path.join(env.http.directory, name))
    share = size * CLIP_SECONDS / LONG_SECONDS
    key = f"long-{mode}"
    # When a clip that starts between keyframes is cut frame-exact (smart: ffprobe reads the
    # keyframes around the start and the end, then ffmpeg reads the source three times
    # over, for the head, the copied body and the tail; encode: ffprobe reads the frames
    # around both ends, then ffmpeg decodes from 1 s before the start)
    _run(env, {"id": key, "url": f"http://127.0.0.1:{env.http.port}/paced/{PACE:g}/{key}/{name}",
               "start": CLIP_START + 0.5, "duration": CLIP_SECONDS, "mode": mode})
    # Then it was read in ranges, far from the whole file: a bounded multiple of the clip's
    # share (measured: encode 2.6x, smart 4.7x for this 4 s clip; the index, read by each
    # process, a second of preroll per input, ffprobe's packets, what was in flight; the
    # fixed part is a few seconds of the source, whatever its length)
    (event,) = env.done_events()
    assert event["source_read"] == "ranges" and event["cut"] == mode
    sent = env.http.sent[key]
    print(f"{key}: {sent} bytes sent, {sent / share:.2f} x the share ({size} total)")
    bound = {"encode": 3.5, "smart": 6}[mode] * share
    assert sent <= min(bound, size * 0.8), f"{sent} bytes sent for a share of {share:.0f}"
    assert abs(ffprobe_duration(os.path.join(env.out, f"{key}.mp4")) - CLIP_SECONDS) < 0.1


def test_smart_mode_downloads_a_source_whose_server_ignores_ranges_and_cuts_it_there(
        env, media_dir):
    # Given a server that answers every request with the whole file: ffprobe's first read
    # through the relay learns it
    _run(env, {"id": "whole", "url": f"http://127.0.0.1:{env.http.port}/norange/ten.mp4",
               "start": 2.3, "duration": 3, "mode": "smart"})
    # Then the source was downloaded once and the clip cut from the download, smart
    (event,) = env.done_events()
    assert event["source_read"] == "download" and event["cut"] == "smart", event
    assert event["source_bytes"] == os.path.getsize(os.path.join(media_dir, "ten.mp4"))
    assert abs(ffprobe_duration(os.path.join(env.out, "whole.mp4")) - 3) < 0.1


def test_a_server_that_ignores_ranges_is_downloaded_whole(env, media_dir):
    _run(env, {"id": "whole", "url": f"http://127.0.0.1:{env.http.port}/norange/ten.mp4",
               "start": 2, "duration": 3})
    (event,) = env.done_events()
    assert event["source_read"] == "download"
    assert event["source_bytes"] == os.path.getsize(os.path.join(media_dir, "ten.mp4"))
    assert 2.9 <= ffprobe_duration(os.path.join(env.out, "whole.mp4")) <= 4.1


@pytest.mark.settings({"job": {"range_requests": "false"}})
def test_range_requests_can_be_turned_off(env, media_dir):
    key = "off"
    _run(env, {"id": key, "url": f"http://127.0.0.1:{env.http.port}/paced/1e9/{key}/ten.mp4",
               "duration": 2})
    (event,) = env.done_events()
    assert event["source_read"] == "download"
    assert env.http.ranges[key] == [None]  # one plain GET, no probe
    # (the server counts a write once it returns, which can be after the client has read it)
    size = os.path.getsize(os.path.join(media_dir, "ten.mp4"))
    wait_for(lambda: env.http.sent.get(key) == size, timeout=5, what=f"{size} bytes sent")


@pytest.mark.settings({"job": {"max_attempts": 1, "stall_timeout": 2}})
@pytest.mark.parametrize(("path", "reason", "words"), [
    ("vanish", "not_found", "HTTP 404"),
    ("cut", "fetch_failed", "ended after"),
    # the relay's stall timeout or ffmpeg's own watch on its progress, whichever ends first
    ("stallrange", "stalled", "no "),
])
def test_a_source_failing_mid_read_is_the_sources_failure(env, path, reason, words):
    # Given a source that answers the probe and then fails the ranges ffmpeg asks for
    url = f"http://127.0.0.1:{env.http.port}/{path}/{path}-k/twenty.mp4"
    _run(env, {"id": path, "url": url, "start": 12, "duration": 2}, 30)
    # Then the dead letter names what the source did, and the source's URL, not the relay's
    (letter,) = env.dead_letters()
    assert (letter["id"], letter["reason"]) == (path, reason), letter
    assert words in letter["error"] and "/source" not in letter["error"], letter["error"]
    assert not os.path.exists(os.path.join(env.out, f"{path}.mp4"))


@pytest.mark.parametrize(("path", "what"), [
    ("capped/65536", "answers each Range request with 64 KiB at most"),
    ("expiring/exp", "redirects to a URL that works once (a signed link that expires)"),
])
def test_sources_that_answer_ranges_their_own_way_are_still_read_in_place(env, path, what):
    # Given a source that ... (what)
    env.push({"id": "own-way", "url": f"http://127.0.0.1:{env.http.port}/{path}/twenty.mp4",
              "start": 12, "duration": 3})
    proc = env.start()
    env.wait_finished(1)
    assert env.stop(proc) == 0
    # Then the clip is made, read in place, and right
    (event,) = env.done_events()
    assert (event["id"], event["source_read"]) == ("own-way", "ranges"), env.dead_letters()
    assert 2.9 <= ffprobe_duration(os.path.join(env.out, "own-way.mp4")) <= 4.1


@pytest.mark.settings({"job": {"max_source_bytes": "100KiB"}})
def test_a_source_over_max_source_bytes_is_refused_from_its_first_answer(env):
    key = "toolarge"
    _run(env, {"id": key, "url": f"http://127.0.0.1:{env.http.port}/paced/1e9/{key}/ten.mp4",
               "duration": 1})
    (letter,) = env.dead_letters()
    assert letter["reason"] == "source_too_large" and "max_source_bytes" in letter["error"]
    # the first answer told the size, and was dropped at once: at most what was in flight
    # (nothing at all when the reset came before the server's first body write)
    assert env.http.ranges[key][0] == "bytes=0-", env.http.ranges
    assert env.http.sent.get(key, 0) <= 256 * 1024, env.http.sent


# --- the relay on its own, on loopback ---------------------------------------------------


def _relay(env, name: str = "ten.mp4", allow_private: bool = True) -> relay.Relay:
    limits = source.FetchLimits(connect_timeout=2, stall_timeout=2, max_bytes=1 << 30,
                                allow_private=allow_private)
    ctx = JobContext(time.monotonic() + 30, limits)
    return relay.Relay(source.Remote(f"http://127.0.0.1:{env.http.port}/{name}"), ctx)


def _get(r: relay.Relay, target: str, headers: dict[str, str] | None = None,
         password: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET ``target`` from the relay, with the password ffmpeg is given (or ``password``)."""
    proxy = urlsplit(r.ffmpeg_env()["http_proxy"])
    secret = f"{proxy.username}:{proxy.password if password is None else password}"
    host, port = r.address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", target, headers={
            **(headers or {}),
            "Proxy-Authorization": "Basic " + base64.b64encode(secret.encode()).decode()})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_the_relay_passes_ranges_on_and_serves_nothing_else(env):
    with open(os.path.join(env.http.directory, "ten.mp4"), "rb") as fh:
        data = fh.read()
    with _relay(env) as r:
        path = r.url[len(f"http://{r.address}"):]
        # ffmpeg's argv holds no secret: the password is in its environment
        assert urlsplit(r.url).password is None and r._token not in r.url
        status, headers, body = _get(r, path, {"Range": "bytes=1000-1999"})
        assert (status, body) == (206, data[1000:2000])
        assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        # the proxy form of the same URL, as ffmpeg sends it with http_proxy set
        status, _, body = _get(r, r.url, {"Range": f"bytes={len(data) - 10}-"})
        assert (status, body) == (206, data[-10:])
        assert _get(r, path, {"Range": f"bytes={len(data)}-"})[0] == 416
        assert _get(r, path, {"Range": "bytes=9-3"})[0] == 416
        # without the password: asked for it, nothing fetched
        status, headers, _ = _get(r, path, {"Range": "bytes=0-"}, password="guess")
        assert status == 407 and headers["Proxy-Authenticate"].startswith("Basic")
        # anything else is refused without being fetched: another path, another host
        assert _get(r, "/ten.mp4")[0] == 403
        assert _get(r, "/other")[0] == 403
        assert _get(r, f"http://127.0.0.2:{env.http.port}{path}")[0] == 403
        assert r.refused == 3 and r.requests == 2 and r.error is None
        assert r.bytes_in == 1000 + 10


def test_the_relay_sends_ffmpeg_exactly_the_bytes_it_announced(env, media_dir):
    # Given a source whose range answers carry more than their Content-Range says
    with open(os.path.join(media_dir, "ten.mp4"), "rb") as fh:
        data = fh.read()
    with _relay(env, "overlong/ten.mp4") as r:
        path = r.url[len(f"http://{r.address}"):]
        status, headers, body = _get(r, path, {"Range": "bytes=0-999"})
    # Then ffmpeg gets the bytes announced, in order, asked again 100 at a time
    assert (status, headers["Content-Length"]) == (206, "1000")
    assert body == data[:1000] and r.requests == 10 and r.error is None


def test_the_relay_applies_the_address_guard_to_every_request(env):
    # Given a relay for a source on loopback, with private addresses not allowed
    with _relay(env, allow_private=False) as r:
        path = r.url[len(f"http://{r.address}"):]
        # Then ffmpeg's request fails, and the job's failure is the guard's refusal
        assert _get(r, path, {"Range": "bytes=0-"})[0] == 502
        assert r.error is not None and r.error.reason == "private_address"
        assert r.bytes_in == 0


def test_ffmpeg_sends_every_http_request_through_the_relay(env):
    # Given the worker's ffmpeg command for a relayed source, with the relay's environment,
    # pointed at some other http URL (as a crafted input naming one would make it)
    with _relay(env) as r:
        def clip(src: str) -> subprocess.CompletedProcess:
            cmd = media.clip_command("ffmpeg", src, os.path.join(env.tmp, "out.mp4"),
                                     media.Cut(0, 1), rw_timeout=5)
            return subprocess.run(cmd, env=r.ffmpeg_env(), capture_output=True, text=True,
                                  timeout=30)

        out = clip(f"http://127.0.0.3:{env.http.port}/ten.mp4")
        # Then the request reached the relay, which refused it; nothing was fetched
        assert out.returncode != 0 and "403" in out.stderr
        wait_for(lambda: r.refused == 1, 5, what="the relay's refusal")
        assert r.requests == 0
        # and no other protocol is open to it: not local files, not https
        for src in (os.path.join(env.http.directory, "ten.mp4"), "https://127.0.0.1:1/x"):
            out = clip(src)
            assert out.returncode != 0 and "not on whitelist" in out.stderr, out.stderr


def test_closing_the_relay_cuts_a_source_that_dribbles_its_headers(env):
    # Given ffmpeg's request forwarded to a source that sends its headers a byte at a time
    with _relay(env, "dribble") as r:
        path = r.url[len(f"http://{r.address}"):]
        answer: list[object] = []

        def ask() -> None:
            try:
                answer.append(_get(r, path, {"Range": "bytes=0-"})[0])
            except (OSError, http.client.HTTPException) as exc:
                answer.append(exc)

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        wait_for(lambda: r.requests == 1, 5, what="the request to the source")
        time.sleep(0.3)  # well into the dribble
    # When the relay closes (ffmpeg gone, job over), nothing of it lingers until the deadline
    wait_for(lambda: not [t for t in threading.enumerate()
                          if t.name.startswith("relay") and t.is_alive()], 3,
             what="the relay's threads to end")
    asking.join(3)
    assert answer and answer[0] != 206, answer
    assert r.error is None  # the job was over: nothing recorded after close
