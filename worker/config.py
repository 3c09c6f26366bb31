"""Configuration: one INI file, every key overridable from the environment.

Both the worker and the supervisor read the same file, so the loader lives here (the worker
never imports the supervisor). Every value is parsed and checked when the file is loaded, so
a bad value fails at start with a message naming its key, never later inside a job.

Precedence, lowest first: built-in defaults, the INI file, ``CLIP_SUPERVISOR_<SECTION>_<KEY>``
environment variables, then explicit overrides (the CLI flags).

A misspelled name is an error, never a silent default: an unknown section or key in the file
stops the start, and so does a ``CLIP_SUPERVISOR_*`` variable that names no key (an operator
who sets ``CLIP_SUPERVISOR_REDIS_URI`` would otherwise run against the default Redis).
``NOT_KEYS`` lists the few variables of that prefix that are not keys.
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .fsafe import default_work_dir

DEFAULT_PATH = "/etc/clip-supervisor.conf"
# The documented sample, every key with its default: etc/ beside worker/ in a checkout, and
# in the installed package too (setup.cfg ships it there as package data).
SAMPLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "etc", "clip-supervisor.conf")
ENV_PREFIX = "CLIP_SUPERVISOR_"
# Variables with our prefix that are not configuration keys: the init script's pointer to
# its defaults file (etc/init.d/clip-supervisor drops it before starting the daemon, but an
# operator's shell may export it to every command).
NOT_KEYS = frozenset({"CLIP_SUPERVISOR_DEFAULTS"})


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the key."""


# --- value parsers: each takes the raw string and returns the typed value or raises ValueError


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("expected a positive number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("expected a number >= 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("expected an integer >= 1")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


_SIZE_UNITS = {"": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
               "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def _size(raw: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", raw)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a size such as 1048576, 512KiB, 1MiB or 2GiB")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value < 1:
        raise ValueError("expected a size >= 1 byte")
    return value


def _size_or_zero(raw: str) -> int:
    return 0 if raw.strip() == "0" else _size(raw)


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _workers(raw: str) -> int:
    if raw.strip().lower() in ("auto", ""):
        return os.cpu_count() or 1
    return _positive_int(raw)


def _optional_duration(raw: str) -> float | None:
    return None if raw.strip() == "" else _positive_float(raw)


def _str_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _schemes(raw: str) -> tuple[str, ...]:
    schemes = tuple(s.lower() for s in _str_list(raw))
    unknown = set(schemes) - {"http", "https", "gs", "file"}
    if unknown:
        raise ValueError(f"unknown scheme(s) {', '.join(sorted(unknown))}; "
                         "allowed: http, https, gs, file")
    return schemes


# How a clip may be cut (worker.media, worker.smartcut): keyframe-aligned stream copy,
# frame-exact with only the GOP ends re-encoded, frame-exact re-encoded whole.
MODES = ("copy", "smart", "encode")


def _mode(raw: str) -> str:
    if raw not in MODES:
        raise ValueError(f"expected {', '.join(MODES)}")
    return raw


def _pipeline(raw: str) -> str:
    if raw not in ("ffmpeg", "noop"):
        raise ValueError("expected ffmpeg or noop")
    return raw


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected debug, info, warning or error")
    return level


def _prefix(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", raw):
        raise ValueError("expected 1-64 characters of [A-Za-z0-9._:-]")
    return raw


def _redis_url(raw: str) -> str:
    scheme = urlsplit(raw).scheme
    if scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster",
                      "redis+sentinel", "rediss+sentinel"):
        raise ValueError("expected a redis://, rediss://, unix://, redis+cluster:// or "
                         "redis+sentinel:// URL")
    return raw


def _abs_path(raw: str) -> str:
    if not os.path.isabs(raw):
        raise ValueError("expected an absolute path")
    return os.path.normpath(raw)


def _work_dir(raw: str) -> str:
    return default_work_dir() if raw.strip() == "" else _abs_path(raw)


def _optional_path(raw: str) -> str:
    return "" if raw.strip() == "" else _abs_path(raw)


def _output_base(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not os.path.isabs(parts.path):
            raise ValueError("expected file:///absolute/path")
        return "file://" + os.path.normpath(parts.path)
    if parts.scheme == "gs":
        if not parts.netloc:
            raise ValueError("expected gs://bucket[/prefix]")
        return raw.rstrip("/")
    raise ValueError("expected a file:///absolute/path or gs://bucket/prefix URL")


def _outputs(raw: str) -> tuple[str, ...]:
    return tuple(_output_base(item) for item in _str_list(raw))


def _listen(raw: str) -> str:
    raw = raw.strip()
    if raw == "":
        return ""
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9187")
    return raw


def _text(raw: str) -> str:
    return raw.strip()


def _host_id(raw: str) -> str:
    # Worker ids are "<host_id>:<pid>:<start-ms>" and key names hold them: no colon, no space.
    value = raw.strip()
    if value and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError("1-64 characters of [A-Za-z0-9._-] (no colon: worker ids are "
                         "host_id:pid:start)")
    return value


def _opt(parser: Callable[[str], Any], default: str, doc: str = "") -> Any:
    return field(default=None, metadata={"parser": parser, "default": default, "doc": doc})


@dataclass
class SupervisorConfig:
    workers: int = _opt(_workers, "auto", "worker processes; auto = one per CPU")
    host_id: str = _opt(_host_id, "", "identity of this host in worker ids; default hostname")
    pidfile: str = _opt(_optional_path, "",
                        "empty: none in the foreground, /run/clip-supervisor.pid as a daemon")
    logfile: str = _opt(_optional_path, "", "empty = standard error")
    log_level: str = _opt(_log_level, "info")
    graceful_timeout: float = _opt(_positive_float, "30")
    heartbeat_interval: float = _opt(_positive_float, "2")
    heartbeat_ttl: float = _opt(_positive_float, "10")
    max_jobs_per_worker: int = _opt(_non_negative_int, "0", "0 = unlimited")
    max_worker_memory_mb: int = _opt(_non_negative_int, "0", "0 = unlimited")
    min_uptime: float = _opt(_positive_float, "2",
                             "a worker that dies sooner counts as a failed start")
    restart_backoff_max: float = _opt(_positive_float, "30")
    max_start_failures: int = _opt(_non_negative_int, "10", "failed starts in a row before a "
                                   "worker slot is FATAL (HUP or TTIN revives it); 0 = never")


@dataclass
class RedisConfig:
    url: str = _opt(_redis_url, "redis://127.0.0.1:6379/0")
    prefix: str = _opt(_prefix, "clips")
    socket_timeout: float = _opt(_positive_float, "5")
    block_timeout: float = _opt(_positive_float, "1",
                                "seconds an idle worker blocks in BLMOVE per call")


@dataclass
class JobConfig:
    work_dir: str = _opt(_work_dir, "", "empty = /var/lib/clip-supervisor/work as root, else "
                         "$XDG_CACHE_HOME/clip-supervisor or ~/.cache/clip-supervisor")
    timeout: float = _opt(_positive_float, "900")
    stall_timeout: float = _opt(_positive_float, "60")
    max_attempts: int = _opt(_positive_int, "3")
    retry_backoff: float = _opt(_non_negative_float, "5")
    retry_backoff_max: float = _opt(_non_negative_float, "600")
    default_duration: float | None = _opt(_optional_duration, "")
    mode: str = _opt(_mode, "smart")
    pipeline: str = _opt(_pipeline, "ffmpeg")
    ffmpeg: str = _opt(_text, "ffmpeg")
    ffprobe: str = _opt(_text, "ffprobe")
    fast_start: bool = _opt(_bool, "true", "start ffmpeg and ffprobe with the libraries "
                            "their loader's lookups end in preloaded (the same bindings, "
                            "checked; worker.preload)")
    encode_preset: str = _opt(_text, "veryfast")
    allowed_schemes: tuple[str, ...] = _opt(_schemes, "http,https,gs")
    allow_private_networks: bool = _opt(_bool, "false")
    max_source_bytes: int = _opt(_size, "2GiB")
    max_message_bytes: int = _opt(_size, "1MiB")
    max_clips: int = _opt(_positive_int, "100", "most clips one job may hold; a message with "
                          "more is dead-lettered (too_many_clips)")
    connect_timeout: float = _opt(_positive_float, "10")
    range_requests: bool = _opt(_bool, "true", "read http(s) and gs sources in place with "
                                "Range requests when their server supports them")
    cache_max_bytes: int = _opt(_size_or_zero, "2GiB",
                                "whole sources kept on this host for more clips; 0 = off")
    cache_dir: str = _opt(_optional_path, "", "empty = <work_dir>/cache")
    job_ttl: float = _opt(_positive_float, "604800", "seconds {prefix}:job:<id> hashes live")
    done_max: int = _opt(_positive_int, "10000", "length cap of the {prefix}:done list")
    dead_max: int = _opt(_positive_int, "20000", "length cap of the {prefix}:dead list "
                         "(oldest letters dropped)")
    events_max: int = _opt(_positive_int, "100000", "approximate length cap of the "
                           "{prefix}:events stream (XADD MAXLEN ~): a consumer group down "
                           "longer than the pool takes to write this many events loses the "
                           "oldest")
    dead_message_bytes: int = _opt(_size, "16KiB", "how much of a message a dead letter keeps "
                                   "(its size and SHA-1 are always kept)")

    @property
    def cache_folder(self) -> str:
        """The source cache's folder: ``cache_dir``, or ``<work_dir>/cache``."""
        return self.cache_dir or os.path.join(self.work_dir, "cache")


# Google Cloud Storage constraints that the client library imposes.
GCS_CHUNK_QUANTUM = 256 * 1024  # a resumable chunk must be a multiple of this
GCS_MULTIPART_MAX = 8 * 1024 * 1024  # the client makes every larger upload resumable


def _chunk_size(raw: str) -> int:
    value = _size(raw)
    if value % GCS_CHUNK_QUANTUM:
        raise ValueError("expected a multiple of 256KiB (262144 bytes), e.g. 8MiB")
    return value


def _resumable_threshold(raw: str) -> int:
    value = _size(raw)
    if value > GCS_MULTIPART_MAX:
        raise ValueError("expected at most 8MiB: the client uploads anything larger "
                         "in a resumable session whatever this says")
    return value


def _key_file(raw: str) -> str:
    # Checked here so that a wrong path fails at start, naming the key, instead of
    # dead-lettering every gs:// job later.
    path = _optional_path(raw)
    if path and not os.path.isfile(path):
        raise ValueError("expected the path of a service-account key file (JSON); "
                         "no such file")
    return path


@dataclass
class StorageConfig:
    output_base: str = _opt(_output_base, "file:///var/lib/clip-supervisor/clips")
    allowed_outputs: tuple[str, ...] = _opt(_outputs, "")
    credentials_file: str = _opt(_key_file, "",
                                 "service-account key (JSON) for gs://; empty = Application "
                                 "Default Credentials (STORAGE_EMULATOR_HOST: none needed)")
    gcs_connect_timeout: float = _opt(_positive_float, "5",
                                      "seconds to connect to Cloud Storage, per request")
    gcs_timeout: float = _opt(_positive_float, "60",
                              "seconds to wait for each Cloud Storage response")
    gcs_retry_deadline: float = _opt(_positive_float, "30",
                                     "seconds a Cloud Storage call retries 429/5xx/network "
                                     "errors before the attempt fails (retried with backoff)")
    resumable_threshold: int = _opt(_resumable_threshold, "8MiB",
                                    "clips larger than this upload in a resumable session; "
                                    "at most 8MiB")
    upload_chunk_size: int = _opt(_chunk_size, "8MiB",
                                  "bytes per request of a resumable upload (held in memory); "
                                  "a multiple of 256KiB")
    cache_control: str = _opt(_text, "", "Cache-Control of stored objects; empty = none")


@dataclass
class MetricsConfig:
    listen: str = _opt(_listen, "")
    auth_token: str = _opt(_text, "",
                           "token for the dashboard's actions (retry, purge); empty = read-only")


def _webhook_url(raw: str) -> str:
    if raw == "":
        return ""
    parts = urlsplit(raw)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an https:// URL (http:// where [job] "
                         "allow_private_networks is true), or nothing")
    return raw


def _secret(raw: str) -> str:
    if raw and (len(raw) < 16 or re.search(r"\s", raw)):
        raise ValueError("expected at least 16 characters without spaces "
                         "(e.g. openssl rand -hex 32), or nothing")
    return raw


@dataclass
class NotifyConfig:
    url: str = _opt(_webhook_url, "", "webhook called for jobs that name no callback; "
                    "empty = none")
    secret: str = _opt(_secret, "", "key of the X-Clip-Signature HMAC; empty = no webhook "
                       "is called")
    max_age: float = _opt(_positive_float, "86400", "seconds a webhook is retried before it "
                          "is given up")
    timeout: float = _opt(_positive_float, "10", "seconds one webhook call may take")
    concurrency: int = _opt(_positive_int, "4", "webhook calls in flight at once")


@dataclass
class Config:
    supervisor: SupervisorConfig
    redis: RedisConfig
    job: JobConfig
    storage: StorageConfig
    metrics: MetricsConfig
    notify: NotifyConfig
    path: str | None = None

    @property
    def host_id(self) -> str:
        return self.supervisor.host_id or socket.gethostname()


_SECTIONS: dict[str, type] = {
    "supervisor": SupervisorConfig,
    "redis": RedisConfig,
    "job": JobConfig,
    "storage": StorageConfig,
    "metrics": MetricsConfig,
    "notify": NotifyConfig,
}


def options() -> list[tuple[str, str, str, str]]:
    """Every (section, key, default, doc), for docs and tests."""
    return [(name, f.name, f.metadata["default"], f.metadata["doc"])
            for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


def default_path() -> str | None:
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None


def load(path: str | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, str] | None = None) -> Config:
    """Load and validate. ``overrides`` maps ``"section.key"`` to a raw string (CLI flags)."""
    env = os.environ if env is None else env
    parser = configparser.ConfigParser(interpolation=None)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                parser.read_file(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid INI: {exc}") from exc
        for section in parser.sections():
            if section not in _SECTIONS:
                raise ConfigError(f"{path}: unknown section [{section}]")
            known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
            for key in parser[section]:
                if key not in known:
                    raise ConfigError(f"{path}: unknown key [{section}] {key}")
    _check_environment(env)
    overrides = overrides or {}
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        values = {}
        for f in dataclasses.fields(cls):
            env_name = f"{ENV_PREFIX}{name.upper()}_{f.name.upper()}"
            raw, origin = f.metadata["default"], "default"
            if parser.has_option(name, f.name):
                raw, origin = parser.get(name, f.name), path
            if env_name in env:
                raw, origin = env[env_name], f"environment {env_name}"
            if f"{name}.{f.name}" in overrides:
                raw, origin = overrides[f"{name}.{f.name}"], "command line"
            try:
                values[f.name] = f.metadata["parser"](raw.strip())
            except ValueError as exc:
                detail = str(exc) if "expected" in str(exc) else f"invalid value ({exc})"
                raise ConfigError(
                    f"[{name}] {f.name} = {raw!r} (from {origin}): {detail}") from exc
        sections[name] = cls(**values)
    config = Config(path=path, **sections)
    _check_consistency(config)
    return config


def env_names() -> list[str]:
    """The environment variable of every key, ``CLIP_SUPERVISOR_<SECTION>_<KEY>``."""
    return [f"{ENV_PREFIX}{section.upper()}_{key.upper()}" for section, key, _, _ in options()]


def _check_environment(env: Mapping[str, str]) -> None:
    known = set(env_names()) | NOT_KEYS
    unknown = sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in known)
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, sorted(known - NOT_KEYS), n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]}?)" if close else \
        f" (expected {ENV_PREFIX}<SECTION>_<KEY> of a configuration key)"
    more = f"; {len(unknown) - 1} more: {', '.join(unknown[1:])}" if len(unknown) > 1 else ""
    raise ConfigError(f"unknown environment variable {name}{hint}{more}")


def _check_consistency(config: Config) -> None:
    sup = config.supervisor
    if sup.heartbeat_ttl <= sup.heartbeat_interval:
        raise ConfigError("[supervisor] heartbeat_ttl must be greater than heartbeat_interval "
                          f"({sup.heartbeat_ttl} <= {sup.heartbeat_interval})")
    if config.redis.socket_timeout <= config.redis.block_timeout:
        # A blocking read must time out on the server before the socket gives up on it,
        # or a dead connection and an empty queue look alike (redis-py can otherwise hang
        # for ever on a blocking call after a network fault).
        raise ConfigError("[redis] socket_timeout must be greater than block_timeout")
    notify = config.notify
    if notify.url and not notify.secret:
        raise ConfigError("[notify] url needs [notify] secret: webhooks are always signed")
    if notify.url.lower().startswith("http:") and not config.job.allow_private_networks:
        raise ConfigError("[notify] url must be https:// unless [job] allow_private_networks "
                          "is true, as a job's callback")
    if notify.timeout > notify.max_age:
        raise ConfigError("[notify] timeout must not exceed [notify] max_age")
