"""Pure logic: configuration, the slot state machine, the address guard, ffmpeg's report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from supervisor.children import Exit, Slot, SlotState, backoff_delay
from tests.conftest import gone, wait_for
from worker import config as config_mod
from worker.config import ConfigError
from worker.context import FetchLimits, JobContext
from worker.errors import Aborted, Permanent, Transient
from worker.media import Cut, FFmpegRun, InputReport
from worker.runner import EXIT_BOOT_ERROR, EXIT_OK
from worker.source import address_allowed
from worker.wake import Waker

# --- configuration -------------------------------------------------------------------------


def test_defaults_load_and_env_overrides_them(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[job]\ntimeout = 30\n[supervisor]\nworkers = 3\n")
    cfg = config_mod.load(str(path), env={"CLIP_SUPERVISOR_JOB_TIMEOUT": "45"})
    assert cfg.job.timeout == 45 and cfg.supervisor.workers == 3
    assert cfg.job.max_message_bytes == 1024 * 1024
    assert config_mod.load(None, env={}).supervisor.workers == (os.cpu_count() or 1)


@pytest.mark.parametrize("section, key, value, fragment", [
    ("job", "timeout", "abc", "[job] timeout"),
    ("job", "timeout", "-1", "positive"),
    ("supervisor", "workers", "0", "[supervisor] workers"),
    ("redis", "url", "http://x", "[redis] url"),
    ("storage", "output_base", "relative/dir", "[storage] output_base"),
    ("job", "mode", "fast", "copy, smart, encode"),
    ("job", "allowed_schemes", "http,smb", "smb"),
    ("job", "max_message_bytes", "lots", "[job] max_message_bytes"),
    ("metrics", "listen", "9187", "HOST:PORT"),
])
def test_a_bad_value_names_its_key(tmp_path, section, key, value, fragment):
    path = tmp_path / "c.conf"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(str(path), env={})
    assert fragment in str(info.value)


def test_unknown_keys_and_sections_are_errors(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[job]\ntimout = 3\n")
    with pytest.raises(ConfigError, match="unknown key \\[job\\] timout"):
        config_mod.load(str(path), env={})
    path.write_text("[jobs]\n")
    with pytest.raises(ConfigError, match="unknown section"):
        config_mod.load(str(path), env={})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="CLIP_SUPERVISOR_JOB_MAX_ATTEMPTS"):
        config_mod.load(None, env={"CLIP_SUPERVISOR_JOB_MAX_ATTEMPTS": "many"})


def test_sizes_accept_units():
    cfg = config_mod.load(None, env={"CLIP_SUPERVISOR_JOB_MAX_SOURCE_BYTES": "3MiB"})
    assert cfg.job.max_source_bytes == 3 * 1024 * 1024


def test_run_with_a_bad_config_exits_1_with_one_line(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[job]\ntimeout = soon\n")
    done = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "[job] timeout" in done.stderr and "Traceback" not in done.stderr


# --- slots -------------------------------------------------------------------------------------


def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(n, 5) for n in range(1, 7)] == [0.5, 1, 2, 4, 5, 5]


def test_a_crash_before_min_uptime_backs_off_and_a_long_run_resets_it():
    slot = Slot(index=1)
    crash = Exit(code=None, signal=signal.SIGKILL)
    slot.spawned(100, 0, now=0.0, generation=0)
    assert slot.exited(crash, now=0.2, min_uptime=1, backoff_max=30) == 0.5
    assert slot.state is SlotState.BACKOFF and not slot.due(0.6) and slot.due(0.7)
    slot.spawned(101, 0, now=1.0, generation=0)
    assert slot.exited(crash, now=1.1, min_uptime=1, backoff_max=30) == 1.0
    slot.spawned(102, 0, now=3.0, generation=0)
    slot.tick(4.5, min_uptime=1)
    assert slot.state is SlotState.RUNNING and slot.failures == 0
    assert slot.exited(crash, now=9.0, min_uptime=1, backoff_max=30) == 0
    assert slot.due(9.0)


def test_boot_error_always_backs_off_and_clean_exit_never_does():
    slot = Slot(index=1)
    slot.spawned(100, 0, now=0.0, generation=0)
    assert slot.exited(Exit(EXIT_BOOT_ERROR, None), 50.0, 1, 30) == 0.5
    slot.spawned(101, 0, now=60.0, generation=0)
    assert slot.exited(Exit(EXIT_OK, None), 60.1, 1, 30) == 0


def test_exit_descriptions():
    assert "out of memory" in Exit(None, signal.SIGKILL).describe()
    assert Exit(EXIT_OK, None).clean and not Exit(1, None).clean
    assert Exit.from_status(9) == Exit(code=None, signal=9)
    assert Exit.from_status(3 << 8) == Exit(code=3, signal=None)


# --- address guard (decisions only: nothing here opens a connection) -----------------------


@pytest.mark.parametrize("address", [
    "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "169.254.169.254", "127.0.0.1",
    "0.0.0.0", "100.64.0.1", "224.0.0.1", "255.255.255.255", "::1", "::", "fc00::1",
    "fe80::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "fe80::1%eth0",
    "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1", "2002:a9fe:a9fe::1", "::169.254.169.254",
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
])
def test_non_public_addresses_are_refused(address):
    assert not address_allowed(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888",
                                     "::ffff:8.8.8.8", "172.32.0.1"])
def test_public_addresses_are_allowed(address):
    assert address_allowed(address)


# --- the ffmpeg runner, on stand-in commands ----------------------------------------------


def _run(script: str, stall: float = 5.0, timeout: float = 20.0, abort=lambda: False):
    progress: list[float] = []
    ctx = JobContext(time.monotonic() + timeout, FetchLimits(5, stall, 1 << 30, False),
                     Waker(), should_abort=abort, on_progress=lambda p, s: progress.append(p))
    runner = FFmpegRun(["sh", "-c", script], ctx, Cut(start=0.0, length=10.0))
    return runner, progress


def test_a_flood_on_both_pipes_cannot_deadlock_and_progress_is_parsed():
    # 8 MB on stderr, far beyond a pipe's buffer, then a progress report on stdout.
    script = ("echo \"Input #0, mov,mp4, from 'x':\" >&2; "
              "echo '  Duration: 00:00:20.00, start: 0.000000, bitrate: 1 kb/s' >&2; "
              "echo '  Stream #0:0(und): Video: h264 (High), yuv420p' >&2; "
              "echo 'Output #0, mp4, to y:' >&2; "
              "head -c 8000000 /dev/zero | tr '\\0' x >&2; "
              "printf 'out_time_us=5000000\\ntotal_size=10\\nprogress=continue\\n'; "
              "printf 'out_time_us=10000000\\ntotal_size=20\\nprogress=end\\n'")
    runner, progress = _run(script)
    result = runner.run()
    assert result.out_time == 10.0 and result.size == 20
    assert progress == [50.0, 100.0]


def test_nonzero_exit_is_a_media_error_with_the_stderr_tail():
    header = ("echo \"Input #0, mov,mp4, from 'x':\" >&2; "
              "echo '  Duration: 00:00:20.00, start: 0.0' >&2; "
              "echo '  Stream #0:0: Video: h264' >&2; ")
    runner, _ = _run(header + "echo 'Invalid NAL unit size' >&2; exit 1")
    with pytest.raises(Permanent) as info:
        runner.run()
    assert info.value.reason == "media_error" and "Invalid NAL" in info.value.error


def test_an_input_ffmpeg_cannot_open_is_not_a_video():
    runner, _ = _run("echo 'x.html: Invalid data found when processing input' >&2; exit 1")
    with pytest.raises(Permanent) as info:
        runner.run()
    assert info.value.reason == "not_video" and "Invalid data" in info.value.error


def test_input_report_parsing():
    head = (b"Input #0, mov,mp4,m4a,3gp,3g2,mj2, from '/x/source':\n"
            b"  Duration: 01:02:03.50, start: 0.000000, bitrate: 137 kb/s\n"
            b"  Stream #0:0[0x1](und): Video: mjpeg (Baseline), (attached pic)\n"
            b"  Stream #0:1[0x2](und): Audio: aac (LC)\n")
    report = InputReport.parse(head)
    assert report.opened and report.duration == 3723.5 and not report.has_video
    assert InputReport.parse(head + b"  Stream #0:2: Video: h264 (High)\n").has_video
    assert InputReport.parse(b"  Duration: N/A, bitrate: N/A\n").duration is None


def test_a_stalled_process_group_is_killed():
    # The stand-in starts a grandchild and goes silent: both must die.
    runner, _ = _run("sleep 60 & echo $! >&2; wait", stall=0.5)
    started = time.monotonic()
    with pytest.raises(Transient) as info:
        runner.run()
    assert info.value.reason == "stalled"
    assert time.monotonic() - started < 3
    grandchild = int(b"".join(runner.stderr).split()[0])
    wait_for(lambda: gone(grandchild), 3, what="the stalled process group to die")


def test_wall_clock_timeout_and_abort():
    runner, _ = _run("while true; do echo out_time_us=$(date +%s%N); sleep 0.05; done",
                     stall=5, timeout=0.5)
    with pytest.raises(Transient) as info:
        runner.run()
    assert info.value.reason == "timeout"
    flag = {"abort": False}
    runner, _ = _run("sleep 30", abort=lambda: flag["abort"])
    flag["abort"] = True
    with pytest.raises(Aborted):
        runner.run()


def test_run_refuses_to_start_without_ffmpeg(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text(f"[job]\nffmpeg = /nonexistent/ffmpeg\nwork_dir = {tmp_path}/w\n")
    done = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "[job] ffmpeg = '/nonexistent/ffmpeg'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_workers_client_keeps_one_connection_or_falls_back_to_the_pool(redis_server):
    from tests.conftest import free_port
    from worker.queue import connect

    up = config_mod.load(None, env={}, overrides={"redis.url": redis_server.url})
    client = connect(up, single=True)
    assert client.connection is not None and client.ping()
    assert client.connection is not None  # still the same one: no pool checkout per call
    # Redis down when the worker starts: a pooled client, which connects once it can
    down = config_mod.load(None, env={}, overrides={
        "redis.url": f"redis://127.0.0.1:{free_port()}/0"})
    lazy = connect(down, single=True)
    assert lazy.connection is None
    assert connect(up).connection is None  # the master's: pooled
