"""Smart cut: a frame-exact clip that re-encodes only the frames it must, and copies the rest.

A stream copy can only start on a keyframe, and only end where the frames shown before the
end do not depend on frames after it. So a clip of [start, end) is cut in up to three
pieces, joined into one stream:

- head, [start, K): re-encoded, from the clip's first frame up to K, the first keyframe at
  or after ``start``;
- body, [K, X): stream copied, packet for packet, from K to X, the last point before ``end``
  where the source's decoding order can be cut: every packet before it is shown before X,
  every one after it at or after X (a B-frame shown before ``end`` may need a frame after
  it: such frames cannot be copied without showing too much);
- tail, [X, end): re-encoded, a few frames at most (a B-frame group); none when ``end`` falls
  on such a point (always without B-frames, or at the source's end).

Audio spans the video's own time: from its first frame to the end of its last
(``Plan.after``). It is stream copied where the container takes its codec (``AUDIO_COPY``:
AAC, MP3, AC-3, E-AC-3, and Opus, Vorbis, FLAC where they fit): a copy keeps whole audio
frames (1024 samples for AAC), so it starts and ends within one audio frame of the video.
Other codecs are re-encoded to AAC over the clip (encoding 30 s of audio costs ~0.4 s of
CPU, a fifth of a smart clip's).

What makes the join decodable, and why (a decoder sees one stream, with no reset):

- The keyframe K of an open GOP (x265's CRA) is followed in decoding order
  by frames shown before it that need the GOP before it ("leading" frames). The head
  re-encodes them, and the body drops their packets (``noise`` filter: a packet shown
  before K): the frames after K never refer to them.
- Each piece carries its parameter sets in-band at its first keyframe (``dump_extra``, after
  ``h264_mp4toannexb``/``hevc_mp4toannexb`` for the copied source): the body's are the
  source's own, which replace the head's when the body starts. The head and tail are
  encoded with the source's codec, profile, pixel format, size, sample aspect ratio and
  colour properties, so a player set up from the head's finds the same kind of stream.
- The head and tail are encoded without B-frames, so a decoder has shown every head frame
  before the body's first one arrives. Their decoding times are moved back by the
  source's reorder delay, so that decoding times rise across each join.

Sources that cannot be joined so fall back to ``encode`` with a reason (``Fallback``),
before anything is written: a codec other than H.264 or HEVC, interlaced video, a pixel
format or profile the encoder cannot match, a rotated source for a container with no
display matrix (Matroska, MPEG-TS), no keyframe inside the clip; an H.264 open GOP (its
keyframes are recovery points, not IDR pictures: the frames after one carry reference
marking that names pictures before it, which a decoder entering there reports as errors);
and, for now, MPEG-TS/PS sources (no index: the copy's first packet and the pieces' times
are not yet matched there).

Everything the source is read for goes through the same whitelists as encode mode
(worker.media): the source is untrusted. The pieces are trusted temporary files of ours,
joined with the concat demuxer with ``file`` as the only protocol.

Keyframe positions come from ffprobe, around the start and around the end only
(``-read_intervals``): with an index (MP4, Matroska) it seeks there, so a clip from a long
remote source reads about its own share of the file.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from . import media

CODECS = {"h264": "libx264", "hevc": "libx265"}
# Pixel formats the encoders here write as the source has them
PIX_FMTS = {"h264": ("yuv420p", "yuvj420p", "yuv422p", "yuv444p", "yuv420p10le"),
            "hevc": ("yuv420p", "yuv420p10le", "yuv422p", "yuv444p")}
X264_PROFILES = {"constrained baseline": "baseline", "baseline": "baseline", "main": "main",
                 "high": "high", "high 10": "high10", "high 4:2:2": "high422",
                 "high 4:4:4 predictive": "high444"}
X265_PROFILES = {"main": "main", "main 10": "main10", "rext": None}
DISPLAY_MATRIX_MUXERS = ("mp4", "mov")
PROBE_WINDOW = 6.0  # s after the start searched for a keyframe first; then the whole clip
TOLERANCE = 1e-6  # s: times are printed and parsed to the microsecond
END_MARGIN = 1.0  # s read past the end: packets shown before it may be decoded after it
AUDIO_CODEC = ["-c:a", "aac", "-b:a", "128k"]
# Audio codecs copied as they are into each container (ffmpeg's muxers take them); any
# other is encoded with AUDIO_CODEC.
_COMMON_AUDIO = ("aac", "mp3", "ac3", "eac3")
AUDIO_COPY = {"mp4": (*_COMMON_AUDIO, "opus"), "mov": _COMMON_AUDIO,
              "matroska": (*_COMMON_AUDIO, "opus", "vorbis", "flac"),
              "mpegts": (*_COMMON_AUDIO, "opus")}


class Fallback(Exception):
    """The source cannot be cut this way: cut it in encode mode instead, for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        # the clip's frame times (see ``frame_times``) when the source was probed: encode
        # mode needs them too
        self.times: tuple[float, float | None] | None = None


@dataclass(frozen=True)
class Packet:
    """A video packet of the source, in decoding order: its presentation time (s, from the
    file's start, as ``-ss`` counts), its decoding time (None if the container has none)
    and whether it is a keyframe."""

    pts: float
    dts: float | None
    key: bool


@dataclass(frozen=True)
class Video:
    """The source's video stream, as ffprobe describes it."""

    codec: str
    profile: str = ""
    level: int = 0
    width: int = 0
    height: int = 0
    pix_fmt: str = ""
    sar: str = ""
    field_order: str = "progressive"
    color_range: str = ""
    color_space: str = ""
    color_transfer: str = ""
    color_primaries: str = ""
    rate: Fraction = Fraction(25)
    rotation: int = 0
    time_base: Fraction = Fraction(1, 90000)


@dataclass(frozen=True)
class Probe:
    """What ffprobe read of the source: its video, whether it has audio, its length, and
    the video packets read around the start and around the end, in decoding order (with a
    gap between the two, where the clip is long)."""

    video: Video
    audio: bool
    duration: float | None
    packets: tuple[Packet, ...]
    indexed: bool = True  # the container has an index (not MPEG-TS/PS)
    audio_codec: str = ""  # the first audio stream's codec, "" without audio
    # the keyframe where the copy would start is an H.264 picture that is not IDR (an
    # open GOP's recovery point), None when not known
    open_keyframe: bool | None = None


@dataclass(frozen=True)
class Plan:
    """How a clip is cut (see the module docstring): [start, keyframe) re-encoded,
    [keyframe, copy_end) copied (None: to the source's end; the keyframe's leading frames
    dropped), [copy_end, end) re-encoded. ``end`` None: to the source's end."""

    start: float
    end: float | None
    keyframe: float
    copy_end: float | None
    delay: float  # how far the source's decoding runs ahead of presentation, s
    # where the copy's first packet is picked: ffmpeg's stream copy starts at the first
    # keyframe decoded at or after a time; a little before the keyframe's decoding time,
    # after the one before it
    pick: float
    first: float  # the time of the clip's first frame (at or just after ``start``)
    # Where the re-encoded pieces begin and end reading frames: halfway between the clip's
    # first frame and the one before it, and between its last and the one after it. A
    # frame shown within a microsecond of ``start`` or ``end`` is then counted as ``-ss``
    # and ``-t`` would count it, whatever the rounding of each.
    begin: float
    stop: float | None
    video: Video
    audio: bool
    muxer: str = "mp4"
    preroll: float = media.PREROLL
    # the time of the first frame shown at or after ``end`` (where the clip's last frame
    # ends): the audio spans [first, after), the video's time. None: to the source's end.
    after: float | None = None
    audio_codec: str = ""

    @property
    def audio_copied(self) -> bool:
        """The audio is stream copied (``AUDIO_COPY``), not re-encoded."""
        return self.audio and self.audio_codec in AUDIO_COPY.get(self.muxer, ())

    @property
    def head(self) -> float:
        """Seconds re-encoded before the keyframe (0: the clip starts on it)."""
        return self.keyframe - self.start if self.first < self.keyframe - TOLERANCE else 0.0

    @property
    def tail(self) -> float:
        """Seconds re-encoded after the copy (0: the copy reaches the end)."""
        if self.end is None or self.copy_end is None or self.copy_end >= self.end - TOLERANCE:
            return 0.0
        return self.end - self.copy_end

    @property
    def copied(self) -> float:
        end = self.copy_end if self.copy_end is not None else self.end
        return 0.0 if end is None else max(0.0, end - self.keyframe)

    @property
    def reencoded(self) -> float:
        return self.head + self.tail


@dataclass
class SmartResult:
    reencoded_seconds: float
    copied_seconds: float
    cut: str = "smart"
    commands: list[list[str]] = field(default_factory=list)


# --- planning (pure) -----------------------------------------------------------------------


def check_source(video: Video, muxer: str) -> None:
    """Raise Fallback when no clip of this video can be joined safely into ``muxer``."""
    if video.codec not in CODECS:
        raise Fallback(f"no encoder here matches the source's codec ({video.codec})")
    if video.field_order not in ("progressive", "unknown", ""):
        raise Fallback(f"interlaced video ({video.field_order})")
    if video.pix_fmt not in PIX_FMTS[video.codec]:
        raise Fallback(f"pixel format {video.pix_fmt} cannot be matched")
    profiles = X264_PROFILES if video.codec == "h264" else X265_PROFILES
    if profiles.get(video.profile.lower()) is None:
        raise Fallback(f"{video.codec} profile {video.profile!r} cannot be matched")
    if video.codec == "hevc" and muxer == "mpegts":
        # ffmpeg's HEVC decoder, reading MPEG-TS, shows the copied frames after a re-encoded
        # head out of order (non-monotonic times, frames lost); MP4 and Matroska are clean
        raise Fallback("HEVC into MPEG-TS: the joined stream does not decode cleanly")
    if video.rotation and muxer not in DISPLAY_MATRIX_MUXERS:
        raise Fallback(f"a rotated source ({video.rotation} degrees) into {muxer}, "
                       "which has no display matrix")


def plan(probe: Probe, start: float, length: float | None, muxer: str = "mp4",
         preroll: float = media.PREROLL) -> Plan:
    """The cut of [start, start + length) (None: to the end) from the source ``probe``
    describes; raises Fallback(reason) when it must be re-encoded whole."""
    check_source(probe.video, muxer)
    if not probe.indexed:
        raise Fallback("a source without an index (MPEG-TS/PS): its timestamps are not "
                       "matched across the join yet")
    if probe.open_keyframe:
        raise Fallback("an H.264 open GOP: its keyframes are not IDR pictures, and the "
                       "frames after one refer to pictures before it")
    end = None if length is None else start + length
    if end is not None and probe.duration is not None and end >= probe.duration:
        end = None
    slack = float(1 / probe.video.rate) / 4  # times are printed to the microsecond
    packets = probe.packets
    k = next((i for i, p in enumerate(packets) if p.key and p.pts >= start - TOLERANCE),
             None)
    if k is None or (end is not None and packets[k].pts >= end - TOLERANCE):
        raise Fallback("no keyframe inside the clip: it is re-encoded whole")
    key = packets[k]
    copy_end = None
    if end is not None:
        last = max(i for i, p in enumerate(packets) if p.key and p.pts < end - TOLERANCE)
        copy_end = cut_point(packets[last:], key.pts, end, slack)
        if copy_end <= key.pts + TOLERANCE:
            raise Fallback("no frame of the clip can be copied")
    # how far decoding runs ahead of presentation at the keyframe (its own decoding time
    # may be unknown: Matroska stores none)
    gop_end = next((i for i in range(k + 1, len(packets)) if packets[i].key), len(packets))
    delay = max((p.pts - p.dts for p in packets[k:gop_end] if p.dts is not None),
                default=0.0)
    pick = (key.dts if key.dts is not None else key.pts - delay) - slack
    before = [p for p in packets[:k] if p.key]
    if before:
        pick = max(pick, (before[-1].dts if before[-1].dts is not None else
                          before[-1].pts - delay) + slack)
    times = sorted(p.pts for p in packets)
    first = min((t for t in times if t >= start - TOLERANCE), default=key.pts)
    begin = max((t for t in times if t < first), default=first - 2 * slack)
    stop = after = None
    if end is not None:
        last = max(t for t in times if t < end - TOLERANCE)
        after = min((t for t in times if t > last), default=last + 4 * slack)
        stop = (last + after) / 2
    return Plan(start, end, key.pts, copy_end, delay, pick, first, (begin + first) / 2, stop,
                probe.video, probe.audio, muxer, preroll, after, probe.audio_codec)


def cut_point(run: list[Packet] | tuple[Packet, ...], keyframe: float, end: float,
              slack: float) -> float:
    """The latest time X <= ``end`` at which the packets of ``run`` (decoding order, from a
    keyframe at or before the end) split into those shown before X, all first, and those
    shown from X on: the copy ends there. Packets shown before ``keyframe`` are the leading
    frames of the clip's first keyframe, re-encoded with the head: they are not copied."""
    shown = [p.pts for p in run if p.pts >= keyframe - slack]
    later = [float("inf")] * (len(shown) + 1)  # the earliest shown from each packet on
    for i in range(len(shown) - 1, -1, -1):
        later[i] = min(later[i + 1], shown[i])
    best = later[0]  # nothing of the run copied
    highest = float("-inf")
    for n, pts in enumerate(shown, 1):
        highest = max(highest, pts)
        if highest >= end - TOLERANCE:
            break
        if highest < later[n] - slack:
            best = later[n]
    return min(best, end)


# --- probing -------------------------------------------------------------------------------


def _input(src: str, seek: float | None, rw_timeout: float | None) -> list[str]:
    """The options that open the (untrusted) source with the whitelists of encode mode,
    seeking to ``seek`` s (from the file's start) if given."""
    if rw_timeout is None:
        args = ["-protocol_whitelist", media.PROTOCOLS]
    else:
        args = ["-protocol_whitelist", media.RELAY_PROTOCOLS,
                "-rw_timeout", str(int(rw_timeout * 1e6))]
    args += ["-format_whitelist", media.DEMUXERS]
    if seek is not None:
        args += ["-ss", f"{max(0.0, seek):.6f}"]
    return [*args, "-i", src]


_STREAM_ENTRIES = ("index,codec_type,codec_name,profile,level,width,height,pix_fmt,"
                   "sample_aspect_ratio,field_order,color_range,color_space,color_transfer,"
                   "color_primaries,r_frame_rate,time_base")


def probe_command(ffprobe: str, src: str, intervals: str,
                  rw_timeout: float | None = None) -> list[str]:
    """ffprobe reading the source's streams and the packets within ``intervals`` (its
    ``-read_intervals``, absolute times): with an index, it seeks to the keyframe at or
    before each interval's start."""
    return [ffprobe, "-hide_banner", "-v", "error", "-of", "json", "-show_entries",
            f"format=start_time,duration:stream={_STREAM_ENTRIES}:stream_side_data=rotation"
            ":packet=stream_index,pts_time,dts_time,flags", "-read_intervals", intervals,
            *_input(src, None, rw_timeout)]


def _number(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def parse_probe(out: str) -> tuple[Video, str, float, float | None, list[Packet]]:
    """ffprobe's JSON: the video, the audio's codec ("" for none), the file's start time, its
    duration, and
    the video packets it read, in decoding order, each once."""
    info = json.loads(out)
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    if video is None:
        raise Fallback("the source has no video stream")
    rotation = next((int(d["rotation"]) for d in video.get("side_data_list", [])
                     if "rotation" in d), 0)
    rate = Fraction(video.get("r_frame_rate", "25/1") or "25/1")
    v = Video(codec=video.get("codec_name", ""), profile=video.get("profile", ""),
              level=int(video.get("level", 0) or 0), width=int(video.get("width", 0)),
              height=int(video.get("height", 0)), pix_fmt=video.get("pix_fmt", ""),
              sar=video.get("sample_aspect_ratio", ""),
              field_order=video.get("field_order", "progressive"),
              color_range=video.get("color_range", ""),
              color_space=video.get("color_space", ""),
              color_transfer=video.get("color_transfer", ""),
              color_primaries=video.get("color_primaries", ""),
              rate=rate if rate > 0 else Fraction(25), rotation=rotation,
              time_base=Fraction(video.get("time_base", "1/90000") or "1/90000"))
    fmt = info.get("format", {})
    origin = _number(fmt.get("start_time")) or 0.0
    duration = _number(fmt.get("duration"))
    packets: list[Packet] = []
    seen: set[float] = set()  # intervals may overlap: each packet once
    for p in info.get("packets", []):
        pts, dts = _number(p.get("pts_time")), _number(p.get("dts_time"))
        if p.get("stream_index") != video.get("index") or pts is None or pts in seen:
            continue
        seen.add(pts)
        packets.append(Packet(round(pts - origin, 6),
                              None if dts is None else round(dts - origin, 6),
                              "K" in p.get("flags", "")))
    audio = next((s.get("codec_name") or "unknown" for s in streams
                  if s.get("codec_type") == "audio"), "")
    return v, audio, origin, duration, packets


Runner = Callable[[list[str]], str]  # runs a command to its end, returns its stdout


def run_command(cmd: list[str], env: dict[str, str] | None = None,
                timeout: float = 600.0) -> str:
    """The default runner: the command's stdout; a failure raises RuntimeError with the
    end of its stderr."""
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip()[-media.STDERR_TAIL:]
        raise RuntimeError(f"{os.path.basename(cmd[0])} exit {proc.returncode}: {tail}")
    return proc.stdout.decode("utf-8", "replace")


def probe(src: str, start: float, length: float | None, *, ffprobe: str = "ffprobe",
          preroll: float = media.PREROLL, rw_timeout: float | None = None,
          runner: Runner = run_command) -> Probe:
    """Read what ``plan`` needs of the source: its streams, and its video packets from a
    little before ``start`` to the first keyframe after it, and around the clip's end.
    A source without an index (``preroll`` is media.UNINDEXED_PREROLL) is asked its start
    time first: its times may start anywhere, and the intervals are absolute."""
    origin = _origin(src, ffprobe, preroll, rw_timeout, runner)
    end = None if length is None else start + length
    before = preroll if preroll > media.PREROLL else 0.0  # an index seeks to a keyframe
    window = start + PROBE_WINDOW
    if end is None:
        intervals = [(start - before, window)]
    elif end - before > window:
        intervals = [(start - before, window), (end - before, end + END_MARGIN)]
    else:
        intervals = [(start - before, end + END_MARGIN)]

    def read(spans: list[tuple[float, float]]) -> tuple[Video, str, float | None,
                                                        list[Packet]]:
        text = ",".join(f"{max(0.0, a + origin):.6f}%{b + origin:.6f}" for a, b in spans)
        video, audio, _, duration, packets = parse_probe(
            runner(probe_command(ffprobe, src, text, rw_timeout)))
        return video, audio, duration, packets

    video, audio, duration, packets = read(intervals)
    if len(intervals) > 1 and not any(p.key and start <= p.pts < window for p in packets):
        # no keyframe in the window after the start: read the whole clip
        video, audio, duration, packets = read([(start - before, end + END_MARGIN)])
    open_keyframe = None
    key = next((p for p in packets if p.key and p.pts >= start), None)
    if video.codec == "h264" and key is not None and preroll <= media.PREROLL:
        cmd = probe_command(ffprobe, src, f"{key.pts + origin:.6f}%+#1", rw_timeout)
        cmd[cmd.index("-show_entries") + 1] = "packet=flags,data"
        text = runner([*cmd[:-2], "-select_streams", "v:0", "-show_data", *cmd[-2:]])
        kind = nal_kind(text)
        open_keyframe = None if kind is None else kind != H264_IDR
    return Probe(video, bool(audio), duration, tuple(packets), indexed=preroll <= media.PREROLL,
                 open_keyframe=open_keyframe, audio_codec=audio)


def _origin(src: str, ffprobe: str, preroll: float, rw_timeout: float | None,
            runner: Runner) -> float:
    """The source's start time when it has no index (``-read_intervals`` takes absolute
    times, and such a file's may start anywhere); 0 otherwise, where it needs no probe."""
    if preroll <= media.PREROLL:
        return 0.0
    return parse_probe(runner(probe_command(ffprobe, src, "%+#1", rw_timeout)))[2]


SNAP_WINDOW = 0.5  # s read past the start and the end for their frames (more than a B-frame delay)


def snap(src: str, start: float, length: float | None, *, ffprobe: str = "ffprobe",
         preroll: float = media.PREROLL, rw_timeout: float | None = None,
         runner: Runner = run_command) -> tuple[float, float | None] | None:
    """Encode mode's frame times: the first frame shown at or after ``start``, and the
    first at or after ``start + length`` (None: the clip runs to the source's end), read
    from the video packets around each (with an index, ffprobe seeks there). None when no
    frame is found from ``start`` on: ffmpeg's own run then says why.

    A source without an index is read from ``preroll`` s before the start (a seek there
    may land late), around the start only: the end's frame follows from the frame rate
    (MPEG-TS counts in 90 kHz ticks, exact for the usual rates), where a second seek back
    would cost another preroll."""
    origin = _origin(src, ffprobe, preroll, rw_timeout, runner)
    unindexed = preroll > media.PREROLL
    before = preroll if unindexed else 0.0
    spans = [(start - before, start + SNAP_WINDOW)]
    end = None if length is None else start + length
    if end is not None and not unindexed:
        spans.append((end - before, end + SNAP_WINDOW))
    text = ",".join(f"{max(0.0, a + origin):.6f}%{b + origin:.6f}" for a, b in spans)
    video, _, _, _, packets = parse_probe(runner(probe_command(ffprobe, src, text,
                                                               rw_timeout)))
    times = frame_times([p.pts for p in packets], start, None if unindexed else end)
    if times is None or not unindexed or end is None:
        return times
    first, frame = times[0], 1 / video.rate
    return first, first + math.ceil((end - first) / frame - 1e-6) * float(frame)


def frame_times(times: list[float], start: float,
                end: float | None) -> tuple[float, float | None] | None:
    """Of the frame ``times`` read around the start and the end: the first at or after
    ``start``, and the first at or after ``end`` (None: none, the clip runs to the source's
    end); None when no frame is at or after ``start``."""
    first = min((t for t in times if t >= start - TOLERANCE), default=None)
    if first is None:
        return None
    after = None if end is None else min((t for t in times if t >= end - TOLERANCE),
                                         default=None)
    return first, after


H264_IDR, H264_SLICE = 5, 1


def nal_kind(probe_json: str) -> int | None:
    """The NAL unit type of the first H.264 slice in the first packet of ffprobe's JSON
    (``-show_data``): 5 for an IDR picture, 1 for any other; None if none is found.
    Matroska and MP4 store NAL units behind 4-byte lengths, MPEG-TS behind start codes."""
    packets = json.loads(probe_json).get("packets", [])
    if not packets:
        return None
    data = bytearray()
    for line in packets[0].get("data", "").splitlines():
        hexpart = line.partition(":")[2][:40]
        data += bytes.fromhex(hexpart.replace(" ", ""))
    types = []
    if data[:3] == b"\0\0\1" or data[:4] == b"\0\0\0\1":
        i = data.find(b"\0\0\1")
        while i >= 0 and i + 3 < len(data):
            types.append(data[i + 3] & 0x1F)
            i = data.find(b"\0\0\1", i + 3)
    else:
        i = 0
        while i + 4 < len(data):
            size = int.from_bytes(data[i:i + 4], "big")
            types.append(data[i + 4] & 0x1F)
            i += 4 + size
    return next((t for t in types if t in (H264_IDR, H264_SLICE)), None)


# --- cutting -------------------------------------------------------------------------------

# The video pieces: MPEG-TS keeps both timestamps of every packet (90 kHz, exact for the
# usual rates) and carries parameter sets in-band. The audio piece: NUT, which holds PCM,
# or Matroska for a copied stream (any codec).
SEGMENT = "mov"
AUDIO_SEGMENT = "nut"


def _audio_piece(plan: Plan) -> tuple[str, str]:
    """The audio piece's format and file name."""
    return ("matroska", "audio.mka") if plan.audio_copied else \
        (AUDIO_SEGMENT, f"audio.{AUDIO_SEGMENT}")


def _encoder(plan: Plan, preset: str) -> list[str]:
    """Encoder options for the re-encoded pieces: the source's codec, profile, pixel
    format and colour properties (size and sample aspect ratio come with the frames),
    without B-frames (see the module docstring)."""
    v = plan.video
    if v.codec == "h264":
        args = ["-c:v", "libx264", "-preset", preset, "-profile:v",
                X264_PROFILES[v.profile.lower()], "-bf", "0"]
        if v.level > 0:
            args += ["-level:v", f"{v.level / 10:g}"]
    else:
        args = ["-c:v", "libx265", "-preset", preset, "-profile:v",
                X265_PROFILES[v.profile.lower()] or "main",
                "-x265-params", "bframes=0:log-level=error"]
    args += ["-pix_fmt", v.pix_fmt]
    for option, value in (("-color_range", v.color_range), ("-colorspace", v.color_space),
                          ("-color_trc", v.color_transfer),
                          ("-color_primaries", v.color_primaries)):
        if value and value != "unknown":
            args += [option, value]
    return args


def cut_command(plan: Plan, src: str, folder: str, *, ffmpeg: str = "ffmpeg",
                preset: str = "veryfast", rw_timeout: float | None = None) -> list[str]:
    """One ffmpeg run that writes the pieces into ``folder``: body.nut (the copied video),
    head.nut and tail.nut (re-encoded, when there are such), audio.nut (the clip's audio,
    decoded: it is encoded once, in the join). It reads the source from a little before
    the start to the end once for the body and the audio, and again around the head's and
    the tail's frames to decode them."""
    slack = float(1 / plan.video.rate) / 4
    preroll = min(plan.start, plan.preroll)
    base = plan.start - preroll
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-v", "info", "-xerror", "-y",
           *_input(src, base, rw_timeout)]
    head = plan.head > 0
    head_preroll = round(min(plan.begin, plan.preroll), 6)
    head_seek = round(plan.begin - head_preroll, 6)
    if head:
        cmd += ["-noautorotate", *_input(src, head_seek, rw_timeout)]
    tail_start = plan.copy_end if plan.copy_end is not None else 0.0
    tail = plan.tail > 0
    tail_preroll = min(tail_start, plan.preroll)
    # the tail from just before its first frame; its end is the clip's, to the microsecond
    # ffmpeg counts in (the seek, the output's start and length add up to it exactly)
    tail_seek = round(max(0.0, tail_start - slack - tail_preroll), 6)
    tail_preroll = round(min(tail_preroll, tail_start - slack), 6)
    if tail:
        cmd += ["-noautorotate", *_input(src, tail_seek, rw_timeout)]
    common = ["-sn", "-dn", "-map_metadata", "-1", "-map_chapters", "-1"]
    # the pieces count in the source's time base: the filters' times and the muxer's agree
    video = [*common, "-video_track_timescale", str(plan.video.time_base.denominator)]
    # body: the first keyframe from (just before) the keyframe on; then only the packets
    # shown in [keyframe, copy_end): the keyframe's leading frames are the head's
    bsf = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}[plan.video.codec]
    drop = "lt(pts\\,startpts)"
    stop = []
    if plan.copy_end is not None:
        # every packet shown before copy_end is decoded before it
        last = plan.copy_end - slack if plan.tail > 0 else (plan.stop or plan.copy_end)
        drop += f"+gte((pts-startpts)*tb\\,{last - plan.keyframe:.6f})"
        stop = ["-t", f"{plan.copy_end - plan.pick + 8 * slack:.6f}"]
    cmd += ["-map", "0:v:0", "-ss", f"{plan.pick - base:.6f}", *stop,
            "-c:v", "copy", "-bsf:v", f"{bsf},dump_extra,noise=drop={drop}", *video,
            "-f", SEGMENT, os.path.join(folder, f"body.{SEGMENT}")]
    if plan.audio:
        # the video's time: from its first frame to the end of its last (media.Cut.snapped);
        # a copy keeps the audio packets from there on, so it starts and ends within one
        # audio frame of the video
        length = [] if plan.after is None else ["-t", f"{plan.after - plan.first:.6f}"]
        codec = ["-c:a", "copy"] if plan.audio_copied else ["-c:a", "pcm_s16le"]
        cmd += ["-map", "0:a:0", "-ss", f"{plan.first - base:.6f}", *length, *codec,
                "-vn", *common, "-f", _audio_piece(plan)[0],
                os.path.join(folder, _audio_piece(plan)[1])]
    shift = round(plan.delay * 1e6)
    encoder = _encoder(plan, preset)
    if head:
        cmd += ["-map", "1:v:0", "-ss", f"{head_preroll:.6f}",
                "-t", f"{plan.keyframe - slack - plan.begin:.6f}",
                "-fps_mode", "passthrough", "-enc_time_base:v", "-1", *encoder,
                "-bsf:v", f"dump_extra,setts=dts=DTS-{shift}/1000000/TB", "-an", *video,
                "-f", SEGMENT, os.path.join(folder, f"head.{SEGMENT}")]
    if tail:
        cmd += ["-map", f"{2 if head else 1}:v:0", "-ss", f"{tail_preroll:.6f}",
                "-t", f"{(plan.stop or 0.0) - tail_seek - tail_preroll:.6f}",
                "-fps_mode", "passthrough",
                "-enc_time_base:v", "-1", *encoder, "-bsf:v", "dump_extra", "-an", *video,
                "-f", SEGMENT, os.path.join(folder, f"tail.{SEGMENT}")]
    return [*cmd, "-progress", "pipe:1"]


def concat_list(plan: Plan, folder: str) -> str:
    """The concat demuxer's list of the pieces, each placed by the length of those before
    it, from the clip's first frame (time 0 of the clip, as for its audio)."""
    lines = ["ffconcat version 1.0"]
    if plan.head > 0:
        lines += [f"file head.{SEGMENT}", f"duration {plan.keyframe - plan.first:.6f}"]
    lines += [f"file body.{SEGMENT}"]
    if plan.tail > 0:
        lines += [f"duration {plan.copied:.6f}", f"file tail.{SEGMENT}"]
    path = os.path.join(folder, "pieces.ffconcat")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def join_command(plan: Plan, folder: str, dst: str, *, ffmpeg: str = "ffmpeg") -> list[str]:
    """The pieces (trusted files of ours: ``file`` and our own formats only) joined into
    ``dst``: video copied, audio copied or encoded (``Plan.audio_copied``)."""
    local = ["-protocol_whitelist", "file"]
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-v", "info", "-xerror",
           *local, "-format_whitelist", f"concat,{SEGMENT}", "-f", "concat", "-safe", "0",
           "-i", concat_list(plan, folder)]
    maps = ["-map", "0:v:0"]
    if plan.audio:
        fmt, name = _audio_piece(plan)
        cmd += [*local, "-format_whitelist", fmt, "-i", os.path.join(folder, name)]
        maps += ["-map", "1:a:0", *(["-c:a", "copy"] if plan.audio_copied else AUDIO_CODEC)]
    cmd += [*maps, "-c:v", "copy", "-map_metadata", "-1"]
    if plan.video.rotation:
        cmd += ["-metadata:s:v:0", f"rotate={plan.video.rotation}"]
    if plan.muxer in ("mp4", "mov"):
        cmd += ["-movflags", "+faststart"]
    return [*cmd, "-progress", "pipe:1", "-f", plan.muxer, "-y", dst]


CHECK_MARGIN = 0.5  # s decoded past the head's join, and before the tail's


def check_commands(plan: Plan, clip: str, *, ffmpeg: str = "ffmpeg") -> list[list[str]]:
    """ffmpeg runs that decode the joined ``clip`` across each join, from the start through
    the first copied GOP's start, and from before the tail to the end, with ``-v error
    -xerror``: a clean join says nothing. None for a clip with no join (all copied)."""
    base = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-v", "error", "-xerror",
            "-protocol_whitelist", "file", "-format_whitelist", media.DEMUXERS]
    out = ["-map", "0:v:0", "-f", "null", "-"]
    cmds = []
    if plan.head > 0:
        cmds.append([*base, "-i", clip, "-t",
                     f"{plan.keyframe - plan.first + CHECK_MARGIN:.6f}", *out])
    if plan.tail > 0 and plan.copy_end is not None:
        seek = max(0.0, plan.copy_end - plan.first - CHECK_MARGIN)
        cmds.append([*base, "-ss", f"{seek:.6f}", "-i", clip, *out])
    return cmds


def run(plan: Plan, src: str, dst: str, folder: str, *, ffmpeg: str = "ffmpeg",
        preset: str = "veryfast", rw_timeout: float | None = None,
        runner: Runner = run_command) -> SmartResult:
    """Cut ``plan``'s clip of ``src`` into ``dst``, with its pieces in ``folder`` (the
    caller's, removed by the caller)."""
    cut = cut_command(plan, src, folder, ffmpeg=ffmpeg, preset=preset, rw_timeout=rw_timeout)
    runner(cut)
    join = join_command(plan, folder, dst, ffmpeg=ffmpeg)
    runner(join)
    return SmartResult(round(plan.reencoded, 6), round(plan.copied, 6), "smart", [cut, join])
