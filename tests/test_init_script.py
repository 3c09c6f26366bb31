"""etc/: the LSB init script run as an operator would, the systemd unit (verified, rated by
systemd-analyze security, and its readiness protocol), the logrotate rule.

The init script runs from the checkout: CLIP_SUPERVISOR_DEFAULTS points it at a defaults
file (the test's /etc/default/clip-supervisor) naming this virtualenv's command, the test's
config, pid file and log. Every exit code is the LSB one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from supervisor import notify
from supervisor.pidfile import holder
from tests.conftest import ROOT, gone, start_with_env, wait_for

SCRIPT = os.path.join(ROOT, "etc", "init.d", "clip-supervisor")
DAEMON = os.path.join(os.path.dirname(sys.executable), "clip-supervisor")

pytestmark = pytest.mark.skipif(
    not (shutil.which("start-stop-daemon") and os.path.exists("/lib/lsb/init-functions")),
    reason="needs start-stop-daemon and /lib/lsb/init-functions (Debian)")


def _defaults(env, **values) -> str:
    path = os.path.join(env.tmp, "default-clip-supervisor")
    settings = {"DAEMON": DAEMON, "CONFIG": env.conf, "PIDFILE": env.pidfile,
                "LOGFILE": env.log, "STOP_TIMEOUT": "25", **values}
    with open(path, "w") as fh:
        fh.writelines(f'{key}="{value}"\n' for key, value in settings.items())
    return path


def _init(defaults: str, action: str, **extra_env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "CLIP_SUPERVISOR_DEFAULTS": defaults, **extra_env}
    return subprocess.run([SCRIPT, action], env=environ, capture_output=True, text=True,
                          timeout=60)


def _family(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


def _master(env) -> int:
    pid = holder(env.pidfile)[1]
    assert pid is not None and pid > 0
    return pid


def test_init_script_lifecycle_with_lsb_exit_codes(daemon_env):
    env = daemon_env
    defaults = _defaults(env)
    ours: set[int] = set()

    # start: 0, and the pid file names the master, which runs its workers
    start = _init(defaults, "start")
    assert start.returncode == 0, start.stderr
    pid = _master(env)
    workers = env.wait_workers(_Pid(pid), 2)
    ours.update([pid, *workers])
    with open(f"/proc/{pid}/cmdline") as fh:
        assert fh.read().startswith("clip-supervisor: master")

    # status: 0, with the pid
    status = _init(defaults, "status")
    assert status.returncode == 0 and f"running (pid {pid}, 2 workers" in status.stdout

    # start again: harmless, 0, same master
    again = _init(defaults, "start")
    assert again.returncode == 0 and "already running" in again.stdout
    assert _master(env) == pid

    # reload: 0, the same master replaces its workers
    reload = _init(defaults, "reload")
    assert reload.returncode == 0, reload.stderr
    replaced = wait_for(lambda: (w := env.workers(_Pid(pid))) and len(w) == 2
                        and not set(w) & set(workers) and w, 10, what="workers replaced")
    ours.update(replaced)
    assert _master(env) == pid

    # reload and restart with a broken config: 6 (not configured), and it keeps running
    good = dict(env.settings["job"])
    env.settings["job"]["timeout"] = "never"
    env.conf  # noqa: B018 (the property rewrites the file)
    for action in ("reload", "restart"):
        broken = _init(defaults, action)
        assert broken.returncode == 6, (action, broken.stdout, broken.stderr)
        assert "[job] timeout" in broken.stderr
    assert _master(env) == pid
    env.settings["job"] = good
    env.conf  # noqa: B018

    # restart: 0, a new master
    restart = _init(defaults, "restart")
    assert restart.returncode == 0, restart.stderr
    new_pid = _master(env)
    assert new_pid != pid
    ours.update(_family(new_pid))
    env.wait_workers(_Pid(new_pid), 2)
    ours.update(_family(new_pid))

    # stop: 0, the pid file is gone and so is every process of ours
    stop = _init(defaults, "stop")
    assert stop.returncode == 0, stop.stderr
    assert holder(env.pidfile) == (False, None)
    wait_for(lambda: all(gone(p) for p in ours), 5, what="every process of ours gone")

    # status 3, reload 7 (LSB: not running), force-reload 7, stop again 0
    assert _init(defaults, "status").returncode == 3
    assert _init(defaults, "reload").returncode == 7
    assert _init(defaults, "force-reload").returncode == 7
    assert _init(defaults, "stop").returncode == 0

    # A pid file whose master died (nobody holds its lock): status 1; stop cleans it up
    with open(env.pidfile, "w") as fh:
        fh.write(f"{pid}\n")
    assert _init(defaults, "status").returncode == 1
    assert _init(defaults, "stop").returncode == 0
    assert not os.path.exists(env.pidfile)
    assert _init(defaults, "status").returncode == 3

    # An unknown action: usage, 3 (LSB: unimplemented)
    bogus = _init(defaults, "bogus")
    assert bogus.returncode == 3 and "Usage" in bogus.stderr


def test_init_script_start_failures(daemon_env):
    env = daemon_env
    # A config file that does not load: 6 (not configured), with the reason
    env.settings["supervisor"]["workers"] = "many"
    broken = _init(_defaults(env), "start")
    assert broken.returncode == 6 and "[supervisor] workers" in broken.stderr
    # A config file that does not exist: 6
    missing = _init(_defaults(env, CONFIG=os.path.join(env.tmp, "nope.conf")), "start")
    assert missing.returncode == 6
    # A daemon that is not installed: 5; its status is unknown: 4
    absent = _defaults(env, DAEMON=os.path.join(env.tmp, "no-such-command"))
    assert _init(absent, "start").returncode == 5
    assert _init(absent, "status").returncode == 4
    assert not os.path.exists(env.pidfile)


STUB = """#!/bin/sh
# Stands in for clip-supervisor: records who runs "run --daemon" and with what.
case "$1" in
    status) exit 3 ;;
    run) case " $* " in *" --check-config "*) exit 0 ;; esac
         echo "$(id -un) $*" >> "$STUB_RECORD" ;;
esac
exit 0
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_init_script_runs_the_daemon_as_user_with_its_folders(env):
    # Given a stand-in daemon and folders that the unprivileged user "nobody" can reach
    base = tempfile.mkdtemp(prefix="clip-init-")
    try:
        os.chmod(base, 0o777)
        stub = os.path.join(base, "clip-supervisor")
        with open(stub, "w") as fh:
            fh.write(STUB)
        os.chmod(stub, 0o755)
        record = os.path.join(base, "record")
        pidfile = os.path.join(base, "run", "clip-supervisor.pid")
        logfile = os.path.join(base, "log", "clip-supervisor.log")
        env.pidfile = pidfile
        defaults = _defaults(env, DAEMON=stub, PIDFILE=pidfile, LOGFILE=logfile,
                             USER="nobody")

        # When the init script starts it
        started = _init(defaults, "start", STUB_RECORD=record)

        # Then the daemon ran as nobody, with the pid file and log, in folders nobody owns
        assert started.returncode == 0, started.stderr
        with open(record) as fh:
            line = fh.read().strip()
        assert line == (f"nobody run --daemon --config {env.conf} --pidfile {pidfile} "
                        f"--logfile {logfile}")
        for folder in (os.path.dirname(pidfile), os.path.dirname(logfile)):
            assert os.stat(folder).st_uid == 65534 and stat.S_ISDIR(os.stat(folder).st_mode)

        # And without USER in the defaults file, a USER in the caller's environment is
        # ignored: the daemon runs as root
        os.remove(record)
        defaults = _defaults(env, DAEMON=stub, PIDFILE=pidfile, LOGFILE=logfile)
        assert _init(defaults, "start", STUB_RECORD=record, USER="nobody").returncode == 0
        with open(record) as fh:
            assert fh.read().startswith("root run --daemon")
    finally:
        shutil.rmtree(base, ignore_errors=True)


UNIT = os.path.join(ROOT, "etc", "systemd", "clip-supervisor.service")


def _unit(tmp_path) -> tuple[str, str]:
    """The unit, pointed at this virtualenv's command (verify checks that it exists)."""
    with open(UNIT) as fh:
        unit = fh.read().replace("/usr/bin/clip-supervisor", DAEMON)
    path = tmp_path / "clip-supervisor.service"
    path.write_text(unit)
    return str(path), unit


def _directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.replace("\\\n", " ").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    path, unit = _unit(tmp_path)

    # Then systemd finds nothing to complain about
    done = subprocess.run(["systemd-analyze", "verify", path], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr

    # And it runs the installed command as the package's user, ready when the master serves
    with open(UNIT) as fh:
        d = _directives(fh.read())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["User"] == ["clip-supervisor"] and d["Group"] == ["clip-supervisor"]
    assert all(cmd.startswith("/usr/bin/clip-supervisor run ")
               for cmd in d["ExecStart"] + d["ExecStartPre"])
    assert "--daemon" not in d["ExecStart"][0]  # the master is the main process
    assert d["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    # with the source cache kept across restarts: work_dir and the cache live under
    # StateDirectory (/var/lib/clip-supervisor) or CacheDirectory, never in a PrivateTmp
    assert d["StateDirectory"] == ["clip-supervisor"] and d["CacheDirectory"] == ["clip-supervisor"]
    assert d["Environment"] == ["XDG_CACHE_HOME=/var/cache"]
    assert not [value for values in d.values() for value in values if "/tmp" in value]
    assert d["ReadWritePaths"] == ["/var/lib/clip-supervisor /var/log/clip-supervisor"]
    # and the graceful stop of the daemon's default graceful_timeout (30 s) fits
    assert int(d["TimeoutStopSec"][0]) > 30 and d["KillMode"] == ["mixed"]


def _exposure(path: str) -> tuple[subprocess.CompletedProcess, float]:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=30",
                           "--no-pager", path], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    return done, float(found.group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_is_hardened(tmp_path):
    # Given the unit file alone (no systemd needs to run: --offline reads the file)
    path, unit = _unit(tmp_path)
    probe = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True,
                           text=True, timeout=30)
    if "--offline" not in probe.stdout:
        pytest.skip("systemd-analyze too old for security --offline (systemd >= 250)")

    # When systemd rates its exposure
    done, exposure = _exposure(path)

    # Then it is at most 3.0 ("OK"), and the threshold check agrees
    assert exposure <= 3.0 and done.returncode == 0, done.stdout
    d = _directives(unit)
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                       ("PrivateDevices", "yes"), ("ProtectKernelTunables", "yes"),
                       ("ProtectKernelModules", "yes"), ("ProtectKernelLogs", "yes"),
                       ("SystemCallFilter", "@system-service"),
                       ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6")):
        assert value in d[key], key

    # And the same unit stripped of its hardening rates far worse: the rating is the
    # hardening's, not a constant
    bare = "\n".join(line for line in unit.splitlines()
                     if line.partition("=")[0] not in HARDENING)
    bare_path = tmp_path / "bare" / "clip-supervisor.service"
    bare_path.parent.mkdir()
    bare_path.write_text(bare)
    assert _exposure(str(bare_path))[1] > 8.0


HARDENING = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateIPC",
             "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities",
             "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
             "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc",
             "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
             "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute", "RemoveIPC",
             "UMask", "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber",
             "DevicePolicy", "ReadWritePaths"}


def test_sd_notify_reaches_a_socket_then_is_forgotten(tmp_path):
    # Given a datagram socket standing in for systemd's, on a path and in the abstract
    # namespace
    for name in (str(tmp_path / "notify"), f"@clip-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(name if not name.startswith("@") else "\0" + name[1:])
            server.settimeout(5)
            environ = {"NOTIFY_SOCKET": name}

            # When the master reports ready
            assert notify.ready(environ) is True

            # Then systemd hears READY=1, and the variable is gone for the workers to come
            assert server.recv(4096).decode().split("\n")[0] == "READY=1"
            assert "NOTIFY_SOCKET" not in environ
    # Without systemd (no variable, or a socket nobody listens on) nothing happens
    assert notify.ready({}) is False
    assert notify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False


def test_run_in_the_foreground_notifies_systemd_once_it_serves(env, tmp_path):
    # Given a socket standing in for systemd's (Type=notify runs the master in the
    # foreground with NOTIFY_SOCKET set)
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(30)

        # When the supervisor starts
        proc = start_with_env(env, {"NOTIFY_SOCKET": path})
        try:
            # Then READY=1 arrives, and the master runs its workers
            message = server.recv(4096).decode()
            assert "READY=1" in message.split("\n")
            env.wait_workers(proc, 2)
        finally:
            assert env.stop(proc) == 0


ENV_STUB = """#!/bin/sh
# Stands in for clip-supervisor: records some variables "run --daemon" gets.
case "$1" in
    status) exit 3 ;;
    run) case " $* " in *" --check-config "*) exit 0 ;; esac
         env | grep -E '^(CLIP_SUPERVISOR_|GOOGLE_|DAEMON|STOP_TIMEOUT)' | sort \
             > "$STUB_RECORD" ;;
esac
exit 0
"""


def test_init_script_exports_the_defaults_files_variables(daemon_env, tmp_path):
    env = daemon_env
    # Given a defaults file that sets variables for the daemon, with and without "export"
    stub = tmp_path / "clip-supervisor"
    stub.write_text(ENV_STUB)
    stub.chmod(0o755)
    record = tmp_path / "record"
    defaults = _defaults(env, DAEMON=str(stub), PIDFILE=str(tmp_path / "run" / "x.pid"),
                         LOGFILE=str(tmp_path / "log" / "x.log"))
    with open(defaults, "a") as fh:
        fh.write("CLIP_SUPERVISOR_REDIS_URL=redis://127.0.0.1:1/0\n"
                 "export CLIP_SUPERVISOR_JOB_TIMEOUT=60\n"
                 "  GOOGLE_APPLICATION_CREDENTIALS=/etc/key.json\n")

    # When the init script starts the service from an empty environment, as "service" does
    started = subprocess.run(
        ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"STUB_RECORD={record}",
         f"CLIP_SUPERVISOR_DEFAULTS={defaults}", SCRIPT, "start"],
        capture_output=True, text=True, timeout=60)

    # Then the daemon gets those variables, and none of the init script's own (DAEMON,
    # STOP_TIMEOUT, CLIP_SUPERVISOR_DEFAULTS)
    assert started.returncode == 0, started.stderr
    assert record.read_text().splitlines() == [
        "CLIP_SUPERVISOR_JOB_TIMEOUT=60", "CLIP_SUPERVISOR_REDIS_URL=redis://127.0.0.1:1/0",
        "GOOGLE_APPLICATION_CREDENTIALS=/etc/key.json"]


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="no logrotate")
def test_logrotate_rule_makes_the_daemon_reopen_its_log(daemon_env):
    env = daemon_env
    # Given a daemon logging into a folder, and the logrotate rule pointed at that folder
    logs = os.path.join(env.tmp, "logs")
    os.makedirs(logs)
    env.log = os.path.join(logs, "clip-supervisor.log")
    env.settings["supervisor"]["logfile"] = env.log
    with open(os.path.join(ROOT, "etc", "logrotate.d", "clip-supervisor")) as fh:
        rule = fh.read().replace("/var/log/clip-supervisor", logs) \
            .replace("/run/clip-supervisor/clip-supervisor.pid", env.pidfile)
    conf = os.path.join(env.tmp, "logrotate.conf")
    with open(conf, "w") as fh:
        fh.write(rule)
    env.cli("run", "--daemon")
    pid = _master(env)
    env.wait_workers(_Pid(pid), 2)

    # When logrotate rotates (forced: the log is young)
    done = subprocess.run(["logrotate", "-f", "-s", os.path.join(env.tmp, "state"), conf],
                          capture_output=True, text=True, timeout=30)

    # Then the old log moved aside and the master (told by postrotate) writes a new one
    assert done.returncode == 0, done.stderr
    assert os.path.exists(env.log + ".1")
    wait_for(lambda: "USR1: log files reopened" in env.log_text(), 5,
             what="the master to reopen its log")
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: holder(env.pidfile)[1] is None, 10, what="the daemon to stop")


class _Pid:
    """What Env.workers and Env.wait_workers need of a process: its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
