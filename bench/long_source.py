"""Long remote sources: 10 s cut from the middle of a 10-minute source, bytes and time.

- clip-supervisor as it is: 1 worker, copy mode. The server answers Range requests, so the
  worker reads the source in place through its range relay (``source_read`` = ranges in
  the done event), with the index at the front and at the end of the file;
- clip-supervisor with ``[job] range_requests = false``: the whole source downloaded first
  (what it does with a server that ignores Range);
- floor: ffmpeg on the HTTP URL itself, ``-ss`` before ``-i``, so that it reads the index
  and then seeks with a Range request (the sample server supports them); the same codec
  settings. Also with the index (moov) at the end of the file, which costs one more range.

Bytes are counted by the HTTP server (bench.rangeserver): body bytes it handed to the kernel,
including any that were in flight when ffmpeg hung up. On loopback that in-flight amount is
the kernel's socket buffers (megabytes) and says nothing about a remote source, so both are
run against a remote-like server too (paced to 100 Mbit/s per response, small send buffer),
which is what the target is checked on. The clip's share is the source's size x 10 s / its
duration. Ratio = floor time / clip-supervisor time (medians).

Usage: python -m bench.long_source [--rounds 3] [--rate BYTES_PER_SECOND]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from typing import Any

from bench import harness as h

CLIP_START = 295.0
CLIP_SECONDS = 10.0
TARGET_SHARE = 2.0
PACED_RATE = 100e6 / 8  # 100 Mbit/s


def tail_index_copy(source: str) -> str:
    """The same video with its moov atom at the end (no +faststart), cached."""
    path = os.path.join(h.CACHE, os.path.basename(source).replace(".mp4", "-moov-at-end.mp4"))
    if not os.path.exists(path):
        partial = path + ".partial.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-i", source, "-c", "copy",
                        partial], check=True)
        os.replace(partial, path)
    return path


def ffmpeg_direct(http: h.HttpServer, name: str, out: str) -> dict[str, Any]:
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-ss", f"{CLIP_START:g}",
           "-i", http.url(name), "-t", f"{CLIP_SECONDS:g}", "-map", "0:v:0", "-map", "0:a:0?",
           "-sn", "-dn", "-map_metadata", "-1", "-c", "copy", "-avoid_negative_ts",
           "make_zero", "-movflags", "+faststart", "-f", "mp4", "-y", out]
    http.reset()
    started = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    elapsed = time.monotonic() - started
    stats = http.stats()
    return {"seconds": elapsed, "bytes": stats["bytes"], "output_seconds": duration(out),
            "requests": [{k: q[k] for k in ("range", "status", "bytes")}
                         for q in stats["requests"]]}


def ours(sup: h.Supervisor, http: h.HttpServer, name: str, n: int) -> dict[str, Any]:
    """One job through ``sup``: seconds from LPUSH to its done event, bytes the server sent."""
    http.reset()
    started = time.monotonic()
    sup.r.lpush(sup.keys["queue"], json.dumps({
        # a URL of its own (the server ignores the query): each round is a first clip from
        # this source, with nothing in the host's source cache and no reads counted for it
        "id": f"long-{n}", "url": f"{http.url(name)}?job={n}", "start": CLIP_START,
        "duration": CLIP_SECONDS, "mode": "copy", "output": f"long-{n}.mp4"}))
    (event,) = h.wait_done(sup.r, sup.keys, 1, 300, what="the clip")
    elapsed = time.monotonic() - started
    stats = http.stats()
    return {"seconds": elapsed, "bytes": stats["bytes"], "timings": event.get("timings"),
            "source_read": event.get("source_read"),
            "output_seconds": duration(os.path.join(sup.out, f"long-{n}.mp4")),
            "requests": [{k: q[k] for k in ("range", "status", "bytes")}
                         for q in stats["requests"]]}


def duration(path: str) -> float:
    done = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                           "-of", "json", path], capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout)["format"]["duration"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=PACED_RATE,
                        help="bytes/s of the remote-like server (default 100 Mbit/s)")
    args = parser.parse_args()

    name, seconds, size, bitrate = h.SOURCE_LONG
    source = h.media(name, seconds, size, bitrate)
    tail = tail_index_copy(source)
    tmp = h.tmpdir("long")
    www = h.site(tmp, {"long.mp4": source, "long-tail.mp4": tail})
    server = h.RedisServer(os.path.join(tmp, "redis"))
    sup = h.Supervisor(os.path.join(tmp, "sup"), server.url, 1)
    sup.start()
    whole = h.Supervisor(os.path.join(tmp, "whole"), server.url, 1, prefix="whole",
                         job={"range_requests": "false"})
    whole.start()
    size_bytes = os.path.getsize(source)
    share = size_bytes * CLIP_SECONDS / seconds

    results: dict[str, dict[str, Any]] = {}
    n = 0
    for label, rate in (("remote", args.rate), ("loopback", 0.0)):
        http = h.HttpServer(www, rate=rate)
        mine, mine_tail, download, direct, direct_tail = [], [], [], [], []
        for r in range(args.rounds):
            mine.append(ours(sup, http, "long.mp4", n))
            mine_tail.append(ours(sup, http, "long-tail.mp4", n + 1))
            download.append(ours(whole, http, "long.mp4", r + (args.rounds if rate == 0 else 0)))
            n += 2
            direct.append(ffmpeg_direct(http, "long.mp4", os.path.join(tmp, "direct.mp4")))
            direct_tail.append(ffmpeg_direct(http, "long-tail.mp4",
                                              os.path.join(tmp, "tail.mp4")))
            h.note(f"{label} round {r + 1}: clip-supervisor ({mine[-1]['source_read']}) "
                   f"{mine[-1]['bytes'] / 1e6:.2f} MB in {mine[-1]['seconds']:.2f} s, moov at end "
                   f"{mine_tail[-1]['bytes'] / 1e6:.2f} MB in {mine_tail[-1]['seconds']:.2f} s; "
                   f"range_requests = false ({download[-1]['source_read']}) "
                   f"{download[-1]['bytes'] / 1e6:.1f} MB in {download[-1]['seconds']:.2f} s; "
                   f"ffmpeg on the URL "
                   f"{direct[-1]['bytes'] / 1e6:.2f} MB in {direct[-1]['seconds']:.2f} s "
                   f"(moov at end: {direct_tail[-1]['bytes'] / 1e6:.2f} MB in "
                   f"{direct_tail[-1]['seconds']:.2f} s)")
        summary = {"rate": rate, "ours": mine, "ours_moov_at_end": mine_tail,
                   "ours_download": download, "ffmpeg_direct": direct,
                   "ffmpeg_direct_moov_at_end": direct_tail}
        for key, runs in (("ours", mine), ("ours_tail", mine_tail), ("download", download),
                          ("direct", direct), ("tail", direct_tail)):
            summary[f"{key}_bytes"] = h.median([run["bytes"] for run in runs])
            summary[f"{key}_seconds"] = h.median([run["seconds"] for run in runs])
        summary["ratio"] = summary["direct_seconds"] / summary["ours_seconds"]
        results[label] = summary
        h.kill_group(http.proc)
    sup.stop()
    whole.stop()

    def part(res: dict[str, Any], key: str) -> str:
        return (f"{res[key + '_bytes'] / 1e6:.2f} MB ({res[key + '_bytes'] / share:.1f}x) in "
                f"{res[key + '_seconds']:.2f} s")

    remote, loop = results["remote"], results["loopback"]
    met = max(remote["ours_bytes"], remote["ours_tail_bytes"]) <= TARGET_SHARE * share
    line = (f"long-source: {CLIP_SECONDS:g} s at {CLIP_START:g} s of a {seconds / 60:g} min "
            f"{size.split('x')[1]}p source ({size_bytes / 1e6:.1f} MB, clip share "
            f"{share / 1e6:.2f} MB), copy; remote-like server ({args.rate * 8 / 1e6:g} Mbit/s): "
            f"clip-supervisor reading ranges {part(remote, 'ours')} (moov at end "
            f"{part(remote, 'ours_tail')}), downloading whole {part(remote, 'download')}; "
            f"ffmpeg seeking on the URL "
            f"{part(remote, 'direct')} (moov at end {part(remote, 'tail')}), ratio "
            f"{remote['ratio']:.2f} = floor time / ours; loopback: clip-supervisor "
            f"{part(loop, 'ours')}, ffmpeg on the URL {part(loop, 'direct')}, ratio "
            f"{loop['ratio']:.2f} | target clip-supervisor bytes <= {TARGET_SHARE:g}x share: "
            f"{h.verdict(met)}")
    h.emit("long-source", line, {"source_bytes": size_bytes, "share_bytes": share,
                                 "ratio": remote["ratio"], "met": met,
                                 "target_share": TARGET_SHARE, "results": results})


if __name__ == "__main__":
    main()
