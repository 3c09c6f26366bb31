"""Parsing a queue message into a job (SPEC section 3).

A message is a bare URL (the original producer's format) or a JSON object. Parsing is pure:
it never touches the network or the disk, so it can be tested on arbitrary bytes. Every way
a message can be wrong raises ``Permanent`` with a distinct reason; nothing else escapes.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .config import Config
from .errors import Permanent

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
KNOWN_FIELDS = frozenset({"id", "url", "start", "end", "duration", "output", "mode", "format"})
# container name -> ffmpeg muxer
FORMATS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm", "ts": "mpegts"}
_WHITESPACE = b" \t\n\r\f\v"


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

    @property
    def muxer(self) -> str:
        return FORMATS[self.format]


def job_id_of(raw: bytes) -> str:
    """The id used for accounting; must agree with the Lua ``job_id`` in worker.scripts."""
    if raw.lstrip(_WHITESPACE).startswith(b"{"):
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("id"), str) \
                and ID_RE.fullmatch(obj["id"]):
            return obj["id"]
    return hashlib.sha1(raw).hexdigest()


def parse(raw: bytes, config: Config) -> Job:
    """Turn raw message bytes into a Job, or raise Permanent(reason, error)."""
    if len(raw) > config.job.max_message_bytes:
        raise Permanent("message_too_large",
                        f"{len(raw)} bytes > max_message_bytes {config.job.max_message_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Permanent("not_utf8",
                        f"message is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    # ASCII whitespace only, like job_id_of and the Lua scripts: they must agree on the id.
    stripped = text.strip(" \t\n\r\f\v")
    if stripped.startswith(("{", "[", '"')):
        try:
            obj = json.loads(stripped)
        except ValueError as exc:
            raise Permanent("invalid_json", f"message is not valid JSON: {exc}") from None
        except RecursionError:
            raise Permanent("invalid_json", "message nests too deeply") from None
        if isinstance(obj, str):
            obj = {"url": obj}
        elif not isinstance(obj, dict):
            raise Permanent("invalid_json", "a JSON message must be an object")
    else:
        obj = {"url": stripped}

    job_id = obj.get("id")
    if job_id is None:
        job_id = hashlib.sha1(raw).hexdigest()
    elif not isinstance(job_id, str) or not ID_RE.fullmatch(job_id):
        raise Permanent("bad_id", "id must be 1-128 characters of [A-Za-z0-9._-]")

    url = obj.get("url")
    if not isinstance(url, str) or not url.strip():
        raise Permanent("no_url", "the job has no url")
    url = url.strip()
    _check_source_url(url, config)

    start, end = _range(obj, config)

    mode = obj.get("mode", config.job.mode)
    if mode not in ("copy", "encode"):
        raise Permanent("bad_mode", "mode must be copy or encode")
    fmt = obj.get("format", "mp4")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise Permanent("bad_format", f"format must be one of {', '.join(FORMATS)}")

    output = resolve_output(obj.get("output"), job_id, fmt, config)
    warnings = tuple(f"unknown field {name!r} ignored"
                     for name in sorted(set(obj) - KNOWN_FIELDS))
    return Job(id=job_id, url=url, start=start, end=end, output=output, mode=mode,
               format=fmt, raw=raw, warnings=warnings)


_SPACE = re.compile(r"\s")  # what str.isspace() calls whitespace, Unicode included


def _check_source_url(url: str, config: Config) -> None:
    if len(url) > 8192 or _SPACE.search(url):
        raise Permanent("bad_url", "the url is malformed")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise Permanent("bad_url", f"the url is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise Permanent("bad_url", "the url has no scheme")
    if scheme not in config.job.allowed_schemes:
        raise Permanent("scheme_not_allowed", f"scheme {scheme!r} is not in allowed_schemes")
    if scheme in ("http", "https", "gs") and not parts.hostname:
        raise Permanent("bad_url", "the url has no host")
    if scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path):
        raise Permanent("bad_url", "a file url must be file:///absolute/path")


def _number(obj: dict, name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Permanent("bad_range", f"{name} must be a finite number of seconds")
    return float(value)


def _range(obj: dict, config: Config) -> tuple[float, float | None]:
    start = _number(obj, "start") or 0.0
    end = _number(obj, "end")
    duration = _number(obj, "duration")
    if start < 0:
        raise Permanent("bad_range", "start must be >= 0")
    if end is not None and duration is not None:
        raise Permanent("bad_range", "give end or duration, not both")
    if end is not None:
        if end <= start:
            raise Permanent("bad_range", f"end {end:g} must be after start {start:g}")
        return start, end
    if duration is not None:
        if duration <= 0:
            raise Permanent("bad_range", "duration must be > 0")
        return start, start + duration
    if config.job.default_duration is not None:
        return start, start + config.job.default_duration
    return start, None


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
    if any(ch in output for ch in "?#%\\") or any(ord(ch) < 32 for ch in output):
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
    if not any(_under(resolved, root) for root in (base, *config.storage.allowed_outputs)):
        raise Permanent("output_not_allowed",
                        "output is outside output_base and allowed_outputs")
    return resolved


def _under(url: str, root: str) -> bool:
    root = root.rstrip("/")
    return url.startswith(root + "/") and len(url) > len(root) + 1
