"""Many clips of one source: one job of N clips against N jobs of one clip.

N ten-second clips (default 20) of the generated 60 s 720p source (bench.clips' starts:
0, 2.5, 5, ... so together they cover the source about three times over), copy mode, served
over loopback HTTP by the counting Range server, 2 workers:

- one job: a single message with ``clips``, timed from its LPUSH until its N clips' completion
  events are in ``{clips}:done``;
- N jobs: N messages of one clip each, timed the same way.

Both sides run in each round, in alternating order (the machine is shared), each round on a
URL of its own so that the host's source cache starts cold for both (``--cache cold``, the
default configuration) or stays off (``--cache off``). Reported: the bytes the server sent
and the wall time of each side (medians over rounds), and how the clips read the source.

Usage: python -m bench.multiclip [--clips 20] [--rounds 3] [--cache cold|off] [--rate B/s]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from bench import harness as h
from bench.clips import CLIP_SECONDS, clip_starts


def run_side(sup: h.Supervisor, http: h.HttpServer, url: str, starts: list[float],
             side: str, tag: str) -> dict[str, Any]:
    """Push one job of N clips (``side`` "one") or N jobs, wait for the N clips; return the
    seconds, the bytes served and how the clips read the source."""
    k = sup.keys
    spans = [{"start": s, "duration": CLIP_SECONDS, "output": f"{tag}/c{i}.mp4"}
             for i, s in enumerate(starts)]
    if side == "one":
        messages = [json.dumps({"id": tag, "url": url, "mode": "copy", "clips": spans})]
    else:
        messages = [json.dumps({"id": f"{tag}-{i}", "url": url, "mode": "copy", **span})
                    for i, span in enumerate(spans)]
    http.reset()
    started = time.monotonic()
    sup.r.lpush(k["queue"], *messages)
    events = h.wait_done(sup.r, k, len(spans), 600, what=f"{side}: all clips done")
    elapsed = time.monotonic() - started
    reads: dict[str, int] = {}
    for event in events:
        read = event.get("source_read", "?")
        reads[read] = reads.get(read, 0) + 1
    served = http.stats()
    return {"seconds": elapsed, "bytes_served": served["bytes"],
            "requests": len(served["requests"]), "reads": reads,
            "source_bytes_sum": sum(e.get("source_bytes", 0) for e in events)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", choices=("cold", "off"), default="cold")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="bytes/s of each of the server's answers (0: as fast as it goes)")
    args = parser.parse_args()

    name, seconds, size, bitrate = h.SOURCE_720P
    source = h.media(name, seconds, size, bitrate)
    source_bytes = os.path.getsize(source)
    tmp = h.tmpdir("multiclip")
    www = h.site(tmp, {"src.mp4": source})
    starts = clip_starts(args.clips, seconds)
    redis_server = h.RedisServer(os.path.join(tmp, "redis"))
    http = h.HttpServer(www, rate=args.rate)
    job = {"mode": "copy", "timeout": 900, "stall_timeout": 120}
    if args.cache == "off":
        job["cache_max_bytes"] = "0"
    sup = h.Supervisor(os.path.join(tmp, "sup"), redis_server.url, args.workers, job=job)
    sup.start()
    results: dict[str, list[dict[str, Any]]] = {"one": [], "many": []}
    try:
        for r in range(args.rounds):
            for side in (("one", "many") if r % 2 == 0 else ("many", "one")):
                # A URL of its own (the server ignores the query, the cache's key does not)
                url = http.url("src.mp4") + f"?round={r}&side={side}"
                got = run_side(sup, http, url, starts, side, f"r{r}-{side}")
                results[side].append(got)
                h.note(f"round {r} {side:>4}: {got['seconds']:.2f} s, "
                       f"{got['bytes_served'] / 1e6:.1f} MB served, reads {got['reads']}")
    finally:
        sup.stop()
        redis_server.stop()

    def med(side: str, key: str) -> float:
        return h.median([row[key] for row in results[side]])

    one_s, many_s = med("one", "seconds"), med("many", "seconds")
    one_b, many_b = med("one", "bytes_served"), med("many", "bytes_served")
    line = (f"multiclip: {args.clips} x {CLIP_SECONDS:g} s clips of a {seconds} s "
            f"{source_bytes / 1e6:.1f} MB source (cache {args.cache}): one job "
            f"{one_b / 1e6:.1f} MB in {one_s:.2f} s, {args.clips} jobs {many_b / 1e6:.1f} MB "
            f"in {many_s:.2f} s ({many_b / one_b:.1f}x the bytes, {many_s / one_s:.2f}x "
            f"the time; medians of {args.rounds} rounds)")
    h.emit(f"multiclip-cache-{args.cache}", line, {
        "clips": args.clips, "clip_seconds": CLIP_SECONDS, "source_seconds": seconds,
        "source_bytes": source_bytes, "cache": args.cache, "rate": args.rate,
        "workers": args.workers, "rounds": results})


if __name__ == "__main__":
    main()
