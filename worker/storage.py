"""Where finished clips go: chosen by the output URL's scheme.

A store's ``put`` is atomic: readers see either no object or the complete one, never a
partial file under its final name. ``exists(url, job_id)`` lets a retried or recovered job
whose earlier attempt stored its output but died before the ack skip straight to the ack.

The guarantee is at-least-once execution, exactly-once output: a job may run more than once
(a worker killed between its upload and its ack), but its output name is deterministic, so a
second run writes the same object in place, and a run that finds its output already stored
(by this job id) does not clip again. Nothing is left behind twice under two names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from typing import Protocol
from urllib.parse import urlsplit

from .config import StorageConfig
from .errors import Permanent, Transient

PENDING_FILE = "pending-output"


class Store(Protocol):
    def exists(self, url: str, job_id: str) -> bool:
        """True when ``url`` holds a finished output of job ``job_id``."""
        ...

    def put(self, local_path: str, url: str, metadata: dict[str, str]) -> None: ...


class LocalStore:
    """``file://`` outputs.

    The clip is written inside the worker's own folder under ``work_dir`` and renamed onto its
    final name, so nothing partial ever appears under ``output_base``. When ``work_dir`` is on
    another filesystem the rename cannot cross it: the clip is then copied to a hidden
    ``.name.<token>.part`` beside the target and renamed; the part file's path is recorded in
    the worker's folder first, so the supervisor can delete it if the worker is killed midway.
    """

    def __init__(self, worker_dir: str) -> None:
        self.worker_dir = worker_dir

    def exists(self, url: str, job_id: str) -> bool:
        # A file has no metadata to name its job; the path is derived from the job (its id
        # by default), and put() renames atomically, so a file there is a finished output.
        return os.path.isfile(urlsplit(url).path)

    def put(self, local_path: str, url: str, metadata: dict[str, str]) -> None:
        target = urlsplit(url).path
        folder = os.path.dirname(target)
        try:
            os.makedirs(folder, exist_ok=True)
            try:
                os.replace(local_path, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_across(local_path, target)
            _fsync_dir(folder)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                             errno.EISDIR):
                raise Permanent("output_not_writable", f"{target}: {exc.strerror}") from None
            raise Transient("storage_error", f"{target}: {exc.strerror}") from None

    def _copy_across(self, local_path: str, target: str) -> None:
        folder, name = os.path.split(target)
        part = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.part")
        marker = os.path.join(self.worker_dir, PENDING_FILE)
        with open(marker, "w") as fh:
            fh.write(part)
        try:
            with open(local_path, "rb") as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(part, target)
        finally:
            if os.path.exists(part):
                os.unlink(part)
            os.unlink(marker)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_pending(worker_dir: str) -> None:
    """Delete a part file that a killed worker left beside an output (supervisor cleanup)."""
    marker = os.path.join(worker_dir, PENDING_FILE)
    try:
        with open(marker) as fh:
            part = fh.read().strip()
    except OSError:  # no marker (the usual case), or the folder itself is gone or broken
        return
    if part.endswith(".part") and os.path.basename(part).startswith("."):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)


def store_for(url: str, worker_dir: str, storage: StorageConfig) -> Store:
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return LocalStore(worker_dir)
    if scheme == "gs":
        # Imported here: the Cloud Storage library costs ~0.5 s to import, and neither the
        # master nor a worker that only writes files needs it.
        from .gcs import GcsStore

        return GcsStore(storage)
    raise Permanent("output_not_allowed", f"no store for {scheme}:// outputs")
