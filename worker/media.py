"""ffmpeg: cutting a clip out of a source, and checking the source on the way.

ffmpeg runs as an argument list (never a shell), on a local file with a protocol whitelist of
``file``, or on the job's range relay with ``http,tcp`` and every http request routed to the
relay (worker.relay), and with a demuxer whitelist: a crafted input (an HLS playlist, a
concat list, a ``subfile:`` reference) cannot make it read other local files or reach the
network.
ffmpeg runs in its own session so that a timeout or an abort kills its whole process group,
and with a parent-death signal so that it dies with its worker even after a SIGKILL. Its two
pipes are drained with a poll set while it runs, whatever it prints (the seed's Popen pipe
deadlock cannot happen): its ``-progress`` report is parsed as it arrives, its stderr on a
local file in passing (``_pipes``).

A failed run is classified by its cause (``failure``), so that a crashing ffmpeg never blames
the input. Only what ffmpeg says about the input itself is permanent; everything else is
retried. The reasons, first match wins:

- ``ffmpeg_crashed`` (retried): ffmpeg died of a signal (a crash, the OOM killer, a kill from
  outside), seen directly, or as a wrapper shell's exit status 128 + N (read after the
  messages below, since a later ffmpeg's own exit status may look the same).
- ``ffmpeg_missing`` (retried, a host fault): the program could not be started.
- ``ffmpeg_broken`` (retried, a host fault): it was started, but the system's loader could
  not run it (a shared library missing or of the wrong version: exit 127), or a wrapper's
  shell could not execute it (exit 126).
- ``out_of_memory`` (retried): ffmpeg could not allocate memory.
- ``disk_full`` (retried, a host fault): no space left for the clip in work_dir.
- ``fetch_failed`` (retried): reading the input failed (connection refused, reset or timed
  out, an I/O error, an HTTP error answer, or, over HTTP, an end of file before ffmpeg could
  describe the input).
- ``not_video`` (permanent): ffmpeg said the input is not a format it reads (invalid data,
  no ``moov`` atom, a demuxer off the whitelist), or it has no video stream.
- ``past_end`` (permanent): the clip starts at or past the end the input reports.
- ``media_error`` (permanent): after describing its input, ffmpeg failed with an error about
  it (a corrupt packet, a decoding error, codecs the chosen format cannot hold).
- ``ffmpeg_failed`` (retried): any other failure, e.g. an exit with no word on stderr: with
  no evidence against the input, it is not blamed.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from . import preload
from .context import JobContext
from .errors import JobFailed, Permanent, Transient

log = logging.getLogger(__name__)

DEMUXERS = "mov,mp4,m4a,3gp,matroska,webm,avi,flv,mpegts,mpeg,ogg,asf,h264,hevc,m4v"
PROTOCOLS = "file"
RELAY_PROTOCOLS = "http,tcp"  # plain http to the relay on loopback; no file, no https
STDERR_TAIL = 2000

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def set_parent_death_signal(sig: int) -> None:
    """This process gets ``sig`` when the thread that started it dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def die_with_parent() -> None:
    """preexec_fn (or a first call in a child): SIGKILL when the thread that started this
    process dies (a worker, the master)."""
    set_parent_death_signal(signal.SIGKILL)


# Every ffmpeg is started so that the kernel kills it when its worker dies (whatever killed
# the worker): through a prefix that sets the parent-death signal and execs it, cheapest
# first. Measured per start by bench/launch.py (CPU over a bare Popen of ~0.9 ms):
# - die-with-parent (worker/die_with_parent.c, built at install beside this module when a C
#   compiler is there): no C library, three system calls and the exec; within the noise of
#   a bare start;
# - util-linux's `setpriv --pdeathsig KILL --`: +0.7-1.1 ms, the dynamic loader and locale;
# - a preexec_fn that calls prctl: +2-5 ms, as Python must then fork the whole worker (no
#   vfork) and run Python in the child. The last resort.
# A copy clip costs ffmpeg 60-100 ms of CPU, so setpriv's millisecond was 1-1.5 % of it. What
# costs nothing per start loses the guarantee: a master that is a child subreaper and kills
# its dead workers' orphans leaves an ffmpeg running to the end of its cut when master and
# worker die together (a kill of both, the OOM killer taking both).
_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "die-with-parent")
_SETPRIV = shutil.which("setpriv")
_prefix: list[str] | None = None  # what every ffmpeg is started through, once tried


def _works(prefix: list[str]) -> bool:
    """Whether ``prefix`` runs a program (``true``) here: the helper may be built for another
    architecture; setpriv has --pdeathsig from util-linux 2.33 (2018) on."""
    true = shutil.which("true")
    if true is None:
        return False
    try:
        return subprocess.run([*prefix, true], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _death_prefix() -> list[str]:
    """The cheapest prefix that works here, tried once per process; [] for none (then a
    preexec_fn does it)."""
    global _prefix
    if _prefix is None:
        built = os.access(_HELPER, os.X_OK)
        if built and _works([_HELPER]):
            _prefix = [_HELPER]
            return _prefix
        setpriv = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV is not None else []
        _prefix = setpriv if setpriv and _works(setpriv) else []
        log.info("ffmpeg is started through %s, not die-with-parent (%s): slower",
                 _prefix[0] if _prefix else "a preexec_fn",
                 "it does not run here" if built else "not built")
    return _prefix


_programs: dict[str, str] = {}  # name -> path found on PATH


def _program(name: str) -> str:
    """``name``'s path, searched for on PATH once and checked (one stat) at each start."""
    path = _programs.get(name)
    if path is None or not os.access(path, os.X_OK):
        path = shutil.which(name)
        if path is None:
            raise Transient("ffmpeg_missing", f"cannot run {name!r}: not found")
        _programs[name] = path
    return path


def _launcher(cmd: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """The argument list and preexec_fn that start ``cmd`` so that it dies with us."""
    program = _program(cmd[0])
    prefix = _death_prefix()
    if not prefix:
        return [program, *cmd[1:]], die_with_parent
    return [*prefix, program, *cmd[1:]], None


def _environment(argv: list[str], base: dict[str, str] | None) -> dict[str, str] | None:
    """What ``argv`` (from ``_launcher``) starts with: ``base`` (None: ours) with the
    program's start plan (worker.preload), except through setpriv: a dynamic program, which
    LD_PRELOAD would load them all into as well."""
    if argv[0] == _SETPRIV:
        return base
    return preload.env_for(argv[1] if argv[0] == _HELPER else argv[0], base)


def _tail(data: bytes | str, limit: int = STDERR_TAIL) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text.strip()[-limit:]


# How a clip is cut, and why each option is there.
#
# copy: "-ss start" before "-i" seeks to the keyframe at or before `start`, and the clip starts
# there, up to a GOP early (a stream copy cannot start between keyframes); "-t" counts from that
# keyframe. Only keyframe-aligned starts are exact. Nothing below applies to it.
#
# encode is frame-exact: the clip holds the source frames whose time t (counted from the file's
# start, as -ss counts) is in [start, start + length), each once, with their own timestamps.
# - "-ss start-preroll" before "-i", then "-ss preroll" after it: ffmpeg decodes from the
#   keyframe its seek finds and keeps only the frames from `start` on. The preroll is there
#   for the seeks that land too late. An MPEG-TS or MPEG-PS file has no index: its seek
#   searches packet times and takes every packet for a keyframe, so it lands mid-GOP, the
#   decoder drops the frames up to the next keyframe, and the clip started up to a GOP late
#   (its video seconds after its audio); UNINDEXED_PREROLL covers GOPs that long. An MP4's
#   index holds decoding times: with an open GOP (x265's default) its seek may pick a keyframe
#   whose leading frames are shown before it but need the GOP before, and were dropped; a
#   PREROLL of one second covers those.
# - "-fps_mode passthrough": each decoded frame is encoded once. The default for MP4 (cfr)
#   duplicates the first frame when `start` falls between two frames (the gap up to it is
#   "filled"), and so loses the last one to "-t".
# - "-enc_time_base:v -1": frames keep the source's timestamps. By default the encoder counts
#   in 1/fps from `start`, rounding a frame half a frame off the grid up to the next tick (the
#   last frame then falls at start + length and is cut), and 29.97 fps times stored in
#   Matroska's milliseconds round onto one another.
# Audio is cut at `start` and `start + length` to the sample; the video's first frame is the
# first at or after `start`, so the two may start up to one frame apart, as in the source.
PREROLL = 1.0  # seconds
UNINDEXED_PREROLL = 10.0
_UNINDEXED_SUFFIXES = (".ts", ".m2ts", ".mts", ".mpg", ".mpeg", ".vob")


def preroll(name: str, path: str | None = None) -> float:
    """Seconds to decode before a clip's start for a source called ``name`` (a URL or a file
    name), read from the local file ``path`` if there is one: UNINDEXED_PREROLL for MPEG
    transport and program streams, known by their first bytes, or without a local file by the
    name's suffix; PREROLL otherwise."""
    if path is not None:
        try:
            with open(path, "rb") as fh:
                head = fh.read(400)
        except OSError:
            head = b""
        if _unindexed(head):
            return UNINDEXED_PREROLL
        if head:
            return PREROLL
    suffix = name.split("?", 1)[0].split("#", 1)[0].lower()
    return UNINDEXED_PREROLL if suffix.endswith(_UNINDEXED_SUFFIXES) else PREROLL


def _unindexed(head: bytes) -> bool:
    """True for the start of an MPEG-TS (188-byte packets, or 192 in M2TS) or MPEG-PS file."""
    ts = len(head) >= 377 and all(head[i] == 0x47 for i in (0, 188, 376))
    m2ts = len(head) >= 389 and all(head[i] == 0x47 for i in (4, 196, 388))
    return ts or m2ts or head.startswith(b"\x00\x00\x01\xba")


@dataclass(frozen=True)
class Cut:
    """What a clip is: ``length`` seconds (None: to the end) from ``start``, stream copied
    or re-encoded with libx264 at ``preset`` (``mode``), in the container ``muxer``;
    re-encoding decodes from ``preroll`` seconds before ``start`` (see above)."""

    start: float
    length: float | None
    mode: str = "copy"
    muxer: str = "mp4"
    preset: str = "veryfast"
    preroll: float = PREROLL

    @property
    def end(self) -> float | None:
        return None if self.length is None else self.start + self.length


def clip_command(ffmpeg: str, src: str, dst: str, cut: Cut, rw_timeout: float | None = None,
                 ) -> list[str]:
    """The clip's ffmpeg command (the rules above). ``rw_timeout`` (seconds) marks ``src`` as
    the job's range relay (worker.relay), read over HTTP; otherwise it is a local file."""
    # "-v info" makes ffmpeg describe its input (duration, streams) on stderr: that report
    # validates the job in place of a separate ffprobe process (see InputReport).
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-v", "info", "-xerror"]
    if rw_timeout is None:
        cmd += ["-protocol_whitelist", PROTOCOLS]
    else:
        cmd += ["-protocol_whitelist", RELAY_PROTOCOLS, "-rw_timeout", str(int(rw_timeout * 1e6))]
    encode = cut.mode != "copy"
    preroll = min(cut.start, cut.preroll) if encode else 0.0
    cmd += ["-format_whitelist", DEMUXERS, "-ss", f"{cut.start - preroll:.6f}", "-i", src]
    if preroll > 0:
        cmd += ["-ss", f"{preroll:.6f}"]
    if cut.length is not None:
        cmd += ["-t", f"{cut.length:.6f}"]
    cmd += ["-map", "0:v:0", "-map", "0:a:0?", "-sn", "-dn", "-map_metadata", "-1"]
    if encode:
        cmd += ["-fps_mode", "passthrough", "-enc_time_base:v", "-1",
                "-c:v", "libx264", "-preset", cut.preset, "-pix_fmt", "yuv420p",
                "-c:a", "aac", "-b:a", "128k"]
    else:
        cmd += ["-c", "copy", "-avoid_negative_ts", "make_zero"]
    if cut.muxer in ("mp4", "mov"):
        cmd += ["-movflags", "+faststart"]
    cmd += ["-progress", "pipe:1", "-f", cut.muxer, "-y", dst]
    return cmd


@dataclass
class ClipResult:
    out_time: float  # seconds written, as ffmpeg reports them
    size: int  # bytes written, as ffmpeg reports them
    source_duration: float | None  # the input's, from its report
    expected: float  # seconds the clip should last: the cut, within the input's duration
    cut: str = ""  # how it was cut: copy, smart or encode
    reencoded: float = 0.0  # seconds of it re-encoded (all of it in encode mode)


class Feed(Protocol):
    """Where ffmpeg reads a remote source (worker.relay.Relay): the environment that routes
    its requests there, and when bytes last arrived for it."""

    last_activity: float

    def ffmpeg_env(self) -> dict[str, str]: ...


# Messages of ffmpeg's libraries ("[h264 @ 0x55d0c8a3b2c0] error while decoding MB 22 5"),
# and ffmpeg's notes that one was repeated, one after the other: never lines of the report
# on the input. A full head keeps "[...]" in their place, which ends the report as the
# first of them did (InputReport.complete).
_LOG_LINE = re.compile(rb"^(?:(?:\[[^\n]*|[ \t]+Last message repeated \d+ times[ \t\r]*)\n)+",
                       re.M)
_DURATION = re.compile(rb"^\s*Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", re.M)
_VIDEO = re.compile(rb"^\s*Stream #0:\d+.*?: Video: (?!.*attached pic)", re.M)
_INPUT = re.compile(rb"^Input #0,.*$", re.M)
_UNINDENTED = re.compile(rb"^\S", re.M)


@dataclass
class InputReport:
    """What ffmpeg's stderr says about its input, before any frame is written."""

    opened: bool  # "Input #0, <demuxer>, from ..." was printed: the input is a known format
    duration: float | None
    has_video: bool
    # ffmpeg prints the input's description (indented lines under "Input #0") in one go;
    # the next unindented line means it is all there. A process killed mid-description
    # leaves a partial one, which proves nothing about the input (no stream listed yet).
    complete: bool = True

    @classmethod
    def parse(cls, head: bytes) -> InputReport:
        match = _DURATION.search(head)
        duration = None
        if match:
            h, m, sec = match.groups()
            duration = int(h) * 3600 + int(m) * 60 + float(sec)
        opened = _INPUT.search(head)
        return cls(opened=opened is not None, duration=duration,
                   has_video=_VIDEO.search(head) is not None,
                   complete=opened is not None
                   and _UNINDENTED.search(head, opened.end() + 1) is not None)


# What ffmpeg says when the cause lies outside the input. Matched on the stderr tail, in
# ffmpeg's own words (strerror texts and its HTTP messages).
_NO_MEMORY = ("Cannot allocate memory", "Out of memory", "malloc of size")
_NO_SPACE = ("No space left on device", "Disk quota exceeded")
_READ_FAILED = ("Connection refused", "Connection reset", "Connection timed out",
                "Input/output error", "Network is unreachable", "No route to host",
                "Broken pipe", "Server returned")
# What the loader (ld.so) and a shell say when a program cannot run at all
_CANNOT_RUN = ("error while loading shared libraries", "symbol lookup error",
               "cannot execute binary file", "Exec format error")
# What ffmpeg says about the input itself: it is not a format it reads (or may read), or
# it is damaged, or its streams cannot go into the chosen format.
_NOT_MEDIA = ("Invalid data found when processing input", "moov atom not found",
              "could not find codec parameters", "not on whitelist")
_BAD_MEDIA = (*_NOT_MEDIA, "corrupt", "partial file", "Invalid NAL unit",
              "rror while decoding", "decode_slice_header error", "missing picture",
              "Could not write header", "incorrect codec parameters",
              "Could not find tag for codec", "not divisible by")
# sh and bash report a child killed by signal N as exit status 128 + N. Only the signals that
# kill are read so: ffmpeg 5.1 itself exits 0, 1 or 255, but later ones may exit with an
# error code's low byte, which can land in 129-192 as well.
_SHELL_SIGNALS = {128 + s for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT,
                                    signal.SIGILL, signal.SIGTRAP, signal.SIGABRT,
                                    signal.SIGBUS, signal.SIGFPE, signal.SIGKILL,
                                    signal.SIGSEGV, signal.SIGPIPE, signal.SIGALRM,
                                    signal.SIGTERM, signal.SIGXCPU, signal.SIGXFSZ,
                                    signal.SIGSYS)}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _said(tail: str, phrases: tuple[str, ...]) -> bool:
    """True when one of ffmpeg's own messages in ``tail`` holds one of ``phrases``. Its
    messages start at the line's start; indented lines describe the input, whose metadata
    (a title, a comment) is the input's own text and must not pass for ffmpeg's words."""
    return any(phrase in line for line in tail.splitlines() if line[:1].strip()
               for phrase in phrases)


def failure(returncode: int, report: InputReport, tail: str, *, ended: bool, start: float,
            source: str = "") -> JobFailed | None:
    """Why an ffmpeg run failed, or None if it succeeded (see the module docstring).

    ``tail`` is the end of its stderr, ``report`` the description of its input from the head
    of it, ``ended`` whether it printed ``progress=end``, ``source`` the name it was given
    for its input (``-i``): an http:// one is read over the network.
    """
    remote = source.startswith(("http://", "https://"))
    detail = tail or f"ffmpeg exit {returncode}, nothing on stderr"
    # A death by signal first: a process killed before (or while) it describes its input
    # leaves no description, which must not pass for an input that is not a video. setpriv
    # execs ffmpeg, so ffmpeg's own death shows here as a negative return code.
    if returncode < 0:
        return Transient("ffmpeg_crashed", f"ffmpeg was killed by "
                         f"{_signal_name(-returncode)}: {detail}")
    if returncode == 255 and _said(tail, ("received signal",)):  # it caught one and quit
        return Transient("ffmpeg_crashed", detail)
    if returncode in (126, 127) and "failed to execute" in tail:  # the launcher could not exec it
        return Transient("ffmpeg_missing", detail)
    if returncode in (126, 127) and _said(tail, _CANNOT_RUN):
        return Transient("ffmpeg_broken", detail)
    if returncode != 0 and _said(tail, _NO_MEMORY):
        return Transient("out_of_memory", detail)
    if returncode != 0 and _said(tail, _NO_SPACE):
        return Transient("disk_full", detail)
    if returncode != 0 and (_said(tail, _READ_FAILED) or (
            remote and not report.complete and _said(tail, ("End of file",)))):
        return Transient("fetch_failed", detail)
    if returncode in _SHELL_SIGNALS:  # a wrapper script's ffmpeg died of a signal
        return Transient("ffmpeg_crashed", f"ffmpeg was killed by "
                         f"{_signal_name(returncode - 128)}: {detail}")
    if not report.complete:
        if returncode != 0 and _said(tail, _NOT_MEDIA):
            return Permanent("not_video", tail)  # not a format we read (HTML, playlists, ...)
        return Transient("ffmpeg_failed", f"ffmpeg ended without describing its input: "
                         f"{detail}")
    if not report.has_video:
        return Permanent("not_video", "the source has no video stream")
    if report.duration is not None and start >= report.duration:
        # ffmpeg exits 0 here with a bogus clip: refuse it.
        return Permanent("past_end", f"start {start:g} s is at or past the source's "
                         f"end ({report.duration:.3f} s)")
    if returncode == 0 and ended:
        return None
    # ffmpeg names the input when reading it fails ("<input>: corrupt input packet ...")
    if returncode != 0 and (_said(tail, _BAD_MEDIA) or (
            source and _said(tail, (f"{source}: ",)))):
        return Permanent("media_error", tail)
    return Transient("ffmpeg_failed", detail)


class FFmpegRun:
    """One ffmpeg process, watched until it ends, times out, stalls, or is aborted."""

    HEAD_LIMIT = 256 * 1024  # stderr kept from the start: where the input report is

    def __init__(self, cmd: list[str], ctx: JobContext, cut: Cut,
                 feed: Feed | None = None) -> None:
        self.cmd = cmd
        self.ctx = ctx
        self.cut = cut
        # ``feed``: ffmpeg reads the job's relay, which says when bytes last arrived: reading
        # an index or seeking over a slow link is progress too, though ffmpeg reports none
        # before its output starts
        self.feed = feed
        self.head = bytearray()  # grows in place: a flood comes in lines of ~70 bytes
        self.head_full = False  # the head is full of what the report is made of
        self.input: InputReport | None = None
        self.stderr: collections.deque[bytes] = collections.deque(maxlen=64)
        self.report: dict[str, str] = {}
        self.ended = False

    def run(self) -> ClipResult:
        argv, preexec = _launcher(self.cmd)
        env = _environment(argv, None if self.feed is None else self.feed.ffmpeg_env())
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=preexec, env=env)
        except (FileNotFoundError, PermissionError):
            raise Transient("ffmpeg_missing", f"cannot run {self.cmd[0]!r}") from None
        try:
            self._watch(proc)
        finally:
            _reap(proc, self._err)
        # (the report taken when "Output #0" came is the same: the input's description ends
        # before it)
        report = self.input or InputReport.parse(self.head)
        source = _input_of(self.cmd)
        failed = failure(proc.returncode, report, _tail(b"".join(self.stderr)),
                         ended=self.ended, start=self.cut.start, source=source)
        if failed is not None:
            raise failed
        out_time = _out_time(self.report)
        size = int(self.report.get("total_size", "0") or 0)
        return ClipResult(out_time=out_time, size=size, source_duration=report.duration,
                          expected=self.length)

    @property
    def length(self) -> float:
        """The clip's expected length, once known (from the job, or the input report)."""
        start, end = self.cut.start, self.cut.end
        if self.input is None or self.input.duration is None:
            return (end - start) if end is not None else 0.0
        end = self.input.duration if end is None else min(end, self.input.duration)
        return max(0.0, end - start)

    def _watch(self, proc: subprocess.Popen) -> None:
        pending = b""
        last_mark: tuple[str, str] = ("", "")
        progress = _Progress("ffmpeg", "clipping")  # moves with its -progress report only
        # Read through the relay, the input report is the moment the fetch stage ends: its
        # stderr is read as it comes. On a local file, in passing (see _pipes).
        for is_stdout, chunk in _pipes(proc, self.ctx, self.feed, progress,
                                       stderr_as_it_comes=self.feed is not None):
            if not is_stdout:
                # (only the chunk just kept, and the 8 bytes before it, can hold it now)
                if self._err(chunk) and b"Output #0" in self.head[-len(chunk) - 8:]:
                    # ffmpeg has read its input's index: clipping proper starts
                    self.input = InputReport.parse(self.head)
                    self.ctx.stage("clip")
            else:
                pending = self._parse(pending + chunk)
                mark = (self.report.get("out_time_us", ""), self.report.get("total_size", ""))
                if mark != last_mark:
                    last_mark, progress.at = mark, time.monotonic()

    def _err(self, chunk: bytes) -> bool:
        """Keep a chunk of stderr: in the tail, and in the head while it has room (True).
        A full head drops the messages of ffmpeg's libraries first (a damaged stream makes
        its decoder log thousands while ffmpeg probes it, before the report on the input
        comes): only when what is left still fills it is the rest of stderr kept in the
        tail alone."""
        self.stderr.append(chunk)
        if self.input is not None:  # the report was found: the head has done its work
            return False
        if len(self.head) >= self.HEAD_LIMIT:
            if self.head_full:
                return False
            self.head = bytearray(_LOG_LINE.sub(b"[...]\n", self.head))
            if len(self.head) >= self.HEAD_LIMIT // 2:  # too little room made: stop here
                self.head_full = True
                return False
        self.head += chunk
        return True

    def _parse(self, data: bytes) -> bytes:
        """Take in ffmpeg's -progress lines (``key=value``, each report ending with
        ``progress=continue`` or ``progress=end``); returns the unfinished last line."""
        lines, newline, rest = data.rpartition(b"\n")
        if not newline:
            return data
        for line in lines.decode("ascii", "replace").split("\n"):
            key, sep, value = line.partition("=")
            if not sep:
                continue
            key, value = key.strip(), value.strip()
            self.report[key] = value
            if key == "progress":
                self.ended = value == "end"
                percent = 100.0 if self.ended else min(
                    99.9, 100.0 * _out_time(self.report) / self.length if self.length else 0)
                self.ctx.on_progress(percent, self.report.get("speed", ""))
        return rest


@dataclass
class _Progress:
    """When a watched process (``name``, doing ``doing``) last showed progress."""

    name: str
    doing: str
    at: float = field(default_factory=time.monotonic)


def _pipes(proc: subprocess.Popen, ctx: JobContext, feed: Feed | None,
           progress: _Progress, stderr_as_it_comes: bool = True,
           ) -> Iterator[tuple[bool, bytes]]:
    """``proc``'s output as it comes, (True, chunk) from stdout and (False, chunk) from
    stderr, until stdout closes (and stderr, when it is read as it comes), whatever it
    prints (no pipe can fill and block it for long). Between reads: the job's abort and
    deadline (``ctx.check``), and ``stalled`` once neither ``progress.at`` (the caller
    moves it) nor the feed's last byte moved for the job's stall_timeout. Raising leaves
    ``proc`` to the caller (``_reap``).

    Without ``stderr_as_it_comes``, stderr is read in passing: whenever the loop wakes for
    something else (stdout, the waker, its tick of at most a second), before what woke it
    is handed on. ffmpeg writes its report on its input in ~80 small writes, and a pipe the
    loop waits on wakes it (and costs ffmpeg the wake-up) for each: ~1.5 ms of CPU in all
    per copy clip, 2-3 % of it (docs/PERFORMANCE.md, 4.1). A process that fills half the
    pipe between two wakes is read as it comes from then on, so a flood of messages holds
    it up for one tick at most; what is left when stdout closes is read by ``_reap``."""
    assert proc.stdout is not None and proc.stderr is not None
    # A poll set, not a selector: nothing to open and close per run (an epoll set costs
    # five system calls), and a plain fd -> what it is map.
    poller = select.poll()
    what: dict[int, bool | None] = {proc.stdout.fileno(): True, ctx.waker.fileno(): None}
    passing: int | None = None  # stderr's descriptor while it is read in passing
    if stderr_as_it_comes:
        what[proc.stderr.fileno()] = False
    else:
        passing = proc.stderr.fileno()
        os.set_blocking(passing, False)
    for fd in what:
        poller.register(fd, select.POLLIN)
    open_pipes = len(what) - 1
    stall_timeout = ctx.limits.stall_timeout
    while open_pipes:
        now = time.monotonic()
        if feed is not None:
            progress.at = max(progress.at, feed.last_activity)
        ctx.check(progress.doing)
        if now - progress.at > stall_timeout:
            raise Transient("stalled", f"{progress.name} made no progress for "
                            f"{stall_timeout:g} s")
        timeout = max(0.0, min(ctx.deadline, progress.at + stall_timeout) - now)
        ready = poller.poll(min(timeout, 1.0) * 1000)  # ms, rounded up
        if passing is not None:
            read = 0
            for chunk in _drain(passing):
                read += len(chunk)
                yield False, chunk
            if read >= _FLOOD:  # read it as it comes from now on
                what[passing] = False
                poller.register(passing, select.POLLIN)
                open_pipes += 1
                passing = None
        for fd, _ in ready:  # POLLIN, or POLLHUP once the writer closed: read gives b""
            data = what[fd]
            if data is None:
                ctx.waker.drain()
                continue
            chunk = os.read(fd, 65536)
            if chunk:
                yield data, chunk
            else:
                poller.unregister(fd)
                open_pipes -= 1


_FLOOD = 32 * 1024  # bytes of stderr between two wakes: half of a pipe's default size


def _drain(fd: int) -> Iterator[bytes]:
    """What a non-blocking pipe holds now, to its end of file if the writer closed it."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        yield chunk


def _reap(proc: subprocess.Popen, stderr: Callable[[bytes], None] | None = None) -> None:
    """Kill what is left of ``proc``'s process group, wait for it, close its pipes; hand
    ``stderr`` what its stderr still holds (read without blocking: a process that left
    the group may hold it open)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if stderr is not None and proc.stderr is not None:
        os.set_blocking(proc.stderr.fileno(), False)
        for chunk in _drain(proc.stderr.fileno()):
            stderr(chunk)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


PROBE_OUTPUT_LIMIT = 16 << 20  # bytes of ffprobe's JSON: ~130,000 packets (Python holds ~10x)


def capture(cmd: list[str], ctx: JobContext, feed: Feed | None = None,
            limit: int = PROBE_OUTPUT_LIMIT, quiet: bool = False) -> str:
    """Run a helper of the cut (ffprobe) to its end under ffmpeg's rules: started so that it
    dies with the worker, in its own session, killed when the job's deadline passes, when
    it is aborted, or when neither its output nor the feed moves for ``stall_timeout``.
    Returns its stdout; raises RuntimeError with the end of its stderr when it fails or
    prints more than ``limit`` bytes (the caller falls back to a plain cut, whose own run
    says why the source is bad); with ``quiet``, also when it says anything on stderr."""
    argv, preexec = _launcher(cmd)
    env = _environment(argv, None if feed is None else feed.ffmpeg_env())
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=preexec, env=env)
    except (FileNotFoundError, PermissionError):
        raise Transient("ffmpeg_missing", f"cannot run {cmd[0]!r}") from None
    out = bytearray()
    err: collections.deque[bytes] = collections.deque(maxlen=16)
    name = os.path.basename(cmd[0])
    progress = _Progress(name, "probing the source")  # any output is progress
    try:
        for is_stdout, chunk in _pipes(proc, ctx, feed, progress):
            progress.at = time.monotonic()
            if not is_stdout:
                err.append(chunk)
                continue
            out += chunk
            if len(out) > limit:
                raise RuntimeError(f"{name} printed more than {limit} bytes")
    finally:
        _reap(proc)
    if proc.returncode != 0 or (quiet and err):
        raise RuntimeError(f"{os.path.basename(cmd[0])} exit {proc.returncode}: "
                           f"{_tail(b''.join(err))}")
    return out.decode("utf-8", "replace")


def _input_of(cmd: list[str]) -> str:
    """The input ffmpeg is given in ``cmd`` (the argument after ``-i``), or ""."""
    for flag, value in zip(cmd, cmd[1:], strict=False):
        if flag == "-i":
            return value
    return ""


def _out_time(report: dict[str, str]) -> float:
    # out_time_ms is in microseconds too, despite its name.
    for key in ("out_time_us", "out_time_ms"):
        value = report.get(key, "")
        if value.lstrip("-").isdigit():
            return max(0.0, int(value) / 1e6)
    return 0.0
