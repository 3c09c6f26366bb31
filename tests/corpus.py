"""A corpus of generated sources, and a checker that proves a clip cut from one frame-exact.

Every source is ffmpeg's testsrc2 (+ a tone), and every frame carries its own number: the top
24 rows are a black strip with 16 white blocks, block i lit when bit i of the frame's number
is set. Blocks that large survive any re-encoding, so a decoded frame names the source frame it
came from, exactly: a clip's frame numbers, read back, show at once its first and last frame,
and any frame duplicated or dropped. That is cheaper and stricter than matching pictures by
SSIM or PSNR, and it holds through re-encoding, where comparing decoded bytes cannot.

Reading the numbers back decodes the clip once (the same pass proves it decodes cleanly):
cropped to the strip and scaled down to 16x1 grey pixels, each frame is 16 bytes. Frames are
decoded with ``-fps_mode passthrough``: rawvideo output would otherwise be made constant-rate
by ffmpeg, duplicating or dropping frames of its own.

Times follow ffmpeg's ``-ss``: a source frame's time is its presentation time counted from the
file's start (the earliest start of its streams, ~1.4 s in an MPEG-TS file). A clip of
``length`` s from ``start`` holds exactly the source frames whose time t is in
``[start, start + length)``, in order, each once: half-open, so that clips [a, b) and [b, c)
tile the source. For a constant-rate source that is round(length x fps) frames, give or take
the one a range between two frame times leaves to rounding.

``generate(folder)`` makes each file once per folder and analyses it once per process, so the
tests of any module share one corpus per session: see ``session_corpus``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction

BITS = 16
STRIP = 24  # rows
TOLERANCE = 1e-6  # s: timestamps are printed and parsed to the microsecond
SECONDS = 16


def _counter_filter() -> str:
    """drawbox filters that write the frame number (``n``) into the top strip."""
    boxes = [f"drawbox=x=0:y=0:w=iw:h={STRIP}:color=black:t=fill"]
    for bit in range(BITS):
        boxes.append(f"drawbox=x={bit}*iw/{BITS}:y=0:w=iw/{BITS}+1:h={STRIP}:color=white"
                     f":t=fill:enable='mod(floor(n/{1 << bit})\\,2)'")
    return ",".join(boxes)


@dataclass(frozen=True)
class Spec:
    """One source of the corpus: how it is encoded and stored."""

    name: str  # file name, with the container's extension
    codec: str = "h264"  # h264 | hevc
    profile: str = "high"  # H.264 profile
    rate: str = "25"
    size: str = "320x180"
    gop: float = 1.0  # seconds between forced keyframes
    bframes: int = 3
    refs: int = 4
    open_gop: bool = False
    scenecut: bool = False  # keyframes where the picture changes, not on a fixed grid
    audio: str | None = "aac"  # aac | opus | None
    rotate: int = 0  # display matrix, degrees

    @property
    def container(self) -> str:
        return {"mp4": "mp4", "mov": "mov", "mkv": "matroska", "ts": "mpegts"}[
            self.name.rsplit(".", 1)[1]]


# A covering set rather than every combination: each row of the table has its source
# (h264_high_b3_25.mp4, hevc_25.mp4, h264_open_2997.mkv, h264_main_60.ts, h264_gop5_25.mp4),
# and every profile, B-frame/refs setting, GOP kind and length, rate, size, rotation, audio
# codec and input container appears at least once.
SPECS = [
    Spec("h264_high_b3_25.mp4"),  # High, B-pyramid, 4 refs, closed 1 s GOP, AAC
    Spec("h264_baseline_2997.mp4", profile="baseline", rate="30000/1001", gop=5.0,
         bframes=0, refs=1),  # Baseline, 5 s GOP, 29.97
    Spec("h264_main_60.ts", profile="main", rate="60"),  # MPEG-TS, 60 fps
    Spec("h264_open_2997.mkv", rate="30000/1001", gop=2.0, open_gop=True,
         audio="opus"),  # open GOP, 29.97, Opus, Matroska
    Spec("hevc_25.mp4", codec="hevc", gop=2.0),  # x265's default: open GOP
    Spec("h264_gop5_25.mp4", gop=5.0),  # long GOP
    Spec("h264_scenecut_25.mov", profile="main", gop=10.0, scenecut=True),  # QuickTime
    Spec("h264_odd_638_2997.mkv", profile="main", rate="30000/1001", size="638x360",
         bframes=0, refs=1, audio="opus"),  # odd width
    Spec("h264_rotated_25.mp4", gop=2.0, rotate=90),  # display matrix
    Spec("h264_noaudio_60.mp4", rate="60", bframes=0, refs=1, audio=None),
    Spec("hevc_2997.ts", codec="hevc", rate="30000/1001", gop=1.0),  # HEVC in MPEG-TS
    Spec("h264_open_25.ts", gop=2.0, open_gop=True, audio=None),  # open GOP in MPEG-TS
    Spec("h264_main_30.mov", profile="main", rate="30", gop=1.0, bframes=2, refs=2),
]


def _encode_command(spec: Spec, path: str) -> list[str]:
    rate = Fraction(spec.rate)
    keyint = max(1, round(spec.gop * rate))
    cmd = ["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
           f"testsrc2=size={spec.size}:rate={spec.rate}:duration={SECONDS}"]
    if spec.audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={SECONDS}"]
    picture = _counter_filter()
    if spec.scenecut:  # cuts every 2.3 s: the picture turns to its negative and back
        picture = f"negate=enable='gt(mod(t\\,4.6)\\,2.3)',{picture}"
    cmd += ["-vf", picture, "-pix_fmt", "yuv420p"]
    if spec.codec == "h264":
        params = ["open-gop=1"] if spec.open_gop else []
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-profile:v", spec.profile,
                "-g", str(keyint), "-bf", str(spec.bframes), "-refs", str(spec.refs)]
        if spec.bframes:
            cmd += ["-b-pyramid", "normal"]
        cmd += ["-sc_threshold", "40" if spec.scenecut else "0", "-keyint_min",
                str(min(keyint, 12))]
        if params:
            cmd += ["-x264-params", ":".join(params)]
    else:  # x265 defaults: open GOP, B-frames
        cmd += ["-c:v", "libx265", "-preset", "veryfast", "-x265-params",
                f"keyint={keyint}:min-keyint={keyint}:scenecut=0:log-level=error"]
        if spec.container in ("mp4", "mov"):
            cmd += ["-tag:v", "hvc1"]
    if spec.audio == "aac":
        cmd += ["-c:a", "aac", "-b:a", "96k"]
    elif spec.audio == "opus":
        cmd += ["-c:a", "libopus", "-b:a", "64k"]
    if spec.container in ("mp4", "mov"):
        cmd += ["-movflags", "+faststart"]
    return [*cmd, "-f", spec.container, path]


def _make(spec: Spec, path: str) -> None:
    """Write the source to ``path`` (by way of a temporary name: a file there is whole)."""
    part = f"{path}.part"
    if spec.rotate:
        # ffmpeg 5.1 sets a display matrix from the "rotate" tag only when copying a stream
        plain = f"{path}.plain"
        subprocess.run(_encode_command(spec, plain), check=True)
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-i", plain, "-c", "copy",
                        "-metadata:s:v:0", f"rotate={spec.rotate}", "-movflags", "+faststart",
                        "-f", spec.container, part], check=True)
        os.unlink(plain)
    else:
        subprocess.run(_encode_command(spec, part), check=True)
    os.replace(part, path)


# --- reading media back ------------------------------------------------------------------------


def _probe(path: str, *entries: str) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-of", "json", "-show_entries",
                          ":".join(entries), path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _unrotate(rotation: int) -> str:
    """The filter that undoes ffmpeg's autorotation of a picture with this display matrix."""
    return {0: "", 90: "transpose=clock,", -270: "transpose=clock,", -90: "transpose=cclock,",
            270: "transpose=cclock,", 180: "hflip,vflip,", -180: "hflip,vflip,"}[rotation]


@dataclass
class Decoded:
    numbers: list[int]  # the frame number each decoded frame carries, in order
    errors: str  # what the decoder said (-v error): nothing for a clean decode
    returncode: int


def decode(path: str, rotation: int = 0) -> Decoded:
    """Decode ``path`` whole (video and audio, as a player would, turned upright by its
    display matrix) and read each video frame's number. ``rotation`` is the display matrix
    of the source the frames came from: the picture is turned back before reading."""
    vf = f"{_unrotate(rotation)}crop=iw:{STRIP}:0:0,scale={BITS}:1:flags=area,format=gray"
    proc = subprocess.run(
        ["ffmpeg", "-v", "error", "-xerror", "-nostdin", "-i", path,
         "-map", "0:v:0", "-vf", vf, "-fps_mode", "passthrough", "-enc_time_base:v", "-1",
         "-f", "rawvideo", "pipe:1",
         "-map", "0:a?", "-f", "null", "-"], capture_output=True)
    data = proc.stdout
    numbers = [sum(1 << bit for bit in range(BITS) if data[k * BITS + bit] > 128)
               for k in range(len(data) // BITS)]
    return Decoded(numbers, proc.stderr.decode("utf-8", "replace").strip(), proc.returncode)


def framemd5(path: str, frames: int | None = None) -> list[str]:
    """The MD5 of each decoded video frame of ``path`` (ffmpeg's framemd5), in order: equal
    lists mean bit-identical pictures (for stream-copied frames)."""
    cmd = ["ffmpeg", "-v", "error", "-nostdin", "-i", path, "-map", "0:v:0",
           "-fps_mode", "passthrough"]
    if frames is not None:
        cmd += ["-frames:v", str(frames)]
    out = subprocess.run([*cmd, "-f", "framemd5", "-"], capture_output=True, text=True,
                         check=True).stdout
    return [line.rsplit(",", 1)[1].strip() for line in out.splitlines()
            if line and not line.startswith("#")]


@functools.cache
def _source_spans(path: str, frame: float) -> tuple[tuple[float, float, float], ...]:
    """A corpus file's own (video, audio) spans, read once."""
    spans = _spans(path, frame)
    return spans["video"], spans["audio"]


def _spans(path: str, frame: float) -> dict[str, tuple[float, float, float]]:
    """Per stream type: (first presentation time, end of the last frame, longest frame), s.
    Video from its packets, each ``frame`` s long (an encoder may leave their duration
    unset); audio from its decoded frames, as a player plays it (an AAC
    encoder's priming samples count where the container cannot mark them to be skipped)."""
    spans: dict[str, tuple[float, float, float]] = {}

    def add(kind: str, t: float, d: float) -> None:
        lo, hi, longest = spans.get(kind, (t, t + d, d))
        spans[kind] = (min(lo, t), max(hi, t + d), max(longest, d))

    for p in _probe(path, "packet=codec_type,pts_time")["packets"]:
        if p["codec_type"] == "video" and p.get("pts_time") not in (None, "N/A"):
            add("video", float(p["pts_time"]), frame)
    out = subprocess.run(["ffprobe", "-v", "error", "-of", "json", "-select_streams", "a:0",
                          "-show_entries", "stream=sample_rate:frame=pts_time,nb_samples", path],
                         capture_output=True, text=True, check=True)
    audio = json.loads(out.stdout)
    for f in audio.get("frames", []):
        if f.get("pts_time") not in (None, "N/A"):
            rate = int(audio["streams"][0]["sample_rate"])
            add("audio", float(f["pts_time"]), int(f["nb_samples"]) / rate)
    return spans


@dataclass
class Source:
    """A corpus file as the checker sees it: each frame's time (from the file's start, as
    ``-ss`` counts) and number, in presentation order, and its keyframes."""

    spec: Spec
    path: str
    rate: Fraction
    times: list[float]
    numbers: list[int]
    keyframes: list[int]  # frame indexes of the packets marked as keyframes
    rotation: int
    has_audio: bool

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def duration(self) -> float:
        return self.times[-1] + float(1 / self.rate)

    def frames_between(self, start: float, end: float) -> list[int]:
        """The numbers of the frames whose time is in [start, end)."""
        return [n for t, n in zip(self.times, self.numbers, strict=True)
                if start - TOLERANCE <= t < end - TOLERANCE]

    def keyframe_near(self, t: float) -> int:
        """The index of the first keyframe at or after ``t`` s (at least two frames in)."""
        return next(k for k in self.keyframes if k >= 2 and self.times[k] >= t)


def analyse(spec: Spec, path: str) -> Source:
    info = _probe(path, "format=start_time", "stream=codec_type,r_frame_rate",
                  "stream_side_data=rotation")
    file_start = float(info["format"].get("start_time", 0) or 0)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    rotation = int(next((d.get("rotation", 0) for d in video.get("side_data_list", [])
                         if "rotation" in d), 0))
    out = subprocess.run(["ffprobe", "-v", "error", "-of", "json", "-select_streams", "v:0",
                          "-show_entries", "packet=pts_time,flags", path],
                         capture_output=True, text=True, check=True)
    packets = json.loads(out.stdout)["packets"]
    order = sorted((float(p["pts_time"]) - file_start, "K" in p["flags"]) for p in packets)
    decoded = decode(path, rotation)
    if decoded.errors or decoded.returncode or len(decoded.numbers) != len(order):
        raise RuntimeError(f"{path}: the source itself does not decode cleanly "
                           f"({len(decoded.numbers)} frames of {len(order)}): {decoded.errors}")
    if decoded.numbers != list(range(len(order))):
        raise RuntimeError(f"{path}: frame numbers do not read back in order")
    return Source(spec, path, Fraction(video["r_frame_rate"]), [round(t, 6) for t, _ in order],
                  decoded.numbers, [i for i, (_, key) in enumerate(order) if key], rotation,
                  any(s["codec_type"] == "audio" for s in info["streams"]))


_analysed: dict[str, Source] = {}


def generate(folder: str, names: list[str] | None = None) -> dict[str, Source]:
    """The corpus (or the sources called ``names``) in ``folder``, each made there the first
    time it is asked for and analysed once per process."""
    specs = [s for s in SPECS if names is None or s.name in names]
    os.makedirs(folder, exist_ok=True)
    sources = {}
    for spec in specs:
        path = os.path.join(folder, spec.name)
        if path not in _analysed:
            if not os.path.exists(path):
                _make(spec, path)
            _analysed[path] = analyse(spec, path)
        sources[spec.name] = _analysed[path]
    return sources


def session_corpus(tmp_path_factory, names: list[str] | None = None) -> dict[str, Source]:
    """For a fixture of any test module: the corpus under the session's temporary folder,
    each file made once whichever test asks first."""
    return generate(str(tmp_path_factory.getbasetemp() / "corpus"), names)


# --- the checker -----------------------------------------------------------------------------


@dataclass
class Check:
    """What decoding a clip showed, against what its cut asked for. ``errors`` is empty when
    the clip is exact."""

    expected: list[int]  # the source frame numbers the clip must hold, in order
    got: list[int]  # the ones it holds
    audio_start: float | None = None  # audio's first time minus video's, s
    audio_end: float | None = None  # audio's end minus video's, s
    audio_frame: float = 0.0  # the clip's longest audio packet, s
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        first = self.got[0] if self.got else None
        last = self.got[-1] if self.got else None
        text = (f"{len(self.got)} frames ({len(self.expected)} expected), first {first} "
                f"({self.expected[0] if self.expected else None}), last {last} "
                f"({self.expected[-1] if self.expected else None})")
        if self.audio_start is not None:
            text += (f", audio {self.audio_start * 1000:+.1f}/{self.audio_end * 1000:+.1f} ms "
                     f"(frame {self.audio_frame * 1000:.1f} ms)")
        return text


def check(clip: str, source: Source, start: float, length: float | None,
          audio_slack: float = 0.0) -> Check:
    """Decode ``clip`` (cut from ``source`` at ``start`` for ``length`` s, None: to the end)
    and compare it with the source: a clean decode, the exact frames in order (so the first,
    the last, the count, nothing duplicated or dropped), the picture upright as the source's,
    and audio spanning the video's time to within one audio frame (plus ``audio_slack`` s)."""
    end = source.duration if length is None else min(start + length, source.duration)
    expected = source.frames_between(start, end)
    decoded = decode(clip, source.rotation)
    result = Check(expected, decoded.numbers)
    if decoded.returncode or decoded.errors:
        result.errors.append(f"decode (exit {decoded.returncode}): {decoded.errors[:500]}")
    if decoded.numbers != expected:
        dups = len(decoded.numbers) - len(set(decoded.numbers))
        result.errors.append(f"frames: {result.summary()}, {dups} duplicated")
    if length is not None and start + length <= source.duration and \
            abs(len(decoded.numbers) - length * float(source.rate)) >= 1:
        result.errors.append(f"{len(decoded.numbers)} frames for {length} s at "
                             f"{float(source.rate):.3f} fps")
    spans = _spans(clip, float(1 / source.rate))
    if source.has_audio != ("audio" in spans):
        result.errors.append(f"audio: the source {'has' if source.has_audio else 'has no'} "
                             f"audio, the clip {'has' if 'audio' in spans else 'has none'}")
    elif "audio" in spans and "video" in spans:
        (v0, v1, _), (a0, a1, frame) = spans["video"], spans["audio"]
        result.audio_start, result.audio_end, result.audio_frame = a0 - v0, a1 - v1, frame
        bound = frame + audio_slack + TOLERANCE
        short = 0.0
        if length is None or start + length >= source.duration:
            # a clip to the source's end ends its audio where the source's own audio ends
            (_, sv1, _), (_, sa1, _) = _source_spans(source.path, float(1 / source.rate))
            short = max(0.0, sv1 - sa1)
        if abs(a0 - v0) > bound or abs(a1 - v1) > bound + short:
            result.errors.append(f"audio span: {result.summary()}")
    return result
