"""Smart cut (worker.smartcut) on the generated corpus (tests/corpus.py), with real ffmpeg.

Each clip is checked by decoding it: a clean decode (``-v error -xerror`` says nothing),
exactly the source frames from ``start`` up to ``start + length`` (first, last, count, none
duplicated or dropped), audio over the video's time, and the copied frames bit-identical to
the source's (framemd5 of the decoded pictures). Sources that cannot be joined safely must
fall back to encode, with a reason, before anything is written.

The fast tests cut a B-pyramid H.264 MP4 and an x265 open-GOP MP4, and check a fallback;
the slow one cuts every corpus file that does not fall back with starts on, just before and
just after a keyframe, ends inside a GOP and at the source's end, into mp4, mkv and ts.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from fractions import Fraction

import pytest

from tests import corpus
from worker import media, smartcut
from worker.context import FetchLimits, JobContext
from worker.errors import Transient
from worker.smartcut import Fallback, Packet, Probe, Video

MUXERS = {"mp4": "mp4", "mkv": "matroska", "ts": "mpegts", "mov": "mov"}
FALLS_BACK = {  # corpus files smart cut refuses, and why
    "h264_main_60.ts": "without an index", "hevc_2997.ts": "without an index",
    "h264_open_25.ts": "without an index", "h264_open_2997.mkv": "open GOP",
}


def smart_cut(source: corpus.Source, start: float, length: float | None, fmt: str,
              folder: str) -> tuple[str, smartcut.Plan, smartcut.SmartResult]:
    """Cut ``source`` with smart cut into ``folder``/clip.``fmt``."""
    preroll = media.preroll(source.path, source.path)
    probe = smartcut.probe(source.path, start, length, preroll=preroll)
    plan = smartcut.plan(probe, start, length, MUXERS[fmt], preroll)
    pieces = os.path.join(folder, "pieces")
    os.makedirs(pieces, exist_ok=True)
    dst = os.path.join(folder, f"clip.{fmt}")
    result = smartcut.run(plan, source.path, dst, pieces)
    return dst, plan, result


def assert_exact_and_copied(source: corpus.Source, clip: str, plan: smartcut.Plan,
                            start: float, length: float | None) -> corpus.Check:
    """The clip holds exactly the frames asked for, decodes cleanly, has its audio over the
    video's time, and the frames it copied are the source's, bit for bit."""
    # Audio spans the video's own time, from its first frame to the end of its last, within
    # an audio frame (an AAC encoder's priming is played where the container cannot mark it
    # skipped).
    check = corpus.check(clip, source, start, length)
    assert not check.errors, (source.name, start, length, check.errors)
    copy_end = plan.copy_end if plan.copy_end is not None else float("inf")
    copied = [i for i, n in enumerate(check.got)
              if plan.keyframe - 1e-3 <= source.times[n] < copy_end - 1e-3]
    assert copied, "nothing was copied"
    clip_md5, source_md5 = corpus.framemd5(clip), corpus.framemd5(source.path)
    assert [clip_md5[i] for i in copied] == [source_md5[check.got[i]] for i in copied]
    return check


def cases(source: corpus.Source) -> list[tuple[str, float, float | None]]:
    """(label, start, length): a start on the frame just before a keyframe, on a keyframe
    (to the source's end), between the two frames just after one, and the issue's 7.3 s
    (its end inside a GOP)."""
    k = source.keyframe_near(5.0)
    times, frame = source.times, float(1 / source.rate)
    return [("before", times[k - 1], 3.0), ("on", times[k], None),
            ("after", times[k + 1] + frame / 2, 2.5), ("issue", 7.3, 6.0)]


@pytest.mark.parametrize("name,label,fmt", [
    ("h264_high_b3_25.mp4", "issue", "mp4"),  # B-pyramid: the end needs a tail
    ("hevc_25.mp4", "before", "mkv"),  # x265's open GOP: a CRA's leading frames
])
def test_smart_cut_is_frame_exact_and_copies_the_source_frames(tmp_path_factory, tmp_path,
                                                               name, label, fmt):
    # Given a corpus file
    source = corpus.session_corpus(tmp_path_factory, [name])[name]
    _, start, length = next(c for c in cases(source) if c[0] == label)
    # When it is cut with smart cut
    clip, plan, result = smart_cut(source, start, length, fmt, str(tmp_path))
    # Then the clip is exact, and most of it was copied, not re-encoded
    assert_exact_and_copied(source, clip, plan, start, length)
    assert result.cut == "smart"
    assert result.copied_seconds > result.reencoded_seconds > 0
    assert result.copied_seconds + result.reencoded_seconds == pytest.approx(length, abs=0.05)


def test_a_source_that_cannot_be_joined_falls_back_before_anything_is_written(
        tmp_path_factory, tmp_path):
    # Given an H.264 open-GOP source (keyframes that are not IDR pictures)
    name = "h264_open_2997.mkv"
    source = corpus.session_corpus(tmp_path_factory, [name])[name]
    # When it is asked for a smart cut
    with pytest.raises(Fallback) as caught:
        smart_cut(source, 7.3, 6.0, "mp4", str(tmp_path))
    # Then it falls back to encode, saying why, and no clip was written
    assert "open GOP" in caught.value.reason
    assert not os.path.exists(tmp_path / "clip.mp4")


@pytest.mark.slow
@pytest.mark.parametrize("name", [spec.name for spec in corpus.SPECS])
def test_smart_cut_on_the_corpus(tmp_path_factory, tmp_path, name):
    # Given a corpus file
    source = corpus.session_corpus(tmp_path_factory, [name])[name]
    for (label, start, length), fmt in itertools.product(cases(source), ("mp4", "mkv", "ts")):
        folder = str(tmp_path / f"{label}-{fmt}")
        # When it is cut four ways, into each container
        reason = FALLS_BACK.get(name)
        if source.rotation and fmt != "mp4":
            reason = "no display matrix"
        elif name.startswith("hevc") and fmt == "ts":
            reason = "HEVC into MPEG-TS"
        if reason:
            # Then a source smart cut cannot join falls back, for its reason
            with pytest.raises(Fallback, match=reason):
                smart_cut(source, start, length, fmt, folder)
            continue
        try:
            clip, plan, _ = smart_cut(source, start, length, fmt, folder)
        except Fallback as exc:  # only a clip with no keyframe inside may fall back
            assert "no keyframe inside" in exc.reason, (label, exc.reason)
            continue
        # Then every clip is exact and its copied frames are the source's
        assert_exact_and_copied(source, clip, plan, start, length)


# --- planning, on packets made up here ---------------------------------------------------


def _gop(start: float, frames: int, rate: float, key: bool = True) -> list[Packet]:
    """A closed GOP with B-frames in pairs (I P B B P B B ...), in decoding order."""
    step = 1 / rate
    out = [Packet(round(start, 6), round(start - step, 6), key)]
    n = 1
    while n < frames:
        p = min(n + 2, frames - 1)
        out.append(Packet(round(start + p * step, 6), round(start + (n - 1) * step, 6), False))
        for b in range(n, p):
            out.append(Packet(round(start + b * step, 6), round(start + b * step, 6), False))
        n = p + 1
    return out


def _probe(packets: list[Packet], duration: float = 60.0) -> Probe:
    return Probe(Video("h264", "High", 31, 320, 180, "yuv420p", rate=Fraction(25)), True,
                 duration, tuple(packets))


def test_plan_copies_from_the_first_keyframe_after_the_start_to_a_clean_cut_point():
    # Given 2 s GOPs at 25 fps with B-frames
    packets = [p for g in range(10) for p in _gop(2.0 * g, 50, 25)]
    # When a clip from 3.1 s for 5 s is planned
    plan = smartcut.plan(_probe(packets), 3.1, 5.0)
    # Then the head is re-encoded up to the keyframe at 4 s, the body copied from there up to
    # the last point before the end where decoding order can be cut, the rest re-encoded
    assert plan.keyframe == 4.0
    assert 8.0 < plan.copy_end <= 8.1 and plan.end == pytest.approx(8.1)
    assert plan.reencoded == pytest.approx(0.9 + 8.1 - plan.copy_end)
    # and no packet shown before copy_end is decoded after one shown from it on
    assert max(p.pts for p in packets if p.pts < plan.copy_end) < plan.copy_end


def test_plan_falls_back_without_a_keyframe_inside_the_clip_or_an_encoder():
    packets = [p for g in range(3) for p in _gop(5.0 * g, 125, 25)]
    with pytest.raises(Fallback, match="no keyframe"):
        smartcut.plan(_probe(packets), 5.5, 3.0)
    vp9 = Probe(Video("vp9", "Profile 0", pix_fmt="yuv420p"), False, 60.0, tuple(packets))
    with pytest.raises(Fallback, match="no encoder"):
        smartcut.plan(vp9, 1.0, 8.0)


def test_cut_point_without_b_frames_is_the_end_itself():
    packets = [Packet(round(i / 25, 6), round(i / 25, 6), i % 50 == 0) for i in range(200)]
    assert smartcut.cut_point(packets, 0.0, 3.3, 0.01) == pytest.approx(3.3)


# --- ffprobe runs under ffmpeg's rules (media.capture) --------------------------------------


def _ctx(seconds: float) -> JobContext:
    return JobContext(time.monotonic() + seconds, FetchLimits(5, 30, 1 << 30, False))


def test_a_helper_that_prints_without_end_is_stopped_at_the_output_limit():
    # Given a "probe" that prints forever
    cmd = [sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"]
    # When it is run as the cut's helpers are
    with pytest.raises(RuntimeError, match="more than 1048576 bytes"):
        media.capture(cmd, _ctx(30), limit=1 << 20)
    # Then it was stopped there (the caller falls back to encode mode)


def test_a_helper_that_hangs_is_killed_at_the_job_s_deadline_with_its_children(tmp_path):
    # Given a "probe" that starts a child and hangs, writing their pids
    pids = tmp_path / "pids"
    cmd = [sys.executable, "-c", "import os, subprocess, sys, time\n"
           "child = subprocess.Popen(['sleep', '300'])\n"
           f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
           "time.sleep(300)"]
    # When the job's deadline passes
    started = time.monotonic()
    with pytest.raises(Transient) as caught:
        media.capture(cmd, _ctx(2))
    # Then it ends as the job's timeout, soon, and neither process is left
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 10
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
