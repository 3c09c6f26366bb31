"""A crashing or failing ffmpeg never blames the input (issue 13).

ffmpeg killed by a signal before it describes its input, or exiting for a reason that is not
the input's, is retried; only what ffmpeg says about the input itself dead-letters a job at
once. The end-to-end tests run the real supervisor with ``[job] ffmpeg`` pointing at a shell
wrapper around the real ffmpeg that misbehaves on chosen runs (counted in a file, so the
misbehaviour is deterministic); the unit tests pin down the classification itself.
"""

from __future__ import annotations

import http.server
import os
import shlex
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import free_port
from worker.context import FetchLimits, JobContext
from worker.errors import JobFailed, Permanent, Transient
from worker.media import Cut, FFmpegRun, InputReport, clip_command, failure
from worker.wake import Waker

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
HEADER = ("Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'http://127.0.0.1:9/source':\n"
          "  Metadata:\n    title           : Connection refused\n"
          "  Duration: 00:00:10.00, start: 0.000000, bitrate: 240 kb/s\n"
          "  Stream #0:0[0x1](und): Video: h264 (High), yuv420p, 320x240, 25 fps\n"
          "  Stream #0:1[0x2](und): Audio: aac (LC), 44100 Hz, mono\n")
COMPLETE = HEADER + "Output #0, mp4, to 'clip.mp4':\n"
PERMANENT_BY_FFMPEG = {"not_video", "media_error"}


# --- the classification: pure logic ---------------------------------------------------------


def _classify(returncode: int, stderr: str, ended: bool = False, start: float = 0.0,
              remote: bool = True) -> tuple[str, str] | None:
    report = InputReport.parse(stderr.encode())
    failed = failure(returncode, report, stderr.strip(), ended=ended, start=start,
                     source="http://127.0.0.1:9/source" if remote else "/w/source")
    if failed is None:
        return None
    assert isinstance(failed, Permanent | Transient)
    return ("permanent" if isinstance(failed, Permanent) else "transient"), failed.reason


@pytest.mark.parametrize(("returncode", "stderr", "expected"), [
    # killed by a signal, directly or as a wrapper shell reports it, at any point
    (-11, "", ("transient", "ffmpeg_crashed")),
    (-9, HEADER[:60], ("transient", "ffmpeg_crashed")),
    (-9, COMPLETE, ("transient", "ffmpeg_crashed")),
    (137, COMPLETE + "Killed\n", ("transient", "ffmpeg_crashed")),
    (139, "Segmentation fault\n", ("transient", "ffmpeg_crashed")),
    (255, COMPLETE + "Exiting normally, received signal 15.\n", ("transient", "ffmpeg_crashed")),
    (134, COMPLETE + "Aborted\n", ("transient", "ffmpeg_crashed")),
    # an exit status past 128 that no killing signal explains is no crash
    (145, "http://127.0.0.1:9/source: Connection refused\n", ("transient", "fetch_failed")),
    (183, COMPLETE + "http://127.0.0.1:9/source: corrupt input packet in stream 0\n",
     ("permanent", "media_error")),
    # a failure with no word about the input
    (1, "", ("transient", "ffmpeg_failed")),
    (127, "/opt/wrapper: 2: /usr/bin/python9: not found\n", ("transient", "ffmpeg_failed")),
    (126, "", ("transient", "ffmpeg_failed")),
    (0, "", ("transient", "ffmpeg_failed")),
    (1, COMPLETE + "Error while filtering: Resource temporarily unavailable\n",
     ("transient", "ffmpeg_failed")),
    (127, "setpriv: failed to execute /usr/bin/ffmpeg: No such file or directory\n",
     ("transient", "ffmpeg_missing")),
    (127, "die-with-parent: failed to execute /usr/bin/ffmpeg\n",
     ("transient", "ffmpeg_missing")),
    # short of memory or disk, an I/O error reading the input
    (1, COMPLETE + "Error allocating the frame: Cannot allocate memory\n",
     ("transient", "out_of_memory")),
    (1, "http://127.0.0.1:9/source: Cannot allocate memory\n", ("transient", "out_of_memory")),
    (1, COMPLETE + "clip.mp4: No space left on device\nConversion failed!\n",
     ("transient", "disk_full")),
    (1, "http://127.0.0.1:9/source: Connection refused\n", ("transient", "fetch_failed")),
    (1, "http://127.0.0.1:9/source: Server returned 5XX Server Error reply\n",
     ("transient", "fetch_failed")),
    (1, "http://127.0.0.1:9/source: Connection reset by peer\n", ("transient", "fetch_failed")),
    (1, "http://127.0.0.1:9/source: Input/output error\n", ("transient", "fetch_failed")),
    (1, "http://127.0.0.1:9/source: End of file\n", ("transient", "fetch_failed")),
    # what ffmpeg says about the input itself
    (1, "http://127.0.0.1:9/source: Invalid data found when processing input\n",
     ("permanent", "not_video")),
    (1, "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x1] moov atom not found\n"
        "http://127.0.0.1:9/source: Invalid data found when processing input\n",
     ("permanent", "not_video")),
    (1, COMPLETE.replace("Video: h264 (High)", "Audio: mp3") + "Stream map '0:v:0' matches no "
        "streams.\n", ("permanent", "not_video")),
    (0, COMPLETE, ("permanent", "past_end")),  # with start=30 below
    (1, COMPLETE + "http://127.0.0.1:9/source: corrupt input packet in stream 0\n"
        "Conversion failed!\n", ("permanent", "media_error")),
    (1, COMPLETE + "[h264 @ 0x1] Invalid NAL unit size (634 > 221).\n",
     ("permanent", "media_error")),
    (1, COMPLETE + "http://127.0.0.1:9/source: something ffmpeg says about it\n",
     ("permanent", "media_error")),
    (0, COMPLETE + "video:19kB audio:9kB\n", None),
])
def test_each_failure_is_classified_by_its_cause(returncode, stderr, expected):
    start = 30.0 if expected == ("permanent", "past_end") else 0.0
    assert _classify(returncode, stderr, ended=returncode == 0 and bool(stderr), start=start,
                     ) == expected


def test_end_of_file_on_a_local_file_is_not_a_network_fault():
    # Given ffmpeg reading a local file that ends before it could describe it
    # Then that is neither a fetch failure nor (without ffmpeg saying so) the input's fault
    assert _classify(1, "/w/source: End of file\n", remote=False) == \
        ("transient", "ffmpeg_failed")


def test_the_inputs_own_metadata_cannot_pass_for_ffmpegs_words():
    # Given an input whose title reads "Invalid data found when processing input"
    stderr = COMPLETE.replace("Connection refused", "Invalid data found when processing input")
    # When the run fails with nothing said about the input
    # Then that failure is not blamed on the input
    assert _classify(1, stderr) == ("transient", "ffmpeg_failed")


def test_a_partial_input_report_proves_nothing_about_the_input():
    report = InputReport.parse(HEADER.encode())
    assert report.opened and report.has_video and not report.complete
    assert InputReport.parse(COMPLETE.encode()).complete
    assert not InputReport.parse(b"").complete


# --- the real ffmpeg, on real faults ---------------------------------------------------------


class _Faulty(http.server.BaseHTTPRequestHandler):
    """/503: a 503 answer; /reset: the connection reset (RST) before any answer; /cut/NAME:
    NAME's headers and no byte of its body, the connection closed."""

    protocol_version = "HTTP/1.1"
    folder = ""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        else:
            size = os.path.getsize(os.path.join(self.folder, self.path.rsplit("/", 1)[1]))
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def faulty(media_dir) -> Iterator[str]:
    handler = type("Handler", (_Faulty,), {"folder": media_dir})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def _clip(src: str, dst: str, remote: bool = True, length: float | None = 1.0,
          ) -> JobFailed | None:
    cut = Cut(0.0, length, "copy", "mp4", "ultrafast")
    cmd = clip_command(FFMPEG, src, dst, cut, rw_timeout=5 if remote else None)
    ctx = JobContext(time.monotonic() + 30, FetchLimits(5, 10, 1 << 30, True), Waker())
    run = FFmpegRun(cmd, ctx, cut)
    try:
        run.run()
    except JobFailed as exc:
        return exc
    return None


@pytest.mark.parametrize("path", ["/503", "/reset", "/cut/ten.mp4", "refused"])
def test_a_failed_read_of_the_input_is_a_transient_fetch_failure(faulty, tmp_path, path):
    # Given an input over HTTP that fails before ffmpeg can describe it
    src = f"http://127.0.0.1:{free_port()}/x" if path == "refused" else faulty + path
    # When ffmpeg is run on it
    failed = _clip(src, str(tmp_path / "clip.mp4"))
    # Then that is a fetch failure, worth another attempt, not an input that is not a video
    assert isinstance(failed, Transient) and failed.reason == "fetch_failed", failed
    assert failed.error  # ffmpeg's own words are kept


def test_a_full_disk_under_the_clip_is_disk_full(media_dir, tmp_path):
    # Given a clip written into a file system with 64 KiB (a tmpfs: needs root)
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        # When ffmpeg runs out of space writing it
        failed = _clip(os.path.join(media_dir, "ten.mp4"), str(folder / "clip.mp4"),
                       remote=False, length=None)  # all 10 s: about 300 KB
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    # Then the job is told so, in terms the worker can treat as a fault of the host
    assert isinstance(failed, Transient) and failed.reason == "disk_full", failed
    assert "No space left on device" in failed.error


# --- ffmpeg's stderr on a local file, read in passing -----------------------------------------


def _stand_in(tmp_path, script: str, then_ffmpeg: bool = True) -> str:
    """An ffmpeg stand-in that runs ``script`` (shell), then the real ffmpeg in its place."""
    path = tmp_path / "ffmpeg-stand-in"
    ffmpeg = f"exec {shlex.quote(FFMPEG)} \"$@\"\n" if then_ffmpeg else ""
    path.write_text(f"#!/bin/sh\n{script}\n{ffmpeg}")
    path.chmod(0o755)
    return str(path)


def _watched(ffmpeg: str, src: str, dst: str) -> tuple[FFmpegRun, JobFailed | None, int, float]:
    """A copy clip of ``src`` by ``ffmpeg``: the run, its failure (or None), how many times
    the watching loop turned (each turn asks the job's abort check) and its wall time."""
    turns = 0

    def should_abort() -> bool:
        nonlocal turns
        turns += 1
        return False

    cut = Cut(0.0, 1.0, "copy", "mp4", "ultrafast")
    ctx = JobContext(time.monotonic() + 120, FetchLimits(5, 60, 1 << 30, True), Waker(),
                     should_abort)
    run = FFmpegRun(clip_command(ffmpeg, src, dst, cut), ctx, cut)
    started = time.monotonic()
    try:
        run.run()
    except JobFailed as exc:
        return run, exc, turns, time.monotonic() - started
    return run, None, turns, time.monotonic() - started


def test_a_report_written_line_by_line_does_not_wake_the_loop_line_by_line(media_dir,
                                                                          tmp_path):
    # Given an ffmpeg that writes 40 lines to stderr one at a time, 10 ms apart (the real
    # one writes its ~80-write report on its input in a burst, which a pipe the loop waits
    # on turns into a wake-up each)
    lines = "; ".join(f"echo 'line {i}' >&2; sleep 0.01" for i in range(40))
    ffmpeg = _stand_in(tmp_path, lines)
    # When it clips a local file
    run, failed, turns, _ = _watched(ffmpeg, os.path.join(media_dir, "ten.mp4"),
                                     str(tmp_path / "clip.mp4"))
    # Then the clip is made, every line is kept, and the loop turned a few times, not 40
    assert failed is None
    assert all(f"line {i}\n".encode() in run.head for i in range(40))
    assert b"Output #0" in run.head  # and ffmpeg's own report after them
    assert turns < 20, turns


def test_a_flood_on_stderr_holds_ffmpeg_up_for_one_tick_at_most(media_dir, tmp_path):
    # Given an ffmpeg with a helper (a process of its group, holding its pipes) that prints
    # 16 MB to stderr once ffmpeg has described its input: 244 pipefuls, which the loop, if
    # it read stderr only when its 1 s tick wakes it, would hold up for over 20 s
    ffmpeg = _stand_in(tmp_path, "(sleep 0.3; yes 'a message ffmpeg repeats' | "
                       "head -c 16000000 >&2; echo 'the last line' >&2) &")
    # When it clips a local file
    run, failed, _, took = _watched(ffmpeg, os.path.join(media_dir, "ten.mp4"),
                                    str(tmp_path / "clip.mp4"))
    # Then the clip is made within seconds, with the report on its input and the last line
    # of the flood both kept
    assert failed is None
    assert took < 20, took
    assert b"Output #0" in run.head
    assert b"".join(run.stderr).endswith(b"the last line\n")


def test_a_flood_of_decoder_messages_before_the_report_does_not_hide_it(media_dir, tmp_path):
    # Given an ffmpeg whose libraries log 1 MB of messages (and ffmpeg's notes that one was
    # repeated) before it describes its input, as a long damaged stream does while it is
    # probed: four times the head kept for the report
    ffmpeg = _stand_in(tmp_path, "yes '[h264 @ 0x55d0c8a3b2c0] error while decoding MB 22 5, "
                       "bytestream -7' | head -n 12000 >&2\n"
                       "yes '    Last message repeated 3 times' | head -n 6000 >&2")
    # When it clips a local file
    run, failed, _, _ = _watched(ffmpeg, os.path.join(media_dir, "ten.mp4"),
                                 str(tmp_path / "clip.mp4"))
    # Then the clip is made: the report on the input was found after the flood
    assert failed is None, failed
    assert run.input is not None and run.input.complete and run.input.has_video
    assert b"Output #0" in run.head and len(run.head) <= FFmpegRun.HEAD_LIMIT + 65536


def test_the_last_words_of_a_flooding_ffmpeg_are_kept(media_dir, tmp_path):
    # Given an ffmpeg that floods stderr, then fails with a word about its input and exits
    # without a progress report
    ffmpeg = _stand_in(tmp_path, "yes 'a message ffmpeg repeats' | head -c 300000 >&2\n"
                       "echo 'Input #0, mov,mp4, from x:' >&2\n"
                       "echo '[h264 @ 0x1] Invalid NAL unit size (634 > 221).' >&2\nexit 1",
                       then_ffmpeg=False)
    # When it is run on a local file
    _, failed, _, _ = _watched(ffmpeg, os.path.join(media_dir, "ten.mp4"),
                               str(tmp_path / "clip.mp4"))
    # Then the job fails for what it said last, read after it exited
    assert isinstance(failed, Transient | Permanent), failed
    assert failed.error.endswith("Invalid NAL unit size (634 > 221)."), failed.error[-200:]


# --- the real supervisor with a misbehaving ffmpeg ------------------------------------------


def _wrapper(env, misbehave: str) -> str:
    """An ffmpeg stand-in: counts its runs ($n, from 1, across workers), runs ``misbehave``
    (shell), then the real ffmpeg in its place."""
    path = os.path.join(env.tmp, "ffmpeg-wrapper")
    count = shlex.quote(path + ".count")
    with open(path, "w") as fh:
        fh.write(f"""#!/bin/sh
FFMPEG={shlex.quote(FFMPEG)}
n=$(flock {count}.lock sh -c 'n=$(($(cat "$1" 2>/dev/null || echo 0) + 1)); echo $n >"$1"; \\
    echo $n' sh {count})
{misbehave}
exec "$FFMPEG" "$@"
""")
    os.chmod(path, 0o755)
    env.settings["job"].update({"ffmpeg": path})
    return path


def runs(wrapper: str) -> int:
    with open(wrapper + ".count") as fh:
        return int(fh.read())


def _jobs(env, count: int, prefix: str = "ok") -> list[dict]:
    return [{"id": f"{prefix}{i}", "url": env.url("ten.mp4"), "start": i % 5, "duration": 2}
            for i in range(count)]


def _run_until_finished(env, *jobs: dict, timeout: float = 60) -> None:
    proc = env.start()
    env.push(*jobs)
    env.wait_finished(len(jobs), timeout=timeout)
    assert env.stop(proc) == 0


def _assert_all_done(env, jobs: list[dict], reason: str) -> None:
    letters = env.dead_letters()
    assert not [d for d in letters if d["reason"] in PERMANENT_BY_FFMPEG], letters
    assert letters == []
    assert sorted(e["id"] for e in env.done_events()) == sorted(j["id"] for j in jobs)
    assert f"failed ({reason})" in env.log_text()  # retried, and said why


def test_an_ffmpeg_killed_by_a_signal_before_it_reads_the_input_is_retried(env):
    # Given an ffmpeg that dies of SIGSEGV on its first run, before it prints anything
    wrapper = _wrapper(env, '[ "$n" -eq 1 ] && kill -SEGV $$')
    jobs = _jobs(env, 3)
    # When valid jobs are clipped with it
    _run_until_finished(env, *jobs)
    # Then the crashed one is retried and done like the others: nothing is blamed on a video
    _assert_all_done(env, jobs, "ffmpeg_crashed")
    assert runs(wrapper) >= 4  # so one run crashed


def test_an_ffmpeg_that_crashes_one_run_in_three_fails_no_job(env):
    # Given an ffmpeg that aborts (SIGABRT) on every third run
    env.settings["job"]["max_attempts"] = 4  # 3 crashes in all (runs 3, 6 and 9 of 11)
    wrapper = _wrapper(env, '[ $((n % 3)) -eq 0 ] && kill -ABRT $$')
    jobs = _jobs(env, 8)
    # When valid jobs are clipped with it
    _run_until_finished(env, *jobs)
    # Then every job is done, the crashed runs retried
    _assert_all_done(env, jobs, "ffmpeg_crashed")
    assert runs(wrapper) >= 11  # so 3 runs crashed


@pytest.mark.parametrize("misbehave", [
    'exit 1',  # a wrapper that gives up without a word
    '/nonexistent/python3 "$@"; exit $?',  # its interpreter gone: sh says "not found", 127
], ids=["silent-exit-1", "exit-127"])
def test_an_ffmpeg_that_fails_without_a_word_about_the_input_is_retried(env, misbehave):
    # Given an ffmpeg that fails on its first run without describing any input
    _wrapper(env, f'[ "$n" -eq 1 ] && {{ {misbehave}; }}')
    jobs = _jobs(env, 2)
    # When valid jobs are clipped with it
    _run_until_finished(env, *jobs)
    # Then the failed run is retried as ffmpeg's failure, not the video's
    _assert_all_done(env, jobs, "ffmpeg_failed")


def test_an_ffmpeg_sigkilled_mid_clip_is_retried(env):
    # Given an ffmpeg that, on its first run, is SIGKILLed (as by the OOM killer) once it has
    # described its input and started writing the clip (-re: it reads at the video's pace)
    _wrapper(env, '''if [ "$n" -eq 1 ]; then
    for dst; do :; done
    "$FFMPEG" -re "$@" & pid=$!
    i=0
    while [ ! -s "$dst" ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i + 1)); done
    kill -KILL $pid
    wait $pid
    exit $?
fi''')
    jobs = _jobs(env, 2)
    # When valid jobs are clipped with it
    _run_until_finished(env, *jobs)
    # Then the killed run is retried and the job done
    _assert_all_done(env, jobs, "ffmpeg_crashed")


def test_what_ffmpeg_says_about_the_input_still_fails_the_job_at_once(env, media_dir):
    # Given one worker whose ffmpeg crashes on its first run, and inputs that are not videos
    # or are damaged: an HTML page, and a video cut short, its index at the front or the end
    env.settings["supervisor"]["workers"] = 1
    _wrapper(env, '[ "$n" -eq 1 ] && kill -SEGV $$')
    with open(os.path.join(media_dir, "ten.mp4"), "rb") as fh:
        video = fh.read()
    with open(os.path.join(media_dir, "cut-front-index.mp4"), "wb") as fh:
        fh.write(video[:len(video) * 2 // 5])
    moov_at_end = os.path.join(media_dir, "moov-at-end.mp4")
    if not os.path.exists(moov_at_end):
        import subprocess

        subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-y", "-i",
                        os.path.join(media_dir, "ten.mp4"), "-c", "copy", moov_at_end],
                       check=True)
    with open(moov_at_end, "rb") as fh:
        whole = fh.read()
    with open(os.path.join(media_dir, "cut-end-index.mp4"), "wb") as fh:
        fh.write(whole[:len(whole) * 3 // 5])
    first, last = _jobs(env, 2)
    bad = [{"id": "html", "url": env.url("page.html")},
           {"id": "cut-front", "url": env.url("cut-front-index.mp4")},
           {"id": "cut-end", "url": env.url("cut-end-index.mp4")}]
    # When they are clipped, after a valid job that takes the crash
    _run_until_finished(env, first, *bad, last)
    # Then the valid jobs are done, and each bad input is dead-lettered at its first attempt
    # with the input's reason
    assert sorted(e["id"] for e in env.done_events()) == [first["id"], last["id"]]
    letters = {d["id"]: (d["reason"], d["attempts"]) for d in env.dead_letters()}
    assert letters == {"html": ("not_video", 1), "cut-front": ("media_error", 1),
                       "cut-end": ("not_video", 1)}
