"""The workers' metric files: never a SIGBUS on a full file system, never a file per worker
the pool ever ran. Real supervisor, real tmpfs (in a mount namespace of the test's own)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _done_count(text: str) -> float:
    match = re.search(r'^clip_jobs_total\{outcome="done"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_full_metrics_file_system_costs_the_metrics_not_the_pool(env):
    # Given /dev/shm (where the metric files go) a 1 MiB tmpfs filled to the last block,
    # seen by this supervisor only
    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    env.push(*[{"id": f"j{i}", "url": env.url("ten.mp4"), "duration": 1} for i in range(4)])
    script = ("mount -t tmpfs -o size=1m tmpfs /dev/shm && "
              "(dd if=/dev/zero of=/dev/shm/fill bs=4k 2>/dev/null || true) && "
              f"exec {sys.executable} -m supervisor run --config {env.conf}")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env.procs.append(proc)
    # Then the master starts, the workers do every job, and the log says what was dropped,
    # instead of the master or a worker dying of SIGBUS
    env.wait_finished(4, timeout=60)
    assert sorted(e["id"] for e in env.done_events()) == ["j0", "j1", "j2", "j3"]
    assert "SIGBUS" not in env.log_text() and "killed by" not in env.log_text()
    assert "metrics: cannot write" in env.log_text()
    assert env.stop(proc) == 0


@pytest.mark.settings({"supervisor": {"max_jobs_per_worker": 1}})
def test_recycled_workers_leave_their_sums_not_their_files(env):
    # Given a pool whose workers recycle after every job
    port = free_port()
    env.settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    env.push(*[{"id": f"r{i}", "url": env.url("ten.mp4"), "duration": 1} for i in range(8)])
    proc = env.start()
    env.wait_finished(8, timeout=90)
    # Then every job is counted once, while the folder holds the files of the live
    # processes and one retired file per kind, not one per worker ever run
    wait_for(lambda: _done_count(_scrape(port)) == 8, 15, what="8 done jobs counted")
    (folder,) = glob.glob(f"/dev/shm/clip-supervisor-metrics-{proc.pid}-*")
    wait_for(lambda: env.log_text().count("recycled") >= 8, 15, what="8 recycled workers")
    names = os.listdir(folder)
    pids = {int(m.group(1)) for n in names if (m := re.search(r"_(\d+)\.db$", n))}
    assert pids <= {proc.pid, *env.workers(proc)}, (names, env.workers(proc))
    assert "counter_retired.db" in names
    assert _done_count(_scrape(port)) == 8
    assert env.stop(proc) == 0
