"""Whether this host can run jobs at all: the question a worker asks after a job failed for a
reason that may be the host's own (a full or read-only disk, ffmpeg gone).

A full work_dir fails every job that lands on the host, whatever the job: retrying those
jobs with a count would dead-letter the whole queue in seconds while the other hosts are
fine. So the worker asks ``probe()``: if the host is at fault it gives the message back
uncounted and stops fetching until ``probe()`` says the host is fine again; if not, the
failure was the job's after all (a source too large for the free space, say) and is retried
as usual.

``probe()`` is cheap (a stat, a 4 KiB write and fsync, an unlink per folder: a few ms on a
local disk) and leaves nothing behind but folders the worker would create anyway.
"""

from __future__ import annotations

import errno
import os
import shutil
from urllib.parse import urlsplit

from .config import Config
from .errors import Transient

# Below this much free space a host does not take jobs: the floor every job needs besides
# its source (the clip, ffmpeg's temporary files, another worker's download in flight).
# Small enough that a disk with 20 MB left still clips small sources.
MIN_FREE_BYTES = 16 * 1024 * 1024

# Failure reasons that may be the host's rather than the job's: the worker probes the host
# before it counts such a failure against the job.
HOST_REASONS = frozenset({"disk_full", "output_not_writable", "storage_error",
                          "ffmpeg_missing", "work_dir_not_writable"})

PROBE_BYTES = 4096  # one page: enough to make the file system allocate a block
_FULL = (errno.ENOSPC, errno.EDQUOT)

Fault = tuple[str, str]  # (reason, error text)


def probe(config: Config, worker_dir: str) -> Fault | None:
    """None when this host can run jobs now, else the first fault found: (reason, text)."""
    fault = ffmpeg_fault(config.job.ffmpeg) or folder_fault(
        worker_dir, "work_dir", "work_dir_not_writable")
    if fault is None and urlsplit(config.storage.output_base).scheme == "file":
        fault = folder_fault(urlsplit(config.storage.output_base).path, "output folder",
                             "output_not_writable")
    return fault


def ffmpeg_fault(ffmpeg: str) -> Fault | None:
    """``[job] ffmpeg``: a path must be an executable file; a bare name must be on PATH."""
    if os.sep in ffmpeg:
        if os.path.isfile(ffmpeg) and os.access(ffmpeg, os.X_OK):
            return None
        why = "is not executable" if os.path.exists(ffmpeg) else "does not exist"
        return "ffmpeg_missing", f"ffmpeg {ffmpeg} {why}"
    if shutil.which(ffmpeg) is None:
        return "ffmpeg_missing", f"ffmpeg {ffmpeg!r} is not on PATH ({os.environ.get('PATH')})"
    return None


def folder_fault(folder: str, what: str, not_writable: str) -> Fault | None:
    """A folder that must take new files: it exists (or is created), a small file can be
    written, synced and removed in it, and it has MIN_FREE_BYTES free."""
    path = os.path.join(folder, f".probe-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(path)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        reason = "disk_full" if exc.errno in _FULL else not_writable
        return reason, f"{what} {folder}: {exc.strerror or exc}"
    if free < MIN_FREE_BYTES:
        return "disk_full", (f"{what} {folder}: {free} bytes free, less than the "
                             f"{MIN_FREE_BYTES >> 20} MiB a host needs to take jobs")
    return None


# errno values of a write into a local folder that mean the folder (its disk), not the job
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                          errno.EPERM, errno.EIO})


def is_disk_error(exc: OSError) -> bool:
    """True for the errors of a write that are the folder's (its disk), never a socket's."""
    return exc.errno in _DISK_ERRNOS


def work_dir_failure(exc: OSError, what: str) -> Transient:
    """A failed write into the work folder as the job failure it is: the host's (the worker
    then probes the host, see probe())."""
    reason = "disk_full" if exc.errno in _FULL else "work_dir_not_writable"
    return Transient(reason, f"{what}: {exc.strerror or exc}")
