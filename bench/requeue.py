"""Worker death to requeue: SIGKILL a worker holding a message; time until it is requeued.

clip-supervisor runs 2 workers; the job's source is the HTTP server's ``/trickle/`` path (one
KiB every 0.25 s), so the worker that takes it stays in its fetch stage, message in flight.
Each round waits until a worker holds the message, has been up for at least 0.6 s (past
``min_uptime``, so no restart backoff) and is fetching, then SIGKILLs it and polls
``HGET {clips}:attempts <id>``: the recovery script bumps it in the same atomic step that
puts the message back on the queue. The other worker (or the respawned one) takes it again,
and the next round kills that one.

Floor: bench/floors.py ``reaper``: a parent woken by SIGCHLD that reaps its child and
requeues its message with one script, timed the same way. Ratio = floor / ours (medians).

Usage: python -m bench.requeue [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import psutil
import redis

from bench import harness as h

TARGET_SECONDS = 1.0
MIN_UPTIME = 0.2


def kill_and_time(r: redis.Redis, pid: int, attempts_key: str, field: str) -> float:
    before = int(r.hget(attempts_key, field) or 0)
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    deadline = started + 30
    while int(r.hget(attempts_key, field) or 0) <= before:
        if time.monotonic() > deadline:
            raise TimeoutError("the message was not requeued within 30 s")
    return time.monotonic() - started


def uptime(pid: int) -> float:
    try:
        return time.time() - psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return 0.0


def ours(tmp: str, server: h.RedisServer, http: h.HttpServer, rounds: int) -> list[float]:
    sup = h.Supervisor(os.path.join(tmp, "sup"), server.url, 2, prefix="rq",
                       supervisor={"min_uptime": MIN_UPTIME, "graceful_timeout": 5},
                       job={"max_attempts": 1000, "stall_timeout": 60, "timeout": 600})
    sup.start()
    message = json.dumps({"id": "inflight", "url": http.url("trickle/src.mp4"),
                          "duration": 5}).encode()
    sup.r.lpush(sup.keys["queue"], message)
    times = []
    for _ in range(rounds):
        def held() -> int | None:
            pid = sup.holder(message)
            if pid and uptime(pid) > MIN_UPTIME + 0.4 and http.stats()["trickling"] >= 1:
                return pid
            return None

        pid = h.wait_until(held, 30, interval=0.05, what="a worker fetching the message")
        times.append(kill_and_time(sup.r, pid, sup.keys["attempts"], "inflight"))
        h.note(f"clip-supervisor: requeued {times[-1] * 1000:.1f} ms after the SIGKILL")
    # QUIT: abort the trickling fetch now rather than wait graceful_timeout.
    assert sup.proc is not None
    sup.proc.send_signal(signal.SIGQUIT)
    h.wait_exit(sup.proc, 30)
    return times


def floor(tmp: str, server: h.RedisServer, rounds: int) -> list[float]:
    r = server.r
    prefix, attempts = "rfloor:processing:", "rfloor:attempts"
    proc = h.spawn([h.clip_python(), os.path.join(h.BENCH, "floors.py"), "reaper", server.url,
                    "rfloor:queue", prefix, attempts], log=os.path.join(tmp, "floor.log"))
    r.lpush("rfloor:queue", b"inflight")
    times = []
    for _ in range(rounds):
        def held() -> int | None:
            for key in r.scan_iter(match=prefix + "*"):
                pid = int(key.decode().rsplit(":", 1)[1])
                if r.llen(key) and uptime(pid) > 0.3:
                    return pid
            return None

        pid = h.wait_until(held, 30, interval=0.05, what="the floor's child holding it")
        times.append(kill_and_time(r, pid, attempts, "inflight"))
    h.kill_group(proc)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    name, seconds, size, bitrate = h.SOURCE_720P
    source = h.media(name, seconds, size, bitrate)
    tmp = h.tmpdir("requeue")
    www = h.site(tmp, {"src.mp4": source})
    server = h.RedisServer(os.path.join(tmp, "redis"))
    http = h.HttpServer(www)

    mine = ours(tmp, server, http, args.rounds)
    base = floor(tmp, server, args.rounds)
    p50, worst = h.median(mine), max(mine)
    ratio = h.median(base) / p50
    met = worst < TARGET_SECONDS
    line = (f"requeue: worker SIGKILL-to-requeue median {p50 * 1000:.1f} ms, max "
            f"{worst * 1000:.1f} ms ({args.rounds} kills of a worker mid-fetch, 2 workers); "
            f"ratio {ratio:.2f} = floor {h.median(base) * 1000:.1f} ms (SIGCHLD, waitpid, one "
            f"script) / ours | target < {TARGET_SECONDS:g} s: {h.verdict(met)}")
    h.emit("requeue", line, {"rounds": args.rounds, "ours": mine, "floor": base,
                             "ratio": ratio, "target": TARGET_SECONDS, "met": met})


if __name__ == "__main__":
    main()
