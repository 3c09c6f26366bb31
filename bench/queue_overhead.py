"""Queue overhead: no-op jobs through clip-supervisor, a bare BLMOVE+LREM loop, and peers.

Every system gets 2 worker processes on the same private redis-server, and the same method:
start it, prove it consumes (a warm-up batch), freeze its whole process tree (SIGSTOP),
enqueue N jobs with its own client API, thaw it (SIGCONT: the clock starts), and poll its
count of finished jobs every 5 ms. Freezing keeps enqueue speed (which differs a lot between
client APIs) out of the figure. The reported rate is the steady one, from 10 % to 100 % of
the jobs, so that waking up (a polling consumer's sleep, a blocked BLMOVE's reply) is left
to bench.latency; the total time from thaw is kept in the JSON.

- clip-supervisor: ``[job] pipeline = noop`` (parse, then the DONE script: ack, job hash,
  completion event), 2 workers; finished = LLEN {clips}:done.
- bare loop: bench/floors.py ``loop`` in 2 processes (same interpreter and redis-py as
  clip-supervisor); finished = pushed - what is still queued or held.
- what-if: bench/floors.py ``script-loop``, one script per job that acks the last message,
  records a completion event and moves the next one in (the design proposed in
  docs/PERFORMANCE.md); measured in the same rounds.
- RQ (default forking Worker, and SimpleWorker), Dramatiq (--processes 2 --threads 1, its
  default prefetch of 2 per process: with 1 its consumer and worker threads hand each message
  over through the GIL and it halves), Celery (prefork -c 2, acks_late, prefetch multiplier
  1): run from the bench venv; a peer that cannot be imported or started is reported as such.

clip-supervisor runs at its default log level (info: one line per job done) unless
``--log-level`` says otherwise; ``--compare-log-level warning`` runs a second one at that
level in the same rounds, which prices the per-job line. Target: >= 0.9 x the bare loop.

Usage: python -m bench.queue_overhead [--jobs 5000] [--rounds 3] [--peers rq,rq-simple,...]
       [--log-level LEVEL] [--compare-log-level LEVEL]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import time
from typing import Any

import psutil
import redis

from bench import harness as h

TARGET_VS_BARE = 0.9  # at the daemon's default log level (info)
PEERS = ("rq", "rq-simple", "dramatiq", "celery")
LABELS = {"ours": "clip-supervisor", "ours-quiet": "clip-supervisor at another log level",
          "bare": "bare BLMOVE+LREM",
          "onetrip": "what-if: ack+fetch in one script", "rq": "RQ (fork)",
          "rq-simple": "RQ (SimpleWorker)", "dramatiq": "Dramatiq", "celery": "Celery"}


class System:
    """One queue system: start, enqueue, count finished jobs, stop."""

    name = ""

    def __init__(self, tmp: str, url: str) -> None:
        self.tmp = os.path.join(tmp, self.name)
        os.makedirs(self.tmp, exist_ok=True)
        self.url = url
        self.r = redis.Redis.from_url(url, socket_timeout=30)
        self.procs: list[subprocess.Popen] = []
        self.pushed = 0

    def start(self) -> None:
        raise NotImplementedError

    def enqueue(self, n: int, tag: str) -> None:
        raise NotImplementedError

    def finished(self) -> int:
        raise NotImplementedError

    def tree(self) -> list[Any]:
        return [p for proc in self.procs for p in h.family(proc.pid)]

    def alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: a process exited ({proc.returncode}); "
                                   f"see its log in {self.tmp}")

    def stop(self) -> None:
        for proc in self.procs:
            h.kill_group(proc, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                h.kill_group(proc)
                proc.wait(5)


def _jobs(n: int, tag: str) -> list[str]:
    return [json.dumps({"id": f"{tag}-{i}", "url": "http://127.0.0.1:9/v.mp4", "start": 0,
                        "duration": 10}) for i in range(n)]


class Ours(System):
    name = "ours"
    prefix = "qb"
    log_level = ""  # the daemon's default

    def start(self) -> None:
        self.sup = h.Supervisor(self.tmp, self.url, 2, prefix=self.prefix,
                                log_level=self.log_level, job={"pipeline": "noop"})
        self.sup.start()
        assert self.sup.proc is not None
        self.procs = [self.sup.proc]

    def enqueue(self, n: int, tag: str) -> None:
        batch = _jobs(n, tag)
        for i in range(0, n, 1000):
            self.r.lpush(self.sup.keys["queue"], *batch[i:i + 1000])

    def finished(self) -> int:
        return self.r.llen(self.sup.keys["done"])

    def stop(self) -> None:
        self.sup.stop()


class OursQuiet(Ours):
    """``--compare-log-level``: a second clip-supervisor at another log level (e.g. warning,
    where a job done writes no line), in the same rounds: what the per-job line costs."""

    name = "ours-quiet"
    prefix = "qq"


class Bare(System):
    name = "bare"
    queue = "bare:queue"

    def start(self) -> None:
        script = os.path.join(h.BENCH, "floors.py")
        self.procs = [h.spawn([h.clip_python(), script, "loop", self.url, self.queue,
                               f"bare:processing:{i}"], log=os.path.join(self.tmp, "log"))
                      for i in (1, 2)]

    def enqueue(self, n: int, tag: str) -> None:
        batch = _jobs(n, tag)
        for i in range(0, n, 1000):
            self.r.lpush(self.queue, *batch[i:i + 1000])
        self.pushed += n

    def finished(self) -> int:
        pipe = self.r.pipeline(transaction=False)
        pipe.llen(self.queue)
        pipe.llen("bare:processing:1")
        pipe.llen("bare:processing:2")
        return self.pushed - sum(pipe.execute())


class OneTrip(Bare):
    """What-if: bench/floors.py ``script-loop``, one script per job (ack + fetch next)."""

    name = "onetrip"
    queue = "one:queue"

    def start(self) -> None:
        script = os.path.join(h.BENCH, "floors.py")
        self.procs = [h.spawn([h.clip_python(), script, "script-loop", self.url, self.queue,
                               f"one:processing:{i}", "one:done"],
                              log=os.path.join(self.tmp, "log"))
                      for i in (1, 2)]

    def finished(self) -> int:
        return self.r.llen("one:done")


class RQ(System):
    name = "rq"
    worker_class = "rq.worker.Worker"

    def start(self) -> None:
        from rq import Queue

        self.queue = Queue("default", connection=self.r)
        self.procs = [h.spawn([h.bench_bin("rq"), "worker", "-u", self.url, "-w",
                               self.worker_class, "-n", f"bench-{self.name}-{i}", "-P", h.ROOT,
                               "default"], log=os.path.join(self.tmp, f"worker{i}.log"))
                      for i in (1, 2)]

    def enqueue(self, n: int, tag: str) -> None:
        from rq import Queue

        for i in range(0, n, 500):
            pipe = self.r.pipeline()
            self.queue.enqueue_many([Queue.prepare_data("bench.peers.rq_tasks.noop")
                                     for _ in range(min(500, n - i))], pipeline=pipe)
            pipe.execute()

    def finished(self) -> int:
        return self.queue.finished_job_registry.count


class RQSimple(RQ):
    name = "rq-simple"
    worker_class = "rq.worker.SimpleWorker"


class Dramatiq(System):
    name = "dramatiq"

    def start(self) -> None:
        os.environ["BENCH_REDIS_URL"] = self.url
        from bench.peers import dramatiq_tasks

        self.actor = dramatiq_tasks.noop
        self.procs = [h.spawn([h.bench_bin("dramatiq"), "bench.peers.dramatiq_tasks",
                               "--processes", "2", "--threads", "1"],
                              env={"BENCH_REDIS_URL": self.url, "PYTHONPATH": h.ROOT},
                              log=os.path.join(self.tmp, "dramatiq.log"))]

    def enqueue(self, n: int, tag: str) -> None:
        for _ in range(n):
            self.actor.send()
        self.pushed += n

    def finished(self) -> int:
        return self.pushed - self.r.hlen("dramatiq:default.msgs")


class Celery(System):
    name = "celery"

    def start(self) -> None:
        os.environ["BENCH_REDIS_URL"] = self.url
        from bench.peers import celery_app

        self.app = celery_app.app
        self.procs = [h.spawn([h.bench_bin("celery"), "-A", "bench.peers.celery_app", "worker",
                               "-P", "prefork", "-c", "2", "--prefetch-multiplier", "1",
                               "-l", "info", "-n", "bench@localhost"],
                              env={"BENCH_REDIS_URL": self.url, "PYTHONPATH": h.ROOT},
                              log=os.path.join(self.tmp, "celery.log"))]

    def enqueue(self, n: int, tag: str) -> None:
        with self.app.producer_or_acquire() as producer:
            for _ in range(n):
                self.app.send_task("noop", producer=producer)
        self.pushed += n

    def finished(self) -> int:
        # acks_late: a message stays in kombu's "unacked" hash until its task returned.
        pipe = self.r.pipeline(transaction=False)
        pipe.llen("celery")
        pipe.hlen("unacked")
        return self.pushed - sum(pipe.execute())


SYSTEMS: dict[str, type[System]] = {"ours": Ours, "bare": Bare, "onetrip": OneTrip, "rq": RQ,
                                    "rq-simple": RQSimple, "dramatiq": Dramatiq,
                                    "celery": Celery}


def warm_up(system: System, n: int = 50) -> None:
    base = system.finished()
    system.enqueue(n, f"warm{time.monotonic_ns()}")

    def done() -> bool:
        system.alive()
        return system.finished() >= base + n

    h.wait_until(done, 120, interval=0.02, what=f"{system.name} warm-up")
    time.sleep(0.3)  # let it go idle again


def measure(system: System, n: int, max_seconds: float,
            server: h.RedisServer) -> dict[str, Any]:
    """Freeze, enqueue n, thaw, poll; the steady rate and the total time from thaw, and the
    CPU time the system's processes and redis-server spent per job."""
    base = system.finished()
    procs = system.tree()
    h.freeze(procs)
    try:
        system.enqueue(n, f"m{time.monotonic_ns()}")
    finally:
        redis_proc = psutil.Process(server.proc.pid)
        cpu0, redis0 = h.cpu_seconds(procs), h.cpu_seconds([redis_proc])
        started = time.monotonic()
        h.thaw(procs)
    samples: list[tuple[float, int]] = []
    while True:
        count = system.finished() - base
        now = time.monotonic() - started
        samples.append((now, count))
        if count >= n or now > max_seconds:
            break
        time.sleep(0.005)
    system.alive()
    user1, sys1 = h.cpu_seconds(system.tree())
    ruser1, rsys1 = h.cpu_seconds([redis_proc])
    user, sys_ = user1 - cpu0[0], sys1 - cpu0[1]
    cpu, redis_cpu = user + sys_, ruser1 - redis0[0] + rsys1 - redis0[1]
    total, count = samples[-1]
    t10, c10 = next(((t, c) for t, c in samples if c >= 0.1 * n), samples[0])
    rate = (count - c10) / (total - t10) if total > t10 else float("nan")
    return {"jobs": n, "finished": count, "total_seconds": round(total, 4),
            "steady_rate": rate, "complete": count >= n, "samples": len(samples),
            "consumer_cpu_us_per_job": 1e6 * cpu / max(count, 1),
            "consumer_user_us_per_job": 1e6 * user / max(count, 1),
            "consumer_system_us_per_job": 1e6 * sys_ / max(count, 1),
            "redis_cpu_us_per_job": 1e6 * redis_cpu / max(count, 1)}


def _cpu(result: dict[str, Any]) -> str:
    return (f"workers {result['consumer_cpu_us_per_job']:.0f} us (user "
            f"{result['consumer_user_us_per_job']:.0f}, system "
            f"{result['consumer_system_us_per_job']:.0f}), redis-server "
            f"{result['redis_cpu_us_per_job']:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds, ours vs bare")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated, from {', '.join(PEERS)} (empty: none)")
    parser.add_argument("--log-level", default="",
                        help="clip-supervisor's [supervisor] log_level (default: its own "
                        "default, info)")
    parser.add_argument("--compare-log-level", default="",
                        help="also run a second clip-supervisor at this log level (e.g. "
                        "warning) in the same rounds: the cost of the per-job log line")
    parser.add_argument("--max-seconds", type=float, default=45,
                        help="stop measuring a system after this long (its rate so far counts)")
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    Ours.log_level = args.log_level
    OursQuiet.log_level = args.compare_log_level

    tmp = h.tmpdir("queue")
    server = h.RedisServer(os.path.join(tmp, "redis"))
    results: dict[str, Any] = {"ours": [], "bare": [], "onetrip": [], "ours-quiet": []}

    # The what-if loop runs in the same rounds: it is idle (a BLMOVE a second) while the
    # other two are measured, as they are while it is.
    ours, bare, onetrip = (Ours(tmp, server.url), Bare(tmp, server.url),
                           OneTrip(tmp, server.url))
    trio: list[System] = [ours, bare, onetrip]
    if args.compare_log_level:
        LABELS["ours-quiet"] = f"clip-supervisor at log level {args.compare_log_level}"
        trio.append(OursQuiet(tmp, server.url))
    for system in trio:
        system.start()
    for system in trio:
        warm_up(system)
    for r in range(args.rounds):
        for system in trio if r % 2 == 0 else trio[::-1]:
            result = measure(system, args.jobs, args.max_seconds, server)
            results[system.name].append(result)
            h.note(f"round {r + 1}/{args.rounds}: {LABELS[system.name]} "
                   f"{result['steady_rate']:,.0f} jobs/s (total {result['total_seconds']:.2f} s"
                   f"; CPU per job: {_cpu(result)})")
    for system in trio:
        system.stop()
    dead = server.r.llen("{qb}:dead") + server.r.llen("{qq}:dead")
    if dead:
        raise RuntimeError(f"clip-supervisor dead-lettered {dead} no-op jobs")

    for name in peers:
        server.r.flushall()
        system: System | None = None
        try:
            system = SYSTEMS[name](tmp, server.url)
            system.start()
            warm_up(system)
            result = measure(system, args.jobs, args.max_seconds, server)
        except (ImportError, RuntimeError, TimeoutError, OSError) as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            h.note(f"{LABELS[name]}: could not be measured: {exc}")
        else:
            results[name] = result
            h.note(f"{LABELS[name]}: {result['steady_rate']:,.0f} jobs/s (total "
                   f"{result['total_seconds']:.2f} s"
                   f"{'' if result['complete'] else ', stopped before the end'}; CPU per job: "
                   f"{_cpu(result)})")
        finally:
            if system is not None:
                with contextlib.suppress(Exception):
                    system.stop()

    ratios = [o["steady_rate"] / b["steady_rate"]
              for o, b in zip(results["ours"], results["bare"], strict=True)]
    ratio = h.median(ratios)
    ours_rate = h.median([o["steady_rate"] for o in results["ours"]])
    bare_rate = h.median([b["steady_rate"] for b in results["bare"]])
    def cpu_per_job(res: dict[str, Any]) -> float:
        return res["consumer_cpu_us_per_job"] + res["redis_cpu_us_per_job"]

    cpu_ratio = h.median([cpu_per_job(b) / cpu_per_job(o) for o, b in
                          zip(results["ours"], results["bare"], strict=True)])
    onetrip_ratio = h.median([o["steady_rate"] / b["steady_rate"] for o, b in
                              zip(results["onetrip"], results["bare"], strict=True)])
    quiet = ""
    quiet_ratios = [q["steady_rate"] / b["steady_rate"] for q, b in
                    zip(results["ours-quiet"], results["bare"], strict=False)]
    if quiet_ratios:
        quiet = (f"; at log level {args.compare_log_level}: {h.median(quiet_ratios):.2f} x bare "
                 f"(range {min(quiet_ratios):.2f}-{max(quiet_ratios):.2f})")
    peer_parts, ahead = [], True
    for name in peers:
        res = results[name]
        if "error" in res:
            peer_parts.append(f"{LABELS[name]} not measured ({res['error'][:60]})")
            ahead = False
            continue
        peer_parts.append(f"{LABELS[name]} {res['steady_rate']:,.0f}/s "
                          f"(ours {ours_rate / res['steady_rate']:.1f}x)")
        ahead = ahead and ours_rate > res["steady_rate"]
    level = args.log_level or "default (info)"
    line = (f"queue-noop: ratio {ratio:.2f} vs bare loop (range {min(ratios):.2f}-"
            f"{max(ratios):.2f}; clip-supervisor {ours_rate:,.0f} jobs/s at log level {level}, "
            f"bare BLMOVE+LREM {bare_rate:,.0f} jobs/s; {args.jobs} no-op jobs, "
            f"2 processes, median of {args.rounds} paired rounds; CPU-time ratio "
            f"{cpu_ratio:.2f} (workers + redis-server per job); what-if ack+fetch in one "
            f"script {onetrip_ratio:.2f} x bare{quiet}); peers: "
            f"{'; '.join(peer_parts) or 'none run'} | target >= {TARGET_VS_BARE} x bare: "
            f"{h.verdict(ratio >= TARGET_VS_BARE)}; ahead of every peer: "
            f"{h.verdict(ahead and bool(peers))}")
    h.emit("queue-noop", line, {"jobs": args.jobs, "ratio": ratio, "round_ratios": ratios,
                                "ours_rate": ours_rate, "bare_rate": bare_rate,
                                "onetrip_ratio": onetrip_ratio, "cpu_ratio": cpu_ratio,
                                "log_level": args.log_level or "info",
                                "compare_log_level": args.compare_log_level,
                                "quiet_ratios": quiet_ratios,
                                "target": TARGET_VS_BARE, "met": ratio >= TARGET_VS_BARE,
                                "ahead_of_peers": ahead and bool(peers), "results": results,
                                "labels": LABELS})


if __name__ == "__main__":
    main()
