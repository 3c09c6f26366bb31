"""Clip throughput against the plain-ffmpeg floor.

N ten-second clips (default 20) cut from a generated 60 s 720p H.264 source:

- floor: plain ffmpeg commands on a local copy of the source, two at a time
  (``xargs -P2``), with the same codec settings clip-supervisor uses;
- clip-supervisor: 2 workers, the source served over loopback HTTP by the Range-capable
  sample server, clips stored under a file:// output_base; timed from the LPUSH of the N
  jobs until N completion events are in ``{clips}:done``.

The machine is shared, so the two sides take turns: in copy mode a round runs all N clips
on each side (3 rounds, the first side alternating); in encode mode, where one side takes
tens of seconds, they alternate every 4 clips inside the round. The ratio is the median over
rounds of floor time / clip-supervisor time, each round's two times summed over its chunks.

``--what-if`` also times, in each round, shell pipelines over the same URL (curl, ffprobe,
ffmpeg; two at a time): the cost of each stage of the design without any Python.

Usage: python -m bench.clips --mode copy|encode [--clips 20] [--rounds R] [--chunk K]
       [--what-if]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from typing import Any

import psutil

from bench import harness as h

CLIP_SECONDS = 10.0
TARGET = 0.95


def clip_starts(n: int, source_seconds: float) -> list[float]:
    """Starts spread over the source, every clip inside it: 0, 2.5, 5, ... (mod the room)."""
    room = source_seconds - CLIP_SECONDS
    return [round((i * 2.5) % room, 3) for i in range(n)]


def codec_args(mode: str) -> list[str]:
    # The same settings as worker.media.clip_command, so both sides produce the same clip.
    if mode == "copy":
        return ["-c", "copy", "-avoid_negative_ts", "make_zero"]
    return ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "128k"]


def run_floor(local: str, out_dir: str, starts: list[float], mode: str,
              parallel: int) -> tuple[float, float]:
    """``xargs -P2 ffmpeg ...`` over the clip starts; returns (wall, CPU) seconds."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    cmd = ["xargs", f"-P{parallel}", "-I{}", "ffmpeg", "-hide_banner", "-nostdin", "-v",
           "error", "-ss", "{}", "-i", local, "-t", f"{CLIP_SECONDS:g}", "-map", "0:v:0",
           "-map", "0:a:0?", "-sn", "-dn", "-map_metadata", "-1", *codec_args(mode),
           "-movflags", "+faststart", "-f", "mp4", "-y", os.path.join(out_dir, "c{}.mp4")]
    stdin = "".join(f"{s}\n" for s in starts).encode()
    cpu, started = h.children_cpu(), time.monotonic()
    done = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
    elapsed, cpu = time.monotonic() - started, h.children_cpu() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"floor ffmpeg failed: {done.stderr.decode()[-500:]}")
    made = [f for f in os.listdir(out_dir) if os.path.getsize(os.path.join(out_dir, f)) > 0]
    if len(made) != len(starts):
        raise RuntimeError(f"floor made {len(made)} clips of {len(starts)}")
    return elapsed, cpu


# What-if pipelines, as plain shell commands over the same HTTP URL, two at a time: how much
# of the gap each stage of clip-supervisor's design costs before any Python is involved.
# $1 = clip start, $2 = scratch folder, $3 = source URL; the codec arguments follow.
WHAT_IF = {
    "download+ffprobe+ffmpeg": 'curl -sf -o "$2/s$1" "$3" && ffprobe -v error -print_format '
    'json -show_format -show_streams "$2/s$1" >/dev/null && ffmpeg -hide_banner -nostdin -v '
    'error -ss "$1" -i "$2/s$1" "${@:4}" "$2/c$1.mp4" && rm -f "$2/s$1"',
    "download+ffmpeg": 'curl -sf -o "$2/s$1" "$3" && ffmpeg -hide_banner -nostdin -v error '
    '-ss "$1" -i "$2/s$1" "${@:4}" "$2/c$1.mp4" && rm -f "$2/s$1"',
    "ffmpeg on the URL": 'ffmpeg -hide_banner -nostdin -v error -ss "$1" -i "$3" "${@:4}" '
    '"$2/c$1.mp4"',
}


def run_what_if(script: str, http: h.HttpServer, out_dir: str, starts: list[float], mode: str,
                parallel: int) -> tuple[float, float]:
    """One what-if pipeline, two at a time; (wall, CPU) seconds, the HTTP server's included."""
    url = http.url("src.mp4")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    rest = ["-t", f"{CLIP_SECONDS:g}", "-map", "0:v:0", "-map", "0:a:0?", "-sn", "-dn",
            "-map_metadata", "-1", *codec_args(mode), "-movflags", "+faststart", "-f", "mp4",
            "-y"]
    cmd = ["xargs", f"-P{parallel}", "-I{}", "bash", "-c", script, "_", "{}", out_dir, url,
           *rest]
    stdin = "".join(f"{s}\n" for s in starts).encode()
    server = h.family(http.proc.pid)
    cpu, started = h.children_cpu() + h.cpu_total(server), time.monotonic()
    done = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
    elapsed = time.monotonic() - started
    cpu = h.children_cpu() + h.cpu_total(server) - cpu
    if done.returncode != 0:
        raise RuntimeError(f"what-if pipeline failed: {done.stderr.decode()[-500:]}")
    return elapsed, cpu


def cpu_split(sup: h.Supervisor, http: h.HttpServer,
              redis_server: h.RedisServer) -> dict[str, float]:
    """CPU seconds so far, by part: the master and workers themselves, the ffmpegs they
    have reaped, the HTTP server, redis-server."""
    assert sup.proc is not None
    master = psutil.Process(sup.proc.pid)
    workers = master.children()

    def own(p: psutil.Process) -> float:
        return sum(p.cpu_times()[:2])

    return {"clip-supervisor": own(master) + sum(own(w) for w in workers),
            "ffmpeg": sum(sum(w.cpu_times()[2:4]) for w in workers),
            "HTTP server": sum(own(p) for p in h.family(http.proc.pid)),
            "redis-server": own(psutil.Process(redis_server.proc.pid))}


def run_ours(sup: h.Supervisor, http: h.HttpServer, redis_server: h.RedisServer,
             url: str, starts: list[float], mode: str, tag: str) -> tuple[float, dict[str, Any]]:
    """LPUSH the jobs, wait for all their done events; returns (seconds, details), the
    details with the CPU seconds of the master, the workers and their ffmpeg/ffprobe, the
    HTTP server and redis-server, and how the jobs read the source."""
    k = sup.keys
    messages = [json.dumps({"id": f"r{tag}-c{i}", "url": url, "start": s,
                            "duration": CLIP_SECONDS, "mode": mode,
                            "output": f"r{tag}/c{i}.mp4"}) for i, s in enumerate(starts)]
    http.reset()
    assert sup.proc is not None
    procs = [*h.family(sup.proc.pid), *h.family(http.proc.pid),
             *h.family(redis_server.proc.pid)]
    cpu = h.cpu_total(procs)
    split = cpu_split(sup, http, redis_server)
    started = time.monotonic()
    sup.r.lpush(k["queue"], *messages)  # the first job pushed is the first taken (FIFO)

    events = h.wait_done(sup.r, k, len(messages), 600, what="all clips done")
    elapsed = time.monotonic() - started
    cpu = h.cpu_total(procs) - cpu
    split = {part: seconds - split[part]
             for part, seconds in cpu_split(sup, http, redis_server).items()}
    stages: dict[str, float] = {}
    reads: dict[str, int] = {}
    for event in events:
        for stage, seconds in (event.get("timings") or {}).items():
            stages[stage] = stages.get(stage, 0.0) + seconds
        read = event.get("source_read", "?")
        reads[read] = reads.get(read, 0) + 1
    served = http.stats()
    return elapsed, {"seconds": elapsed, "cpu_seconds": cpu, "cpu_split": split,
                     "stage_seconds_sum": stages, "reads": reads,
                     "bytes_served": served["bytes"], "requests": len(served["requests"])}


def _stages(sums: dict[str, float]) -> str:
    return " ".join(f"{stage} {seconds:.2f} s" for stage, seconds in sums.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("copy", "encode"), default="copy")
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=0,
                        help="paired rounds (default: 3 for copy, 1 for encode)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="clips per alternation inside a round (default: all for copy, "
                        "4 for encode)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="bytes/s of each of the HTTP server's answers, paced like a "
                        "remote link (default: unpaced loopback)")
    parser.add_argument("--cache", choices=("cold", "warm", "off"), default="cold",
                        help="the host's source cache: cold = empty at each round's start "
                        "(a URL per round), warm = the source already kept (one URL, a "
                        "first untimed clip keeps it), off = cache_max_bytes 0")
    parser.add_argument("--what-if", action="store_true",
                        help="also time shell pipelines over the same URL in each round: "
                        + ", ".join(WHAT_IF))
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.mode == "copy" else 1)
    chunk = args.chunk or (args.clips if args.mode == "copy" else 4)

    name, seconds, size, bitrate = h.SOURCE_720P
    source = h.media(name, seconds, size, bitrate)
    tmp = h.tmpdir("clips")
    www = h.site(tmp, {"src.mp4": source})
    local = os.path.join(tmp, "local.mp4")
    shutil.copyfile(source, local)
    starts = clip_starts(args.clips, seconds)

    redis_server = h.RedisServer(os.path.join(tmp, "redis"))
    http = h.HttpServer(www, rate=args.rate)
    job = {"mode": args.mode, "timeout": 900, "stall_timeout": 120}
    if args.cache != "cold":
        job["cache_max_bytes"] = "0" if args.cache == "off" else "2GiB"
    if args.cache == "warm":
        job["range_requests"] = "false"  # the untimed first clip downloads and keeps it
    sup = h.Supervisor(os.path.join(tmp, "sup"), redis_server.url, args.workers, job=job)
    sup.start()
    if args.cache == "warm":
        run_ours(sup, http, redis_server, http.url("src.mp4"), [0.0], args.mode, "warm-up")
    floors: list[float] = []
    ours: list[float] = []
    cpu_ratios: list[float] = []
    details: list[dict[str, Any]] = []
    what_if: dict[str, list[float]] = {}
    what_if_wall: dict[str, list[float]] = {}  # what-if time / clip-supervisor time, per round
    chunks = [starts[i:i + chunk] for i in range(0, len(starts), chunk)]
    for r in range(rounds):
        # Each round starts with a cold source cache: its own URL (the query is ignored by
        # the server, not by the cache's key). Inside a round, the cache works as it would.
        url = http.url("src.mp4") + ("" if args.cache == "warm" else f"?round={r}")
        # The machine is shared and its load drifts: the two sides take turns (chunk by
        # chunk, the first side alternating) and each round's ratio compares neighbours.
        floor_sum = ours_sum = floor_cpu = ours_cpu = 0.0
        for c, part in enumerate(chunks):
            for side in ("floor", "ours") if (r + c) % 2 == 0 else ("ours", "floor"):
                if side == "floor":
                    took, cpu = run_floor(local, os.path.join(tmp, "floor"), part, args.mode,
                                          args.workers)
                    floor_sum, floor_cpu = floor_sum + took, floor_cpu + cpu
                else:
                    took, info = run_ours(sup, http, redis_server, url, part, args.mode,
                                          f"{r}-{c}")
                    ours_sum, ours_cpu = ours_sum + took, ours_cpu + info["cpu_seconds"]
                    details.append(info)
        floors.append(floor_sum)
        ours.append(ours_sum)
        cpu_ratios.append(floor_cpu / ours_cpu)
        stages: dict[str, float] = {}
        for info in details[-len(chunks):]:
            for stage, secs in info["stage_seconds_sum"].items():
                stages[stage] = stages.get(stage, 0.0) + secs
        fetched = sum(i["bytes_served"] for i in details[-len(chunks):])
        reads: dict[str, int] = {}
        for info in details[-len(chunks):]:
            for read, n in info["reads"].items():
                reads[read] = reads.get(read, 0) + n
        per_job = {part: sum(i["cpu_split"][part] for i in details[-len(chunks):])
                   / len(starts) * 1000 for part in details[-1]["cpu_split"]}
        h.note(f"round {r + 1}/{rounds}: floor {floor_sum:.2f} s ({floor_cpu:.2f} s CPU), "
               f"clip-supervisor {ours_sum:.2f} s ({ours_cpu:.2f} s CPU; {fetched / 1e6:.1f} "
               f"MB fetched; source read: "
               + ", ".join(f"{n} {read}" for read, n in reads.items())
               + f"; stage sums over the jobs: {_stages(stages)}; CPU per job: "
               + ", ".join(f"{part} {ms:.1f} ms" for part, ms in per_job.items()) + ")")
        if args.what_if:
            for label, script in WHAT_IF.items():
                took, cpu = run_what_if(script, http, os.path.join(tmp, "whatif"), starts,
                                        args.mode, args.workers)
                what_if.setdefault(label, []).append(floor_cpu / cpu)
                what_if_wall.setdefault(label, []).append(took / ours_sum)
                h.note(f"round {r + 1}/{rounds}: what-if {label}: {took:.2f} s, {cpu:.2f} s "
                       f"CPU (CPU ratio {floor_cpu / cpu:.2f})")
    sup.stop()

    ratios = [f / o for f, o in zip(floors, ours, strict=True)]
    ratio = h.median(ratios)
    name = f"clips-{args.mode}" + ("" if args.cache == "cold" else f"-cache-{args.cache}") \
        + (f"-paced-{args.rate * 8 / 1e6:g}mbit" if args.rate else "")
    floor_s, ours_s = h.median(floors), h.median(ours)
    cpu_ratio = h.median(cpu_ratios)
    line = (f"{name}: ratio {ratio:.2f} (floor {floor_s:.2f} s / clip-supervisor "
            f"{ours_s:.2f} s; CPU-time ratio {cpu_ratio:.2f}; {args.clips} x {CLIP_SECONDS:g} s"
            f" clips of a {seconds} s "
            f"{size.split('x')[1]}p source over loopback HTTP, {args.workers} workers, "
            f"source cache {args.cache}, "
            + (f"server paced to {args.rate * 8 / 1e6:g} Mbit/s, " if args.rate else "")
            + f"median of {rounds} paired round(s))"
            + "".join(f"; what-if {k}: CPU-time ratio {h.median(v):.2f}, wall ratio "
                      f"{h.median(what_if_wall[k]):.2f}" for k, v in what_if.items())
            + f" | target >= {TARGET}: {h.verdict(ratio >= TARGET)}")
    h.emit(name, line, {
        "mode": args.mode, "cache": args.cache, "rate": args.rate, "clips": args.clips,
        "workers": args.workers, "rounds": rounds,
        "chunk": chunk, "ratio": ratio, "round_ratios": ratios, "cpu_ratio": cpu_ratio,
        "round_cpu_ratios": cpu_ratios, "floor_seconds": floors,
        "ours_seconds": ours, "target": TARGET, "met": ratio >= TARGET,
        "source_bytes": os.path.getsize(source), "ours": details,
        "what_if_cpu_ratios": what_if, "what_if_wall_ratios": what_if_wall})


if __name__ == "__main__":
    main()
