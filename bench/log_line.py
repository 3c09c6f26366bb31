"""What one log line costs a worker: the per-job "done" line, as the daemon writes it.

Run with clip-supervisor's interpreter (``worker.logs`` is imported): one process writes
N lines of the per-job format (``job %s done in %.2f s -> %s``) to a file, in paired rounds
that alternate between:

- ``daemon``: ``worker.logs.setup`` as a worker has it (the time formatted once a second,
  no caller, thread or multiprocessing lookups), text format;
- ``logging defaults``: the same handler and format with logging's own ``Formatter`` and
  its defaults (``findCaller`` walks the stack, the thread and process names looked up);
- ``json``: the daemon's JSON format (``--log-format json``);
- ``below the level``: the daemon at ``warning``, where the call returns at once.

Reports the CPU per line (median over rounds). A no-op job costs a worker ~100-200 us of
CPU, so a few microseconds a line is a few percent of the no-op queue's throughput.

Usage: python -m bench.log_line [--lines 20000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess

from bench import harness as h

CHILD = r"""
import logging, os, resource, sys
from worker import logs
path, variant, lines = sys.argv[1], sys.argv[2], int(sys.argv[3])
fmt = "json" if variant == "json" else "text"
logs.setup("worker 1", path, "WARNING" if variant == "below the level" else "INFO", fmt)
if variant == "logging defaults":
    logging.logThreads = logging.logMultiprocessing = True
    logging._srcfile = os.path.normcase(logging.addLevelName.__code__.co_filename)
    logging.getLogger().handlers[0].setFormatter(logging.Formatter(logs.TEXT_FORMAT))
log = logging.getLogger("clip-supervisor.worker")
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
start = cpu()
for i in range(lines):
    log.info("job %s done in %.2f s -> %s%s", f"m{i}", 0.00123, "file:///srv/clips/x.mp4", "")
print((cpu() - start) / lines * 1e6)
"""

VARIANTS = ("daemon", "logging defaults", "json", "below the level")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    tmp = h.tmpdir("logline")
    costs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            path = os.path.join(tmp, "clip-supervisor.log")
            done = subprocess.run([h.clip_python(), "-c", CHILD, path, variant,
                                   str(args.lines)], cwd=h.ROOT, capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{variant}: {done.stderr[-500:]}")
            costs[variant].append(float(done.stdout))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        h.note(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v} {costs[v][-1]:.2f} us" for v in VARIANTS))
    median = {v: h.median(c) for v, c in costs.items()}
    line = ("log-line: CPU per per-job line, median of "
            f"{args.rounds} rounds of {args.lines}: " + "; ".join(
                f"{v} {median[v]:.2f} us (range {min(costs[v]):.2f}-{max(costs[v]):.2f})"
                for v in VARIANTS))
    h.emit("log-line", line, {"lines": args.lines, "rounds": args.rounds, "us_per_line": costs,
                              "median_us": median})


if __name__ == "__main__":
    main()
