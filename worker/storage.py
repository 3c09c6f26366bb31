"""Where finished clips go: chosen by the output URL's scheme.

A store's ``put`` is atomic: readers see either no object or the complete one, never a
partial file under its final name. ``exists`` lets a retried job that had already stored its
output skip straight to the ack (the output name is deterministic, so a job run twice writes
the same object: at-least-once execution, one output).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from typing import Protocol
from urllib.parse import urlsplit

from .errors import Permanent, Transient

PENDING_FILE = "pending-output"


class Store(Protocol):
    def exists(self, url: str) -> bool: ...

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

    def exists(self, url: str) -> bool:
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


def store_for(url: str, worker_dir: str) -> Store:
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return LocalStore(worker_dir)
    raise Permanent("output_not_allowed", f"no store for {scheme}:// outputs in this version")
