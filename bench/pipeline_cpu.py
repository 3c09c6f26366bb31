"""The worker's own CPU per clip, without Redis: the pipeline alone, by how it reads.

Runs ``worker.pipeline.Pipeline`` in this process on 20 ten-second copy clips of the 720p
source (the same clips as bench.clips), one after the other, and prints the Python CPU per
job (this process, all threads; ffmpeg's own CPU not included) and the wall time per job:

- ``file``: a ``file://`` source, ffmpeg on the local file (running and watching ffmpeg,
  verifying and storing the clip);
- ``ranges``: served over loopback HTTP with Range support, read in place through the
  relay; the relay's threads are timed apart (``time.thread_time``): passing bytes on,
  answering ffmpeg's requests (the source's HTTP answers included), its accept loop;
- ``download``: the same server, ``range_requests = false``;
- ``cache``: the same server, the source kept in the host's source cache by a first clip
  (not timed): each job confirms the source with a one-byte request, then ffmpeg reads the
  kept copy.

The source cache is off in the other modes, which read as named every time.

Usage: python -m bench.pipeline_cpu [--clips 20]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import harness as h
from bench.clips import CLIP_SECONDS, clip_starts


def _timed(counter: collections.Counter, key: str, fn: Callable[..., Any]) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            counter[key] += time.thread_time() - started
    return wrapper


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    if os.path.realpath(sys.prefix) != os.path.realpath(h.clip_venv()):
        # The pipeline runs in this process: in clip-supervisor's own venv, not the bench's
        python = h.clip_python()
        os.execve(python, [python, "-m", "bench.pipeline_cpu", *sys.argv[1:]],
                  {**os.environ, "PYTHONPATH": h.ROOT})
    from worker import config as config_mod
    from worker import job as job_mod
    from worker import relay
    from worker.pipeline import Pipeline
    from worker.wake import Waker

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=20)
    args = parser.parse_args()
    name, seconds, size, bitrate = h.SOURCE_720P
    source = h.media(name, seconds, size, bitrate)
    tmp = h.tmpdir("pipeline-cpu")
    www = h.site(tmp, {"src.mp4": source})
    http = h.HttpServer(www)
    starts = clip_starts(args.clips, seconds)

    threads: collections.Counter[str] = collections.Counter()
    relay.Relay._pump = _timed(threads, "passing bytes", relay.Relay._pump)  # type: ignore
    relay.Relay._handle = _timed(threads, "requests", relay.Relay._handle)  # type: ignore
    relay.Relay._accept = _timed(threads, "accept loop", relay.Relay._accept)  # type: ignore

    results: dict[str, dict[str, Any]] = {}
    for mode in ("file", "ranges", "download", "cache"):
        config = config_mod.load(None, env={}, overrides={
            "job.allow_private_networks": "true", "job.allowed_schemes": "http,file",
            "job.mode": "copy",  # the clips of bench.clips --mode copy (smart is the default)
            "job.range_requests": "true" if mode == "ranges" else "false",
            # each mode as named: the source cache only in "cache" mode, where it is warm
            "job.cache_max_bytes": "2GiB" if mode == "cache" else "0",
            "job.cache_dir": os.path.join(tmp, "cache"),
            "job.work_dir": os.path.join(tmp, "work"),
            "storage.output_base": f"file://{os.path.join(tmp, 'out', mode)}"})
        worker_dir = os.path.join(tmp, "work", mode)
        os.makedirs(worker_dir)
        pipeline = Pipeline(config, worker_dir, Waker(), lambda: False, lambda stage, at_once: None,
                            lambda percent, speed: None)
        url = f"file://{source}" if mode == "file" else http.url("src.mp4")
        if mode == "cache":  # a first clip downloads the source and keeps it
            raw = json.dumps({"id": "warm-up", "url": url, "duration": 1}).encode()
            pipeline.run(job_mod.parse(raw, config), time.monotonic() + 120)
        threads.clear()
        cpu, started = _cpu(), time.monotonic()
        for i, start in enumerate(starts):
            raw = json.dumps({"id": f"{mode}-{i}", "url": url, "start": start,
                              "duration": CLIP_SECONDS}).encode()
            pipeline.run(job_mod.parse(raw, config), time.monotonic() + 120)
        n = len(starts)
        results[mode] = {"cpu_ms": (_cpu() - cpu) / n * 1000,
                         "wall_ms": (time.monotonic() - started) / n * 1000,
                         "relay_threads_ms": {k: v / n * 1000 for k, v in threads.items()}}
    h.kill_group(http.proc)

    def part(mode: str) -> str:
        res = results[mode]
        extra = "".join(f", {k} {v:.1f} ms" for k, v in res["relay_threads_ms"].items())
        return (f"{mode}: {res['cpu_ms']:.1f} ms CPU per job{extra} "
                f"({res['wall_ms']:.0f} ms wall)")

    line = ("pipeline-cpu: the worker's Python CPU per 10 s copy clip, no Redis; "
            + "; ".join(part(mode) for mode in results))
    h.emit("pipeline-cpu", line, results)


if __name__ == "__main__":
    main()
