"""How ffmpeg's own CPU per copy clip depends on when the other ffmpeg started.

The copy-clip benchmark (bench.clips) runs two ffmpegs at a time on each side, and finds
ffmpeg's CPU per clip under the daemon 1-2 ms above the floor's, more system time and more
sleeps among it, with nothing the worker does to ffmpeg to explain it (docs/PERFORMANCE.md,
4.1). A copy clip is mostly ffmpeg starting, and both ffmpegs fault in the same pages of the
same 215 shared libraries: two that start together wait for each other's page locks
(``folio_wait_bit_common`` under ``filemap_fault``, seen with the ``sched_switch`` trace
event), two that start apart do not, but then share the cores' caches differently.

Two runners cut the same copy clips as the floor does (plain ffmpeg, the 720p source), one
ffmpeg each at a time, started either together (a barrier before each clip: ``together``)
or the second 30 ms after the first (``apart``); the ways take turns round by round. Prints
each ffmpeg's own CPU (``os.wait4``), user and system time and voluntary context switches,
as means over every clip of each way.

Usage: python -m bench.ffmpeg_phase [--clips 50] [--rounds 6] [--offset 0.03]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import time
from typing import Any

from bench import harness as h
from bench.clips import CLIP_SECONDS, clip_starts, floor_command

WAYS = ("together", "apart")


def _runner(slot: int, way: str, src: str, out: str, starts: list[float], offset: float,
            barrier: Any, results: Any) -> None:
    usage = []
    for start in starts:
        barrier.wait()
        if way == "apart" and slot == 1:
            time.sleep(offset)
        proc = subprocess.Popen(floor_command(src, out, start, "copy"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _, status, ru = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"ffmpeg failed on the clip at {start} s")
        usage.append((ru.ru_utime, ru.ru_stime, ru.ru_nvcsw))
    results.put(usage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=50, help="clips per runner per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--offset", type=float, default=0.03,
                        help="seconds between the two starts when apart")
    args = parser.parse_args()
    src = h.media(*h.SOURCE_720P)
    tmp = h.tmpdir("ffmpeg-phase")
    starts = clip_starts(2 * args.clips, h.SOURCE_720P[1])
    usage: dict[str, list[tuple[float, float, int]]] = {way: [] for way in WAYS}
    for r in range(args.rounds):
        for way in WAYS if r % 2 == 0 else WAYS[::-1]:
            barrier, results = multiprocessing.Barrier(2), multiprocessing.Queue()
            runners = [multiprocessing.Process(target=_runner, args=(
                slot, way, src, os.path.join(tmp, f"clip{slot}.mp4"), starts[slot::2],
                args.offset, barrier, results)) for slot in range(2)]
            for runner in runners:
                runner.start()
            for _ in runners:
                usage[way] += results.get(timeout=600)
            for runner in runners:
                runner.join()
        h.note(f"round {r + 1}/{args.rounds} done")
    figures = {way: {"cpu_ms": 1e3 * statistics.mean(u + s for u, s, _ in usage[way]),
                     "user_ms": 1e3 * statistics.mean(u for u, _, _ in usage[way]),
                     "system_ms": 1e3 * statistics.mean(s for _, s, _ in usage[way]),
                     "sleeps": statistics.mean(n for _, _, n in usage[way]),
                     "clips": len(usage[way])} for way in WAYS}
    parts = [f"{way} {f['cpu_ms']:.2f} ms CPU (user {f['user_ms']:.2f}, system "
             f"{f['system_ms']:.2f}, {f['sleeps']:.1f} sleeps)" for way, f in figures.items()]
    ratio = figures["together"]["cpu_ms"] / figures["apart"]["cpu_ms"]
    line = (f"ffmpeg-phase: ffmpeg's CPU per {CLIP_SECONDS:g} s copy clip, two at a time, "
            f"{args.rounds} alternating rounds of {2 * args.clips} clips a way: "
            + "; ".join(parts) + f"; together / apart {ratio:.3f}")
    h.emit("ffmpeg-phase", line, {"clips": args.clips, "rounds": args.rounds,
                                  "offset": args.offset, "figures": figures})


if __name__ == "__main__":
    main()
