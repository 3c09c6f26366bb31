"""Google Cloud Storage: the ``gs://`` output store and the ``gs://`` sources.

One ``google.cloud.storage.Client`` per worker process, made on first use: never in the
master before fork (a client's HTTP connection pool must not be shared by two processes),
and not at all by a worker that never sees a ``gs://`` URL.

Every call is bounded: each request has ``timeout=(connect, read)`` and retries of 429,
5xx and network errors stop at ``[storage] gcs_retry_deadline`` (the client's defaults
would retry for 120 s, each request waiting up to 60 s). What is still failing then is a
``Transient`` error: the job is retried with backoff, and a fresh attempt starts any
resumable upload again from byte 0, never from a session URL that a restarted or
failed-over server no longer knows (it answers 404). A missing bucket or a refused
permission is ``Permanent``: retrying cannot help.

A ``gs://`` source is described by one metadata request (``GcsSource``: its size and
generation, which is its identity for the source cache) and then read like an http(s)
source: in place, by the job's relay, with ranged GETs of the object's media link pinned to
that generation and authorized with the client's own credentials; or downloaded whole by
the client (crc32c-checked) when the read plan says so (worker.pipeline).

An upload is bounded by the job's deadline too: the time left caps each request's timeouts
and the retry deadline, and a failure once the job's time is what bounded it is a
``timeout``.

Uploads carry no generation precondition: the object name is a function of the job, so a
retry rewrites the same object in place (at-least-once execution, exactly-once output), and
``exists`` tells a finished output of *this* job from anything else by its ``job_id``
metadata.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from typing import IO, Any
from urllib.parse import quote

import google.auth
import google.auth.credentials
import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.api_core import exceptions as api_exceptions
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account

from . import source
from .config import StorageConfig
from .context import Identity, JobContext
from .errors import JobFailed, Permanent, Transient
from .health import is_disk_error, work_dir_failure

log = logging.getLogger("clip-supervisor.storage")

# Without it, client 3.17 starts a thread that keeps fetching bucket metadata for tracing.
OTEL_BUCKET_METADATA_ENV = "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"

CONTENT_TYPES = {"mp4": "video/mp4", "mkv": "video/x-matroska", "webm": "video/webm",
                 "mov": "video/quicktime", "ts": "video/mp2t"}
VERSION_KEY = "clip_supervisor_version"
# Custom metadata is capped at 8 KiB per object; a job url may be up to 8 KiB long.
MAX_METADATA_VALUE = 2048
# A lost resumable session (404/410) is started again from byte 0 this many times in one
# attempt; a 404 that persists on fresh sessions is the bucket itself.
RESUMABLE_RESTARTS = 2
RETRYABLE_CODES = frozenset({408, 429})

# Everything the client stack raises for a failed call; anything else is a bug.
STORAGE_ERRORS = (api_exceptions.GoogleAPIError, google.auth.exceptions.GoogleAuthError,
                  requests.RequestException, DataCorruption, InvalidResponse, ConnectionError,
                  TimeoutError)

# What a request or its retries end with when their time ran out.
TIMED_OUT = (api_exceptions.RetryError, requests.Timeout, TimeoutError)

_clients: dict[tuple[int, str, str], tuple[Any, Any]] = {}  # -> (client, its credentials)


def version() -> str:
    # worker/ must not import supervisor/ (where __version__ lives): ask the installed
    # distribution instead, which is the same number.
    try:
        return importlib.metadata.version("clip-supervisor")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def split_url(url: str) -> tuple[str, str]:
    """``gs://bucket/key`` -> (bucket, key)."""
    rest = url[len("gs://"):] if url.startswith("gs://") else ""
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise Permanent("bad_url", f"{url} is not gs://bucket/object")
    return bucket, key


def content_type_for(path: str) -> str:
    # The pipeline names the local clip after its container (clip.<format>).
    return CONTENT_TYPES.get(path.rpartition(".")[2], "application/octet-stream")


def client_for(cfg: StorageConfig) -> Any:
    """This process's client, created on first use (after the fork, never before)."""
    return _client_and_credentials(cfg)[0]


def _client_and_credentials(cfg: StorageConfig) -> tuple[Any, Any]:
    """The client, and the credentials it authorizes its requests with (the relay's ranged
    reads of a source object carry the same)."""
    emulator = os.environ.get(EMULATOR_ENV, "")
    key = (os.getpid(), cfg.credentials_file, emulator)
    made = _clients.get(key)
    if made is not None:
        return made
    _clients.clear()  # a parent's client inherited through fork is never used
    os.environ[OTEL_BUCKET_METADATA_ENV] = "true"
    try:
        if emulator:
            # The client then uses anonymous credentials by itself: the emulator takes none.
            client = storage.Client()
            credentials = google.auth.credentials.AnonymousCredentials()
        else:
            if cfg.credentials_file:
                found = service_account.Credentials.from_service_account_file(
                    cfg.credentials_file)
                project = found.project_id
            else:
                # Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud's
                # application-default login, or the metadata server of a GCE/GKE/Cloud Run
                # host.
                found, project = google.auth.default(scopes=storage.Client.SCOPE)
            # Scoped here, so that the client keeps this very object (it scopes only what
            # is not): one token, refreshed for both.
            credentials = google.auth.credentials.with_scopes_if_required(
                found, storage.Client.SCOPE)
            client = storage.Client(project=project, credentials=credentials)
    except (google.auth.exceptions.GoogleAuthError, ValueError, KeyError, OSError) as exc:
        # Dead-letter (replayable with `dead retry` once fixed) rather than retry: every
        # attempt would fail the same way until an operator steps in.
        if cfg.credentials_file and not emulator:
            text = f"cannot use credentials_file {cfg.credentials_file}: {exc}"
        elif isinstance(exc, google.auth.exceptions.DefaultCredentialsError):
            text = ("no Google credentials: set [storage] credentials_file or "
                    f"GOOGLE_APPLICATION_CREDENTIALS, or run with a service account ({exc})")
        else:
            text = f"cannot create a Cloud Storage client: {exc}"
        raise Permanent("storage_credentials", text) from None
    _clients[key] = (client, credentials)
    return client, credentials


def failure(exc: BaseException, url: str, *, reading: bool) -> JobFailed:
    """A Cloud Storage error as a job failure: retry what may pass, dead-letter the rest."""
    if isinstance(exc, api_exceptions.RetryError):
        cause = exc.cause if exc.cause is not None else exc
        return Transient("storage_unavailable",
                         f"{url}: still failing when the retry deadline passed: "
                         f"{_describe(cause)}")
    code = _status(exc)
    if code == 404:
        if reading:
            return Permanent("not_found", f"{url}: no such object or bucket")
        return Permanent("bucket_not_found", f"{url}: the bucket does not exist")
    if code in (401, 403):
        need = ("roles/storage.objectViewer" if reading else
                "roles/storage.objectCreator, and storage.objects.delete (e.g. "
                "roles/storage.objectUser) to replace an existing object")
        return Permanent("storage_forbidden",
                         f"{url}: {_describe(exc)} (the account needs {need} on the bucket)")
    if code is not None and (code in RETRYABLE_CODES or code >= 500):
        return Transient("storage_unavailable", f"{url}: {_describe(exc)}")
    if code is not None:
        return Permanent("storage_error", f"{url}: {_describe(exc)}")
    if isinstance(exc, DataCorruption):
        return Transient("checksum_mismatch", f"{url}: {exc}")
    if isinstance(exc, google.auth.exceptions.RefreshError) and \
            not getattr(exc, "retryable", False):
        return Permanent("storage_credentials", f"{url}: cannot get an access token: {exc}")
    return Transient("storage_unavailable", f"{url}: {_describe(exc)}")


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, api_exceptions.GoogleAPICallError) and exc.code is not None:
        return int(exc.code)
    if isinstance(exc, InvalidResponse) and exc.response is not None:
        return int(exc.response.status_code)
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return f"HTTP {exc.code} {exc.message}".strip()
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect to Cloud Storage"
    if isinstance(exc, requests.Timeout | TimeoutError):
        return "Cloud Storage did not answer in time"
    return f"{type(exc).__name__}: {exc}"[:300]


class GcsStore:
    """``gs://bucket/key`` outputs, with the job's description as object metadata."""

    remote = True

    def __init__(self, cfg: StorageConfig) -> None:
        self.cfg = cfg
        self.timeout = (cfg.gcs_connect_timeout, cfg.gcs_timeout)
        self.retry = DEFAULT_RETRY.with_timeout(cfg.gcs_retry_deadline)

    def exists(self, url: str, job_id: str) -> bool:
        bucket, key = split_url(url)
        try:
            blob = client_for(self.cfg).bucket(bucket).get_blob(key, timeout=self.timeout,
                                                                retry=self.retry)
        except STORAGE_ERRORS as exc:
            failed = failure(exc, url, reading=True)
            # The caller treats this as "not stored" and runs the job again: say why.
            log.warning("cannot check whether %s is stored (%s): %s", url, failed.reason,
                        failed.error)
            raise failed from None
        if blob is None:
            return False
        owner = (blob.metadata or {}).get("job_id")
        if owner != job_id:
            log.info("%s exists but holds the output of job %s, not of job %s", url, owner,
                     job_id)
            return False
        return True

    def _stored_by(self, url: str, job_id: str) -> bool:
        try:
            return bool(job_id) and self.exists(url, job_id)
        except JobFailed:
            return False

    def _bounds(self, ctx: JobContext | None) -> tuple[tuple[float, float], Any, bool]:
        """(timeout, retry) of an upload, within the time the job has left; and whether
        that time is what bounds them (then a failure is the job's ``timeout``)."""
        if ctx is None:
            return self.timeout, self.retry, False
        left = ctx.remaining()
        if left <= 0:
            raise Transient("timeout", "the job's timeout passed before its clip was stored")
        connect, read = self.timeout
        bounded = left < max(read, self.cfg.gcs_retry_deadline)
        retry = self.retry.with_timeout(min(self.cfg.gcs_retry_deadline, left))
        return (min(connect, left), min(read, left)), retry, bounded

    def put(self, local_path: str, url: str, metadata: dict[str, str],
            ctx: JobContext | None = None) -> None:
        """Upload the clip; within the job's deadline when ``ctx`` is given (each request's
        timeouts and the retry deadline are capped by the time left, and the file is not
        read for another chunk once it passed)."""
        bucket, key = split_url(url)
        size = os.path.getsize(local_path)
        resumable = size > self.cfg.resumable_threshold
        chunk = self.cfg.upload_chunk_size if resumable else None
        fields = {name: value[:MAX_METADATA_VALUE] for name, value in metadata.items()}
        fields[VERSION_KEY] = version()
        timeout, retry, bounded = self._bounds(ctx)
        restarts = 0
        while True:
            blob = client_for(self.cfg).bucket(bucket).blob(key, chunk_size=chunk)
            blob.metadata = fields
            if self.cfg.cache_control:
                blob.cache_control = self.cfg.cache_control
            try:
                with open(local_path, "rb") as fh:
                    # The client sends a known size of at most 8 MiB in one multipart
                    # request, and opens a resumable session when the size is not given.
                    # Retrying either is safe: the object name is fixed by the job.
                    blob.upload_from_file(_Timed(fh, url, ctx),
                                          size=None if resumable else size,
                                          content_type=content_type_for(local_path),
                                          checksum="crc32c", timeout=timeout, retry=retry)
            except STORAGE_ERRORS as exc:
                code = _status(exc)
                if resumable and code in (404, 410) and restarts < RESUMABLE_RESTARTS:
                    restarts += 1
                    log.warning("%s: resumable upload session lost (%s); starting again "
                                "from byte 0", url, _describe(exc))
                    continue
                # An account without storage.objects.delete may create but not replace: a
                # retried request whose first try did store (its answer was lost) gets 403.
                if code == 403 and self._stored_by(url, metadata.get("job_id", "")):
                    log.info("%s: already stored by job %s; not replaced", url,
                             metadata.get("job_id"))
                    return
                failed = failure(exc, url, reading=False)
                if bounded and isinstance(exc, TIMED_OUT):  # the job's time ran out
                    raise Transient("timeout", f"storing {url} did not finish within the "
                                    f"job's timeout: {failed.error}") from None
                raise failed from None
            break
        mode = f"resumable upload in chunks of {chunk}" if resumable else "multipart upload"
        log.debug("stored %s: %d bytes, %s, crc32c %s, generation %s", url, size, mode,
                  blob.crc32c, blob.generation)


class _Timed:
    """The clip as the client reads it for an upload: each read (a chunk of a resumable
    upload; the whole clip for a multipart one) first checks the job's deadline and abort.
    These exceptions are not retryable: they pass through the client's retry."""

    def __init__(self, fh: IO[bytes], url: str, ctx: JobContext | None) -> None:
        self.fh = fh
        self.url = url
        self.ctx = ctx

    def read(self, size: int = -1) -> bytes:
        if self.ctx is not None:
            self.ctx.check(f"storing {self.url}")
        return self.fh.read(size)

    def __getattr__(self, name: str) -> Any:  # tell, seek, ...: the file's own
        return getattr(self.fh, name)


class _CappedSink:
    """Where the client writes a download: counts, caps, and stops on abort or deadline.

    The client writes every 8 KiB it receives, so raising here interrupts a download at
    once; these exceptions are not retryable, so they pass through the client's retry.
    """

    def __init__(self, fh: IO[bytes], url: str, ctx: JobContext) -> None:
        self.fh = fh
        self.url = url
        self.ctx = ctx
        self.written = 0

    def write(self, data: bytes) -> int:
        self.ctx.check(f"downloading {self.url}")
        self.written += len(data)
        if self.written > self.ctx.limits.max_bytes:
            raise Permanent("source_too_large",
                            f"more than max_source_bytes {self.ctx.limits.max_bytes}")
        return self.fh.write(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        # The client rewinds to 0 when a server ignores a range (decompressive transcoding).
        position = self.fh.seek(offset, whence)
        self.fh.truncate()
        self.written = position
        return position


class GcsSource:
    """A ``gs://bucket/key`` source, described by one metadata request (failures are the
    job's: ``not_found``, ``storage_forbidden``...), refused at once when it is larger than
    ``max_bytes``.

    ``remote`` reads it in place through the job's relay: ranged GETs of its media link,
    pinned to the generation just described (a replaced object is ``source_changed``,
    never a mix of two), authorized with the client's credentials. The endpoint is the
    operator's, not the job's: the address guard does not apply (an emulator may be on
    loopback). ``download`` streams it whole through the client, crc32c-checked.
    """

    def __init__(self, url: str, cfg: StorageConfig, max_bytes: int) -> None:
        self.url = url
        bucket, key = split_url(url)
        self.timeout = (cfg.gcs_connect_timeout, cfg.gcs_timeout)
        self.retry = DEFAULT_RETRY.with_timeout(cfg.gcs_retry_deadline)
        client, credentials = _client_and_credentials(cfg)
        try:
            blob = client.bucket(bucket).get_blob(key, timeout=self.timeout, retry=self.retry)
        except STORAGE_ERRORS as exc:
            raise failure(exc, url, reading=True) from None
        if blob is None:
            raise Permanent("not_found", f"{url}: no such object or bucket")
        if blob.size is not None and blob.size > max_bytes:
            raise Permanent("source_too_large",
                            f"{url} is {blob.size} bytes > max_source_bytes {max_bytes}")
        # ``blob`` carries the generation just read, so every request of a download (the
        # client resumes a broken one with a Range request) reads those same bytes. Taken
        # now: a download rewrites the blob's properties from its answer's headers.
        self.blob = blob
        self.identity = _identity(blob)
        media = (f"{client.api_endpoint.rstrip('/')}/download/storage/v1/b/"
                 f"{quote(bucket, safe='')}/o/{quote(key, safe='')}?alt=media")
        if blob.generation is not None:
            media += f"&generation={blob.generation}"
        self.remote = source.Remote(media, identity=self.identity,
                                    headers=_Authorization(credentials, media, url),
                                    guarded=False)

    def identify(self, ctx: JobContext) -> Identity | None:
        """What the object is now: described a moment ago, when the job began."""
        return self.identity

    def download(self, dest: str, ctx: JobContext, answer: source.Answer | None = None,
                 ) -> tuple[int, Identity | None]:
        """Stream the object into ``dest`` (after ``ctx.room`` for its size); return the
        byte count and its identity (for the source cache)."""
        if answer is not None:  # the relay's whole answer: the client reads it itself
            source.discard(*answer)
        url, blob = self.url, self.blob
        if blob.size is not None:
            ctx.room(blob.size)
        try:
            with open(dest, "wb") as fh:
                source.reserve(fh.fileno(), blob.size or 0)  # claimed now, as http does
                sink = _CappedSink(fh, url, ctx)
                try:
                    blob.download_to_file(sink, timeout=self.timeout, retry=self.retry,
                                          checksum="crc32c")
                except STORAGE_ERRORS as exc:
                    if _status(exc) == 404:  # replaced or deleted since it was described
                        raise Transient("fetch_failed",
                                        f"{url} changed during the download") from None
                    raise failure(exc, url, reading=True) from None
        except OSError as exc:
            if not is_disk_error(exc):
                raise
            raise work_dir_failure(exc, f"writing {url} into {dest}") from None
        if blob.size is not None and sink.written != blob.size:
            raise Transient("fetch_failed", f"{url}: got {sink.written} of {blob.size} bytes")
        return sink.written, self.identity


class _Authorization:
    """The headers that authorize a request for a source object: the client's credentials,
    refreshed when their token has expired (once, for all the relay's threads)."""

    def __init__(self, credentials: Any, target: str, url: str) -> None:
        self.credentials = credentials
        self.target = target  # what is requested (a JWT's audience, for some credentials)
        self.url = url  # the job's, as errors name it
        self._lock = threading.Lock()
        self._request = google.auth.transport.requests.Request()

    def __call__(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        try:
            with self._lock:
                self.credentials.before_request(self._request, "GET", self.target, headers)
        except google.auth.exceptions.GoogleAuthError as exc:
            raise failure(exc, self.url, reading=True) from None
        return headers


def _identity(blob: Any) -> Identity | None:
    """An object's size and generation (a new upload under the same name is another one)."""
    if blob.size is None or blob.generation is None:
        return None
    return Identity(int(blob.size), f"generation {blob.generation}")
