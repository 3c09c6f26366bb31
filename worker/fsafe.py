"""Files and folders the daemon makes or follows, opened so that nobody else can steer them.

The daemon often runs as root, and some of its paths may sit in folders other users can
write (/var/tmp, /tmp, a shared output tree). There a path can be made first by another user,
or swapped for a symbolic link between our check and our use. So a folder is opened one
component at a time with O_NOFOLLOW, relative to the folder above it (openat(2)), created with
mkdirat(2), and checked on the open descriptor (fstat), never again by a path that could have
changed since; a file is opened with O_NOFOLLOW. A private folder must pass the rules of
OpenSSH's StrictModes: owned by us, writable by nobody else, and every folder above it owned
by root or by us and not writable by others unless it is sticky (like /tmp).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(OSError):
    """A path we refuse to use. ``str()`` is one line naming it and the problem; being an
    OSError, it reaches the handlers of other file errors (``strerror`` is the problem)."""

    def __init__(self, what: str, path: str, problem: str, code: int = errno.EPERM) -> None:
        super().__init__(code, problem, path)
        self.what = what

    def __str__(self) -> str:
        return f"unsafe {self.what} {self.filename}: {self.strerror}"


SYMLINK = "is a symbolic link (not followed: it could point anywhere)"


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def is_symlink(name: str, dir_fd: int | None = None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_nofollow(name: str, flags: int, mode: int = 0o600, dir_fd: int | None = None,
                  what: str = "file", shown: str | None = None) -> int:
    """``os.open`` that refuses a symbolic link at ``name`` with UnsafePath (``shown`` is
    the path named in the message, when ``name`` is relative to ``dir_fd``)."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        # Linux says ELOOP for a link opened with O_NOFOLLOW, ENOTDIR with O_DIRECTORY too.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and is_symlink(name, dir_fd):
            raise UnsafePath(what, shown or name, SYMLINK, errno.ELOOP) from None
        raise


def check_parents(path: str, what: str) -> None:
    """Every existing folder above ``path`` (symbolic links resolved, as they are trusted
    once the folders that hold them are): owned by root or us, and not writable by group
    or others unless sticky. Otherwise another user could replace what lies below it."""
    me = os.geteuid()
    folder = os.path.realpath(os.path.dirname(path))
    while True:
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            st = None  # to be created, by us
        if st is not None and stat.S_ISDIR(st.st_mode):
            if st.st_uid not in (0, me):
                raise UnsafePath(what, path, f"the folder above it, {folder}, is owned by "
                                 f"{_user(st.st_uid)}, not by root or {_user(me)}")
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                raise UnsafePath(what, path, f"the folder above it, {folder}, is writable by "
                                 f"group or others (mode {st.st_mode & 0o7777:04o}) and "
                                 "not sticky")
        if folder == "/":
            return
        folder = os.path.dirname(folder)


def check_private(fd: int, what: str, path: str) -> os.stat_result:
    """The open folder ``fd`` is ours alone: owned by our user, writable by nobody else."""
    st = os.fstat(fd)
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafePath(what, path, f"owned by {_user(st.st_uid)}, not by {_user(me)} "
                         "that runs clip-supervisor")
    if st.st_mode & 0o022:
        raise UnsafePath(what, path, "writable by group or others "
                         f"(mode {st.st_mode & 0o7777:04o}; chmod go-w it)")
    return st


def open_subdir(dir_fd: int, name: str, what: str, shown: str, create: bool = False,
                mode: int = 0o700) -> int:
    """Open (after making, with ``create``) the folder ``name`` in ``dir_fd``, never
    through a symbolic link."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=dir_fd)
    return open_nofollow(name, DIR_FLAGS, dir_fd=dir_fd, what=what, shown=shown)


def private_subdir(dir_fd: int, name: str, what: str, shown: str, create: bool = True) -> int:
    fd = open_subdir(dir_fd, name, what, shown, create)
    try:
        check_private(fd, what, shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_dir(path: str, what: str, create: bool = True) -> int:
    """An fd of the folder ``path``, made (mode 0700) if missing and ``create``, after
    checking it and the folders above it (see ``check_parents``, ``check_private``).
    UnsafePath when they fail; another OSError when the folder cannot be made or opened."""
    check_parents(path, what)
    parent, name = os.path.split(os.path.normpath(path))
    if create and not os.path.exists(parent):
        os.makedirs(parent, exist_ok=True)
        check_parents(path, what)  # the folders just made are ours; a race made them not
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return private_subdir(pfd, name, what, path, create)
    finally:
        os.close(pfd)


def prepare_work_dir(config: Config, create: bool = True) -> None:
    """Make (or, without ``create``, only check what exists of) ``[job] work_dir`` and the
    source cache's folder, private to our user, before any worker uses them.

    Raises UnsafePath (one line: the path and what is wrong with it) when either is a
    symbolic link, is owned by another user or is writable by others, or a folder above
    them is unsafe; any other OSError means work_dir cannot be made. The cache is optional:
    an ordinary error making it only turns it off later, in the worker, with a warning."""
    job = config.job
    try:
        fd = private_dir(job.work_dir, "work_dir", create)
    except FileNotFoundError:
        if create:
            raise
        return  # nothing there yet: the start makes it
    try:
        if not job.cache_max_bytes:
            return
        try:
            if job.cache_dir:
                os.close(private_dir(job.cache_dir, "cache_dir", create))
            else:
                shown = os.path.join(job.work_dir, "cache")
                os.close(private_subdir(fd, "cache", "cache_dir", shown, create))
        except UnsafePath:
            raise
        except OSError:
            pass
    finally:
        os.close(fd)


def default_work_dir(euid: int | None = None, environ: dict[str, str] | None = None,
                     home: str | None = None) -> str:
    """Where ``[job] work_dir`` is when the configuration leaves it empty: never in a
    folder that other users can write (such as /var/tmp), where one of them could make it
    first. Root (the init script, the package): /var/lib/clip-supervisor/work, beside the
    default output_base; any other user: $XDG_CACHE_HOME/clip-supervisor, else
    ~/.cache/clip-supervisor (the XDG Base Directory rule for caches)."""
    euid = os.geteuid() if euid is None else euid
    environ = dict(os.environ) if environ is None else environ
    if euid == 0:
        return "/var/lib/clip-supervisor/work"
    xdg = environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the spec says a relative value is to be ignored
        return os.path.join(os.path.normpath(xdg), "clip-supervisor")
    if home is None:
        home = environ.get("HOME", "")
        if not os.path.isabs(home):
            try:
                home = pwd.getpwuid(euid).pw_dir
            except KeyError:
                home = "/"
    return os.path.join(os.path.normpath(home), ".cache", "clip-supervisor")
