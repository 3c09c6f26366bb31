"""Local files the daemon makes or follows cannot be hijacked by another local user.

The daemon runs as root under the init script, so each of these is run as root, for real: a
work_dir made first by another user, symbolic links planted at work_dir, at its cache, inside
the cache, inside output_base and at the log's path. Each must be refused (the start, with one
clear line) or treated as damage (the cache), and never followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import stat
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import Env, wait_for
from worker import config as config_mod
from worker.cache import Identity, SourceCache
from worker.config import StorageConfig
from worker.errors import Permanent, Transient
from worker.fsafe import default_work_dir
from worker.storage import store_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="planting other users' files "
                                "needs root, as the daemon's default does")

START_TIMEOUT = 30  # a refused start exits at once; this only bounds a broken one


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _snapshot(folder: str) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry under ``folder`` (itself included): mode, owner and a file's bytes."""
    seen = {}
    for base, dirs, files in os.walk(folder):
        for name in [".", *dirs, *files]:
            path = os.path.normpath(os.path.join(base, name))
            st = os.lstat(path)
            data = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    data = fh.read()
            seen[os.path.relpath(path, folder)] = (st.st_mode, st.st_uid, data)
    return seen


def _refused(env: Env, *extra: str) -> str:
    """Run the supervisor; it must exit 1 at once with one line and no traceback: the line."""
    proc = env.start(*extra)
    try:
        _, err = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the supervisor started instead of refusing to") from None
    text = err.decode().strip()
    assert proc.returncode == 1, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def _plant_cache(cache: str, video: bytes) -> None:
    """A "kept" record and its file, as another user would plant them for some URL."""
    os.makedirs(cache, exist_ok=True)
    key = SourceCache.key("http://127.0.0.1/ten.mp4")
    with open(os.path.join(cache, f"{key}.json"), "w") as fh:
        json.dump({"size": len(video), "validator": '"v"', "rent": 0, "kept": True}, fh)
    with open(os.path.join(cache, f"{key}.data"), "wb") as fh:
        fh.write(video)


# --- work_dir and its cache ---------------------------------------------------------------


def test_default_work_dir_is_never_in_a_shared_folder():
    # Given root, and a user with and without XDG_CACHE_HOME (relative values are ignored)
    # Then root's is beside the package's output_base, a user's is in their own cache
    assert default_work_dir(euid=0, environ={}) == "/var/lib/clip-supervisor/work"
    assert default_work_dir(euid=1000, environ={"XDG_CACHE_HOME": "/srv/u/cache/",
                                                "HOME": "/home/u"}) == \
        "/srv/u/cache/clip-supervisor"
    assert default_work_dir(euid=1000, environ={"HOME": "/home/u"}) == \
        "/home/u/.cache/clip-supervisor"
    assert default_work_dir(euid=1000, environ={"XDG_CACHE_HOME": "rel", "HOME": "/home/u"}) \
        == "/home/u/.cache/clip-supervisor"
    # And an empty [job] work_dir (the built-in default) is that folder
    assert config_mod.load(None, env={}).job.work_dir == default_work_dir()
    assert not config_mod.load(None, env={}).job.work_dir.startswith(("/tmp/", "/var/tmp/"))


def test_a_work_dir_made_first_by_another_user_is_refused_and_its_cache_never_used(env):
    # Given a work_dir that another user made first, with a "kept" video planted in its cache
    uid, gid = _nobody()
    _plant_cache(os.path.join(env.work, "cache"), b"not the source" * 100)
    for base, dirs, files in os.walk(env.work):
        for name in [".", *dirs, *files]:
            os.chown(os.path.join(base, name), uid, gid)
    before = _snapshot(env.work)

    # When the supervisor starts (and when the configuration is checked)
    line = _refused(env)
    check = env.cli("run", "--check-config", check=False)

    # Then both refuse with one line naming work_dir and its owner, and nothing was touched
    assert line == (f"clip-supervisor: unsafe work_dir {env.work}: owned by nobody "
                    f"(uid {uid}), not by root (uid 0) that runs clip-supervisor")
    assert check.returncode == 1 and check.stderr.strip() == line
    assert _snapshot(env.work) == before


def test_a_work_dir_that_is_a_symlink_is_refused(env):
    # Given work_dir planted as a link to a folder of root's
    elsewhere = os.path.join(env.tmp, "elsewhere")
    os.mkdir(elsewhere, 0o700)
    os.symlink(elsewhere, env.work)

    # When the supervisor starts
    line = _refused(env)

    # Then it says so, and made nothing in the folder the link points to
    assert line == (f"clip-supervisor: unsafe work_dir {env.work}: is a symbolic link "
                    "(not followed: it could point anywhere)")
    assert os.listdir(elsewhere) == []


def test_a_work_dir_under_a_folder_others_can_write_is_refused(env):
    # Given work_dir inside a folder that anyone may write to, without the sticky bit
    # (anyone could rename work_dir away and put their own in its place)
    shared = os.path.join(env.tmp, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    env.settings["job"]["work_dir"] = os.path.join(shared, "work")

    # When the supervisor starts
    line = _refused(env)

    # Then it names the folder above work_dir and why
    assert line == (f"clip-supervisor: unsafe work_dir {shared}/work: the folder above it, "
                    f"{shared}, is writable by group or others (mode 0777) and not sticky")
    assert not os.path.exists(os.path.join(shared, "work"))


def test_a_cache_folder_that_is_a_symlink_is_refused_and_its_target_untouched(env):
    # Given our own work_dir, whose cache is a link to another folder (with a file in it)
    os.mkdir(env.work, 0o700)
    target = os.path.join(env.tmp, "precious")
    os.mkdir(target, 0o755)
    with open(os.path.join(target, "data.txt"), "w") as fh:
        fh.write("keep me")
    os.symlink(target, os.path.join(env.work, "cache"))
    before = _snapshot(target)

    # When the supervisor starts
    line = _refused(env)

    # Then it refuses, and the folder the link points to keeps its mode and contents
    assert line == (f"clip-supervisor: unsafe cache_dir {env.work}/cache: is a symbolic link "
                    "(not followed: it could point anywhere)")
    assert _snapshot(target) == before


def test_the_work_dir_and_cache_made_at_start_are_private(env):
    # Given no work_dir yet
    # When the supervisor starts
    proc = env.start()
    env.wait_workers(proc, 2)

    # Then work_dir and its cache are ours alone (0700)
    for folder in (env.work, os.path.join(env.work, "cache")):
        st = os.lstat(folder)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0, folder
        assert stat.S_IMODE(st.st_mode) == 0o700, (folder, oct(st.st_mode))
    assert env.stop(proc) == 0


# --- inside the cache ------------------------------------------------------------------------


def test_another_users_kept_file_in_the_cache_is_damage_not_a_source(tmp_path, caplog):
    # Given our cache folder, in which another user's "kept" record and file sit
    folder = str(tmp_path / "cache")
    os.mkdir(folder, 0o700)
    _plant_cache(folder, b"x" * 3000)
    uid, gid = _nobody()
    for name in os.listdir(folder):
        os.chown(os.path.join(folder, name), uid, gid)
    cache = SourceCache(folder, max_bytes=10_000, keep_free=0)

    # When a worker looks the URL up
    entry = cache.lookup("http://127.0.0.1/ten.mp4")

    # Then nothing is used: the cache turns itself off, and says why once
    assert entry is None and cache.off
    assert caplog.text.count("is off for this worker") == 1
    assert "owned by uid 65534" in caplog.text


def test_a_symlink_planted_in_the_cache_is_never_followed(tmp_path, caplog):
    # Given a cache in use, then a link planted at its lock file and one at a record
    folder = str(tmp_path / "cache")
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    outside.chmod(0o644)
    url = "http://127.0.0.1/ten.mp4"
    key = SourceCache.key(url)
    os.mkdir(folder, 0o700)
    os.symlink(outside, os.path.join(folder, ".lock"))
    os.symlink(outside, os.path.join(folder, f"{key}.json"))
    cache = SourceCache(folder, max_bytes=10_000, keep_free=0)

    # When a worker counts bytes read in place and looks the source up
    cache.rent(url, Identity(3000, '"v"'), 1000)
    entry = cache.lookup(url)

    # Then the cache is off (once), and the file the links point to is as it was
    assert entry is None and cache.off
    assert caplog.text.count("is off for this worker") == 1 and "symbolic link" in caplog.text
    assert outside.read_text() == "untouched" and stat.S_IMODE(outside.stat().st_mode) == 0o644


# --- outputs --------------------------------------------------------------------------------


def test_a_symlink_inside_output_base_sends_no_clip_out_of_it(env):
    # Given output_base with a folder link and a file link to places outside it
    os.makedirs(env.out)
    outside = os.path.join(env.tmp, "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, "existing.mp4"), "w") as fh:
        fh.write("not a clip")
    os.symlink(outside, os.path.join(env.out, "evil"))
    os.symlink(os.path.join(outside, "existing.mp4"), os.path.join(env.out, "link.mp4"))
    before = _snapshot(outside)
    proc = env.start()
    env.wait_workers(proc, 2)

    # When jobs name outputs through them, and one job a plain output
    env.push({"id": "through-folder", "url": env.url("ten.mp4"), "duration": 1,
               "output": "evil/x.mp4"},
              {"id": "onto-link", "url": env.url("ten.mp4"), "duration": 1,
               "output": "link.mp4"},
              {"id": "plain", "url": env.url("ten.mp4"), "duration": 1, "output": "ok/p.mp4"})
    env.wait_finished(3)

    # Then both linked ones are dead-lettered as output_not_allowed (a permanent reason),
    # nothing was written outside, and the plain one is done
    dead = {letter["id"]: letter for letter in env.dead_letters()}
    assert set(dead) == {"through-folder", "onto-link"}
    for letter in dead.values():
        assert letter["reason"] == "output_not_allowed", letter
        assert "symbolic link" in letter["error"]
    assert [e["id"] for e in env.done_events()] == ["plain"]
    assert os.path.isfile(os.path.join(env.out, "ok", "p.mp4"))
    assert _snapshot(outside) == before
    assert env.stop(proc) == 0


@contextlib.contextmanager
def _tmpfs(path: str, options: str) -> Iterator[str]:
    os.makedirs(path)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def _storage(output_base: str, allowed: str = "") -> StorageConfig:
    return config_mod.load(None, env={}, overrides={"storage.output_base": output_base,
                                                    "storage.allowed_outputs": allowed}).storage


def _clip(folder: str, size: int) -> str:
    path = os.path.join(folder, "clip.mp4")
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
    return path


def test_a_full_or_read_only_output_folder_is_the_hosts_fault(tmp_path):
    # Given a worker folder on another file system than two output folders: one full (a
    # 256 KiB tmpfs), one read-only
    work = str(tmp_path / "w")
    with _tmpfs(work, "size=8m"), _tmpfs(str(tmp_path / "full"), "size=256k") as full, \
            _tmpfs(str(tmp_path / "ro"), "ro,size=1m") as ro:
        # When a 1 MiB clip is stored in each
        storage = _storage(f"file://{full}", f"file://{ro}")
        with pytest.raises(Transient) as no_room:
            store_for(f"file://{full}/a.mp4", work, storage).put(
                _clip(work, 1 << 20), f"file://{full}/a.mp4", {})
        with pytest.raises(Transient) as read_only:
            store_for(f"file://{ro}/b.mp4", work, storage).put(
                _clip(work, 1 << 20), f"file://{ro}/b.mp4", {})

        # Then neither is blamed on the job: disk_full and output_not_writable, transient,
        # and nothing partial is left in the full folder
        assert no_room.value.reason == "disk_full"
        assert read_only.value.reason == "output_not_writable"
        assert os.listdir(full) == []
        assert not os.path.exists(os.path.join(work, "pending-output"))


def test_an_output_name_too_long_is_refused_not_retried(tmp_path):
    # Given an output name longer than a file name may be
    url = f"file://{tmp_path}/out/{'n' * 300}.mp4"
    store = store_for(url, str(tmp_path), _storage(f"file://{tmp_path}/out"))
    # Then storing it is the job's permanent fault
    with pytest.raises(Permanent) as refused:
        store.put(_clip(str(tmp_path), 10), url, {})
    assert refused.value.reason == "output_not_allowed"


# --- the log and the pid file ------------------------------------------------------------


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_a_symlink_at_the_log_path_stops_the_start(daemon_env, daemon):
    env = daemon_env
    # Given the log's path planted as a link to a file of root's
    target = os.path.join(env.tmp, "shadow")
    with open(target, "w") as fh:
        fh.write("root:x:0:0\n")
    os.symlink(target, env.log)

    # When the supervisor starts
    if daemon:
        done = env.cli("run", "--daemon", check=False)
        line, code = done.stderr.strip(), done.returncode
        assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    else:
        line, code = _refused(env), 1

    # Then it refuses, naming the log, and the link's target is unchanged
    assert code == 1
    assert line == (f"clip-supervisor: cannot open log file {env.log}: is a symbolic link "
                    "(not followed: it could point anywhere)")
    with open(target) as fh:
        assert fh.read() == "root:x:0:0\n"
    assert not os.path.exists(env.pidfile) and not os.path.exists(env.work)


def test_a_symlink_planted_at_the_log_path_after_rotation_is_not_reopened(env):
    # Given a running supervisor, whose log is rotated away and replaced by a link
    proc = env.start()
    env.wait_workers(proc, 2)
    target = os.path.join(env.tmp, "shadow")
    with open(target, "w") as fh:
        fh.write("root:x:0:0\n")
    rotated = env.log + ".1"
    os.rename(env.log, rotated)
    os.symlink(target, env.log)

    # When it is told to reopen its log (USR1, as logrotate does)
    proc.send_signal(signal.SIGUSR1)

    # Then the master and each worker keep writing to the old file and say why there
    def refusals() -> int:
        with open(rotated) as fh:
            return fh.read().count(f"cannot reopen the log file {env.log}: is a symbolic link")
    wait_for(lambda: refusals() >= 3, 10, what="master and both workers to refuse the link")
    with open(target) as fh:
        assert fh.read() == "root:x:0:0\n"
    assert env.stop(proc) == 0
    with open(target) as fh:
        assert fh.read() == "root:x:0:0\n"


def test_a_symlink_at_the_pid_file_path_is_refused(daemon_env):
    env = daemon_env
    # Given the pid file's path planted as a link to a file holding pid 1
    os.makedirs(os.path.dirname(env.pidfile))
    target = os.path.join(env.tmp, "init.pid")
    with open(target, "w") as fh:
        fh.write("1\n")
    os.symlink(target, env.pidfile)

    # When the daemon starts, and "stop" is asked
    try:
        start = env.cli("run", "--daemon", check=False)
        stop = env.cli("stop", check=False)
    finally:
        os.unlink(env.pidfile)  # the fixture's own look at the pid file must not trip on it

    # Then the start is refused with one line, stop signals nobody, the target is unchanged
    assert start.returncode == 1, start.stderr
    assert start.stderr.strip() == (f"clip-supervisor: cannot read pid file {env.pidfile}: "
                                    "is a symbolic link (not followed: it could point "
                                    "anywhere)")
    assert stop.returncode == 1 and "symbolic link" in stop.stderr
    with open(target) as fh:
        assert fh.read() == "1\n"
