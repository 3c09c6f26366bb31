"""Enqueue-to-start latency with an idle worker.

The job hash's ``started`` field has one-second resolution, so the harness times it itself,
on one clock: with the no-op pipeline and 1 worker, it waits until the worker is idle
(blocked in BLMOVE, seen in CLIENT LIST) plus a random 0-20 ms, notes the time, LPUSHes one
job, and blocks in BRPOP on ``{clips}:done`` until the worker's completion event arrives.

- enqueue-to-ack = that interval: LPUSH, the worker's wake-up, parsing, the DONE script, and
  the event reaching the harness. It bounds enqueue-to-start from above.
- enqueue-to-start = enqueue-to-ack minus the event's ``elapsed`` (the worker's own time from
  holding the message to recording it, rounded to 1 ms): an estimate, +-0.5 ms.
- floor: bench/floors.py ``ack-loop`` (BLMOVE, then LREM + LPUSH done in one MULTI), timed
  the same way; ratio = floor p50 / clip-supervisor enqueue-to-ack p50.

Usage: python -m bench.latency [--samples 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable

import redis

from bench import harness as h

TARGET_P50_MS = 5.0


def sample(r: redis.Redis, server: h.RedisServer, queue: str, done: str, message: Callable[
        [int], str], n: int) -> tuple[list[float], list[float]]:
    """n (enqueue-to-ack seconds, the event's elapsed seconds) pairs, each on an idle worker."""
    rng = random.Random(8)
    r.delete(done)
    acks: list[float] = []
    elapsed: list[float] = []
    for i in range(n):
        h.wait_until(lambda: server.blocked_clients("blmove") >= 1, 10, interval=0.002,
                     what="an idle worker")
        time.sleep(rng.uniform(0, 0.02))
        started = time.perf_counter()
        r.lpush(queue, message(i))
        reply = r.brpop([done], timeout=10)
        acks.append(time.perf_counter() - started)
        if reply is None:
            raise TimeoutError("no completion within 10 s")
        try:
            event = json.loads(reply[1])
        except ValueError:
            event = None
        elapsed.append(float(event.get("elapsed", 0.0)) if isinstance(event, dict) else 0.0)
    return acks, elapsed


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()

    tmp = h.tmpdir("latency")
    server = h.RedisServer(os.path.join(tmp, "redis"))
    r = redis.Redis.from_url(server.url, socket_timeout=30)

    sup = h.Supervisor(os.path.join(tmp, "sup"), server.url, 1, prefix="lat",
                       job={"pipeline": "noop"})
    sup.start()
    k = sup.keys
    url = "http://127.0.0.1:9/v.mp4"

    def job(i: int) -> str:
        return json.dumps({"id": f"lat-{i}-{time.monotonic_ns()}", "url": url, "duration": 10})

    sample(r, server, k["queue"], k["done"], job, 10)  # warm-up
    acks, elapsed = sample(r, server, k["queue"], k["done"], job, args.samples)
    sup.stop()
    if r.llen(k["dead"]):
        raise RuntimeError("the latency jobs were dead-lettered")

    floor = h.spawn([h.clip_python(), os.path.join(h.BENCH, "floors.py"), "ack-loop",
                     server.url, "floor:queue", "floor:processing", "floor:done"],
                    log=os.path.join(tmp, "floor.log"))
    sample(r, server, "floor:queue", "floor:done", str, 10)
    floor_acks, _ = sample(r, server, "floor:queue", "floor:done", str, args.samples)
    h.kill_group(floor)

    starts = [max(0.0, a - e) for a, e in zip(acks, elapsed, strict=True)]
    p50, p99 = h.percentile(starts, 50), h.percentile(starts, 99)
    a50, a99 = h.percentile(acks, 50), h.percentile(acks, 99)
    f50, f99 = h.percentile(floor_acks, 50), h.percentile(floor_acks, 99)
    ratio = f50 / a50
    met = p50 * 1000 < TARGET_P50_MS
    line = (f"latency: enqueue-to-start p50 {ms(p50)} p99 {ms(p99)} (enqueue-to-ack p50 "
            f"{ms(a50)} p99 {ms(a99)}, minus the job's own elapsed); ratio {ratio:.2f} = floor "
            f"p50 {ms(f50)} (p99 {ms(f99)}, bare BLMOVE + MULTI ack) / ours enqueue-to-ack p50; "
            f"idle worker, noop pipeline, {args.samples} samples | target p50 < "
            f"{TARGET_P50_MS:g} ms: {h.verdict(met)}")
    h.emit("latency", line, {
        "samples": args.samples, "start_p50": p50, "start_p99": p99, "ack_p50": a50,
        "ack_p99": a99, "floor_p50": f50, "floor_p99": f99, "ratio": ratio,
        "target_ms": TARGET_P50_MS, "met": met, "ack_seconds": acks,
        "elapsed_seconds": elapsed, "floor_seconds": floor_acks})


if __name__ == "__main__":
    main()
