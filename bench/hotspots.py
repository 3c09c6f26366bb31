"""Where a worker's time goes: py-spy on clip-supervisor's workers under load.

``noop``: 2 workers, ``[job] pipeline = noop``, a batch of jobs pushed at once while py-spy
samples both workers (``--nonblocking``, so the workers are not paused); ``copy``: the same
with 20 copy clips of the 720p source over HTTP (``--idle`` too, so time spent waiting on
ffprobe/ffmpeg/the socket shows). Prints the top functions by own time and by inclusive time
(from py-spy's collapsed stacks) and keeps the raw stacks in bench/profiles/.

py-spy samples wall time: a worker that is runnable but waiting for a CPU (2 workers and
redis-server share 2 cores) is charged to whatever call it is in, mostly socket calls. ``cpu``
gives the CPU-time view instead: one worker (bench/cpu_worker.py) under cProfile with
``time.process_time`` as its clock, on a batch of no-op jobs (``--clips``: real copy clips
of a ``file://`` source; ffmpeg's own CPU is not counted). ``client``: what one Redis
call costs in redis-py against a raw socket (bench/client_cost.py).

Usage: python -m bench.hotspots [noop|copy|cpu|client] [--jobs 20000] [--workers 2] [--clips]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pstats
import signal
import subprocess
import time

from bench import harness as h

PROFILES = os.path.join(h.BENCH, "profiles")


def summarize(path: str, top: int = 25) -> str:
    """Own and inclusive sample shares per function from py-spy's --format raw output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            frames = [_short(f) for f in stack.split(";") if f]
            if any(f.startswith("Thread._bootstrap ") for f in frames):
                continue  # the heartbeat thread: only the job loop's thread is of interest
            n = int(count)
            total += n
            if frames:
                own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples of the main thread (the job loop)", "own time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines += ["inclusive time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    return f"{name} ({os.path.basename(file)})" if file else name


def cpu_profile(jobs: int, clips: bool) -> None:
    tmp = h.tmpdir("cpuprofile")
    server = h.RedisServer(os.path.join(tmp, "redis"))
    if clips:  # real copy clips of the 720p source named as a file:// URL
        name, seconds, size, bitrate = h.SOURCE_720P
        url = "file://" + h.media(name, seconds, size, bitrate)
        job = {"mode": "copy", "allowed_schemes": "file"}
    else:
        url, seconds, job = "http://127.0.0.1:9/v.mp4", 60.0, {"pipeline": "noop"}
    sup = h.Supervisor(os.path.join(tmp, "sup"), server.url, 1, job=job)
    out = os.path.join(PROFILES, "cpu-worker.pstats")
    proc = h.spawn([h.clip_python(), os.path.join(h.BENCH, "cpu_worker.py"), "--config",
                    sup.conf, "--out", out], cwd=h.ROOT, env={"PYTHONPATH": h.ROOT},
                   log=os.path.join(tmp, "worker.out"))

    def registered() -> bool:
        if proc.poll() is not None:
            with open(os.path.join(tmp, "worker.out")) as fh:
                raise RuntimeError(f"the profiled worker exited: {fh.read()[-2000:]}")
        return sup.r.hlen(sup.keys["workers"]) >= 1

    h.wait_until(registered, 30, what="the worker")
    messages = [json.dumps({"id": f"p{i}", "url": url, "start": (i * 2.5) % (seconds - 10),
                            "duration": 10}) for i in range(jobs)]
    for i in range(0, jobs, 1000):
        sup.r.lpush(sup.keys["queue"], *messages[i:i + 1000])
    h.wait_until(lambda: sup.r.llen(sup.keys["done"]) >= jobs, 600, interval=0.05,
                 what="the batch")
    proc.send_signal(signal.SIGTERM)
    h.wait_exit(proc, 30)
    stats = pstats.Stats(out)
    total = stats.total_tt  # type: ignore[attr-defined]
    what = "file:// copy clips" if clips else "no-op jobs"
    print(f"== {os.path.relpath(out, h.ROOT)}: {jobs} {what}, {total:.2f} s CPU in the "
          f"job loop, {1e6 * total / jobs:.0f} us per job")
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore
        rows.append((ct, tt, nc, f"{func} ({os.path.basename(file)}:{line})"))
    print("inclusive CPU per job (us), own CPU per job (us), calls per job, function")
    for ct, tt, nc, name in sorted(rows, reverse=True)[:45]:
        print(f"  {1e6 * ct / jobs:8.1f} {1e6 * tt / jobs:8.1f} {nc / jobs:6.2f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", choices=("noop", "copy", "cpu", "client"),
                        default="noop")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--clips", action="store_true",
                        help="cpu: real copy clips from a file:// source instead of no-op jobs "
                        "(the worker's own CPU per clip, ffmpeg's not counted)")
    parser.add_argument("--workers", type=int, default=2,
                        help="1 keeps redis-server off the worker's core: less preemption "
                        "charged to socket calls")
    parser.add_argument("--seconds", type=float, default=0,
                        help="sampling time (default: enough for the batch)")
    args = parser.parse_args()

    os.makedirs(PROFILES, exist_ok=True)
    if args.mode == "cpu":
        cpu_profile(args.jobs, args.clips)
        return
    if args.mode == "client":
        server = h.RedisServer(os.path.join(h.tmpdir("client"), "redis"))
        subprocess.run([h.clip_python(), os.path.join(h.BENCH, "client_cost.py"), server.url],
                       check=True)
        return
    tmp = h.tmpdir("profile")
    server = h.RedisServer(os.path.join(tmp, "redis"))
    job: dict[str, object] = {"pipeline": "noop"} if args.mode == "noop" else {}
    sup = h.Supervisor(os.path.join(tmp, "sup"), server.url, args.workers, job=job)
    if args.mode == "noop":
        url, count = "http://127.0.0.1:9/v.mp4", args.jobs
        messages = [json.dumps({"id": f"p{i}", "url": url, "duration": 10})
                    for i in range(count)]
        seconds = args.seconds or 6.0
    else:
        name, length, size, bitrate = h.SOURCE_720P
        source = h.media(name, length, size, bitrate)
        www = h.site(tmp, {"src.mp4": source})
        http = h.HttpServer(www)
        count = 20
        messages = [json.dumps({"id": f"c{i}", "url": http.url("src.mp4"),
                                "start": (i * 2.5) % 50, "duration": 10, "mode": "copy"})
                    for i in range(count)]
        seconds = args.seconds or 8.0
    sup.start()
    time.sleep(0.5)
    outputs = []
    spies = []
    for i, pid in enumerate(sup.worker_pids()):
        out = os.path.join(PROFILES, f"{args.mode}-worker{i + 1}.txt")
        outputs.append(out)
        cmd = [h.bench_bin("py-spy"), "record", "--nonblocking", "--rate", "200", "--format",
               "raw", "--duration", str(int(seconds)), "--pid", str(pid), "--output", out]
        if args.mode == "copy":
            cmd.append("--idle")
        spies.append(h.spawn(cmd, log=os.path.join(tmp, f"py-spy-{i}.log")))
    time.sleep(1.0)  # py-spy attaches
    started = time.monotonic()
    for i in range(0, len(messages), 1000):
        sup.r.lpush(sup.keys["queue"], *messages[i:i + 1000])
    h.wait_until(lambda: sup.r.llen(sup.keys["done"]) >= count, 600, interval=0.01,
                 what="the batch")
    elapsed = time.monotonic() - started
    for spy in spies:
        spy.wait(seconds + 30)
    sup.stop()
    h.note(f"{count} {args.mode} jobs in {elapsed:.2f} s ({count / elapsed:,.0f}/s) while "
           "sampled")
    for out in outputs:
        if os.path.exists(out):
            print(f"== {os.path.relpath(out, h.ROOT)}")
            print(summarize(out))
        else:
            print(f"== {out}: py-spy wrote nothing (see its log under {tmp})")


if __name__ == "__main__":
    main()
