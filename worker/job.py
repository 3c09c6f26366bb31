"""Turning a queue message into a job, or into a dead letter.

A message is a bare URL (the original producer's format) or a JSON object: one clip, or
with ``clips`` many clips of one source (see ``Job.clips``). ``intake`` is
the one place a worker (and ``clip-supervisor enqueue``) turns raw bytes into a ``Job`` or a
``Rejected`` with a reason, and it never raises, whatever the bytes: a message that could
crash the worker here would be requeued and crash the next one, for ever. ``parse`` is pure:
it never touches the network or the disk, so it can be tested on arbitrary bytes; every way
a message can be wrong raises ``Permanent`` with a distinct reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from .config import MODES, Config
from .errors import Permanent

log = logging.getLogger(__name__)

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
KNOWN_FIELDS = frozenset({"id", "url", "start", "end", "duration", "output", "mode", "format",
                          "callback", "clips"})
# A clip of a multi-clip job: its own range and output, and the job's mode and format unless
# it names its own. A range or an output beside "clips" would be ambiguous (every clip's? a
# default?): it is refused; mode and format there are the clips' defaults.
CLIP_FIELDS = frozenset({"id", "start", "end", "duration", "output", "mode", "format"})
NOT_BESIDE_CLIPS = ("start", "end", "duration", "output")
# container name -> ffmpeg muxer
FORMATS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm", "ts": "mpegts"}
_WHITESPACE = b" \t\n\r\f\v"
# Times: at most ~31 years (ffmpeg counts in int64 microseconds: far inside), and a clip of
# at least 1 ms (ffmpeg is given times to the microsecond; shorter would be no clip at all).
MAX_SECONDS = 1e9
MIN_LENGTH = 0.001
# Linux's NAME_MAX; Cloud Storage's limit on object names (far below Linux's PATH_MAX).
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024


@dataclass(frozen=True)
class Job:
    id: str
    url: str
    start: float
    end: float | None  # None: to the end of the source
    output: str  # file:///abs/path or gs://bucket/key
    mode: str
    format: str
    raw: bytes = field(repr=False)
    warnings: tuple[str, ...] = ()
    callback: str = ""  # a URL the outcome is POSTed to (supervisor.webhooks); "" = none
    # A multi-clip job's clips, in order (empty for a job of one clip): each a Job of its own
    # (``job`` names this one; ``raw`` is the clip as a message of its own, which its dead
    # letter keeps, so that replaying the letter runs that clip alone) or a BadClip.
    clips: tuple[Job | BadClip, ...] = ()
    job: str = ""  # a clip's: the id of the multi-clip job it belongs to

    @property
    def muxer(self) -> str:
        return FORMATS[self.format]


def _new_job(job_id: str, url: str, start: float, end: float | None, output: str, mode: str,
             fmt: str, raw: bytes, warnings: tuple[str, ...], callback: str,
             clips: tuple[Job | BadClip, ...], job: str) -> Job:
    """Job(...) with every field given, made the cheap way: a frozen dataclass's __init__
    sets each field through object.__setattr__, which was a fifth of parsing a message;
    filling the new instance's __dict__ at once makes the same (still frozen) object."""
    new = object.__new__(Job)
    new.__dict__.update(id=job_id, url=url, start=start, end=end, output=output, mode=mode,
                        format=fmt, raw=raw, warnings=warnings, callback=callback,
                        clips=clips, job=job)
    return new


@dataclass(frozen=True)
class BadClip:
    """A clip of a multi-clip job that can never be cut (its range, output, mode or format is
    invalid): dead-lettered as itself, with the reason a job of its own would get, while the
    job's other clips run. ``raw`` is the clip as a message of its own."""

    id: str
    error: Permanent
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class Rejected:
    """A message that can never become a job: dead-letter it under ``id`` with ``error``."""

    id: str
    error: Permanent


def intake(raw: bytes, config: Config) -> Job | Rejected:
    """The job a message asks for, or why it cannot be one. Never raises."""
    try:
        return parse(raw, config)
    except Permanent as exc:
        return Rejected(job_id_of(raw, config.job.max_message_bytes), exc)
    except Exception as exc:  # a parser bug must cost this message, never the worker
        log.exception("the parser failed on a message of %d bytes", len(raw))
        return Rejected(job_id_of(raw, config.job.max_message_bytes),
                        Permanent("parse_error", f"the message could not be parsed "
                                  f"({type(exc).__name__}); see the worker's log"))


def job_id_of(raw: bytes, max_bytes: int = 1 << 20) -> str:
    """The id a message is known by: its JSON object's valid ``id``, else the hex SHA-1 of
    its bytes. Never raises. (Attempts are counted under the SHA-1 in every case, see
    worker.scripts.)"""
    stripped = raw.strip(_WHITESPACE)  # as parse() strips: \f and \v too, unlike JSON
    if len(raw) <= max_bytes and stripped.startswith(b"{"):
        try:
            obj = json.loads(stripped.decode("utf-8"))
        except Exception:  # not UTF-8, not JSON, nested too deep, ...
            obj = None
        if isinstance(obj, dict):
            value = obj.get("id")
            if isinstance(value, str) and ID_RE.fullmatch(value):
                return value
    return hashlib.sha1(raw).hexdigest()


def dead_letter(raw: bytes, job_id: str, reason: str, error: str, attempts: int,
                time: str, keep: int) -> dict[str, object]:
    """The dead-letter record of a message: at most ``keep`` bytes of it (as text, or base64
    when not UTF-8), with its full size and SHA-1, so a huge message costs Redis a bounded
    amount however many arrive."""
    letter: dict[str, object] = {
        "id": job_id, "reason": reason, "attempts": attempts, "error": error[-4000:],
        "time": time, "message_bytes": len(raw), "message_sha1": hashlib.sha1(raw).hexdigest()}
    head = raw[:keep]
    try:
        letter["message"] = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(raw) > keep and exc.start >= len(head) - 3 and exc.end == len(head):
            # cut inside a character: keep the text before it
            letter["message"] = head[:exc.start].decode("utf-8", "replace")
        else:
            letter["message_b64"] = base64.b64encode(head).decode("ascii")
    if len(raw) > keep:
        letter["message_truncated"] = True
    return letter


def parse(raw: bytes, config: Config) -> Job:
    """Turn raw message bytes into a Job, or raise Permanent(reason, error)."""
    _check_size(raw, config)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Permanent("not_utf8",
                        f"message is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    # ASCII whitespace only, like job_id_of: they must agree on the id.
    stripped = text.strip(" \t\n\r\f\v")
    if stripped.startswith(("{", "[", '"')):
        try:
            obj = _loads(stripped)
        except ValueError as exc:
            raise Permanent("invalid_json", f"message is not valid JSON: {exc}") from None
        except RecursionError:
            raise Permanent("invalid_json", "message nests too deeply") from None
        if "\\u" in stripped:
            _check_text(obj)
        if isinstance(obj, str):
            obj = {"url": obj}
        elif not isinstance(obj, dict):
            raise Permanent("invalid_json", "a JSON message must be an object")
    else:
        obj = {"url": stripped}
    return _job(obj, raw, config)


def _check_size(raw: bytes, config: Config) -> None:
    if len(raw) > config.job.max_message_bytes:
        raise Permanent("message_too_large",
                        f"{len(raw)} bytes > max_message_bytes {config.job.max_message_bytes}")


# The C scanner json.loads ends in, called directly: json.loads would first check the type
# and for a byte-order mark, then skip whitespace around the value (parse has stripped it).
_scan = json.JSONDecoder().scan_once


def _loads(text: str) -> object:
    """json.loads(text) for a text with no whitespace around its value: the same object,
    or the same error, raised by json.loads itself (its message names what is wrong)."""
    try:
        obj, end = _scan(text, 0)
    except (StopIteration, ValueError):
        end = -1
    if end != len(text):
        return json.loads(text)  # raises: nothing, or more than one value
    return obj


def _job(obj: dict, raw: bytes, config: Config, url: str | None = None, job: str = "") -> Job:
    """The job a decoded message asks for. ``url``: the message's, already checked (a clip
    of a multi-clip job: its job's url, checked with the job); ``job``: a clip's job."""
    job_id = obj.get("id")
    if job_id is None:
        job_id = hashlib.sha1(raw).hexdigest()
    elif not isinstance(job_id, str) or not ID_RE.fullmatch(job_id):
        raise Permanent("bad_id", "id must be 1-128 characters of [A-Za-z0-9._-]")

    if url is None:
        url = obj.get("url")
        if not isinstance(url, str) or not (url := url.strip()):
            raise Permanent("no_url", "the job has no url")
        _check_source_url(url, config)

    start, end = _range(obj, config)

    mode = obj.get("mode", config.job.mode)
    if mode not in MODES:
        raise Permanent("bad_mode", f"mode must be {', '.join(MODES[:-1])} or {MODES[-1]}")
    fmt = obj.get("format", "mp4")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise Permanent("bad_format", f"format must be one of {', '.join(FORMATS)}")

    warnings: tuple[str, ...] = () if obj.keys() <= KNOWN_FIELDS else tuple(
        f"unknown field {name!r} ignored" for name in sorted(set(obj) - KNOWN_FIELDS))
    if "clips" in obj:
        return _multi(obj, raw, job_id, url, config, warnings)
    output = resolve_output(obj.get("output"), job_id, fmt, config)
    callback = _callback(obj.get("callback"), config)
    return _new_job(job_id, url, start, end, output, mode, fmt, raw, warnings, callback, (), job)


def clip_id(job_id: str, n: int) -> str:
    """The default id of a job's clip number ``n`` (from 1): ``<job id>-<n>``, or, where that
    would be longer than an id may be, the SHA-1 of the job id in its place."""
    name = f"{job_id}-{n}"
    if len(name) > 128:
        name = f"{hashlib.sha1(job_id.encode()).hexdigest()}-{n}"
    return name


def _multi(obj: dict, raw: bytes, job_id: str, url: str, config: Config,
           warnings: tuple[str, ...]) -> Job:
    """A job of many clips of one source. What is wrong with the message as a whole (the
    list, its length, a clip's id) refuses the message; what is wrong with one clip (its
    range, output, mode, format) makes that clip a BadClip, and the others run."""
    specs = obj["clips"]
    if not isinstance(specs, list) or not specs:
        raise Permanent("bad_clips", "clips must be a non-empty list of objects")
    if len(specs) > config.job.max_clips:
        raise Permanent("too_many_clips", f"{len(specs)} clips > max_clips "
                        f"{config.job.max_clips}")
    beside = [name for name in NOT_BESIDE_CLIPS if name in obj]
    if beside:
        raise Permanent("bad_clips", f"{', '.join(beside)} must be given per clip, not "
                        "beside clips")
    callback = _callback(obj.get("callback"), config)
    mode, fmt = obj.get("mode", config.job.mode), obj.get("format", "mp4")
    ids: list[str] = []
    for n, spec in enumerate(specs, 1):
        if not isinstance(spec, dict):
            raise Permanent("bad_clips", f"clip {n} is not an object")
        given = spec.get("id")
        if given is not None and (not isinstance(given, str) or not ID_RE.fullmatch(given)):
            raise Permanent("bad_id", f"clip {n}: id must be 1-128 characters of "
                            "[A-Za-z0-9._-]")
        ids.append(clip_id(job_id, n) if given is None else given)
    seen: set[str] = set()
    for n, cid in enumerate(ids, 1):
        if cid in seen or cid == job_id:
            # Events and letters name a clip by its id: two clips (or a clip and its job)
            # under one name could not be told apart.
            raise Permanent("bad_id", f"clip {n}: id {cid!r} is used twice (clip ids are "
                            "unique within the job, and differ from the job's)")
        seen.add(cid)
    clips: list[Job | BadClip] = []
    outputs: dict[str, str] = {}
    for spec, cid in zip(specs, ids, strict=True):
        own = {"id": cid, "url": url, "mode": mode, "format": fmt}
        own.update((name, spec[name]) for name in CLIP_FIELDS if name in spec)
        if callback:
            own["callback"] = callback
        # (no lone surrogate is left in it: _check_text refused those)
        clip_raw = json.dumps(own, separators=(",", ":"), ensure_ascii=False).encode()
        unknown = tuple(f"clip {cid}: unknown field {name!r} ignored"
                        for name in sorted(set(spec) - CLIP_FIELDS))
        # The very rules of a job of its own: it is one, once its letter is replayed. What
        # parse(clip_raw) would decode is ``own`` itself (a JSON value round-trips), and its
        # url is the job's, checked above: the clip is made from them without the decode.
        try:
            _check_size(clip_raw, config)
            clip = _job(own, clip_raw, config, url, job_id)
        except Permanent as exc:
            clips.append(BadClip(cid, exc, clip_raw))
            warnings += unknown
            continue
        other = outputs.setdefault(clip.output, cid)
        if other != cid:
            clips.append(BadClip(cid, Permanent("output_not_allowed", f"output {clip.output} "
                                                f"is clip {other}'s too"), clip_raw))
        else:
            clips.append(clip)
        warnings += unknown
    # The job's own output, range and format mean nothing: each clip has its own.
    return Job(id=job_id, url=url, start=0.0, end=None, output="", mode=mode, format=fmt,
               raw=raw, warnings=warnings, callback=callback, clips=tuple(clips))


def _callback(value: object, config: Config) -> str:
    """A job's webhook URL: https, or http where private networks are allowed (a test or an
    internal receiver). Its address is checked when it is called, on every attempt."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise Permanent("bad_callback", "callback must be an http(s) URL")
    parts = _split_url(value, "bad_callback", "the callback")
    allowed = ("https", "http") if config.job.allow_private_networks else ("https",)
    if parts.scheme.lower() not in allowed or not parts.hostname:
        raise Permanent("bad_callback", f"callback must be an {' or '.join(allowed)} URL "
                        "with a host")
    if not parts.hostname.isascii():
        raise Permanent("bad_callback", "the callback's host name is not ASCII: give its "
                        "IDNA form (xn--...)")
    return value


def _check_text(obj: object) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"): Python decodes it to a string that
    cannot be encoded again, which would fail every later step. Refuse it here."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Permanent("invalid_json", "the message holds an unpaired surrogate escape "
                        "(\\ud800-\\udfff), which is not text") from None


# What str.isspace() calls whitespace (Unicode included), and the C0 controls and DEL.
_SPACE = re.compile(r"[\s\x00-\x1f\x7f]")


def _split_url(url: str, reason: str, what: str) -> SplitResult:
    """``url``'s parts, or Permanent(reason): too long, whitespace or control characters, a
    port outside 0-65535, or anything else urlsplit refuses."""
    if len(url) > 8192 or _SPACE.search(url):
        raise Permanent(reason, f"{what} is malformed (whitespace or control characters)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port outside 0-65535
    except ValueError as exc:
        raise Permanent(reason, f"{what} is malformed: {exc}") from None
    return parts


# The usual shape of a source URL: scheme://host[:port] then a path, query or fragment, the
# host a plain name or IPv4 address (no user, no brackets, ASCII), no whitespace or
# controls. urlsplit needs no look at such a URL: its scheme and host are the groups.
_PLAIN_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([A-Za-z0-9.-]*)(?::([0-9]{1,5}))?"
                        r"(?:[/?#][^\s\x00-\x1f\x7f]*)?")


def _check_source_url(url: str, config: Config) -> None:
    # The usual URL is accepted here; anything else, or anything in doubt, is left to the
    # full check, which accepts or refuses it with its reason (tests/test_job.py holds the
    # two to the same answers).
    if len(url) <= 8192 and (match := _PLAIN_URL.fullmatch(url)):
        scheme, host, port = match.group(1, 2, 3)
        scheme = scheme.lower()
        if scheme in config.job.allowed_schemes and (port is None or int(port) <= 65535):
            if host and scheme != "file":
                return
            if not host and port is None and scheme == "file" and len(url) > 7 \
                    and url[7] == "/":
                return  # file:///path
    _check_url_fully(url, config)


def _check_url_fully(url: str, config: Config) -> None:
    parts = _split_url(url, "bad_url", "the url")
    scheme = parts.scheme.lower()
    if not scheme:
        raise Permanent("bad_url", "the url has no scheme")
    if scheme not in config.job.allowed_schemes:
        raise Permanent("scheme_not_allowed", f"scheme {scheme!r} is not in allowed_schemes")
    hostname = parts.hostname
    if scheme in ("http", "https", "gs") and not hostname:
        raise Permanent("bad_url", "the url has no host")
    if hostname and not hostname.isascii():
        raise Permanent("bad_url", "the host name is not ASCII: give its IDNA form "
                        "(xn--...)")
    if scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path):
        raise Permanent("bad_url", "a file url must be file:///absolute/path")


def _number(obj: dict, name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    kind = type(value)
    if (kind is int or kind is float) and -MAX_SECONDS <= value <= MAX_SECONDS:
        # The usual number: in range, so finite (NaN and the infinities fail a comparison;
        # Python compares an int with a float exactly, and such an int converts exactly).
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Permanent("bad_range", f"{name} must be a number of seconds")
    try:
        number = float(value)  # a 4,000-digit integer does not fit
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or abs(number) > MAX_SECONDS:
        raise Permanent("bad_range", f"{name} must be a finite number of seconds, at most "
                        f"{MAX_SECONDS:g}")
    return number


def _range(obj: dict, config: Config) -> tuple[float, float | None]:
    start = _number(obj, "start") or 0.0
    end = _number(obj, "end")
    duration = _number(obj, "duration")
    if start < 0:
        raise Permanent("bad_range", "start must be >= 0")
    if end is not None and duration is not None:
        raise Permanent("bad_range", "give end or duration, not both")
    if end is not None:
        if end - start < MIN_LENGTH:
            raise Permanent("bad_range", f"end {end:g} must be at least {MIN_LENGTH:g} s "
                            f"after start {start:g}")
        return start, end
    if duration is not None:
        if duration < MIN_LENGTH:
            raise Permanent("bad_range", f"duration must be at least {MIN_LENGTH:g} s")
        return start, start + duration
    if config.job.default_duration is not None:
        return start, start + config.job.default_duration
    return start, None


# What an output may not hold: ?, #, %, \ and the C0 controls.
_NOT_IN_OUTPUT = re.compile(r"[?#%\\\x00-\x1f]")


def resolve_output(output: object, job_id: str, fmt: str, config: Config) -> str:
    """The absolute output URL of a job, or Permanent('output_not_allowed')."""
    base = config.storage.output_base
    if output is None:
        return f"{base}/{job_id}.{fmt}"
    if not isinstance(output, str) or not output.strip():
        raise Permanent("output_not_allowed", "output must be a non-empty string")
    output = output.strip()
    if "\x00" in output or output.endswith("/"):
        raise Permanent("output_not_allowed", "output must name a file")
    if _NOT_IN_OUTPUT.search(output):
        # URL syntax would cut or decode the name: two jobs could write one file.
        raise Permanent("output_not_allowed", "output may not contain ?, #, %, \\ or controls")
    scheme = urlsplit(output).scheme
    if scheme == "":
        key = posixpath.normpath(output)
        if key.startswith(("/", "..")) or key == ".":
            raise Permanent("output_not_allowed", "a relative output must stay under output_base")
        resolved = f"{base}/{key}"
    elif scheme == "file":
        parts = urlsplit(output)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise Permanent("output_not_allowed", "a file output must be file:///absolute/path")
        resolved = "file://" + posixpath.normpath(parts.path)
    elif scheme == "gs":
        parts = urlsplit(output)
        key = posixpath.normpath(parts.path.lstrip("/")) if parts.path.strip("/") else ""
        if not parts.netloc or not key or key.startswith(".."):
            raise Permanent("output_not_allowed", "a gs output must be gs://bucket/key")
        resolved = f"gs://{parts.netloc}/{key}"
    else:
        raise Permanent("output_not_allowed", f"output scheme {scheme!r} is not supported")
    # (an ASCII URL of at most NAME_MAX characters cannot break either limit: the usual case)
    path = b"" if resolved.isascii() and len(resolved) <= MAX_NAME_BYTES else \
        urlsplit(resolved).path.encode("utf-8", "surrogatepass")
    if len(path) > MAX_PATH_BYTES or any(len(name) > MAX_NAME_BYTES
                                         for name in path.split(b"/")):
        raise Permanent("output_not_allowed", f"output names a path longer than "
                        f"{MAX_PATH_BYTES} bytes or a name longer than {MAX_NAME_BYTES}")
    if not _under(resolved, base) and not any(_under(resolved, root)
                                              for root in config.storage.allowed_outputs):
        raise Permanent("output_not_allowed",
                        "output is outside output_base and allowed_outputs")
    return resolved


def _under(url: str, root: str) -> bool:
    root = root.rstrip("/")
    return url.startswith(root + "/") and len(url) > len(root) + 1
