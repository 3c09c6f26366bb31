"""Google Cloud Storage: the ``gs://`` output store and the ``gs://`` source download.

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

Uploads carry no generation precondition: the object name is a function of the job, so a
retry rewrites the same object in place (at-least-once execution, exactly-once output), and
``exists`` tells a finished output of *this* job from anything else by its ``job_id``
metadata.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections.abc import Callable
from typing import IO, Any

import google.auth
import google.auth.exceptions
import requests
from google.api_core import exceptions as api_exceptions
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from .cache import Identity
from .config import StorageConfig
from .errors import Aborted, JobFailed, Permanent, Transient

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

_clients: dict[tuple[int, str, str], Any] = {}


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
    emulator = os.environ.get(EMULATOR_ENV, "")
    key = (os.getpid(), cfg.credentials_file, emulator)
    client = _clients.get(key)
    if client is not None:
        return client
    _clients.clear()  # a parent's client inherited through fork is never used
    os.environ[OTEL_BUCKET_METADATA_ENV] = "true"
    try:
        if emulator:
            # The client then uses anonymous credentials by itself: the emulator takes none.
            client = storage.Client()
        elif cfg.credentials_file:
            client = storage.Client.from_service_account_json(cfg.credentials_file)
        else:
            # Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud's
            # application-default login, or the metadata server of a GCE/GKE/Cloud Run host.
            credentials, project = google.auth.default(scopes=storage.Client.SCOPE)
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
    _clients[key] = client
    return client


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

    def put(self, local_path: str, url: str, metadata: dict[str, str]) -> None:
        bucket, key = split_url(url)
        size = os.path.getsize(local_path)
        resumable = size > self.cfg.resumable_threshold
        chunk = self.cfg.upload_chunk_size if resumable else None
        fields = {name: value[:MAX_METADATA_VALUE] for name, value in metadata.items()}
        fields[VERSION_KEY] = version()
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
                    blob.upload_from_file(fh, size=None if resumable else size,
                                          content_type=content_type_for(local_path),
                                          checksum="crc32c", timeout=self.timeout,
                                          retry=self.retry)
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
                raise failure(exc, url, reading=False) from None
            break
        mode = f"resumable upload in chunks of {chunk}" if resumable else "multipart upload"
        log.debug("stored %s: %d bytes, %s, crc32c %s, generation %s", url, size, mode,
                  blob.crc32c, blob.generation)


class _CappedSink:
    """Where the client writes a download: counts, caps, and stops on abort or deadline.

    The client writes every 8 KiB it receives, so raising here interrupts a download at
    once; these exceptions are not retryable, so they pass through the client's retry.
    """

    def __init__(self, fh: IO[bytes], url: str, max_bytes: int, deadline: float,
                 should_abort: Callable[[], bool]) -> None:
        self.fh = fh
        self.url = url
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.should_abort = should_abort
        self.written = 0

    def write(self, data: bytes) -> int:
        if self.should_abort():
            raise Aborted()
        if time.monotonic() > self.deadline:
            raise Transient("timeout", f"downloading {self.url} exceeded the job timeout")
        self.written += len(data)
        if self.written > self.max_bytes:
            raise Permanent("source_too_large", f"more than max_source_bytes {self.max_bytes}")
        return self.fh.write(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        # The client rewinds to 0 when a server ignores a range (decompressive transcoding).
        position = self.fh.seek(offset, whence)
        self.fh.truncate()
        self.written = position
        return position


def _identity(blob: Any) -> Identity | None:
    """An object's size and generation (a new upload under the same name is another one)."""
    if blob.size is None or blob.generation is None:
        return None
    return Identity(int(blob.size), f"generation {blob.generation}")


def _source_blob(url: str, cfg: StorageConfig) -> tuple[Any, tuple[float, float], Any]:
    """The metadata of the source object ``url`` (one request), with the timeout and retry
    its reads use; failures are the job's."""
    bucket, key = split_url(url)
    timeout = (cfg.gcs_connect_timeout, cfg.gcs_timeout)
    retry = DEFAULT_RETRY.with_timeout(cfg.gcs_retry_deadline)
    try:
        blob = client_for(cfg).bucket(bucket).get_blob(key, timeout=timeout, retry=retry)
    except STORAGE_ERRORS as exc:
        raise failure(exc, url, reading=True) from None
    if blob is None:
        raise Permanent("not_found", f"{url}: no such object or bucket")
    return blob, timeout, retry


def identify(url: str, cfg: StorageConfig) -> Identity | None:
    """What ``gs://bucket/key`` is now (one metadata request); failures as for a download."""
    return _identity(_source_blob(url, cfg)[0])


def download(url: str, dest: str, cfg: StorageConfig, max_bytes: int, deadline: float,
             should_abort: Callable[[], bool]) -> tuple[int, Identity | None]:
    """Stream ``gs://bucket/key`` into ``dest``, crc32c-checked; return the byte count and
    the object's identity (for the source cache)."""
    blob, timeout, retry = _source_blob(url, cfg)
    if blob.size is not None and blob.size > max_bytes:
        raise Permanent("source_too_large",
                        f"{url} is {blob.size} bytes > max_source_bytes {max_bytes}")
    # ``blob`` carries the generation just read, so every request of the download (the
    # client resumes a broken one with a Range request) reads those same bytes. Taken now:
    # the download rewrites the blob's properties from its answer's headers.
    identity = _identity(blob)
    with open(dest, "wb") as fh:
        sink = _CappedSink(fh, url, max_bytes, deadline, should_abort)
        try:
            blob.download_to_file(sink, timeout=timeout, retry=retry, checksum="crc32c")
        except STORAGE_ERRORS as exc:
            if _status(exc) == 404:  # replaced or deleted since we read its metadata
                raise Transient("fetch_failed", f"{url} changed during the download") from None
            raise failure(exc, url, reading=True) from None
    if blob.size is not None and sink.written != blob.size:
        raise Transient("fetch_failed", f"{url}: got {sink.written} of {blob.size} bytes")
    return sink.written, identity

