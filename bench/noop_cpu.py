"""Worker CPU per no-op job: one worker's own cost per job, and optionally another tree's.

One worker (``bench/noop_worker.py``, the real ``Worker.run`` loop with ``[job] pipeline =
noop``, at the default log level writing its line per job to a file) drains jobs queued
before it starts: FETCH, intake, the DONE script that acknowledges and takes the next
message (one round trip per job), the log line. It times its own CPU from the first job
after a warm-up to the last ack, so process start-up, imports and registration are left out.
A single worker and no clock on the rate make this the figure that other load on a shared
machine moves least (the throughput of ``bench.queue_overhead`` follows it).

``--against VENV`` runs a second clip-supervisor (installed in VENV, e.g. from an untouched
checkout made with ``git worktree add``) in the same rounds, the order of the two swapped
every round: the before/after of a change, paired. ``--callgrind`` counts instructions
instead (valgrind's callgrind, two runs per side of different lengths, the difference
divided by the jobs between them): slow, but the same count run after run.

Usage: python -m bench.noop_cpu [--jobs 3000] [--warm 300] [--rounds 6] [--against VENV]
       [--log-level LEVEL] [--callgrind]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

import psutil

from bench import harness as h

WORKER = os.path.join(h.BENCH, "noop_worker.py")


def _jobs(n: int, tag: str) -> list[str]:
    return [json.dumps({"id": f"{tag}-{i}", "url": "http://127.0.0.1:9/v.mp4", "start": 0,
                        "duration": 10}) for i in range(n)]


class Side:
    """One clip-supervisor tree: its interpreter and a config of its own."""

    def __init__(self, name: str, venv: str, tmp: str, url: str, log_level: str) -> None:
        self.name = name
        self.python = os.path.join(venv, "bin", "python")
        if not os.path.exists(self.python):
            raise SystemExit(f"no interpreter at {self.python}")
        self.tmp = os.path.join(tmp, name)
        # Only the config file is used: the worker runs alone, without a master.
        self.sup = h.Supervisor(self.tmp, url, 1, prefix=f"nc-{name}", log_level=log_level,
                                job={"pipeline": "noop"})
        os.makedirs(self.sup.settings["job"]["work_dir"], mode=0o700, exist_ok=True)
        self.r = self.sup.r
        self.runs = 0

    def run(self, warm: int, jobs: int, server: h.RedisServer,
            valgrind: list[str] | None = None) -> dict[str, Any]:
        """Queue warm + jobs no-op jobs, run the worker over them; its figures."""
        self.r.flushdb()
        self.runs += 1
        # The worker exits as recycled once it has done them all.
        self.sup.settings["supervisor"]["max_jobs_per_worker"] = warm + jobs
        with open(self.sup.conf, "w") as fh:
            for section, values in self.sup.settings.items():
                fh.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
        batch = _jobs(warm + jobs, f"{self.name}{self.runs}")
        for i in range(0, len(batch), 1000):
            self.r.lpush(self.sup.keys["queue"], *batch[i:i + 1000])
        out = os.path.join(self.tmp, f"result-{self.runs}.json")
        cmd = [self.python, WORKER, "--config", self.sup.conf, "--warm", str(warm),
               "--jobs", str(jobs), "--out", out]
        redis_proc = psutil.Process(server.proc.pid)
        redis0 = h.cpu_total([redis_proc])
        proc = h.spawn([*(valgrind or []), *cmd], log=os.path.join(self.tmp, "worker.out"))
        h.wait_exit(proc, 900)
        redis_cpu = h.cpu_total([redis_proc]) - redis0
        if proc.returncode != 0:
            with open(os.path.join(self.tmp, "worker.out"), errors="replace") as fh:
                tail = fh.read()[-2000:]
            raise RuntimeError(f"{self.name}: the worker exited with {proc.returncode}:\n"
                               f"{tail}")
        done, dead = self.r.llen(self.sup.keys["done"]), self.r.llen(self.sup.keys["dead"])
        if done != warm + jobs or dead:
            raise RuntimeError(f"{self.name}: {done} done and {dead} dead of {warm + jobs}")
        with open(out) as fh:
            result = json.load(fh)
        result["redis_us_per_job"] = 1e6 * redis_cpu / (warm + jobs)
        return result


def _instructions(path: str) -> int:
    """The total of callgrind's event counts (Ir) in an output file."""
    with open(path) as fh:
        for line in fh:
            match = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if match:
                return int(match.group(1))
    raise RuntimeError(f"no instruction total in {path}")


def callgrind(sides: list[Side], server: h.RedisServer, short: int = 100,
              long: int = 600) -> None:
    per_job: dict[str, float] = {}
    for side in sides:
        counts = []
        for n in (short, long):
            out = os.path.join(side.tmp, f"callgrind-{n}.out")
            side.run(0, n, server, ["valgrind", "--tool=callgrind", "--quiet",
                                    f"--callgrind-out-file={out}"])
            counts.append(_instructions(out))
        per_job[side.name] = (counts[1] - counts[0]) / (long - short)
        h.note(f"{side.name}: {counts[0]:,} instructions for {short} jobs, {counts[1]:,} for "
               f"{long}: {per_job[side.name]:,.0f} per job")
    parts = [f"{name} {count:,.0f}" for name, count in per_job.items()]
    ratio = ""
    if "base" in per_job:
        ratio = f"; this tree / base {per_job['this'] / per_job['base']:.3f}"
    h.emit("noop-instructions", f"noop-instructions: worker instructions per no-op job "
           f"(callgrind, {long - short} jobs between two runs): {', '.join(parts)}{ratio}",
           {"per_job": per_job, "short": short, "long": long})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="timed jobs per run")
    parser.add_argument("--warm", type=int, default=300, help="jobs before the clock starts")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--against", default="",
                        help="another clip-supervisor venv to run in the same rounds")
    parser.add_argument("--log-level", default="",
                        help="the worker's log level (default: the daemon's own, info)")
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions under valgrind instead of timing CPU")
    args = parser.parse_args()

    tmp = h.tmpdir("noop-cpu")
    server = h.RedisServer(os.path.join(tmp, "redis"))
    sides = [Side("this", h.clip_venv(), tmp, server.url, args.log_level)]
    if args.against:
        sides.append(Side("base", args.against, tmp, server.url, args.log_level))
    if args.callgrind:
        callgrind(sides, server)
        return

    results: dict[str, list[dict[str, Any]]] = {side.name: [] for side in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            res = side.run(args.warm, args.jobs, server)
            res["us_per_job"] = 1e6 * (res["user"] + res["system"]) / args.jobs
            results[side.name].append(res)
            h.note(f"round {r + 1}/{args.rounds}: {side.name}: worker {res['us_per_job']:.1f} us"
                   f" CPU per job (user {1e6 * res['user'] / args.jobs:.1f}, system "
                   f"{1e6 * res['system'] / args.jobs:.1f}), {args.jobs / res['wall']:,.0f} "
                   f"jobs/s alone; redis-server {res['redis_us_per_job']:.1f} us")
    parts = []
    for side in sides:
        values = [res["us_per_job"] for res in results[side.name]]
        redis_values = [res["redis_us_per_job"] for res in results[side.name]]
        parts.append(f"{side.name} {h.median(values):.1f} us (range {min(values):.1f}-"
                     f"{max(values):.1f}; redis-server {h.median(redis_values):.1f} us)")
    ratio_text, ratios = "", []
    if args.against:
        ratios = [t["us_per_job"] / b["us_per_job"]
                  for t, b in zip(results["this"], results["base"], strict=True)]
        ratio_text = (f"; this / base {h.median(ratios):.3f} (range {min(ratios):.3f}-"
                      f"{max(ratios):.3f})")
    h.emit("noop-cpu", f"noop-cpu: worker CPU per no-op job, 1 worker, {args.jobs} jobs after "
           f"{args.warm}, median of {args.rounds} rounds: {'; '.join(parts)}{ratio_text}",
           {"jobs": args.jobs, "warm": args.warm, "rounds": args.rounds, "results": results,
            "ratios": ratios, "log_level": args.log_level or "info"})


if __name__ == "__main__":
    main()
