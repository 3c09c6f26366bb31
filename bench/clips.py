"""Clip throughput against the plain-ffmpeg floor.

N ten-second clips (default 20) cut from a generated 60 s 720p H.264 source:

- floor: plain ffmpeg commands on a local copy of the source, two at a time, with the same
  seek and codec settings clip-supervisor uses (for encode: the one-second preroll, each
  frame encoded once with the source's timestamps);
- ffmpeg on the URL (``--source http``, copy mode): the same commands reading the source
  over HTTP from the same server clip-supervisor reads: the least a clip read over HTTP
  costs, the floor of the HTTP target;
- clip-supervisor: 2 workers, clips stored under a file:// output_base; the source served
  over loopback HTTP by the Range-capable sample server (``--source http``, default) or
  named as a ``file://`` URL (``--source file``); timed from the LPUSH of the N jobs until N
  completion events are in ``{clips}:done``.

The machine is shared, so the sides take turns: in copy mode a round runs all N clips on
each side, in an order that changes from round to round; in encode mode, where one side
takes tens of seconds, they alternate every 4 clips inside the round. A ratio is the median
over rounds of (floor time / clip-supervisor time), each round's times summed over its
chunks. Targets: copy from ``file://`` >= 0.97 x the floor; copy over HTTP >= 0.95 x ffmpeg
on the URL; encode >= 0.95 x the floor.

``--what-if`` also times, in each round (after the paired sides), shell pipelines over the
same URL (curl, ffprobe, ffmpeg; two at a time; copy mode): the cost of each stage of the
design without any Python.

Usage: python -m bench.clips --mode copy|encode [--source http|file] [--clips 20]
       [--rounds R] [--chunk K] [--what-if]
       python -m bench.clips --mode smart [bench.smartcut's options]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import selectors
import shutil
import subprocess
import time
from typing import Any

import psutil

from bench import harness as h

CLIP_SECONDS = 10.0
PREROLL = 1.0  # seconds decoded before an encode's start (an MP4 source), as the worker does
TARGETS = {"file": 0.97, "http": 0.95, "encode": 0.95}


def clip_starts(n: int, source_seconds: float) -> list[float]:
    """Starts spread over the source, every clip inside it: 0, 2.5, 5, ... (mod the room)."""
    room = source_seconds - CLIP_SECONDS
    return [round((i * 2.5) % room, 3) for i in range(n)]


def codec_args(mode: str) -> list[str]:
    # The same settings as worker.media.clip_command, so both sides produce the same clip.
    if mode == "copy":
        return ["-c", "copy", "-avoid_negative_ts", "make_zero"]
    return ["-fps_mode", "passthrough", "-enc_time_base:v", "-1", "-c:v", "libx264",
            "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k"]


def floor_command(src: str, out: str, start: float, mode: str) -> list[str]:
    """Plain ffmpeg cutting one clip as worker.media.clip_command does, without what only a
    daemon needs (the whitelists, -progress, -v info): an encode seeks PREROLL seconds early
    and drops them after the input, as the worker does for an MP4 source."""
    preroll = min(start, PREROLL) if mode == "encode" else 0.0
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-ss", f"{start - preroll:.6f}",
           "-i", src]
    if preroll > 0:
        cmd += ["-ss", f"{preroll:.6f}"]
    return [*cmd, "-t", f"{CLIP_SECONDS:g}", "-map", "0:v:0", "-map", "0:a:0?", "-sn", "-dn",
            "-map_metadata", "-1", *codec_args(mode), "-movflags", "+faststart", "-f", "mp4",
            "-y", out]


def run_parallel(commands: list[list[str]], parallel: int,
                 env: dict[str, str] | None = None) -> float:
    """Run ``commands`` ``parallel`` at a time, as ``xargs -P`` does (the next one starts as
    soon as one ends); returns the wall seconds. Waits on pidfds, so that no other child of
    the harness (redis-server, the HTTP server, clip-supervisor) is reaped by mistake."""
    pending = commands[::-1]
    running: dict[int, tuple[subprocess.Popen, int]] = {}  # pidfd -> (process, pidfd)
    failed = ""
    started = time.monotonic()
    with selectors.DefaultSelector() as sel:
        while pending or running:
            while pending and len(running) < parallel:
                proc = subprocess.Popen(pending.pop(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        env=env)
                fd = os.pidfd_open(proc.pid)
                running[fd] = (proc, fd)
                sel.register(fd, selectors.EVENT_READ)
            for key, _ in sel.select():
                proc, fd = running.pop(key.fd)
                sel.unregister(fd)
                os.close(fd)
                _, stderr = proc.communicate()  # it has exited: this reaps it
                if proc.returncode != 0 and not failed:
                    failed = f"{' '.join(proc.args)}: {stderr.decode()[-500:]}"
    if failed:
        raise RuntimeError(f"floor ffmpeg failed: {failed}")
    return time.monotonic() - started


def run_floor(src: str, out_dir: str, starts: list[float], mode: str, parallel: int,
              server: list[psutil.Process] | None = None,
              env: dict[str, str] | None = None) -> tuple[float, float]:
    """Plain ffmpeg on ``src`` (a local file, or the URL of ``server``) over the clip starts,
    ``parallel`` at a time (in ``env``); returns (wall, CPU) seconds, the server's CPU
    included."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    commands = [floor_command(src, os.path.join(out_dir, f"c{i}.mp4"), start, mode)
                for i, start in enumerate(starts)]
    cpu = h.children_cpu() + h.cpu_total(server or [])
    elapsed = run_parallel(commands, parallel, env)
    cpu = h.children_cpu() + h.cpu_total(server or []) - cpu
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


def _sum_over(infos: list[dict[str, Any]], key: str) -> dict[str, float]:
    total: dict[str, float] = {}
    for info in infos:
        for part, value in info[key].items():
            total[part] = total.get(part, 0.0) + value
    return total


def main() -> None:
    # --mode smart runs bench.smartcut: smart beside copy and encode, with its own options
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--mode")
    if early.parse_known_args()[0].mode == "smart":
        from bench import smartcut
        return smartcut.main()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("copy", "encode", "smart"), default="copy",
                        help="smart: bench.smartcut (see its --help)")
    parser.add_argument("--source", choices=("http", "file"), default="http",
                        help="how clip-supervisor reads the source: over loopback HTTP "
                        "(default), or as a file:// URL naming the floor's local copy")
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=0,
                        help="paired rounds (default: 6 for copy, 1 for encode)")
    parser.add_argument("--chunk", type=int, default=0,
                        help="clips per alternation inside a round (default: all for copy, "
                        "4 for encode)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fast-start", choices=("on", "off"), default="on",
                        help="clip-supervisor's [job] fast_start (on: its ffmpegs start with "
                        "the host's plan, worker/preload.py; copy from file:// then also "
                        "times the floor started with that plan)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="bytes/s of each of the HTTP server's answers, paced like a "
                        "remote link (default: unpaced loopback)")
    parser.add_argument("--cache", choices=("cold", "warm", "off"), default="cold",
                        help="the host's source cache (HTTP sources): cold = empty at each "
                        "round's start (a URL per round), warm = the source already kept (one "
                        "URL, a first untimed clip keeps it), off = cache_max_bytes 0")
    parser.add_argument("--what-if", action="store_true",
                        help="copy mode: also time shell pipelines over the same URL in each "
                        "round: " + ", ".join(WHAT_IF))
    args = parser.parse_args()
    if args.source == "file" and (args.cache != "cold" or args.rate or args.what_if):
        parser.error("--source file takes no --cache, --rate or --what-if (no HTTP involved)")
    if args.what_if and args.mode != "copy":
        parser.error("--what-if is for copy mode (its pipelines seek as a copy does)")
    rounds = args.rounds or (6 if args.mode == "copy" else 1)
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
    if args.source == "file":
        job["allowed_schemes"] = "http,https,gs,file"
    job["fast_start"] = "true" if args.fast_start == "on" else "false"
    planned_env = None
    if args.fast_start == "on" and args.source == "file" and args.mode == "copy":
        from worker import preload  # the plan the daemon's master makes or reads back

        plans = preload.prepare(["ffmpeg"])
        program = shutil.which("ffmpeg")
        planned_env = preload.env_for(program, None) if program in plans else None
    if args.cache != "cold":
        job["cache_max_bytes"] = "0" if args.cache == "off" else "2GiB"
    if args.cache == "warm":
        job["range_requests"] = "false"  # the untimed first clip downloads and keeps it
    sup = h.Supervisor(os.path.join(tmp, "sup"), redis_server.url, args.workers, job=job)
    sup.start()
    if args.cache == "warm":
        run_ours(sup, http, redis_server, http.url("src.mp4"), [0.0], args.mode, "warm-up")
    # The sides of a round: the floor, clip-supervisor, and for copy clips over HTTP ffmpeg
    # on the same URL (the HTTP target's floor; an encode is libx264's time either way).
    # With a start plan, also the floor started with it: against that, clip-supervisor's
    # own cost per clip, apart from what the plan saves ffmpeg.
    sides = ["floor", "ours"] + (["url"] if args.source == "http" and args.mode == "copy"
                                 else []) + (["planned"] if planned_env else [])
    orders = list(itertools.permutations(sides))
    times: dict[str, list[float]] = {side: [] for side in sides}
    cpus: dict[str, list[float]] = {side: [] for side in sides}
    details: list[dict[str, Any]] = []
    what_if: dict[str, list[float]] = {}
    what_if_wall: dict[str, list[float]] = {}  # what-if time / clip-supervisor time, per round
    chunks = [starts[i:i + chunk] for i in range(0, len(starts), chunk)]
    for r in range(rounds):
        # Each round starts with a cold source cache: its own URL (the query is ignored by
        # the server, not by the cache's key). Inside a round, the cache works as it would.
        url = (f"file://{local}" if args.source == "file" else http.url("src.mp4")
               + ("" if args.cache == "warm" else f"?round={r}"))
        # The machine is shared and its load drifts: the sides take turns (chunk by chunk,
        # in every order in turn) and each round's ratio compares neighbours.
        took_sum = dict.fromkeys(sides, 0.0)
        cpu_sum = dict.fromkeys(sides, 0.0)
        for c, part in enumerate(chunks):
            for side in orders[(r * len(chunks) + c) % len(orders)]:
                if side == "floor":
                    took, cpu = run_floor(local, os.path.join(tmp, "floor"), part, args.mode,
                                          args.workers)
                elif side == "planned":
                    took, cpu = run_floor(local, os.path.join(tmp, "planned"), part,
                                          args.mode, args.workers, env=planned_env)
                elif side == "url":
                    took, cpu = run_floor(http.url("src.mp4"), os.path.join(tmp, "url"), part,
                                          args.mode, args.workers, h.family(http.proc.pid))
                else:
                    took, info = run_ours(sup, http, redis_server, url, part, args.mode,
                                          f"{r}-{c}")
                    cpu = info["cpu_seconds"]
                    details.append(info)
                took_sum[side] += took
                cpu_sum[side] += cpu
        for side in sides:
            times[side].append(took_sum[side])
            cpus[side].append(cpu_sum[side])
        mine = details[-len(chunks):]
        stages = _sum_over(mine, "stage_seconds_sum")
        reads = _sum_over(mine, "reads")
        fetched = sum(i["bytes_served"] for i in mine)
        per_job = {part: cpu / len(starts) * 1000
                   for part, cpu in _sum_over(mine, "cpu_split").items()}
        h.note(f"round {r + 1}/{rounds}: floor {took_sum['floor']:.2f} s "
               f"({cpu_sum['floor']:.2f} s CPU), "
               + (f"ffmpeg on the URL {took_sum['url']:.2f} s ({cpu_sum['url']:.2f} s CPU), "
                  if "url" in sides else "")
               + (f"floor with the plan {took_sum['planned']:.2f} s "
                  f"({cpu_sum['planned']:.2f} s CPU), " if "planned" in sides else "")
               + f"clip-supervisor {took_sum['ours']:.2f} s ({cpu_sum['ours']:.2f} s CPU; "
               f"{fetched / 1e6:.1f} MB fetched; source read: "
               + ", ".join(f"{n:g} {read}" for read, n in reads.items())
               + f"; stage sums over the jobs: {_stages(stages)}; CPU per job: "
               + ", ".join(f"{part} {ms:.1f} ms" for part, ms in per_job.items()) + ")")
        if args.what_if:
            for label, script in WHAT_IF.items():
                took, cpu = run_what_if(script, http, os.path.join(tmp, "whatif"), starts,
                                        args.mode, args.workers)
                what_if.setdefault(label, []).append(cpu_sum["floor"] / cpu)
                what_if_wall.setdefault(label, []).append(took / took_sum["ours"])
                h.note(f"round {r + 1}/{rounds}: what-if {label}: {took:.2f} s, {cpu:.2f} s "
                       f"CPU (CPU ratio {cpu_sum['floor'] / cpu:.2f})")
    sup.stop()

    def paired(floor: str, key: dict[str, list[float]]) -> list[float]:
        return [f / o for f, o in zip(key[floor], key["ours"], strict=True)]

    ratios, cpu_ratios = paired("floor", times), paired("floor", cpus)
    url_ratios = paired("url", times) if "url" in sides else []
    url_cpu_ratios = paired("url", cpus) if "url" in sides else []
    planned_ratios = paired("planned", times) if "planned" in sides else []
    planned_cpu_ratios = paired("planned", cpus) if "planned" in sides else []
    ratio, cpu_ratio = h.median(ratios), h.median(cpu_ratios)
    # What the verdict is against: the floor for file:// and encode, ffmpeg on the URL for
    # copy clips over HTTP.
    against = "url" if "url" in sides else "floor"
    target = TARGETS["encode" if args.mode == "encode" else args.source]
    judged = h.median(url_ratios) if against == "url" else ratio
    name = f"clips-{args.mode}" + ("-file" if args.source == "file" else "") \
        + ("" if args.cache == "cold" else f"-cache-{args.cache}") \
        + (f"-paced-{args.rate * 8 / 1e6:g}mbit" if args.rate else "") \
        + ("-fast-start-off" if args.fast_start == "off" else "")
    floor_s, ours_s = h.median(times["floor"]), h.median(times["ours"])
    where = ("named as a file:// URL" if args.source == "file" else "over loopback HTTP, "
             f"source cache {args.cache}"
             + (f", server paced to {args.rate * 8 / 1e6:g} Mbit/s" if args.rate else ""))
    line = (f"{name}: ratio {ratio:.2f} vs the floor (floor {floor_s:.2f} s / clip-supervisor "
            f"{ours_s:.2f} s; CPU-time ratio {cpu_ratio:.2f}"
            + (f"; range {min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "")
            + ")"
            + (f"; ratio {h.median(url_ratios):.2f} vs ffmpeg on the URL ("
               f"{h.median(times['url']):.2f} s; CPU-time ratio {h.median(url_cpu_ratios):.2f}"
               f"; range {min(url_ratios):.2f}-{max(url_ratios):.2f})" if url_ratios else "")
            + (f"; ratio {h.median(planned_ratios):.2f} vs the floor started with the same "
               f"plan (CPU-time ratio {h.median(planned_cpu_ratios):.2f}; range "
               f"{min(planned_ratios):.2f}-{max(planned_ratios):.2f})"
               if planned_ratios else "")
            + ("; fast_start off" if args.fast_start == "off" else "")
            + f" ({args.clips} x {CLIP_SECONDS:g} s clips of a {seconds} s "
            f"{size.split('x')[1]}p source {where}, {args.workers} workers, median of "
            f"{rounds} paired round(s))"
            + "".join(f"; what-if {k}: CPU-time ratio {h.median(v):.2f}, wall ratio "
                      f"{h.median(what_if_wall[k]):.2f}" for k, v in what_if.items())
            + f" | target >= {target} x "
            + ("ffmpeg on the URL" if against == "url" else "the floor")
            + f": {h.verdict(judged >= target)}")
    h.emit(name, line, {
        "mode": args.mode, "source": args.source, "cache": args.cache, "rate": args.rate,
        "clips": args.clips, "workers": args.workers, "rounds": rounds,
        "chunk": chunk, "ratio": ratio, "round_ratios": ratios, "cpu_ratio": cpu_ratio,
        "round_cpu_ratios": cpu_ratios, "floor_seconds": times["floor"],
        "ours_seconds": times["ours"], "url_seconds": times.get("url", []),
        "url_ratio": h.median(url_ratios) if url_ratios else None,
        "round_url_ratios": url_ratios, "url_cpu_ratios": url_cpu_ratios,
        "fast_start": args.fast_start, "planned_seconds": times.get("planned", []),
        "planned_ratio": h.median(planned_ratios) if planned_ratios else None,
        "round_planned_ratios": planned_ratios, "planned_cpu_ratios": planned_cpu_ratios,
        "target": target, "against": against, "met": judged >= target,
        "source_bytes": os.path.getsize(source), "ours": details,
        "what_if_cpu_ratios": what_if, "what_if_wall_ratios": what_if_wall})


if __name__ == "__main__":
    main()
