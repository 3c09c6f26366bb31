"""Footprint: memory of the master and of an idle worker; Redis round trips per job.

Memory (psutil): RSS, and USS (pages no other process shares: a forked worker shares much of
its parent's), of the master and of each worker of a 2-worker clip-supervisor, idle after
start and again idle after 5 copy clips. Floor: RSS of bench/floors.py ``loop`` (Python +
redis-py, idle in BLMOVE), on clip-supervisor's interpreter. Ratio = floor / worker RSS.

Round trips: MONITOR on the private Redis while noop jobs run, each command attributed to
its process through the client's TCP port (psutil), a MULTI ... EXEC block counted as one
round trip (redis-py sends it in one write); commands that scripts run count as part of
their EVALSHA. Phases: a batch (1000 jobs pushed at once: the loaded case), one job at a time
(each finds its worker idle), the idle background per second (heartbeats, the master's
scans), and the ffmpeg pipeline (5 copy clips, one at a time). INFO commandstats deltas for
the batch are kept in the JSON. Floor: the bare loop's 2 round trips per job.

Usage: python -m bench.footprint [--batch 1000] [--single 100]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import threading
import time
from typing import Any

import psutil
import redis

from bench import harness as h

TARGET_MASTER_MB = 40
TARGET_WORKER_MB = 60
MB = 1024 * 1024


class Monitor:
    """Every command the server runs, from a MONITOR connection read in a thread."""

    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.lines: list[dict[str, Any]] = []
        self._mon = self.r.monitor()
        self._mon.__enter__()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for command in self._mon.listen():
                self.lines.append(command)
        except (redis.ConnectionError, OSError, ValueError):
            pass

    def mark(self, r: redis.Redis, name: str) -> None:
        """A marker in the stream (an ECHO), and wait until the reader has seen it."""
        r.echo(f"bench-mark:{name}")
        h.wait_until(lambda: any(c["command"] == f"ECHO bench-mark:{name}"
                                 for c in self.lines[-50:]), 10, interval=0.01,
                     what="the MONITOR reader")

    def between(self, start: str, end: str) -> list[dict[str, Any]]:
        names = [c["command"] for c in self.lines]
        i = names.index(f"ECHO bench-mark:{start}")
        j = names.index(f"ECHO bench-mark:{end}")
        return self.lines[i + 1:j]

    def close(self) -> None:
        self._mon.connection.disconnect()


def ports_of(pids: dict[str, int], redis_port: int) -> dict[int, str]:
    """client TCP port -> role ("master", "worker"), for connections to our Redis."""
    owners: dict[int, str] = {}
    for role, pid in pids.items():
        try:
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == redis_port:
                    owners[conn.laddr.port] = role
        except psutil.Error:
            continue
    return owners


def round_trips(lines: list[dict[str, Any]], owners: dict[int, str]) -> dict[str, Any]:
    """Round trips and command names per role; MULTI..EXEC is one round trip."""
    trips: collections.Counter[str] = collections.Counter()
    names: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    in_multi: set[int] = set()
    for line in lines:
        if line.get("client_type") == "lua":
            continue
        port = int(line.get("client_port") or 0)
        role = owners.get(port, "other")
        name = line["command"].split(" ", 1)[0].upper()
        if name == "MULTI":
            in_multi.add(port)
            trips[role] += 1
            names[role]["MULTI..EXEC"] += 1
        elif name == "EXEC":
            in_multi.discard(port)
        elif port not in in_multi:
            trips[role] += 1
            names[role][name] += 1
    return {"trips": dict(trips), "commands": {k: dict(v) for k, v in names.items()}}


def memory(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {"rss_mb": info.rss / MB, "uss_mb": info.uss / MB, "pss_mb": info.pss / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--single", type=int, default=100)
    args = parser.parse_args()

    name, seconds, size, bitrate = h.SOURCE_720P
    source = h.media(name, seconds, size, bitrate)
    tmp = h.tmpdir("footprint")
    www = h.site(tmp, {"src.mp4": source})
    server = h.RedisServer(os.path.join(tmp, "redis"))
    http = h.HttpServer(www)
    r = redis.Redis.from_url(server.url, socket_timeout=30)
    data: dict[str, Any] = {}

    # --- memory, with the real (ffmpeg) pipeline -------------------------------------------
    sup = h.Supervisor(os.path.join(tmp, "mem"), server.url, 2, prefix="mem")
    sup.start()
    time.sleep(1.0)
    assert sup.proc is not None
    workers = sup.worker_pids()
    mem_idle = {"master": memory(sup.proc.pid), "workers": [memory(p) for p in workers]}
    url = http.url("src.mp4")
    jobs = [json.dumps({"id": f"m{i}", "url": url, "start": 10 * i, "duration": 10})
            for i in range(5)]
    sup.r.lpush(sup.keys["queue"], *jobs)
    h.wait_until(lambda: sup.r.llen(sup.keys["done"]) >= 5, 120, what="5 clips")
    time.sleep(1.0)
    mem_used = {"master": memory(sup.proc.pid), "workers": [memory(p) for p in workers]}
    sup.stop()
    floor_proc = h.spawn([h.clip_python(), os.path.join(h.BENCH, "floors.py"), "loop",
                          server.url, "mfloor:queue", "mfloor:processing"])
    h.wait_until(lambda: server.blocked_clients("blmove") >= 1, 20, what="the floor")
    floor_mem = memory(floor_proc.pid)
    h.kill_group(floor_proc)
    data["memory"] = {"idle_after_start": mem_idle, "idle_after_5_clips": mem_used,
                      "floor": floor_mem}

    # --- round trips, noop pipeline ----------------------------------------------------------
    sup = h.Supervisor(os.path.join(tmp, "rt"), server.url, 2, prefix="rt",
                       job={"pipeline": "noop"})
    sup.start()
    time.sleep(0.5)
    assert sup.proc is not None
    roles = {"master": sup.proc.pid} | {f"worker{i + 1}": p
                                        for i, p in enumerate(sup.worker_pids())}
    mon = Monitor(server.url)
    k = sup.keys
    make = [json.dumps({"id": f"b{i}", "url": "http://127.0.0.1:9/v.mp4", "duration": 10})
            for i in range(args.batch)]
    stats_before = r.info("commandstats")
    mon.mark(r, "batch-start")
    for i in range(0, len(make), 1000):
        r.lpush(k["queue"], *make[i:i + 1000])
    h.wait_until(lambda: r.llen(k["done"]) >= args.batch, 120, interval=0.01,
                 what="the batch")
    mon.mark(r, "batch-end")
    stats_after = r.info("commandstats")
    for i in range(args.single):
        r.lpush(k["queue"], json.dumps({"id": f"s{i}", "url": "http://127.0.0.1:9/v.mp4",
                                        "duration": 10}))
        h.wait_until(lambda i=i: r.llen(k["done"]) >= args.batch + i + 1, 10, interval=0.001,
                     what="a single job")
        if i == 0:
            mon.mark(r, "single-start")
    mon.mark(r, "single-end")
    idle_started = time.monotonic()
    mon.mark(r, "idle-start")
    time.sleep(5.0)
    mon.mark(r, "idle-end")
    idle_seconds = time.monotonic() - idle_started
    owners = ports_of({n: p for n, p in roles.items()}, server.port)
    worker_roles = [n for n in roles if n.startswith("worker")]

    def per_job(phase: dict[str, Any], n: int) -> float:
        return sum(phase["trips"].get(w, 0) for w in worker_roles) / n

    batch = round_trips(mon.between("batch-start", "batch-end"), owners)
    single = round_trips(mon.between("single-start", "single-end"), owners)
    idle = round_trips(mon.between("idle-start", "idle-end"), owners)
    sup.stop()

    # --- round trips, ffmpeg pipeline ------------------------------------------------------
    real = h.Supervisor(os.path.join(tmp, "rt2"), server.url, 2, prefix="rt2")
    real.start()
    time.sleep(0.5)
    assert real.proc is not None
    roles2 = {"master": real.proc.pid} | {f"worker{i + 1}": p
                                         for i, p in enumerate(real.worker_pids())}
    mon.mark(r, "real-start")
    for i in range(5):
        r.lpush(real.keys["queue"], json.dumps({"id": f"c{i}", "url": url, "start": 10 * i,
                                                "duration": 10}))
        h.wait_until(lambda i=i: r.llen(real.keys["done"]) >= i + 1, 60, interval=0.005,
                     what="a clip")
    mon.mark(r, "real-end")
    clips = round_trips(mon.between("real-start", "real-end"), ports_of(roles2, server.port))
    real.stop()
    mon.close()

    n_single = args.single - 1
    trips = {"batch": per_job(batch, args.batch), "single": per_job(single, n_single),
             "ffmpeg": sum(clips["trips"].get(w, 0) for w in roles2 if w != "master") / 5,
             "idle_per_second": sum(idle["trips"].values()) / idle_seconds}
    cmdstats = {name: stats_after.get(name, {}).get("calls", 0)
                - stats_before.get(name, {}).get("calls", 0) for name in stats_after}
    data["round_trips"] = {"per_job": trips, "batch": batch, "single": single, "idle": idle,
                           "ffmpeg": clips, "batch_commandstats_calls": cmdstats,
                           "floor_per_job": 2}

    master_mb = mem_used["master"]["rss_mb"]
    worker_mb = max(w["rss_mb"] for w in mem_idle["workers"])
    worker_used_mb = max(w["rss_mb"] for w in mem_used["workers"])
    met_master = max(mem_idle["master"]["rss_mb"], master_mb) < TARGET_MASTER_MB
    met_worker = worker_mb < TARGET_WORKER_MB
    ratio_mem = floor_mem["rss_mb"] / worker_mb
    ratio_rt = 2 / trips["batch"]
    line = (f"footprint: master RSS {master_mb:.1f} MB; idle worker RSS {worker_mb:.1f} MB "
            f"(USS {max(w['uss_mb'] for w in mem_idle['workers']):.1f} MB; "
            f"{worker_used_mb:.1f} MB after 5 clips); ratio {ratio_mem:.2f} = floor "
            f"{floor_mem['rss_mb']:.1f} MB (python + redis-py in BLMOVE) / worker RSS; "
            f"Redis round trips per noop job {trips['batch']:.2f} loaded, "
            f"{trips['single']:.2f} one at a time, {trips['ffmpeg']:.1f} per real clip, "
            f"{trips['idle_per_second']:.1f}/s idle; ratio {ratio_rt:.2f} = floor 2 / ours "
            f"loaded | targets master < {TARGET_MASTER_MB} MB: {h.verdict(met_master)}; "
            f"idle worker < {TARGET_WORKER_MB} MB: {h.verdict(met_worker)}")
    h.emit("footprint", line, {**data, "ratio_memory": ratio_mem, "ratio_round_trips":
                               ratio_rt, "met_master": met_master, "met_worker": met_worker,
                               "targets_mb": {"master": TARGET_MASTER_MB,
                                              "worker": TARGET_WORKER_MB}})


if __name__ == "__main__":
    main()
