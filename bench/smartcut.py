"""Smart cut beside stream copy and re-encoding, in one run (issue 14's benchmark).

Two generated 720p H.264 sources (libx264 with its default B-frames: 3, pyramid; AAC audio;
closed GOPs of 2 s and 5 s, no scene-cut keyframes), ~100 s each. The same N clips of 30 s
(default 6), at starts that are not on a keyframe of either source, go through the real
supervisor (2 workers) in ``copy``, ``smart`` and ``encode`` mode, each mode a batch of
its own, timed from the LPUSH of the N jobs to their N done events. The source is served
over loopback HTTP by the Range-capable bench server, with the host's source cache off,
so every clip reads its own bytes in place through the relay and no mode profits from a
copy another mode's clips left behind.

The machine is shared, so the modes take turns: in each round, for each source, the three
batches run in an order that changes from one (round, source) to the next, and a ratio is
the median over rounds of that round's ratio of neighbours. Reported per GOP:

- encode / smart, of wall time and of CPU time (every process involved: master, workers
  and the ffmpeg/ffprobe they reap, the HTTP server, redis-server): the target is smart
  >= 5 x faster than encode (wall) for 30 s clips;
- smart / copy, the price of exactness over a keyframe-snapped copy;
- the mean ``reencoded_seconds`` of the done events, the video packets of each clip (a
  copy starts at the keyframe before the start, so it holds more), and whether every job
  ended done with ``cut`` equal to the mode asked.

Then, untimed, where smart's time goes: a second supervisor whose ``[job] ffmpeg`` and
``ffprobe`` are wrappers that time each run (bash's ``time``: wall, user and system
seconds) cuts the smart clips once more; its runs are put into probe (ffprobe: the packets
around the start and the end, the keyframe's NAL type), cut (one ffmpeg writing the head,
body, tail and audio pieces), join (ffmpeg's concat of the pieces, audio encoded) and check
(the worker's decode across each join before it stores the clip). Those clips are also
decoded whole with ``-xerror`` here, to check that each decodes cleanly.

Usage: python -m bench.smartcut [--clips 6] [--rounds 3] [--gops 2,5] [--workers 2]
       python -m bench.clips --mode smart [the same options]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import time
from typing import Any

from bench import harness as h
from bench.clips import cpu_split

MODES = ("copy", "smart", "encode")
CLIP_SECONDS = 30.0
SOURCE_SECONDS = 100
SIZE, RATE, BITRATE = "1280x720", 25, "3M"
TARGET = 5.0  # smart >= 5 x faster than encode, wall time (issue 14)


# --- the sources and the clips -------------------------------------------------------------


def source(gop: int, seconds: int) -> str:
    """A 720p H.264 + AAC MP4 with a closed GOP of ``gop`` seconds and no other keyframe
    (no scene cuts), cached under bench/.cache like the harness's other sample media.
    ``-preset veryfast`` keeps x264's default B-frames (3, pyramid) at a fraction of the
    default preset's time; the bit rate is the harness's 720p sample's."""
    os.makedirs(h.CACHE, exist_ok=True)
    path = os.path.join(h.CACHE, f"smart-{seconds}s-720p-gop{gop}s.mp4")
    if os.path.exists(path):
        return path
    h.note(f"generating {os.path.basename(path)}; cached for later runs")
    frames = str(gop * RATE)
    partial = path + ".partial.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={SIZE}:rate={RATE}:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "veryfast", "-g", frames, "-keyint_min", frames,
         "-sc_threshold", "0", "-flags", "+cgop", "-b:v", BITRATE, "-maxrate", BITRATE,
         "-bufsize", "6M", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k",
         "-movflags", "+faststart", partial], check=True)
    os.replace(partial, path)
    return path


def clip_starts(n: int, seconds: float, gops: list[int]) -> list[float]:
    """``n`` starts spread over the source, each clip inside it, none within a frame of a
    keyframe of any of the sources (a clip starting on one would need no head)."""
    step = (seconds - CLIP_SECONDS - 2.0) / n
    starts = []
    for i in range(n):
        start = 1.3 + i * step
        while any(min(start % g, g - start % g) < 2 / RATE for g in gops):
            start += 0.13
        starts.append(round(start, 3))
    return starts


def video_packets(path: str) -> int:
    """The clip's video packets (one per frame), counted by ffprobe from the index."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0",
                          "-count_packets", "-show_entries", "stream=nb_read_packets",
                          "-of", "csv=p=0", path], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def decodes_cleanly(path: str) -> str:
    """'' when ffmpeg decodes the whole clip with -xerror and says nothing; else what it said."""
    proc = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-nostdin", "-i", path,
                           "-f", "null", "-"], capture_output=True, text=True, check=False)
    return "" if proc.returncode == 0 and not proc.stderr.strip() else (
        f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")


# --- one batch of jobs ---------------------------------------------------------------------


def run_batch(sup: h.Supervisor, http: h.HttpServer, redis_server: h.RedisServer, url: str,
              starts: list[float], mode: str, tag: str) -> dict[str, Any]:
    """LPUSH one job per start in ``mode``, wait for all their done events; the wall and
    CPU seconds, CPU by part, the done events' cuts and re-encoded seconds, the bytes
    served. The clips are counted (video packets) after the clock stops, then removed."""
    assert sup.proc is not None
    messages = [json.dumps({"id": f"{tag}-c{i}", "url": url, "start": s,
                            "duration": CLIP_SECONDS, "mode": mode,
                            "output": f"{tag}/c{i}.mp4"}) for i, s in enumerate(starts)]
    http.reset()
    procs = [*h.family(sup.proc.pid), *h.family(http.proc.pid),
             *h.family(redis_server.proc.pid)]
    cpu, split = h.cpu_total(procs), cpu_split(sup, http, redis_server)
    started = time.monotonic()
    sup.r.lpush(sup.keys["queue"], *messages)  # the first pushed is the first taken
    events = h.wait_done(sup.r, sup.keys, len(messages), 900, what=f"{tag}: all clips done")
    wall = time.monotonic() - started
    cpu = h.cpu_total(procs) - cpu
    split = {part: seconds - split[part]
             for part, seconds in cpu_split(sup, http, redis_server).items()}
    events.sort(key=lambda e: e["id"])
    served = http.stats()
    folder = os.path.join(sup.out, tag)
    frames = [video_packets(os.path.join(folder, f"c{i}.mp4")) for i in range(len(starts))]
    shutil.rmtree(folder, ignore_errors=True)  # 30 s clips add up over a run
    stages: dict[str, float] = {}
    for event in events:
        for stage, seconds in (event.get("timings") or {}).items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return {"mode": mode, "wall": wall, "cpu": cpu, "cpu_split": split,
            "cuts": [e.get("cut") for e in events],
            "reencoded": [e.get("reencoded_seconds") for e in events],
            "durations": [e.get("duration") for e in events],
            "elapsed": [e.get("elapsed") for e in events], "stage_seconds_sum": stages,
            "frames": frames, "bytes_served": served["bytes"],
            "requests": len(served["requests"])}


# --- where smart's time goes ---------------------------------------------------------------

# bash's `time` of the real program, one line per run: step, wall, user, system seconds.
# The program's own stderr stays on fd 2 (the worker reads it); the report goes to the log.
WRAPPER = """#!/bin/bash
# bench.smartcut: times one run of {real} for the smart-cut breakdown
case " $* " in
  *" -version "*) step=version ;;
  *" -f concat "*) step=join ;;
  *" -f null "*) step=check ;;
  *) step={step} ;;
esac
TIMEFORMAT="$step %3R %3U %3S"
{{ time {real} "$@" 2>&3 ; }} 3>&2 2>>{log}
"""


def timing_wrappers(folder: str) -> tuple[str, str, str]:
    """(ffmpeg wrapper, ffprobe wrapper, their log): see WRAPPER."""
    log = os.path.join(folder, "runs.log")
    paths = []
    for tool, step in (("ffmpeg", "cut"), ("ffprobe", "probe")):
        real = shutil.which(tool)
        if real is None:
            raise SystemExit(f"no {tool} on the PATH")
        path = os.path.join(folder, f"timed-{tool}")
        with open(path, "w") as fh:
            fh.write(WRAPPER.format(real=real, step=step, log=log))
        os.chmod(path, 0o755)
        paths.append(path)
    return paths[0], paths[1], log


def read_runs(log: str) -> dict[str, dict[str, float]]:
    """The wrappers' log, summed by step: runs, wall and CPU seconds."""
    steps: dict[str, dict[str, float]] = {}
    with open(log) as fh:
        for line in fh:
            step, wall, user, system = line.split()
            s = steps.setdefault(step, {"runs": 0, "wall": 0.0, "cpu": 0.0})
            s["runs"] += 1
            s["wall"] += float(wall)
            s["cpu"] += float(user) + float(system)
    return steps


def breakdown(tmp: str, redis_server: h.RedisServer, http: h.HttpServer, workers: int,
              urls: dict[int, str], starts: list[float]) -> dict[int, dict[str, Any]]:
    """The smart clips cut once more per source, by a supervisor whose ffmpeg and ffprobe
    are timed; each clip is then decoded with -xerror (untimed)."""
    folder = os.path.join(tmp, "breakdown")
    os.makedirs(folder)
    ffmpeg, ffprobe, log = timing_wrappers(folder)
    sup = h.Supervisor(os.path.join(folder, "sup"), redis_server.url, workers,
                       prefix="smart-breakdown", job=job_settings() | {
                           "ffmpeg": ffmpeg, "ffprobe": ffprobe}).start()
    result: dict[int, dict[str, Any]] = {}
    for gop, url in urls.items():
        with open(log, "w"):
            pass  # only this source's runs
        messages = [json.dumps({"id": f"b{gop}-c{i}", "url": url, "start": s,
                                "duration": CLIP_SECONDS, "mode": "smart",
                                "output": f"b{gop}/c{i}.mp4"}) for i, s in enumerate(starts)]
        started = time.monotonic()
        sup.r.lpush(sup.keys["queue"], *messages)
        events = h.wait_done(sup.r, sup.keys, len(messages), 900, what="breakdown clips")
        wall = time.monotonic() - started
        steps = read_runs(log)
        stages: dict[str, float] = {}
        for event in events:
            for stage, seconds in (event.get("timings") or {}).items():
                stages[stage] = stages.get(stage, 0.0) + seconds
        clips = [os.path.join(sup.out, f"b{gop}", f"c{i}.mp4") for i in range(len(starts))]
        errors = {os.path.basename(c): e for c in clips if (e := decodes_cleanly(c))}
        result[gop] = {"wall": wall, "steps": steps, "stage_seconds_sum": stages,
                       "elapsed_sum": sum(e["elapsed"] for e in events),
                       "cuts": [e.get("cut") for e in events], "decode_errors": errors}
        shutil.rmtree(os.path.join(sup.out, f"b{gop}"), ignore_errors=True)
    sup.stop()
    return result


# --- the run -------------------------------------------------------------------------------


def job_settings() -> dict[str, Any]:
    # cache off: every clip reads its own bytes in place (see the module docstring)
    return {"timeout": 900, "stall_timeout": 120, "cache_max_bytes": "0"}


def summarize(batches: list[dict[str, dict[str, Any]]], n: int) -> dict[str, Any]:
    """One GOP's rounds (mode -> batch, per round): paired ratios and means."""
    def ratios(a: str, b: str, key: str) -> list[float]:
        return [r[a][key] / r[b][key] for r in batches]

    summary: dict[str, Any] = {
        "encode_smart_wall": ratios("encode", "smart", "wall"),
        "encode_smart_cpu": ratios("encode", "smart", "cpu"),
        "smart_copy_wall": ratios("smart", "copy", "wall"),
        "smart_copy_cpu": ratios("smart", "copy", "cpu")}
    summary["median"] = {k: h.median(v) for k, v in list(summary.items())}
    for mode in MODES:
        runs = [r[mode] for r in batches]
        summary[mode] = {
            "wall_median": h.median([b["wall"] for b in runs]),
            "cpu_per_clip_median": h.median([b["cpu"] / n for b in runs]),
            "reencoded_mean": sum(sum(b["reencoded"]) for b in runs) / (n * len(runs)),
            "frames_mean": sum(sum(b["frames"]) for b in runs) / (n * len(runs)),
            "frames_range": [min(min(b["frames"]) for b in runs),
                             max(max(b["frames"]) for b in runs)],
            "bytes_served_per_clip": h.median([b["bytes_served"] / n for b in runs]),
            "requests_per_clip": h.median([b["requests"] / n for b in runs]),
            "cpu_split_per_clip": {part: h.median([b["cpu_split"][part] / n for b in runs])
                                   for part in runs[0]["cpu_split"]},
            "cut_as_asked": all(c == mode for b in runs for c in b["cuts"]),
            "cuts": sorted({str(c) for b in runs for c in b["cuts"]})}
    return summary


def table(summaries: dict[int, dict[str, Any]], parts: dict[int, dict[str, Any]],
          n: int) -> str:
    rows = ["GOP  mode    wall (median)  CPU/clip  re-encoded  frames (mean, range)  "
            "MB read/clip (requests)  cut as asked"]
    for gop, s in summaries.items():
        for mode in MODES:
            m = s[mode]
            rows.append(f"{gop} s  {mode:<6}  {m['wall_median']:9.2f} s  "
                        f"{m['cpu_per_clip_median']:6.2f} s  {m['reencoded_mean']:8.2f} s  "
                        f"{m['frames_mean']:7.1f} "
                        f"({m['frames_range'][0]}-{m['frames_range'][1]})"
                        f"  {m['bytes_served_per_clip'] / 1e6:7.2f} "
                        f"({m['requests_per_clip']:4.1f})  "
                        f"{'yes' if m['cut_as_asked'] else 'NO: ' + ','.join(m['cuts'])}")
        rows.append("      CPU per clip by part: " + "; ".join(
            f"{mode} " + ", ".join(f"{part} {sec:.3f} s" for part, sec in
                                   s[mode]["cpu_split_per_clip"].items()) for mode in MODES))
        med = s["median"]
        rows.append(f"      encode/smart: wall {med['encode_smart_wall']:.2f} "
                    f"(rounds {_range(s['encode_smart_wall'])}), CPU "
                    f"{med['encode_smart_cpu']:.2f} ({_range(s['encode_smart_cpu'])}); "
                    f"smart/copy: wall {med['smart_copy_wall']:.2f} "
                    f"({_range(s['smart_copy_wall'])}), CPU {med['smart_copy_cpu']:.2f} "
                    f"({_range(s['smart_copy_cpu'])})")
        if gop in parts:
            p = parts[gop]
            rows.append("      smart, per clip (timed ffmpeg/ffprobe): " + ", ".join(
                f"{step} {v['runs'] / n:.3g} run(s) {v['wall'] / n:.2f} s wall "
                f"{v['cpu'] / n:.2f} s CPU" for step, v in p["steps"].items()
                if step != "version")
                + f"; job elapsed {p['elapsed_sum'] / n:.2f} s; clean decode "
                f"{n - len(p['decode_errors'])}/{n}")
    return "\n".join(rows)


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("smart",), default="smart",
                        help="only for `bench.clips --mode smart`, which runs this")
    parser.add_argument("--clips", type=int, default=6, help="clips per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gops", default="2,5", help="GOP lengths of the sources, seconds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="bytes/s of each of the HTTP server's answers, paced like a "
                        "remote link (default: unpaced loopback)")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the timed-wrapper run of where smart's time goes")
    args = parser.parse_args()
    gops = [int(g) for g in args.gops.split(",")]
    commit = _commit()
    n = args.clips

    sources = {gop: source(gop, SOURCE_SECONDS) for gop in gops}
    starts = clip_starts(n, SOURCE_SECONDS, gops)
    tmp = h.tmpdir("smartcut")
    http = h.HttpServer(h.site(tmp, {f"gop{g}.mp4": p for g, p in sources.items()}),
                        rate=args.rate)
    urls = {g: http.url(f"gop{g}.mp4") for g in gops}
    redis_server = h.RedisServer(os.path.join(tmp, "redis"))
    sup = h.Supervisor(os.path.join(tmp, "sup"), redis_server.url, args.workers,
                       job=job_settings()).start()

    orders = list(itertools.permutations(MODES))
    rounds: dict[int, list[dict[str, dict[str, Any]]]] = {g: [] for g in gops}
    for r in range(args.rounds):
        for j, gop in enumerate(gops):
            # every (round, source) in another order: a drift in the machine's load
            # does not always land on the same mode
            order = orders[(r * len(gops) + j) % len(orders)]
            batch = {mode: run_batch(sup, http, redis_server, urls[gop], starts, mode,
                                     f"r{r}-g{gop}-{mode}") for mode in order}
            rounds[gop].append(batch)
            h.note(f"round {r + 1}/{args.rounds}, GOP {gop} s ({' '.join(order)}): "
                   + "; ".join(f"{m} {b['wall']:.2f} s, {b['cpu']:.2f} s CPU, re-encoded "
                               f"{sum(b['reencoded']):.1f} s" for m, b in batch.items()))
    sup.stop()
    parts = ({} if args.no_breakdown else
             breakdown(tmp, redis_server, http, args.workers, urls, starts))

    summaries = {g: summarize(rounds[g], n) for g in gops}
    h.note(table(summaries, parts, n))
    all_cut = all(s[m]["cut_as_asked"] for s in summaries.values() for m in MODES)
    clean = all(not p["decode_errors"] and all(c == "smart" for c in p["cuts"])
                for p in parts.values())
    met = all(s["median"]["encode_smart_wall"] >= TARGET for s in summaries.values())
    name = "clips-smart" + (f"-paced-{args.rate * 8 / 1e6:g}mbit" if args.rate else "")
    line = (f"{name}: " + "; ".join(
        f"GOP {g} s: encode/smart {s['median']['encode_smart_wall']:.2f} wall "
        f"({_range(s['encode_smart_wall'])}), {s['median']['encode_smart_cpu']:.2f} CPU; "
        f"smart/copy {s['median']['smart_copy_wall']:.2f} wall, "
        f"{s['median']['smart_copy_cpu']:.2f} CPU; re-encoded "
        f"{s['smart']['reencoded_mean']:.2f} s a clip" for g, s in summaries.items())
        + f" ({n} x {CLIP_SECONDS:g} s clips of {SOURCE_SECONDS} s 720p sources over "
        f"loopback HTTP{f' paced to {args.rate * 8 / 1e6:g} Mbit/s' if args.rate else ''}, "
        f"cache off, {args.workers} workers, median of {args.rounds} rounds; "
        f"every job done with the cut asked: {'yes' if all_cut else 'NO'}"
        + (f"; smart clips decode cleanly: {'yes' if clean else 'NO'}" if parts else "")
        + f") | target encode/smart >= {TARGET:g} x (wall): {h.verdict(met and all_cut)}")
    h.emit(name, line, {
        "clips": n, "clip_seconds": CLIP_SECONDS, "source_seconds": SOURCE_SECONDS,
        "workers": args.workers, "rounds": args.rounds, "rate": args.rate, "gops": gops,
        "starts": starts,
        "source_bytes": {g: os.path.getsize(p) for g, p in sources.items()},
        "target": TARGET, "met": met and all_cut, "all_cut_as_asked": all_cut,
        "smart_decodes_cleanly": clean if parts else None,
        "commit_at_start": commit, "commit_at_end": _commit(), "summary": summaries,
        "breakdown": parts, "batches": rounds})


def _commit() -> str:
    """HEAD, and '+ changes in worker/' when the worker's code differs from it: the
    checkout is shared, and the pipeline timed is the working tree's."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", h.ROOT, *args], capture_output=True, text=True,
                              check=False).stdout.strip()
    dirty = git("status", "--porcelain", "--", "worker")
    return git("rev-parse", "HEAD") + (" + changes in worker/" if dirty else "")


if __name__ == "__main__":
    main()
