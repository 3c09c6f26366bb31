"""Whether this host can run jobs at all: the question a worker asks after a job failed for a
reason that may be the host's own (a full or read-only disk, ffmpeg gone or broken).

A full work_dir fails every job that lands on the host, whatever the job: retrying those
jobs with a count would dead-letter the whole queue in seconds while the other hosts are
fine. So the worker asks ``probe()``: if the host is at fault it gives the message back
uncounted and stops fetching until ``probe()`` says the host is fine again; if not, the
failure was the job's after all (a source too large for the free space, a one-off crash)
and is retried as usual.

``probe()`` checks what every job needs: ffmpeg runs (``-version``), work_dir and
``output_base`` take a small file, and, given the failed job's output, the folder that
output goes to (an ``allowed_outputs`` root, or a separate mount below ``output_base``).
It costs a stat, a 4 KiB write and fsync and an unlink per folder, and one short ffmpeg run
(20-60 ms), and leaves nothing behind but folders the worker would create anyway.

Two things are remembered between probes, per worker process: when ffmpeg last ran cleanly,
and which outputs' folders were found at fault. A probe after a failure that was not
ffmpeg's own trusts a clean run of the last minute (a host whose disk fails each job does
not start ffmpeg each time); a probe after ffmpeg failed always runs it, so ffmpeg broken
a second after a clean run still pauses the host. An output folder found at fault is
probed again by every later probe until it passes, so a paused worker, which probes without
a job, does not resume while the job's folder is still full.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from urllib.parse import urlsplit

from .config import Config
from .errors import JobFailed, Transient
from .storage import LocalStore, file_roots

# Below this much free space a host does not take jobs: the floor every job needs besides
# its source (the clip, ffmpeg's temporary files, another worker's download in flight).
# Small enough that a disk with 20 MB left still clips small sources.
MIN_FREE_BYTES = 16 * 1024 * 1024

# ffmpeg's own failures: a host whose ffmpeg cannot run fails every job with one of them
FFMPEG_REASONS = frozenset({"ffmpeg_missing", "ffmpeg_broken", "ffmpeg_failed",
                            "ffmpeg_crashed"})

# Failure reasons that may be the host's rather than the job's: the worker probes the host
# before it counts such a failure against the job.
HOST_REASONS = frozenset({"disk_full", "output_not_writable", "storage_error",
                          "work_dir_not_writable", *FFMPEG_REASONS})

PROBE_BYTES = 4096  # one page: enough to make the file system allocate a block
FFMPEG_TIMEOUT = 10.0  # seconds for ``ffmpeg -version``: ~0.05 s, even on a busy host
FFMPEG_TRUSTED = 60.0  # seconds a clean ffmpeg run vouches for it (see the module's doc)
MAX_SUSPECTS = 16  # output folders remembered as at fault
_FULL = (errno.ENOSPC, errno.EDQUOT)

Fault = tuple[str, str]  # (reason, error text)

_ffmpeg_ran: dict[str, float] = {}  # program path -> time.monotonic() of its last clean run
_suspects: list[str] = []  # file:// outputs whose folder was found at fault, oldest first


def probe(config: Config, worker_dir: str, output: str | None = None,
          reason: str | None = None) -> Fault | None:
    """None when this host can run jobs now, else the first fault found: (reason, text).

    ``output``: the failed job's output URL, whose folder is probed too; ``reason``: why
    the job failed (without it, or for one of ffmpeg's own, ffmpeg is run afresh).
    """
    fault = ffmpeg_fault(config.job.ffmpeg, fresh=reason is None or reason in FFMPEG_REASONS)
    fault = fault or folder_fault(worker_dir, "work_dir", "work_dir_not_writable")
    base = urlsplit(config.storage.output_base)
    if fault is None and base.scheme == "file":
        fault = folder_fault(base.path, "output folder", "output_not_writable")
    if fault is not None:
        return fault
    for url in [*_suspects, *([output] if output and output not in _suspects else [])]:
        found = output_fault(config, url)
        if url in _suspects:
            _suspects.remove(url)
        if found is not None:
            _suspects.append(url)
            del _suspects[:-MAX_SUSPECTS]
            return found
    return None


def ffmpeg_fault(ffmpeg: str, fresh: bool = True) -> Fault | None:
    """``[job] ffmpeg`` must run: a path must be an executable file, a bare name on PATH,
    and ``ffmpeg -version`` must exit 0 (a missing shared library, a binary for another
    machine or one that crashes on every run fails every job). ``fresh``: run it even if
    it ran cleanly within FFMPEG_TRUSTED seconds."""
    if os.sep in ffmpeg:
        if not (os.path.isfile(ffmpeg) and os.access(ffmpeg, os.X_OK)):
            why = "is not executable" if os.path.exists(ffmpeg) else "does not exist"
            return "ffmpeg_missing", f"ffmpeg {ffmpeg} {why}"
        path = ffmpeg
    else:
        found = shutil.which(ffmpeg)
        if found is None:
            return "ffmpeg_missing", (f"ffmpeg {ffmpeg!r} is not on PATH "
                                      f"({os.environ.get('PATH')})")
        path = found
    ran = _ffmpeg_ran.pop(path, None)
    if not fresh and ran is not None and time.monotonic() - ran < FFMPEG_TRUSTED:
        _ffmpeg_ran[path] = ran
        return None
    why = _run_version(path)
    if why is not None:
        return "ffmpeg_broken", f"ffmpeg {path} cannot run: {why}"
    _ffmpeg_ran[path] = time.monotonic()
    return None


def _run_version(path: str) -> str | None:
    """Run ``path -hide_banner -version``; None when it exits 0, else why not. In its own
    session, so that a wrapper script's children die with it on a timeout."""
    try:
        proc = subprocess.Popen([path, "-hide_banner", "-version"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as exc:  # ENOEXEC (another machine's binary), EACCES, ENOENT (a race)
        return exc.strerror or str(exc)
    try:
        _, err = proc.communicate(timeout=FFMPEG_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"-version did not end within {FFMPEG_TIMEOUT:g} s"
    if proc.returncode == 0:
        return None
    said = err.decode("utf-8", "replace").strip()[-400:]
    if proc.returncode < 0:
        try:
            how = f"killed by {signal.Signals(-proc.returncode).name}"
        except ValueError:
            how = f"killed by signal {-proc.returncode}"
    else:
        how = f"exit {proc.returncode}"
    return f"-version: {how}" + (f": {said}" if said else "")


def output_fault(config: Config, url: str) -> Fault | None:
    """The folders a ``file://`` output goes to: the configured root it lies under
    (``output_base`` or an ``allowed_outputs`` root), probed like ``folder_fault``, and the
    deepest folder of its path that exists below that root (reached without following a
    link: a separate mount, say). There only a full file system is the host's fault: a
    folder that refuses us by its permissions, or a read-only mount below the root, is that
    job's problem, counted as usual (an operator may keep a read-only snapshot there on
    purpose; a producer naming an output in it must not pause every host in turn). None for
    other outputs, and for outputs under no root (refused as the job's own fault when it is
    stored)."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    store = LocalStore("", file_roots(config.storage))
    try:
        root = store.root_of(parts.path)
    except JobFailed:
        return None
    fault = folder_fault(root, "output folder", "output_not_writable")
    if fault is not None:
        return fault
    try:
        fd, shown = store.deepest_folder(parts.path)
    except OSError:  # the root went since: the next probe says so
        return None
    try:
        if shown == root:
            return None
        return _probe_fd(fd, shown, "output folder", None)
    finally:
        os.close(fd)


def folder_fault(folder: str, what: str, not_writable: str) -> Fault | None:
    """A folder that must take new files: it exists (or is created), a small file can be
    written, synced and removed in it, and it has MIN_FREE_BYTES free."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        reason = "disk_full" if exc.errno in _FULL else not_writable
        return reason, f"{what} {folder}: {exc.strerror or exc}"
    try:
        return _probe_fd(fd, folder, what, not_writable)
    finally:
        os.close(fd)


def _probe_fd(dir_fd: int, folder: str, what: str, not_writable: str | None,
              ) -> Fault | None:
    """``folder_fault`` on an open folder (``folder``: its name in messages). With
    ``not_writable`` None, a refusal by permissions is no fault (see output_fault)."""
    name = f".probe-{os.getpid()}"
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name, dir_fd=dir_fd)
        st = os.fstatvfs(dir_fd)
    except OSError as exc:
        if exc.errno in _FULL:
            return "disk_full", f"{what} {folder}: {exc.strerror or exc}"
        if not_writable is None and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None
        return not_writable or "output_not_writable", f"{what} {folder}: {exc.strerror or exc}"
    free = st.f_bavail * st.f_frsize
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
