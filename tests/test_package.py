"""The Debian package, installed and run on this machine the way an operator would.

scripts/build-deb.sh builds it twice (the second time as a newer version); dpkg installs
it for real: the clip-supervisor user, its folders, /usr/bin/clip-supervisor; "service"
starts the daemon through the init script as that user, against a private redis-server
named in /etc/default/clip-supervisor; a job is clipped into /var/lib/clip-supervisor; an
upgrade keeps the operator's edits and the running service; "dpkg -r" stops the daemon and
"dpkg --purge" removes the user and the data. lintian finds no error. Whatever happens,
the package is purged at the end.

This machine has no systemd as PID 1: the init script is what runs the service here (and
its policy-rc.d forbids invoke-rc.d every action, as in containers; the maintainer scripts
stop the daemon all the same when its program is removed or replaced).
"""

from __future__ import annotations

import glob
import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess

import psutil
import pytest

from supervisor.pidfile import holder
from tests.conftest import ROOT, wait_for

BUILD = os.path.join(ROOT, "scripts", "build-deb.sh")
USER = "clip-supervisor"
PIDFILE = "/run/clip-supervisor/clip-supervisor.pid"
CONFIG = "/etc/clip-supervisor.conf"
DEFAULTS = "/etc/default/clip-supervisor"
STATE = "/var/lib/clip-supervisor"
LOGS = "/var/log/clip-supervisor"


def _installed() -> str | None:
    """The installed version of the package, or None."""
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", USER],
                          capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.startswith("install ok installed"):
        return None
    return done.stdout.split()[-1]


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="dpkg -i needs root"),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg (Debian)"),
    pytest.mark.skipif(os.path.isdir("/run/systemd/system"),
                       reason="systemd runs this machine: the init script path is not used"),
    pytest.mark.skipif(_installed() is not None,
                       reason="clip-supervisor is installed here: not replacing it"),
]


def _run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # dpkg with no terminal: a conffile question would fail the command, not hang it.
    environ = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=environ)


def _build(outdir: str, suffix: str = "") -> str:
    done = subprocess.run(["bash", BUILD, outdir], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "BUILD_VERSION_SUFFIX": suffix})
    assert done.returncode == 0, done.stderr
    deb = done.stdout.strip().splitlines()[-1]
    assert os.path.basename(deb).startswith("clip-supervisor_") and deb.endswith(".deb")
    return deb


def _master() -> int | None:
    return holder(PIDFILE)[1] if os.path.exists(PIDFILE) else None


def _workers(master: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(master).children()
            if " ".join(p.cmdline()).startswith("clip-supervisor: worker")]


def _clip(r, http, job_id: str) -> dict:
    r.lpush("{clips}:queue", json.dumps({"id": job_id, "url": http.url("ten.mp4"),
                                         "start": 1, "duration": 2}))

    def finished():
        for raw in r.lrange("{clips}:done", 0, -1):
            event = json.loads(raw)
            if event["id"] == job_id:
                return event
        dead = [json.loads(x) for x in r.lrange("{clips}:dead", 0, -1)]
        assert not [d for d in dead if d["id"] == job_id], dead
        return None

    return wait_for(finished, 60, interval=0.1, what=f"job {job_id} done")


def _cleanup() -> None:
    if _installed() is not None:
        _run("/etc/init.d/clip-supervisor", "stop", timeout=90)
        _run("dpkg", "--purge", USER)
    for proc in psutil.process_iter(["username"]):
        if proc.info["username"] == USER:
            proc.send_signal(signal.SIGKILL)


def test_debian_package_install_run_upgrade_remove_purge(tmp_path, redis_server, http):
    try:
        _lifecycle(tmp_path, redis_server, http)
    finally:
        _cleanup()


def _lifecycle(tmp_path, redis_server, http) -> None:
    # Given two builds of the package, the second one newer
    deb = _build(str(tmp_path / "one"))
    newer = _build(str(tmp_path / "two"), suffix="+test1")
    version = os.path.basename(deb).split("_")[1]
    assert os.path.basename(newer).split("_")[1] == version + "+test1"
    assert _run("dpkg", "--compare-versions", version + "+test1", "gt", version).returncode == 0

    # Then lintian finds no error in it
    lint = _run("lintian", deb)
    assert lint.returncode == 0 and not [line for line in lint.stdout.splitlines()
                                         if line.startswith("E:")], lint.stdout + lint.stderr

    # When it is installed
    install = _run("dpkg", "-i", deb)
    assert install.returncode == 0, install.stdout + install.stderr
    assert _installed() == version

    # Then the system user, its folders and the command are there
    account = pwd.getpwnam(USER)
    assert account.pw_uid < 1000 and grp.getgrgid(account.pw_gid).gr_name == USER
    for path, mode in ((STATE, 0o750), (f"{STATE}/work", 0o700), (f"{STATE}/clips", 0o750),
                       (LOGS, 0o750)):
        st = os.stat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (account.pw_uid, mode), path
    st = os.stat(CONFIG)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, account.pw_gid, 0o640)
    assert os.path.realpath("/usr/bin/clip-supervisor").startswith("/opt/clip-supervisor/")
    assert _run("/usr/bin/clip-supervisor", "--help").returncode == 0
    # with die-with-parent, which every ffmpeg is started through, built and runnable
    helpers = glob.glob("/opt/clip-supervisor/lib/python3*/site-packages/clip_supervisor/"
                        "root/worker/die-with-parent")
    assert len(helpers) == 1 and stat.S_IMODE(os.stat(helpers[0]).st_mode) == 0o755
    assert _run(helpers[0], shutil.which("true") or "/bin/true").returncode == 0
    conffiles = _run("dpkg-query", "-W", "-f", "${Conffiles}", USER).stdout
    for path in (CONFIG, DEFAULTS, "/etc/init.d/clip-supervisor",
                 "/etc/logrotate.d/clip-supervisor"):
        assert f" {path} " in conffiles, conffiles
    # (a machine without policy-rc.d started it against the default Redis: not that one)
    _run("service", USER, "stop", timeout=90)

    # When the operator points it at a Redis through /etc/default/clip-supervisor, edits the
    # configuration, and starts the service
    with open(DEFAULTS, "a") as fh:
        fh.write(f"CLIP_SUPERVISOR_REDIS_URL={redis_server.url}\n"
                 "CLIP_SUPERVISOR_JOB_ALLOW_PRIVATE_NETWORKS=true\n"
                 "CLIP_SUPERVISOR_JOB_RETRY_BACKOFF=0.2\n")
    with open(CONFIG) as fh:
        text = fh.read()
    assert "\nworkers = auto\n" in text
    with open(CONFIG, "w") as fh:
        fh.write(text.replace("\nworkers = auto\n", "\nworkers = 1\n"))
    start = _run("service", USER, "start", timeout=90)
    assert start.returncode == 0, start.stdout + start.stderr

    # Then the master and its one worker run as the package's user, and a job is clipped
    # into /var/lib/clip-supervisor/clips
    master = _master()
    assert master is not None and master > 0
    assert psutil.Process(master).uids().real == account.pw_uid
    workers = wait_for(lambda: _workers(master), 10, what="the worker")
    assert len(workers) == 1 and workers[0].uids().real == account.pw_uid
    r = redis_server.client()
    event = _clip(r, http, "pkg-1")
    assert event["output"] == f"file://{STATE}/clips/pkg-1.mp4"
    assert os.stat(f"{STATE}/clips/pkg-1.mp4").st_uid == account.pw_uid
    assert os.path.getsize(f"{STATE}/clips/pkg-1.mp4") > 0
    with open(f"{LOGS}/clip-supervisor.log") as fh:
        assert "job pkg-1 done" in fh.read()
    assert _run("service", USER, "status").returncode == 0

    # When the newer build is installed over it
    upgrade = _run("dpkg", "-i", newer)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert _installed() == version + "+test1"

    # Then the edits are kept (no question asked), and the service runs again: a new
    # master, with the one worker the edited file asks for, which clips the next job
    with open(CONFIG) as fh:
        assert "\nworkers = 1\n" in fh.read()
    with open(DEFAULTS) as fh:
        assert f"CLIP_SUPERVISOR_REDIS_URL={redis_server.url}\n" in fh.read()
    assert not psutil.pid_exists(master) or psutil.Process(master).status() == "zombie"
    upgraded = wait_for(_master, 30, what="the upgraded master")
    assert upgraded != master
    assert psutil.Process(upgraded).uids().real == account.pw_uid
    assert len(wait_for(lambda: _workers(upgraded), 10, what="the worker")) == 1
    assert _clip(r, http, "pkg-2")["output"] == f"file://{STATE}/clips/pkg-2.mp4"

    # When the package is removed
    remove = _run("dpkg", "-r", USER)
    assert remove.returncode == 0, remove.stdout + remove.stderr

    # Then the daemon is stopped (its lock is free) and the program gone; the data, the
    # configuration and the user stay until a purge
    assert holder(PIDFILE) == (False, None)
    wait_for(lambda: not [p for p in psutil.process_iter(["username"])
                          if p.info["username"] == USER], 10, what="the daemon's processes gone")
    assert not os.path.exists("/usr/bin/clip-supervisor")
    assert not os.path.exists("/opt/clip-supervisor")
    assert os.path.exists(f"{STATE}/clips/pkg-2.mp4") and os.path.exists(CONFIG)
    pwd.getpwnam(USER)

    # When it is purged
    purge = _run("dpkg", "--purge", USER)
    assert purge.returncode == 0, purge.stdout + purge.stderr

    # Then the user, its group, the data, the logs, the configuration and the links are gone
    with pytest.raises(KeyError):
        pwd.getpwnam(USER)
    with pytest.raises(KeyError):
        grp.getgrnam(USER)
    for path in (STATE, LOGS, CONFIG, DEFAULTS, "/etc/init.d/clip-supervisor"):
        assert not os.path.exists(path), path
    links = [name for folder in os.listdir("/etc") if folder.startswith("rc")
             and folder.endswith(".d") for name in os.listdir(os.path.join("/etc", folder))
             if name.endswith(USER)]
    assert links == []
    assert _installed() is None
