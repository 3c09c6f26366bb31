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
import json
import logging
import os
import stat
import uuid
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import urlsplit

from .config import StorageConfig
from .context import JobContext
from .errors import JobFailed, Permanent, Transient
from .fsafe import DIR_FLAGS, UnsafePath, open_subdir

log = logging.getLogger(__name__)

PENDING_FILE = "pending-output"


class Store(Protocol):
    # The clip goes over the network: a put may wait with no step of the job between
    remote: bool

    def exists(self, url: str, job_id: str) -> bool:
        """True when ``url`` holds a finished output of job ``job_id``."""
        ...

    def put(self, local_path: str, url: str, metadata: dict[str, str],
            ctx: JobContext | None = None) -> None:
        """Store the clip at ``local_path`` as ``url``, within the job's deadline
        (``ctx``)."""
        ...


class LocalStore:
    """``file://`` outputs.

    The clip is written inside the worker's own folder under ``work_dir`` and renamed onto its
    final name, so nothing partial ever appears under ``output_base``. When ``work_dir`` is on
    another filesystem the rename cannot cross it: the clip is then copied to a hidden
    ``.name.<token>.part`` beside the target and renamed; the part file's path and root are
    recorded in the worker's folder first, so the supervisor can delete it (walking from the
    root, as ``put`` does) if the worker is killed midway.

    The configured roots (``output_base``, ``allowed_outputs``) are trusted as the operator
    wrote them; below a root, nothing is followed through a symbolic link. The path is walked
    from the root one folder at a time (openat(2) with O_NOFOLLOW, mkdirat(2) for a missing
    one) and the clip is renamed relative to the last folder's descriptor, so a link planted
    in a shared output tree cannot send a clip (written by root, perhaps) anywhere else: a
    linked folder, or a link at the final name, fails the job as ``output_not_allowed``.

    A folder that refuses the write (permissions, a read-only or full file system) is the
    host's fault, not the job's: ``output_not_writable`` or ``disk_full``, both transient.
    """

    remote = False

    def __init__(self, worker_dir: str, roots: Sequence[str] = ()) -> None:
        self.worker_dir = worker_dir
        self.roots = tuple(os.path.normpath(root) for root in roots)

    def exists(self, url: str, job_id: str) -> bool:
        # A file has no metadata to name its job; the path is derived from the job (its id
        # by default), and put() renames atomically, so a file there is a finished output.
        target = urlsplit(url).path
        try:
            folder_fd, name = self._walk(target, create=False)
        except (OSError, JobFailed):
            return False  # absent, or not reachable without following a link: not stored
        try:
            st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        except OSError:
            return False
        finally:
            os.close(folder_fd)
        return stat.S_ISREG(st.st_mode)

    def put(self, local_path: str, url: str, metadata: dict[str, str],
            ctx: JobContext | None = None) -> None:
        # A rename, or a copy on the same host: nothing here waits on the network.
        target = urlsplit(url).path
        try:
            folder_fd, name = self._walk(target, create=True)
            try:
                self._check_name(folder_fd, name, target)
                try:
                    os.replace(local_path, name, dst_dir_fd=folder_fd)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    self._copy_across(local_path, folder_fd, target, ctx)
                os.fsync(folder_fd)  # the rename itself survives a crash
            finally:
                os.close(folder_fd)
        except OSError as exc:
            raise _failure(exc, target) from None

    def root_of(self, target: str) -> str:
        """The configured root ``target`` lies under (Permanent when none)."""
        return self._root_of(target)[0]

    def _root_of(self, target: str) -> tuple[str, list[str]]:
        """The longest configured root above ``target``, and the names below it."""
        for root in sorted(self.roots, key=len, reverse=True):
            prefix = root.rstrip("/") + "/"
            if target.startswith(prefix) and len(target) > len(prefix):
                names = target[len(prefix):].split("/")
                if any(n in ("", ".", "..") for n in names):
                    break
                return root, names
        raise Permanent("output_not_allowed",
                        f"{target} is not under output_base or allowed_outputs")

    def _walk(self, target: str, create: bool) -> tuple[int, str]:
        """(fd of the folder that holds ``target``, its file name), every folder below the
        root opened without following a link (and made with ``create``)."""
        root, names = self._root_of(target)
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            if not create:
                raise
            # Once: it is there for the next put. (A file in its place fails here, as the
            # host's fault: storage_error, not the job's.)
            os.makedirs(root, exist_ok=True)
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        shown = root
        try:
            for name in names[:-1]:
                shown = os.path.join(shown, name)
                try:
                    sub = open_subdir(fd, name, "output folder", shown, create, mode=0o777)
                except UnsafePath as exc:
                    raise Permanent("output_not_allowed", str(exc)) from None
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd, names[-1]

    def deepest_folder(self, target: str) -> tuple[int, str]:
        """(fd, path) of the deepest folder of ``target``'s path that exists, walked from its
        root as ``_walk`` does; the walk stops before a name that is missing, is no folder
        or is a symbolic link (never followed)."""
        root, names = self._root_of(target)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        shown = root
        for name in names[:-1]:
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError:  # ENOENT, ENOTDIR; ELOOP for a link
                break
            os.close(fd)
            fd, shown = sub, os.path.join(shown, name)
        return fd, shown

    @staticmethod
    def _check_name(folder_fd: int, name: str, target: str) -> None:
        try:
            st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise Permanent("output_not_allowed", f"{target} is a symbolic link (not replaced "
                            "or followed: it was not made by clip-supervisor)")
        if stat.S_ISDIR(st.st_mode):
            raise Permanent("output_not_allowed", f"{target} is a folder")

    def _copy_across(self, local_path: str, folder_fd: int, target: str,
                     ctx: JobContext | None = None) -> None:
        name = os.path.basename(target)
        part_name = f".{name}.{uuid.uuid4().hex[:12]}.part"
        part = os.path.join(os.path.dirname(target), part_name)
        marker = os.path.join(self.worker_dir, PENDING_FILE)
        with open(marker, "w") as fh:  # with its root: see remove_pending
            json.dump({"root": self.root_of(target), "part": part}, fh)
        out = None
        try:
            out = os.open(part_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o644, dir_fd=folder_fd)
            with open(local_path, "rb") as src, open(out, "wb") as dst:
                # chunk by chunk, each a sign of life and a chance to stop (abort, timeout)
                while chunk := src.read(1024 * 1024):
                    dst.write(chunk)
                    if ctx is not None:
                        ctx.check(f"storing {target}")
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(part_name, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        finally:
            if out is not None:  # made by us: gone after the rename, else removed here
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part_name, dir_fd=folder_fd)
            os.unlink(marker)


# errno of a failed store that are the output folder's (its permissions, its disk): the
# host's fault, so transient; the worker checks the host before it counts them on the job.
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _failure(exc: OSError, target: str) -> JobFailed:
    if exc.errno in _NOT_WRITABLE:
        return Transient("output_not_writable", f"{target}: {exc.strerror}")
    if exc.errno in _FULL:
        return Transient("disk_full", f"{target}: {exc.strerror}")
    if exc.errno in (errno.ENOTDIR, errno.EISDIR):
        # The job's output name collides with what is there (a file where its folder
        # goes): running it again cannot help.
        return Permanent("output_not_allowed", f"{target}: {exc.strerror}")
    if exc.errno == errno.ENAMETOOLONG:
        return Permanent("output_not_allowed", f"{target}: {exc.strerror}")
    return Transient("storage_error", f"{target}: {exc.strerror}")


def remove_pending(worker_dir: str) -> None:
    """Delete a part file that a killed worker left beside an output (supervisor cleanup).

    The marker names the part file and the configured root it lies under; the path is
    walked from that root as ``put`` walks it, without following a link, and the part file
    is unlinked relative to its folder. A link planted in the output tree since (a folder
    swapped for a link elsewhere) so cannot make the supervisor, perhaps root, delete a file
    of the same name anywhere else: the part file is left, and the log says so."""
    marker = os.path.join(worker_dir, PENDING_FILE)
    try:
        with open(marker) as fh:
            text = fh.read()
    except OSError:  # no marker (the usual case), or the folder itself is gone or broken
        return
    try:
        record = json.loads(text)
        root, part = str(record["root"]), str(record["part"])
    except (ValueError, TypeError, KeyError):
        # A marker of an older version holds the path alone: walked from / as well
        root, part = "/", text.strip()
    name = os.path.basename(part)
    if not (part.startswith("/") and name.startswith(".") and name.endswith(".part")):
        return
    try:
        folder_fd, name = LocalStore(worker_dir, [root])._walk(part, create=False)
    except FileNotFoundError:
        return
    except (OSError, JobFailed) as exc:
        log.warning("part file %s left in place: %s", part, exc)
        return
    try:
        os.unlink(name, dir_fd=folder_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove part file %s: %s", part, exc.strerror or exc)
    finally:
        os.close(folder_fd)


def file_roots(storage: StorageConfig) -> list[str]:
    """The paths of the ``file://`` roots outputs may go under (output_base, allowed_outputs)."""
    return [urlsplit(root).path for root in (storage.output_base, *storage.allowed_outputs)
            if urlsplit(root).scheme == "file"]


def store_for(url: str, worker_dir: str, storage: StorageConfig) -> Store:
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return LocalStore(worker_dir, file_roots(storage))
    if scheme == "gs":
        # Imported here: the Cloud Storage library costs ~0.5 s to import, and neither the
        # master nor a worker that only writes files needs it.
        from .gcs import GcsStore

        return GcsStore(storage)
    raise Permanent("output_not_allowed", f"no store for {scheme}:// outputs")
